"""Diagnostics against closed forms.

The latent posterior of a linear-Gaussian problem (`x = L z + mu`, `y = A x + N(0, s^2 I)`) is
`N(m, S)` and its evidence is `log p(y) = log N(y; A mu, A L L^T A^T + s^2 I)`. For a Gaussian
`q` the importance weights `w = p(y) N(z; m, S) / q(z)` have the known second moment
`E_q[(w / p(y))^2] = int N(z; m, S)^2 / q(z) dz = 1 + chi^2`, so the IW bound's Monte Carlo
error is about `sqrt(chi^2 / n)` (delta method); the tests allow 5 of those. A `q` narrower
than the target by a factor `r` in scale gives weights with Pareto tail index `k = 1 - r^2`
(`w = exp(a u^2)` with `u ~ N(0, r^2)`), far above 0.7 for `r = 0.3`.
"""

import gc
import warnings
import weakref

import numpy as np
import pytest
import tensorflow_probability as tfp

import problems
import tfp_composed as tfc

tfd = tfp.distributions


@pytest.fixture(scope="module")
def linear_gaussian():
  lg = problems.LinearGaussian(dim=2, num_obs=1, noise=0.3, seed=1, matrix=[[1., 0.]])
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Mask([True, False]), scale=0.3)
  y = lg.y.astype(np.float32)
  # Exact latent posterior N(m, S) and evidence, from the float32-rounded parameters.
  L = lg.L.astype(np.float32).astype(np.float64)
  mu = lg.mu.astype(np.float32).astype(np.float64)
  A, s2 = lg.A, 0.3**2
  precision = np.eye(2) + L.T @ A.T @ A @ L / s2
  S = np.linalg.inv(precision)
  m = S @ L.T @ A.T @ (y.astype(np.float64) - A @ mu) / s2
  evidence = tfd.MultivariateNormalFullCovariance(
      A @ mu, A @ L @ L.T @ A.T + s2 * np.eye(1)).log_prob(y.astype(np.float64)).numpy()
  target = tfc.targets.LatentTarget(lg.prior, likelihood, y)
  return dict(lg=lg, likelihood=likelihood, y=y, m=m, S=S, log_evidence=float(evidence),
              target=target)


def _gaussian_log_weights(case, shift, scale_factor, n, seed):
  """`log w` for `q = N(m + shift * sqrt(diag S), scale_factor^2 S)`, and the chi^2 of it."""
  m, S = case["m"], case["S"]
  q = tfd.MultivariateNormalTriL(
      (m + shift * np.sqrt(np.diag(S))).astype(np.float32),
      (scale_factor * np.linalg.cholesky(S)).astype(np.float32))
  z = q.sample(n, seed=seed)
  log_w = (case["target"].log_prob(z) - q.log_prob(z)).numpy().astype(np.float64)
  # chi^2 + 1 = int p^2 / q, by quadrature in the whitened coordinates of p (2-D grid).
  t = np.linspace(-12, 12, 2001)
  u = np.stack(np.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
  log_p = -0.5 * np.sum(u**2, -1) - np.log(2 * np.pi)
  w_shift = shift * np.sqrt(np.diag(S)) @ np.linalg.inv(np.linalg.cholesky(S)).T
  log_q = (-0.5 * np.sum((u - w_shift)**2, -1) / scale_factor**2
           - np.log(2 * np.pi * scale_factor**2))
  chi2 = np.sum(np.exp(2 * log_p - log_q)) * (t[1] - t[0])**2 - 1
  return log_w, chi2


def test_iw_bound_approaches_the_evidence_and_k_hat_is_small(linear_gaussian):
  n = 20000
  log_w, chi2 = _gaussian_log_weights(linear_gaussian, shift=0.3, scale_factor=1.2, n=n,
                                      seed=[1, 2])
  d = tfc.diagnostics.importance_diagnostics(log_w)
  truth = linear_gaussian["log_evidence"]
  tolerance = 5 * np.sqrt(chi2 / n)
  print(f"IW {d.iw_bound:.4f}, ELBO {d.elbo:.4f}, log p(y) {truth:.4f} (tol {tolerance:.4f}), "
        f"k-hat {d.k_hat:.3f}, ESS fraction {d.ess_fraction:.3f}, chi2 {chi2:.3f}")
  assert abs(d.iw_bound - truth) < tolerance
  assert d.elbo < truth - 3 * tolerance  # A Gaussian q that is not the posterior: KL > 0.
  assert d.gap > 0
  assert d.k_hat < 0.5
  assert d.trustworthy
  assert d.num_samples == n and d.num_nonfinite == 0
  # ESS fraction -> 1 / (1 + chi^2) for large n.
  assert abs(d.ess_fraction - 1 / (1 + chi2)) < 0.05


def test_a_q_much_narrower_than_the_target_is_not_trustworthy(linear_gaussian):
  log_w, _ = _gaussian_log_weights(linear_gaussian, shift=0., scale_factor=0.3, n=4000,
                                   seed=[3, 4])
  d = tfc.diagnostics.importance_diagnostics(log_w)
  print(f"narrow q: k-hat {d.k_hat:.3f} (theory 1 - 0.3^2 = 0.91), ESS fraction "
        f"{d.ess_fraction:.3f}")
  assert d.k_hat > 0.7
  assert not d.trustworthy
  assert d.iw_bound < linear_gaussian["log_evidence"]  # Heavy tails: underestimates.


def test_diagnose_of_the_exact_posterior_has_constant_weights(linear_gaussian):
  """An affine pre-generator set to the exact latent posterior: every weight is p(y)."""
  case = linear_gaussian
  posterior = tfc.ComposedPosterior(case["lg"].prior, case["likelihood"], case["y"],
                                    pregenerator=tfc.pregenerators.affine([2]),
                                    num_components=1)
  stage = tfc.pregenerators.find_affine_stage(posterior.pregenerator)
  stage.set_gaussian(case["m"], case["S"])
  d = posterior.diagnose(num_samples=2000, seed=3)
  assert isinstance(d, tfc.diagnostics.ImportanceDiagnostics)
  np.testing.assert_allclose([d.elbo, d.iw_bound], case["log_evidence"], atol=2e-3)
  assert d.gap < 1e-3 and d.ess_fraction > 0.999 and d.trustworthy
  # The prior as q (the unfitted pre-generator) is far off: a large gap.
  stage.set_gaussian(np.zeros(2), np.eye(2))
  far = posterior.diagnose(num_samples=2000, seed=3)
  assert far.gap > 0.1 and far.ess_fraction < 0.9


class _TraceCounting:
  """A posterior as `diagnose` sees it, counting the Python calls of its sampler: inside a
  `tf.function` these happen only while tracing."""

  def __init__(self, posterior):
    self._posterior = posterior
    self.traces = 0

  @property
  def target(self):
    return self._posterior.target

  def latent_sample_and_log_prob(self, sample_shape=(), seed=None):
    self.traces += 1
    return self._posterior.latent_sample_and_log_prob(sample_shape, seed=seed)


def test_repeated_diagnoses_trace_once_and_do_not_keep_the_posterior(linear_gaussian):
  case = linear_gaussian
  posterior = tfc.ComposedPosterior(case["lg"].prior, case["likelihood"], case["y"],
                                    pregenerator=tfc.pregenerators.affine([2]),
                                    num_components=1)
  counting = _TraceCounting(posterior)
  first = tfc.diagnostics.diagnose(counting, num_samples=256, seed=0, batch_size=128)
  for seed in (1, 2, 0):
    last = tfc.diagnostics.diagnose(counting, num_samples=256, seed=seed, batch_size=128)
  assert counting.traces == 1
  assert last == first  # The reused function: same seed, same weights.
  other = _TraceCounting(posterior)
  tfc.diagnostics.diagnose(other, num_samples=256, seed=0, batch_size=128)
  assert other.traces == 1  # One function per object.
  ref = weakref.ref(counting)
  del counting
  gc.collect()
  assert ref() is None


def test_fit_reports_diagnostics_when_verbose(linear_gaussian, capsys):
  case = linear_gaussian
  posterior = tfc.ComposedPosterior(case["lg"].prior, case["likelihood"], case["y"],
                                    pregenerator=tfc.pregenerators.affine([2]),
                                    num_components=1)
  quiet = posterior.fit(num_steps=20, seed=0, verbose=0, init=None, check_weights=False)
  assert quiet.diagnostics is None
  history = posterior.fit(num_steps=20, seed=0, verbose=1, init=None)
  assert isinstance(history.diagnostics, tfc.diagnostics.ImportanceDiagnostics)
  assert "diagnostics: ELBO" in capsys.readouterr().out


def test_k_hat_threshold_follows_the_sample_size():
  assert tfc.diagnostics.k_hat_threshold(100) == pytest.approx(0.5)
  assert tfc.diagnostics.k_hat_threshold(100000) == pytest.approx(0.7)


@pytest.mark.parametrize("log_weights, match", [
    ([0.], "at least 2"),
    ([0., np.inf], r"\+inf"),
    ([-np.inf, -np.inf], "no finite"),
])
def test_importance_diagnostics_checks_its_input(log_weights, match):
  with pytest.raises(ValueError, match=match):
    tfc.diagnostics.importance_diagnostics(log_weights)


def test_nan_weights_are_counted_and_untrustworthy():
  log_w = np.random.RandomState(0).randn(1000) * 0.1
  log_w[:3] = np.nan
  d = tfc.diagnostics.importance_diagnostics(log_w)
  assert d.num_nonfinite == 3 and not d.trustworthy


def test_mcmc_ess_and_rhat_of_independent_and_of_stuck_chains():
  rng = np.random.RandomState(0)
  iid = rng.randn(500, 8, 2)
  summary = tfc.diagnostics.mcmc_summary(iid)
  # ESS of 4000 independent draws: within 5 standard errors (~ sqrt(2 n) here) of 4000.
  assert np.all(np.abs(summary["ess"] - 4000) < 5 * np.sqrt(2 * 4000)), summary["ess"]
  assert summary["rhat_max"] < 1.01
  stuck = iid + np.arange(8)[None, :, None]  # Each chain around its own mean.
  assert tfc.diagnostics.mcmc_summary(stuck)["rhat_max"] > 1.5
  ar = np.zeros([2000, 4, 1])
  for t in range(1, 2000):
    ar[t] = 0.9 * ar[t - 1] + rng.randn(4, 1)
  # AR(1) with rho = 0.9: ESS ~ n (1 - rho) / (1 + rho) = 8000 / 19 ~ 421.
  ess = tfc.diagnostics.effective_sample_size(ar)[0]
  assert 421 / 2 < ess < 421 * 2, ess


# ---------------------------------------------------------------------------
# The mode check: draws of q cannot show a mode q missed; the start's modes can.


def _fit_and_score(problem, pregenerator=None):
  """`fit()` with its defaults (its importance check included), then exact scores of q."""
  posterior = tfc.ComposedPosterior(problem.prior, problem.likelihood, problem.observation,
                                    pregenerator=pregenerator)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # The check's own warning; its result is tested.
    posterior.fit(seed=0, verbose=0)
  return posterior, problem.score(posterior.sample(4000, seed=1).numpy())


def test_the_importance_check_flags_a_mode_that_q_missed():
  # 4 bimodal blocks turned by a rotation of the latent (16 joint modes along rotated axes),
  # fitted by the default pre-generator without the start's mode axes (`axes=False`): q
  # keeps one mode of a block whose minor mode holds 0.3 of the mass (the exact mode masses
  # say so), while q's own weights look healthy (ESS 77%, k-hat 0.31). The start's local
  # maxima show it: q's log-weight at one of them is 108 nats above its largest draw's, far
  # past the 5-nat limit.
  problem = tfc.problems.latent_rotated_bimodal_blocks(num_blocks=4, grid_size=128)
  without_axes = tfc.pregenerators.real_nvp([8], num_layers=4, hidden_units=(64, 64))
  posterior, score = _fit_and_score(problem, without_axes)
  assert score["mode_mass_error"] > 0.2  # Truly missed (exact draws err by ~0.01).
  check = posterior.diagnosis
  assert check["mode_gap"] > tfc.posterior.MAX_MODE_GAP == 5.
  assert not check["adequate"]
  assert "misses a mode" in check["message"]


def test_the_mode_check_passes_a_q_that_holds_every_mode():
  # 2 bimodal blocks, axis-aligned: every mode kept (mode masses within 0.05 of exact); the
  # gap at the start's modes is below 0 (measured -0.73): q's draws reach weights as high.
  problem = tfc.problems.bimodal_blocks(num_blocks=2, grid_size=128)
  posterior, score = _fit_and_score(problem)
  assert score["mode_mass_error"] < 0.05
  assert posterior.diagnosis["mode_gap"] < 5.
  assert "misses a mode" not in posterior.diagnosis["message"]
