"""Tests for `tfp_composed.likelihoods`: closed-form densities, shapes, argument checks."""

import re

import numpy as np
import pytest
import scipy.stats
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_composed import likelihoods
from tfp_composed import operators as ops

tfd = tfp.distributions

_MASK = np.zeros([4, 4, 1], bool)
_MASK[0, 1] = _MASK[2, 3] = _MASK[3, 0] = True


def _random(shape, seed=0, dtype=np.float32):
  return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def _mask_op():
  return ops.Mask(_MASK)


LIKELIHOODS = {
    "gaussian": lambda op: likelihoods.Gaussian(op, scale=0.3),
    "laplace": lambda op: likelihoods.Laplace(op, scale=0.3),
    "student_t": lambda op: likelihoods.StudentT(op, df=3., scale=0.3),
    "poisson": lambda op: likelihoods.Likelihood(op, lambda loc: tfd.Poisson(log_rate=loc)),
}


# ---------------------------------------------------------------------------
# Densities against closed forms.


def test_gaussian_log_prob_is_sum_of_normal_log_densities():
  scale = np.array([0.1, 0.5, 2.])
  likelihood = likelihoods.Gaussian(_mask_op(), scale=scale, dtype=tf.float64)
  x = _random([2, 4, 4, 1], dtype=np.float64)
  y = _random([3], seed=1, dtype=np.float64)
  loc = x.reshape([2, 16])[:, _MASK.ravel()]
  z = (y - loc) / scale
  expected = np.sum(-0.5 * z**2 - np.log(scale) - 0.5 * np.log(2. * np.pi), axis=-1)
  np.testing.assert_allclose(likelihood.log_prob(y, x).numpy(), expected, rtol=1e-12)


def test_laplace_log_prob_matches_scipy():
  likelihood = likelihoods.Laplace(ops.Downsample(2, input_shape=[4, 4, 1]), scale=0.2)
  x = _random([3, 4, 4, 1])
  y = _random([2, 2, 1], seed=1)
  loc = x.reshape([3, 2, 2, 2, 2, 1]).mean(axis=(2, 4))
  expected = scipy.stats.laplace.logpdf(y, loc=loc, scale=0.2).sum(axis=(1, 2, 3))
  np.testing.assert_allclose(likelihood.log_prob(y, x).numpy(), expected, rtol=1e-5)


def test_student_t_log_prob_matches_scipy():
  df = np.array([1.5, 3., 30.])
  likelihood = likelihoods.StudentT(_mask_op(), df=df, scale=0.7)
  x = _random([5, 4, 4, 1])
  y = _random([3], seed=1)
  loc = x.reshape([5, 16])[:, _MASK.ravel()]
  expected = scipy.stats.t.logpdf(y, df, loc=loc, scale=0.7).sum(axis=-1)
  np.testing.assert_allclose(likelihood.log_prob(y, x).numpy(), expected, rtol=1e-5)
  np.testing.assert_allclose(likelihood.df.numpy(), df)
  assert float(likelihood.scale) == pytest.approx(0.7)


def test_custom_poisson_noise():
  likelihood = likelihoods.Likelihood(
      ops.Identity(input_shape=[4]), lambda loc: tfd.Poisson(log_rate=loc))
  x = _random([2, 4])
  counts = np.array([0, 3, 1, 7])
  expected = scipy.stats.poisson.logpmf(counts, np.exp(x)).sum(axis=-1)
  np.testing.assert_allclose(likelihood.log_prob(counts, x).numpy(), expected, rtol=1e-5)
  y = likelihood.check_observation(counts)
  assert y.dtype == tf.float32
  np.testing.assert_allclose(likelihood.log_prob(y, x).numpy(), expected, rtol=1e-5)


# ---------------------------------------------------------------------------
# Shapes.


@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 3)])
@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_batch_and_event_shapes(name, batch_shape):
  likelihood = LIKELIHOODS[name](_mask_op())
  x = _random(batch_shape + (4, 4, 1))
  dist = likelihood.distribution(x)
  assert isinstance(dist, tfd.Independent)
  assert dist.batch_shape == batch_shape
  assert dist.event_shape == [3] == likelihood.event_shape
  y = likelihood.sample(x, seed=(1, 2))
  assert y.shape == batch_shape + (3,)
  log_prob = likelihood.log_prob(np.abs(_random([3])).round(), x)
  assert log_prob.shape == batch_shape
  assert np.all(np.isfinite(log_prob.numpy()))


def test_observation_with_batch_dims_broadcasts():
  likelihood = likelihoods.Gaussian(_mask_op(), scale=1.)
  x = _random([2, 1, 4, 4, 1])
  y = _random([5, 3], seed=1)
  assert likelihood.log_prob(y, x).shape == [2, 5]


def test_sample_is_reproducible_with_a_stateless_seed():
  likelihood = likelihoods.Gaussian(_mask_op(), scale=0.1)
  x = _random([4, 4, 1])
  np.testing.assert_array_equal(likelihood.sample(x, seed=(3, 4)).numpy(),
                                likelihood.sample(x, seed=(3, 4)).numpy())


def test_array_scale_broadcasts_to_the_output_shape():
  likelihood = likelihoods.Gaussian(ops.Identity(input_shape=[2, 3]), scale=[[0.1], [1.]])
  dist = likelihood.distribution(np.zeros([2, 3], np.float32))
  np.testing.assert_allclose(dist.distribution.stddev().numpy(), [[0.1] * 3, [1.] * 3])
  with pytest.raises(ValueError,
                     match=re.escape("`scale` of shape [3] must broadcast to the output "
                                     "shape [2]")):
    likelihoods.Gaussian(ops.Identity(input_shape=[2]), scale=[1., 1., 1.])
  # An unbound operator is checked when the likelihood is built.
  unbound = likelihoods.Laplace(ops.Identity(), scale=[1., 1., 1.])
  with pytest.raises(ValueError, match="`scale` of shape"):
    unbound.build([4])


def test_build_binds_the_operator():
  likelihood = likelihoods.Gaussian(ops.Downsample(2), scale=0.1)
  with pytest.raises(ValueError, match="no output shape yet"):
    likelihood.event_shape  # pylint: disable=pointless-statement
  with pytest.raises(ValueError, match="no output shape yet"):
    likelihood.check_observation(np.zeros([2, 2, 1]))
  assert likelihood.build([4, 4, 1]) is likelihood
  assert likelihood.event_shape == [2, 2, 1] and likelihood.input_shape == [4, 4, 1]


def test_float64_signal_with_float32_scale():
  likelihood = likelihoods.StudentT(ops.Identity(input_shape=[3]), df=4.)
  log_prob = likelihood.log_prob(np.zeros(3), np.ones([2, 3]))
  assert log_prob.dtype == tf.float64
  np.testing.assert_allclose(log_prob.numpy(), 3. * scipy.stats.t.logpdf(1., 4.), rtol=1e-6)


@pytest.mark.parametrize("name", ["gaussian", "laplace", "student_t"])
def test_dtype_follows_the_prior_it_is_built_on(name):
  likelihood = LIKELIHOODS[name](ops.Mask(_MASK))
  assert likelihood.dtype == tf.float32  # The default until it is built on a prior.
  assert likelihood.build([4, 4, 1], dtype=tf.float64) is likelihood
  assert likelihood.dtype == likelihood.scale.dtype == tf.float64
  assert likelihood.scale.numpy() == 0.3  # Re-created from the given value, not from float32.
  y = likelihood.check_observation(np.array([0.1, 0.2, 0.3]))
  assert y.dtype == tf.float64 and y.numpy()[0] == 0.1
  log_prob = likelihood.log_prob(y, np.zeros([2, 4, 4, 1]))
  assert log_prob.dtype == tf.float64
  likelihood.build([4, 4, 1], dtype=tf.float64)  # Idempotent.
  with pytest.raises(TypeError, match=r"`dtype` is float64 \(adopted from the prior"):
    likelihood.build([4, 4, 1], dtype=tf.float32)


def test_explicit_dtype_is_kept_and_a_conflict_is_an_error():
  likelihood = likelihoods.Gaussian(_mask_op(), scale=0.3, dtype=tf.float64)
  likelihood.build([4, 4, 1], dtype=tf.float64)
  with pytest.raises(TypeError, match=r"`dtype` is float64 \(passed to its constructor\) but "
                                      r"the prior's dtype is float32"):
    likelihood.build([4, 4, 1], dtype=tf.float32)
  with pytest.raises(TypeError, match=r"`dtype` must be a floating dtype, got int32"):
    likelihoods.Gaussian(_mask_op(), scale=0.3, dtype=tf.int32)


def test_parameters_are_constants_not_variables():
  likelihood = likelihoods.StudentT(_mask_op(), df=3., scale=0.1)
  assert not likelihood.trainable_variables and not likelihood.variables
  assert not isinstance(likelihood.scale, tf.Variable)
  assert likelihood.scale.dtype == likelihood.df.dtype == tf.float32


# ---------------------------------------------------------------------------
# Graphs, gradients and distribution strategies.


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_log_prob_in_tf_function_with_finite_gradient(name):
  likelihood = LIKELIHOODS[name](ops.Blur(np.ones([3, 3]) / 9., input_shape=[4, 4, 1]))
  x = tf.constant(_random([2, 4, 4, 1]))
  y = np.abs(_random([4, 4, 1], seed=1)).round()

  @tf.function(input_signature=[tf.TensorSpec([None, 4, 4, 1], tf.float32)])
  def value_and_grad(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      log_prob = likelihood.log_prob(y, x)
    return log_prob, tape.gradient(log_prob, x)

  log_prob, grad = value_and_grad(x)
  np.testing.assert_allclose(log_prob.numpy(), likelihood.log_prob(y, x).numpy(), rtol=1e-5)
  assert grad.shape == x.shape and np.all(np.isfinite(grad.numpy()))


def test_log_prob_under_mirrored_strategy():
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  assert strategy.num_replicas_in_sync == 2
  likelihood = likelihoods.Gaussian(_mask_op(), scale=0.5)
  y = likelihood.check_observation(_random([3], seed=1))
  x = _random([2, 4, 4, 1])

  @tf.function
  def replica_fn():
    context = tf.distribute.get_replica_context()
    x_replica = tf.gather(tf.constant(x), context.replica_id_in_sync_group)
    return likelihood.log_prob(y, x_replica)

  per_replica = strategy.experimental_local_results(strategy.run(replica_fn))
  np.testing.assert_allclose(
      np.stack([t.numpy() for t in per_replica]), likelihood.log_prob(y, x).numpy(), rtol=1e-6)


# ---------------------------------------------------------------------------
# Argument checks.


def test_operator_must_be_a_forward_operator():
  with pytest.raises(TypeError, match="`operator` must be a `ForwardOperator`, got <function"):
    likelihoods.Likelihood(tf.identity, tfd.Normal)
  with pytest.raises(TypeError, match="`operator` must be a `ForwardOperator`.*ndarray"):
    likelihoods.Gaussian(np.eye(3), scale=1.)
  with pytest.raises(TypeError, match="`noise_fn` must be callable, got 1.0"):
    likelihoods.Likelihood(_mask_op(), 1.)


@pytest.mark.parametrize("scale, shown", [
    (-0.1, "-0.1"), (0., "0.0"), (np.nan, "nan"), (np.inf, "inf"),
    ([0.1, -0.2, 0.3], r"1 bad entries of 3, first -0.2 at index \(1,\)"),
])
def test_scale_must_be_positive_and_finite(scale, shown):
  with pytest.raises(ValueError, match=f"`scale` must be positive and finite, got {shown}"):
    likelihoods.Gaussian(_mask_op(), scale=scale)
  with pytest.raises(ValueError, match=f"`scale` must be positive and finite, got {shown}"):
    likelihoods.Laplace(_mask_op(), scale=scale)
  with pytest.raises(ValueError, match=f"`df` must be positive and finite, got {shown}"):
    likelihoods.StudentT(_mask_op(), df=scale)


def test_scale_must_be_real():
  with pytest.raises(TypeError, match="`scale` must be a real number or array, got dtype <U3"):
    likelihoods.Gaussian(_mask_op(), scale="0.1")
  with pytest.raises(TypeError, match="`scale` must be a constant"):
    likelihoods.Gaussian(_mask_op(), scale=tf.Variable(0.1))


def test_noise_fn_is_probed_at_construction():
  # A wrong `noise_fn` is an error when the likelihood is made, not inside a trace of `fit`.
  with pytest.raises(ValueError,
                     match=re.escape("`noise_fn` must return a distribution with batch "
                                     "shape [1, 3] (the shape of `loc`) and scalar events, got "
                                     "batch shape [1] and event shape [3]")):
    likelihoods.Likelihood(_mask_op(), lambda loc: tfd.MultivariateNormalDiag(loc))
  with pytest.raises(TypeError, match=r"`noise_fn` must return a `tfd.Distribution`, got "
                                      r"<tf.Tensor.* of type EagerTensor"):
    likelihoods.Likelihood(_mask_op(), lambda loc: loc)
  with pytest.raises(ValueError, match=r"`noise_fn` must return a distribution with batch shape "
                                       r"\[1, 3\].*got batch shape \[\]"):
    likelihoods.Likelihood(_mask_op(), lambda loc: tfd.Normal(0., 1.))

  def raises(loc):
    raise RuntimeError("no noise here")

  with pytest.raises(ValueError, match=r"`noise_fn` must map `loc` of shape \[1, 3\] .*Mask.*"
                                       r"raised RuntimeError: no noise here"):
    likelihoods.Likelihood(_mask_op(), raises)


def test_noise_fn_is_probed_at_build_when_the_shape_comes_later():
  likelihood = likelihoods.Likelihood(ops.Downsample(2), lambda loc: loc)  # Shape unknown yet.
  with pytest.raises(TypeError, match=r"`noise_fn` must return a `tfd.Distribution`"):
    likelihood.build([4, 4, 1])


def test_noise_fn_wrong_batch_shape_beyond_the_probe():
  # Right on a batch of one, wrong for larger batches: caught where the batch appears.
  likelihood = likelihoods.Likelihood(_mask_op(), lambda loc: tfd.Normal(loc[:1], 1.))
  with pytest.raises(ValueError,
                     match=re.escape("`noise_fn` must return a distribution with batch "
                                     "shape [2, 3]")):
    likelihood.distribution(np.zeros([2, 4, 4, 1], np.float32))


def test_check_observation_converts_and_validates():
  likelihood = likelihoods.Gaussian(_mask_op(), scale=0.1)
  y = likelihood.check_observation([1, 2, 3])
  assert y.dtype == tf.float32 and y.shape == [3]
  assert likelihoods.Gaussian(_mask_op(), 0.1, dtype=tf.float64).check_observation(
      np.ones(3, np.float32)).dtype == tf.float64
  with pytest.raises(ValueError, match=(r"`observation` must have shape \[3\], the output shape "
                                        r"of Mask\(input_shape=\[4, 4, 1\], output_shape=\[3\]\), "
                                        r"got \[4\]")):
    likelihood.check_observation(np.zeros(4))
  with pytest.raises(ValueError, match=r"`y_test` must have shape \[3\].*got \[1, 3\]"):
    likelihood.check_observation(np.zeros([1, 3]), name="y_test")
  with pytest.raises(ValueError,
                     match=re.escape("`observation` must be finite, got 2 NaN or Inf "
                                     "entries of 3")):
    likelihood.check_observation([np.nan, 1., np.inf])
  with pytest.raises(ValueError, match="`observation` must be finite, got 1 NaN"):
    likelihood.check_observation(tf.constant([0., np.nan, 1.]))
  with pytest.raises(TypeError,
                     match=re.escape("`observation` must be a real floating-point array, "
                                     "got dtype <U1")):
    likelihood.check_observation(["a", "b", "c"])
  with pytest.raises(TypeError, match="got dtype string"):
    likelihood.check_observation(tf.constant(["a", "b", "c"]))
  with pytest.raises(TypeError, match="got dtype complex128"):
    likelihood.check_observation(np.ones(3, np.complex128))


def test_check_observation_on_symbolic_tensors_checks_statically():
  likelihood = likelihoods.Gaussian(_mask_op(), scale=0.1)
  converted = tf.function(likelihood.check_observation)(tf.constant([1., 2., 3.], tf.float64))
  assert converted.dtype == tf.float32
  with pytest.raises(ValueError, match=r"`observation` must have shape \[3\]"):
    tf.function(likelihood.check_observation)(tf.zeros([2]))
