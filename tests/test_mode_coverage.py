"""`fit()`'s defaults against exact posteriors with many modes and curved ones (`tfc.problems`).

Every fit uses the defaults plus a seed. Scores use 4,000 draws of `q`:

* KL(q || p): Monte Carlo standard error 0.003 to 0.007 nats here; the bounds (0.1 for the
  bimodal blocks, measured 0.013; 0.15 for the curved ones, measured 0.07) leave ten of
  them, and stay under the D = 16 target of 0.3 nats.
* energy ratio (energy distance to exact draws over its exact-vs-exact floor): 1 for exact
  draws with a standard error of about 0.15 here; the bound is the target, 3.
* mode masses `P(x_{b,1} > 0 | y)`: an exact sampler's error is at most
  `sqrt(0.25 / 4000) = 0.008` per block; the bound 0.05 is six of them.

The bounds can fail: without the annealing (`anneal_steps=0` as the default), the bimodal
test measured KL 0.37 nats and an energy ratio of 46.
"""

import numpy as np
import pytest

import tfp_composed as tfc

NUM_SAMPLES = 4000


def _score(problem, posterior):
  x, log_q = posterior.experimental_sample_and_log_prob(NUM_SAMPLES, seed=1)
  score = problem.score(x.numpy(), log_q.numpy(), seed=0)
  print({k: v for k, v in score.items() if np.isscalar(v)})
  return score


def _check(score, kl_bound=0.1):
  assert score["nonfinite_fraction"] == 0., score["nonfinite_fraction"]
  assert score["kl"] < kl_bound, (score["kl"], score["kl_stderr"])
  assert score["energy_ratio"] < 3., (score["energy_ratio"], score["energy_ratio_stderr"])
  if "mode_masses" in score:
    np.testing.assert_array_less(np.abs(score["mode_masses"] - score["exact_mode_masses"]),
                                 0.05)


@pytest.fixture(scope="module")
def bimodal():
  return tfc.problems.get("bimodal_blocks", num_blocks=2)


def test_bimodal_blocks_keep_every_mode_with_its_mass(bimodal):
  posterior = tfc.ComposedPosterior(bimodal.prior, bimodal.likelihood, bimodal.observation)
  posterior.fit(seed=0, verbose=0)
  assert posterior.modes_found > 1  # The start is the prior, annealed from weight 0.
  assert posterior.diagnosis["adequate"], posterior.diagnosis
  _check(_score(bimodal, posterior))


def test_training_from_the_prior_finds_the_modes(bimodal):
  """`init=None`: no mode search; the training alone (annealing from the prior) covers
  all four modes with their masses."""
  posterior = tfc.ComposedPosterior(bimodal.prior, bimodal.likelihood, bimodal.observation)
  posterior.fit(seed=1, verbose=0, init=None)
  assert not bool(posterior.initialized.numpy())
  _check(_score(bimodal, posterior))


def test_modes_along_turned_latent_axes_are_kept():
  """4 bimodal blocks turned by a rotation of the latent (`x = f(R z)`): no latent coordinate
  separates the 16 modes. The start's mode axes (`tfc.initialization.mode_axes`) turn the
  base onto them, and every block keeps both modes with its mass (without the axes a block
  keeps one mode: `test_diagnostics.py`, mode-mass error above 0.2)."""
  problem = tfc.problems.latent_rotated_bimodal_blocks(num_blocks=4, grid_size=128)
  posterior = tfc.ComposedPosterior(problem.prior, problem.likelihood, problem.observation)
  posterior.fit(seed=0, verbose=0)
  assert posterior.modes_found > 1
  axes = tfc.pregenerators.find_affine_stage(posterior.pregenerator).axes.numpy()
  turned = problem.latent_rotation.T[:, 0::2]  # The blocks' bimodal axes `R^T e_{2b-1}`.
  np.testing.assert_array_less(0.99, np.abs(turned.T @ axes).max(axis=1))
  assert "misses a mode" not in posterior.diagnosis["message"]
  _check(_score(problem, posterior))


def test_curved_nonlinear_blocks():
  problem = tfc.problems.get("nonlinear_blocks", num_blocks=2)
  posterior = tfc.ComposedPosterior(problem.prior, problem.likelihood, problem.observation)
  posterior.fit(seed=0, verbose=0)
  assert posterior.modes_found == 1  # A Laplace start, no annealing.
  _check(_score(problem, posterior), kl_bound=0.15)


def test_linear_gaussian_64_is_exact_without_training():
  """Issue target (c): KL <= 0.02 at D = 64. The Laplace start is the posterior (the base's
  mixtures add 3e-4 nats), the start's importance check says so and `fit` trains no step;
  the KL bound 0.02 is 20 standard errors (~0.001) above the measured value (~0)."""
  problem = tfc.problems.get("linear_gaussian_64")
  posterior = tfc.ComposedPosterior(problem.prior, problem.likelihood, problem.observation)
  history = posterior.fit(seed=0, verbose=0)
  assert history.exact_start and posterior.modes_found == 1
  _check(_score(problem, posterior), kl_bound=0.02)


def test_a_poor_fit_is_reported_with_its_refinement(bimodal):
  """Reverse KL from one Laplace mode, briefly: most mass of the other modes is missing and
  `fit` warns, naming SIR and NeuTra HMC."""
  posterior = tfc.ComposedPosterior(bimodal.prior, bimodal.likelihood, bimodal.observation,
                                    base="normal")
  with pytest.warns(UserWarning, match="composed_sir"):
    posterior.fit(seed=0, verbose=0, num_steps=40, init=None, anneal_steps=0,
                  forward_weight=0.)
  assert not posterior.diagnosis["adequate"]
  assert posterior.diagnosis["ess_fraction"] < 0.1
