"""The latent target: rows independent, batched observations, the mode search on it."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import problems
import tfp_composed as tfc

tfd = tfp.distributions


@pytest.fixture(scope="module")
def gaussian_problem():
  return problems.LinearGaussian(dim=4, num_obs=3, noise=0.3, seed=1)


def _target(problem, observation=None):
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Linear(problem.A.astype(np.float32)),
                                        scale=problem.noise)
  y = problem.y.astype(np.float32) if observation is None else observation
  return tfc.targets.LatentTarget(problem.prior, likelihood, y)


def test_target_is_the_closed_form_latent_posterior(gaussian_problem):
  p = gaussian_problem
  target = _target(p)
  z = np.random.RandomState(0).randn(7, 4).astype(np.float32)
  x = z @ p.L.T + p.mu
  expected = (-0.5 * np.sum(z**2, -1) - 2. * np.log(2 * np.pi)
              - 0.5 * np.sum((p.y - x @ p.A.T)**2, -1) / p.noise**2
              - 3 * np.log(p.noise * np.sqrt(2 * np.pi)))
  np.testing.assert_allclose(target.log_prob(z).numpy(), expected, rtol=1e-4, atol=1e-3)
  # Tempering: the likelihood term scales with its weight.
  log_prior, log_likelihood, _ = target.log_prob_parts(z)
  np.testing.assert_allclose(target.log_prob(z, 0.25).numpy(),
                             (log_prior + 0.25 * log_likelihood).numpy(), rtol=1e-6)


def test_rows_are_independent(gaussian_problem):
  target = _target(gaussian_problem)
  z = np.random.RandomState(1).randn(16, 4).astype(np.float32)
  z[3] = np.nan  # A bad row changes nothing for the others.
  batch = target.log_prob(z).numpy()
  single = np.array([target.log_prob(z[i:i + 1]).numpy()[0] for i in range(16)])
  np.testing.assert_array_equal(np.isnan(batch), np.isnan(single))
  keep = ~np.isnan(single)
  np.testing.assert_allclose(batch[keep], single[keep], rtol=1e-6)


def test_batched_observations_broadcast(gaussian_problem):
  p = gaussian_problem
  ys = np.stack([p.y, p.y + 1., p.y - 2.]).astype(np.float32)  # [3] + event
  batched = _target(p, ys)
  assert batched.observation_batch_shape == [3]
  z = np.random.RandomState(2).randn(5, 1, 4).astype(np.float32)
  values = batched.log_prob(z).numpy()  # [5, 3]
  assert values.shape == (5, 3)
  for j in range(3):
    np.testing.assert_allclose(values[:, j], _target(p, ys[j]).log_prob(z[:, 0]).numpy(),
                               rtol=1e-6)


def test_find_modes_is_exact_for_a_linear_gaussian(gaussian_problem):
  p = gaussian_problem
  found = tfc.initialization.find_modes(_target(p), num_components=2, seed=0)
  assert found.num_modes == 1  # Unimodal: every start lands in the same basin.
  mean, cov = found.moments()
  # Latent posterior of z: x = L z + mu is affine, so z | y is Gaussian with these moments.
  latent_cov = np.linalg.inv(np.eye(4) + (p.A @ p.L).T @ (p.A @ p.L) / p.noise**2)
  latent_mean = latent_cov @ (p.A @ p.L).T @ (p.y - p.A @ p.mu) / p.noise**2
  np.testing.assert_allclose(mean, latent_mean, atol=2e-3)
  np.testing.assert_allclose(cov, latent_cov, atol=2e-3)


def test_find_modes_separates_two_modes():
  # z ~ N(0, I_2), y = z1^2 + N(0, 0.1^2) at y = 4: modes at z1 = +-2 of equal mass.
  prior = tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(2), tf.ones(2)),
                                      tfp.bijectors.Identity())
  op = tfc.operators.Lambda(lambda x: x[..., :1]**2, output_shape=[1], input_shape=[2])
  target = tfc.targets.LatentTarget(prior, tfc.likelihoods.Gaussian(op, 0.1), [4.])
  found = tfc.initialization.find_modes(target, num_components=4, seed=0)
  assert found.num_modes == 2
  np.testing.assert_allclose(np.sort(found.locs[:, 0]), [-2., 2.], atol=0.05)
  np.testing.assert_allclose(np.exp(found.log_weights), [0.5, 0.5], atol=0.1)


def test_latent_importance_weights_match_ambient_ones():
  # log p(x, y) - log q(x) computed in ambient space (inverting f and g) equals the latent
  # weight target(z) - log q(z) from forward passes only: the Jacobian of f cancels.
  prior = problems.banana_prior()
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Mask([True, False]), scale=0.3)
  posterior = tfc.ComposedPosterior(prior, likelihood, [0.5], num_components=2)
  rng = np.random.RandomState(0)
  for v in posterior.trainable_variables:
    v.assign(v + 0.05 * rng.randn(*v.shape).astype(np.float32))
  z, log_q_z = posterior.latent_sample_and_log_prob(64, seed=[1, 2])
  latent = posterior.target.log_prob(z) - log_q_z
  x = prior.bijector.forward(z)
  ambient = (prior.log_prob(tf.identity(x)) + likelihood.log_prob(posterior.observation, x)
             - posterior.log_prob(tf.identity(x)))
  np.testing.assert_allclose(latent.numpy(), ambient.numpy(), rtol=1e-4, atol=1e-4)
