"""Every method in `tfc.baselines.METHODS` through `run`, on 2-D problems with exact posteriors.

Accuracy (deterministic: `num_steps`, no budget). The returned draws `x_1..x_n` are compared
with the exact posterior `N(mu, Sigma)` after whitening, `u = Sigma^{-1/2} (x - mu)`:

* mean: `m |u_bar|^2 ~ chi^2_2` for `m` independent draws; the check is
  `m |u_bar|^2 < 18.4` (the chi^2_2 quantile 0.9999);
* covariance: each entry of `cov(u) - I` has standard error `sqrt(2 / m)` (diagonal) or
  `sqrt(1 / m)` (off-diagonal); the check is 5 standard errors (`5 sqrt(2 / m)` for all).

`m = n / 2` allows MCMC draws an efficiency of one half (the recorded draws are thinned so
that their measured ESS is close to their number). ULA is biased by its step: its rule keeps
the variance inflation under about 10% (see `tfc.baselines.mcmc`), which is added to its
covariance tolerance. A check of the prior's own draws proves each check can fail.

Budget: with `budget_seconds=B` and a `num_steps` far beyond what fits in `B`, `seconds` must be
within `[0.9 B - c, 1.1 B + c]`, `c = 1.5 s`: the constant covers what no chunking can cut --
the last chunk (at most 4% of a phase), mapping the draws through `f`, ESS/R-hat and a loaded
machine's scheduling jitter. A method that ignores the budget runs `num_steps` (minutes) and
fails. `map` stops when its restarts converge, so only the upper bound applies to it.
"""

import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_composed as tfc
import problems

N = 2000
# Methods whose `Result.log_prob` is `log q(x)`; the others return None.
DENSITY_METHODS = {"composed", "ambient_vi"}
MCMC_METHODS = {"ula", "mala", "hmc", "nuts", "pl_mcmc", "neutra_hmc"}

# num_steps and options per method for the accuracy runs (2-D, a few seconds each).
# `composed_sir` and `neutra_hmc` reuse the posterior fitted by the `composed` run
# (`posterior=`); their own fits run in the budget test.
ACCURACY_RUNS = {
    "composed": dict(num_steps=300),
    "composed_sir": dict(),
    "ambient_vi": dict(num_steps=500),
    "ula": dict(num_steps=3000),
    "mala": dict(num_steps=1000),
    "hmc": dict(num_steps=600),
    "nuts": dict(num_steps=300),
    "pl_mcmc": dict(num_steps=2000),
    "map": dict(),
    "neutra_hmc": dict(num_steps=300),
}
USES_COMPOSED_FIT = {"composed_sir", "neutra_hmc"}


@pytest.fixture(scope="module")
def gaussian():
  """`x = L z + mu`, `y = x_1 + N(0, 0.3^2)`: a mask operator, so every method applies."""
  lg = problems.LinearGaussian(dim=2, num_obs=1, noise=0.3, seed=1, matrix=[[1., 0.]])
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Mask([True, False]), scale=0.3)
  tfc.targets.LatentTarget(lg.prior, likelihood, lg.y.astype(np.float32)).log_prob(
      tf.zeros([1, 2]))  # TensorFlow's one-time start-up, outside any timed run.
  return lg, likelihood, lg.y.astype(np.float32)


@pytest.fixture(scope="module")
def composed_fit(gaussian):
  lg, likelihood, y = gaussian
  return tfc.baselines.run("composed", lg.prior, likelihood, y, seed=0, num_samples=N,
                           **ACCURACY_RUNS["composed"])


def moment_errors(x, mean, cov, m):
  """`(chi2 statistic of the mean, max |cov(u) - I|, their bounds)` for whitened draws."""
  x = np.asarray(x, np.float64)
  w = np.linalg.inv(np.linalg.cholesky(cov))
  u = (x - mean) @ w.T
  chi2 = m * float(np.sum(u.mean(0)**2))
  cov_err = float(np.max(np.abs(np.cov(u.T) - np.eye(2))))
  return chi2, cov_err, 18.4, 5 * np.sqrt(2 / m)


def test_the_accuracy_check_rejects_the_prior(gaussian):
  lg, _, _ = gaussian
  x = lg.prior.sample(N, seed=[3, 4]).numpy()
  chi2, cov_err, chi2_bound, cov_bound = moment_errors(x, lg.mean, lg.cov, N / 2)
  assert chi2 > chi2_bound or cov_err > cov_bound, (chi2, cov_err)


def test_registry_holds_every_method():
  assert set(tfc.baselines.METHODS) == set(ACCURACY_RUNS)


@pytest.mark.parametrize("method", sorted(ACCURACY_RUNS))
def test_method_matches_the_exact_gaussian_posterior(method, gaussian, composed_fit):
  lg, likelihood, y = gaussian
  options = dict(ACCURACY_RUNS[method])
  if method in USES_COMPOSED_FIT:
    options["posterior"] = composed_fit.info["posterior"]
  if method == "composed":
    result = composed_fit
  else:
    result = tfc.baselines.run(method, lg.prior, likelihood, y, seed=0,
                               num_samples=None if method == "map" else N, **options)
  assert isinstance(result, tfc.baselines.Result)
  assert result.method == method
  assert result.seconds > 0
  assert result.info["budget_seconds"] is None
  assert isinstance(result.info["num_parameters"], int)
  if method == "map":
    # The latent mode maps to the posterior mean for a linear flow and Gaussian noise.
    assert result.x.shape == (16, 2)
    assert result.log_prob is None
    assert result.info["converged"].all()
    scale = np.sqrt(np.diag(lg.cov))
    np.testing.assert_array_less(np.abs(result.x - lg.mean) / scale, 1e-2)
    assert np.all(np.diff(result.info["log_target"]) <= 1e-4)  # Best first.
    return
  assert result.x.shape == (N, 2)
  assert np.all(np.isfinite(result.x))
  if method in DENSITY_METHODS:
    assert result.log_prob.shape == (N,)
    # log q against the exact density: KL(q || p) >= 0, small for these fits.
    diff = result.log_prob - lg.exact().log_prob(result.x.astype(np.float64)).numpy()
    kl, stderr = diff.mean(), diff.std() / np.sqrt(N)
    print(f"{method}: KL(q || p) = {kl:.4f} +- {stderr:.4f}")
    assert kl < 0.02 + 5 * stderr, (kl, stderr)
    assert kl > -5 * stderr - 1e-3, (kl, stderr)
  else:
    assert result.log_prob is None
  if method in {"composed", "composed_sir", "neutra_hmc"}:
    assert isinstance(result.info["posterior"], tfc.ComposedPosterior)
    assert result.info["num_parameters"] > 0
  if method in MCMC_METHODS:
    info = result.info
    assert info["num_warmup_steps"] + info["num_sampling_steps"] <= ACCURACY_RUNS[method][
        "num_steps"]
    # ULA mixes slowly by its rule (about 2 v / h steps along a direction of variance v).
    assert info["rhat_max"] < (1.1 if method == "ula" else 1.05), info["rhat_max"]
    assert info["ess_min"] > N / 2, info["ess_min"]
    if method != "ula":
      assert 0.1 < info["acceptance"] < 0.99, info["acceptance"]
    assert info["step_size"] is not None
  if method == "composed_sir":
    assert 0 < result.info["ess"] <= result.info["num_proposals"]
  chi2, cov_err, chi2_bound, cov_bound = moment_errors(result.x, lg.mean, lg.cov, N / 2)
  if method == "ula":
    cov_bound += 0.1  # Its step's variance inflation (tfc.baselines.mcmc).
  print(f"{method}: mean chi2 {chi2:.2f} (< {chi2_bound}), cov error {cov_err:.3f} "
        f"(< {cov_bound:.3f}), {result.seconds:.1f} s")
  assert chi2 < chi2_bound, chi2
  assert cov_err < cov_bound, cov_err


def _cheap(method):
  """Options that keep tracing short; the budget machinery is the same as with the defaults.

  `init=None`: the composed fit's Laplace start is one uninterruptible call (seconds on a
  loaded machine), so budgets shorter than it are overrun by it.
  """
  fit = {"init": None, "pregenerator": tfc.pregenerators.affine([2]), "num_components": 1}
  if method in ("composed", "composed_sir"):
    return fit
  if method == "neutra_hmc":
    return {"fit_options": dict(fit, num_steps=200_000)}
  if method == "ambient_vi":
    return {"flow": tfc.pregenerators.affine([2])}
  return {}


# Seconds per method: above what each method spends tracing on a loaded machine (a budget
# shorter than that is overrun by it). At a load of 8 on 2 cores NUTS traces for about 6 s,
# ULA traces two kernels (MALA for the warm-up, ULA) and NeuTra HMC a fit and HMC through
# the pre-generator.
BUDGETS = {"nuts": 10., "ula": 10., "neutra_hmc": 10.}
BUDGET = 6.
SLACK = 1.5


@pytest.mark.parametrize("method", sorted(ACCURACY_RUNS))
def test_budget_is_honoured(method, gaussian):
  lg, likelihood, y = gaussian
  budget = BUDGETS.get(method, BUDGET)
  t0 = time.perf_counter()
  result = tfc.baselines.run(method, lg.prior, likelihood, y, budget_seconds=budget,
                             num_steps=200_000, seed=0, **_cheap(method))
  wall = time.perf_counter() - t0
  print(f"{method}: {result.seconds:.2f} s of a {budget} s budget")
  assert abs(wall - result.seconds) < 0.25  # `seconds` is the whole call.
  assert result.seconds <= 1.1 * budget + SLACK, result.seconds
  if method != "map":
    assert result.seconds >= 0.9 * budget - SLACK, result.seconds
  assert result.x.shape[1:] == (2,) and result.x.shape[0] >= 1
  assert result.info["budget_seconds"] == budget


def test_same_seed_same_draws_other_seed_other_draws(gaussian):
  lg, likelihood, y = gaussian
  run = lambda seed: tfc.baselines.run("mala", lg.prior, likelihood, y, num_steps=40,
                                       num_samples=64, seed=seed).x
  a, b, c = run(5), run(5), run(6)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_pl_mcmc_on_a_curved_prior_matches_the_grid_posterior():
  """A skewed, bent 2-D flow (non-constant Jacobian): the projected target's change of
  variables must be right for the hidden coordinate's law to come out exact."""
  prior = problems.banana_prior()
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Mask([True, False]), scale=0.05)
  grid = problems.GridPosterior(prior, likelihood, [0.8])
  w = grid.density * grid.cell
  mean = w @ grid.grid
  cov = ((grid.grid - mean).T * w) @ (grid.grid - mean)
  result = tfc.baselines.run("pl_mcmc", prior, likelihood, np.array([0.8], np.float32),
                             num_steps=2000, num_samples=N, seed=0)
  chi2, cov_err, chi2_bound, cov_bound = moment_errors(result.x, mean, cov, N / 2)
  print(f"pl_mcmc banana: chi2 {chi2:.2f}, cov error {cov_err:.3f}, R-hat "
        f"{result.info['rhat_max']:.3f}")
  assert chi2 < chi2_bound, chi2
  assert cov_err < cov_bound, cov_err


def test_pl_mcmc_starts_inside_the_priors_support():
  # An image prior's density is zero below -0.0556 (its logit preprocessing): an observation
  # of -0.1 there, as noise makes of black pixels, must not leave every chain at
  # log pi = -inf, where no proposal is ever accepted and the draws are the start.
  prior = tfc.priors.glow([4, 4, 1], num_levels=1, num_steps=1, hidden_channels=4)
  mask = np.zeros([4, 4, 1], bool)
  mask[:2] = True
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Mask(mask), scale=0.05)
  y = np.full([8], -0.1, np.float32)
  problem = tfc.baselines._core.Problem(  # pylint: disable=protected-access
      prior, likelihood, tf.constant(y), tfc.targets.LatentTarget(prior, likelihood, y))
  from tfp_composed.baselines import pl_mcmc  # pylint: disable=g-import-not-at-top
  target = pl_mcmc.ProjectedTarget(problem, np.full([8], 0.3))
  z0 = prior.distribution.sample(16, seed=[1, 2])
  assert not np.any(np.isfinite(target.log_prob(z0, tf.broadcast_to(y, [16, 8])).numpy()))
  v0 = pl_mcmc.start_inside(target, z0, y, likelihood.operator)
  assert np.all(np.isfinite(target.log_prob(z0, v0).numpy()))
  assert np.all(v0.numpy() > -0.0556)  # Inside the support.
  result = tfc.baselines.run("pl_mcmc", prior, likelihood, y, num_steps=300, num_samples=64,
                             seed=0)
  assert result.info["acceptance"] > 0.05
  assert np.unique(result.x.reshape(64, -1), axis=0).shape[0] > 32  # The chains move.


def test_pl_mcmc_rejects_an_operator_that_is_not_a_mask(gaussian):
  lg, _, _ = gaussian
  likelihood = tfc.likelihoods.Gaussian(
      tfc.operators.Linear(np.array([[1., 1.]], np.float32), input_shape=[2]), scale=0.3)
  with pytest.raises(TypeError, match=r"`likelihood`.*Mask.*Linear"):
    tfc.baselines.run("pl_mcmc", lg.prior, likelihood, np.array([0.5], np.float32),
                      num_steps=10)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="gibbs"), "`method` must be one of"),
    (dict(budget_seconds=-1.), "`budget_seconds` must be a positive"),
    (dict(num_steps=0), "`num_steps` must be a positive integer"),
    (dict(num_samples=2.5), "`num_samples` must be a positive integer"),
])
def test_run_checks_its_arguments(kwargs, match, gaussian):
  lg, likelihood, y = gaussian
  kwargs = dict(dict(method="mala"), **kwargs)
  with pytest.raises(ValueError, match=match):
    tfc.baselines.run(kwargs.pop("method"), lg.prior, likelihood, y, **kwargs)


def test_mala_step_size_adapts_to_the_target_not_to_zero():
  # Dual averaging changes MALA's step size every warm-up step. The Langevin kernels cache the
  # current state's drift computed with the previous step size; unless it is recomputed, the
  # acceptance ratio is wrong, and on this 4-D problem (2 bimodal blocks) the step collapsed
  # to 0 within 20 steps (acceptance 0). Adapted, acceptance is near its target 0.574 (64
  # chains x 200 sampling steps; chain-to-chain spread of the mean well under 0.05) and the
  # step is of the order of the posterior's smallest variance (about 0.02 here).
  problem = tfc.problems.bimodal_blocks(num_blocks=2, grid_size=128)
  result = tfc.baselines.run("mala", problem.prior, problem.likelihood, problem.observation,
                             num_steps=400, seed=0, num_samples=256)
  assert 0.45 < result.info["acceptance"] < 0.7, result.info["acceptance"]
  assert result.info["step_size"] > 1e-3, result.info["step_size"]


def test_ambient_flow_stays_in_an_image_priors_support():
  # An image prior's density lives on its logit preprocessing's range (a box around [0, 1]):
  # ambient VI's q ends in that map, so every draw has a finite prior density. A Gaussian with
  # the same moments in x-space (no support map) puts draws where the density is zero.
  from tfp_composed.baselines import ambient  # pylint: disable=g-import-not-at-top
  prior = tfc.priors.glow([4, 4, 1], num_levels=1, num_steps=1, hidden_channels=4)
  assert ambient.support_bijector(prior).name == "logit_preprocessing"
  q, flow = ambient.ambient_flow(prior, seed=0)
  assert not any(v is w for v in q.trainable_variables for w in prior.trainable_variables)
  assert len(q.trainable_variables) == len(flow.trainable_variables)
  inside = prior.log_prob(q.sample(512, seed=[1, 2])).numpy()
  assert np.all(np.isfinite(inside))
  free, _ = ambient.ambient_flow(prior, seed=0, support=tfp.bijectors.Identity())
  outside = prior.log_prob(free.sample(512, seed=[1, 2])).numpy()
  assert not np.all(np.isfinite(outside))
  # Priors without the preprocessing keep x-space as it is.
  plain = tfp.distributions.TransformedDistribution(
      tfp.distributions.Sample(tfp.distributions.Normal(0., 1.), [3]), tfp.bijectors.Shift(1.))
  assert isinstance(ambient.support_bijector(plain), tfp.bijectors.Identity)
  with pytest.raises(TypeError, match="support"):
    ambient.ambient_flow(plain, support="logit")


def test_ambient_flow_starts_from_robust_moments_of_a_heavy_tailed_prior():
  # A flow's draws are heavy-tailed (on the MNIST prior the raw standard deviation of their
  # logits reaches 7.5, and a Gaussian with it put every draw where the prior's inverse
  # overflows): the start takes the median and the normal-consistent median absolute
  # deviation of the draws' logits, which the tails do not inflate.
  from tfp_composed.baselines import ambient  # pylint: disable=g-import-not-at-top
  tfb, tfd = tfp.bijectors, tfp.distributions
  prior = tfd.TransformedDistribution(
      tfd.Sample(tfd.Normal(0., 1.), [8]),
      tfb.Chain([tfc.data.logit_bijector(0.05), tfb.Sinh(), tfb.Scale(2.)]))
  q, flow = ambient.ambient_flow(prior, num_init_samples=4000, seed=0)
  stage = tfc.pregenerators.find_affine_stage(flow)
  scale = np.diag(stage.matrix().numpy())  # A diagonal Gaussian: the standard deviations.
  logits = np.sinh(2. * np.random.RandomState(0).randn(200000, 8))  # The prior's logits.
  mad_std = 1.4826 * np.median(np.abs(logits - np.median(logits, 0)), 0)
  np.testing.assert_allclose(scale, mad_std, rtol=0.1)  # 4000 draws: MAD error ~3 %.
  np.testing.assert_allclose(stage.shift.numpy(), 0., atol=0.15)
  assert np.all(scale < 0.5 * logits.std(0))  # The raw moments are twice as wide or more.
