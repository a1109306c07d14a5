"""The training loop: one compiled step, tf_keras callbacks, checkpoints, TensorBoard, any
tf.distribute strategy -- for any loss over explicit variables.

`fit(loss, variables, ...)` minimizes a stochastic loss `loss(seed, step, shard)` over
`variables` (and nothing else). `ComposedPosterior.fit` passes its negative ELBO and its own
variables (pre-generator and base mixture, never the prior's); the same loop can train an
amortized posterior or a prior.

* Each step's randomness is the stateless seed `fold_in(seed, step)`, so a run resumed from a
  checkpoint continues the uninterrupted trajectory exactly.
* The learning rate of step `t` is `lr_t = lr * s(t)`: `lr` is `model.optimizer.learning_rate`
  as callbacks see it (initially `learning_rate`), `s` a linear warm-up over 5% of the steps,
  then cosine decay to 0.05. With a `LearningRateScheduler` or `ReduceLROnPlateau` callback
  `s = 1`, so the rate the callback sets is the rate used.
* Steps run in compiled bursts of `steps_per_execution`; callbacks then see each step as a
  batch and every `steps_per_epoch` steps as an epoch. A burst ends early right after a step
  whose loss or gradient is not finite, so a callback reacting to it (`TerminateOnNaN`) stops
  training at that step; any other `stop_training` takes effect at the end of the burst (its
  remaining steps have run and are reported).
* Under a `tf.distribute.Strategy` every replica calls `loss(seed, step, shard=(i, m))` with
  the same seed and evaluates its own share; the shares must add up to the loss (as
  `ComposedPosterior.loss(shard=...)` does). Gradients are summed across replicas, so the
  result equals the single-device step up to floating-point summation order. With several
  workers, the chief writes checkpoints and summaries; the other workers write their
  checkpoints to temporary directories, removed after each save (TF's multi-worker convention).
* A step whose loss or gradient is not finite is skipped (variables unchanged); after
  `max_bad_steps` consecutive skips `fit` stops with a `FloatingPointError`.
* With `time_limit` (seconds from the call, the start in `on_fresh_start` included) the loop
  times each burst after the first (which traces) and plans the number of steps that fit the
  time left, at most `num_steps`; the learning-rate schedule and the loss's own schedule
  (`on_horizon`, e.g. likelihood annealing) are laid over the planned steps, so a fit cut
  short by time still runs its schedules to their end.
* The compiled step and the optimizer are built once per (loss object, variables, strategy,
  jit_compile) and reused by later calls, each starting like a fresh fit (step 0, optimizer
  state zero) unless it resumes from a checkpoint: TF keeps every trace, so rebuilding them per
  call grows memory by tens of MB a call.
"""

import collections
import math
import numbers
import os
import time
import warnings
import weakref

import numpy as np
import tensorflow as tf
import tf_keras

from tfp_composed import checks

__all__ = ["fit", "Convergence", "StepHistory", "image_summaries"]

# Callbacks that set the learning rate; with one of them the warm-up/cosine factor is off.
_LEARNING_RATE_CALLBACKS = (tf_keras.callbacks.LearningRateScheduler,
                            tf_keras.callbacks.ReduceLROnPlateau)
# The progress bar shows the mean loss and gradient norm of this many most recent steps.
PROGRESS_WINDOW = 50
# Under `time_limit`, the seconds per step are the median of this many most recent bursts.
_PLAN_BURSTS = 5


class StepHistory(tf_keras.callbacks.History):
  """`History` recording every step's logs (`loss`, `grad_norm`, `learning_rate`, and the
  loss's own logs); after `fit`, `converged` and `convergence` hold the convergence verdict."""

  def __init__(self):
    super().__init__()
    self.converged = None
    self.convergence = None

  def on_train_begin(self, logs=None):
    self.epoch = []
    self.history = {}

  def on_train_batch_end(self, batch, logs=None):
    for key, value in (logs or {}).items():
      self.history.setdefault(key, []).append(value)

  def on_epoch_end(self, epoch, logs=None):
    self.epoch.append(epoch)


class Convergence(tf_keras.callbacks.Callback):
  """Convergence rule on the last `2W` finite losses: `|m_1 - m_2| < tolerance * se`.

  `m_1`, `m_2` are the mean losses of the previous and the last `W = window` steps and
  `se = sqrt(2 sigma^2 / W)` the Monte Carlo standard error of their difference, with the
  step-to-step noise variance `sigma^2 = mean((L_{t+1} - L_t)^2) / 2` (insensitive to a slow
  drift of the mean). Checked at every epoch end; the verdict is the one of the last check.
  A loss still falling (or rising, as under likelihood annealing) by more than the noise is
  not converged. Fewer than `2W` finite steps in a call are not judged (`converged` is None).

  Args:
    window: `W`, steps per window.
    tolerance: the change allowed, in standard errors.
    stop: stop training at the first check that finds convergence; otherwise (default) warn at
      the end of training if the last check did not.

  `fit(convergence=...)` takes one; as a callback it only records its verdict.
  """

  def __init__(self, window=100, tolerance=2., stop=False):
    super().__init__()
    self.window = checks.integer(window, "window", minimum=2)
    self.tolerance = checks.positive_number(tolerance, "tolerance")
    if not isinstance(stop, (bool, np.bool_)):
      raise TypeError(f"`stop` must be a bool, got {stop!r}.")
    self.stop = bool(stop)
    self.converged = None
    self.result = None

  def on_train_begin(self, logs=None):
    self._losses = collections.deque(maxlen=2 * self.window)
    self.converged = None
    self.result = None

  def on_train_batch_end(self, batch, logs=None):
    value = (logs or {}).get("loss")
    if value is not None and np.isfinite(value):
      self._losses.append(float(value))

  def on_epoch_end(self, epoch, logs=None):
    if len(self._losses) < 2 * self.window:
      return
    losses = np.array(self._losses)
    previous, last = losses[:self.window].mean(), losses[self.window:].mean()
    noise_variance = np.mean(np.diff(losses)**2) / 2.
    standard_error = math.sqrt(2. * noise_variance / self.window)
    change = float(last - previous)
    self.converged = bool(abs(change) < self.tolerance * standard_error)
    step = self.model.optimizer.iterations if self.model is not None else None
    self.result = {"converged": self.converged, "step": None if step is None else int(step),
                   "change": change, "standard_error": standard_error,
                   "window": self.window, "tolerance": self.tolerance}
    if self.converged and self.stop:
      self.model.stop_training = True

  def warning(self):
    """The message `fit` warns with when the last check found no convergence, else None."""
    if self.converged is not False or self.stop:
      return None
    r = self.result
    return (f"The fit has not converged: the mean loss of the last {self.window} steps changed "
            f"by {r['change']:.4g} from the {self.window} before, "
            f"{abs(r['change']) / max(r['standard_error'], 1e-300):.1f} standard errors "
            f"(se {r['standard_error']:.3g}; tolerance {self.tolerance:g}). Train for more "
            "steps or raise `learning_rate`.")


def image_summaries(sample_fn, event_shape, num_samples=64, seed=0, name="image_every"):
  """Returns `summary_fn(step)` writing posterior sample grids, mean and std as images.

  Writes `posterior/samples` (an 8-wide grid of the draws), `posterior/mean`, `posterior/std`
  (scaled by its maximum, written as the scalar `posterior/std_max`) for `fit(summary_fn=...)`;
  images are clipped to [0, 1].

  Args:
    sample_fn: `sample_fn(n, seed) -> [n, *event_shape]` draws for a stateless `seed`.
    event_shape: `[H, W]` or `[H, W, C]` with `C` in (1, 3, 4).
    num_samples: draws per summary.
    seed: int; step `t` draws with the stateless seed `(seed, t)`.
    name: the argument named in errors.
  """
  shape = tf.TensorShape(event_shape)
  if (shape.rank not in (2, 3) or not shape.is_fully_defined()
      or (shape.rank == 3 and shape[-1] not in (1, 3, 4))):
    raise ValueError(
        f"`{name}` needs an image-shaped event [H, W] or [H, W, C] with C in (1, 3, 4), got "
        f"event shape {shape}.")
  num_samples = checks.positive_integer(num_samples, "num_samples")
  seed = checks.seed(seed)

  def summary_fn(step):
    step_seed = tf.constant([seed % 2**31, int(step) % 2**31], tf.int32)
    x = tf.convert_to_tensor(sample_fn(num_samples, step_seed))
    x = tf.cast(tf.reshape(x, [num_samples] + shape.as_list()[:2] + [-1]), tf.float32)
    std = tf.math.reduce_std(x, axis=0)
    std_max = tf.reduce_max(std)
    tf.summary.image("posterior/samples", tf.clip_by_value(_image_grid(x, cols=8), 0., 1.),
                     step=step)
    tf.summary.image("posterior/mean", tf.clip_by_value(tf.reduce_mean(x, 0)[None], 0., 1.),
                     step=step)
    tf.summary.image("posterior/std", (std / tf.maximum(std_max, 1e-12))[None], step=step)
    tf.summary.scalar("posterior/std_max", std_max, step=step)

  return summary_fn


def _image_grid(images, cols):
  """`[N, H, W, C]` -> `[1, rows * H, cols * W, C]` (rows = N // cols; all N if N < cols)."""
  n, h, w, c = images.shape
  cols = min(cols, n)
  rows = n // cols
  grid = tf.reshape(images[:rows * cols], [rows, cols, h, w, c])
  grid = tf.transpose(grid, [0, 2, 1, 3, 4])
  return tf.reshape(grid, [1, rows * h, cols * w, c])


class FusedAdam(tf_keras.optimizers.Adam):
  """`tf_keras.optimizers.Adam` whose dense update is TF's fused `ResourceApplyAdam` kernel.

  The same update (`m += (g - m)(1 - b1)`, `v += (g^2 - v)(1 - b2)`,
  `theta -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)`) and the same slot variables
  (checkpoints are interchangeable), in one op per variable: off an accelerator tf_keras
  applies it as about 37 unfused ops per variable, each a pass over the variable's memory.
  Sparse gradients, AMSGrad and the adaptive epsilon keep tf_keras's update.
  """

  def update_step(self, gradient, variable):
    if (isinstance(gradient, tf.IndexedSlices) or self.amsgrad
        or getattr(self, "adaptive_epsilon", False)):
      return super().update_step(gradient, variable)
    dtype = variable.dtype
    step = tf.cast(self.iterations + 1, dtype)
    beta_1 = tf.cast(self.beta_1, dtype)
    beta_2 = tf.cast(self.beta_2, dtype)
    index = self._index_dict[self._var_key(variable)]
    return tf.raw_ops.ResourceApplyAdam(
        var=variable.handle, m=self._momentums[index].handle,
        v=self._velocities[index].handle, beta1_power=tf.pow(beta_1, step),
        beta2_power=tf.pow(beta_2, step), lr=tf.cast(self.learning_rate, dtype), beta1=beta_1,
        beta2=beta_2, epsilon=tf.cast(self.epsilon, dtype), grad=gradient)


class _Runner:
  """The compiled burst of one (loss, variables, strategy, jit_compile) and its state.

  Everything a call may change (seed, step, schedule horizon, clip norm, learning rate) is a
  variable or an argument of the compiled function, so later fits reuse the same trace.
  """

  def __init__(self, loss_fn, variables, strategy, jit_compile):
    self.variables = variables
    self.strategy = strategy
    self.log_names = None
    replicas = strategy.num_replicas_in_sync
    # Host-side counters for callbacks: plain variables, outside the strategy.
    self.reported = tf.Variable(0, dtype=tf.int64, trainable=False, name="reported_steps")
    self.idle_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="idle_counter")
    with strategy.scope():
      self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
      self.peak_learning_rate = tf.Variable(1e-3, dtype=tf.float32, trainable=False,
                                            name="peak_learning_rate")
      self.optimizer = FusedAdam(1e-3)
      self.optimizer.build(list(variables))
    dtype = variables[0].dtype.base_dtype
    # The compiled function must not keep the loss object alive (the cache is keyed by it).
    loss_ref = _reference(loss_fn)

    def replica_grads(step_seed, step_value):
      ctx = tf.distribute.get_replica_context()
      shard = (ctx.replica_id_in_sync_group, replicas) if replicas > 1 else None
      with tf.GradientTape() as tape:
        value, logs = loss_ref()(step_seed, step_value, shard)
      if self.log_names is None:
        self.log_names = sorted(logs)
      return value, tape.gradient(value, variables), [logs[k] for k in self.log_names]

    def schedule_factor(horizon, warmup, scheduled):
      """`s(t)`: linear warm-up over `warmup` steps, then cosine decay to 0.05 at `horizon`."""
      t = tf.cast(self.step, tf.float32)
      warm = tf.minimum(1., (t + 1.) / warmup)
      progress = tf.clip_by_value((t - warmup) / tf.maximum(1., horizon - warmup), 0., 1.)
      decay = 0.05 + 0.95 * 0.5 * (1. + tf.cos(math.pi * progress))
      return tf.where(scheduled, tf.where(t < warmup, warm, decay), 1.)

    def one_step(seed, clip_norm, horizon, warmup, scheduled):
      step_seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(self.step, tf.int32))
      learning_rate = self.peak_learning_rate * schedule_factor(horizon, warmup, scheduled)
      self.optimizer.learning_rate = learning_rate
      loss, grads, logs = strategy.run(replica_grads, args=(step_seed, self.step.read_value()))
      loss = strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
      logs = [strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for v in logs]
      grads = [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None)
               if g is not None else tf.zeros_like(v) for g, v in zip(grads, variables)]
      grad_norm = tf.linalg.global_norm(grads)
      finite = tf.math.is_finite(loss) & tf.math.is_finite(grad_norm)

      def apply():
        clipped, _ = tf.clip_by_global_norm(grads, tf.cast(clip_norm, grad_norm.dtype),
                                            use_norm=grad_norm)
        # Gradients are already summed over replicas; every replica applies the same update.
        strategy.run(lambda g: self.optimizer.apply_gradients(
            zip(g, variables), skip_gradients_aggregation=True), args=(clipped,))
        return tf.constant(True)

      tf.cond(finite, apply, lambda: tf.constant(False))
      self.step.assign_add(1)
      return loss, grad_norm, finite, learning_rate, logs

    def run_steps(count, seed, clip_norm, horizon, warmup, scheduled):
      """Up to `count` steps; stops right after a non-finite one. Returns (steps run, ...)."""
      losses = tf.TensorArray(dtype, size=count)
      norms = tf.TensorArray(dtype, size=count)
      oks = tf.TensorArray(tf.bool, size=count)
      rates = tf.TensorArray(tf.float32, size=count)
      extras = tf.TensorArray(dtype, size=count, infer_shape=False)
      done = tf.constant(0)
      for i in tf.range(count):
        loss, norm, ok, rate, logs = one_step(seed, clip_norm, horizon, warmup, scheduled)
        losses = losses.write(i, tf.cast(loss, dtype))
        norms = norms.write(i, tf.cast(norm, dtype))
        oks = oks.write(i, ok)
        rates = rates.write(i, rate)
        extras = extras.write(i, tf.stack([tf.cast(v, dtype) for v in logs]) if logs
                              else tf.zeros([0], dtype))
        done = i + 1
        if not ok:
          break
      return done, losses.stack(), norms.stack(), oks.stack(), rates.stack(), extras.stack()

    self.run_steps = tf.function(run_steps, jit_compile=bool(jit_compile),
                                 reduce_retracing=True)

  def reset(self, learning_rate):
    """State of a fresh fit: step 0, optimizer moments and iterations zero."""
    self.step.assign(0)
    self.reported.assign(0)
    self.peak_learning_rate.assign(learning_rate)
    for v in self.optimizer.variables:
      v.assign(tf.zeros_like(v))


def _reference(obj):
  """A weak reference to `obj` when it supports one, else a strong one (a callable)."""
  try:
    return weakref.ref(obj)
  except TypeError:
    return lambda: obj


# loss object -> {(variable ids, strategy id, jit_compile): _Runner}; entries die with the loss.
_RUNNERS = weakref.WeakKeyDictionary()


def _runner(loss_fn, variables, strategy, jit_compile):
  """The cached `_Runner` of this setting, or a new one (cached when `loss_fn` is weakly
  referenceable and hashable)."""
  key = (tuple(id(v) for v in variables), id(strategy), bool(jit_compile))
  try:
    runners = _RUNNERS.setdefault(loss_fn, {})
  except TypeError:  # Not weakly referenceable or not hashable: no reuse.
    runners = {}
  if key not in runners:
    runners[key] = _Runner(loss_fn, variables, strategy, jit_compile)
  return runners[key]


class _OptimizerView:
  """What callbacks see as `model.optimizer`: the peak learning rate `learning_rate` (`lr`) to
  read and set, `iterations` (steps reported so far); anything else is the Adam optimizer's."""

  def __init__(self, runner):
    self._runner = runner
    self._built = True

  @property
  def learning_rate(self):
    return self._runner.peak_learning_rate

  @learning_rate.setter
  def learning_rate(self, value):
    self._runner.peak_learning_rate.assign(value)

  lr = learning_rate

  @property
  def iterations(self):
    return self._runner.reported

  def build(self, var_list):
    del var_list  # Built with the trained variables.

  def __getattr__(self, name):
    return getattr(self._runner.optimizer, name)


class _VariableGroup:
  """A layer-like view of the trained variables for `TensorBoard(histogram_freq=...)`."""

  name = "variables"

  def __init__(self, variables):
    self.weights = list(variables)


class _FitModel(tf.Module):
  """What tf_keras callbacks see as `model`.

  `stop_training`, `optimizer` (see `_OptimizerView`), `distribute_strategy`, the trained
  weights (`get_weights`/`set_weights`) and `save_weights`/`load_weights` through a
  `tf.train.Checkpoint` with the layout of `fit`'s own checkpoints (`step`, `optimizer`,
  `variables` and `checkpoint_objects`), so a saved file restores with
  `tf.train.Checkpoint(variables=variables).read(path).expect_partial()`.
  """

  def __init__(self, runner, strategy, checkpoint_objects):
    super().__init__(name="fit")
    self.step = runner.step
    self._adam = runner.optimizer
    self._trained = list(runner.variables)
    self._extras = dict(checkpoint_objects)
    self._train_counter = runner.reported
    self._test_counter = self._predict_counter = runner.idle_counter  # fit never evaluates.
    self.optimizer = _OptimizerView(runner)
    self.distribute_strategy = strategy
    self._distribution_strategy = (
        None if strategy is tf.distribute.get_strategy() else strategy)
    self.stop_training = False
    self.built = True
    self.metrics = []
    self.layers = [_VariableGroup(runner.variables)]
    self._is_graph_network = False
    self.train_tf_function = None

  @property
  def trainable_weights(self):
    return list(self._trained)

  trainable_variables = trainable_weights
  weights = trainable_weights

  @property
  def non_trainable_weights(self):
    return []

  def get_weights(self):
    return [v.numpy() for v in self._trained]

  def set_weights(self, weights):
    for v, w in zip(self._trained, weights):
      v.assign(w)

  def checkpoint(self):
    """A `tf.train.Checkpoint` of the training state, in `fit`'s checkpoint layout."""
    return tf.train.Checkpoint(step=self.step, optimizer=self._adam,
                               variables=list(self._trained), **self._extras)

  def save_weights(self, filepath, overwrite=True, save_format=None, options=None):
    del overwrite, save_format
    filepath = os.fspath(filepath)
    if filepath.endswith((".h5", ".keras")):
      raise ValueError(
          f"`fit` saves weights as a tf.train.Checkpoint; got the HDF5/Keras path "
          f"{filepath!r}. Pass a path without the .h5/.keras suffix.")
    options = options if isinstance(options, tf.train.CheckpointOptions) else None
    self.checkpoint().write(filepath, options=options)

  def load_weights(self, filepath, skip_mismatch=False, by_name=False, options=None):
    del skip_mismatch, by_name, options
    try:
      self.checkpoint().read(os.fspath(filepath)).assert_existing_objects_matched()
    except (tf.errors.OpError, AssertionError, ValueError) as e:
      raise ValueError(f"Cannot load weights from {os.fspath(filepath)!r}: "
                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

  def save(self, filepath, *args, **kwargs):
    raise NotImplementedError(
        f"`fit` trains variables, not a Keras model, and cannot save one to {filepath!r}: "
        "use ModelCheckpoint(save_weights_only=True) or `checkpoint_dir`.")


def _check_callbacks(callbacks):
  """A clear error for stock callbacks that cannot make sense for a fit of a loss."""
  for cb in callbacks:
    name = type(cb).__name__
    if isinstance(cb, tf_keras.callbacks.ModelCheckpoint):
      if not cb.save_weights_only:
        raise ValueError(
            f"`callbacks`: {name}(save_weights_only=False) saves a Keras model; `fit` trains "
            "variables, not a model. Pass save_weights_only=True (it writes a "
            "tf.train.Checkpoint of the trained variables).")
      if os.fspath(cb.filepath).endswith((".h5", ".keras")):
        raise ValueError(
            f"`callbacks`: {name} filepath {cb.filepath!r} asks for HDF5/Keras weights; `fit` "
            "writes tf.train.Checkpoints: drop the suffix.")
    if isinstance(cb, tf_keras.callbacks.TensorBoard) and cb.embeddings_freq:
      raise ValueError(
          f"`callbacks`: {name}(embeddings_freq={cb.embeddings_freq}) visualizes Embedding "
          "layers; `fit` has none. Pass embeddings_freq=0.")
    monitor = getattr(cb, "monitor", None)
    if isinstance(cb, tf_keras.callbacks.ModelCheckpoint) and not cb.save_best_only:
      monitor = None  # Monitored only to keep the best.
    if isinstance(monitor, str) and monitor.startswith("val_"):
      raise ValueError(
          f"`callbacks`: {name}(monitor={monitor!r}) monitors validation data; `fit` has "
          "none. Monitor a training log such as 'loss'.")


def _is_chief(strategy):
  return strategy.extended.should_checkpoint


def _worker_temp_dir(directory, strategy):
  """Where a non-chief worker writes: `<directory>/workertemp_<task id>` (TF's convention)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  task_id = getattr(resolver, "task_id", None) or 0
  return os.path.join(directory, f"workertemp_{task_id}")


def _barrier(strategy):
  """Waits for every replica (and worker): an all-reduce of a constant."""
  if strategy.num_replicas_in_sync > 1:
    strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.ones([])),
                    axis=None).numpy()


def _convergence(convergence):
  if convergence is None or isinstance(convergence, Convergence):
    return convergence
  if convergence in ("warn", "stop") and isinstance(convergence, str):
    return Convergence(stop=convergence == "stop")
  raise ValueError(
      f"`convergence` must be 'warn', 'stop', None or a training.Convergence, got "
      f"{convergence!r}.")


def fit(loss, variables, num_steps=2000, learning_rate=1e-3, seed=0, callbacks=None,
        strategy=None, jit_compile=None, checkpoint_dir=None, verbose=1,
        steps_per_execution=20, checkpoint_every=500, max_bad_steps=50, clip_norm=100.,
        checkpoint_objects=None, on_fresh_start=None, on_resume=None, steps_per_epoch=None,
        log_dir=None, summary_fn=None, summary_every=100, convergence="warn",
        time_limit=None, on_horizon=None):
  """Minimizes `loss` over `variables` with Adam.

  Args:
    loss: `loss(seed, step, shard) -> (scalar, logs)`: a stochastic loss for the stateless
      `seed` of optimizer step `step` (int64 tensor); `shard` is None or `(i, m)` (replica `i`
      of `m`, whose shares add up to the loss); `logs` is a dict of scalars recorded with
      each step (e.g. a likelihood weight).
    variables: the variables to train (nothing else changes).
    num_steps: total number of optimizer steps (a resumed run counts the restored ones). A
      checkpoint already past `num_steps` is restored, nothing is trained, and a warning says so.
    learning_rate: peak Adam learning rate `lr` (`lr_t = lr * s(t)`, see the module docstring).
    seed: int; step `t` uses the stateless seed `fold_in(seed, t)`.
    callbacks: list of `tf_keras.callbacks.Callback`, stock ones included (TensorBoard,
      ModelCheckpoint(save_weights_only=True), BackupAndRestore, ReduceLROnPlateau,
      LearningRateScheduler, EarlyStopping, TerminateOnNaN, ProgbarLogger, CSVLogger, ...).
      Each step is a batch (logs: `loss`, `grad_norm`, `learning_rate` and the loss's logs;
      `batch` counts within the epoch, `model.optimizer.iterations` the steps so far); every
      `steps_per_epoch` steps an epoch (logs: means over it). Callbacks that cannot apply
      (validation monitors, Keras-model saving, embeddings) are an error before training.
    strategy: a `tf.distribute.Strategy`, or None for the default (one device).
    jit_compile: compile the step with XLA (None: off).
    checkpoint_dir: directory for `tf.train.CheckpointManager`; an existing checkpoint there
      is restored and training resumes at its step.
    verbose: 0 silent, 1 a `tf_keras.utils.Progbar` (replaced by a `ProgbarLogger` callback if
      one is given), 2 one line at the end. The bar shows the mean `loss` and `grad_norm` of
      the last `PROGRESS_WINDOW` (50) steps and the current learning rate and loss logs.
    steps_per_execution: steps run inside one compiled call between host synchronizations.
    checkpoint_every: steps between checkpoints (also saved at the end and on interrupt).
    max_bad_steps: consecutive non-finite steps tolerated before stopping.
    clip_norm: global gradient-norm clip.
    checkpoint_objects: dict of further trackables saved in the checkpoint.
    on_fresh_start: called with no arguments before the first step when no checkpoint was
      restored (e.g. an initialization). If it returns True, the start needs no training:
      the call ends before its first step (nothing is traced or saved).
    on_resume: called with no arguments after a checkpoint was restored.
    steps_per_epoch: steps per callback epoch (None: `steps_per_execution`); bursts never cross
      an epoch boundary.
    log_dir: if set, a `tf.summary` writer there records every step's `train/loss`,
      `train/grad_norm`, `train/learning_rate` and `train/<log>` for the loss's logs, at step
      `t + 1` (as `experiments/train_prior.py` does).
    summary_fn: `summary_fn(step)` called with the `log_dir` writer as default every
      `summary_every` steps and at the end (e.g. `image_summaries(...)`).
    summary_every: steps between `summary_fn` calls.
    convergence: 'warn' (default: `Convergence()`, warns at the end if not converged), 'stop'
      (stops once converged), a `Convergence`, or None (off).
    time_limit: optional seconds for the whole call, counted from its start (`on_fresh_start`
      included). The steps planned are `min(num_steps, steps that fit the time left)`,
      re-planned after every burst from the measured seconds per step (the first burst, which
      traces, is not used); the learning-rate schedule and `on_horizon` follow the plan.
      A start that leaves no time still runs one burst.
    on_horizon: optional `on_horizon(planned_steps)`, called before the first step with
      `num_steps` and again whenever `time_limit` changes the plan (e.g. to lay a loss's
      annealing schedule over the steps that will run).

  Returns:
    A `StepHistory` (a `tf_keras.callbacks.History`) with per-step logs; `converged` (bool, or
    None if not judged), `convergence` (the last check's numbers) and `planned_steps` (the
    number of steps planned at the end: `num_steps`, or fewer under `time_limit`).
  """
  t_call = time.perf_counter()
  if not callable(loss):
    raise TypeError(f"`loss` must be callable as loss(seed, step, shard), got {loss!r}.")
  num_steps = checks.positive_integer(num_steps, "num_steps")
  steps_per_execution = checks.positive_integer(steps_per_execution, "steps_per_execution")
  steps_per_epoch = (steps_per_execution if steps_per_epoch is None
                     else checks.positive_integer(steps_per_epoch, "steps_per_epoch"))
  checkpoint_every = checks.positive_integer(checkpoint_every, "checkpoint_every")
  learning_rate = checks.positive_number(learning_rate, "learning_rate")
  seed = checks.seed(seed)
  max_bad_steps = checks.positive_integer(max_bad_steps, "max_bad_steps")
  clip_norm = checks.positive_number(clip_norm, "clip_norm")
  summary_every = checks.positive_integer(summary_every, "summary_every")
  if time_limit is not None:
    time_limit = checks.positive_number(time_limit, "time_limit")
  if on_horizon is not None and not callable(on_horizon):
    raise TypeError(f"`on_horizon` must be callable as on_horizon(planned_steps), got "
                    f"{on_horizon!r}.")
  if isinstance(verbose, str) and verbose == "auto":
    verbose = 1
  if (isinstance(verbose, (bool, np.bool_)) or not isinstance(verbose, numbers.Integral)
      or verbose not in (0, 1, 2)):
    raise ValueError(f"`verbose` must be 0, 1, 2 or 'auto', got {verbose!r}.")
  verbose = int(verbose)
  callbacks = [] if callbacks is None else callbacks
  if isinstance(callbacks, tf_keras.callbacks.Callback):
    callbacks = [callbacks]
  if (not isinstance(callbacks, (list, tuple))
      or not all(isinstance(c, tf_keras.callbacks.Callback) for c in callbacks)):
    raise TypeError(
        f"`callbacks` must be a list of tf_keras.callbacks.Callback, got {callbacks!r}.")
  _check_callbacks(callbacks)
  convergence = _convergence(convergence)
  if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
    raise TypeError(f"`strategy` must be a tf.distribute.Strategy, got {strategy!r}.")
  for name, path in (("checkpoint_dir", checkpoint_dir), ("log_dir", log_dir)):
    if path is not None and not isinstance(path, (str, os.PathLike)):
      raise TypeError(f"`{name}` must be a path, got {path!r}.")
  if summary_fn is not None and (not callable(summary_fn) or log_dir is None):
    raise ValueError(f"`summary_fn` must be a callable and needs `log_dir`, got summary_fn="
                     f"{summary_fn!r}, log_dir={log_dir!r}.")
  variables = tuple(variables)
  if not variables:
    raise ValueError("`variables` must hold at least one tf.Variable to train, got none.")
  strategy = strategy or tf.distribute.get_strategy()
  replicas = strategy.num_replicas_in_sync
  if replicas > 1 or strategy is not tf.distribute.get_strategy():
    plain = [v.name for v in variables if not isinstance(v, tf.distribute.DistributedValues)]
    if plain:
      raise ValueError(
          "`strategy` needs the trained variables to be created under it: build the "
          "pre-generator and the ComposedPosterior inside `with strategy.scope():`. Not "
          f"distributed: {plain[:3]}{'...' if len(plain) > 3 else ''}.")
  for name, path in (("checkpoint_dir", checkpoint_dir), ("log_dir", log_dir)):
    if path is not None:
      _check_directory(os.fspath(path), name, create=_is_chief(strategy))
  runner = _runner(loss, variables, strategy, jit_compile)
  with strategy.scope():
    return _fit_in_scope(
        runner, strategy, num_steps, learning_rate, seed, list(callbacks), checkpoint_dir,
        verbose, steps_per_execution, steps_per_epoch, checkpoint_every, max_bad_steps,
        clip_norm, dict(checkpoint_objects or {}),
        on_fresh_start, on_resume, log_dir, summary_fn, summary_every, convergence,
        _Plan(num_steps, t_call, time_limit, on_horizon))


def _check_directory(directory, name, create):
  """Raises unless `directory` is (or can be made) a directory."""
  if tf.io.gfile.exists(directory) and not tf.io.gfile.isdir(directory):
    raise ValueError(f"`{name}` must be a directory, got {directory!r}, an existing file.")
  if create:
    try:
      tf.io.gfile.makedirs(directory)
    except (tf.errors.OpError, OSError) as e:
      raise ValueError(f"`{name}` {directory!r} cannot be created as a directory: "
                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _restore(checkpoint, path, directory, runner, extras):
  """Restores `path` into `checkpoint`; a failed restore changes nothing and names the dir."""
  tracked = list(runner.variables) + [runner.step] + extras
  snapshot = [v.numpy() for v in tracked]
  try:
    checkpoint.restore(path).assert_existing_objects_matched()
  except (tf.errors.OpError, AssertionError, ValueError, IndexError, KeyError) as e:
    for v, value in zip(tracked, snapshot):
      v.assign(value)
    raise ValueError(
        f"`checkpoint_dir` {directory!r} holds a checkpoint ({path}) that is corrupt or "
        "belongs to a different posterior; it was left untouched. Pass another "
        "`checkpoint_dir` or remove it. "
        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _fit_in_scope(runner, strategy, num_steps, learning_rate, seed, callbacks,
                  checkpoint_dir, verbose, steps_per_execution, steps_per_epoch,
                  checkpoint_every, max_bad_steps, clip_norm, checkpoint_objects,
                  on_fresh_start, on_resume, log_dir, summary_fn, summary_every, convergence,
                  plan):
  """The loop of `fit`, under `strategy.scope()`; arguments already validated."""
  runner.reset(learning_rate)
  model = _FitModel(runner, strategy, checkpoint_objects)
  chief = _is_chief(strategy)

  manager = None
  restored = False
  if checkpoint_dir is not None:
    checkpoint = model.checkpoint()
    directory = os.fspath(checkpoint_dir)
    write_dir = directory if chief else _worker_temp_dir(directory, strategy)
    manager = tf.train.CheckpointManager(checkpoint, write_dir, max_to_keep=3)
    latest = tf.train.latest_checkpoint(directory)
    if latest is None and tf.io.gfile.glob(os.path.join(directory, "*.index")):
      raise ValueError(
          f"`checkpoint_dir` {directory!r} holds checkpoint files but no readable "
          "'checkpoint' state file; it was left untouched. Pass another `checkpoint_dir` or "
          "repair it.")
    if latest:
      extras = [v for v in checkpoint_objects.values() if isinstance(v, tf.Variable)]
      _restore(checkpoint, latest, directory, runner, extras)
      restored = True

  history = StepHistory()
  all_callbacks = list(callbacks) + ([convergence] if convergence is not None else [])
  has_progbar_logger = any(isinstance(c, tf_keras.callbacks.ProgbarLogger) for c in callbacks)
  callback_list = tf_keras.callbacks.CallbackList(
      all_callbacks + [history], model=model, verbose=verbose,
      epochs=-(-num_steps // steps_per_epoch), steps=steps_per_epoch)
  callback_list._check_timing = False  # pylint: disable=protected-access  # Steps run in bursts.
  scheduled = not any(isinstance(c, _LEARNING_RATE_CALLBACKS) for c in callbacks)

  before = int(runner.step.numpy())
  callback_list.on_train_begin()  # BackupAndRestore restores here.
  start = int(runner.step.numpy())
  runner.reported.assign(start)
  start_was_enough = False
  if restored or start != before:
    if on_resume is not None:
      on_resume()
  elif on_fresh_start is not None:
    start_was_enough = on_fresh_start() is True
    if start_was_enough:
      model.stop_training = True
  if start > num_steps:
    warnings.warn(
        f"`num_steps` {num_steps} is below the step {start} of the restored checkpoint: "
        f"nothing was trained and the restored state was kept. Pass `num_steps` > {start} to "
        "train further.", stacklevel=3)

  writer = tf.summary.create_file_writer(os.fspath(log_dir)) if log_dir and chief else None
  progbar = None
  window = {"loss": collections.deque(maxlen=PROGRESS_WINDOW),
            "grad_norm": collections.deque(maxlen=PROGRESS_WINDOW)}
  seed_tensor = tf.constant([seed % 2**31, seed // 2**31 % 2**31], tf.int32)
  plan.begin()

  def schedule_args():  # Tensors, so a new plan does not retrace the compiled burst.
    return (tf.constant(clip_norm, tf.float32), tf.constant(float(plan.steps)),
            tf.constant(float(max(1, plan.steps // 20))), tf.constant(scheduled))

  bad_run = 0
  current = start
  last_saved = start
  open_epoch = None
  epoch_logs = collections.defaultdict(list)
  t0 = time.time()
  try:
    while current < plan.steps and not model.stop_training:
      epoch = current // steps_per_epoch
      if open_epoch != epoch:
        callback_list.on_epoch_begin(epoch)
        open_epoch = epoch
        epoch_logs.clear()
      epoch_end = (epoch + 1) * steps_per_epoch
      count = min(steps_per_execution, epoch_end - current, plan.steps - current)
      burst_began = time.perf_counter()
      done, losses, norms, oks, rates, extras = [
          t.numpy() for t in runner.run_steps(tf.constant(count), seed_tensor, *schedule_args())]
      plan.after_burst(current + int(done), int(done), time.perf_counter() - burst_began)
      step_logs = []
      for i in range(int(done)):
        logs = {"loss": float(losses[i]), "grad_norm": float(norms[i]),
                "learning_rate": float(rates[i])}
        logs.update((name, float(value)) for name, value in zip(runner.log_names, extras[i]))
        step_logs.append(logs)
        t = current + i
        runner.reported.assign(t)
        callback_list.on_train_batch_begin(t - epoch * steps_per_epoch)
        runner.reported.assign(t + 1)
        callback_list.on_train_batch_end(t - epoch * steps_per_epoch, logs)
        for key, value in logs.items():
          if oks[i] or key not in window:
            epoch_logs[key].append(value)
        if oks[i]:
          window["loss"].append(logs["loss"])
          window["grad_norm"].append(logs["grad_norm"])
        bad_run = 0 if oks[i] else bad_run + 1
        if bad_run >= max_bad_steps:
          raise FloatingPointError(
              f"{bad_run} consecutive steps had a non-finite loss or gradient (step "
              f"{t}); they were skipped and training stopped. Lower "
              "`learning_rate`, check the observation and the likelihood's scale.")
      previous, current = current, current + int(done)
      if writer is not None:
        _write_step_summaries(writer, previous, step_logs)
        if summary_fn is not None and (current // summary_every > previous // summary_every
                                       or current >= plan.steps):
          with writer.as_default(step=current):
            summary_fn(current)
          writer.flush()
      if current >= epoch_end or current >= plan.steps or model.stop_training:
        callback_list.on_epoch_end(epoch, {
            key: float(np.mean(values)) if values else float("nan")
            for key, values in epoch_logs.items()})
        open_epoch = None
      if verbose and not has_progbar_logger and step_logs:
        shown = [(key, float(np.mean(values)) if values else float("nan"))
                 for key, values in window.items()]
        shown += [(key, value) for key, value in step_logs[-1].items() if key not in window]
        if progbar is None:  # Every value shown is current, none averaged by the bar.
          progbar = tf_keras.utils.Progbar(plan.steps, verbose=verbose,
                                           stateful_metrics=[key for key, _ in shown])
        progbar.target = plan.steps
        progbar.update(current, values=shown)
      if manager is not None and current - last_saved >= checkpoint_every:
        _save(manager, current, chief, strategy)
        last_saved = current
  finally:
    if writer is not None:
      writer.flush()
    if manager is not None and int(runner.step.numpy()) != last_saved:
      _save(manager, int(runner.step.numpy()), chief, strategy)
      last_saved = int(runner.step.numpy())
  if manager is not None and last_saved != start:
    _barrier(strategy)  # No worker reads the checkpoint before the chief has written it.
  callback_list.on_train_end({"seconds": time.time() - t0})
  history.planned_steps = plan.steps
  if (plan.deadline is not None and not start_was_enough
      and plan.steps <= min(steps_per_execution, num_steps - 1)):
    warnings.warn(
        f"`time_limit` ({plan.time_limit:g} s) left time for {plan.steps} of the "
        f"{num_steps} steps: the start and tracing took {plan.first_burst_end - plan.began:.1f} s. "
        "Give more time, or fewer `num_steps` to a start that is already done.", stacklevel=3)
  if convergence is not None:
    history.converged, history.convergence = convergence.converged, convergence.result
    if convergence.warning():
      warnings.warn(convergence.warning(), stacklevel=3)
  return history


class _Plan:
  """The number of steps to run: `num_steps`, or under a deadline what fits the time left.

  After every burst but the first (which traces), the seconds per step (median of the last
  `_PLAN_BURSTS` bursts) and the time left give the steps that fit; the plan changes when that
  differs from it by more than 1% (and never exceeds `num_steps`).
  """

  def __init__(self, num_steps, began, time_limit, on_horizon):
    self.num_steps = num_steps
    self.steps = num_steps
    self.began = began
    self.time_limit = time_limit
    self.deadline = None if time_limit is None else began + time_limit
    self.first_burst_end = None
    self.on_horizon = on_horizon
    self._bursts = 0
    self._per_step = collections.deque(maxlen=_PLAN_BURSTS)

  def begin(self):
    self.steps = self.num_steps
    self._bursts = 0
    self._per_step.clear()
    if self.on_horizon is not None:
      self.on_horizon(self.steps)

  def after_burst(self, current, count, seconds):
    self._bursts += 1
    if self.deadline is None or count == 0:
      return
    left = self.deadline - time.perf_counter()
    if self._bursts == 1:  # Tracing: not a measure of the step.
      self.first_burst_end = self.deadline - left
      if left <= 0:
        self._set(current)
      return
    self._per_step.append(seconds / count)
    per_step = max(float(np.median(self._per_step)), 1e-9)
    planned = min(self.num_steps, current + max(0, int(left / per_step)))
    if abs(planned - self.steps) > 0.01 * self.steps or planned <= current:
      self._set(planned)

  def _set(self, planned):
    self.steps = int(planned)
    if self.on_horizon is not None:
      self.on_horizon(self.steps)


def _save(manager, step, chief, strategy):
  """Saves on every worker; non-chief workers then remove their temporary directory."""
  manager.save(checkpoint_number=step)
  if not chief:
    tf.io.gfile.rmtree(manager.directory)


def _write_step_summaries(writer, first_step, step_logs):
  """Writes each step's logs as `train/<name>` scalars at step `t + 1`."""
  with writer.as_default():
    for i, logs in enumerate(step_logs):
      for key, value in logs.items():
        tf.summary.scalar(f"train/{key}", value, step=first_step + i + 1)
