"""The composed posterior as a TFP citizen: shapes, inversion, joint models, wrappers, MCMC."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_composed as tfc

tfb = tfp.bijectors
tfd = tfp.distributions

RTOL = ATOL = 1e-4

class _Net(tf.Module):
  """`shift_and_log_scale_fn` for the prior's RealNVP: one tanh layer, any batch rank."""

  def __init__(self, num_masked, num_out, hidden=8, seed=0):
    super().__init__()
    rng = np.random.RandomState(seed)
    self.w1 = tf.Variable(rng.randn(hidden, num_masked).astype(np.float32) / num_masked**0.5)
    self.b1 = tf.Variable(rng.randn(hidden).astype(np.float32) * 0.1)
    self.w2 = tf.Variable(rng.randn(2 * num_out, hidden).astype(np.float32) * 0.3)

  def __call__(self, x, output_units, **unused):
    h = tf.tanh(tf.linalg.matvec(self.w1, x) + self.b1)
    shift, raw = tf.split(tf.linalg.matvec(self.w2, h), 2, axis=-1)
    return shift, 0.5 * tf.tanh(raw)


def _vector_prior():
  """A 2-D non-Gaussian flow prior: skew, a coupling layer and a shift, all with variables."""
  return tfd.TransformedDistribution(
      tfd.Sample(tfd.Normal(0., 1.), [2]),
      tfb.Chain([tfb.Shift(tf.Variable([0.3, 0.])),
                 tfb.RealNVP(num_masked=1, shift_and_log_scale_fn=_Net(1, 1)),
                 tfb.SinhArcsinh(skewness=tf.Variable([0.3, -0.2]))]))


def _image_prior():
  """A flow prior over `[2, 2, 1]` images: elementwise skew, a coupling across pixels."""
  shape = [2, 2, 1]
  return tfd.TransformedDistribution(
      tfd.Sample(tfd.Normal(0., 1.), shape),
      tfb.Chain([tfb.Shift(tf.Variable(np.full(shape, 0.2, np.float32))),
                 tfb.Reshape(event_shape_out=shape, event_shape_in=[4]),
                 tfb.RealNVP(num_masked=2, shift_and_log_scale_fn=_Net(2, 2, seed=1)),
                 tfb.Reshape(event_shape_out=[4], event_shape_in=shape),
                 tfb.SinhArcsinh(skewness=tf.Variable(np.full(shape, 0.3, np.float32)))]))


def _perturb(posterior, seed=0, scale=0.3):
  """Moves every trainable variable randomly (keeping Keras constraints such as MADE masks),
  so that the posterior is far from the prior without the cost of training."""
  rng = np.random.RandomState(seed)
  for v in posterior.trainable_variables:
    value = v + scale * rng.randn(*v.shape).astype(v.dtype.as_numpy_dtype)
    constraint = getattr(v, "constraint", None)
    v.assign(constraint(value) if constraint is not None else value)
  return posterior


def _vector(pregenerator):
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Mask([True, False]), scale=0.3)
  return _perturb(tfc.ComposedPosterior(_vector_prior(), likelihood, observation=[0.5],
                                        pregenerator=pregenerator, num_components=2,
                                        base="mixture"))


def _image(pregenerator):
  mask = np.array([True, False, False, True]).reshape([2, 2, 1])
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Mask(mask), scale=0.3)
  return _perturb(tfc.ComposedPosterior(_image_prior(), likelihood, observation=[0.4, -0.1],
                                        pregenerator=pregenerator, num_components=3,
                                        base="mixture"))


CASES = {
    "vector_iaf": lambda: _vector(tfc.pregenerators.iaf([2], num_layers=1, hidden_units=(8,))),
    "vector_real_nvp": lambda: _vector(
        tfc.pregenerators.real_nvp([2], num_layers=1, hidden_units=(8,))),
    "image_real_nvp": lambda: _image(
        tfc.pregenerators.real_nvp([2, 2, 1], num_layers=1, hidden_units=(8,))),
    "image_conv": lambda: _image(tfc.pregenerators.conv([2, 2, 1], num_layers=2, filters=4)),
}


def _cases(unbatched=False, names=tuple(CASES)):
  """Case names; with `unbatched`, the RealNVP ones are expected to fail (see above)."""
  return [pytest.param(name) if unbatched and "real_nvp" in name
          else name for name in names]



_POSTERIORS = {}


def _posterior(name):
  if name not in _POSTERIORS:
    _POSTERIORS[name] = CASES[name]()
  return _POSTERIORS[name]


def _noise(x, scale=0.1):
  """The observation model of the larger model: `y ~ N(x, scale^2 I)` over x's event."""
  return tfd.Independent(tfd.Normal(x, scale), reinterpreted_batch_ndims=3 if
                         x.shape[-1] == 1 else 1)


# ---------------------------------------------------------------------------
# Shapes, and log_prob by inversion equals the forward pass's value.


@pytest.mark.parametrize("name", _cases())
def test_shapes_and_log_prob_of_sample(name):
  posterior = _posterior(name)
  event = posterior.prior.event_shape
  assert posterior.event_shape == event
  assert posterior.batch_shape == []
  assert posterior.dtype == posterior.prior.dtype
  x, log_q = posterior.experimental_sample_and_log_prob([4, 16], seed=[5, 6])
  assert x.shape == [4, 16] + event and log_q.shape == [4, 16]
  assert np.all(np.isfinite(log_q.numpy()))
  # `tf.identity` gives a tensor the bijector cache has not seen: log_prob inverts f and g.
  np.testing.assert_allclose(posterior.log_prob(tf.identity(x)).numpy(), log_q.numpy(),
                             rtol=RTOL, atol=ATOL)
  # `sample` draws the same points from the same stateless seed.
  np.testing.assert_allclose(posterior.sample([4, 16], seed=[5, 6]).numpy(), x.numpy(),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", _cases(unbatched=True))
def test_single_unbatched_event(name):
  posterior = _posterior(name)
  x = posterior.sample(seed=[1, 2])
  assert x.shape == posterior.event_shape
  log_q = posterior.log_prob(tf.identity(x))
  assert log_q.shape == []
  batch_log_q = posterior.log_prob(tf.identity(x)[tf.newaxis])
  np.testing.assert_allclose(log_q.numpy(), batch_log_q.numpy()[0], rtol=RTOL, atol=ATOL)


def test_log_prob_of_sample_inside_tf_function():
  posterior = _posterior("image_real_nvp")
  sample_and_log_prob = tf.function(
      lambda seed: posterior.experimental_sample_and_log_prob(32, seed=seed))
  log_prob = tf.function(posterior.log_prob)  # Another graph: no cached inverse.
  x, log_q = sample_and_log_prob(tf.constant([7, 8]))
  np.testing.assert_allclose(log_prob(x).numpy(), log_q.numpy(), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------
# Inside larger TFP models.


def _joint(kind, posterior):
  if kind == "named":
    return tfd.JointDistributionNamed(dict(x=posterior, y=_noise))
  return tfd.JointDistributionSequential([posterior, _noise])


def _parts(kind, sample):
  return (sample["x"], sample["y"]) if isinstance(sample, dict) else tuple(sample)


@pytest.mark.parametrize("name, kind", [
    ("vector_iaf", "named"), ("image_conv", "named"), ("vector_iaf", "sequential"),
    pytest.param("vector_real_nvp", "named")])
def test_joint_distribution_sample_and_log_prob(name, kind):
  posterior = _posterior(name)
  joint = _joint(kind, posterior)
  sample = joint.sample(4, seed=[9, 10])
  x, y = _parts(kind, sample)
  assert x.shape == [4] + posterior.event_shape and y.shape == x.shape
  expected = posterior.log_prob(tf.identity(x)) + _noise(x).log_prob(y)
  np.testing.assert_allclose(joint.log_prob(sample).numpy(), expected.numpy(), rtol=RTOL,
                             atol=ATOL)


@pytest.mark.parametrize("name",
                         _cases(unbatched=True, names=("vector_iaf", "vector_real_nvp")))
def test_joint_distribution_inside_tf_function_and_pinned(name):
  posterior = _posterior(name)
  joint = tfd.JointDistributionNamed(dict(x=posterior, y=_noise))

  @tf.function
  def sample_and_log_prob(seed):
    sample = joint.sample(8, seed=seed)
    return sample, joint.log_prob(sample)

  sample, log_p = sample_and_log_prob(tf.constant([11, 12]))
  expected = posterior.log_prob(sample["x"]) + _noise(sample["x"]).log_prob(sample["y"])
  np.testing.assert_allclose(log_p.numpy(), expected.numpy(), rtol=RTOL, atol=ATOL)

  # The posterior as the prior of a hierarchical model: condition on a new observation.
  y_new = sample["y"][0]
  pinned = joint.experimental_pin(y=y_new)
  x = sample["x"]
  np.testing.assert_allclose(
      pinned.unnormalized_log_prob(x=x).numpy(),
      (posterior.log_prob(x) + _noise(x).log_prob(y_new)).numpy(), rtol=RTOL, atol=ATOL)


def test_sample_and_independent_wrappers():
  posterior = _posterior("image_conv")
  event = posterior.event_shape
  for wrapped in (tfd.Sample(posterior, 3),
                  tfd.Independent(tfd.BatchBroadcast(posterior, [3]), 1)):
    assert wrapped.batch_shape == [] and wrapped.event_shape == [3] + event
    x = wrapped.sample(2, seed=[13, 14])
    assert x.shape == [2, 3] + event
    expected = tf.reduce_sum(posterior.log_prob(tf.identity(x)), axis=-1)
    np.testing.assert_allclose(wrapped.log_prob(x).numpy(), expected.numpy(), rtol=RTOL,
                               atol=ATOL)
  batch = tfd.BatchBroadcast(posterior, [3])
  assert batch.batch_shape == [3] and batch.event_shape == event


def test_gradient_of_the_posterior_density():
  posterior = _posterior("vector_iaf")
  x = posterior.sample(4, seed=[15, 16])
  value, grad = tfp.math.value_and_gradient(posterior.log_prob, tf.identity(x))
  assert value.shape == [4] and grad.shape == [4, 2]
  assert np.all(np.isfinite(grad.numpy()))


# ---------------------------------------------------------------------------
# TFP re-creates distributions from their `parameters`: `copy()`, slicing, and passing a
# distribution (an AutoCompositeTensor) into a `tf.function`. The rebuilt posterior shares
# the fitted variables; the likelihood and a non-composite prior are held by reference.


@pytest.mark.parametrize("make_copy", [lambda d: d.copy(), lambda d: d[...]],
                         ids=["copy", "slice"])
def test_copy_and_slice_keep_the_fitted_distribution(make_copy):
  posterior = _posterior("vector_iaf")
  x = tf.constant([[0.1, 0.2], [1., -1.]])
  np.testing.assert_allclose(make_copy(posterior).log_prob(x).numpy(),
                             posterior.log_prob(x).numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("index", [0, -1, (5, 3), slice(None), (Ellipsis, 0)],
                         ids=["0", "-1", "5_3", "colon", "ellipsis_0"])
def test_index_beyond_the_batch_shape_raises_like_tfp(index):
  # TFP raises InvalidArgumentError for `tfd.Normal(0., 1.)[0]`; so does the posterior (its
  # batch shape is []), with an error that is also an IndexError and says why.
  with pytest.raises(tf.errors.InvalidArgumentError):
    tfd.Normal(0., 1.)[index]  # pylint: disable=expression-not-assigned
  posterior = _posterior("vector_iaf")
  with pytest.raises(tfc.posterior.BatchIndexError,
                     match=r"`ComposedPosterior` has batch shape \[\] \(it is one "
                           r"distribution\): the index .* has no batch axis"):
    posterior[index]  # pylint: disable=pointless-statement
  assert issubclass(tfc.posterior.BatchIndexError, (IndexError,))


@pytest.mark.parametrize("index, batch_shape", [
    ((), []), (Ellipsis, []), (tf.newaxis, [1]), ((Ellipsis, tf.newaxis, tf.newaxis), [1, 1]),
])
def test_index_within_the_batch_shape_like_tfp(index, batch_shape):
  posterior = _posterior("vector_iaf")
  assert tfd.Normal(0., 1.)[index].batch_shape == batch_shape
  sliced = posterior[index]
  assert sliced.batch_shape == batch_shape and sliced.event_shape == posterior.event_shape
  x = tf.constant([[0.1, 0.2], [1., -1.]])
  expected = posterior.log_prob(x).numpy().reshape([2] + [1] * len(batch_shape))
  np.testing.assert_allclose(sliced.log_prob(tf.reshape(x, [2] + [1] * len(batch_shape) + [2]))
                             .numpy(), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["vector_iaf", "image_conv", "composite_prior"])
def test_posterior_as_a_tf_function_argument(name):
  if name == "composite_prior":  # A prior that is itself a composite tensor.
    prior = tfd.TransformedDistribution(
        tfd.Sample(tfd.Normal(0., 1.), [2]),
        tfb.Chain([tfb.Shift(tf.Variable([0.3, 0.])),
                   tfb.SinhArcsinh(skewness=tf.Variable([0.3, -0.2]))]))
    assert isinstance(prior, tf.__internal__.CompositeTensor)
    posterior = _perturb(tfc.ComposedPosterior(
        prior, tfc.likelihoods.Gaussian(tfc.operators.Mask([True, False]), scale=0.3), [0.5],
        pregenerator=tfc.pregenerators.affine([2]), num_components=2))
  else:
    posterior = _posterior(name)
  x = tf.constant(np.full([2] + posterior.event_shape.as_list(), 0.1, np.float32))
  traces = []

  @tf.function
  def log_prob_and_gradient(dist, x):
    traces.append(1)
    with tf.GradientTape() as tape:
      log_prob = dist.log_prob(x)
      total = tf.reduce_sum(log_prob)
    return log_prob, tape.gradient(total, dist.trainable_variables)

  def expected():
    with tf.GradientTape() as tape:
      log_prob = posterior.log_prob(x)
      total = tf.reduce_sum(log_prob)
    return log_prob, tape.gradient(total, posterior.trainable_variables)

  for _ in range(2):
    got, want = log_prob_and_gradient(posterior, x), expected()
    np.testing.assert_allclose(got[0].numpy(), want[0].numpy(), rtol=RTOL, atol=ATOL)
    for g, w in zip(got[1], want[1]):
      np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=RTOL, atol=ATOL)
    # The traced function reads the variables' current values: move them, compare again.
    _perturb(posterior, seed=len(traces) + 1, scale=0.1)
  assert len(traces) == 1  # One trace per posterior object.
