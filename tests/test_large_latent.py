"""The large-latent path: L-BFGS MAP, low-rank Laplace, and `fit()`'s defaults above 256 dims."""

import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_composed as tfc
from tfp_composed import posterior as posterior_lib

tfb = tfp.bijectors
tfd = tfp.distributions


def _linear_gaussian(dim=300, num_obs=12, noise=0.1, seed=0):
  """`z ~ N(0, I_dim)`, `y = M z + noise eps`, prior flow the identity: an exact posterior."""
  rng = np.random.RandomState(seed)
  matrix = (rng.randn(num_obs, dim) / np.sqrt(dim)).astype(np.float32)
  prior = tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0., 1.), [dim]), tfb.Identity())
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Linear(matrix), scale=noise)
  z_true = rng.randn(dim)
  y = (matrix @ z_true + noise * rng.randn(num_obs)).astype(np.float32)
  matrix = matrix.astype(np.float64)
  target = tfc.targets.LatentTarget(prior, likelihood, y)
  precision = np.eye(dim) + matrix.T @ matrix / noise**2
  covariance = np.linalg.inv(precision)
  mean = covariance @ (matrix.T @ y) / noise**2
  return target, mean, covariance


def test_map_and_low_rank_laplace_are_exact_for_a_linear_gaussian_latent():
  target, mean, covariance = _linear_gaussian()
  locs, values = tfc.initialization.find_map(target, num_starts=2, max_iterations=100)
  np.testing.assert_allclose(locs[0], mean, atol=2e-3)
  assert values[0] >= values[1]
  # The likelihood's curvature has rank 12: a rank-12 approximation is the exact covariance.
  laplace = tfc.initialization.laplace_low_rank(target, locs[0], rank=12)
  np.testing.assert_allclose(laplace.covariance(), covariance, atol=1e-5)
  np.testing.assert_allclose(laplace.variance(), np.diag(covariance), atol=1e-5)
  np.testing.assert_allclose(laplace.log_det_covariance(), np.linalg.slogdet(covariance)[1],
                             atol=1e-3)
  # Rank 4 misses directions: covariance wider than the posterior's there.
  coarse = tfc.initialization.laplace_low_rank(target, locs[0], rank=4)
  assert coarse.log_det_covariance() > laplace.log_det_covariance() + 1.
  # The exact Gaussian has the best ELBO of its rescalings; its samples have covariance Sigma.
  fitted, _ = tfc.initialization.fit_laplace_scales(target, laplace)
  assert (fitted.complement_variance, fitted.span_variance) == (1., 1.)
  shrunk = tfc.initialization.LowRankLaplace(
      laplace.loc, laplace.base_precision, laplace.eigenvectors, laplace.eigenvalues,
      laplace.value, complement_variance=0.1, span_variance=0.5)
  refitted, _ = tfc.initialization.fit_laplace_scales(target, shrunk)
  assert (refitted.complement_variance, refitted.span_variance) == (1., 1.)
  draws = laplace.sample(np.random.RandomState(1).randn(20000, 300))
  # Monte Carlo error of a sample variance: sqrt(2 / n) = 1 % relative; 0.06 is 4 of them.
  np.testing.assert_allclose(draws.var(axis=0), np.diag(covariance), rtol=0.06)


@pytest.mark.parametrize("bad", [0, 2.5, True])
def test_find_map_and_laplace_echo_bad_arguments(bad):
  target, mean, _ = _linear_gaussian(dim=8, num_obs=2)
  with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
    tfc.initialization.find_map(target, num_starts=bad)
  with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
    tfc.initialization.laplace_low_rank(target, mean, rank=bad)


@pytest.fixture(scope="module")
def digits_problem():
  """Inpainting the shipped 8x8 digits prior (64 latent dims): lower half missing."""
  prior = tfc.priors.load("digits8x8")
  truth = prior.sample(1, seed=[3, 4])[0].numpy().clip(0., 1.)
  observed = np.ones([8, 8, 1], bool)
  observed[4:] = False
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Mask(observed), scale=0.05)
  y = likelihood.sample(truth[None], seed=[0, 1])[0]
  return prior, likelihood, y


def _elbo(posterior, num_seeds=4):
  """`-loss(256)` per fixed seed: (mean, standard error)."""
  values = np.array([-float(posterior.loss(batch_size=256, seed=[s, 0]))
                     for s in range(num_seeds)])
  return values.mean(), values.std(ddof=1) / np.sqrt(num_seeds)


def _mean_target(posterior, n=512):
  z, _ = posterior.latent_sample_and_log_prob(n, seed=[9, 9])
  values = posterior.target.log_prob(z).numpy()
  values = values[np.isfinite(values)]
  return values.mean(), values.std(ddof=1) / np.sqrt(values.size)


def test_map_start_raises_the_latent_target_over_the_prior_start(digits_problem):
  posterior = tfc.ComposedPosterior(*digits_problem, num_components=1)
  before, se_before = _mean_target(posterior)
  posterior.initialize_map(seed=0)
  after, se_after = _mean_target(posterior)
  assert bool(posterior.initialized.numpy())
  # The stage sits at the L-BFGS optimum, which beats the prior's mode.
  shift = tfc.pregenerators.find_affine_stage(posterior.pregenerator).shift.numpy()
  np.testing.assert_allclose(shift, posterior.map_start.loc, atol=1e-5)
  at_zero = float(posterior.target.flat_log_prob(np.zeros([1, 64], np.float32))[0])
  assert posterior.map_start.value > at_zero + 10.
  assert after > before + 10. * np.hypot(se_before, se_after), (before, after)


def test_large_latent_defaults_are_the_documented_ones():
  assert posterior_lib.large_latent_defaults(784) == {
      "num_steps": 1800, "batch_size": 16, "init": "map", "jit_compile": False,
      "path_gradient": True}
  assert posterior_lib.large_latent_defaults(3072)["num_steps"] == 460
  assert posterior_lib.large_latent_defaults(300)["num_steps"] == 2000
  assert posterior_lib.large_latent_defaults(10**6)["num_steps"] == 200
  assert posterior_lib.fit_defaults(784) == posterior_lib.large_latent_defaults(784)
  assert posterior_lib.fit_defaults(256) == {
      "num_steps": 2000, "batch_size": 64, "init": "laplace", "jit_compile": None,
      "path_gradient": False}
  with pytest.raises(ValueError, match="-3"):
    posterior_lib.large_latent_defaults(-3)


def test_fit_passes_the_large_latent_defaults_to_training(monkeypatch):
  target, _, _ = _linear_gaussian(dim=300, num_obs=4)
  posterior = tfc.ComposedPosterior(target.prior, target.likelihood, target.observation,
                                    pregenerator=tfc.pregenerators.affine([300]),
                                    num_components=1)
  calls = []
  monkeypatch.setattr(posterior, "initialize_map",
                      lambda seed, deadline: calls.append(("map", seed, deadline)))
  monkeypatch.setattr(posterior, "initialize",
                      lambda seed, deadline: calls.append(("laplace", seed, deadline)))
  seen = {}

  def fake_fit(objective, variables, num_steps, jit_compile, on_fresh_start, **kwargs):
    del variables, kwargs
    seen.update(num_steps=num_steps, batch_size=objective.batch_size, jit_compile=jit_compile,
                path_gradient=objective.path_gradient)
    on_fresh_start()
    return tfc.training.StepHistory()

  monkeypatch.setattr(tfc.training, "fit", fake_fit)
  posterior.fit(seed=3, verbose=0)
  assert seen == {"num_steps": 2000, "batch_size": 16, "jit_compile": False,
                  "path_gradient": True}
  assert calls == [("map", 3, None)]
  posterior.fit(num_steps=7, batch_size=4, jit_compile=True, init="laplace", seed=1,
                verbose=0)
  assert seen == {"num_steps": 7, "batch_size": 4, "jit_compile": True,
                  "path_gradient": True}
  posterior.fit(num_steps=7, path_gradient=False, init=None, verbose=0)
  assert not seen["path_gradient"]
  assert calls[-1] == ("laplace", 1, None)
  # Under a time limit the large-latent start gets a deadline: 40% of the limit.
  before = time.perf_counter()
  posterior.fit(init="map", time_limit=100., check_weights=False, seed=2, verbose=0)
  name, seed, deadline = calls[-1]
  assert (name, seed) == ("map", 2)
  assert before + 39. < deadline < time.perf_counter() + 40.


def test_fit_defaults_on_an_image_prior_improve_the_elbo_over_the_start(digits_problem,
                                                                         monkeypatch):
  # The 64-dim digits latent takes the large-latent path (MAP start, batches of 16).
  monkeypatch.setattr(posterior_lib, "LARGE_LATENT_SIZE", 32)
  posterior = tfc.ComposedPosterior(*digits_problem)
  posterior.initialize_map(seed=0)
  start, se_start = _elbo(posterior)
  history = posterior.fit(num_steps=200, seed=0, verbose=0)
  assert len(history.history["loss"]) == 200
  end, se_end = _elbo(posterior)
  assert end > start + 10. * np.hypot(se_start, se_end), (start, end)


def _rosenbrock(z):
  """Batched Rosenbrock function and gradient: L-BFGS needs many iterations on it."""
  with tf.GradientTape() as tape:
    tape.watch(z)
    value = tf.reduce_sum(100. * (z[:, 1:] - z[:, :-1]**2)**2 + (1. - z[:, :-1])**2, axis=-1)
  return value, tape.gradient(value, z)


class _TickingClock:
  """A fake search clock that advances one second at every reading."""

  def __init__(self):
    self.time = 0.

  def __call__(self):
    self.time += 1.
    return self.time


_EXACT = dict(num_correction_pairs=10, f_relative_tolerance=0., tolerance=0., x_tolerance=0.)


def test_lbfgs_in_chunks_is_one_lbfgs_call():
  # Chunks resume L-BFGS's state: 30 iterations in chunks of 10 end where one call of 30 does.
  starts = tf.constant(np.random.RandomState(0).randn(3, 6) * 0.5, tf.float64)
  whole = tfp.optimizer.lbfgs_minimize(_rosenbrock, initial_position=starts,
                                       max_iterations=30, **_EXACT)
  assert int(whole.num_iterations) == 30  # Not converged: every chunk ran.
  parts = tfc.initialization._lbfgs_in_chunks(  # pylint: disable=protected-access
      _rosenbrock, starts, 30, _EXACT, deadline=time.perf_counter() + 600., chunk=10)
  np.testing.assert_allclose(parts, whole.position, rtol=1e-10, atol=1e-10)


def test_lbfgs_that_cannot_finish_stops_at_the_first_untraced_chunk(monkeypatch):
  # Each clock reading takes a second: the second chunk (the first that did not trace) runs
  # 10 iterations in 1 s, so the 180 left need 18 s; with 15 s to the deadline the search
  # stops there (at 6 s), long before passing the deadline.
  clock = _TickingClock()
  monkeypatch.setattr(tfc.initialization, "_now", clock)
  starts = tf.constant(np.random.RandomState(0).randn(3, 6) * 0.5, tf.float64)
  with pytest.raises(tfc.initialization.SearchTimeout, match="180 L-BFGS iterations left"):
    tfc.initialization._lbfgs_in_chunks(  # pylint: disable=protected-access
        _rosenbrock, starts, 200, _EXACT, deadline=15., chunk=10)
  assert clock.time < 15.


def test_a_map_start_out_of_time_leaves_q_at_the_prior():
  target, _, _ = _linear_gaussian(dim=300, num_obs=4)
  posterior = tfc.ComposedPosterior(target.prior, target.likelihood, target.observation)
  posterior.initialize_map(seed=0, deadline=0.)  # Passed before the first iteration.
  assert posterior.modes_found is None and bool(posterior._from_prior.numpy())  # pylint: disable=protected-access
  assert bool(posterior.initialized.numpy())
  stage = tfc.pregenerators.find_affine_stage(posterior.pregenerator)
  np.testing.assert_allclose(stage.shift.numpy(), np.zeros(300))
  posterior.initialize_map(seed=0, deadline=time.perf_counter() + 600.)
  assert posterior.modes_found == 1 and not bool(posterior._from_prior.numpy())  # pylint: disable=protected-access
