"""Tests for `tfp_composed.metrics` against hand-computed values and samplers with known coverage.

Monte Carlo tolerances are 5 binomial (or normal) standard errors, stated at each check; all seeds
are fixed.
"""

import numpy as np
import pytest
import scipy.special
import scipy.stats

from tfp_composed import metrics
from tfp_composed import tasks


def _calibrated(x_true, scale, n, seed, shift=0., spread=1.):
  """Samples of `q_j = N(mu_j, (spread scale_j)^2)`, `mu_j = x*_j + shift scale_j + scale_j e_j`.

  With `shift = 0` and `spread = 1` the truth is a draw of `q_j` (`x*_j - mu_j ~ N(0, scale_j^2)`),
  so a central interval of `q_j` at level `a` holds `x*_j` with probability `a`.
  """
  rng = np.random.default_rng(seed)
  mu = x_true + shift * scale + scale * rng.normal(size=x_true.shape)
  return mu + spread * scale * rng.normal(size=(n,) + x_true.shape)


def test_psnr_of_a_known_mse():
  x_true = np.full([2, 8, 8, 1], 0.5, np.float32)
  signs = np.where(np.indices([8, 8, 1]).sum(0) % 2 == 0, 1., -1.)
  x = x_true + np.stack([0.1 * signs, 0.01 * signs]).astype(np.float32)
  # MSE 1e-2 and 1e-4: 10 log10(1 / MSE) = 20 dB and 40 dB.
  np.testing.assert_allclose(metrics.psnr(x, x_true[0]), [20., 40.], atol=1e-3)


def test_ssim_of_constant_images_is_the_luminance_term():
  # Constant images: the contrast-structure term is C2 / C2 = 1 and
  # SSIM = (2 a b + C1) / (a^2 + b^2 + C1), C1 = (0.01 max_val)^2.
  a, b, c1 = 0.2, 0.5, 1e-4
  x = np.full([8, 8, 1], a, np.float32)
  x_true = np.full([8, 8, 1], b, np.float32)
  # rtol 1e-4: float32 round-off leaves variances ~1e-8 against C2 = 9e-4.
  np.testing.assert_allclose(metrics.ssim(x, x_true), [(2 * a * b + c1) / (a**2 + b**2 + c1)],
                             rtol=1e-4)
  image = np.random.default_rng(0).uniform(size=[28, 28, 1])
  np.testing.assert_allclose(metrics.ssim(image, image), [1.], atol=1e-6)
  assert metrics.ssim_filter_size([28, 28, 1]) == 11
  assert metrics.ssim_filter_size([8, 8, 1]) == 5


def test_best_of_k_looks_at_the_first_k_only():
  values = np.arange(20.)
  assert metrics.best_of_k(values, 16) == 15.
  assert metrics.best_of_k(values[::-1], 16) == 19.
  with pytest.raises(ValueError, match=r"`k` must be a positive integer, got 0"):
    metrics.best_of_k(values, 0)


@pytest.mark.parametrize("level", [0.5, 0.9])
def test_coverage_of_a_calibrated_sampler_is_the_nominal_level(level):
  x_true = np.random.default_rng(1).uniform(size=[64, 64, 1])
  scale = np.full_like(x_true, 0.1)
  samples = _calibrated(x_true, scale, n=1000, seed=2)
  # 4096 independent pixels: binomial standard error sqrt(a (1 - a) / 4096) <= 0.0078.
  se = np.sqrt(level * (1 - level) / x_true.size)
  assert abs(metrics.coverage(samples, x_true, level) - level) < 5. * se


def test_biased_and_overconfident_samplers_fail_coverage():
  x_true = np.random.default_rng(1).uniform(size=[64, 64, 1])
  scale = np.full_like(x_true, 0.1)
  z = scipy.stats.norm.ppf(0.95)
  se = np.sqrt(0.25 / x_true.size)  # The largest binomial standard error, 0.0078.
  # Centres shifted by 2 scales: x* - mu = -s (2 + e), e ~ N(0, 1), and the interval is
  # mu -+ z s, so the truth is inside iff |2 + e| < z.
  biased = metrics.coverage(_calibrated(x_true, scale, 1000, seed=3, shift=2.), x_true, 0.9)
  expected = scipy.stats.norm.cdf(z - 2.) - scipy.stats.norm.cdf(-z - 2.)
  assert abs(biased - expected) < 5. * se and biased < 0.9 - 10. * se
  # Intervals a third as wide: inside iff |e| < z / 3.
  narrow = metrics.coverage(_calibrated(x_true, scale, 1000, seed=4, spread=1. / 3.), x_true, 0.9)
  expected = 2. * scipy.stats.norm.cdf(z / 3.) - 1.
  assert abs(narrow - expected) < 5. * se and narrow < 0.9 - 10. * se


def test_coverage_scores_only_where_asked():
  x_true = np.zeros([4, 4, 1])
  samples = np.stack([np.full([4, 4, 1], -1.), np.full([4, 4, 1], 1.)])
  samples[:, :2] += 5.  # Rows 0-1: the interval misses the truth.
  where = np.zeros([4, 4, 1], bool)
  where[2:] = True
  assert metrics.coverage(samples, x_true, 0.9) == 0.5
  assert metrics.coverage(samples, x_true, 0.9, where=where) == 1.
  with pytest.raises(ValueError, match=r"`level` must be a float in \(0, 1\), got 1.5"):
    metrics.coverage(samples, x_true, 1.5)
  with pytest.raises(ValueError, match=r"`x_true` must have shape \[4, 4, 1\].*\[4, 4\]"):
    metrics.coverage(samples, x_true[..., 0], 0.9)


def test_log_prob_rank_by_hand():
  log_q = np.array([1., 2., 3., 4.])
  assert metrics.log_prob_rank(log_q, 2.5) == 0.5
  assert metrics.log_prob_rank(log_q, 2.) == (1 + 0.5) / 4
  assert metrics.log_prob_rank(log_q, 0.) == 0. and metrics.log_prob_rank(log_q, 9.) == 1.


def _gaussian_ranks(truth_scale, q_scale, num_problems=400, n=200, d=10, seed=0):
  """Ranks of `log q(x*)` among `log q(x_i)` for `q = N(0, q_scale^2 I_d)`, `x* ~ N(0, truth_scale^2 I_d)`."""
  rng = np.random.default_rng(seed)
  log_q = lambda x: -0.5 * np.sum((x / q_scale)**2, axis=-1)  # Up to a constant.
  ranks = []
  for _ in range(num_problems):
    samples = q_scale * rng.normal(size=(n, d))
    truth = truth_scale * rng.normal(size=d)
    ranks.append(metrics.log_prob_rank(log_q(samples), log_q(truth)))
  return np.array(ranks)


def test_log_prob_rank_is_uniform_when_calibrated_and_not_otherwise():
  ranks = _gaussian_ranks(1., 1.)
  # Uniform on [0, 1]: standard deviation 1 / sqrt(12) per problem, 400 problems.
  assert abs(ranks.mean() - 0.5) < 5. * np.sqrt(1. / 12. / ranks.size)
  assert abs(np.mean(ranks < 0.1) - 0.1) < 5. * np.sqrt(0.09 / ranks.size)
  assert scipy.stats.kstest(ranks, "uniform").pvalue > 1e-4
  # A q half as wide as the truth's spread puts the truth in its tail: ranks near 0.
  assert _gaussian_ranks(1., 0.5).mean() < 0.05
  # A q twice as wide puts the truth near its mode: ranks near 1.
  assert _gaussian_ranks(1., 2.).mean() > 0.95


def test_normalized_residual_by_hand():
  task = tasks.get("compressed_sensing_m200", image_shape=[28, 28, 1])
  x_true = np.random.default_rng(0).uniform(size=[28, 28, 1]).astype(np.float32)
  y = task.observe(x_true, seed=1).numpy()
  other = np.random.default_rng(1).uniform(size=[2, 28, 28, 1]).astype(np.float32)
  expected = np.linalg.norm(y - other.reshape(2, -1) @ task.operator.matrix.T, axis=1) / (
      task.noise_scale * np.sqrt(200))
  np.testing.assert_allclose(metrics.normalized_residual(task.likelihood, y, other), expected,
                             rtol=1e-4)
  # At the truth, rho^2 is a chi-square with m = 200 degrees of freedom over m:
  # rho = 1 within 5 standard errors 1 / sqrt(2 m).
  rho = metrics.normalized_residual(task.likelihood, y, x_true[None])[0]
  assert abs(rho - 1.) < 5. / np.sqrt(2. * 200)
  # A non-Gaussian likelihood: the one-bit sensor, (y - p) / sqrt(p (1 - p)).
  quantizer = tasks.get("quantize_1bit", image_shape=[8, 8, 1])
  x = np.linspace(0.35, 0.65, 64).reshape(8, 8, 1).astype(np.float32)
  y = quantizer.observe(x, seed=0).numpy()
  p = scipy.special.expit((x - 0.5) / 0.05)
  expected = np.sqrt(np.mean((y - p)**2 / (p * (1 - p))))
  np.testing.assert_allclose(metrics.normalized_residual(quantizer.likelihood, y, x[None]),
                             [expected], rtol=1e-4)


def test_diversity_and_std_by_hand():
  samples = np.array([[0., 0.], [3., 4.], [0., 4.]])
  # Pairwise distances 5, 3, 4.
  np.testing.assert_allclose(metrics.diversity(samples), 4.)
  np.testing.assert_allclose(metrics.posterior_std(samples), [np.std([0, 3, 0]), np.std([0, 4, 4])])
  with pytest.raises(ValueError, match="at least 2 draws, got 1"):
    metrics.diversity(samples[:1])


def test_summarize_leaves_out_non_finite_rows_and_matches_the_parts():
  task = tasks.get("inpaint_lower_half", image_shape=[8, 8, 1])
  x_true = np.random.default_rng(0).uniform(0.1, 0.9, size=[8, 8, 1]).astype(np.float32)
  y = task.observe(x_true, seed=0)
  samples = _calibrated(x_true, np.full_like(x_true, 0.05), n=64, seed=1).astype(np.float32)
  log_q = -np.arange(64.)
  row = metrics.summarize(samples, x_true, task, log_q=log_q, log_q_true=-9.5, observation=y)
  bad = samples.copy()
  bad[[3, 10]] = np.nan
  bad[20, 0, 0, 0] = np.inf
  keep = np.ones(64, bool)
  keep[[3, 10, 20]] = False
  row_bad = metrics.summarize(bad, x_true, task, log_q=log_q, log_q_true=-9.5, observation=y)
  row_kept = metrics.summarize(samples[keep], x_true, task, log_q=log_q[keep], log_q_true=-9.5,
                               observation=y)
  assert row_bad["num_nonfinite"] == 3 and row_bad["num_samples"] == 64
  assert row["num_nonfinite"] == 0
  for key, value in row_kept.items():
    if key not in ("num_samples", "num_nonfinite"):
      assert row_bad[key] == pytest.approx(value), key
  clipped = np.clip(samples, 0., 1.)
  assert row["psnr_mean"] == pytest.approx(metrics.psnr(clipped.mean(0), x_true)[0])
  assert row["psnr_best_of_16"] == pytest.approx(metrics.psnr(clipped[:16], x_true).max())
  assert row["coverage_90"] == metrics.coverage(clipped, x_true, 0.9, where=task.unobserved_mask)
  assert row["log_q_rank"] == 54 / 64  # -10, ..., -63 lie below -9.5.
  assert row["std_unobserved"] == pytest.approx(clipped.std(0)[4:].mean())
  assert set(row) >= {"ssim_mean", "ssim_best_of_16", "coverage_50", "residual_of_mean",
                      "residual_median", "residual_true", "diversity", "mse_mean_unobserved"}
  assert all(isinstance(v, (int, float)) for k, v in row.items()
             if k not in metrics.IMPORTANCE_KEYS)
  assert all(row[k] is None for k in metrics.IMPORTANCE_KEYS)  # No `log_joint` given.
  # With `log_joint`, the non-finite samples are zero weights.
  log_joint = log_q + np.random.default_rng(2).normal(size=64)
  row_bad = metrics.summarize(bad, x_true, task, log_q=log_q, log_q_true=-9.5, observation=y,
                              log_joint=log_joint)
  expected = metrics.importance_summary(log_joint, log_q, keep)
  assert {k: row_bad[k] for k in metrics.IMPORTANCE_KEYS} == expected
  kept = metrics.importance_summary(log_joint[keep], log_q[keep])
  assert expected["elbo"] == pytest.approx(kept["elbo"])
  assert expected["iw_bound"] == pytest.approx(kept["iw_bound"] + np.log(61 / 64))


def test_importance_summary_of_log_normal_weights_matches_the_closed_forms():
  """`log w ~ N(c, s^2)`: E log w = c, log E w = c + s^2 / 2, ESS / n -> exp(-s^2).

  n = 200,000 draws, s = 0.5; tolerances are 5 standard errors: s / sqrt(n) = 0.0011 for the
  ELBO, sqrt(exp(s^2) - 1) / sqrt(n) = 0.0012 for the bound, and 0.005 for the ESS fraction
  (5 times its spread over 50 seeds, 0.0009).
  """
  n, c, s = 200_000, -3., 0.5
  log_w = c + s * np.random.default_rng(0).normal(size=n)
  log_q = np.random.default_rng(1).normal(size=n)  # Any q: only the difference matters.
  out = metrics.importance_summary(log_w + log_q, log_q)
  assert out["elbo"] == pytest.approx(c, abs=5 * s / np.sqrt(n))
  assert out["iw_bound"] == pytest.approx(c + s**2 / 2,
                                          abs=5 * np.sqrt(np.exp(s**2) - 1) / np.sqrt(n))
  assert out["ess_fraction"] == pytest.approx(np.exp(-s**2), abs=0.005)
  assert out["k_hat"] < 0.5  # Log-normal weights have every moment.
  # q = N(0, 1) under a target N(0, 3^2): w ~ exp(4 x^2 / 9) has tail index 9 / 8, so the
  # Pareto shape is 8 / 9, over the PSIS ceiling 0.7.
  x = np.random.default_rng(4).normal(size=4000)
  narrow = metrics.importance_summary(-x**2 / 18 - np.log(3.), -x**2 / 2)
  assert narrow["k_hat"] > 0.7 and narrow["ess_fraction"] < 0.5
  # Non-finite log q: left out; no finite weight at all: None everywhere.
  with_nan = metrics.importance_summary(np.r_[log_w[:100] + log_q[:100], 0.],
                                        np.r_[log_q[:100], np.nan])
  assert with_nan == metrics.importance_summary(log_w[:100] + log_q[:100], log_q[:100])
  assert metrics.importance_summary([-np.inf, -np.inf], [0., 0.]) == {
      k: None for k in metrics.IMPORTANCE_KEYS}
  with pytest.raises(ValueError, match=r"`log_joint` must hold one value per sample \(2\), got 3"):
    metrics.importance_summary([0., 0., 0.], [0., 0.])


def test_summarize_without_density_observation_or_finite_samples():
  task = tasks.get("denoise", image_shape=[8, 8, 1])
  x_true = np.full([8, 8, 1], 0.5, np.float32)
  samples = np.full([4, 8, 8, 1], np.nan, np.float32)
  row = metrics.summarize(samples, x_true, task)
  assert row["num_nonfinite"] == 4
  assert row["psnr_mean"] is None and row["log_q_rank"] is None and row["residual_true"] is None
  one = metrics.summarize(x_true[None], x_true, task, observation=task.observe(x_true, seed=0))
  assert one["psnr_mean"] > 100. and one["coverage_90"] is None and one["diversity"] is None
  assert one["residual_true"] == one["residual_of_mean"]
  with pytest.raises(ValueError, match=r"`samples` must have image shape \[8, 8, 1\].*\[4, 4, 1\]"):
    metrics.summarize(np.zeros([2, 4, 4, 1]), x_true, task)
  with pytest.raises(ValueError, match=r"`log_q` must hold one value per sample \(2\), got 3"):
    metrics.summarize(np.zeros([2, 8, 8, 1]), x_true, task, log_q=np.zeros(3), log_q_true=0.)
