"""The composed posterior against exact posteriors: closed forms and grid-normalized 2-D ones.

Every fit here uses `fit()`'s defaults plus a seed: what users get without tuning.
Monte Carlo KL estimates use 20,000 samples; their standard errors are below 0.005 nats
here, an order of magnitude under each bound.
"""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import problems
import tfp_composed as tfc

tfd = tfp.distributions


def _perturb(posterior, scale, seed):
  """Adds `scale * N(0, 1)` to the pre-generator's variables and to the base's parameter
  values (not to their stored, rescaled forms)."""
  rng = np.random.RandomState(seed)
  base = [posterior._mixture_logits, posterior._component_locs]  # pylint: disable=protected-access
  base = [v for v in base if v is not None]
  for v in posterior.pregenerator.trainable_variables:
    v.assign(v + scale * rng.randn(*v.shape).astype(np.float32))
  for v in base:
    v.assign(tf.convert_to_tensor(v) + scale * rng.randn(*v.shape).astype(np.float32))
  scales = posterior._component_scales  # pylint: disable=protected-access
  if scales is not None:
    value = tf.convert_to_tensor(scales)
    noise = scale * rng.randn(*value.shape).astype(np.float32)
    if value.shape.rank == 3:  # Scale trils: perturb the off-diagonal only.
      noise = np.tril(noise, -1)
      scales.assign(value + noise)
    else:
      scales.assign(value * np.exp(noise))


def _fit(posterior):
  posterior.history = posterior.fit(seed=0, verbose=0)
  return posterior


@pytest.fixture(scope="module")
def linear_gaussian():
  return problems.LinearGaussian(dim=16, num_obs=8, noise=0.1, seed=0)


def test_closed_form_linear_gaussian(linear_gaussian):
  lg = linear_gaussian
  prior_before = [v.numpy().copy() for v in lg.prior.trainable_variables]
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Linear(lg.A.astype(np.float32)), 0.1)
  posterior = _fit(tfc.ComposedPosterior(
      lg.prior, likelihood, lg.y.astype(np.float32),
      pregenerator=tfc.pregenerators.affine([16])))
  exact = lg.exact()
  kl, stderr, x = problems.mc_kl(posterior, lambda x: exact.log_prob(x).numpy())
  print(f"KL(q || exact) = {kl:.4f} +- {stderr:.4f} nats")
  # KL(q || p) below 0.05 nats at D = 16 (the MC standard error is ~0.002).
  assert kl < 0.05, (kl, stderr)
  x = x.astype(np.float64)
  # Mean within 0.05 posterior standard deviations per coordinate (MC error ~0.007).
  sd = np.sqrt(np.diag(lg.cov))
  np.testing.assert_array_less(np.abs(x.mean(0) - lg.mean) / sd, 0.05)
  # Covariance: the whitened sample covariance is the identity within 0.06 entrywise
  # (sampling error of one entry is ~0.01).
  root = np.linalg.cholesky(lg.cov)
  white = np.linalg.solve(root, np.linalg.solve(root, np.cov(x.T)).T)
  np.testing.assert_allclose(white, np.eye(16), atol=0.06)
  # The prior's variables are bit-identical after fitting.
  for before, after in zip(prior_before, lg.prior.trainable_variables):
    np.testing.assert_array_equal(before, after.numpy())


def test_an_exact_start_is_not_trained(linear_gaussian):
  """With `fit()`'s defaults the Laplace start of a linear-Gaussian problem is its posterior
  (up to the base's 4-component mixtures, 6e-5 nats at D = 16): no step runs."""
  lg = linear_gaussian
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Linear(lg.A.astype(np.float32)), 0.1)
  posterior = tfc.ComposedPosterior(lg.prior, likelihood, lg.y.astype(np.float32))
  history = posterior.fit(seed=0, verbose=0)
  assert history.exact_start and history.history.get("loss", []) == []
  assert posterior.diagnosis["diagnostics"].gap <= tfc.posterior.EXACT_START_GAP
  kl, stderr, _ = problems.mc_kl(posterior, lambda x: lg.exact().log_prob(x).numpy())
  print(f"KL(q || exact) = {kl:.5f} +- {stderr:.5f} nats")
  # Within the 0.01-nat limit of the rule by more than 4 standard errors (se ~5e-4).
  assert kl + 4 * stderr < tfc.posterior.EXACT_START_GAP, (kl, stderr)
  # Asked for steps, it trains them.
  history = tfc.ComposedPosterior(lg.prior, likelihood, lg.y.astype(np.float32)).fit(
      num_steps=40, seed=0, verbose=0)
  assert not history.exact_start and len(history.history["loss"]) == 40


def test_a_time_limit_without_num_steps_may_train_longer_than_the_default(linear_gaussian,
                                                                           monkeypatch):
  """With `time_limit` and the default `num_steps`, the loop may plan up to 4 x 2000 steps
  (as many as fit in the time); without a limit, or with `num_steps` given, the count is
  what it was. `training.fit` is replaced by a recorder: nothing is trained."""
  lg = linear_gaussian
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Linear(lg.A.astype(np.float32)), 0.1)
  posterior = tfc.ComposedPosterior(lg.prior, likelihood, lg.y.astype(np.float32))
  asked = []

  class Recorded(Exception):
    pass

  def recorder(objective, *args, num_steps, time_limit, **kwargs):
    del args, kwargs
    asked.append((num_steps, time_limit))
    assert not objective.path_gradient  # A large-latent default only (16 dimensions here).
    raise Recorded

  monkeypatch.setattr(tfc.training, "fit", recorder)
  for options in ({"time_limit": 30.}, {}, {"time_limit": 30., "num_steps": 100}):
    with pytest.raises(Recorded):
      posterior.fit(init=None, verbose=0, check_weights=False, **options)
  assert [steps for steps, _ in asked] == [8000, 2000, 100]
  assert asked[0][1] == 30. and asked[1][1] is None


def test_hard_conditioning_approaches_gaussian_conditional():
  """`p(x2 | x1)` by a masked Gaussian likelihood whose scale shrinks."""
  lg = problems.LinearGaussian(dim=4, num_obs=2, noise=1., seed=3,
                               matrix=np.eye(4)[:2])
  x1 = lg.x_true[:2]
  cov = lg.L @ lg.L.T
  gain = cov[2:, :2] @ np.linalg.inv(cov[:2, :2])
  cond_mean = lg.mu[2:] + gain @ (x1 - lg.mu[:2])
  cond_cov = cov[2:, 2:] - gain @ cov[:2, 2:]
  mask = tfc.operators.Mask([True, True, False, False])
  kls = []
  for scale in (0.3, 0.003):
    posterior = _fit(tfc.ComposedPosterior(
        lg.prior, tfc.likelihoods.Gaussian(mask, scale), x1.astype(np.float32)))
    x2 = posterior.sample(20000, seed=1).numpy()[:, 2:].astype(np.float64)
    fitted = tfd.MultivariateNormalFullCovariance(x2.mean(0), np.cov(x2.T))
    kls.append(float(tfd.kl_divergence(
        fitted, tfd.MultivariateNormalFullCovariance(cond_mean, cond_cov))))
  print("KL to the hard conditional by scale:", kls)
  # At scale 0.003 the fitted conditional is within Monte Carlo error (~1e-4 nats for
  # moments of 20,000 draws) of the exact one; at 0.3 it is measurably off.
  assert kls[1] < 0.005, kls
  assert kls[0] > 5 * kls[1], kls


@pytest.fixture(scope="module")
def banana():
  return problems.banana_prior()


def _grid_case(banana, likelihood, observation, kl_bound):
  grid = problems.GridPosterior(banana, likelihood, observation)
  posterior = _fit(tfc.ComposedPosterior(banana, likelihood, observation))
  kl, stderr, x = problems.mc_kl(posterior, grid.log_prob)
  print(f"KL(q || exact) = {kl:.4f} +- {stderr:.4f} nats (bound {kl_bound})")
  assert kl < kl_bound, (kl, stderr)
  return grid, posterior, x


def test_partition_on_nonlinear_prior(banana):
  """`p(x2 | x1)` under a curved, skewed 2-D flow prior, exact by grid normalization."""
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Mask([True, False]), scale=0.05)
  _grid_case(banana, likelihood, [0.8], kl_bound=0.02)


def test_nonlinear_operator(banana):
  """A nonlinear forward operator `y = x1 x2 + x2` with Student-t noise.

  The posterior is a curved, heavy-tailed ridge; measured KL with the defaults is ~0.06
  nats (2,000 steps), so the bound is 0.1.
  """
  op = tfc.operators.Lambda(lambda x: x[..., :1] * x[..., 1:] + x[..., 1:], input_shape=[2])
  likelihood = tfc.likelihoods.StudentT(op, df=5., scale=0.2)
  _, posterior, _ = _grid_case(banana, likelihood, [1.0], kl_bound=0.1)
  # Its Laplace start is not exact: the fit trained all its default steps.
  assert not posterior.history.exact_start
  assert len(posterior.history.history["loss"]) == 2000


def test_both_modes_of_a_bimodal_posterior_survive(banana):
  """`y = x1^2`: two separated modes at `x1 = +-sqrt(y)` with unequal masses."""
  op = tfc.operators.Lambda(lambda x: x[..., :1]**2, input_shape=[2])
  likelihood = tfc.likelihoods.Gaussian(op, scale=0.1)
  grid, _, x = _grid_case(banana, likelihood, [1.5], kl_bound=0.05)
  exact_right = grid.mass(lambda g: g[:, 0] > 0)
  assert 0.6 < exact_right < 0.95  # Two modes of clearly unequal mass.
  fitted_right = float((x[:, 0] > 0).mean())
  assert abs(fitted_right - exact_right) < 0.1, (fitted_right, exact_right)
  assert abs((1 - fitted_right) - (1 - exact_right)) < 0.1


def test_latent_loss_equals_ambient_kl_terms(banana):
  """Jacobian cancellation: the latent terms equal `log q(x) - log p(x) - log p(y | x)`
  computed in ambient space with `f`'s inverse and log-dets, sample by sample."""
  op = tfc.operators.Lambda(lambda x: tf.tanh(x), input_shape=[2])
  likelihood = tfc.likelihoods.Gaussian(op, scale=0.3)
  posterior = tfc.ComposedPosterior(banana, likelihood, [0.2, -0.4], num_components=3,
                                    base="mixture")
  _perturb(posterior, 0.05, seed=0)  # A random, non-trivial q.
  seed = tf.constant([4, 2])
  terms = posterior.negative_elbo_terms(50, seed)  # [50, 3]
  eps = posterior.distribution.components_distribution.sample(50, seed=seed)  # The same draws: stateless seed.
  x = posterior.bijector.forward(eps)
  ambient = (posterior.log_prob(tf.identity(x)) - banana.log_prob(x)
             - likelihood.log_prob(posterior.observation, x))
  np.testing.assert_allclose(terms, ambient, rtol=1e-4, atol=1e-4)
  # And the loss is their mixture-weighted mean.
  weights = np.exp(posterior.mixture_log_weights().numpy())
  np.testing.assert_allclose(posterior.loss(150, seed=seed),
                             (weights * ambient.numpy().mean(0)).sum(), rtol=1e-5)


@pytest.mark.parametrize("base", ["factorized", "mixture", "normal"])
def test_log_prob_by_inversion_equals_forward_value(banana, base):
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Mask([False, True]), scale=0.2)
  posterior = tfc.ComposedPosterior(banana, likelihood, [0.5], base=base)
  _perturb(posterior, 0.2, seed=1)
  x, log_q = posterior.experimental_sample_and_log_prob(200, seed=3)
  # float32: the mixture bases' log densities carry ~1e-3 of rounding through the inversion.
  np.testing.assert_allclose(posterior.log_prob(tf.identity(x)), log_q, rtol=1e-4,
                             atol=1e-4 if base == "normal" else 3e-3)


@pytest.mark.parametrize("base", ["factorized", "mixture"])
def test_every_trainable_variable_receives_a_gradient_and_prior_is_excluded(banana, base):
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Mask([True, False]), scale=0.2)
  posterior = tfc.ComposedPosterior(banana, likelihood, [0.5], num_components=2, base=base)
  _perturb(posterior, 0.2, seed=2)
  prior_ids = {id(v) for v in banana.trainable_variables}
  assert prior_ids and not prior_ids & {id(v) for v in posterior.trainable_variables}
  with tf.GradientTape() as tape:
    # The factorized base's weights learn from the mass-covering term only.
    loss = posterior.loss(64, seed=[1, 2], forward_weight=1.)
  grads = tape.gradient(loss, posterior.trainable_variables)
  for v, g in zip(posterior.trainable_variables, grads):
    assert g is not None and np.abs(g.numpy()).max() > 0, v.name


def test_posterior_starts_at_the_prior(banana):
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Mask([True, False]), scale=0.2)
  x = banana.sample(1000, seed=4)
  posterior = tfc.ComposedPosterior(banana, likelihood, [0.5], base="normal")
  np.testing.assert_allclose(posterior.log_prob(x), banana.log_prob(x), rtol=1e-5, atol=1e-5)
  # The factorized base starts as a per-dimension mixture of variance 1, within 4e-4 nats
  # of N(0, 1) per dimension (a quadrature of its KL): KL(prior || q) over prior draws.
  posterior = tfc.ComposedPosterior(banana, likelihood, [0.5])
  kl = np.mean(banana.log_prob(x) - posterior.log_prob(x))
  assert 0. < kl < 0.005, kl


def test_condition_returns_a_fitted_posterior(banana):
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Mask([True, False]), scale=0.1)
  posterior = tfc.condition(banana, likelihood, [0.4], num_steps=50, seed=1, verbose=0)
  assert isinstance(posterior, tfd.TransformedDistribution)
  assert bool(posterior.initialized.numpy())
  assert posterior.sample(3, seed=1).shape == (3, 2)


class _OverflowsBeyond(tfp.bijectors.Bijector):
  """The identity on |z| < edge and NaN beyond it, as a trained flow overflows off its data."""

  def __init__(self, edge):
    self._edge = edge
    super().__init__(forward_min_event_ndims=0, is_constant_jacobian=True, name="overflows")

  def _forward(self, z):
    return z + 0. * tf.math.log(self._edge - tf.abs(z))

  def _inverse(self, x):
    return x

  def _forward_log_det_jacobian(self, z):
    return tf.zeros_like(z)


def test_latents_where_the_prior_overflows_do_not_stop_training():
  # Posterior of z1 ~ N(2.29, 0.29^2) truncated at |z1| < 3 (the prior's numerical domain):
  # about 1 draw in 140 lands past the edge, i.e. in a third of the batches of 64.
  edge = 3.
  prior = tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0., 1.), [2]),
                                      _OverflowsBeyond(edge))
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Mask([True, False]), scale=0.3)
  posterior = tfc.ComposedPosterior(prior, likelihood, observation=np.float32([2.5]),
                                    base="normal")
  z = tf.constant([[2.5, 0.], [3.5, 0.], [-4., 1.]])
  target = posterior.latent_target_log_prob(z).numpy()
  # Past the edge the target is -inf, row by row: the value at a latent never depends on
  # the other latents of the batch.
  assert np.isfinite(target[0]) and np.all(target[1:] == -np.inf)
  np.testing.assert_allclose(posterior.latent_target_log_prob(z[:1]).numpy(), target[:1])
  with tf.GradientTape() as tape:
    tape.watch(z)
    value = tf.reduce_sum(posterior.latent_target_log_prob(z)[:1])
  gradient = tape.gradient(value, z).numpy()
  assert np.all(np.isfinite(gradient)) and np.all(gradient[1:] == 0.)
  # The variational terms impute the overflowing draws' likelihood with the batch's worst
  # finite one, so they stay finite and their gradients too.
  with tf.GradientTape() as tape:
    loss = posterior.loss(256, seed=[3, 4])
  grads = tape.gradient(loss, posterior.trainable_variables)
  assert np.isfinite(loss.numpy()) and all(np.all(np.isfinite(g.numpy())) for g in grads)

  history = posterior.fit(num_steps=600, learning_rate=3e-3, seed=0, verbose=0)
  assert np.all(np.isfinite(history.history["loss"])), "some steps were skipped"
  x = posterior.sample(4000, seed=[0, 1]).numpy()
  finite = np.all(np.isfinite(x), axis=-1)
  assert finite.mean() > 0.98  # q's tail past the edge (exact: 0.7 %) maps to NaN, as f does.
  x = x[finite]
  # Exact truncated-normal mean of x1 = z1 (posterior N(m, s^2) on (-3, 3)).
  m, s = 2.5 / 1.09, np.sqrt(0.09 / 1.09)
  exact = tfd.TruncatedNormal(m, s, -edge, edge).mean().numpy()
  assert abs(np.mean(x[:, 0]) - exact) < 0.05, (np.mean(x[:, 0]), exact)
  assert abs(np.std(x[:, 1]) - 1.) < 0.1


def test_path_gradient_vanishes_at_the_exact_posterior(linear_gaussian):
  # At q = p(z | y) every draw has log q(z) - log p(z | y) = const, so the path ("sticking
  # the landing") gradient of each draw is 0 up to float32 round-off, while the plain
  # reparameterization gradient keeps the zero-mean score term's noise. The value is the
  # same negative ELBO either way.
  lg = linear_gaussian
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Linear(lg.A.astype(np.float32)), 0.1)
  posterior = tfc.ComposedPosterior(lg.prior, likelihood, lg.y.astype(np.float32),
                                    pregenerator=tfc.pregenerators.affine([16]), base="normal")
  posterior.initialize(seed=0)  # The Laplace start: exact for a linear-Gaussian problem.
  norms, values = {}, {}
  for path in (False, True):
    with tf.GradientTape() as tape:
      values[path] = posterior.loss(64, seed=[1, 2], path_gradient=path)
    grads = tape.gradient(values[path], posterior.trainable_variables)
    norms[path] = np.sqrt(sum(np.sum(g.numpy()**2) for g in grads if g is not None))
  np.testing.assert_allclose(values[True].numpy(), values[False].numpy(), rtol=1e-6)
  assert norms[False] > 1.
  assert norms[True] < 1e-3 * norms[False], norms


def test_path_gradient_is_the_gradient_without_the_score_term(linear_gaussian):
  # The path gradient is the full reparameterization gradient minus the score term
  # `sum_i m_i grad log q(z_i)` at fixed draws `z_i` and fixed masses `m_i` (mixture weight
  # / n). `loss` gets it without differentiating `g^-1` in its parameters; here the
  # reference differentiates it. An identity for each draw, so equal to float32 round-off,
  # on a mixture base whose weights, locations and `g` are all moved off their start.
  lg = linear_gaussian
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Linear(lg.A.astype(np.float32)), 0.1)
  posterior = tfc.ComposedPosterior(lg.prior, likelihood, lg.y.astype(np.float32),
                                    num_components=3, base="mixture")
  posterior.initialize(seed=0)  # Near the posterior, so that no term dwarfs the others.
  rng = np.random.RandomState(0)
  variables = posterior.trainable_variables
  for v in variables:
    spread = 0.5 if ("locs" in v.name or "logits" in v.name) else 0.01
    v.assign_add(spread * rng.randn(*v.shape).astype(np.float32))
  batch, seed = 48, [5, 6]
  with tf.GradientTape() as tape:
    path = posterior.loss(batch, seed=seed, path_gradient=True)
  path_grads = tape.gradient(path, variables)
  with tf.GradientTape(persistent=True) as tape:
    full = posterior.loss(batch, seed=seed)
    terms, z = posterior._terms_and_latents(posterior.samples_per_component(batch), seed)
    mass = tf.exp(posterior.mixture_log_weights()) * tf.ones_like(terms) / terms.shape[0]
    score = tf.reduce_sum(tf.stop_gradient(tf.reshape(mass, [-1]))
                          * posterior.latent_posterior.log_prob(tf.stop_gradient(z)))
  reference = [a - b for a, b in zip(tape.gradient(full, variables),
                                     tape.gradient(score, variables))]
  np.testing.assert_allclose(path.numpy(), full.numpy(), rtol=1e-6)
  for v, a, r in zip(variables, path_grads, reference):  # Each to 1e-4 of its own scale.
    scale = float(np.max(np.abs(r.numpy())))
    np.testing.assert_allclose(a.numpy(), r.numpy(), rtol=0, atol=1e-4 * scale, err_msg=v.name)
  # The weights' gradient keeps the masses' own part `grad m_i (log q - log p)(z_i)`, which
  # is not zero in expectation (the score term's part, `grad m_i log q(z_i)`, is).
  logits = [a for v, a in zip(variables, path_grads) if "mixture_logits" in v.name]
  assert len(logits) == 1 and float(np.max(np.abs(logits[0].numpy()))) > 1e-2


def test_path_gradient_must_be_a_bool(linear_gaussian):
  lg = linear_gaussian
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Linear(lg.A.astype(np.float32)), 0.1)
  posterior = tfc.ComposedPosterior(lg.prior, likelihood, lg.y.astype(np.float32))
  with pytest.raises(ValueError, match=r"`path_gradient` must be True or False, got 'yes'"):
    posterior.fit(num_steps=5, path_gradient="yes", verbose=0)
  assert not bool(posterior.initialized.numpy())  # Rejected before the start ran.
