"""Property tests over the pre-generator registry: one line in REGISTRY adds a bijector here."""

import numpy as np
import pytest
import tensorflow as tf

from tfp_composed import pregenerators

NAMES = sorted(pregenerators.REGISTRY)


def _build(name):
  shape, builder = pregenerators.REGISTRY[name]
  return builder(shape), list(shape)


def _perturbed(name, scale=0.3, seed=0):
  """A registry bijector with every variable moved away from its identity initialization."""
  bijector, shape = _build(name)
  rng = np.random.RandomState(seed)
  for v in bijector.trainable_variables:
    v.assign(v + scale * rng.randn(*v.shape).astype(np.float32))
    if getattr(v, "constraint", None) is not None:  # MADE's autoregressive masks.
      v.assign(v.constraint(v))
  return bijector, shape


@pytest.mark.parametrize("name", NAMES)
def test_identity_at_initialization(name):
  bijector, shape = _build(name)
  x = tf.random.stateless_normal([7] + shape, seed=[1, 2])
  np.testing.assert_allclose(bijector.forward(x), x, atol=1e-6)
  np.testing.assert_allclose(
      bijector.forward_log_det_jacobian(x, event_ndims=len(shape)), np.zeros(7), atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_bijective_and_finite(name):
  bijector, shape = _perturbed(name)
  x = tf.random.stateless_normal([6] + shape, seed=[3, 4])
  y = bijector.forward(x)
  # tf.identity defeats the bijector cache, so the inverse is really computed.
  x_back = bijector.inverse(tf.identity(y))
  assert np.all(np.isfinite(y.numpy()))
  assert np.abs(y.numpy() - x.numpy()).max() > 1e-2, "perturbation left the identity"
  np.testing.assert_allclose(x_back, x, atol=2e-4)
  fldj = bijector.forward_log_det_jacobian(tf.identity(x), event_ndims=len(shape))
  ildj = bijector.inverse_log_det_jacobian(tf.identity(y), event_ndims=len(shape))
  np.testing.assert_allclose(fldj, -ildj, atol=2e-4)


@pytest.mark.parametrize("name", NAMES)
def test_log_det_matches_autodiff_jacobian(name):
  bijector, shape = _perturbed(name, seed=1)
  size = int(np.prod(shape))
  x = tf.random.stateless_normal([4, size], seed=[5, 6], dtype=tf.float64)
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = tf.reshape(bijector.forward(tf.cast(tf.reshape(x, [4] + shape), tf.float32)), [4, size])
    y = tf.cast(y, tf.float64)
  jacobian = tape.batch_jacobian(y, x)
  _, expected = np.linalg.slogdet(jacobian.numpy())
  fldj = bijector.forward_log_det_jacobian(
      tf.cast(tf.reshape(x, [4] + shape), tf.float32), event_ndims=len(shape))
  np.testing.assert_allclose(fldj, expected, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_every_variable_receives_a_gradient(name):
  bijector, shape = _perturbed(name, seed=2)
  x = tf.random.stateless_normal([8] + shape, seed=[7, 8])
  with tf.GradientTape() as tape:
    y = bijector.forward(x)
    loss = tf.reduce_sum(y**2) - tf.reduce_sum(
        bijector.forward_log_det_jacobian(x, event_ndims=len(shape)))
  grads = tape.gradient(loss, bijector.trainable_variables)
  assert bijector.trainable_variables
  for v, g in zip(bijector.trainable_variables, grads):
    assert g is not None, f"{v.name} is not connected to the output"
    assert np.all(np.isfinite(tf.convert_to_tensor(g).numpy()))
    assert np.abs(tf.convert_to_tensor(g).numpy()).max() > 0, f"{v.name} has a zero gradient"


@pytest.mark.parametrize("name", NAMES)
def test_affine_stage_is_found_and_sets_a_gaussian(name):
  bijector, shape = _build(name)
  size = int(np.prod(shape))
  stage = pregenerators.find_affine_stage(bijector)
  assert stage is not None
  rng = np.random.RandomState(0)
  mean = rng.randn(size)
  root = np.tril(rng.randn(size, size)) + 2 * np.eye(size)
  cov = root @ root.T if stage.full_rank else np.diag(rng.uniform(0.5, 2., size))
  stage.set_gaussian(mean, cov)
  eps = tf.random.stateless_normal([20000] + shape, seed=[9, 10])
  z = bijector.forward(eps).numpy().reshape(20000, size)
  np.testing.assert_allclose(z.mean(0), mean, atol=0.1)
  np.testing.assert_allclose(np.cov(z.T), cov, atol=0.15 * np.abs(cov).max())


def test_builders_are_deterministic_given_seed():
  a = pregenerators.real_nvp([6], num_layers=2, hidden_units=(8,), seed=3)
  b = pregenerators.real_nvp([6], num_layers=2, hidden_units=(8,), seed=3)
  for u, v in zip(a.trainable_variables, b.trainable_variables):
    np.testing.assert_array_equal(u.numpy(), v.numpy())


@pytest.mark.parametrize("bad, match", [
    ([0], "event_shape"), ([], "event_shape"), ("abc", "event_shape"), ([None, 2], "event_shape")])
def test_bad_event_shape(bad, match):
  with pytest.raises((ValueError, TypeError), match=match):
    pregenerators.real_nvp(bad)


def test_conv_needs_image_shape():
  with pytest.raises(ValueError, match=r"\[H, W, C\]"):
    pregenerators.conv([16])
