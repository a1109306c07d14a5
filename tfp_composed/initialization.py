"""Mode search and Laplace starts on a latent target.

`find_modes(target, num_components, seed)` locates the distinct local maxima of a latent
target `t(z) = log p_base(z) + log p(y | f(z))` (`tfc.targets.LatentTarget`) and fits a
Gaussian mixture to them:

    q_0(z) = sum_k w_k N(z; mu_k, Sigma_k),   Sigma_k ~= (-grad^2 t(mu_k))^{-1},   w_k ~ Z_k,

where `Z_k` is each mode's evidence estimated by importance sampling. `ComposedPosterior`
assigns the result to its pre-generator's affine stage and its base mixture. For a
linear-Gaussian problem this is the exact posterior.
"""

import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

__all__ = ["ModeMixture", "find_modes"]

_NEWTON_MAX_DIM = 16
# Above this many latent dimensions `find_modes` uses fewer starts and one Hessian per mode
# (each Hessian costs `size` Hessian-vector products).
_LARGE_DIM = 256


@dataclasses.dataclass
class ModeMixture:
  """A Gaussian mixture over flat latents found by `find_modes` (NumPy, float64).

  Attributes:
    locs: `[M, D]` mode locations, best first.
    covariances: `[M, D, D]` Laplace covariances (shrunk where that raises their ELBO).
    log_weights: `[M]` normalized log mixture weights (log evidence of each mode).
    values: `[M]` target values at the modes.
  """
  locs: np.ndarray
  covariances: np.ndarray
  log_weights: np.ndarray
  values: np.ndarray

  @property
  def num_modes(self):
    return int(self.locs.shape[0])

  def moments(self):
    """Mean `[D]` and covariance `[D, D]` of the mixture."""
    w = np.exp(self.log_weights)
    mean = np.einsum("k,kd->d", w, self.locs)
    centred = self.locs - mean
    second = self.covariances + np.einsum("ki,kj->kij", centred, centred)
    covariance = np.einsum("k,kij->ij", w, second)
    return mean, 0.5 * (covariance + covariance.T)


def find_modes(target, num_components, seed=0, num_starts=None, num_steps=500):
  """Multi-start mode search with Laplace approximations at the distinct modes.

  1. `num_starts` points (default `max(16, 4 K)`, `2 K` above 256 latent dimensions) drawn
     from the prior's base climb the target (batched Adam, `num_steps` steps, then damped
     Newton steps for up to 16 dimensions).
  2. Distinct local maxima `mu_k` (greedily, best first; a point joined to a kept mode by a
     segment that never dips 1 nat below its lower end is a duplicate), at most `K`, get
     Laplace approximations `N(mu_k, H_k^{-1})` with `H_k` the negative Hessian (autodiff),
     shrunk where that raises their ELBO (curved modes), with weights `w_k ~ Z_k`, each mode's
     evidence estimated by importance sampling; modes under 1e-3 of the best weight go.

  Args:
    target: a `tfc.targets.LatentTarget`.
    num_components: `K`, the most modes to keep.
    seed: int seed.
    num_starts: number of starting points.
    num_steps: Adam steps of the ascent.

  Returns:
    A `ModeMixture`.
  """
  dtype = target.dtype
  size = target.latent_size
  flat_target = target.flat_log_prob
  large = size > _LARGE_DIM
  if num_starts is None:
    num_starts = 2 * num_components if large else max(16, 4 * num_components)
  draws = target.prior.distribution.sample(max(256, num_starts),
                                           seed=tfp.random.sanitize_seed(seed))
  draws = tf.reshape(tf.cast(draws, dtype), [-1, size])
  starts = draws[:num_starts]
  # No latent posterior is taken to be wider than the prior's base: curvature is floored at
  # half the base's average precision (non-convex likelihoods can make it vanish).
  min_precision = 0.5 / float(np.mean(np.var(draws.numpy().astype(np.float64), axis=0)))
  modes, values = _ascend(flat_target, starts, num_steps)
  modes, values = modes.numpy().astype(np.float64), values.numpy().astype(np.float64)
  if size <= _NEWTON_MAX_DIM:  # Ridges and stiff directions: curvature-aware ascent.
    modes, values = _newton_ascent(flat_target, modes, values, dtype, min_precision)
  finite = np.isfinite(values) & np.all(np.isfinite(modes), axis=-1)
  if not finite.any():
    raise FloatingPointError(
        "The latent target is not finite at any of the optimized starting points; check "
        "the observation, the likelihood's scale and the prior.")
  order = [i for i in np.argsort(-values) if finite[i]]
  derivatives = _compiled_derivatives(flat_target)
  selected = []  # (mode, value, covariance, log evidence)
  for i in order:
    if len(selected) == num_components:
      break
    mu = modes[i]
    if any(_same_basin(flat_target, mu, values[i], m, v, dtype) for m, v, _, _ in selected):
      continue
    mu, value, _, covariance, _ = _laplace(
        flat_target, derivatives, mu, float(values[i]), dtype, min_precision,
        newton_steps=0 if large else 3)
    # A curved mode gets a narrower Gaussian; its weight is its estimated evidence.
    covariance, log_evidence = _fit_gaussian_scale(
        flat_target, mu, covariance, dtype, seed + len(selected))
    if not np.isfinite(log_evidence):
      continue
    selected.append((mu, value, covariance, log_evidence))
  if not selected:
    raise FloatingPointError(
        "No mode of the latent target has a finite Laplace evidence bound; check the "
        "observation, the likelihood's scale and the prior.")
  best = max(entry[3] for entry in selected)
  # Modes below 1e-3 of the best weight are dropped: they would only add noise.
  selected = [entry for entry in selected if entry[3] > best - 7.]
  log_w = np.array([entry[3] for entry in selected])
  return ModeMixture(
      locs=np.stack([entry[0] for entry in selected]),
      covariances=np.stack([entry[2] for entry in selected]),
      log_weights=log_w - np.logaddexp.reduce(log_w),
      values=np.array([entry[1] for entry in selected]))


def _ascend(target, starts, num_steps, learning_rate=0.1):
  """Batched Adam ascent of `target` from each row of `starts`: (positions, values).

  Adam's per-coordinate step normalization copes with the stiff directions of
  near-hard constraints; the learning rate decays geometrically to 1% of its initial value.
  Each row is an independent optimization.
  """

  @tf.function
  def ascend(z):
    m = tf.zeros_like(z)
    v = tf.zeros_like(z)
    for i in tf.range(num_steps):
      with tf.GradientTape() as tape:
        tape.watch(z)
        value = tf.reduce_sum(target(z))
      g = tape.gradient(value, z)
      g = tf.where(tf.math.is_finite(g), g, tf.zeros_like(g))
      t = tf.cast(i + 1, z.dtype)
      m = 0.9 * m + 0.1 * g
      v = 0.999 * v + 0.001 * tf.square(g)
      rate = learning_rate * tf.pow(tf.constant(0.01, z.dtype), (t - 1.) / num_steps)
      step = rate * (m / (1. - 0.9**t)) / (tf.sqrt(v / (1. - 0.999**t)) + 1e-8)
      z = z + step
    return z, target(z)

  return ascend(starts)




def _newton_ascent(target, z, values, dtype, min_precision, num_iterations=25):
  """Batched damped Newton ascent (full Hessians; small latent dimensions only).

  Each step solves with the negative Hessian whose eigenvalues are floored at
  `min_precision`, and keeps the best of five step lengths that increases the target.
  """

  @tf.function
  def gradient_and_hessian(points):
    with tf.GradientTape() as outer:
      outer.watch(points)
      with tf.GradientTape() as inner:
        inner.watch(points)
        value = tf.reduce_sum(target(points))
      grad = inner.gradient(value, points)
    return grad, outer.batch_jacobian(grad, points)

  lengths = np.array([1., 0.5, 0.25, 0.1, 0.03])
  for _ in range(num_iterations):
    grad, hess = gradient_and_hessian(tf.constant(z, dtype))
    grad = grad.numpy().astype(np.float64)
    precision = -hess.numpy().astype(np.float64)
    precision = 0.5 * (precision + np.swapaxes(precision, -1, -2))
    eigvals, eigvecs = np.linalg.eigh(precision)
    eigvals = np.clip(eigvals, min_precision, None)
    step = np.einsum("nij,nj->ni", eigvecs,
                     np.einsum("nji,nj->ni", eigvecs, grad) / eigvals)
    step = np.where(np.isfinite(step), step, 0.)
    candidates = z[None] + lengths[:, None, None] * step[None]  # [5, N, D]
    cand_values = target(tf.constant(candidates.reshape(-1, z.shape[1]), dtype)).numpy()
    cand_values = np.where(np.isfinite(cand_values), cand_values, -np.inf).reshape(5, -1)
    best = np.argmax(cand_values, axis=0)
    best_values = cand_values[best, np.arange(z.shape[0])]
    improved = best_values > values
    z = np.where(improved[:, None], candidates[best, np.arange(z.shape[0])], z)
    values = np.where(improved, best_values, values)
    if not improved.any():
      break
  return z, values


def _same_basin(target, a, value_a, b, value_b, dtype, barrier=1.):
  """Whether the segment from `a` to `b` stays within `barrier` nats of its lower end."""
  t = np.linspace(0., 1., 11)[1:-1, None]
  path = (1. - t) * a[None] + t * b[None]
  values = target(tf.constant(path, dtype)).numpy().astype(np.float64)
  return bool(np.all(values >= min(value_a, value_b) - barrier))


def _fit_gaussian_scale(target, mean, covariance, dtype, seed, num_samples=128):
  """Shrinks a Laplace Gaussian to fit a curved mode and estimates the mode's evidence.

  For `c` in (1, 1/2, 1/4, 1/10, 1/30), draws `z ~ N(mean, c covariance)` (common random
  numbers) and computes the ELBO `E[target(z)] + entropy` and the importance-sampling
  estimate `log mean exp(target(z) - log N(z))` of the mode's log-evidence. Returns
  `(c covariance, log evidence)` for the `c` with the best ELBO and the largest estimate
  over all `c` (each is a stochastic lower bound on the mode's mass).
  """
  size = mean.shape[0]
  root = np.linalg.cholesky(covariance)
  eps = np.random.RandomState(seed % 2**31).randn(num_samples, size)
  factors = np.array([1., 0.5, 0.25, 0.1, 1. / 30.])
  z = mean + np.sqrt(factors)[:, None, None] * (eps @ root.T)[None]  # [5, n, D]
  values = target(tf.constant(z.reshape(-1, size), dtype)).numpy().astype(np.float64)
  values = np.where(np.isfinite(values), values, -np.inf).reshape(len(factors), num_samples)
  log_norm = (-0.5 * np.sum(eps**2, axis=-1) - 0.5 * size * np.log(2 * np.pi)
              - np.sum(np.log(np.diag(root))))[None] - 0.5 * size * np.log(factors)[:, None]
  entropy = (0.5 * size * np.log(2 * np.pi * np.e) + np.sum(np.log(np.diag(root)))
             + 0.5 * size * np.log(factors))
  elbos = values.mean(axis=1) + entropy
  log_weights = values - log_norm
  log_evidence = np.logaddexp.reduce(log_weights, axis=1) - np.log(num_samples)
  best = int(np.nanargmax(np.where(np.isfinite(elbos), elbos, -np.inf)))
  return factors[best] * covariance, float(np.max(log_evidence))


def _hessian_vector_products(target, z, vectors):
  """Rows `H(z) v_i` for the rows `v_i` of `vectors`, by reverse-over-reverse autodiff."""
  points = tf.tile(z[tf.newaxis], [tf.shape(vectors)[0], 1])
  with tf.GradientTape() as outer:
    outer.watch(points)
    with tf.GradientTape() as inner:
      inner.watch(points)
      value = tf.reduce_sum(target(points))
    grad = inner.gradient(value, points)
    gv = tf.reduce_sum(grad * vectors)
  return outer.gradient(gv, points)


def _compiled_derivatives(target):
  """Compiled Hessian-vector products and gradient of `target` (trace once, reuse per mode)."""
  hvp = tf.function(lambda z, v: _hessian_vector_products(target, z, v), reduce_retracing=True)
  grad_fn = tf.function(lambda z: tfp.math.value_and_gradient(target, z[tf.newaxis])[1][0])
  return hvp, grad_fn


def _laplace(target, derivatives, mu, value, dtype, min_precision, newton_steps=3,
             chunk=128):
  """Laplace approximation at a (polished) mode of `target` near `mu`.

  Up to `newton_steps` damped Newton steps `mu <- mu + P^{-1} grad` refine `mu` (a step is
  kept only if it increases the target). Returns `(mu, value, P, P^{-1}, log det P^{-1})`,
  with `P` the negative Hessian, its eigenvalues clipped below at `min_precision`.
  """
  size = mu.shape[0]
  hvp, grad_fn = derivatives
  eye = np.eye(size)

  def curvature(point):
    rows = [hvp(tf.constant(point, dtype), tf.constant(eye[i:i + chunk], dtype)).numpy()
            for i in range(0, size, chunk)]
    precision = -np.concatenate(rows, axis=0).astype(np.float64)
    precision = 0.5 * (precision + precision.T)
    eigvals, eigvecs = np.linalg.eigh(precision)
    eigvals = np.clip(eigvals, min_precision, None)
    return eigvals, eigvecs

  eigvals, eigvecs = curvature(mu)
  for _ in range(newton_steps):
    grad = grad_fn(tf.constant(mu, dtype))
    candidate = mu + (eigvecs / eigvals) @ (eigvecs.T @ grad.numpy().astype(np.float64))
    new_value = float(target(tf.constant(candidate[None], dtype))[0])
    if not np.isfinite(new_value) or new_value <= value:
      break
    mu, value = candidate, new_value
    eigvals, eigvecs = curvature(mu)
  precision = (eigvecs * eigvals) @ eigvecs.T
  covariance = (eigvecs / eigvals) @ eigvecs.T
  return mu, value, precision, covariance, -np.sum(np.log(eigvals))
