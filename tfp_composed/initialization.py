"""Mode search and Laplace starts on a latent target.

`find_modes(target, num_components, seed)` locates the distinct local maxima of a latent
target `t(z) = log p_base(z) + log p(y | f(z))` (`tfc.targets.LatentTarget`) and fits a
Gaussian mixture to them:

    q_0(z) = sum_k w_k N(z; mu_k, Sigma_k),   Sigma_k ~= (-grad^2 t(mu_k))^{-1},   w_k ~ Z_k,

where `Z_k` is each mode's evidence estimated by importance sampling. `ComposedPosterior`
assigns the result to its pre-generator's affine stage and its base mixture. For a
linear-Gaussian problem this is the exact posterior.

For large latents (images), where a dense Hessian costs `D` Hessian-vector products,
`find_map` climbs the target by batched L-BFGS from a few starts and `laplace_low_rank`
approximates the curvature at the best one by the base's (diagonal) precision plus a
low-rank part of the likelihood's, found by a randomized eigendecomposition [1]:

    Sigma^{-1} ~= D^{1/2} (I + V diag(lambda) V^T) D^{1/2},   D = -diag grad^2 log p_base(z*),

and `fit_laplace_scales` rescales its variance inside and outside the span of `V` by ELBO.

#### References

[1]: Nathan Halko, Per-Gunnar Martinsson, Joel A. Tropp. Finding structure with randomness:
     Probabilistic algorithms for constructing approximate matrix decompositions.
     _SIAM Review_, 53(2), 2011. https://arxiv.org/abs/0909.4061
"""

import dataclasses
import time
import weakref
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_composed import checks

__all__ = ["LowRankLaplace", "ModeMixture", "find_map", "find_modes", "fit_laplace_scales",
           "laplace_low_rank", "mode_axes"]

_NEWTON_MAX_DIM = 16
# Above this many latent dimensions `find_modes` uses fewer starts and one Hessian per mode
# (each Hessian costs `size` Hessian-vector products).
_LARGE_DIM = 256
# Ascent end points kept for checks: target values within this many nats of the best (a mode
# lower by more holds under about 1e-3 of the best one's mass at equal width).
_ASCENT_NATS = 7.


@dataclasses.dataclass
class ModeMixture:
  """A Gaussian mixture over flat latents found by `find_modes` (NumPy, float64).

  Attributes:
    locs: `[M, D]` mode locations, best first.
    covariances: `[M, D, D]` Laplace covariances (shrunk where that raises their ELBO).
    log_weights: `[M]` normalized log mixture weights (log evidence of each mode).
    values: `[M]` target values at the modes.
    ascents: `[N, D]` every start's end point whose target value is within `_ASCENT_NATS`
      (7) of the best, duplicates of a mode included (None when not recorded): local maxima
      that `fit`'s importance check tests `q` against.
  """
  locs: np.ndarray
  covariances: np.ndarray
  log_weights: np.ndarray
  values: np.ndarray
  ascents: Optional[np.ndarray] = None

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


class SearchTimeout(RuntimeError):
  """`find_modes` passed its `deadline` before the search finished."""


def _now():
  """The search's clock (`time.perf_counter`), the clock of every `deadline`."""
  return time.perf_counter()


def _check_deadline(deadline, phase):
  if deadline is not None and _now() > deadline:
    raise SearchTimeout(f"The mode search passed its deadline {phase}.")


class _Pace:
  """The pace of a search's compiled chunks against its `deadline`: the fastest seconds per
  step of the chunks that did not trace, and `SearchTimeout` as soon as the steps left at that
  pace would end past the deadline."""

  def __init__(self, deadline):
    self.deadline = deadline
    self.seconds_per_step = np.inf

  def record(self, start, steps, traced):
    """A chunk of `steps` steps began at `start` (`_now()`); `traced`: it traced first."""
    if not traced and steps:
      self.seconds_per_step = min(self.seconds_per_step, (_now() - start) / steps)

  def check(self, steps_left, what):
    if (steps_left and np.isfinite(self.seconds_per_step)
        and _now() + steps_left * self.seconds_per_step > self.deadline):
      raise SearchTimeout(
          f"The mode search would pass its deadline: {steps_left} {what} left at "
          f"{self.seconds_per_step * 1e3:.3g} ms each, {self.deadline - _now():.3g} s left.")


def find_modes(target, num_components, seed=0, num_starts=None, num_steps=500, deadline=None):
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
    deadline: optional `time.perf_counter()` time; the search raises `SearchTimeout` when it
      finds itself past it (checked every 100 ascent steps, every Newton step and before
      each mode's Laplace fit), and during the ascent as soon as the remaining steps, at the
      pace of its fastest compiled chunk that did not trace, would end past it.

  Returns:
    A `ModeMixture`.
  """
  dtype = target.dtype
  size = target.latent_size
  compiled = _compiled(target)
  large = size > _LARGE_DIM
  if num_starts is None:
    num_starts = 2 * num_components if large else max(16, 4 * num_components)
  draws = target.prior.distribution.sample(max(256, num_starts),
                                           seed=checks.stateless_seed(seed, 1))
  draws = tf.reshape(tf.cast(draws, dtype), [-1, size])
  starts = draws[:num_starts]
  min_precision = _min_precision(draws)
  modes, values = _climb(compiled, starts, num_steps, min_precision, deadline)
  finite = np.isfinite(values) & np.all(np.isfinite(modes), axis=-1)
  if not finite.any():
    raise FloatingPointError(
        "The latent target is not finite at any of the optimized starting points; check "
        "the observation, the likelihood's scale and the prior.")
  order = [i for i in np.argsort(-values) if finite[i]]
  selected = []  # (mode, value, covariance, log evidence)
  for i in order:
    if len(selected) == num_components:
      break
    mu = modes[i]
    if selected and _same_basin(compiled.value, mu, values[i], selected, dtype):
      continue
    _check_deadline(deadline, f"at mode {len(selected) + 1}")
    mu, value, _, covariance, _ = _laplace(
        compiled, mu, float(values[i]), dtype, min_precision, newton_steps=0 if large else 3)
    # A curved mode gets a narrower Gaussian; its weight is its estimated evidence.
    covariance, log_evidence = _fit_gaussian_scale(
        compiled.value, mu, covariance, dtype, seed + len(selected))
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
  near_best = finite & (values >= np.max(values[finite]) - _ASCENT_NATS)
  return ModeMixture(
      locs=np.stack([entry[0] for entry in selected]),
      covariances=np.stack([entry[2] for entry in selected]),
      log_weights=log_w - np.logaddexp.reduce(log_w),
      values=np.array([entry[1] for entry in selected]),
      ascents=modes[near_best])


def _min_precision(draws):
  """No latent posterior is taken to be wider than the prior's base: curvature is floored at
  half the base's average precision (non-convex likelihoods can make it vanish)."""
  return 0.5 / float(np.mean(np.var(draws.numpy().astype(np.float64), axis=0)))


def _climb(compiled, starts, num_steps, min_precision, deadline):
  """Batched Adam ascent from the rows of `starts`, then damped Newton steps for up to 16
  dimensions: (end points, target values), float64 NumPy."""
  modes, values = _ascend(compiled, starts, num_steps, deadline=deadline)
  modes, values = modes.numpy().astype(np.float64), values.numpy().astype(np.float64)
  if starts.shape[-1] <= _NEWTON_MAX_DIM:  # Ridges and stiff directions: curvature-aware.
    modes, values = _newton_ascent(compiled, modes, values, starts.dtype, min_precision,
                                   deadline=deadline)
  return modes, values


class _Compiled:
  """The search's compiled functions of one flat target `[n, D] -> [n]`, each traced once
  for any number of rows: an eager call of a flow prior costs tens of milliseconds, and the
  search makes hundreds (Newton's step lengths, basin checks, evidence estimates).

  `value(z)`; `curvature(z, v)` (`_curvature`: rows' gradients and Hessian-vector
  products, which give the Newton steps' Hessians and the Laplace fits' in chunks);
  `adam_steps(...)` (a chunk of `_ascend`).
  """

  def __init__(self, flat_target, size, dtype):
    self.adam_traced = False  # Whether `adam_steps` has run (and so traced) once.
    rows = tf.TensorSpec([None, size], dtype)
    count = tf.TensorSpec([], tf.int32)
    scalar = tf.TensorSpec([], dtype)
    self.value = tf.function(flat_target, input_signature=[rows])
    self.curvature = tf.function(lambda z, v: _curvature(flat_target, z, v),
                                 input_signature=[rows, rows])
    self.adam_steps = tf.function(
        lambda z, m, v, first, steps, num_steps, rate: _adam_steps(
            flat_target, z, m, v, first, steps, num_steps, rate),
        input_signature=[rows, rows, rows, count, count, scalar, scalar])


# One `_Compiled` per latent target (`find_modes`, then `mode_axes`, reuse its traces); an
# entry goes with its target.
_COMPILED = weakref.WeakKeyDictionary()


def _compiled(target):
  """The `_Compiled` functions of a `LatentTarget`'s `flat_log_prob`."""
  if target not in _COMPILED:
    ref = weakref.ref(target)  # The functions must not keep their own key alive.
    _COMPILED[target] = _Compiled(lambda z: ref().flat_log_prob(z), target.latent_size,
                                  target.dtype)
  return _COMPILED[target]


def mode_axes(target, found, num_starts=None, seed=0, num_steps=500, deadline=None):
  """Orthonormal latent axes along which the local maxima of `target` differ independently.

  A posterior whose modes are independent binary choices (a product of `B` bimodal factors
  has `2^B` modes, `z = c + sum_b s_b d_b`, `s_b` in {0, 1}) is covered by a factorized base
  only along axes that separate the choices: the factors' displacements `d_b`. Here
  `num_starts` more points (default `8 D`) climb the target as in `find_modes`; of their end
  points within `_ASCENT_NATS` of the best (with `found.ascents`), the distinct ones are
  differenced pairwise, and the differences that recur (up to sign, to within 5% of the
  spread's smallest standard deviation) are the displacements: flipping one choice moves
  every mode by the same `d_b`, while a pair of modes differing in several choices is rarer
  than the pairs differing in one. Taken most frequent first, each one that adds a new
  direction (over half its length outside the span of those kept) is kept, up to the rank
  of the end points' spread (directions holding over 1% of the largest variance).

  The result `V` is the orthogonal matrix closest to the identity that has the
  (orthonormalized) displacements as columns: each takes the coordinate axis it is most
  aligned with, and the other columns span the complement as near to their axes as they can.
  `V` is None (keep the identity) when no difference recurs or when every displacement is
  already within cosine 0.9 of its axis.

  Args:
    target: a `tfc.targets.LatentTarget`.
    found: the `ModeMixture` of `find_modes` on `target`.
    num_starts: further starting points (default `8 D`).
    seed: int seed (the starts differ from `find_modes`' at the same seed).
    num_steps: Adam steps of the ascent.
    deadline: optional `time.perf_counter()` time, as in `find_modes`.

  Returns:
    `(V or None, points)`: `V` `[D, D]` and the end points used, `[N, D]`.
  """
  size = target.latent_size
  if num_starts is None:
    num_starts = 8 * size
  draws = target.prior.distribution.sample(max(256, num_starts),
                                           seed=checks.stateless_seed(seed, 2))
  draws = tf.reshape(tf.cast(draws, target.dtype), [-1, size])
  ends, values = _climb(_compiled(target), draws[:num_starts], num_steps,
                        _min_precision(draws), deadline)
  finite = np.isfinite(values) & np.all(np.isfinite(ends), axis=-1)
  best = max(np.max(values[finite], initial=-np.inf), float(np.max(found.values)))
  points = ends[finite & (values >= best - _ASCENT_NATS)]
  if found.ascents is not None:
    points = np.concatenate([found.ascents, points])
  displacements = _recurring_differences(points)
  if displacements is None:
    return None, points
  return _complete_near_identity(displacements), points


def _recurring_differences(points, min_count=2, max_points=256):
  """Unit displacements `[D, r]` between end points that recur (see `mode_axes`), or None."""
  from scipy import spatial  # pylint: disable=g-import-not-at-top

  count = points.shape[0]
  if count < 3:
    return None
  spread = np.linalg.svd(points - points.mean(axis=0), compute_uv=False)**2 / count
  if spread[0] <= 0:
    return None
  rank = int(np.sum(spread > 1e-2 * spread[0]))
  tol = 0.05 * np.sqrt(spread[rank - 1])
  distinct = []  # Greedy: a point within `tol` of a kept one is the same mode.
  for point in points:
    if not distinct or np.min(np.linalg.norm(np.stack(distinct) - point, axis=-1)) > tol:
      distinct.append(point)
    if len(distinct) == max_points:
      break
  distinct = np.stack(distinct)
  i, j = np.triu_indices(distinct.shape[0], k=1)
  diffs = distinct[j] - distinct[i]
  lead = np.argmax(np.abs(diffs), axis=-1)
  diffs *= np.sign(diffs[np.arange(diffs.shape[0]), lead])[:, None]  # One sign per line.
  tree = spatial.cKDTree(diffs)
  counts = tree.query_ball_point(diffs, r=tol, return_length=True)
  norms = np.linalg.norm(diffs, axis=-1)
  kept = []
  for k in np.lexsort((norms, -counts)):  # Most frequent, then shortest, first.
    if counts[k] < min_count:
      break
    unit = np.mean(diffs[tree.query_ball_point(diffs[k], r=tol)], axis=0)
    unit /= np.linalg.norm(unit)
    if kept:
      basis = _closest_orthogonal(np.stack(kept, axis=-1))
      if np.linalg.norm(unit - basis @ (basis.T @ unit)) < 0.5:
        continue
    kept.append(unit)
    if len(kept) == rank:
      break
  return np.stack(kept, axis=-1) if kept else None


def _closest_orthogonal(matrix):
  """The matrix with orthonormal columns closest to `matrix` (polar factor)."""
  u, _, vt = np.linalg.svd(matrix, full_matrices=False)
  return u @ vt


def _complete_near_identity(axes, min_cosine=0.9):
  """An orthogonal `[D, D]` holding the orthonormalized columns of `axes` `[D, r]`, nearest
  the identity.

  Column `i` of `axes` (orthonormalized, sign flipped to agree) goes to the coordinate it
  loads on most (greedily, largest first); the remaining coordinates get the orthonormal
  basis of the complement closest to their unit vectors. None when every column of `axes` is within
  `min_cosine` of its coordinate axis: the identity already separates them.
  """
  axes = _closest_orthogonal(axes)
  size, rank = axes.shape
  loads = np.abs(axes)
  slot = np.full(rank, -1)
  free = np.ones(size, bool)
  for flat in np.argsort(-loads, axis=None):
    d, i = divmod(int(flat), rank)
    if slot[i] < 0 and free[d]:
      slot[i], free[d] = d, False
  cosines = loads[slot, np.arange(rank)]
  if np.all(cosines >= min_cosine):
    return None
  rotation = np.zeros([size, size])
  rotation[:, slot] = axes * np.sign(axes[slot, np.arange(rank)])
  rest = np.flatnonzero(free)
  if rest.size:
    eigvals, eigvecs = np.linalg.eigh(np.eye(size) - axes @ axes.T)
    complement = eigvecs[:, eigvals > 0.5]  # The projector's unit eigenvalues.
    rotation[:, rest] = complement @ _closest_orthogonal(complement[rest].T)
  return rotation


def _row_gradients(target, z):
  """`d/dz sum(target(z))`: the gradient of every row of `z` (rows are independent). Under an
  enclosing tape that watches `z`, it is recorded there too, for second derivatives."""
  with tf.GradientTape() as tape:
    tape.watch(z)
    value = tf.reduce_sum(target(z))
  return tape.gradient(value, z)


def _adam_steps(target, z, m, v, first, steps, num_steps, learning_rate):
  """Steps `first, ..., first + steps - 1` of `_ascend`'s Adam ascent: `(z, m, v)`."""
  for i in tf.range(first, first + steps):
    g = _row_gradients(target, z)
    g = tf.where(tf.math.is_finite(g), g, tf.zeros_like(g))
    t = tf.cast(i + 1, z.dtype)
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * tf.square(g)
    rate = learning_rate * tf.pow(tf.constant(0.01, z.dtype), (t - 1.) / num_steps)
    step = rate * (m / (1. - 0.9**t)) / (tf.sqrt(v / (1. - 0.999**t)) + 1e-8)
    z = z + step
  return z, m, v


def _ascend(compiled, starts, num_steps, learning_rate=0.1, deadline=None, chunk=100):
  """Batched Adam ascent of the target from each row of `starts`: (positions, values).

  Adam's per-coordinate step normalization copes with the stiff directions of
  near-hard constraints; the learning rate decays geometrically to 1% of its initial value.
  Each row is an independent optimization. The steps run in compiled chunks of `chunk`, and
  a `deadline` is checked between them (`SearchTimeout`): past it, or as soon as the
  remaining chunks at the pace of the fastest one so far that did not trace would end past
  it, so that a search that cannot finish gives its time back at once instead of at the
  deadline. `compiled`: the target's `_Compiled` functions.
  """
  dtype = starts.dtype
  z, m, v = starts, tf.zeros_like(starts), tf.zeros_like(starts)
  pace = _Pace(deadline)
  for first in range(0, num_steps, chunk):
    steps = min(chunk, num_steps - first)
    traced_before, start = compiled.adam_traced, _now()
    z, m, v = compiled.adam_steps(z, m, v, tf.constant(first), tf.constant(steps),
                                  tf.constant(num_steps, dtype), tf.constant(learning_rate, dtype))
    compiled.adam_traced = True
    _check_deadline(deadline, "during the ascent")
    if deadline is not None:
      z.numpy()  # The chunk's time is its execution's: wait for it.
      pace.record(start, steps, traced=not traced_before)
      pace.check(num_steps - first - steps, "ascent steps")
  return z, compiled.value(z)


def _newton_ascent(compiled, z, values, dtype, min_precision, num_iterations=25, deadline=None):
  """Batched damped Newton ascent (full Hessians; small latent dimensions only).

  Each step solves with the negative Hessian whose eigenvalues are floored at
  `min_precision`, and keeps the best of five step lengths that increases the target.
  """
  lengths = np.array([1., 0.5, 0.25, 0.1, 0.03])
  for _ in range(num_iterations):
    _check_deadline(deadline, "during the Newton steps")
    grad, hess = compiled.curvature(tf.constant(z, dtype), tf.eye(z.shape[1], dtype=dtype))
    grad = grad.numpy().astype(np.float64)
    precision = -hess.numpy().astype(np.float64)
    precision = 0.5 * (precision + np.swapaxes(precision, -1, -2))
    eigvals, eigvecs = np.linalg.eigh(precision)
    eigvals = np.clip(eigvals, min_precision, None)
    step = np.einsum("nij,nj->ni", eigvecs,
                     np.einsum("nji,nj->ni", eigvecs, grad) / eigvals)
    step = np.where(np.isfinite(step), step, 0.)
    candidates = z[None] + lengths[:, None, None] * step[None]  # [5, N, D]
    cand_values = compiled.value(
        tf.constant(candidates.reshape(-1, z.shape[1]), dtype)).numpy()
    cand_values = np.where(np.isfinite(cand_values), cand_values, -np.inf).reshape(5, -1)
    best = np.argmax(cand_values, axis=0)
    best_values = cand_values[best, np.arange(z.shape[0])]
    improved = best_values > values
    z = np.where(improved[:, None], candidates[best, np.arange(z.shape[0])], z)
    values = np.where(improved, best_values, values)
    if not improved.any():
      break
  return z, values


def _same_basin(value, a, value_a, selected, dtype, barrier=1.):
  """Whether the segment from `a` to any kept mode `b` (`selected`: `(b, value_b, ...)`
  tuples) stays within `barrier` nats of its lower end; one batched call of `value`."""
  t = np.linspace(0., 1., 11)[1:-1, None, None]
  ends = np.stack([entry[0] for entry in selected])  # [M, D]
  path = (1. - t) * a[None, None] + t * ends[None]  # [9, M, D]
  values = value(tf.constant(path.reshape(-1, a.shape[0]), dtype)).numpy()
  values = values.astype(np.float64).reshape(path.shape[:2])
  lower = np.minimum(value_a, np.array([entry[1] for entry in selected]))
  return bool(np.any(np.all(values >= lower - barrier, axis=0)))


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


def _curvature(target, points, vectors):
  """Gradients `[n, D]` of `target`'s rows at `points` `[n, D]` and the Hessian-vector products
  `H(points_i) v_j` `[n, m, D]` for the rows `v_j` of `vectors` `[m, D]` (reverse over
  reverse; with `vectors` the identity, the Hessians)."""
  n, m = tf.shape(points)[0], tf.shape(vectors)[0]
  tiled = tf.repeat(points, m, axis=0)  # [n m, D], row i m + j: point i for vector j.
  with tf.GradientTape() as outer:
    outer.watch(tiled)
    grad = _row_gradients(target, tf.concat([points, tiled], 0))
    gv = tf.reduce_sum(grad[n:] * tf.tile(vectors, [n, 1]))
  hv = outer.gradient(gv, tiled, unconnected_gradients=tf.UnconnectedGradients.ZERO)
  return grad[:n], tf.reshape(hv, [n, m, tf.shape(points)[1]])


def _laplace(compiled, mu, value, dtype, min_precision, newton_steps=3, chunk=128):
  """Laplace approximation at a (polished) mode near `mu` of the target (`compiled`: its
  `_Compiled` functions).

  Up to `newton_steps` damped Newton steps `mu <- mu + P^{-1} grad` refine `mu` (a step is
  kept only if it increases the target). Returns `(mu, value, P, P^{-1}, log det P^{-1})`,
  with `P` the negative Hessian, its eigenvalues clipped below at `min_precision`.
  """
  size = mu.shape[0]
  eye = np.eye(size)

  def hessian(point):  # `D` Hessian-vector products in chunks.
    return np.concatenate(
        [compiled.curvature(tf.constant(point[None], dtype),
                            tf.constant(eye[i:i + chunk], dtype))[1][0].numpy()
         for i in range(0, size, chunk)], axis=0)

  def curvature(point):
    precision = -hessian(point).astype(np.float64)
    precision = 0.5 * (precision + precision.T)
    eigvals, eigvecs = np.linalg.eigh(precision)
    eigvals = np.clip(eigvals, min_precision, None)
    return eigvals, eigvecs

  eigvals, eigvecs = curvature(mu)
  for _ in range(newton_steps):
    grad = compiled.curvature(tf.constant(mu[None], dtype), tf.zeros([0, size], dtype))[0][0]
    candidate = mu + (eigvecs / eigvals) @ (eigvecs.T @ grad.numpy().astype(np.float64))
    new_value = float(compiled.value(tf.constant(candidate[None], dtype))[0])
    if not np.isfinite(new_value) or new_value <= value:
      break
    mu, value = candidate, new_value
    eigvals, eigvecs = curvature(mu)
  precision = (eigvecs * eigvals) @ eigvecs.T
  covariance = (eigvecs / eigvals) @ eigvecs.T
  return mu, value, precision, covariance, -np.sum(np.log(eigvals))


# ---------------------------------------------------------------------- large latents


@dataclasses.dataclass
class LowRankLaplace:
  """`N(loc, Sigma)`, `Sigma = D^{-1/2} (a (I - V V^T) + V diag(b / (1 + lambda)) V^T) D^{-1/2}`.

  With `a = b = 1` this is the Laplace approximation `Sigma^{-1} = D^{1/2} (I + V diag(lambda)
  V^T) D^{1/2}`; `fit_laplace_scales` picks the variance factors `a` (outside the span of `V`)
  and `b` (inside) by the Gaussian's ELBO. NumPy, float64.

  Attributes:
    loc: `[D]` the mode `z*`.
    base_precision: `[D]` the diagonal `D` (the base's precision at `z*`).
    eigenvectors: `[D, r]` orthonormal `V` (in `D^{1/2}`-whitened coordinates).
    eigenvalues: `[r]` non-negative `lambda`, largest first.
    value: target value at `loc`.
    complement_variance: `a`.
    span_variance: `b`.
  """
  loc: np.ndarray
  base_precision: np.ndarray
  eigenvectors: np.ndarray
  eigenvalues: np.ndarray
  value: float
  complement_variance: float = 1.
  span_variance: float = 1.

  def _span(self):
    """Whitened variances `b / (1 + lambda)` along the columns of `V`."""
    return self.span_variance / (1. + self.eigenvalues)

  def covariance(self):
    """Dense `[D, D]` `Sigma`."""
    inv_root = 1. / np.sqrt(self.base_precision)
    v = self.eigenvectors
    a = self.complement_variance
    white = a * np.eye(v.shape[0]) + (v * (self._span() - a)) @ v.T
    covariance = inv_root[:, None] * white * inv_root[None, :]
    return 0.5 * (covariance + covariance.T)

  def variance(self):
    """`diag(Sigma)` `[D]` without forming `Sigma`."""
    a = self.complement_variance
    white = a + np.sum(self.eigenvectors**2 * (self._span() - a), axis=-1)
    return white / self.base_precision

  def log_det_covariance(self):
    """`log det Sigma = -sum log D + (D - r) log a + sum log(b / (1 + lambda))`."""
    size, rank = self.eigenvectors.shape
    return float(-np.sum(np.log(self.base_precision))
                 + (size - rank) * np.log(self.complement_variance)
                 + np.sum(np.log(self._span())))

  def sample(self, eps):
    """`loc + Sigma^{1/2} eps` for standard-normal rows `eps` `[n, D]`."""
    v = self.eigenvectors
    coefficients = eps @ v
    white = (np.sqrt(self.complement_variance) * (eps - coefficients @ v.T)
             + (coefficients * np.sqrt(self._span())) @ v.T)
    return self.loc + white / np.sqrt(self.base_precision)


def fit_laplace_scales(target, laplace, seed=0, num_samples=32,
                       complement_variances=(1., 0.3, 0.1, 0.03, 0.01),
                       span_variances=(1., 0.5, 0.25)):
  """Variance factors `(a, b)` of a `LowRankLaplace` with the best ELBO on `target`.

  A flow's curvature at the mode understates how fast the target falls away from it in the
  directions the low-rank part leaves at the base's scale. For each pair on the grid,
  `ELBO(a, b) = mean_i target(z_i) + 1/2 log det(2 pi e Sigma_{a,b})` over `num_samples`
  common draws `z_i = loc + Sigma_{a,b}^{1/2} eps_i`; non-finite values count as `-inf`.

  Returns:
    `(laplace with the best a, b, the best ELBO)`.
  """
  num_samples = checks.positive_integer(num_samples, "num_samples")
  size = laplace.loc.shape[0]
  eps = np.random.RandomState(seed % 2**31 + 1).randn(num_samples, size)
  grid = [dataclasses.replace(laplace, complement_variance=float(a), span_variance=float(b))
          for a in complement_variances for b in span_variances]
  z = np.concatenate([g.sample(eps) for g in grid], axis=0)
  values = target.flat_log_prob(tf.constant(z, target.dtype)).numpy().astype(np.float64)
  values = np.where(np.isfinite(values), values, -np.inf).reshape(len(grid), num_samples)
  entropy = np.array([0.5 * size * np.log(2. * np.pi * np.e) + 0.5 * g.log_det_covariance()
                      for g in grid])
  elbos = values.mean(axis=1) + entropy
  best = int(np.argmax(np.where(np.isnan(elbos), -np.inf, elbos)))
  return grid[best], float(elbos[best])


def find_map(target, num_starts=4, seed=0, max_iterations=200, start_scale=0.5,
             tolerance=1e-5, deadline=None, chunk=10):
  """Latent MAP `argmax_z log p_base(z) + log p(y | f(z))` by batched L-BFGS.

  `num_starts` starts (the first at the base's mean `0`, the others
  `start_scale * N(0, I)` draws) are optimized together by `tfp.optimizer.lbfgs_minimize`
  on `-target`, each row independently, for at most `max_iterations` iterations.
  Gradients never pass through `f^{-1}`; where `f` overflows the target is `-inf` and the
  line search backs off.

  Args:
    target: a `tfc.targets.LatentTarget`.
    num_starts: number of starting points (rows of one batched optimization).
    seed: int seed of the random starts.
    max_iterations: L-BFGS iterations.
    start_scale: standard deviation of the random starts (the base's is 1).
    tolerance: relative tolerance on the objective for convergence.
    deadline: optional `time.perf_counter()` time. The iterations then run in compiled
      chunks of `chunk` (resuming L-BFGS's state, so the result is the same), and
      `SearchTimeout` is raised past the deadline or as soon as the iterations left, at the
      pace of the fastest chunk that did not trace, would end past it.
    chunk: L-BFGS iterations per compiled call under a `deadline`.

  Returns:
    `(locs, values)`: `[num_starts, D]` optima and `[num_starts]` target values (NumPy,
    float64), best first.
  """
  num_starts = checks.positive_integer(num_starts, "num_starts")
  max_iterations = checks.positive_integer(max_iterations, "max_iterations")
  if not start_scale >= 0.:
    raise ValueError(f"`start_scale` must be a non-negative number, got {start_scale!r}.")
  dtype = target.dtype
  size = target.latent_size
  flat_target = target.flat_log_prob
  starts = start_scale * tf.random.stateless_normal([num_starts, size],
                                                    seed=[seed % 2**31, 7], dtype=dtype)
  starts = tf.concat([tf.zeros([1, size], dtype), starts[1:]], axis=0)

  @tf.function
  def value_and_gradient(z):
    with tf.GradientTape() as tape:
      tape.watch(z)
      value = -flat_target(z)
    grad = tape.gradient(value, z)
    finite = tf.math.is_finite(value)
    # Non-finite rows: +inf value (the line search shrinks its step), zero gradient.
    value = tf.where(finite, value, tf.constant(np.inf, dtype))
    grad = tf.where(finite[:, None] & tf.math.is_finite(grad), grad, tf.zeros_like(grad))
    return value, grad

  options = dict(num_correction_pairs=10, f_relative_tolerance=tolerance, tolerance=0.,
                 x_tolerance=0.)

  @tf.function
  def minimize(z):
    result = tfp.optimizer.lbfgs_minimize(
        value_and_gradient, initial_position=z, max_iterations=max_iterations, **options)
    return result.position, -value_and_gradient(result.position)[0]

  if deadline is None:
    locs, values = minimize(starts)
  else:
    locs = _lbfgs_in_chunks(value_and_gradient, starts, max_iterations, options, deadline,
                            checks.positive_integer(chunk, "chunk"))
    values = -value_and_gradient(locs)[0]
  locs, values = locs.numpy().astype(np.float64), values.numpy().astype(np.float64)
  values = np.where(np.isfinite(values), values, -np.inf)
  if not np.isfinite(values).any():
    raise FloatingPointError(
        "The latent target is not finite at any L-BFGS optimum; check the observation, the "
        "likelihood's scale and the prior.")
  order = np.argsort(-values)
  return locs[order], values[order]


def _lbfgs_in_chunks(value_and_gradient, starts, max_iterations, options, deadline, chunk):
  """`tfp.optimizer.lbfgs_minimize` from `starts`, `chunk` iterations per compiled call, each
  resuming the last one's state, under `deadline` (see `find_map`): the final positions."""

  @tf.function
  def begin(z):  # The optimizer's state at the starts (no iteration).
    return tfp.optimizer.lbfgs_minimize(value_and_gradient, initial_position=z,
                                        max_iterations=0, **options)

  @tf.function
  def resume(state, limit):
    return tfp.optimizer.lbfgs_minimize(value_and_gradient, initial_position=None,
                                        previous_optimizer_results=state,
                                        max_iterations=limit, **options)

  state = begin(starts)
  pace, done = _Pace(deadline), 0
  while done < max_iterations and not bool(tf.reduce_all(state.converged | state.failed)):
    _check_deadline(deadline, "during L-BFGS")
    start = _now()
    state = resume(state, tf.constant(min(done + chunk, max_iterations)))
    count = int(state.num_iterations) - done
    pace.record(start, count, traced=done == 0)  # `resume` traces on its first call.
    done += count
    pace.check(max_iterations - done, "L-BFGS iterations")
  return state.position


def laplace_low_rank(target, loc, rank=56, seed=0, num_power_iterations=1, chunk=None,
                     value=None, deadline=None):
  """Low-rank-plus-diagonal Laplace approximation at a mode `loc` of `target`.

  `-grad^2 log p_base(z*) = D` is diagonal (one Hessian-vector product with a vector of ones;
  exact for a base independent across dimensions, as a flow's is). The likelihood's
  curvature, whitened, `M = -D^{-1/2} grad^2 log p(y | f(z*)) D^{-1/2}`, is approximated by
  its top `rank` eigenpairs from a randomized range finder [1] with `num_power_iterations`
  power iterations: `(2 + num_power_iterations)` batches of `rank + 8` Hessian-vector
  products in all, instead of the `D` of a dense Hessian. Negative eigenvalues are clipped
  to 0, so the covariance is never wider than the base's.

  Args:
    target: a `tfc.targets.LatentTarget`.
    loc: `[D]` the mode (e.g. from `find_map`).
    rank: number of eigenpairs `r` kept (at most `D`).
    seed: int seed of the random test vectors.
    num_power_iterations: subspace iterations sharpening the range.
    chunk: Hessian-vector products evaluated per call (memory); default all `rank + 8`
      at once. The last call is padded to the same size, so the products trace once.
    value: the target at `loc`, if known.
    deadline: optional `time.perf_counter()` time, checked before each batch of
      Hessian-vector products (`SearchTimeout`).

  Returns:
    A `LowRankLaplace`.
  """
  dtype = target.dtype
  size = target.latent_size
  rank = checks.positive_integer(rank, "rank")
  loc = np.asarray(loc, np.float64)
  if loc.shape != (size,):
    raise ValueError(f"`loc` must have shape [{size}] (the flat latent), got {loc.shape}.")
  rank = min(int(rank), size)
  width = min(size, rank + 8)
  chunk = width if chunk is None else min(width, checks.positive_integer(chunk, "chunk"))
  shape = target.latent_event_shape

  def base_log_prob(z_flat):
    return target.prior.distribution.log_prob(
        tf.reshape(z_flat, tf.concat([tf.shape(z_flat)[:-1], shape], 0)))

  def likelihood_log_prob(z_flat):
    z = tf.reshape(z_flat, tf.concat([tf.shape(z_flat)[:-1], shape], 0))
    return target.log_prob_parts(z)[1]

  base_hvp = tf.function(lambda z, v: _curvature(base_log_prob, z[tf.newaxis], v)[1][0])
  likelihood_hvp = tf.function(
      lambda z, v: _curvature(likelihood_log_prob, z[tf.newaxis], v)[1][0],
      reduce_retracing=True)
  point = tf.constant(loc, dtype)
  base_precision = -base_hvp(point, tf.ones([1, size], dtype)).numpy()[0].astype(np.float64)
  if not np.all(base_precision > 0.):
    raise FloatingPointError(
        "The base's curvature at `loc` is not positive in every dimension (min "
        f"{np.min(base_precision)!r}); `laplace_low_rank` needs a log-concave base.")
  inv_root = 1. / np.sqrt(base_precision)

  def whitened(vectors):  # M v for the columns v of `vectors` [D, n].
    out = []
    for i in range(0, vectors.shape[1], chunk):
      _check_deadline(deadline, "during the low-rank Laplace fit")
      v = (vectors[:, i:i + chunk] * inv_root[:, None]).T
      n = v.shape[0]
      v = np.concatenate([v, np.zeros([chunk - n, size])], axis=0)  # One shape: one trace.
      hv = likelihood_hvp(point, tf.constant(v, dtype)).numpy().astype(np.float64)[:n]
      out.append(-(hv * inv_root[None, :]).T)
    product = np.concatenate(out, axis=1)
    return np.where(np.isfinite(product), product, 0.)

  omega = np.random.RandomState(seed % 2**31).randn(size, width)
  q, _ = np.linalg.qr(whitened(omega))
  for _ in range(num_power_iterations):
    q, _ = np.linalg.qr(whitened(q))
  small = q.T @ whitened(q)
  eigenvalues, vectors = np.linalg.eigh(0.5 * (small + small.T))
  order = np.argsort(-eigenvalues)[:rank]
  eigenvalues = np.clip(eigenvalues[order], 0., None)
  if value is None:
    value = float(target.flat_log_prob(point[tf.newaxis])[0])
  return LowRankLaplace(loc=loc, base_precision=base_precision,
                        eigenvectors=q @ vectors[:, order], eigenvalues=eigenvalues,
                        value=float(value))
