"""Property tests over the pre-generator registry: one line in REGISTRY adds a bijector here."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_composed import pregenerators

tfd = tfp.distributions

NAMES = sorted(pregenerators.REGISTRY)

# Everything in a pre-generator that is evaluated to transform a batch: its networks and the
# affine stage's scale operator. The one-pass tests count calls of these.
_EVALUATED = [
    (pregenerators._DenseNet, "__call__"),  # pylint: disable=protected-access
    (pregenerators._ConvNet, "__call__"),  # pylint: disable=protected-access
    (pregenerators.AffineStage, "scale_operator"),
]


def _build(name, **kwargs):
  shape, builder = pregenerators.REGISTRY[name]
  return builder(shape, **kwargs), list(shape)


def _perturbed(name, scale=0.3, seed=0, **kwargs):
  """A registry bijector with every variable moved away from its identity initialization."""
  bijector, shape = _build(name, **kwargs)
  rng = np.random.RandomState(seed)
  for v in bijector.trainable_variables:
    v.assign(v + scale * rng.randn(*v.shape).astype(v.dtype.as_numpy_dtype))
  return bijector, shape


def _flat_jacobian_and_log_det(bijector, shape, x_flat):
  """Autodiff Jacobian of the flattened forward map at `x_flat` `[n, D]`, and the bijector's
  forward log-det there (computed on a separate tensor, so without the cache)."""
  n, size = x_flat.shape
  with tf.GradientTape() as tape:
    tape.watch(x_flat)
    y = tf.reshape(bijector.forward(tf.reshape(x_flat, [n] + shape)), [n, size])
  jacobian = tape.batch_jacobian(y, x_flat)
  fldj = bijector.forward_log_det_jacobian(tf.reshape(x_flat, [n] + shape),
                                           event_ndims=len(shape))
  return jacobian, fldj


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
  assert np.abs(fldj.numpy()).max() > 1e-2, "perturbation left the log-det at zero"
  np.testing.assert_allclose(fldj, -ildj, atol=2e-4)


@pytest.mark.parametrize("name", NAMES)
def test_log_det_matches_autodiff_jacobian(name):
  bijector, shape = _perturbed(name, seed=1)
  x = tf.random.stateless_normal([4, int(np.prod(shape))], seed=[5, 6])
  jacobian, fldj = _flat_jacobian_and_log_det(bijector, shape, x)
  _, expected = np.linalg.slogdet(jacobian.numpy().astype(np.float64))
  assert np.abs(expected).max() > 1e-2
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


# ------------------------------------------------------------------------------ one pass


@pytest.fixture(name="calls")
def _calls(monkeypatch):
  """Counts, per object, the calls of everything in `_EVALUATED` (at trace time in graphs)."""
  counter = collections.Counter()
  for cls, method in _EVALUATED:
    def counted(self, *args, _original=getattr(cls, method), **kwargs):
      counter[id(self)] += 1
      return _original(self, *args, **kwargs)
    monkeypatch.setattr(cls, method, counted)
  return counter


def _count(calls, fn, *args, regime):
  """Evaluations of `_EVALUATED` pieces made by `fn(*args)`, eagerly or in one traced graph."""
  calls.clear()
  if regime == "eager":
    out = fn(*args)
  else:
    out = tf.function(fn)(*args)  # Each network call in the traced graph is counted once.
  del out
  return sum(calls.values())


@pytest.mark.parametrize("regime", ["eager", "tf_function"])
@pytest.mark.parametrize("name", NAMES)
def test_value_and_log_det_evaluate_each_network_once(name, regime, calls):
  """The objective's pattern `g.forward(eps)`, `g.forward_log_det_jacobian(eps)` and
  `log_prob`'s `g.inverse(z)`, `g.inverse_log_det_jacobian(z)` cost what the value alone
  costs: the log-det comes from the value's pass through the bijector cache."""
  bijector, shape = _perturbed(name, seed=3)
  rank = len(shape)
  eps = tf.random.stateless_normal([5] + shape, seed=[1, 3])
  z = bijector.forward(tf.identity(eps))

  def forward_only(eps):
    return bijector.forward(eps)

  def forward_and_log_det(eps):  # As `ComposedPosterior.negative_elbo_terms` calls them.
    z = bijector.forward(eps)
    return z, bijector.forward_log_det_jacobian(eps, event_ndims=rank)

  def inverse_only(z):
    return bijector.inverse(z)

  def inverse_and_log_det(z):  # As `TransformedDistribution.log_prob` calls them.
    return bijector.inverse(z), bijector.inverse_log_det_jacobian(z, event_ndims=rank)

  def log_det_of_another_tensor(eps):  # The cache is keyed by tensor identity.
    z = bijector.forward(eps)
    return z, bijector.forward_log_det_jacobian(tf.identity(eps), event_ndims=rank)

  value = _count(calls, forward_only, tf.identity(eps), regime=regime)
  assert value > 0, "no network or scale operator was counted"
  if regime == "eager" and name != "maf":  # MAF's forward evaluates its MADE D times.
    assert all(c == 1 for c in calls.values()), calls
  assert _count(calls, forward_and_log_det, tf.identity(eps), regime=regime) == value
  # The counter sees a second pass when the cache is defeated.
  assert _count(calls, log_det_of_another_tensor, tf.identity(eps), regime=regime) > value
  inverse = _count(calls, inverse_only, tf.identity(z), regime=regime)
  assert inverse > 0
  assert _count(calls, inverse_and_log_det, tf.identity(z), regime=regime) == inverse


@pytest.mark.parametrize("name", NAMES)
def test_cached_log_det_equals_recomputed(name):
  bijector, shape = _perturbed(name, seed=4)
  rank = len(shape)
  eps = tf.random.stateless_normal([5] + shape, seed=[2, 3])
  z = bijector.forward(eps)
  cached = bijector.forward_log_det_jacobian(eps, event_ndims=rank)
  fresh = bijector.forward_log_det_jacobian(tf.identity(eps), event_ndims=rank)
  assert np.abs(fresh.numpy()).max() > 1e-2
  np.testing.assert_allclose(cached, fresh, rtol=1e-5, atol=1e-5)
  cached_inverse = bijector.inverse_log_det_jacobian(z, event_ndims=rank)
  np.testing.assert_allclose(cached_inverse, -fresh, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_log_prob_of_a_sample_equals_log_prob_by_inversion(name):
  bijector, shape = _perturbed(name, seed=5)
  size = int(np.prod(shape))
  base = tfd.Independent(tfd.Normal(tf.zeros(shape), 1.), reinterpreted_batch_ndims=len(shape))
  q = tfd.TransformedDistribution(base, bijector)
  z, log_q = q.experimental_sample_and_log_prob(6, seed=[4, 5])
  assert z.shape == [6] + shape and log_q.shape == [6]
  by_inversion = q.log_prob(tf.identity(z))
  np.testing.assert_allclose(log_q, by_inversion, rtol=1e-4, atol=1e-4)
  assert np.abs(log_q.numpy() - base.log_prob(z).numpy()).max() > 1e-2


# ------------------------------------------------------------------------------ float64


@pytest.mark.parametrize("name", NAMES)
def test_float64_end_to_end(name):
  bijector, shape = _perturbed(name, seed=6, dtype=tf.float64)
  assert bijector.variables
  for v in bijector.variables:
    assert v.dtype == tf.float64, f"{v.name} is {v.dtype.name}"
  x = tf.random.stateless_normal([4, int(np.prod(shape))], seed=[8, 9], dtype=tf.float64)
  jacobian, fldj = _flat_jacobian_and_log_det(bijector, shape, x)
  assert jacobian.dtype == tf.float64 and fldj.dtype == tf.float64
  _, expected = np.linalg.slogdet(jacobian.numpy())
  assert np.abs(expected).max() > 1e-2
  # A float32 step anywhere would leave errors near 1e-7.
  np.testing.assert_allclose(fldj, expected, rtol=0, atol=1e-10)
  x = tf.reshape(x, [4] + shape)
  y = bijector.forward(x)
  x_back = bijector.inverse(tf.identity(y))
  assert y.dtype == x_back.dtype == tf.float64
  np.testing.assert_allclose(x_back, x, rtol=0, atol=1e-12)
  ildj = bijector.inverse_log_det_jacobian(tf.identity(y), event_ndims=len(shape))
  assert ildj.dtype == tf.float64
  np.testing.assert_allclose(ildj, -expected, rtol=0, atol=1e-10)


def test_float32_input_to_a_float64_pregenerator_is_an_error():
  g = pregenerators.real_nvp([2], num_layers=1, hidden_units=(4,), dtype=tf.float64)
  with pytest.raises((TypeError, ValueError), match="float"):
    g.forward(tf.zeros([1, 2], tf.float32))


# ------------------------------------------------------------------------------ affine stage


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


@pytest.mark.parametrize("full_rank", [True, False])
def test_scale_operator_is_the_scale_of_the_stage(full_rank):
  stage = pregenerators.AffineStage(3, full_rank=full_rank)
  root = np.array([[2., 0., 0.], [0.5, 1., 0.], [-1., 0.3, 3.]])
  cov = root @ root.T if full_rank else np.diag([4., 1., 9.])
  stage.set_gaussian([1., 2., 3.], cov)
  operator = stage.scale_operator()
  assert isinstance(operator, tf.linalg.LinearOperator)
  dense = operator.to_dense().numpy()
  np.testing.assert_allclose(dense @ dense.T, cov, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stage._linear().to_dense(), dense)  # pylint: disable=protected-access
  u = tf.constant([[0.5, -1., 2.]])
  np.testing.assert_allclose(stage.forward(u), u.numpy() @ dense.T + [1., 2., 3.], rtol=1e-5)


# ------------------------------------------------------------------------------ construction


def test_builders_are_deterministic_given_seed():
  a = pregenerators.real_nvp([6], num_layers=2, hidden_units=(8,), seed=3)
  b = pregenerators.real_nvp([6], num_layers=2, hidden_units=(8,), seed=3)
  c = pregenerators.real_nvp([6], num_layers=2, hidden_units=(8,), seed=4)
  assert len(a.trainable_variables) == len(b.trainable_variables) > 0
  for u, v in zip(a.trainable_variables, b.trainable_variables):
    np.testing.assert_array_equal(u.numpy(), v.numpy())
  assert any(not np.array_equal(u.numpy(), v.numpy())
             for u, v in zip(a.trainable_variables, c.trainable_variables))


@pytest.mark.parametrize("bad, match", [
    ([0], "event_shape"), ([], "event_shape"), ("abc", "event_shape"), ([None, 2], "event_shape")])
def test_bad_event_shape(bad, match):
  with pytest.raises((ValueError, TypeError), match=match):
    pregenerators.real_nvp(bad)


@pytest.mark.parametrize("builder, kwargs, match", [
    (pregenerators.real_nvp, dict(num_layers=3.5), r"`num_layers` must be an integer\. Got: 3\.5"),
    (pregenerators.real_nvp, dict(num_layers=-1), r"`num_layers` must be an integer >= 0.*-1"),
    (pregenerators.real_nvp, dict(hidden_units=(8, 0)), r"`hidden_units\[1\]`.*Got: 0"),
    (pregenerators.real_nvp, dict(dtype=tf.int32), r"`dtype` must be a floating dtype.*int32"),
    (pregenerators.iaf, dict(num_layers="2"), r"`num_layers` must be an integer\. Got: '2'"),
    (pregenerators.maf, dict(hidden_units=8), r"`hidden_units` must be a sequence.*Got: 8"),
    (pregenerators.affine, dict(dtype="int64"), r"`dtype` must be a floating dtype"),
])
def test_argument_checks_echo_the_bad_value(builder, kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    builder([4], **kwargs)


def test_conv_needs_image_shape():
  with pytest.raises(ValueError, match=r"\[H, W, C\]"):
    pregenerators.conv([16])
  with pytest.raises(ValueError, match=r"`filters` must be an integer >= 1\. Got: 0"):
    pregenerators.conv([4, 4, 1], filters=0)


def test_coupling_rejects_a_bad_permutation():
  with pytest.raises(ValueError, match=r"permutation of range\(3\)\. Got: \[0, 0, 1\]"):
    pregenerators.AffineCoupling(3, permutation=[0, 0, 1])


@pytest.mark.parametrize("full_rank", [True, False])
def test_stage_axes_turn_the_gaussian_and_keep_the_log_det(full_rank):
  """`z = shift + V L u`: `V L (V L)^T` is the covariance set (full rank; diagonal: the
  diagonal of `V^T C V` in the turned axes), the inverse undoes the forward pass, and the
  log-det is `log|det V L| = log|det L|` (V orthogonal)."""
  rng = np.random.RandomState(3)
  size = 4
  axes, _ = np.linalg.qr(rng.randn(size, size))
  root = np.tril(rng.randn(size, size)) + 3 * np.eye(size)
  cov = root @ root.T
  stage = pregenerators.AffineStage(size, full_rank=full_rank, axes=True)
  np.testing.assert_array_equal(stage.axes.numpy(), np.eye(size))  # The identity until set.
  assert not stage.axes.trainable
  assert all(v is not stage.axes for v in stage.trainable_variables)
  stage.set_gaussian(np.arange(size), cov, axes=axes)
  matrix = stage.matrix().numpy()
  expected = cov if full_rank else axes @ np.diag(np.diag(axes.T @ cov @ axes)) @ axes.T
  np.testing.assert_allclose(matrix @ matrix.T, expected, rtol=1e-4, atol=1e-4)
  u = tf.constant(rng.randn(5, size), tf.float32)
  z = stage.forward(u)
  np.testing.assert_allclose(z, u.numpy() @ matrix.T + np.arange(size), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(stage.inverse(tf.identity(z)), u, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(stage.forward_log_det_jacobian(u, event_ndims=1),
                             np.log(np.abs(np.linalg.det(matrix))), rtol=1e-4)


def test_stage_axes_are_checked_at_the_door():
  with pytest.raises(ValueError, match="built with `axes=True`"):
    pregenerators.AffineStage(2).set_gaussian(np.zeros(2), np.eye(2), axes=np.eye(2))
  stage = pregenerators.AffineStage(2, axes=True)
  with pytest.raises(ValueError, match=r"orthogonal \[2, 2\] matrix, got shape \[2, 2\]"):
    stage.set_gaussian(np.zeros(2), np.eye(2), axes=[[1., 1.], [0., 1.]])
  with pytest.raises(ValueError, match=r"got shape \[3, 3\]"):
    stage.set_gaussian(np.zeros(2), np.eye(2), axes=np.eye(3))
  np.testing.assert_array_equal(stage.axes.numpy(), np.eye(2))  # Nothing was changed.


def test_unknown_mixing_is_named():
  with pytest.raises(ValueError, match=r"`mixing` must be one of \('permutation', 'lu'\), got 'qr'"):
    pregenerators.real_nvp([4], mixing="qr")
