"""The training loop: one compiled step, tf_keras callbacks, checkpoints, any tf.distribute
strategy -- for any loss over explicit variables.

`fit(loss, variables, ...)` minimizes a stochastic loss `loss(seed, step, shard)` over
`variables` (and nothing else). `ComposedPosterior.fit` passes its negative ELBO and its own
variables (pre-generator and base mixture, never the prior's); the same loop can train an
amortized posterior or a prior.

* Each step's randomness is the stateless seed `fold_in(seed, step)`, so a run resumed from a
  checkpoint continues the uninterrupted trajectory exactly.
* Under a `tf.distribute.Strategy` every replica calls `loss(seed, step, shard=(i, m))` with
  the same seed and evaluates its own share; the shares must add up to the loss (as
  `ComposedPosterior.loss(shard=...)` does). Gradients are summed across replicas, so the
  result equals the single-device step up to floating-point summation order.
* A step whose loss or gradient is not finite is skipped (variables unchanged); after
  `max_bad_steps` consecutive skips `fit` stops with a `FloatingPointError`.
"""

import math
import os
import time

import numpy as np
import tensorflow as tf
import tf_keras

from tfp_composed import checks

__all__ = ["fit", "StepHistory"]


class StepHistory(tf_keras.callbacks.History):
  """`History` recording every step's logs (`loss`, `grad_norm`, and the loss's own logs)."""

  def on_train_begin(self, logs=None):
    self.epoch = []
    self.history = {}

  def on_train_batch_end(self, batch, logs=None):
    for key, value in (logs or {}).items():
      self.history.setdefault(key, []).append(value)

  def on_epoch_end(self, epoch, logs=None):
    self.epoch.append(epoch)


class _FitState:
  """What tf_keras callbacks see as `model`: `stop_training` and the trained weights."""

  def __init__(self, variables):
    self.variables = list(variables)
    self.stop_training = False

  def get_weights(self):
    return [v.numpy() for v in self.variables]

  def set_weights(self, weights):
    for v, w in zip(self.variables, weights):
      v.assign(w)


def _learning_rate_schedule(learning_rate, num_steps, warmup_steps):
  """Linear warm-up, then cosine decay to 5% of `learning_rate` at `num_steps`."""
  decay = tf_keras.optimizers.schedules.CosineDecay(
      initial_learning_rate=learning_rate, decay_steps=max(1, num_steps - warmup_steps),
      alpha=0.05)

  class _Schedule(tf_keras.optimizers.schedules.LearningRateSchedule):

    def __call__(self, step):
      step = tf.cast(step, tf.float32)
      warm = learning_rate * tf.minimum(1., (step + 1.) / max(1, warmup_steps))
      return tf.where(step < warmup_steps, warm, decay(step - warmup_steps))

    def get_config(self):
      return {}

  return _Schedule()


def fit(loss, variables, num_steps=2000, learning_rate=1e-3, seed=0, callbacks=None,
        strategy=None, jit_compile=None, checkpoint_dir=None, verbose=1,
        steps_per_execution=20, checkpoint_every=500, max_bad_steps=50, clip_norm=100.,
        checkpoint_objects=None, on_fresh_start=None, on_resume=None):
  """Minimizes `loss` over `variables` with Adam.

  Args:
    loss: `loss(seed, step, shard) -> (scalar, logs)`: a stochastic loss for the stateless
      `seed` of optimizer step `step` (int64 tensor); `shard` is None or `(i, m)` (replica `i`
      of `m`, whose shares add up to the loss); `logs` is a dict of scalars recorded with
      each step (e.g. a likelihood weight).
    variables: the variables to train (nothing else changes).
    num_steps: total number of optimizer steps (a resumed run counts the restored ones).
    learning_rate: peak Adam learning rate (linear warm-up over 5% of the steps, then cosine
      decay to 5% of it).
    seed: int; step `t` uses the stateless seed `fold_in(seed, t)`.
    callbacks: list of `tf_keras.callbacks.Callback`; each step is a batch (logs: `loss`,
      `grad_norm` and the loss's logs), every `steps_per_execution` steps an epoch.
    strategy: a `tf.distribute.Strategy`, or None for the default (one device).
    jit_compile: compile the step with XLA (None: off).
    checkpoint_dir: directory for `tf.train.CheckpointManager`; an existing checkpoint there
      is restored and training resumes at its step.
    verbose: 0 silent, 1 a `tf_keras.utils.Progbar`.
    steps_per_execution: steps run inside one compiled call between host synchronizations.
    checkpoint_every: steps between checkpoints (also saved at the end and on interrupt).
    max_bad_steps: consecutive non-finite steps tolerated before stopping.
    clip_norm: global gradient-norm clip.
    checkpoint_objects: dict of further trackables saved in the checkpoint.
    on_fresh_start: called with no arguments before the first step when no checkpoint was
      restored (e.g. an initialization).
    on_resume: called with no arguments after a checkpoint was restored.

  Returns:
    A `StepHistory` (a `tf_keras.callbacks.History`) with per-step `loss` and `grad_norm`.
  """
  if not callable(loss):
    raise TypeError(f"`loss` must be callable as loss(seed, step, shard), got {loss!r}.")
  num_steps = checks.positive_integer(num_steps, "num_steps")
  steps_per_execution = checks.positive_integer(steps_per_execution, "steps_per_execution")
  checkpoint_every = checks.positive_integer(checkpoint_every, "checkpoint_every")
  learning_rate = checks.positive_number(learning_rate, "learning_rate")
  seed = checks.seed(seed)
  max_bad_steps = checks.positive_integer(max_bad_steps, "max_bad_steps")
  clip_norm = checks.positive_number(clip_norm, "clip_norm")
  callbacks = [] if callbacks is None else callbacks
  if isinstance(callbacks, tf_keras.callbacks.Callback):
    callbacks = [callbacks]
  if (not isinstance(callbacks, (list, tuple))
      or not all(isinstance(c, tf_keras.callbacks.Callback) for c in callbacks)):
    raise TypeError(
        f"`callbacks` must be a list of tf_keras.callbacks.Callback, got {callbacks!r}.")
  if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
    raise TypeError(f"`strategy` must be a tf.distribute.Strategy, got {strategy!r}.")
  if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
    raise TypeError(f"`checkpoint_dir` must be a path, got {checkpoint_dir!r}.")
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
  with strategy.scope():
    return _fit_in_scope(
        loss, variables, strategy, replicas, num_steps, learning_rate, seed, callbacks,
        jit_compile, checkpoint_dir, verbose, steps_per_execution, checkpoint_every,
        max_bad_steps, clip_norm, dict(checkpoint_objects or {}), on_fresh_start, on_resume)


def _fit_in_scope(loss_fn, variables, strategy, replicas, num_steps, learning_rate, seed,
                  callbacks, jit_compile, checkpoint_dir, verbose, steps_per_execution,
                  checkpoint_every, max_bad_steps, clip_norm, checkpoint_objects,
                  on_fresh_start, on_resume):
  """The loop of `fit`, under `strategy.scope()`; arguments already validated."""
  step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
  warmup = max(1, num_steps // 20)
  optimizer = tf_keras.optimizers.Adam(
      _learning_rate_schedule(float(learning_rate), num_steps, warmup))
  optimizer.build(variables)

  manager = None
  restored = False
  if checkpoint_dir is not None:
    checkpoint = tf.train.Checkpoint(
        step=step, optimizer=optimizer, variables=list(variables), **checkpoint_objects)
    directory = os.fspath(checkpoint_dir)
    manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=3)
    if manager.latest_checkpoint is None and tf.io.gfile.glob(
        os.path.join(directory, "*.index")):
      raise ValueError(
          f"`checkpoint_dir` {directory!r} holds checkpoint files but no readable "
          "'checkpoint' state file; it was left untouched. Pass another `checkpoint_dir` or "
          "repair it.")
    if manager.latest_checkpoint:
      extras = [v for v in checkpoint_objects.values() if isinstance(v, tf.Variable)]
      snapshot = [v.numpy() for v in list(variables) + [step] + extras]
      try:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
      except (tf.errors.OpError, AssertionError, ValueError) as e:
        for v, value in zip(list(variables) + [step] + extras, snapshot):
          v.assign(value)  # A failed restore changes nothing.
        raise ValueError(
            f"`checkpoint_dir` {os.fspath(checkpoint_dir)!r} holds a checkpoint "
            f"({manager.latest_checkpoint}) that is corrupt or belongs to a different posterior; "
            f"it was left untouched. Pass another `checkpoint_dir` or remove it. "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
      restored = True

  if restored:
    if on_resume is not None:
      on_resume()
  elif on_fresh_start is not None:
    on_fresh_start()

  seed_tensor = tf.constant([seed % 2**31, seed // 2**31 % 2**31], tf.int32)
  dtype = variables[0].dtype.base_dtype
  log_names = []

  def replica_grads(step_seed, step_value):
    ctx = tf.distribute.get_replica_context()
    shard = (ctx.replica_id_in_sync_group, replicas) if replicas > 1 else None
    with tf.GradientTape() as tape:
      value, logs = loss_fn(step_seed, step_value, shard)
    if not log_names:
      log_names.extend(sorted(logs))
    return value, tape.gradient(value, variables), [logs[k] for k in log_names]

  def one_step():
    step_seed = tf.random.experimental.stateless_fold_in(seed_tensor, tf.cast(step, tf.int32))
    loss, grads, logs = strategy.run(replica_grads, args=(step_seed, step.read_value()))
    loss = strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
    logs = [strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for v in logs]
    grads = [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None)
             if g is not None else tf.zeros_like(v) for g, v in zip(grads, variables)]
    grad_norm = tf.linalg.global_norm(grads)
    finite = tf.math.is_finite(loss) & tf.math.is_finite(grad_norm)

    def apply():
      clipped, _ = tf.clip_by_global_norm(grads, clip_norm, use_norm=grad_norm)
      # Gradients are already summed over replicas; every replica applies the same update.
      strategy.run(lambda g: optimizer.apply_gradients(
          zip(g, variables), skip_gradients_aggregation=True), args=(clipped,))
      return tf.constant(True)

    tf.cond(finite, apply, lambda: tf.constant(False))
    step.assign_add(1)
    return loss, grad_norm, finite, logs

  @tf.function(jit_compile=bool(jit_compile), reduce_retracing=True)
  def run_steps(count):
    losses = tf.TensorArray(dtype, size=count)
    norms = tf.TensorArray(dtype, size=count)
    oks = tf.TensorArray(tf.bool, size=count)
    extras = tf.TensorArray(dtype, size=count, infer_shape=False)
    for i in tf.range(count):
      loss, norm, ok, logs = one_step()
      losses = losses.write(i, tf.cast(loss, dtype))
      norms = norms.write(i, tf.cast(norm, dtype))
      oks = oks.write(i, ok)
      extras = extras.write(i, tf.stack([tf.cast(v, dtype) for v in logs]) if logs
                            else tf.zeros([0], dtype))
    return losses.stack(), norms.stack(), oks.stack(), extras.stack()

  history = StepHistory()
  state = _FitState(variables)
  callback_list = tf_keras.callbacks.CallbackList(
      list(callbacks) + [history], model=state, verbose=verbose, epochs=1,
      steps=num_steps)
  callback_list._check_timing = False  # pylint: disable=protected-access  # Steps run in bursts.
  progbar = tf_keras.utils.Progbar(num_steps, verbose=verbose) if verbose else None
  start = int(step.numpy())
  if progbar is not None and start:
    progbar.update(start)
  bad_run = 0
  epoch = 0
  last_saved = start
  callback_list.on_train_begin()
  t0 = time.time()
  try:
    while int(step.numpy()) < num_steps and not state.stop_training:
      current = int(step.numpy())
      count = min(steps_per_execution, num_steps - current)
      callback_list.on_epoch_begin(epoch)
      losses, norms, oks, extras = [t.numpy() for t in run_steps(tf.constant(count))]
      for i in range(count):
        logs = {"loss": float(losses[i]), "grad_norm": float(norms[i])}
        logs.update((name, float(value)) for name, value in zip(log_names, extras[i]))
        callback_list.on_train_batch_begin(current + i)
        callback_list.on_train_batch_end(current + i, logs)
        bad_run = 0 if oks[i] else bad_run + 1
        if bad_run >= max_bad_steps:
          raise FloatingPointError(
              f"{bad_run} consecutive steps had a non-finite loss or gradient (step "
              f"{current + i}); they were skipped and training stopped. Lower "
              "`learning_rate`, check the observation and the likelihood's scale.")
      epoch_logs = {"loss": float(np.mean(losses[oks])) if oks.any() else float("nan"),
                    "grad_norm": float(np.mean(norms[oks])) if oks.any() else float("nan")}
      callback_list.on_epoch_end(epoch, epoch_logs)
      epoch += 1
      if progbar is not None:
        progbar.update(current + count, values=list(epoch_logs.items()))
      if manager is not None and (current + count) - last_saved >= checkpoint_every:
        manager.save(checkpoint_number=current + count)
        last_saved = current + count
  finally:
    if manager is not None and int(step.numpy()) != last_saved:
      manager.save(checkpoint_number=int(step.numpy()))
  callback_list.on_train_end({"seconds": time.time() - t0})
  return history
