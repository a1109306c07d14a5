"""The ground-truth problems: their exact posteriors are exact, and their scores can fail.

Block problems are built with `num_blocks=2` (D = 4) except where the full suite is the
point (mode masses of all eight bimodal blocks, the 64-dimensional Gaussian). Every
tolerance is stated next to its assertion with the error it allows for.
"""

import functools

import numpy as np
import pytest
from scipy import ndimage
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.distributions import transformed_distribution as _td

import tfp_composed as tfc
from tfp_composed import problems

tfd = tfp.distributions

SMALL = {
    "bimodal_blocks": dict(num_blocks=2),
    "nonlinear_blocks": dict(num_blocks=2),
    "rotated_bimodal_blocks": dict(num_blocks=2),
    "rotated_nonlinear_blocks": dict(num_blocks=2),
    "latent_rotated_bimodal_blocks": dict(num_blocks=2),
    "latent_rotated_nonlinear_blocks": dict(num_blocks=2),
    "linear_gaussian_64": dict(),
}


def test_every_problem_has_a_small_variant_here():
  assert set(SMALL) == set(problems.PROBLEMS)


@functools.lru_cache(maxsize=None)
def _small(name):
  """Each small problem is built once per test session (building costs ~0.5-1 s)."""
  return tfc.problems.get(name, **SMALL[name])


@pytest.fixture(scope="module", params=sorted(SMALL))
def problem(request):
  return _small(request.param)


@pytest.fixture(scope="module")
def bimodal8():
  return problems.get("bimodal_blocks")


def test_shapes_and_types(problem):
  d = problem.dim
  # `tfd.TransformedDistribution(...)` returns the (non-composite) base class here.
  assert isinstance(problem.prior, _td._TransformedDistribution)  # pylint: disable=protected-access
  assert isinstance(problem.prior.distribution, tfd.MultivariateNormalDiag)
  assert problem.prior.event_shape == [d] and problem.prior.dtype == tf.float32
  assert isinstance(problem.likelihood, tfc.likelihoods.Likelihood)
  assert problem.likelihood.input_shape == [d]
  assert list(problem.likelihood.event_shape) == list(problem.observation.shape)
  problem.likelihood.check_observation(problem.observation)
  x = problem.exact_sample(5, seed=0)
  assert x.shape == (5, d) and x.dtype == np.float64
  log_p = problem.exact_log_prob(x)
  assert log_p.shape == (5,) and np.all(np.isfinite(log_p))
  assert problem.mean.shape == (d,) and problem.covariance.shape == (d, d)
  # The prior is frozen: no trainable variables to move.
  assert not problem.prior.trainable_variables


def test_exact_density_is_the_public_problem(problem):
  """`log p(x) + log p(y | x)` from the float32 prior and likelihood equals
  `exact_log_prob(x) + log p(y)`: the difference is one constant over exact draws.

  Float32 log densities here are of size ~10-300 and carry relative errors ~1e-6, so the
  spread of the difference must stay below 2e-3 (a wrong block, sign, rotation or noise
  scale changes it by order one).
  """
  x = problem.exact_sample(2000, seed=1)
  x32 = tf.constant(x, tf.float32)
  public = (problem.prior.log_prob(x32) +
            problem.likelihood.log_prob(problem.observation, x32)).numpy()
  # Compare at the float32-rounded points, which the public objects actually saw.
  diff = public - problem.exact_log_prob(x32.numpy().astype(np.float64))
  assert np.ptp(diff) < 2e-3 * max(1., np.abs(public).max() / 100.), np.ptp(diff)


def test_prior_log_prob_is_the_change_of_variables(problem):
  """`log p(f(z)) = log N(z; 0, I) - log |det df/dz|`, the Jacobian by autodiff."""
  z = tf.random.stateless_normal([16, problem.dim], seed=[3, 4])
  with tf.GradientTape() as tape:
    tape.watch(z)
    x = problem.prior.bijector.forward(z)
  jacobian = tape.batch_jacobian(x, z).numpy().astype(np.float64)
  _, log_det = np.linalg.slogdet(jacobian)
  expected = problem.prior.distribution.log_prob(z).numpy() - log_det
  # tf.identity defeats the bijector cache, so log_prob really inverts the flow.
  np.testing.assert_allclose(problem.prior.log_prob(tf.identity(x)).numpy(), expected,
                             atol=2e-3, rtol=1e-4)
  # And the inverse is the inverse: float32 round trip.
  np.testing.assert_allclose(problem.prior.bijector.inverse(tf.identity(x)).numpy(),
                             z.numpy(), atol=2e-4)


@pytest.mark.parametrize("name", ["bimodal_blocks", "nonlinear_blocks"])
def test_grid_density_integrates_to_one_on_an_independent_grid(name):
  """Each block's normalized density, summed on a different grid (501 points per axis
  over a box 20% wider), is 1: the box holds the mass and the normalizer is right.
  Riemann sums of these smooth, vanishing densities are accurate to < 1e-8, so 1e-6."""
  p = _small(name)
  lo, hi = p.grid_lo, p.grid_hi
  centre, half = (lo + hi) / 2, (hi - lo) / 2 * 1.2
  n = 501
  t = (np.arange(n) + 0.5) / n
  for b in range(p.num_blocks):
    a1 = centre[b, 0] - half[b, 0] + 2 * half[b, 0] * t
    a2 = centre[b, 1] - half[b, 1] + 2 * half[b, 1] * t
    pts = np.stack(np.meshgrid(a1, a2, indexing="ij"), -1).reshape(-1, 2)
    u = np.zeros([pts.shape[0], p.num_blocks, 2])
    u[:, b] = pts
    log_p = p.block_log_unnormalized(u)[:, b] - p.log_normalizer[b]
    total = np.exp(log_p).sum() * (4 * half[b].prod() / n**2)
    assert abs(total - 1.) < 1e-6, (b, total)


def test_grid_is_converged():
  """Halving the grid resolution moves nothing measurable: log normalizers by < 1e-6,
  mode masses by < 1e-4, means by < 1e-3 sd and sds by < 1e-3 relative (the Monte Carlo
  errors of 10,000 draws are ~5e-3 for masses and ~1e-2 sd for means)."""
  for name in ("bimodal_blocks", "nonlinear_blocks"):
    fine = _small(name)
    coarse = problems.get(name, num_blocks=2, grid_size=256)
    np.testing.assert_allclose(coarse.log_normalizer, fine.log_normalizer, atol=1e-6)
    sd = fine.stddev
    np.testing.assert_array_less(np.abs(coarse.mean - fine.mean) / sd, 1e-3)
    np.testing.assert_allclose(coarse.stddev, sd, rtol=1e-3)
    if fine.mode_masses is not None:
      np.testing.assert_allclose(coarse.mode_masses, fine.mode_masses, atol=1e-4)
    assert np.all(fine.grid_log_z_error < 1e-6)


def test_bimodal_mode_masses(bimodal8):
  """The grid's mode masses are the advertised ones (solved independently on a 1-D grid,
  rounded: within 1e-3), unequal in six of eight blocks; the exact sampler reproduces
  them within 4 standard errors `sqrt(p (1 - p) / n)` per block."""
  p = bimodal8
  assert p.dim == 16 and p.mode_masses.shape == (8, 2)
  np.testing.assert_allclose(p.mode_masses[:, 1], problems.BIMODAL_MASSES, atol=1e-3)
  np.testing.assert_allclose(p.mode_masses.sum(1), 1., atol=1e-12)
  n = 20000
  freq = p.masses_of(p.exact_sample(n, seed=11))
  stderr = np.sqrt(p.mode_masses * (1 - p.mode_masses) / n)
  np.testing.assert_array_less(np.abs(freq - p.mode_masses), 4 * stderr)


def _num_components(log_density, level):
  """Connected pieces of the superlevel set `{log p > log p_max + level}` of a grid."""
  return ndimage.label(log_density - log_density.max() > level)[1]


def test_bimodal_blocks_have_two_separated_modes_and_nonlinear_blocks_one(bimodal8):
  """Superlevel sets at e^-4 and e^-8 of the peak: two pieces per bimodal block (the
  lighter mode's peak is above e^-3), one per nonlinear block; and between the bimodal
  modes (cells straddling `x_{b,1} = 0`) the density is below e^-11 of the peak."""
  for b in range(8):
    g = bimodal8.grid_log_density[b]
    assert [_num_components(g, level) for level in (-4., -8.)] == [2, 2], b
    x1 = bimodal8.grid_lo[b, 0] + (np.arange(g.shape[0]) + 0.5) * bimodal8.cell_size[b, 0]
    assert g[np.abs(x1) < 0.05].max() - g.max() < -11., b
  nonlinear = problems.get("nonlinear_blocks")
  for b in range(8):
    g = nonlinear.grid_log_density[b]
    assert [_num_components(g, level) for level in (-1., -4., -8.)] == [1, 1, 1], b


def test_score_of_exact_draws_is_perfect_and_of_prior_draws_is_not(problem):
  """Exact draws: energy ratio 1 within 0.8 (4 x its spread of 0.19, measured over 12
  seeds with 16 repeats of m = 500; the spread does not depend on m), mode-mass error
  within 4 standard errors. Prior draws: ratio above 5 (measured 10 to 1300 at m = 500)
  and, for bimodal problems, mode-mass error above 4 standard errors (measured 11)."""
  x = problem.exact_sample(4000, seed=21)
  kwargs = dict(seed=1, num_energy=500, num_repeats=16)
  good = problem.score(x, problem.exact_log_prob(x), **kwargs)
  assert good["kl"] == 0. and good["nonfinite_fraction"] == 0.
  assert abs(good["energy_ratio"] - 1.) < 0.8, good
  assert good["mean_error"] < 5. / np.sqrt(4000), good  # The largest of <= 64 z-scores.
  prior = problem.prior.sample(4000, seed=[5, 6]).numpy()
  bad = problem.score(prior, **kwargs)
  assert bad["energy_ratio"] > 5., bad
  if problem.mode_masses is not None:
    assert good["mode_mass_error"] < 4 * good["mode_mass_stderr"], good
    assert bad["mode_mass_error"] > 4 * bad["mode_mass_stderr"], bad


def test_score_detects_a_collapsed_mode(bimodal8):
  """A sampler that drops the lighter mode of block 0 (mass 0.3) is caught by the mode
  masses (error 0.3 >> 4 standard errors) and by the energy ratio (> 3)."""
  x = bimodal8.exact_sample(8000, seed=2)
  u = bimodal8.to_blocks(x)
  u[:, 0, 0] = np.abs(u[:, 0, 0])
  s = bimodal8.score(u.reshape(-1, 16), seed=0)
  assert abs(s["mode_mass_error"] - 0.3) < 4 * s["mode_mass_stderr"] + 0.01, s
  assert s["energy_ratio"] > 3., s


def test_kl_of_an_inflated_gaussian():
  """`q = N(m, c S)` against `p = N(m, S)`: `KL = D (c - 1 - log c) / 2` (0.566 nats at
  D = 64, c = 1.2); the estimate is within 4 of its standard errors."""
  p = _small("linear_gaussian_64")
  c = 1.2
  q = tfd.MultivariateNormalTriL(p.mean, np.sqrt(c) * p.scale_tril)
  x = q.sample(20000, seed=[7, 8])
  s = p.score(x.numpy(), q.log_prob(x).numpy())
  exact = 0.5 * p.dim * (c - 1 - np.log(c))
  assert abs(s["kl"] - exact) < 4 * s["kl_stderr"], (s["kl"], s["kl_stderr"], exact)
  assert s["kl_stderr"] < 0.02


def test_linear_gaussian_64_closed_form():
  """Scales span decades; the Joseph-form posterior equals the precision form (1e-6 in
  correlations and in standardized means: the precision form loses ~1e-9 inverting a
  prior covariance of condition ~1e6); the posterior has full covariance."""
  p = _small("linear_gaussian_64")
  prior_sd = np.sqrt(np.diag(p.prior_scale_tril @ p.prior_scale_tril.T))
  assert prior_sd.min() < 0.011 and prior_sd.max() > 9.9
  assert p.matrix.shape == (32, 64)
  prior_cov = p.prior_scale_tril @ p.prior_scale_tril.T
  precision = np.linalg.inv(prior_cov) + p.matrix.T @ p.matrix / p.noise**2
  cov = np.linalg.inv(precision)
  mean = cov @ (np.linalg.solve(prior_cov, p.prior_mean)
                + p.matrix.T @ p.observation.astype(np.float64) / p.noise**2)
  sd = np.sqrt(np.diag(cov))
  np.testing.assert_allclose(p.covariance / np.outer(sd, sd), cov / np.outer(sd, sd),
                             atol=1e-6)
  np.testing.assert_array_less(np.abs(p.mean - mean) / sd, 1e-6)
  corr = p.covariance / np.outer(sd, sd)
  assert np.abs(corr - np.eye(64)).max() > 0.3


def test_gaussian_closed_form_against_brute_force_grid():
  """In 2-D the closed form equals `GridPosterior` (float32 densities on a 1001^2 grid)
  to 1e-3 nats, and its moments to 1e-3 sd."""
  p = problems.linear_gaussian(dim=2, num_obs=1, noise=0.5, min_scale=0.3, max_scale=3.)
  sd = p.stddev
  lo, hi = p.mean - 9 * sd, p.mean + 9 * sd
  grid = problems.GridPosterior(p.prior, p.likelihood, p.observation, lo=lo, hi=hi)
  x = p.exact_sample(500, seed=3)
  np.testing.assert_allclose(grid.log_prob(x), p.exact_log_prob(x), atol=1e-3)
  w = grid.density * grid.cell
  mean = w @ grid.grid
  cov = (grid.grid - mean).T @ ((grid.grid - mean) * w[:, None])
  np.testing.assert_array_less(np.abs(mean - p.mean) / sd, 1e-3)
  np.testing.assert_allclose(np.sqrt(np.diag(cov)), sd, rtol=1e-3)
  np.testing.assert_allclose(cov[0, 1] / np.prod(sd), p.covariance[0, 1] / np.prod(sd),
                             atol=1e-3)


@pytest.mark.parametrize("name", ["bimodal_blocks", "nonlinear_blocks"])
def test_rotated_problem_is_the_block_problem_seen_through_q(name):
  plain = _small(name)
  rotated = _small("rotated_" + name)
  q = rotated.rotation
  np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-12)
  x = rotated.exact_sample(1000, seed=4)
  np.testing.assert_allclose(rotated.exact_log_prob(x), plain.exact_log_prob(x @ q),
                             atol=1e-9)
  # The exact sampler is the block sampler rotated.
  np.testing.assert_allclose(x, plain.exact_sample(1000, seed=4) @ q.T, atol=1e-12)
  # Float32 priors agree the same way (volume preserving: no log-det).
  x32 = tf.constant(x, tf.float32)
  np.testing.assert_allclose(rotated.prior.log_prob(x32).numpy(),
                             plain.prior.log_prob(tf.constant(x @ q, tf.float32)).numpy(),
                             atol=1e-3)
  if plain.mode_masses is not None:
    np.testing.assert_array_equal(rotated.mode_masses, plain.mode_masses)
  # Not block-wise to the eye: strong correlations across blocks.
  sd = rotated.stddev
  corr = rotated.covariance / np.outer(sd, sd)
  assert np.abs(corr[:2, 2:]).max() > 0.2, corr


def _cross_block_correlation(z):
  """Largest `|corr(z_i, z_j)|` over coordinates `i`, `j` of different 2-D blocks."""
  corr = np.corrcoef(z.T)
  other_block = np.kron(np.eye(z.shape[1] // 2), np.ones([2, 2])) == 0
  return np.abs(corr[other_block]).max()


@pytest.mark.parametrize("name", ["bimodal_blocks", "nonlinear_blocks"])
def test_latent_rotated_problem_is_the_block_problem_with_a_rotated_latent(name):
  """`x = f(R z)` with `z ~ N(0, I)` is `x = f(w)`, `w ~ N(0, I)`: the same `p(x)` and exact
  posterior, while the latent posterior is the block one turned by `R^T`.

  Float32 log densities of size ~10-40 agree to 1e-4 (the extra matvec rounds `z` at ~1e-7
  relative; measured 4e-6 at D = 16). Cross-block latent correlations from n = 4000 exact
  draws: zero for the block problem, where the 4 estimates have standard error
  `1 / sqrt(n) = 0.016`, so below 4 of them (measured 0.03); above 0.1, six of them, once
  rotated (measured 0.21 for the bimodal blocks and 0.83 for the nonlinear ones).
  """
  plain = _small(name)
  rotated = _small("latent_rotated_" + name)
  r = rotated.latent_rotation
  assert rotated.rotation is None and plain.latent_rotation is None
  np.testing.assert_allclose(r.T @ r, np.eye(4), atol=1e-12)
  # The exact side is the block problem's, bit for bit.
  x = rotated.exact_sample(4000, seed=4)
  np.testing.assert_array_equal(x, plain.exact_sample(4000, seed=4))
  np.testing.assert_array_equal(rotated.exact_log_prob(x), plain.exact_log_prob(x))
  np.testing.assert_array_equal(rotated.mean, plain.mean)
  np.testing.assert_array_equal(rotated.covariance, plain.covariance)
  if plain.mode_masses is not None:
    np.testing.assert_array_equal(rotated.mode_masses, plain.mode_masses)
  # The float32 priors are one density in x: log N(R^T w) = log N(w).
  x32 = tf.constant(np.concatenate([x[:500], plain.prior.sample(500, seed=[1, 2]).numpy()]),
                    tf.float32)
  np.testing.assert_allclose(rotated.prior.log_prob(x32).numpy(),
                             plain.prior.log_prob(x32).numpy(), atol=1e-4)
  # In latent space the flows differ by R: f_rotated(z) = f(R z), so the latent targets are
  # one another's rotations.
  z = rotated.to_latent(x[:500])
  np.testing.assert_allclose(z, plain.to_latent(x[:500]) @ r, atol=1e-12)
  np.testing.assert_allclose(rotated.prior.bijector.inverse(x32[:500]).numpy(), z, atol=1e-4)
  z32 = tf.constant(z, tf.float32)
  np.testing.assert_allclose(rotated.prior.bijector.forward(z32).numpy(),
                             plain.prior.bijector.forward(tf.constant(z @ r.T, tf.float32))
                             .numpy(), atol=1e-4)
  targets = [tfc.targets.LatentTarget(p.prior, p.likelihood, p.observation)
             for p in (rotated, plain)]
  np.testing.assert_allclose(targets[0].log_prob(z32).numpy(),
                             targets[1].log_prob(tf.constant(z @ r.T, tf.float32)).numpy(),
                             atol=5e-4)  # Residuals over the noise scale: measured 4e-5.
  # The latent posterior is block-wise before the rotation and not after it.
  assert _cross_block_correlation(plain.to_latent(x)) < 4. / np.sqrt(4000)
  assert _cross_block_correlation(rotated.to_latent(x)) > 0.1


def test_seeds_are_explicit(problem):
  a = problem.exact_sample(50, seed=(1, 2))
  np.testing.assert_array_equal(a, problem.exact_sample(50, seed=(1, 2)))
  assert np.abs(a - problem.exact_sample(50, seed=(1, 3))).max() > 0.
  s1 = problem.score(a, seed=3)
  s2 = problem.score(a, seed=3)
  assert s1["energy"] == s2["energy"] and s1["energy_floor"] == s2["energy_floor"]


def test_non_finite_rows_are_counted_and_dropped():
  p = _small("nonlinear_blocks")
  x = p.exact_sample(1000, seed=5)
  x[:100, 1] = np.nan
  x[100:150, 0] = np.inf
  s = p.score(x, np.zeros(1000), seed=0)
  assert s["nonfinite_fraction"] == pytest.approx(0.15)
  assert np.isfinite(s["kl"]) and np.isfinite(s["energy_ratio"])


def test_argument_errors():
  with pytest.raises(ValueError, match=r"`name` must be one of .*'nope'"):
    problems.get("nope")
  with pytest.raises(ValueError, match=r"`num_blocks` must be at most 8, got 9"):
    problems.get("bimodal_blocks", num_blocks=9)
  with pytest.raises(ValueError, match=r"`num_blocks` must be a positive integer, got 0"):
    problems.get("nonlinear_blocks", num_blocks=0)
  p = _small("linear_gaussian_64")
  with pytest.raises(ValueError, match=r"`x` must have shape \[n, 64\], got \[3, 63\]"):
    p.score(np.zeros([3, 63]))
  with pytest.raises(ValueError, match=r"`log_q` must have shape \[3\].*got \[4\]"):
    p.score(np.zeros([3, 64]), np.zeros(4))
  with pytest.raises(ValueError, match=r"`seed` must be a non-negative int.*-1"):
    p.exact_sample(3, seed=-1)
  with pytest.raises(ValueError, match=r"`n` must be a positive integer, got 0"):
    p.exact_sample(0, seed=0)
  with pytest.raises(ValueError, match=r"at least 2 finite rows, got 1 of 2"):
    p.score(np.stack([np.zeros(64), np.full(64, np.nan)]))
  with pytest.raises(ValueError, match=r"`matrix` must be orthogonal"):
    problems.Orthogonal(np.ones([2, 2]))
