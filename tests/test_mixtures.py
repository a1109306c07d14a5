"""The factorized base against TFP's implicitly reparameterized `MixtureSameFamily`."""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_composed import mixtures

tfd = tfp.distributions


def _parameters(seed, size=5, k=3):
  rng = np.random.RandomState(seed)
  return (tf.constant(rng.randn(size, k)), tf.constant(2. * rng.randn(size, k)),
          tf.constant(np.exp(0.3 * rng.randn(size, k))))


def _tfp_mixture(logits, locs, scales):
  return tfd.Independent(tfd.MixtureSameFamily(tfd.Categorical(logits=logits),
                                               tfd.Normal(locs, scales), reparameterize=True),
                         reinterpreted_batch_ndims=1)


def test_samples_are_tfps_and_gradients_match_its_implicit_gradients():
  parameters = _parameters(0)
  weights = tf.constant(np.random.RandomState(1).randn(7, 5))
  values, grads = [], []
  for build in (mixtures.FactorizedNormalMixture, _tfp_mixture):
    with tf.GradientTape() as tape:
      tape.watch(parameters)
      q = build(*parameters)
      x = q.sample(7, seed=[1, 2])
      # A nonlinear function of the draws and their density: every path of the gradient.
      value = tf.reduce_sum(weights * tf.sin(x)) + tf.reduce_sum(q.log_prob(x))
    values.append(x.numpy())
    grads.append([g.numpy() for g in tape.gradient(value, parameters)])
  np.testing.assert_array_equal(values[0], values[1])
  for ours, theirs in zip(*grads):
    # float64 rounding of the same closed form (TFP's: a triangular solve of the Jacobian).
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)
    assert np.abs(theirs).max() > 1e-3  # A real gradient, not zeros on both sides.
  q = mixtures.FactorizedNormalMixture(*parameters)
  assert q.reparameterization_type == tfd.FULLY_REPARAMETERIZED
  assert q.event_shape == [5] and q.batch_shape == []


def _op_count(fn, *args):
  graph = tf.function(fn).get_concrete_function(*args).graph
  count = len(graph.get_operations())
  for f in graph._functions.values():  # pylint: disable=protected-access
    count += len(f.graph.get_operations()) if hasattr(f, "graph") else 0
  return count


def test_sampling_without_a_gradient_builds_no_jacobian():
  parameters = _parameters(2, size=64, k=4)
  seed = tf.constant([3, 4])

  def sample(build):
    return lambda s: build(*parameters).sample(16, seed=s)

  ours = _op_count(sample(mixtures.FactorizedNormalMixture), seed)
  theirs = _op_count(sample(_tfp_mixture), seed)
  plain = _op_count(sample(lambda *p: tfd.Independent(tfd.MixtureSameFamily(
      tfd.Categorical(logits=p[0]), tfd.Normal(*p[1:])), reinterpreted_batch_ndims=1)), seed)
  # TFP's forward pass holds the distributional transform and its batch Jacobian (596 ops
  # here); ours is the plain mixture's sampling plus the gradient's hook (about 15 ops).
  assert ours <= plain + 20 and ours < theirs // 4, (ours, plain, theirs)


def test_gradients_reach_variables_behind_deferred_parameters():
  logits, locs, scales = _parameters(3)
  scale_variable = tfp.util.TransformedVariable(scales, tfp.bijectors.Exp())
  loc_variable = tf.Variable(locs)
  q = mixtures.FactorizedNormalMixture(logits, loc_variable, scale_variable)
  with tf.GradientTape() as tape:
    value = tf.reduce_sum(q.sample(4, seed=[5, 6]) ** 2)
  grads = tape.gradient(value, q.trainable_variables)
  assert len(grads) == 2 and all(g is not None and np.abs(g.numpy()).max() > 0 for g in grads)
