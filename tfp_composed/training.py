"""The fit loop: one compiled step, tf_keras callbacks, checkpoints, any tf.distribute strategy.

`fit(posterior, ...)` minimizes `posterior.loss` (the latent negative ELBO) over the
posterior's trainable variables only (pre-generator and base mixture; never the prior's).

* Each step's randomness is the stateless seed `fold_in(seed, step)`, so a run resumed from a
  checkpoint continues the uninterrupted trajectory exactly.
* Under a `tf.distribute.Strategy` every replica draws the same batch and evaluates its own
  equal slice; gradients are summed across replicas. The result equals the single-device step
  up to floating-point summation order.
* A step whose loss or gradient is not finite is skipped (variables unchanged); after
  `max_bad_steps` consecutive skips `fit` stops with a `FloatingPointError`.
"""

import math
import os
import time

import numpy as np
import tensorflow as tf
import tf_keras

__all__ = ["fit", "StepHistory"]


class StepHistory(tf_keras.callbacks.History):
  """`History` recording every step's logs (`loss`, `grad_norm`, `likelihood_weight`)."""

  def on_train_begin(self, logs=None):
    self.epoch = []
    self.history = {}

  def on_train_batch_end(self, batch, logs=None):
    for key, value in (logs or {}).items():
      self.history.setdefault(key, []).append(value)

  def on_epoch_end(self, epoch, logs=None):
    self.epoch.append(epoch)


class _FitState:
  """What tf_keras callbacks see as `model`: `stop_training` and the trainable weights."""

  def __init__(self, posterior):
    self.posterior = posterior
    self.stop_training = False

  def get_weights(self):
    return [v.numpy() for v in self.posterior.trainable_variables]

  def set_weights(self, weights):
    for v, w in zip(self.posterior.trainable_variables, weights):
      v.assign(w)


def _check_positive_int(value, name):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
  return int(value)


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


def fit(posterior, num_steps=2000, batch_size=64, learning_rate=1e-3, seed=0, callbacks=None,
        strategy=None, jit_compile=None, checkpoint_dir=None, verbose=1, init="auto",
        anneal_steps=0, steps_per_execution=20, checkpoint_every=500, max_bad_steps=50,
        clip_norm=100.):
  """Fits `posterior`'s pre-generator by stochastic gradient descent on `posterior.loss`.

  Args:
    posterior: a `ComposedPosterior`.
    num_steps: total number of optimizer steps (a resumed run counts the restored ones).
    batch_size: samples per step, split evenly over the base mixture's components.
    learning_rate: peak Adam learning rate (linear warm-up over 5% of the steps, then cosine
      decay to 5% of it).
    seed: int; step `t` uses the stateless seed `fold_in(seed, t)`.
    callbacks: list of `tf_keras.callbacks.Callback`; each step is a batch (logs: `loss`,
      `grad_norm`, `likelihood_weight`), every `steps_per_execution` steps an epoch.
    strategy: a `tf.distribute.Strategy`, or None for the default (one device).
    jit_compile: compile the step with XLA (None: off, measured no faster on CPU).
    checkpoint_dir: directory for `tf.train.CheckpointManager`; an existing checkpoint there
      is restored and training resumes at its step.
    verbose: 0 silent, 1 a `tf_keras.utils.Progbar`.
    init: "auto" runs `posterior.initialize(seed=seed)` (multi-start Laplace) unless it has
      already run or a checkpoint is restored; "laplace" always runs it; None skips it.
    anneal_steps: the likelihood weight rises linearly from 0 to 1 over these first steps.
    steps_per_execution: steps run inside one compiled call between host synchronizations.
    checkpoint_every: steps between checkpoints (also saved at the end and on interrupt).
    max_bad_steps: consecutive non-finite steps tolerated before stopping.
    clip_norm: global gradient-norm clip.

  Returns:
    A `StepHistory` (a `tf_keras.callbacks.History`) with per-step `loss` and `grad_norm`.
  """
  from tfp_composed import posterior as posterior_lib  # pylint: disable=g-import-not-at-top
  if not isinstance(posterior, posterior_lib.ComposedPosterior):
    raise TypeError(f"`posterior` must be a ComposedPosterior, got {type(posterior).__name__}.")
  num_steps = _check_positive_int(num_steps, "num_steps")
  batch_size = _check_positive_int(batch_size, "batch_size")
  steps_per_execution = _check_positive_int(steps_per_execution, "steps_per_execution")
  checkpoint_every = _check_positive_int(checkpoint_every, "checkpoint_every")
  if not (isinstance(learning_rate, (float, int)) and math.isfinite(learning_rate)
          and learning_rate > 0):
    raise ValueError(f"`learning_rate` must be a positive finite number, got {learning_rate!r}.")
  if init not in ("auto", "laplace", None):
    raise ValueError(f"`init` must be 'auto', 'laplace' or None, got {init!r}.")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise TypeError(f"`seed` must be an int, got {seed!r}.")
  max_bad_steps = _check_positive_int(max_bad_steps, "max_bad_steps")
  if (isinstance(anneal_steps, bool) or not isinstance(anneal_steps, (int, np.integer))
      or anneal_steps < 0):
    raise ValueError(f"`anneal_steps` must be a non-negative integer, got {anneal_steps!r}.")
  if not (isinstance(clip_norm, (float, int)) and math.isfinite(clip_norm) and clip_norm > 0):
    raise ValueError(f"`clip_norm` must be a positive finite number, got {clip_norm!r}.")
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
  strategy = strategy or tf.distribute.get_strategy()
  replicas = strategy.num_replicas_in_sync
  k = posterior.num_components
  per_component = -(-batch_size // k)
  per_component = -(-per_component // replicas) * replicas  # Divisible across replicas.

  variables = posterior.trainable_variables
  if replicas > 1 or strategy is not tf.distribute.get_strategy():
    plain = [v.name for v in variables if not isinstance(v, tf.distribute.DistributedValues)]
    if plain:
      raise ValueError(
          "`strategy` needs the posterior's variables to be created under it: build the "
          "pre-generator and the ComposedPosterior inside `with strategy.scope():`. Not "
          f"distributed: {plain[:3]}{'...' if len(plain) > 3 else ''}.")
  with strategy.scope():
    return _fit_in_scope(
        posterior, variables, strategy, replicas, num_steps, per_component, learning_rate,
        seed, callbacks, jit_compile, checkpoint_dir, verbose, init, anneal_steps,
        steps_per_execution, checkpoint_every, max_bad_steps, clip_norm)


def _fit_in_scope(posterior, variables, strategy, replicas, num_steps, per_component,
                  learning_rate, seed, callbacks, jit_compile, checkpoint_dir, verbose, init,
                  anneal_steps, steps_per_execution, checkpoint_every, max_bad_steps,
                  clip_norm):
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
        step=step, optimizer=optimizer, variables=list(variables),
        initialized=posterior.initialized)
    directory = os.fspath(checkpoint_dir)
    manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=3)
    if manager.latest_checkpoint is None and tf.io.gfile.glob(
        os.path.join(directory, "*.index")):
      raise ValueError(
          f"`checkpoint_dir` {directory!r} holds checkpoint files but no readable "
          "'checkpoint' state file; it was left untouched. Pass another `checkpoint_dir` or "
          "repair it.")
    if manager.latest_checkpoint:
      snapshot = [v.numpy() for v in list(variables) + [step, posterior.initialized]]
      try:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
      except (tf.errors.OpError, AssertionError, ValueError) as e:
        for v, value in zip(list(variables) + [step, posterior.initialized], snapshot):
          v.assign(value)  # A failed restore changes nothing.
        raise ValueError(
            f"`checkpoint_dir` {os.fspath(checkpoint_dir)!r} holds a checkpoint "
            f"({manager.latest_checkpoint}) that is corrupt or belongs to a different posterior; "
            f"it was left untouched. Pass another `checkpoint_dir` or remove it. "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
      restored = True

  if init == "laplace" or (init == "auto" and not restored
                           and not bool(posterior.initialized.numpy())):
    posterior.initialize(seed=seed)

  seed_tensor = tf.constant([seed % 2**31, seed // 2**31 % 2**31], tf.int32)
  anneal = float(max(0, anneal_steps))
  log_weights_fn = lambda: posterior._components()[0]  # pylint: disable=protected-access

  def replica_grads(step_seed, weight):
    ctx = tf.distribute.get_replica_context()
    shard = (ctx.replica_id_in_sync_group, replicas) if replicas > 1 else None
    with tf.GradientTape() as tape:
      terms = posterior.negative_elbo_terms(per_component, step_seed, weight, shard=shard)
      # Sum over this replica's draws / all draws: replicas' losses add up to the mean.
      loss = tf.reduce_sum(
          tf.exp(log_weights_fn()) * tf.reduce_sum(terms, axis=0)) / per_component
    return loss, tape.gradient(loss, variables)

  def one_step():
    step_seed = tf.random.experimental.stateless_fold_in(seed_tensor, tf.cast(step, tf.int32))
    weight = (tf.minimum(1., tf.cast(step, tf.float32) / anneal) if anneal > 0
              else tf.constant(1.))
    weight = tf.cast(weight, posterior.dtype)
    loss, grads = strategy.run(replica_grads, args=(step_seed, weight))
    loss = strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
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
    return loss, grad_norm, finite, weight

  @tf.function(jit_compile=bool(jit_compile), reduce_retracing=True)
  def run_steps(count):
    losses = tf.TensorArray(posterior.dtype, size=count)
    norms = tf.TensorArray(posterior.dtype, size=count)
    oks = tf.TensorArray(tf.bool, size=count)
    weights = tf.TensorArray(posterior.dtype, size=count)
    for i in tf.range(count):
      loss, norm, ok, weight = one_step()
      losses = losses.write(i, loss)
      norms = norms.write(i, tf.cast(norm, posterior.dtype))
      oks = oks.write(i, ok)
      weights = weights.write(i, weight)
    return losses.stack(), norms.stack(), oks.stack(), weights.stack()

  history = StepHistory()
  state = _FitState(posterior)
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
      losses, norms, oks, weights = [t.numpy() for t in run_steps(tf.constant(count))]
      for i in range(count):
        logs = {"loss": float(losses[i]), "grad_norm": float(norms[i]),
                "likelihood_weight": float(weights[i])}
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
