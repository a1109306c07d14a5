"""The fit loop: resume from checkpoints, distribution strategies, NaN guard, callbacks."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import problems
import tfp_composed as tfc


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
    if batch == self.at:
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
      if batch >= 25:
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
