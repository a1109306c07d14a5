"""The fit loop: resume from checkpoints, distribution strategies, NaN guard, callbacks."""

import glob
import time
import os
import warnings

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

import problems
import tfp_composed as tfc

tfb = tfp.bijectors
tfd = tfp.distributions


def _posterior(num_components=2, likelihood=None, observation=(0.6,)):
  prior = problems.banana_prior()
  likelihood = likelihood or tfc.likelihoods.Gaussian(
      tfc.operators.Mask([True, False]), scale=0.1)
  pregenerator = tfc.pregenerators.real_nvp([2], num_layers=2, hidden_units=(16, 16), seed=4)
  return tfc.ComposedPosterior(prior, likelihood, list(observation), pregenerator=pregenerator,
                               num_components=num_components)


class _Interrupt(tf_keras.callbacks.Callback):
  """Stops the process-like run at a given step, as a kill would."""

  def __init__(self, at):
    super().__init__()
    self.at = at

  def on_train_batch_end(self, batch, logs=None):
    # `batch` counts within the epoch; `iterations` counts the steps reported so far.
    if int(self.model.optimizer.iterations) == self.at + 1:
      raise KeyboardInterrupt


def test_resume_from_checkpoint_reproduces_uninterrupted_losses(tmp_path):
  kwargs = dict(num_steps=120, batch_size=32, learning_rate=3e-3, seed=5, verbose=0,
                steps_per_execution=10, checkpoint_every=30)
  full = _posterior().fit(checkpoint_dir=tmp_path / "full", **kwargs).history["loss"]
  assert len(full) == 120

  with pytest.raises(KeyboardInterrupt):
    _posterior().fit(checkpoint_dir=tmp_path / "killed", callbacks=[_Interrupt(65)], **kwargs)
  # A new process would build a new posterior: nothing carries over but the checkpoint.
  resumed_posterior = _posterior()
  resumed = resumed_posterior.fit(checkpoint_dir=tmp_path / "killed", **kwargs).history["loss"]
  assert 0 < len(resumed) < 120
  np.testing.assert_allclose(resumed, full[-len(resumed):], rtol=1e-5, atol=1e-5)
  # Resuming after completion is a no-op that keeps the fitted state.
  again = resumed_posterior.fit(checkpoint_dir=tmp_path / "killed", **kwargs).history
  assert again.get("loss", []) == []


def test_mirrored_strategy_on_two_devices_matches_one_device():
  devices = tf.config.list_logical_devices("CPU")
  assert len(devices) >= 2, "conftest.py configures two logical CPU devices"
  kwargs = dict(num_steps=60, batch_size=32, learning_rate=3e-3, seed=9, verbose=0,
                steps_per_execution=10)
  single = _posterior()
  single_losses = single.fit(**kwargs).history["loss"]
  strategy = tf.distribute.MirroredStrategy([d.name for d in devices[:2]])
  with strategy.scope():
    mirrored = _posterior()
  mirrored_losses = mirrored.fit(strategy=strategy, **kwargs).history["loss"]
  # Same draws, split over two replicas and summed: equal up to float summation order.
  np.testing.assert_allclose(mirrored_losses, single_losses, rtol=2e-4, atol=2e-4)
  for a, b in zip(single.trainable_variables, mirrored.trainable_variables):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-4)


def test_nan_steps_are_skipped_and_persistent_nans_stop_with_a_clear_error():
  # log(x1 + 0.3) is NaN for draws with x1 < -0.3: some batches contain one.
  op = tfc.operators.Lambda(lambda x: x[..., :1] + 0. * tf.math.log(x[..., :1] + 0.3),
                            input_shape=[2])
  posterior = _posterior(likelihood=tfc.likelihoods.Gaussian(op, scale=1.), observation=[0.5])
  history = posterior.fit(num_steps=60, batch_size=16, seed=1, verbose=0, init=None,
                          steps_per_execution=10).history
  losses = np.array(history["loss"])
  skipped = ~np.isfinite(losses)
  assert skipped.any() and not skipped.all(), skipped
  for v in posterior.trainable_variables:
    assert np.all(np.isfinite(v.numpy()))

  always_nan = tfc.operators.Lambda(lambda x: x[..., :1] * np.nan, input_shape=[2])
  posterior = _posterior(likelihood=tfc.likelihoods.Gaussian(always_nan, scale=1.),
                         observation=[0.5])
  before = [v.numpy().copy() for v in posterior.trainable_variables]
  with pytest.raises(FloatingPointError, match="consecutive steps"):
    posterior.fit(num_steps=100, seed=1, verbose=0, init=None, max_bad_steps=20)
  for b, v in zip(before, posterior.trainable_variables):
    np.testing.assert_array_equal(b, v.numpy())


def test_callbacks_history_and_early_stop():
  seen = []

  class Stop(tf_keras.callbacks.Callback):

    def on_train_batch_end(self, batch, logs=None):
      seen.append(logs)
      if int(self.model.optimizer.iterations) > 25:
        self.model.stop_training = True

  history = _posterior().fit(num_steps=200, seed=0, verbose=0, steps_per_execution=10,
                             callbacks=[Stop()], init=None)
  assert set(history.history) >= {"loss", "grad_norm"}
  assert len(history.history["loss"]) == 30 == len(seen)
  assert all(np.isfinite(logs["loss"]) and logs["grad_norm"] >= 0 for logs in seen)
  assert isinstance(history, tf_keras.callbacks.History)


def test_progbar_prints(capsys):
  _posterior().fit(num_steps=20, seed=0, verbose=1, init=None)
  assert "20/20" in capsys.readouterr().out


def test_likelihood_annealing_schedule():
  history = _posterior().fit(num_steps=40, seed=0, verbose=0, init=None, anneal_steps=20,
                             steps_per_execution=10).history
  weights = np.array(history["likelihood_weight"])
  np.testing.assert_allclose(weights[:21], np.arange(21) / 20., atol=1e-6)
  np.testing.assert_allclose(weights[20:], 1.)


def test_fit_trains_only_posterior_variables_and_lowers_the_loss():
  posterior = _posterior()
  prior_before = [v.numpy().copy() for v in posterior.prior.trainable_variables]
  history = posterior.fit(num_steps=300, seed=0, verbose=0, init=None,
                          anneal_steps=0).history["loss"]
  assert np.mean(history[-50:]) < np.mean(history[:50])
  for b, v in zip(prior_before, posterior.prior.trainable_variables):
    np.testing.assert_array_equal(b, v.numpy())


def test_the_loop_trains_any_loss_over_explicit_variables():
  # A stochastic quadratic: E[(w - 3 - 0.1 u)^2], u ~ N(0, 1), minimized at w = 3. Only `w`
  # trains; `other` is untouched; the loss's own logs are recorded per step.
  w, other = tf.Variable([0.]), tf.Variable([5.])

  def loss(seed, step, shard):
    u = tf.random.stateless_normal([64], seed)
    value = tf.reduce_mean((w - 3. - 0.1 * u)**2 + 0. * other)
    return value, {"step_seen": tf.cast(step, tf.float32)}

  history = tfc.training.fit(loss, [w], num_steps=300, learning_rate=0.1, verbose=0)
  assert abs(float(w.numpy()[0]) - 3.) < 0.05  # Converged within the noise (0.1 / 8).
  assert float(other.numpy()[0]) == 5.
  np.testing.assert_array_equal(history.history["step_seen"], np.arange(300))


# ---------------------------------------------------------------------------
# TensorBoard, progress bar, convergence.


def _events(directory):
  """`[(step, tag, plugin, value)]` of every event under `directory`."""
  out = []
  for path in sorted(glob.glob(os.path.join(directory, "**", "events.out.tfevents.*"),
                               recursive=True)):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        plugin = v.metadata.plugin_data.plugin_name
        value = (float(tf.make_ndarray(v.tensor)) if plugin == "scalars"
                 else list(v.tensor.string_val[:2]))
        out.append((event.step, v.tag, plugin, value))
  return out


def test_log_dir_writes_every_steps_logs_as_scalars(tmp_path):
  history = _posterior().fit(num_steps=30, seed=0, verbose=0, init=None, anneal_steps=10,
                             steps_per_execution=10, log_dir=str(tmp_path)).history
  scalars = {}
  for step, tag, plugin, value in _events(str(tmp_path)):
    assert plugin == "scalars"
    scalars.setdefault(tag, {})[step] = value
  assert set(scalars) == {"train/loss", "train/grad_norm", "train/learning_rate",
                          "train/likelihood_weight"}
  for tag, values in scalars.items():
    name = tag.split("/")[1]
    assert sorted(values) == list(range(1, 31))  # Step t is written at t + 1.
    np.testing.assert_allclose([values[t + 1] for t in range(30)], history[name], rtol=1e-6)


def _image_posterior():
  prior = tfd.TransformedDistribution(
      tfd.Sample(tfd.Normal(0., 1.), [4, 4, 1]),
      tfb.Chain([tfb.Shift(tf.Variable(0.5)), tfb.Scale(tf.Variable(0.2))]))
  mask = np.zeros([4, 4, 1], bool)
  mask[:2] = True
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Mask(mask), scale=0.1)
  return tfc.ComposedPosterior(
      prior, likelihood, np.full([8], 0.7, np.float32), num_components=1,
      pregenerator=tfc.pregenerators.affine([4, 4, 1], full_rank=False))


def test_image_posteriors_write_sample_grids_mean_and_std(tmp_path):
  _image_posterior().fit(num_steps=20, seed=0, verbose=0, init=None, steps_per_execution=5,
                         log_dir=str(tmp_path), image_every=10)
  images = [(step, tag, value) for step, tag, plugin, value in _events(str(tmp_path))
            if plugin == "images"]
  # 64 draws of 4x4 images in an 8 x 8 grid; mean and std at the image's size.
  assert sorted(images) == sorted(
      [(s, "posterior/samples", [b"32", b"32"]) for s in (10, 20)]
      + [(s, t, [b"4", b"4"]) for s in (10, 20) for t in ("posterior/mean", "posterior/std")])


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_every=10, log_dir="{tmp}"), r"`image_every` needs an image-shaped event .* "
                                            r"got event shape \(2,\)"),
    (dict(image_every=10), r"`image_every` \(10\) needs `log_dir`, got log_dir=None"),
    (dict(image_every=0, log_dir="{tmp}"), r"`image_every` must be a positive integer, got 0"),
])
def test_image_summaries_arguments(tmp_path, kwargs, match):
  kwargs = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in kwargs.items()}
  with pytest.raises(ValueError, match=match):
    _posterior().fit(num_steps=2, verbose=0, init=None, **kwargs)


def test_progress_bar_shows_the_recent_mean_loss(capsys):
  # The loss of step t is t: the mean of the last 50 of 100 steps is 74.5 (the mean since the
  # start would be 49.5).
  w = tf.Variable([1.])

  def loss(seed, step, shard):
    del seed, shard
    return tf.cast(step, tf.float32) + 0. * tf.reduce_sum(w), {"weight": tf.constant(0.25)}

  tfc.training.fit(loss, [w], num_steps=100, verbose=1, steps_per_execution=10,
                   convergence=None)
  out = capsys.readouterr().out
  last = out.strip().replace("\r", "\n").splitlines()[-1]
  assert "100/100" in last and "loss: 74.5000" in last, last
  assert "grad_norm: 0.0000e+00" in last and "weight: 0.2500" in last, last


def _noisy_quadratic():
  w = tf.Variable([0.])

  def loss(seed, step, shard):
    u = tf.random.stateless_normal([64], seed)
    return tf.reduce_mean((w - 3. - 0.1 * u)**2), {}

  return w, loss


def test_convergence_stops_early_on_a_converged_quadratic():
  w, loss = _noisy_quadratic()
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # Converged: no warning.
    history = tfc.training.fit(loss, [w], num_steps=3000, learning_rate=0.1, verbose=0,
                               convergence="stop")
  assert history.converged is True
  assert len(history.history["loss"]) < 1000, len(history.history["loss"])
  assert abs(history.convergence["change"]) < 2 * history.convergence["standard_error"]
  assert abs(float(w.numpy()[0]) - 3.) < 0.05


def test_convergence_warns_when_the_loss_is_still_falling():
  w, loss = _noisy_quadratic()
  with pytest.warns(UserWarning, match=r"has not converged: the mean loss of the last 100 "
                                       r"steps changed by -"):
    history = tfc.training.fit(loss, [w], num_steps=300, learning_rate=1e-3, verbose=0)
  assert history.converged is False and len(history.history["loss"]) == 300
  assert -history.convergence["change"] > 10 * history.convergence["standard_error"]


def test_short_fits_are_not_judged():
  w, loss = _noisy_quadratic()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    history = tfc.training.fit(loss, [w], num_steps=150, learning_rate=1e-3, verbose=0)
  assert history.converged is None and history.convergence is None


# ---------------------------------------------------------------------------
# Bad input at the door: clear errors, nothing saved lost.


def _snapshot(directory):
  return {name: open(os.path.join(directory, name), "rb").read()
          for name in sorted(os.listdir(directory))}


def test_checkpoint_dir_that_is_a_file(tmp_path):
  path = tmp_path / "file"
  path.write_text("precious")
  w, loss = _noisy_quadratic()
  with pytest.raises(ValueError, match=r"`checkpoint_dir` must be a directory, got '.*file', "
                                       r"an existing file"):
    tfc.training.fit(loss, [w], num_steps=5, verbose=0, checkpoint_dir=str(path))
  assert path.read_text() == "precious" and w.numpy()[0] == 0.
  with pytest.raises(ValueError, match=r"`log_dir` must be a directory"):
    tfc.training.fit(loss, [w], num_steps=5, verbose=0, log_dir=str(path))


def _checkpointed(tmp_path, num_steps=40):
  directory = str(tmp_path / "ckpt")
  w, loss = _noisy_quadratic()
  tfc.training.fit(loss, [w], num_steps=num_steps, verbose=0, checkpoint_dir=directory,
                   steps_per_execution=10, convergence=None)
  return directory, w.numpy().copy()


def test_truncated_checkpoint_data_is_a_clear_error_and_left_untouched(tmp_path):
  directory, _ = _checkpointed(tmp_path)
  for path in glob.glob(os.path.join(directory, "*.data-*")):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  files = _snapshot(directory)
  w, loss = _noisy_quadratic()
  with pytest.raises(ValueError, match=r"`checkpoint_dir` .*ckpt.* holds a checkpoint .* "
                                       r"corrupt .* left untouched"):
    tfc.training.fit(loss, [w], num_steps=80, verbose=0, checkpoint_dir=directory)
  assert _snapshot(directory) == files and w.numpy()[0] == 0.


def test_resuming_past_num_steps_warns_and_keeps_the_checkpoint(tmp_path):
  directory, fitted = _checkpointed(tmp_path, num_steps=40)
  files = _snapshot(directory)
  w, loss = _noisy_quadratic()
  with pytest.warns(UserWarning, match=r"`num_steps` 30 is below the step 40 of the restored "
                                       r"checkpoint: nothing was trained"):
    history = tfc.training.fit(loss, [w], num_steps=30, verbose=0, checkpoint_dir=directory)
  assert history.history == {}
  np.testing.assert_array_equal(w.numpy(), fitted)
  assert _snapshot(directory) == files


@pytest.mark.parametrize("kwargs, match", [
    (dict(verbose="x"), r"`verbose` must be 0, 1, 2 or 'auto', got 'x'"),
    (dict(verbose=3), r"`verbose` must be 0, 1, 2 or 'auto', got 3"),
    (dict(convergence="sometimes"), r"`convergence` must be 'warn', 'stop', None or a "
                                    r"training.Convergence, got 'sometimes'"),
    (dict(steps_per_epoch=0), r"`steps_per_epoch` must be a positive integer, got 0"),
    (dict(summary_fn=print), r"`summary_fn` must be a callable and needs `log_dir`"),
])
def test_more_bad_arguments(kwargs, match):
  w, loss = _noisy_quadratic()
  with pytest.raises(ValueError, match=match):
    tfc.training.fit(loss, [w], num_steps=5, **kwargs)


def test_numpy_scalars_are_accepted():
  w, loss = _noisy_quadratic()
  history = tfc.training.fit(loss, [w], num_steps=np.int64(5), learning_rate=np.float32(1e-3),
                             clip_norm=np.float64(10.), verbose=np.int32(0))
  np.testing.assert_allclose(history.history["learning_rate"][0], 1e-3, rtol=1e-6)


def test_the_compiled_burst_has_no_host_round_trips():
  # Everything between two host synchronizations is graph ops: no py_function, no numpy.
  w, loss = _noisy_quadratic()
  tfc.training.fit(loss, [w], num_steps=5, verbose=0)
  runner, = tfc.training._RUNNERS[loss].values()  # pylint: disable=protected-access
  graph = runner.run_steps.get_concrete_function(
      *[tf.TensorSpec([], tf.int32), tf.TensorSpec([2], tf.int32)]
      + [tf.TensorSpec([], d) for d in (tf.float32, tf.float32, tf.float32, tf.bool)]
  ).graph.as_graph_def()
  ops = {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
  assert "While" in ops or "StatelessWhile" in ops
  assert not ops & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}, ops


# ---------------------------------------------------------------------------
# Time limits: the steps are planned to fit, and the schedules follow the plan.


def _slow_quadratic(seconds_per_step):
  """A quadratic whose every step sleeps `seconds_per_step` on the host (so the step time is
  known whatever the machine's load)."""
  w = tf.Variable([0.])

  def sleep(x):
    time.sleep(seconds_per_step)
    return x

  def loss(seed, step, shard):
    u = tf.random.stateless_normal([8], seed)
    u = tf.numpy_function(sleep, [u], tf.float32, stateful=True)
    return tf.reduce_mean((w - 3. - 0.1 * tf.reshape(u, [8]))**2), {}

  return w, loss


def test_time_limit_plans_the_steps_and_finishes_the_learning_rate_schedule():
  # 10 ms a step, 3 s: about 250 steps of the 100,000 asked fit. The call ends within one
  # burst (20 steps, 0.2 s) plus 1 s of slack of its limit; the cosine decay, laid over the
  # planned steps, ends at 0.05 of the peak; `on_horizon` hears the final plan.
  w, loss = _slow_quadratic(0.01)
  plans = []
  began = time.perf_counter()
  history = tfc.training.fit(loss, [w], num_steps=100_000, learning_rate=0.1, verbose=0,
                             time_limit=3., on_horizon=plans.append, convergence=None)
  seconds = time.perf_counter() - began
  steps = len(history.history["loss"])
  assert seconds < 3. + 0.2 + 1., seconds
  assert 60 <= steps <= 300, steps
  assert plans[0] == 100_000 and plans[-1] == history.planned_steps
  assert abs(history.planned_steps - steps) <= 20, (history.planned_steps, steps)
  rates = np.array(history.history["learning_rate"])
  assert rates[-1] < 0.1 * 0.1, rates[-1]  # Near the end of the decay (0.05 of the peak).
  assert rates.max() > 0.5 * 0.1  # The warm-up was planned for 100,000 steps until timed.


def test_time_limit_lays_the_annealing_over_the_planned_steps():
  # From the prior (`init=None`), the geometric annealing covers half the steps that run. A
  # first short fit traces the step (shared by the second: same objective), so the limit is
  # not spent tracing on a loaded machine.
  posterior = _posterior()
  posterior.fit(num_steps=20, seed=0, verbose=0, init=None, check_weights=False,
                steps_per_execution=10)
  history = posterior.fit(num_steps=1_000_000, seed=0, verbose=0, init=None, time_limit=5.,
                          check_weights=False, steps_per_execution=10)
  weights = np.array(history.history["likelihood_weight"])
  steps = weights.size
  assert steps < 1_000_000 // 2
  np.testing.assert_allclose(weights[-1], 1.)
  reached = int(np.argmax(weights >= 1.))  # The first step at weight 1: about steps / 2.
  assert 0.3 * steps <= reached <= 0.7 * steps, (reached, steps)
  assert weights[0] < 0.01


def test_a_time_limit_spent_before_training_warns():
  w, loss = _slow_quadratic(0.01)
  with pytest.warns(UserWarning, match=r"`time_limit` \(0.05 s\) left time for 20 of the "
                                       r"1000 steps"):
    history = tfc.training.fit(loss, [w], num_steps=1000, verbose=0, time_limit=0.05,
                               on_fresh_start=lambda: time.sleep(0.1), convergence=None)
  assert len(history.history["loss"]) == 20


@pytest.mark.parametrize("value", [0, -1., float("nan"), "60"])
def test_bad_time_limit(value):
  w, loss = _noisy_quadratic()
  with pytest.raises((ValueError, TypeError), match="`time_limit`"):
    tfc.training.fit(loss, [w], num_steps=5, time_limit=value)


def test_a_mode_search_past_its_share_of_the_time_limit_starts_at_the_prior():
  # A search that cannot finish in its share (here: a deadline already passed) is abandoned:
  # q starts at the prior and anneals from it, as for several modes.
  posterior = _posterior()
  posterior.initialize(seed=0, deadline=0.)
  assert posterior.modes_found is None and posterior.start_modes is None
  assert bool(posterior._from_prior.numpy())  # pylint: disable=protected-access
  with pytest.raises(tfc.initialization.SearchTimeout):
    tfc.initialization.find_modes(posterior.target, 2, deadline=0.)
  history = posterior.fit(num_steps=40, seed=0, verbose=0, init=None, check_weights=False,
                          convergence=None)
  assert history.history["likelihood_weight"][0] < 0.01  # Annealed from the prior.


def test_a_start_that_needs_no_training_ends_the_fit_before_its_first_step():
  # `on_fresh_start` returning True: no step runs, so the step is never traced (a loss that
  # raises when traced would otherwise fail), and nothing warns, under a time limit too.
  w = tf.Variable([0.])

  def loss(seed, step, shard):
    raise AssertionError("traced")

  with warnings.catch_warnings():
    warnings.simplefilter("error")
    history = tfc.training.fit(loss, [w], num_steps=100, verbose=0, time_limit=10.,
                               on_fresh_start=lambda: True)
  assert history.history.get("loss", []) == []
  np.testing.assert_array_equal(w.numpy(), [0.])
  # Any other return value (None included) trains as before.
  w, loss = _noisy_quadratic()
  history = tfc.training.fit(loss, [w], num_steps=40, verbose=0, convergence=None,
                             on_fresh_start=lambda: None)
  assert len(history.history["loss"]) == 40


@pytest.mark.parametrize("distributed", [False, True])
def test_fused_adam_is_tf_keras_adam_in_one_op(distributed):
  devices = [d.name for d in tf.config.list_logical_devices("CPU")[:2]]
  strategy = (tf.distribute.MirroredStrategy(devices) if distributed
              else tf.distribute.get_strategy())
  rng = np.random.RandomState(0)
  start = [rng.randn(3, 4).astype(np.float32), rng.randn(5).astype(np.float32)]
  gradients = [[rng.randn(*v.shape).astype(np.float32) for v in start] for _ in range(4)]
  finals, op_counts = [], []
  for optimizer_class in (tfc.training.FusedAdam, tf_keras.optimizers.Adam):
    with strategy.scope():
      variables = [tf.Variable(v) for v in start]
      optimizer = optimizer_class(1e-2)
      optimizer.build(variables)

    @tf.function
    def step(grads, rate, variables=variables, optimizer=optimizer):
      optimizer.learning_rate = rate
      strategy.run(lambda g: optimizer.apply_gradients(zip(g, variables),
                                                       skip_gradients_aggregation=True),
                   args=(grads,))

    for i, grads in enumerate(gradients):  # A changing learning rate, as fit's schedule.
      step([tf.constant(g) for g in grads], tf.constant(1e-2 / (i + 1)))
    finals.append([v.numpy() for v in variables])
    graph = step.get_concrete_function(
        [tf.constant(g) for g in gradients[0]], tf.constant(1e-2)).graph
    op_counts.append(sum(len(f.graph.get_operations()) for f in graph._functions.values()
                         if hasattr(f, "graph")) + len(graph.get_operations()))
  for ours, theirs in zip(*finals):
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)  # float32 rounding.
    assert np.abs(ours - start[0 if ours.ndim == 2 else 1]).max() > 1e-3  # It moved.
  assert op_counts[0] < 0.7 * op_counts[1], op_counts
