"""Inverse problems with exact answers, shared by the tests.

* `linear_gaussian`: prior `x = L z + mu`, observation `y = A x + noise`: the posterior is
  Gaussian with a closed form.
* `banana_prior`: a non-Gaussian 2-D flow prior with variables; `grid_posterior` normalizes
  any 2-D posterior density on a fine grid, which gives the exact posterior up to grid error.
"""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

tfb = tfp.bijectors
tfd = tfp.distributions


class LinearGaussian:
  """`x = L z + mu`, `z ~ N(0, I)`; `y = A x + N(0, s^2 I)`."""

  def __init__(self, dim, num_obs, noise, seed=0, matrix=None):
    rng = np.random.RandomState(seed)
    # Prior scales spanning two decades, with correlations.
    self.L = np.tril(rng.randn(dim, dim) * 0.3, -1) + np.diag(np.exp(rng.uniform(-2.3, 2.3, dim)))
    self.mu = rng.randn(dim)
    self.A = rng.randn(num_obs, dim) if matrix is None else np.asarray(matrix, np.float64)
    self.noise = noise
    self.x_true = self.L @ rng.randn(dim) + self.mu
    self.y = self.A @ self.x_true + noise * rng.randn(self.A.shape[0])
    self.prior = tfd.TransformedDistribution(
        tfd.MultivariateNormalDiag(tf.zeros(dim), tf.ones(dim)),
        tfb.Chain([tfb.Shift(tf.Variable(self.mu, dtype=tf.float32)),
                   tfb.ScaleMatvecTriL(tf.Variable(self.L, dtype=tf.float32))]))
    prior_cov = self.L @ self.L.T
    precision = np.linalg.inv(prior_cov) + self.A.T @ self.A / noise**2
    self.cov = np.linalg.inv(precision)
    self.mean = self.cov @ (np.linalg.solve(prior_cov, self.mu) + self.A.T @ self.y / noise**2)

  def exact(self):
    return tfd.MultivariateNormalTriL(self.mean, tf.linalg.cholesky(self.cov))


def mc_kl(posterior, exact_log_prob, num_samples=20000, seed=7):
  """Monte Carlo `KL(q || p) = E_q[log q(x) - log p(x)]` and its standard error."""
  x, log_q = posterior.experimental_sample_and_log_prob(num_samples, seed=seed)
  diff = log_q.numpy().astype(np.float64) - exact_log_prob(x.numpy().astype(np.float64))
  return diff.mean(), diff.std() / np.sqrt(num_samples), x.numpy()


class _Banana(tfb.Bijector):
  """`x1 = z1`, `x2 = z2 + a z1^2 - b`: volume-preserving, a curved 2-D density."""

  def __init__(self, a=0.5, b=1.0):
    parameters = dict(locals())
    self.a, self.b = a, b
    super().__init__(forward_min_event_ndims=1, is_constant_jacobian=True,
                     parameters=parameters, name="banana")

  def _forward(self, z):
    z1, z2 = tf.unstack(z, axis=-1)
    return tf.stack([z1, z2 + self.a * z1**2 - self.b], axis=-1)

  def _inverse(self, x):
    x1, x2 = tf.unstack(x, axis=-1)
    return tf.stack([x1, x2 - self.a * x1**2 + self.b], axis=-1)

  def _forward_log_det_jacobian(self, z):
    return tf.zeros([], z.dtype)


def banana_prior(shift=(0.3, 0.0)):
  """A 2-D non-Gaussian flow prior: SinhArcsinh skew, a banana bend and a trainable shift."""
  return tfd.TransformedDistribution(
      tfd.MultivariateNormalDiag(tf.zeros(2), tf.ones(2)),
      tfb.Chain([tfb.Shift(tf.Variable(shift, dtype=tf.float32, name="prior_shift")),
                 _Banana(),
                 tfb.SinhArcsinh(skewness=tf.Variable([0.3, 0.], name="prior_skew"),
                                 tailweight=[1.2, 1.0])]))


class GridPosterior:
  """A 2-D posterior `p(x | y) ~ p(x) p(y | x)` normalized on a uniform grid."""

  def __init__(self, prior, likelihood, observation, lo=(-6., -8.), hi=(6., 10.), n=1001):
    xs = np.linspace(lo[0], hi[0], n)
    ys = np.linspace(lo[1], hi[1], n)
    self.cell = (xs[1] - xs[0]) * (ys[1] - ys[0])
    grid = np.stack(np.meshgrid(xs, ys, indexing="ij"), -1).reshape(-1, 2)
    self.lo, self.hi = np.array(lo), np.array(hi)
    self.prior, self.likelihood = prior, likelihood
    self.observation = tf.constant(observation, tf.float32)
    log_unnorm = self.unnormalized(grid)
    m = log_unnorm.max()
    self.log_z = m + np.log(np.exp(log_unnorm - m).sum() * self.cell)
    self.grid = grid
    self.density = np.exp(log_unnorm - self.log_z)
    # The grid must hold essentially all the mass: the boundary carries none.
    edge = self.density.reshape(n, n)
    assert max(edge[0].max(), edge[-1].max(), edge[:, 0].max(), edge[:, -1].max()) < 1e-6 * \
        self.density.max(), "grid too small"

  def unnormalized(self, x):
    x = tf.constant(x, tf.float32)
    return (self.prior.log_prob(x) + self.likelihood.log_prob(self.observation, x)).numpy() \
        .astype(np.float64)

  def log_prob(self, x):
    return self.unnormalized(x) - self.log_z

  def mass(self, predicate):
    return float(self.density[predicate(self.grid)].sum() * self.cell)
