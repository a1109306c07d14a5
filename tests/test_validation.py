"""Every bad input is a clear error naming the argument, raised before any training starts."""

import glob
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_composed as tfc
from tfp_composed import training

tfb = tfp.bijectors
tfd = tfp.distributions



def _prior(dtype=tf.float32):
  return tfd.TransformedDistribution(
      tfd.Sample(tfd.Normal(tf.constant(0., dtype), 1.), [2]),
      tfb.Chain([tfb.Shift(tf.Variable([0.3, 0.], dtype=dtype)),
                 tfb.SinhArcsinh(skewness=tf.Variable([0.3, 0.], dtype=dtype))]))


def _likelihood(scale=0.3):
  return tfc.likelihoods.Gaussian(tfc.operators.Mask([True, False]), scale=scale)


def _posterior(**overrides):
  kwargs = dict(prior=_prior(), likelihood=_likelihood(), observation=[0.5],
                pregenerator=tfc.pregenerators.affine([2]), num_components=1)
  kwargs.update(overrides)
  return tfc.ComposedPosterior(**kwargs)


def _values(posterior):
  return [v.numpy().copy() for v in posterior.trainable_variables]


def _assert_equal_values(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------
# The prior.


@pytest.mark.parametrize("prior, got", [
    (tfd.Normal(0., 1.), "Normal"),
    (tfd.Independent(tfd.Normal(tf.zeros(2), 1.), 1), "Independent"),
    (tfd.MixtureSameFamily(tfd.Categorical(logits=[0., 0.]),
                           tfd.MultivariateNormalDiag([[-1., 0.], [1., 0.]], [1., 1.])),
     "MixtureSameFamily"),
    ("prior", "str"),
    (None, "NoneType"),
])
def test_prior_not_a_flow(prior, got):
  with pytest.raises(TypeError, match=rf"`prior` must be a flow: .*TransformedDistribution.*"
                                      rf"got {got}\."):
    _posterior(prior=prior)


def test_multivariate_normal_diag_is_an_affine_flow_and_accepted():
  # In TFP, MultivariateNormalDiag *is* TransformedDistribution(Sample(Normal), Shift o Scale):
  # a (linear) flow. It is accepted and its posterior is the right one.
  prior = tfd.MultivariateNormalDiag(tf.Variable([1., 2.]), tf.Variable([0.5, 2.]))
  assert isinstance(prior, tfd.TransformedDistribution)
  posterior = _posterior(prior=prior)
  z = tf.constant([[0.1, -0.3]])
  expected = (tfd.Normal(0., 1.).log_prob(z).numpy().sum()
              + tfd.Normal(1. + 0.5 * 0.1, 0.3).log_prob(0.5).numpy())
  np.testing.assert_allclose(posterior.latent_target_log_prob(z).numpy(), [expected],
                             rtol=1e-5)


def test_prior_with_batch_shape():
  prior = tfd.TransformedDistribution(tfd.Independent(tfd.Normal(tf.zeros([3, 2]), 1.), 1),
                                      tfb.Shift(1.))
  with pytest.raises(ValueError, match=r"`prior` must have batch shape \[\], got \(3,\)"):
    _posterior(prior=prior)


def test_prior_with_scalar_events():
  prior = tfd.TransformedDistribution(tfd.Normal(0., 1.), tfb.Exp())
  with pytest.raises(ValueError, match=r"`prior` must have a fully defined event shape of rank "
                                       r">= 1, got \(\)"):
    _posterior(prior=prior)


@pytest.mark.parametrize("base, shown", [
    (tfd.Sample(tfd.Poisson(1.), [2]), r"Poisson \(in Sample\(Poisson\)\)"),
    (tfd.Sample(tfd.Bernoulli(probs=0.5, dtype=tf.float32), [2]), r"Bernoulli"),
    (tfd.Empirical(tf.zeros([3, 2]), event_ndims=1), r"Empirical"),
], ids=["poisson", "bernoulli", "empirical"])
def test_discrete_base_is_rejected(base, shown):
  prior = tfd.TransformedDistribution(base, tfb.Shift(tf.Variable([0.3, 0.])))
  with pytest.raises(TypeError, match=rf"`prior`'s base distribution must be continuous, with "
                                      rf"support R\^d.*got the discrete {shown}"):
    _posterior(prior=prior)


@pytest.mark.parametrize("base, shown", [
    (tfd.Sample(tfd.Uniform(0., 1.), [2]), "Sample\\(Uniform\\)"),
    (tfd.Independent(tfd.Uniform(tf.zeros(2), 1.), 1), "Independent\\(Uniform\\)"),
    (tfd.Sample(tfd.Gamma(2., 1.), [2]), "Sample\\(Gamma\\)"),
    (tfd.MixtureSameFamily(tfd.Categorical(logits=[0., 0.]),
                           tfd.Independent(tfd.Uniform(tf.zeros([2, 2]), 1.), 1)),
     "Independent\\(Uniform\\) \\(in MixtureSameFamily"),
], ids=["uniform", "independent_uniform", "gamma", "mixture_of_uniforms"])
def test_base_with_bounded_support_is_rejected_at_construction(base, shown):
  prior = tfd.TransformedDistribution(base, tfb.Shift(tf.Variable([0.3, 0.])))
  with pytest.raises(ValueError, match=rf"`prior`'s base distribution must have support R\^d .*"
                                       rf"got {shown}.* with bounded support .*"
                                       rf"tfb.NormalCDF\(\)"):
    _posterior(prior=prior)


def test_the_suggested_unconstrained_base_is_the_same_prior():
  shift = tfb.Shift(tf.Variable([0.3, 0.]))
  uniform = tfd.TransformedDistribution(tfd.Sample(tfd.Uniform(0., 1.), [2]), shift)
  normal = tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0., 1.), [2]),
                                       tfb.Chain([shift, tfb.NormalCDF()]))
  x = tf.constant([[0.5, 0.2], [1.2, 0.9]])
  np.testing.assert_allclose(normal.log_prob(x).numpy(), uniform.log_prob(x).numpy(),
                             atol=1e-5)
  assert _posterior(prior=normal).prior is normal


@pytest.mark.parametrize("base", [
    tfd.Sample(tfd.StudentT(3., 0., 1.), [2]), tfd.Sample(tfd.Logistic(0., 1.), [2]),
    tfd.MixtureSameFamily(tfd.Categorical(logits=[0., 0.]),
                          tfd.MultivariateNormalDiag([[-1., 0.], [1., 0.]], [1., 1.])),
], ids=["student_t", "logistic", "gaussian_mixture"])
def test_continuous_bases_with_full_support_are_accepted(base):
  prior = tfd.TransformedDistribution(base, tfb.Shift(tf.Variable([0.3, 0.])))
  assert _posterior(prior=prior).prior is prior


# ---------------------------------------------------------------------------
# The likelihood and its noise parameters.


@pytest.mark.parametrize("likelihood, got", [
    (tfd.Normal(0., 0.3), "Normal"),
    (lambda x: tfd.Normal(x, 0.3), "function"),
    (tfc.operators.Mask([True, False]), "Mask"),
])
def test_likelihood_not_a_likelihood(likelihood, got):
  with pytest.raises(TypeError, match=rf"`likelihood` must be a "
                                      rf"tfp_composed.likelihoods.Likelihood.*got {got}\."):
    _posterior(likelihood=likelihood)


def _fails_on_purpose(x):
  raise RuntimeError("fn failed on purpose")


@pytest.mark.parametrize("fn, output_shape, match", [
    (_fails_on_purpose, None, r"`fn` must map a batch .* on zeros of shape \[1, 2\] \(float32\) it "
                              r"raised RuntimeError: fn failed on purpose"),
    (_fails_on_purpose, [1], r"raised RuntimeError: fn failed on purpose"),
    (lambda x: x[:, :1], [2], r"`fn` must return shape \[N\] \+ `output_shape` = \[N\] \+ \[2\]; "
                              r"on zeros of shape \[1, 2\] it returned shape \[1, 1\]"),
], ids=["raises", "raises_with_output_shape", "contradicts_output_shape"])
def test_lambda_operator_is_probed_when_the_posterior_is_built(fn, output_shape, match):
  # The operator learns its input shape from the prior: the probe runs then, at construction.
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Lambda(fn, output_shape=output_shape),
                                        scale=0.3)
  with pytest.raises(ValueError, match=match):
    _posterior(likelihood=likelihood, observation=[0.5] * (output_shape or [1])[0])


@pytest.mark.parametrize("noise_fn, error, match", [
    (lambda loc: loc, TypeError, r"`noise_fn` must return a `tfd.Distribution`, got "
                                 r"<tf.Tensor.* of type EagerTensor"),
    (lambda loc: tfd.Normal(loc[..., 0], 1.), ValueError,
     r"`noise_fn` must return a distribution with batch shape \[1, 1\] \(the shape of `loc`\) "
     r"and scalar events, got batch shape \[1\]"),
    (lambda loc: tfd.MultivariateNormalDiag(loc), ValueError,
     r"got batch shape \[1\] and event shape \[1\]"),
], ids=["tensor", "wrong_batch", "vector_events"])
def test_noise_fn_is_probed_before_training(noise_fn, error, match):
  with pytest.raises(error, match=match):  # Mask knows its shape: at the likelihood's construction.
    tfc.likelihoods.Likelihood(tfc.operators.Mask([True, False]), noise_fn)
  likelihood = tfc.likelihoods.Likelihood(tfc.operators.Lambda(lambda x: x[:, :1]), noise_fn)
  with pytest.raises(error, match=match):  # Shape from the prior: at the posterior's.
    _posterior(likelihood=likelihood)


def test_float64_prior_with_a_float64_only_lambda():
  matrix = tf.constant([[1.], [0.]], tf.float64)
  operator = tfc.operators.Lambda(lambda x: tf.linalg.matmul(x, matrix), dtype=tf.float64)
  posterior = _posterior(prior=_prior(tf.float64), observation=[0.5],
                         likelihood=tfc.likelihoods.Gaussian(operator, scale=0.3),
                         pregenerator=tfc.pregenerators.affine([2], dtype=tf.float64))
  assert posterior.loss(4, seed=[0, 1]).dtype == tf.float64


NOISE = {
    "gaussian": lambda op, **kw: tfc.likelihoods.Gaussian(op, **kw),
    "laplace": lambda op, **kw: tfc.likelihoods.Laplace(op, **kw),
    "student_t": lambda op, **kw: tfc.likelihoods.StudentT(op, df=3., **kw),
}


@pytest.mark.parametrize("scale, shown", [
    (0., r"got 0\.0"), (-1., r"got -1\.0"), (np.nan, r"got nan"), (np.inf, r"got inf"),
    ([0.1, -0.2], r"got 1 bad entries of 2, first -0\.2 at index \(1,\)"),
])
@pytest.mark.parametrize("noise", list(NOISE))
def test_non_positive_or_nan_scale(noise, scale, shown):
  with pytest.raises(ValueError, match=rf"`scale` must be positive and finite, {shown}"):
    NOISE[noise](tfc.operators.Mask([True, False]), scale=scale)


@pytest.mark.parametrize("df, shown", [(0., r"got 0\.0"), (-1., r"got -1\.0"),
                                       (np.nan, r"got nan")])
def test_student_t_degrees_of_freedom(df, shown):
  with pytest.raises(ValueError, match=rf"`df` must be positive and finite, {shown}"):
    tfc.likelihoods.StudentT(tfc.operators.Mask([True, False]), df=df, scale=1.)


def test_scale_not_a_number():
  with pytest.raises(TypeError, match=r"`scale` must be a real number or array, got dtype"):
    _likelihood(scale="0.1")


def test_scale_that_does_not_broadcast_to_the_observation():
  with pytest.raises(ValueError, match=r"`scale` of shape \[3\] must broadcast to the output "
                                       r"shape \[1\]"):
    _posterior(likelihood=_likelihood(scale=[0.1, 0.2, 0.3]))


# ---------------------------------------------------------------------------
# The observation.


@pytest.mark.parametrize("observation, got", [
    ([0.5, 0.2], r"\[2\]"), ([[0.5]], r"\[1, 1\]"), (0.5, r"\[\]"), (np.zeros([2, 2]), r"\[2, 2\]"),
])
def test_observation_wrong_shape(observation, got):
  with pytest.raises(ValueError, match=rf"`observation` must have shape \[1\], the output shape "
                                       rf"of Mask.*got {got}\."):
    _posterior(observation=observation)


@pytest.mark.parametrize("observation", [[np.nan], [np.inf], [-np.inf],
                                         tf.constant([np.nan])], ids=["nan", "inf", "-inf",
                                                                      "nan_tensor"])
def test_observation_not_finite(observation):
  with pytest.raises(ValueError, match=r"`observation` must be finite, got 1 NaN or Inf entries "
                                       r"of 1"):
    _posterior(observation=observation)


@pytest.mark.parametrize("observation, dtype", [
    (["0.5"], "<U3"), (tf.constant(["0.5"]), "string"), ([True], "bool"),
    (np.array([0.5j]), "complex128"), (None, "object"),
], ids=["str", "tf_string", "bool", "complex", "none"])
def test_observation_wrong_dtype(observation, dtype):
  with pytest.raises(TypeError, match=rf"`observation` must be a real floating-point array, got "
                                      rf"dtype {dtype}"):
    _posterior(observation=observation)


def test_float64_end_to_end_the_likelihood_follows_the_prior():
  # The likelihood is made without a dtype: it adopts the prior's float64, so the float64
  # observation stays float64 (not rounded through float32) and so do `loss` and `log_prob`.
  likelihood = _likelihood(scale=0.1)
  posterior = _posterior(prior=_prior(tf.float64), likelihood=likelihood,
                         observation=np.array([0.5]), num_components=2,
                         pregenerator=None)  # The default pre-generator, in float64.
  assert all(v.dtype == tf.float64 for v in posterior.trainable_variables)
  assert likelihood.dtype == likelihood.scale.dtype == tf.float64
  assert posterior.observation.dtype == tf.float64 and posterior.dtype == tf.float64
  assert posterior.loss(8, seed=[1, 2]).dtype == tf.float64
  x = tf.constant([[0.1, 0.2], [1., -1.]], tf.float64)
  assert posterior.log_prob(x).dtype == tf.float64
  # The target in float64 precision: 0.1 and 0.5 exactly, N(0.5; f(z)_0, 0.1^2) + N(z; 0, I).
  z = np.array([[0.1, -0.3]])
  f0 = np.sinh(np.arcsinh(0.1) + 0.3) + 0.3
  expected = (-0.5 * np.sum(z**2) - np.log(2. * np.pi)
              - 0.5 * ((0.5 - f0) / 0.1)**2 - np.log(0.1) - 0.5 * np.log(2. * np.pi))
  np.testing.assert_allclose(posterior.latent_target_log_prob(z).numpy(), [expected],
                             rtol=1e-13)


def test_likelihood_with_an_explicit_dtype_that_contradicts_the_prior():
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Mask([True, False]), scale=0.3,
                                        dtype=tf.float32)
  with pytest.raises(TypeError, match=r"The likelihood's `dtype` is float32 \(passed to its "
                                      r"constructor\) but the prior's dtype is float64; they "
                                      r"must match\. Construct Gaussian\(\.\.\., "
                                      r"dtype=tf\.float64\)"):
    _posterior(prior=_prior(tf.float64), likelihood=likelihood,
               pregenerator=tfc.pregenerators.affine([2], dtype=tf.float64))


def test_likelihood_reused_with_a_prior_of_another_dtype():
  likelihood = _likelihood()
  _posterior(likelihood=likelihood)  # Adopts float32.
  with pytest.raises(TypeError, match=r"`dtype` is float32 \(adopted from the prior it was "
                                      r"first built on\) but the prior's dtype is float64"):
    _posterior(prior=_prior(tf.float64), likelihood=likelihood,
               pregenerator=tfc.pregenerators.affine([2], dtype=tf.float64))


def test_ragged_observation():
  with pytest.raises(ValueError, match=r"`observation`"):
    _posterior(observation=[[0.5], [0.5, 0.2]])


@pytest.mark.parametrize("y, got", [([0.5, 0.2], r"\[2\]"), ([], r"\[0\]"),
                                    (np.zeros([3, 2]), r"\[3, 2\]")])
def test_likelihood_log_prob_of_a_wrong_observation_shape(y, got):
  # Without the check, `y` of shape [2] broadcasts against the event [1] and sums two terms.
  likelihood = _likelihood()
  with pytest.raises(ValueError, match=rf"`y` must have shape batch \+ \[1\], the output shape "
                                       rf"of Mask.*got {got}\."):
    likelihood.log_prob(y, np.zeros([3, 2], np.float32))


# ---------------------------------------------------------------------------
# Inputs of the posterior's methods.


@pytest.mark.parametrize("method", ["log_prob", "prob"])
@pytest.mark.parametrize("value, got", [
    (np.zeros([3, 3], np.float32), r"\[3, 3\]"), (np.zeros([3], np.float32), r"\[3\]"),
    (np.zeros([], np.float32), r"\[\]"), (np.zeros([2, 1, 2, 1], np.float32), r"\[2, 1, 2, 1\]"),
])
def test_log_prob_of_a_wrong_event_shape(posterior, method, value, got):
  with pytest.raises(ValueError, match=rf"`value` of `ComposedPosterior.{method}` must have shape "
                                       rf"batch_shape \+ \[2\] \(the posterior's event shape, "
                                       rf"the prior's\), got shape {got}\."):
    getattr(posterior, method)(value)


def test_log_prob_of_the_right_event_shape_with_any_batch(posterior):
  x = np.zeros([4, 3, 2], np.float32)
  assert posterior.log_prob(x).shape == [4, 3]
  assert tf.function(posterior.log_prob)(tf.zeros([5, 2])).shape == [5]
  assert posterior.prob(np.zeros([2], np.float32)).shape == []


# ---------------------------------------------------------------------------
# The pre-generator and the base mixture.


@pytest.mark.parametrize("pregenerator, got", [
    (lambda z: z, "function"), (tf.Module(), "Module"), ("real_nvp", "str"),
])
def test_pregenerator_not_a_bijector(pregenerator, got):
  with pytest.raises(TypeError, match=rf"`pregenerator` must be a tfb.Bijector on the prior's "
                                      rf"latent space.*got {got}\."):
    _posterior(pregenerator=pregenerator)


@pytest.mark.parametrize("make", [
    lambda: tfc.pregenerators.affine([3]),
    lambda: tfc.pregenerators.real_nvp([3], num_layers=1, hidden_units=(4,)),
    lambda: tfc.pregenerators.affine([2, 1]),
], ids=["affine_3", "real_nvp_3", "affine_2x1"])
def test_pregenerator_with_wrong_event_shape(make):
  with pytest.raises(ValueError, match=r"`pregenerator` must map .*the prior's latent event "
                                       r"shape \[2\]"):
    _posterior(pregenerator=make())


@pytest.mark.parametrize("pregenerator", [tfb.Identity(), tfb.Exp()], ids=["identity", "exp"])
def test_pregenerator_without_trainable_variables(pregenerator):
  with pytest.raises(ValueError, match=r"`pregenerator` has no trainable variables"):
    _posterior(pregenerator=pregenerator)


@pytest.mark.parametrize("num_components", [0, -1, 1.5, True, "2"])
def test_num_components(num_components):
  with pytest.raises(ValueError, match=rf"`num_components` must be a positive integer, got "
                                       rf"{re.escape(repr(num_components))}"):
    _posterior(num_components=num_components)


# ---------------------------------------------------------------------------
# fit's arguments: checked before anything changes.


@pytest.fixture(scope="module")
def posterior():
  return _posterior()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_steps=0), ValueError, r"`num_steps` must be a positive integer, got 0"),
    (dict(num_steps=-5), ValueError, r"`num_steps` must be a positive integer, got -5"),
    (dict(num_steps=2.5), ValueError, r"`num_steps` must be a positive integer, got 2.5"),
    (dict(batch_size=-1), ValueError, r"`batch_size` must be a positive integer, got -1"),
    (dict(batch_size=0), ValueError, r"`batch_size` must be a positive integer, got 0"),
    (dict(learning_rate=-1), ValueError,
     r"`learning_rate` must be a positive finite number, got -1"),
    (dict(learning_rate=0.), ValueError,
     r"`learning_rate` must be a positive finite number, got 0.0"),
    (dict(learning_rate=np.nan), ValueError,
     r"`learning_rate` must be a positive finite number, got nan"),
    (dict(learning_rate="1e-3"), ValueError,
     r"`learning_rate` must be a positive finite number, got '1e-3'"),
    (dict(init="bad"), ValueError, r"`init` must be 'auto', 'laplace', 'map' or None, got 'bad'"),
    (dict(init="Laplace"), ValueError,
     r"`init` must be 'auto', 'laplace', 'map' or None, got 'Laplace'"),
    (dict(init=True), ValueError, r"`init` must be 'auto', 'laplace', 'map' or None, got True"),
    (dict(seed=1.5), TypeError, r"`seed` must be an int, got 1.5"),
    (dict(steps_per_execution=0), ValueError,
     r"`steps_per_execution` must be a positive integer, got 0"),
    (dict(checkpoint_every=0), ValueError,
     r"`checkpoint_every` must be a positive integer, got 0"),
])
def test_fit_arguments(posterior, kwargs, error, match):
  before = _values(posterior)
  with pytest.raises(error, match=match):
    posterior.fit(**dict(dict(num_steps=2, verbose=0), **kwargs))
  _assert_equal_values(_values(posterior), before)
  assert not bool(posterior.initialized.numpy())  # Raised before the Laplace start.


def test_training_fit_arguments():
  v = tf.Variable(1.)
  with pytest.raises(TypeError, match=r"`loss` must be callable as loss\(seed, step, shard\)"):
    training.fit(tfd.Normal(0., 1.), [v], num_steps=2)
  with pytest.raises(ValueError, match=r"`variables` must hold at least one tf.Variable"):
    training.fit(lambda seed, step, shard: (v**2, {}), [], num_steps=2)


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(callbacks=3), TypeError, "callbacks"),
    (dict(strategy="mirrored"), TypeError, "strategy"),
    (dict(checkpoint_dir=3), TypeError, "checkpoint_dir"),
    (dict(max_bad_steps=0), ValueError, "max_bad_steps"),
    (dict(anneal_steps=-1), ValueError, "anneal_steps"),
    (dict(clip_norm=-1.), ValueError, "clip_norm"),
])
def test_more_fit_arguments(kwargs, error, name):
  with pytest.raises(error, match=rf"`{name}`"):
    _posterior().fit(**dict(dict(num_steps=2, verbose=0, init=None), **kwargs))


# ---------------------------------------------------------------------------
# Checkpoints: a corrupt or foreign checkpoint is a clear error and is never deleted.


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A checkpoint directory of a 4-step fit, and the fitted variable values."""
  directory = str(tmp_path_factory.mktemp("checkpoint") / "ckpt")
  fitted = _posterior()
  fitted.fit(num_steps=4, steps_per_execution=2, checkpoint_every=2, checkpoint_dir=directory,
             learning_rate=1e-2, init=None, verbose=0)
  # Control: an identical posterior restores it (no step left to run, so nothing is traced).
  restored = _posterior()
  restored.fit(num_steps=4, checkpoint_dir=directory, init=None, verbose=0)
  _assert_equal_values(_values(restored), _values(fitted))
  return directory, _values(fitted)


def _copy(checkpoint, tmp_path):
  directory = str(tmp_path / "ckpt")
  shutil.copytree(checkpoint[0], directory)
  return directory


def _snapshot(directory):
  return {name: open(os.path.join(directory, name), "rb").read()
          for name in sorted(os.listdir(directory))}


def _garble(path):
  size = os.path.getsize(path)
  with open(path, "wb") as f:
    f.write(np.random.RandomState(0).bytes(max(size, 16)))


@pytest.mark.parametrize("pattern", ["*.data-*", "*.index"])
def test_corrupt_checkpoint(checkpoint, tmp_path, pattern):
  directory = _copy(checkpoint, tmp_path)
  for path in glob.glob(os.path.join(directory, pattern)):
    _garble(path)
  files = _snapshot(directory)
  with pytest.raises(ValueError, match=r"`checkpoint_dir` .*ckpt.* holds a checkpoint .* that is "
                                       r"corrupt or belongs to a different posterior"):
    _posterior().fit(num_steps=8, checkpoint_dir=directory, init=None, verbose=0)
  assert _snapshot(directory) == files  # Nothing deleted, nothing rewritten.


@pytest.mark.parametrize("overrides", [
    lambda: dict(pregenerator=tfc.pregenerators.affine([2], full_rank=False)),
    lambda: dict(pregenerator=tfc.pregenerators.real_nvp([2], num_layers=1,
                                                         hidden_units=(4,))),
    lambda: dict(num_components=2),
], ids=["diagonal_affine", "real_nvp", "mixture_base"])
def test_checkpoint_of_a_different_posterior(checkpoint, tmp_path, overrides):
  directory = _copy(checkpoint, tmp_path)
  files = _snapshot(directory)
  with pytest.raises(ValueError, match=r"`checkpoint_dir` .* corrupt or belongs to a different "
                                       r"posterior; it was left untouched"):
    _posterior(**overrides()).fit(num_steps=8, checkpoint_dir=directory, init=None, verbose=0)
  assert _snapshot(directory) == files


def test_failed_restore_leaves_the_posterior_unchanged(checkpoint, tmp_path):
  directory = _copy(checkpoint, tmp_path)
  other = _posterior(num_components=2)  # Its affine stage matches the checkpoint's.
  before = _values(other)
  with pytest.raises(ValueError, match=r"`checkpoint_dir`"):
    other.fit(num_steps=8, checkpoint_dir=directory, init=None, verbose=0)
  _assert_equal_values(_values(other), before)


def test_unreadable_checkpoint_state_file(checkpoint, tmp_path):
  directory = _copy(checkpoint, tmp_path)
  with open(os.path.join(directory, "checkpoint"), "w") as f:
    f.write("not a checkpoint state\n")
  files = _snapshot(directory)
  try:
    with pytest.raises(ValueError, match=r"`checkpoint_dir`"):
      _posterior().fit(num_steps=8, checkpoint_dir=directory, init=None, verbose=0)
  finally:
    assert set(files) <= set(_snapshot(directory))  # At least nothing was deleted.
