"""Ground-truth inverse problems with exact posteriors, shared by tests and experiments.

Each problem bundles a frozen flow prior `p(x) = TransformedDistribution(N(0, I), f)`, an
observation model `p(y | x)` (a `tfc.likelihoods.Likelihood`), an observation `y`, and the
exact posterior `p(x | y)`: its normalized log density, exact draws, and a `score` of any
set of samples against it (Whang, Lindgren & Dimakis, ICML 2021, pose the inference task).

    problem = tfc.problems.get("bimodal_blocks")           # or get(name, num_blocks=2), ...
    problem.name, problem.dim
    problem.prior, problem.likelihood, problem.observation  # the inputs of any method
    problem.exact_log_prob(x)        # [n, dim] -> [n], float64, normalized
    problem.exact_sample(n, seed)    # [n, dim], float64, exact draws
    problem.mean, problem.covariance # exact posterior moments, float64
    problem.mode_masses              # [num_blocks, 2] exact mode masses (or None)
    problem.masses_of(x)             # [num_blocks, 2] mode frequencies of samples
    problem.score(x, log_q=None, seed=0)   # dict: kl, energy_ratio, mode_mass_error, ...

#### Block problems: exact by grid normalization

A block problem is a product of `B` independent 2-D blocks `x = (x_1, ..., x_B)`,
`x_b = (x_{b,1}, x_{b,2})`. The prior flow applies a 2-D bijector `f_b` to each block of
`z ~ N(0, I_{2B})` and the observation has one entry per block, `y_b ~ Noise(h_b(x_b))`, so
the posterior factorizes:

    p(x | y) = prod_b p_b(x_b | y_b),   p_b(x_b | y_b) = p_b(x_b) p(y_b | x_b) / Z_b

Each factor is normalized on its own uniform `n x n` grid (`grid_size=512`; cell centres
`c`, cell area `|C|`) in float64: `log Z_b = logsumexp_c [log p_b(c) + log p(y_b | c)] +
log |C|`. The box is fitted to the block's posterior (a coarse 256^2 pass over
`[-16, 16]^2` finds where the density exceeds 1e-12 of its peak; two coarse cells are
added on each side) and the boundary cells of the fine grid must carry less than 1e-6 of
the peak density (checked at construction). `exact_log_prob(x)` is the exact unnormalized
log density at `x` minus `sum_b log Z_b` (no interpolation). The midpoint rule on a
smooth density that vanishes at the boundary is accurate far below any Monte Carlo error:
`grid_log_z_error` (the change of `log Z_b` on the sub-grid of twice the spacing) is
~1e-13, and halving the resolution moves mode masses by < 1e-4 and moments by < 1e-3
standard deviations (`tests/test_problems.py`).

`exact_sample` draws a cell per block with probability `p_b(c) |C| / Z_b`, then a point
uniformly within it. The draws follow the histogram density: constant on each cell, with
the midpoint-rule cell masses in place of the exact ones (a second-order error). Given the
cell masses, a draw is within one cell diagonal of an exact draw (couple within cells), so
the sampler is within `cell_diagonal` in Wasserstein distance of the exact posterior, plus
the mass error: at most 0.037 here, against posterior standard deviations of 0.16 and more.

The block prior `f_b` (parameters differ by block, shape `[B, ...]`), with `z = (z_1, z_2)`:

    u = SinhArcsinh(z; skewness_b, tailweight_b)                 (elementwise)
    v_1 = u_1,  v_2 = u_2 exp(c_b tanh(u_1)) + a_b u_1^2 + d_b u_1 (bend, shear, scale)
    x_b = loc_b + scale_b * v                                   (elementwise)

assembled as `Chain([Reshape([2B], [B, 2]), f_b, Reshape([B, 2], [2B])])`, so TFP sums the
per-block log-determinants.

* `bimodal_blocks` (D = 16, `num_blocks=8`): phaseless measurements `y_b = x_{b,1}^2 +
  N(0, 0.4^2)` with `y_b` between 2.0 and 2.5: two modes per block at `x_{b,1} ~ +-1.5`,
  separated by a density barrier below `e^-11` of the peak at `x_{b,1} = 0`. Mode `0` is
  `x_{b,1} < 0`, mode `1` is `x_{b,1} > 0`. The prior location of `x_{b,1}` sets
  the mode masses `P(x_{b,1} > 0 | y)`, exactly (to the grid's accuracy)
  `BIMODAL_MASSES = (0.7, 0.5, 0.85, 0.3, 0.5, 0.15, 0.6, 0.9)`; the two modes of a block
  differ in shape too (the shear and scale of `x_{b,2}` depend on `x_{b,1}`).
* `nonlinear_blocks` (D = 16): a cubic sensor `y_b = x_{b,1} + x_{b,2} + x_{b,1}^3 / 4 +
  N(0, 0.2^2)` through a bent, sheared, skewed prior (`a_b` 0.3 to 0.7): curved, skewed,
  unimodal posteriors, some with long curved tails.
* `rotated_bimodal_blocks`, `rotated_nonlinear_blocks`: the same problems seen through a
  fixed random orthogonal `Q` (seeded): `x = Q u` with `u` the block problem's signal, the
  prior `p(x) = p_u(Q^T x)` (a flow: `Chain([Orthogonal(Q), f])`, volume preserving) and
  the observation `y_b = h_b((Q^T x)_b) + noise` (for the bimodal one, phaseless
  measurements of orthogonal projections). Nothing is block-wise in `x`, yet
  `p(x | y) = p_u(Q^T x | y)` stays exact; modes are defined in `u = Q^T x`. The latent
  posterior is the block problem's (the latent is `f^-1(Q^T x)`), block-wise and, for
  the bimodal blocks, bimodal along latent coordinate axes.
* `latent_rotated_bimodal_blocks`, `latent_rotated_nonlinear_blocks`: the rotation comes
  first in the flow, `x = f(R z)` (`Chain([f, Orthogonal(R)])`, `R` the `Q` of the same
  seed). Since `N(0, I)` is rotation invariant, `p(x)`, the observation and `p(x | y)`
  (grid, exact draws, scores, modes) are exactly the block problem's; the latent
  posterior `p(z | y) = p_w(R z | y)` (`w` the block problem's latent) is rotated by
  `R^T` and mixes every block, so a method that factorizes the latent space cannot use
  the blocks' independence.

`num_blocks` (1 to 8) keeps the first blocks; `num_blocks=2` is the fast variant for tests.

#### Linear-Gaussian problems: closed form

* `linear_gaussian_64`: `x = mu + L z` at D = 64 with marginal prior scales log-uniform in
  `[1e-2, 1e1]` and a random correlation matrix (`L L^T = S C S`), observed by `m = 32`
  random Gaussian measurements `y = A x + N(0, 0.1^2 I)`, `A_ij ~ N(0, 1 / D)`. The
  posterior is `N(m_post, S_post)`, `S_post = S_0 - S_0 A^T (A S_0 A^T + s^2 I)^-1 A S_0`,
  `m_post = mu + S_0 A^T (A S_0 A^T + s^2 I)^-1 (y - A mu)` (float64), and has full
  covariance.

#### Scores

`score(x, log_q=None, seed=0, num_energy=1000, num_repeats=8)` returns a dict:

* `kl`, `kl_stderr` (when `log_q` is given): `KL(q || p) ~= mean_i [log q(x_i) - log p(x_i
  | y)]` over the finite rows, with its Monte Carlo standard error `std / sqrt(n)`.
* `energy`: the energy distance `2 E|X - Y| - E|X - X'| - E|Y - Y'|` [2] (V-statistic: the
  energy distance between the empirical measures, never negative) between `m =
  min(n, num_energy)` rows of `x` and `m` exact draws, in coordinates standardized by the
  exact posterior's marginal standard deviations, averaged over `num_repeats` subsamples
  and reference sets; `energy_floor`, the same average between two independent exact sets
  of size `m` (what a perfect sampler scores; cached per `(m, num_repeats, seed)`);
  `energy_ratio = energy / energy_floor` and its standard error `energy_ratio_stderr`.
  For exact draws the ratio is 1 with a right-skewed spread of about
  `c / sqrt(num_repeats)`, `c` measured 0.75 at D = 4 and 0.3 at D = 16 (the V-statistic of equal distributions scales as `1 / m`,
  so its relative spread does not shrink with `m`); for a wrong distribution it grows
  like `m` (prior draws at `m = 1000`: 25 to 3000).
* `mean_error`: `max_k |mean(x_k) - E[x_k | y]| / sd_k` over coordinates.
* `mode_masses` (`[B, 2]`, the fraction of rows in each block's modes), `exact_mode_masses`,
  `mode_mass_error` (the max absolute difference) and `mode_mass_stderr` (the largest
  `sqrt(p (1 - p) / n)`, the error expected of `n` independent exact draws), for
  problems with modes.
* `nonfinite_fraction`: the fraction of rows with a NaN or Inf entry in `x` or `log_q`
  (dropped from all other scores), and `num_samples`.

Cost with the defaults: the first score of a given `seed` evaluates 40 distance matrices of
`1000 x 1000` (references, floors), later ones 16 (the rest is cached): measured 1.1 s and
0.3 s at D = 64 on a shared two-core machine under load, plus `exact_log_prob` (~0.05 s
per 4,000 rows) when `log_q` is given.

All randomness comes from explicit seeds: a seed is an int or a tuple of ints
(`np.random.default_rng(seed)`). TensorFlow objects are float32; all exact computations are
float64.

#### Examples

```python
import tfp_composed as tfc

problem = tfc.problems.get("bimodal_blocks", num_blocks=2)
posterior = tfc.ComposedPosterior(problem.prior, problem.likelihood, problem.observation)
posterior.fit(seed=0)
x, log_q = posterior.experimental_sample_and_log_prob(4000, seed=1)
problem.score(x.numpy(), log_q.numpy())   # {'kl': ..., 'energy_ratio': ..., ...}
```

#### References

[1]: Jay Whang, Erik M. Lindgren, Alexandros G. Dimakis. Composing Normalizing Flows for
     Inverse Problems. In _International Conference on Machine Learning_, 2021.
     https://arxiv.org/abs/2002.11743
[2]: Gabor J. Szekely, Maria L. Rizzo. Energy statistics: A class of statistics based on
     distances. _Journal of Statistical Planning and Inference_, 143(8), 2013.
"""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_composed import likelihoods as likelihoods_lib
from tfp_composed import operators as operators_lib

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = [
    "Problem",
    "BlockProblem",
    "GaussianProblem",
    "PROBLEMS",
    "BIMODAL_MASSES",
    "get",
    "bimodal_blocks",
    "nonlinear_blocks",
    "rotated_bimodal_blocks",
    "rotated_nonlinear_blocks",
    "latent_rotated_bimodal_blocks",
    "latent_rotated_nonlinear_blocks",
    "linear_gaussian_64",
    "energy_distance",
    "BlockFlow",
    "Orthogonal",
    "LinearGaussian",
    "GridPosterior",
    "banana_prior",
    "mc_kl",
]


# ---------------------------------------------------------------------------
# Argument checking.


def _positive_int(value, name, upper=None):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"`{name}` must be a positive integer, got {value!r} of type "
                     f"{type(value).__name__}.")
  if upper is not None and value > upper:
    raise ValueError(f"`{name}` must be at most {upper}, got {value!r}.")
  return int(value)


def _samples(x, dim, name="x"):
  """`x` as a float64 `[n, dim]` array, with an error naming the expected shape."""
  if tf.is_tensor(x) or isinstance(x, tf.Variable):
    x = x.numpy()
  arr = np.asarray(x)
  if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or
                               np.issubdtype(arr.dtype, np.integer)):
    raise TypeError(f"`{name}` must be a real array, got dtype {arr.dtype}.")
  if arr.ndim != 2 or arr.shape[1] != dim:
    raise ValueError(f"`{name}` must have shape [n, {dim}], got {list(arr.shape)}.")
  return arr.astype(np.float64)


def _rng(seed, name="seed"):
  ok = isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0
  if isinstance(seed, (tuple, list)):
    ok = len(seed) > 0 and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                               and s >= 0 for s in seed)
  if not ok:
    raise ValueError(f"`{name}` must be a non-negative int or a tuple of them, got {seed!r}.")
  return np.random.default_rng(list(seed) if isinstance(seed, (tuple, list)) else int(seed))


def _float32_exact(value):
  """`value` rounded to float32, held in float64: the numbers the TensorFlow side sees."""
  return np.asarray(value, np.float64).astype(np.float32).astype(np.float64)


def _logsumexp(a, axis=None):
  m = np.max(a, axis=axis, keepdims=True)
  out = m + np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True))
  return np.squeeze(out, axis=axis) if axis is not None else out.reshape(())


# ---------------------------------------------------------------------------
# Energy distance.


def _mean_distance(a, b):
  """`mean_ij |a_i - b_j|` for `a: [m, d]`, `b: [k, d]` (one matrix product)."""
  sq = a @ b.T
  sq *= -2.
  sq += np.einsum("ij,ij->i", a, a)[:, None]
  sq += np.einsum("ij,ij->i", b, b)[None, :]
  np.maximum(sq, 0., out=sq)
  np.sqrt(sq, out=sq)
  return float(sq.mean())


def energy_distance(x, y):
  """Energy distance `2 E|X - Y| - E|X - X'| - E|Y - Y'|` between two sample sets.

  The V-statistic: the energy distance between the two empirical measures, which is never
  negative and is zero only for equal sets. Cost `O((n + k)^2 d)`.

  Args:
    x: `[n, d]` array.
    y: `[k, d]` array.

  Returns:
    Python float.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
    raise ValueError(f"`x` and `y` must have shapes [n, d] and [k, d], got {list(x.shape)} "
                     f"and {list(y.shape)}.")
  return 2. * _mean_distance(x, y) - _mean_distance(x, x) - _mean_distance(y, y)


# ---------------------------------------------------------------------------
# Bijectors.


class _BlockCoupling(tfb.Bijector):
  """`v_1 = u_1`, `v_2 = u_2 exp(c tanh(u_1)) + a u_1^2 + d u_1` on the last axis (size 2).

  Inverse `u_2 = (v_2 - a v_1^2 - d v_1) exp(-c tanh(v_1))`; forward log-det `c tanh(u_1)`.
  `a`, `c`, `d` broadcast against the batch (block) dimensions of `u`.
  """

  def __init__(self, bend, shear, log_scale_slope, validate_args=False, name="block_coupling"):
    parameters = dict(locals())
    with tf.name_scope(name) as name:
      dtype = tf.as_dtype(getattr(bend, "dtype", tf.float32))
      self._bend = tf.convert_to_tensor(bend, dtype, name="bend")
      self._shear = tf.convert_to_tensor(shear, dtype, name="shear")
      self._slope = tf.convert_to_tensor(log_scale_slope, dtype, name="log_scale_slope")
      super().__init__(forward_min_event_ndims=1, validate_args=validate_args,
                       parameters=parameters, dtype=dtype, name=name)

  @classmethod
  def _parameter_properties(cls, dtype, num_classes=None):
    return dict(bend=tfp.util.ParameterProperties(),
                shear=tfp.util.ParameterProperties(),
                log_scale_slope=tfp.util.ParameterProperties())

  def _shift(self, u1):
    return self._bend * u1**2 + self._shear * u1

  def _forward(self, u):
    u1, u2 = u[..., 0], u[..., 1]
    v2 = u2 * tf.exp(self._slope * tf.tanh(u1)) + self._shift(u1)
    return tf.stack([u1, v2], axis=-1)

  def _inverse(self, v):
    v1, v2 = v[..., 0], v[..., 1]
    u2 = (v2 - self._shift(v1)) * tf.exp(-self._slope * tf.tanh(v1))
    return tf.stack([v1, u2], axis=-1)

  def _forward_log_det_jacobian(self, u):
    return self._slope * tf.tanh(u[..., 0])

  def _inverse_log_det_jacobian(self, v):
    return -self._slope * tf.tanh(v[..., 0])


def BlockFlow(params, dtype=tf.float32):  # pylint: disable=invalid-name
  """The 2-D block bijector `f_b` with per-block parameters (see the module docstring).

  Args:
    params: dict of arrays: `skewness`, `tailweight`, `scale`, `loc` of shape `[B, 2]`;
      `bend`, `shear`, `log_scale_slope` of shape `[B]`.
    dtype: dtype of the parameters (constants: the flow is frozen).

  Returns:
    A `tfb.Chain` acting on `[..., B, 2]`, per-block log-dets with `event_ndims=1`.
  """
  c = {k: tf.constant(np.asarray(v), dtype, name=k) for k, v in params.items()}
  return tfb.Chain([
      tfb.Shift(c["loc"]),
      tfb.Scale(c["scale"]),
      _BlockCoupling(c["bend"], c["shear"], c["log_scale_slope"]),
      tfb.SinhArcsinh(skewness=c["skewness"], tailweight=c["tailweight"]),
  ], name="block_flow")


class Orthogonal(tfb.Bijector):
  """`x = Q u` for an orthogonal `Q`: inverse `u = Q^T x`, log-det exactly 0.

  Args:
    matrix: `[d, d]` orthogonal matrix (checked to 1e-5 in float64).
  """

  def __init__(self, matrix, dtype=tf.float32, validate_args=False, name="orthogonal"):
    parameters = dict(locals())
    q = np.asarray(matrix, np.float64)
    if q.ndim != 2 or q.shape[0] != q.shape[1]:
      raise ValueError(f"`matrix` must be square, got shape {list(q.shape)}.")
    err = float(np.abs(q.T @ q - np.eye(q.shape[0])).max())
    if err > 1e-5:
      raise ValueError(f"`matrix` must be orthogonal, got max |Q^T Q - I| = {err:.3g}.")
    with tf.name_scope(name) as name:
      self._matrix = tf.constant(q, dtype, name="matrix")
      super().__init__(forward_min_event_ndims=1, is_constant_jacobian=True,
                       validate_args=validate_args, parameters=parameters, dtype=dtype,
                       name=name)

  @classmethod
  def _parameter_properties(cls, dtype, num_classes=None):
    return dict(matrix=tfp.util.ParameterProperties(event_ndims=2))

  @property
  def matrix(self):
    return self._matrix

  def _forward(self, u):
    return tf.linalg.matvec(self._matrix, u)

  def _inverse(self, x):
    return tf.linalg.matvec(self._matrix, x, transpose_a=True)

  def _forward_log_det_jacobian(self, u):
    return tf.zeros([], u.dtype)


def _random_orthogonal(dim, seed):
  q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
  return q * np.sign(np.diag(r))


def _standard_base(dim):
  return tfd.MultivariateNormalDiag(tf.zeros([dim]), tf.ones([dim]))


# ---------------------------------------------------------------------------
# Problems.


class Problem:
  """An inverse problem with an exact posterior: inputs for a method, and its scores.

  Subclasses set `name`, `dim`, `prior`, `likelihood`, `observation`, `mean`,
  `covariance` and implement `exact_log_prob`, `exact_sample` and, when the posterior has
  modes, `mode_index` and `mode_masses`.
  """

  name = None
  mode_masses = None  # [B, M] exact mode masses, or None.

  def exact_log_prob(self, x):
    """Normalized exact posterior log density `log p(x | y)`, `[n, dim] -> [n]` float64."""
    raise NotImplementedError

  def exact_sample(self, n, seed):
    """`n` exact posterior draws, `[n, dim]` float64; `seed` an int or tuple of ints."""
    raise NotImplementedError

  def mode_index(self, x):
    """`[n, dim] -> [n, B]` integers: which mode of each block `x` lies in."""
    raise NotImplementedError(f"problem {self.name!r} has no modes")

  @property
  def stddev(self):
    return np.sqrt(np.diag(self.covariance))

  def score(self, x, log_q=None, seed=0, num_energy=1000, num_repeats=8):
    """Scores samples `x` of an approximate posterior `q` against the exact one.

    The energy statistics average `num_repeats` independent pairs: subsamples of `x`
    (disjoint when `x` has enough rows) against fresh exact draws, and, for the floor,
    exact draws against exact draws of the same size `m = min(n, num_energy)`. The V-
    statistic of equal distributions has a relative spread of 0.3 (D = 16) to 0.75
    (D = 4) whatever `m` (its null distribution scales as `1 / m`), so `num_repeats` sets
    the noise of the ratio, `energy_ratio_stderr` estimates it, and `m` sets the power: for a wrong `q` the
    ratio grows like `m`. The reference sets and floors depend only on `(m, num_repeats,
    seed)` and are cached.

    Args:
      x: `[n, dim]` samples (array or eager tensor), at least 2 finite rows.
      log_q: optional `[n]` log densities `log q(x)`; enables `kl`.
      seed: int or tuple of ints: the subsamples and the exact reference draws.
      num_energy: positive int, the largest sample size `m` of the energy statistics.
      num_repeats: positive int, how many statistics average into `energy` and into
        `energy_floor`.

    Returns:
      A dict of Python floats (and `[B, M]` arrays for mode masses); see the module
      docstring.
    """
    x = _samples(x, self.dim)
    num_energy = _positive_int(num_energy, "num_energy")
    num_repeats = _positive_int(num_repeats, "num_repeats")
    seed_list = list(seed) if isinstance(seed, (tuple, list)) else [seed]
    _rng(seed)  # Checks `seed`.
    n = x.shape[0]
    finite = np.all(np.isfinite(x), axis=1)
    if log_q is not None:
      log_q = np.asarray(log_q.numpy() if tf.is_tensor(log_q) else log_q, np.float64)
      if log_q.shape != (n,):
        raise ValueError(f"`log_q` must have shape [{n}] (one per row of `x`), got "
                         f"{list(log_q.shape)}.")
      finite &= np.isfinite(log_q)
    num_finite = int(finite.sum())
    if num_finite < 2:
      raise ValueError(f"`x` must have at least 2 finite rows, got {num_finite} of {n}.")
    result = {"num_samples": n, "nonfinite_fraction": 1. - num_finite / n}
    xf = x[finite]
    if log_q is not None:
      diff = log_q[finite] - self.exact_log_prob(xf)
      result["kl"] = float(diff.mean())
      result["kl_stderr"] = float(diff.std() / np.sqrt(num_finite))
    sd = self.stddev
    result["mean_error"] = float(np.max(np.abs(xf.mean(0) - self.mean) / sd))

    m = min(num_energy, num_finite)
    rng = np.random.default_rng(seed_list + [0])
    order = rng.permutation(num_finite)
    references, floors = self._references(m, num_repeats, tuple(seed_list))
    energies = []
    for k, (reference, reference_self) in enumerate(references):
      if num_finite >= num_repeats * m:
        rows = order[k * m:(k + 1) * m]
      else:
        rows = rng.choice(num_finite, m, replace=False)
      sub = xf[rows] / sd
      energies.append(2. * _mean_distance(sub, reference) - _mean_distance(sub, sub)
                      - reference_self)
    energy, floor = float(np.mean(energies)), float(np.mean(floors))
    result["energy"], result["energy_floor"] = energy, floor
    result["energy_ratio"] = energy / floor
    if num_repeats > 1:
      rel_var = (np.var(energies, ddof=1) / energy**2 + np.var(floors, ddof=1) / floor**2)
      result["energy_ratio_stderr"] = float(energy / floor * np.sqrt(rel_var / num_repeats))
    if self.mode_masses is not None:
      masses = self.masses_of(xf)
      exact = self.mode_masses
      result["mode_masses"] = masses
      result["exact_mode_masses"] = exact
      result["mode_mass_error"] = float(np.abs(masses - exact).max())
      result["mode_mass_stderr"] = float(np.sqrt(exact * (1. - exact) / num_finite).max())
    return result

  def _references(self, m, num_repeats, seed):
    """Standardized exact reference sets with `E|Y - Y'|`, and the floors (cached).

    Returns `([(reference, mean self-distance)] * num_repeats, [floor] * num_repeats)`;
    they depend only on `(m, num_repeats, seed)`.
    """
    cache = self.__dict__.setdefault("_reference_cache", {})
    key = (m, num_repeats, seed)
    if key not in cache:
      sd = self.stddev
      draw = lambda *stream: self.exact_sample(m, list(seed) + list(stream)) / sd
      references = [(y, _mean_distance(y, y)) for y in (draw(1, k) for k in range(num_repeats))]
      floors = [energy_distance(draw(2, k), draw(3, k)) for k in range(num_repeats)]
      if len(cache) >= 8:  # Keep memory bounded: a few settings at a time.
        cache.pop(next(iter(cache)))
      cache[key] = (references, floors)
    return cache[key]

  def masses_of(self, x):
    """`[B, M]` fraction of the rows of `x` in each mode of each block."""
    index = self.mode_index(_samples(x, self.dim))
    num_modes = self.mode_masses.shape[1]
    return np.stack([(index == k).mean(0) for k in range(num_modes)], axis=1)

  def __repr__(self):
    return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


class _BlockObservation:
  """The forward operator of a block problem: `x -> h((Q^T x) reshaped to [B, 2])`."""

  def __init__(self, observe, num_blocks, rotation):
    self._observe = observe
    self._num_blocks = num_blocks
    self._rotation = None if rotation is None else tf.constant(rotation, tf.float32)

  def __call__(self, x):
    u = x
    if self._rotation is not None:
      u = tf.linalg.matvec(tf.cast(self._rotation, x.dtype), x, transpose_a=True)
    return self._observe(tf.reshape(u, [-1, self._num_blocks, 2]))


class BlockProblem(Problem):
  """A product of independent 2-D blocks, each normalized on its own grid (float64).

  Besides the `Problem` interface: `num_blocks`, `rotation` (`Q` or `None`),
  `latent_rotation` (`R` or `None`), `to_blocks(x)` (`[n, dim] -> [n, B, 2]`, `u = Q^T x`),
  `to_latent(x)` (`[n, dim] -> [n, dim]`, the prior's latent `z = f^-1(x)`, float64),
  `block_log_unnormalized(u)`
  (`[n, B, 2] -> [n, B]`), `log_normalizer` (`[B]`, `log Z_b`), the grid (`grid_lo`,
  `grid_hi`, `cell_size` `[B, 2]`; `grid_log_density` `[B, n, n]`, the normalized log
  density at the cell centres, axis 1 along `x_{b,1}`), `cell_diagonal` and
  `grid_log_z_error` (`[B]`).

  Args:
    name: Python `str`.
    params: per-block parameters of `BlockFlow`, leading dimension `B`.
    observe: dtype-agnostic callable `[..., B, 2] -> [..., B]`, the block observation `h`.
    observation: `[B]` observation `y`.
    noise: `("gaussian", scale)` or `("student_t", df, scale)`, scalars or `[B]` arrays.
    mode_fn: optional NumPy callable `[n, B, 2] -> [n, B]` integers in `[0, num_modes)`.
    num_modes: number of modes per block when `mode_fn` is given.
    rotation: optional `[2B, 2B]` orthogonal `Q`: the problem is seen as `x = Q u`.
    latent_rotation: optional `[2B, 2B]` orthogonal `R`: the prior's flow starts with it,
      `x = f(R z)`. `p(x)`, the observation and the exact posterior in `x` do not change
      (`R z ~ N(0, I)`); the latent posterior `p(z | y)` is the block one rotated by `R^T`.
    grid_size: positive int, grid points per axis and block.
  """

  def __init__(self, name, params, observe, observation, noise, mode_fn=None, num_modes=2,
               rotation=None, latent_rotation=None, grid_size=512):
    self.name = name
    self.grid_size = _positive_int(grid_size, "grid_size")
    if self.grid_size < 64:
      raise ValueError(f"`grid_size` must be at least 64, got {grid_size!r}.")
    # The exact side uses the float32-rounded numbers that the prior and likelihood see.
    self._params = {k: _float32_exact(v) for k, v in params.items()}
    self.num_blocks = self._params["loc"].shape[0]
    self.dim = 2 * self.num_blocks
    b = self.num_blocks
    self._observe = observe
    self._y = _float32_exact(observation)
    if self._y.shape != (b,):
      raise ValueError(f"`observation` must have shape [{b}], got {list(self._y.shape)}.")
    if noise[0] not in ("gaussian", "student_t"):
      raise ValueError(f"`noise` must be ('gaussian', scale) or ('student_t', df, scale), "
                       f"got {noise!r}.")
    self._noise = (noise[0],) + tuple(np.broadcast_to(_float32_exact(v), [b])
                                      for v in noise[1:])
    self._mode_fn = mode_fn
    self.num_modes = None if mode_fn is None else _positive_int(num_modes, "num_modes")
    self.rotation = None if rotation is None else np.asarray(rotation, np.float64)
    self.latent_rotation = (None if latent_rotation is None else
                            np.asarray(latent_rotation, np.float64))

    # The TensorFlow side: float32 flow prior and likelihood.
    self.block_flow = BlockFlow(self._params, tf.float32)
    bijectors = [tfb.Reshape([self.dim], [b, 2]), self.block_flow,
                 tfb.Reshape([b, 2], [self.dim])]
    if self.rotation is not None:
      bijectors.insert(0, Orthogonal(self.rotation))
    if self.latent_rotation is not None:  # Applied first: `z -> R z -> f`.
      bijectors.append(Orthogonal(self.latent_rotation, name="latent_rotation"))
    self.prior = tfd.TransformedDistribution(_standard_base(self.dim), tfb.Chain(bijectors),
                                             name=name + "_prior")
    operator = operators_lib.Lambda(_BlockObservation(observe, b, self.rotation),
                                    output_shape=[b], input_shape=[self.dim],
                                    name=name + "_operator")
    if self._noise[0] == "gaussian":
      self.likelihood = likelihoods_lib.Gaussian(operator, self._noise[1].astype(np.float32))
    else:
      self.likelihood = likelihoods_lib.StudentT(operator, df=self._noise[1].astype(np.float32),
                                                 scale=self._noise[2].astype(np.float32))
    self.observation = self._y.astype(np.float32)

    # The exact side: float64 flow, grids.
    self._flow64 = BlockFlow(self._params, tf.float64)
    self._build_grid()

  # -- exact per-block densities ----------------------------------------------------------

  def block_log_unnormalized(self, u):
    """`log p_b(u_b) + log p(y_b | u_b)` in float64, `[n, B, 2] -> [n, B]` (block coords)."""
    out = []
    for start in range(0, u.shape[0], 1 << 17):
      chunk = tf.constant(u[start:start + (1 << 17)], tf.float64)
      z = self._flow64.inverse(chunk)
      log_det = self._flow64.inverse_log_det_jacobian(chunk, event_ndims=1)
      log_base = -0.5 * tf.reduce_sum(z**2, -1) - np.log(2. * np.pi)
      loc = self._observe(chunk)
      y = tf.constant(self._y, tf.float64)
      if self._noise[0] == "gaussian":
        log_lik = tfd.Normal(loc, self._noise[1]).log_prob(y)
      else:
        log_lik = tfd.StudentT(self._noise[1], loc, self._noise[2]).log_prob(y)
      out.append((log_base + log_det + log_lik).numpy())
    return np.concatenate(out, 0)

  def _grid_values(self, lo, hi, n):
    """Cell centres `[n*n, B, 2]` of per-block boxes `[B, 2]`, and their log densities."""
    h = (hi - lo) / n
    t = (np.arange(n) + 0.5) / n
    c1 = lo[:, 0][None, :] + t[:, None] * (hi - lo)[:, 0][None, :]   # [n, B]
    c2 = lo[:, 1][None, :] + t[:, None] * (hi - lo)[:, 1][None, :]
    pts = np.stack(np.broadcast_arrays(c1[:, None, :], c2[None, :, :]), -1)  # [n, n, B, 2]
    pts = pts.reshape(n * n, self.num_blocks, 2)
    return pts, self.block_log_unnormalized(pts), h

  def _build_grid(self):
    b, n = self.num_blocks, self.grid_size
    # A coarse pass over a wide box finds where each block's posterior lives.
    wide = 16.
    lo, hi = np.full([b, 2], -wide), np.full([b, 2], wide)
    _, log_p, h = self._grid_values(lo, hi, 256)
    log_p = log_p.reshape(256, 256, b)
    keep = log_p >= log_p.max((0, 1)) - np.log(1e12)
    for k in range(b):
      i, j = np.nonzero(keep[:, :, k])
      if min(i.min(), j.min()) == 0 or max(i.max(), j.max()) == 255:
        raise ValueError(f"block {k} of {self.name!r}: the posterior reaches the edge of the "
                         f"search box [-{wide}, {wide}]^2.")
      lo[k] = [-wide + (i.min() - 2) * h[k, 0], -wide + (j.min() - 2) * h[k, 1]]
      hi[k] = [-wide + (i.max() + 3) * h[k, 0], -wide + (j.max() + 3) * h[k, 1]]
    self.grid_lo, self.grid_hi = lo, hi
    points, log_p, h = self._grid_values(lo, hi, n)
    self.cell_size = h                                     # [B, 2]
    self.cell_diagonal = np.sqrt((h**2).sum(1))            # [B]
    log_cell = np.log(h.prod(1))
    self.log_normalizer = _logsumexp(log_p, axis=0) + log_cell    # [B]
    grid = log_p.reshape(n, n, b)
    edge = np.max([grid[0].max(0), grid[-1].max(0), grid[:, 0].max(0), grid[:, -1].max(0)], 0)
    ratio = np.exp(edge - grid.max((0, 1)))
    if np.any(ratio >= 1e-6):
      raise ValueError(f"{self.name!r}: grid boundary carries {ratio.max():.2g} of the peak "
                       "density (must be < 1e-6).")
    coarse = grid[::2, ::2].reshape(-1, b)
    self.grid_log_z_error = np.abs(_logsumexp(coarse, axis=0) + log_cell + np.log(4.)
                                   - self.log_normalizer)
    # Normalized log density at the cell centres, [B, n, n] (axis 1: x_{b,1}).
    self.grid_log_density = (log_p - self.log_normalizer).T.reshape(b, n, n)
    prob = np.exp(log_p - self.log_normalizer + log_cell)          # cell masses, [n*n, B]
    prob = prob / prob.sum(0)
    self._cdf = np.cumsum(prob, axis=0).T                          # [B, n*n]
    self._cdf[:, -1] = 1.
    # Exact moments in block coordinates, then in x.
    mean_u = np.einsum("cb,cbi->bi", prob, points)
    centred = points - mean_u
    cov_u = np.einsum("cb,cbi,cbj->bij", prob, centred, centred)
    cov_u += np.einsum("bi,ij->bij", h**2 / 12., np.eye(2))       # Uniform jitter in cells.
    full = np.zeros([self.dim, self.dim])
    for k in range(b):
      full[2 * k:2 * k + 2, 2 * k:2 * k + 2] = cov_u[k]
    mean = mean_u.reshape(-1)
    if self.rotation is not None:
      mean, full = self.rotation @ mean, self.rotation @ full @ self.rotation.T
    self.mean, self.covariance = mean, full
    if self._mode_fn is not None:
      index = self._mode_fn(points)                                # [n*n, B]
      self.mode_masses = np.stack(
          [(prob * (index == k)).sum(0) for k in range(self.num_modes)], 1)

  # -- public exact API ---------------------------------------------------------------------

  def to_blocks(self, x):
    """`[n, dim] -> [n, B, 2]` block coordinates `u = Q^T x` (or `x` unrotated)."""
    x = _samples(x, self.dim)
    u = x if self.rotation is None else x @ self.rotation
    return u.reshape(-1, self.num_blocks, 2)

  def to_latent(self, x):
    """`[n, dim] -> [n, dim]`: the prior's latent `z = f^-1(x)` in float64.

    `z = R^T w`, `w_b = f_b^-1(u_b)` the block flow's latent of `u = Q^T x` (`R`, `Q` the
    identity when absent). Exact posterior draws `x` give exact draws of `p(z | y)`.
    """
    u = self.to_blocks(x)
    w = np.concatenate([self._flow64.inverse(tf.constant(u[i:i + (1 << 17)], tf.float64))
                        .numpy() for i in range(0, u.shape[0], 1 << 17)], 0)
    w = w.reshape(-1, self.dim)
    return w if self.latent_rotation is None else w @ self.latent_rotation

  def exact_log_prob(self, x):
    u = self.to_blocks(x)
    return (self.block_log_unnormalized(u) - self.log_normalizer).sum(1)

  def exact_sample(self, n, seed):
    n = _positive_int(n, "n")
    rng = _rng(seed)
    g = self.grid_size
    cells = np.stack([np.searchsorted(self._cdf[k], rng.random(n), side="right")
                      for k in range(self.num_blocks)], 1)                    # [n, B]
    cells = np.minimum(cells, g * g - 1)
    ij = np.stack([cells // g, cells % g], -1)                                 # [n, B, 2]
    u = self.grid_lo + (ij + rng.random(ij.shape)) * self.cell_size
    u = u.reshape(n, self.dim)
    return u if self.rotation is None else u @ self.rotation.T

  def mode_index(self, x):
    if self._mode_fn is None:
      return super().mode_index(x)
    return self._mode_fn(self.to_blocks(x))


class GaussianProblem(Problem):
  """Linear-Gaussian: `x = mu + L z`, `y = A x + N(0, s^2 I)`; closed-form posterior.

  Besides the `Problem` interface: `prior_mean`, `prior_scale_tril`, `matrix`, `noise`,
  `x_true` (the signal `y` was simulated from, when known) and `scale_tril`, the Cholesky
  factor of the posterior covariance.
  """

  def __init__(self, name, prior_mean, prior_scale_tril, matrix, noise, observation,
               x_true=None):
    self.name = name
    self.x_true = None if x_true is None else np.asarray(x_true, np.float64)
    # The exact side uses the float32-rounded numbers that the prior and likelihood see.
    self.prior_mean = _float32_exact(prior_mean)
    self.prior_scale_tril = _float32_exact(prior_scale_tril)
    self.matrix = _float32_exact(matrix)
    self.noise = float(_float32_exact(noise))
    self.dim = self.prior_mean.shape[0]
    y = _float32_exact(observation)
    self.prior = tfd.TransformedDistribution(
        _standard_base(self.dim),
        tfb.Chain([tfb.Shift(tf.constant(self.prior_mean, tf.float32)),
                   tfb.ScaleMatvecTriL(tf.constant(self.prior_scale_tril, tf.float32))]),
        name=name + "_prior")
    self.likelihood = likelihoods_lib.Gaussian(
        operators_lib.Linear(self.matrix.astype(np.float32)), self.noise)
    self.observation = y.astype(np.float32)
    self.mean, self.covariance = gaussian_posterior(
        self.prior_mean, self.prior_scale_tril @ self.prior_scale_tril.T, self.matrix,
        self.noise, y)
    self.scale_tril = np.linalg.cholesky(self.covariance)
    self._inv_tril = np.linalg.inv(self.scale_tril)
    self._log_norm = (np.log(np.diag(self.scale_tril)).sum()
                      + 0.5 * self.dim * np.log(2. * np.pi))

  def exact_log_prob(self, x):
    z = (_samples(x, self.dim) - self.mean) @ self._inv_tril.T
    return -0.5 * (z**2).sum(1) - self._log_norm

  def exact_sample(self, n, seed):
    n = _positive_int(n, "n")
    return self.mean + _rng(seed).standard_normal((n, self.dim)) @ self.scale_tril.T


def gaussian_posterior(prior_mean, prior_cov, matrix, noise, y):
  """Posterior mean and covariance of `x ~ N(mu, S0)`, `y = A x + N(0, s^2 I)` (float64).

  `K = S0 A^T (A S0 A^T + s^2 I)^-1`, `mean = mu + K (y - A mu)`, `cov = S0 - K A S0`,
  the latter in Joseph form `(I - K A) S0 (I - K A)^T + s^2 K K^T`, which stays positive
  definite when `S0` spans many decades.
  """
  a = np.asarray(matrix, np.float64)
  s0 = np.asarray(prior_cov, np.float64)
  gram = a @ s0 @ a.T + noise**2 * np.eye(a.shape[0])
  gain = np.linalg.solve(gram, a @ s0).T
  mean = prior_mean + gain @ (y - a @ prior_mean)
  # Joseph form of `S0 - K A S0`: symmetric positive definite by construction.
  reduce = np.eye(s0.shape[0]) - gain @ a
  cov = reduce @ s0 @ reduce.T + noise**2 * gain @ gain.T
  return mean, 0.5 * (cov + cov.T)


# ---------------------------------------------------------------------------
# The suite.

MAX_BLOCKS = 8

# `P(x_{b,1} > 0 | y)` of the bimodal blocks, which the prior locations below produce.
BIMODAL_MASSES = (0.7, 0.5, 0.85, 0.3, 0.5, 0.15, 0.6, 0.9)

_BIMODAL = dict(
    observation=(2.25, 2.0, 2.5, 2.25, 2.0, 2.5, 2.25, 2.0),
    # x_{b,1} ~ N(loc_1, 1) exactly (no skew, unit tail weight and scale); loc_1 solved for
    # BIMODAL_MASSES by bisection on a 1-D grid, rounded to 4 decimals.
    loc=[[0.2916, 0.], [0., 0.], [0.5636, 0.], [-0.2916, 0.], [0., 0.], [-0.5636, 0.],
         [0.1395, 0.], [0.8074, 0.]],
    skewness=[[0., 0.3], [0., -0.2], [0., 0.4], [0., -0.4], [0., 0.2], [0., 0.3], [0., -0.3],
              [0., 0.1]],
    tailweight=[[1., 1.], [1., 0.9], [1., 1.1], [1., 1.], [1., 0.9], [1., 1.1], [1., 1.],
                [1., 0.9]],
    scale=[[1., 0.7]] * MAX_BLOCKS,
    bend=[0.2, 0.1, 0.3, 0.2, 0.1, 0.3, 0.2, 0.1],
    shear=[0.6, -0.5, 0.3, -0.7, 0.5, -0.3, 0.7, -0.4],
    log_scale_slope=[0.3, -0.2, 0.4, -0.3, 0.2, -0.4, 0.3, -0.2],
)

_NONLINEAR = dict(
    observation=(1.5, 0.5, 2., 1., 0.3, 1.2, 2.5, 0.8),
    loc=[[0., -0.5], [0.2, 0.], [-0.2, -0.8], [0., 0.3], [0.3, -0.4], [-0.3, 0.], [0., -0.6],
         [0.1, 0.2]],
    skewness=[[0.3, -0.2], [-0.3, 0.4], [0.2, 0.3], [-0.4, -0.3], [0.4, 0.2], [0., -0.4],
              [-0.2, 0.3], [0.3, 0.]],
    tailweight=[[1., 0.9], [0.9, 1.1], [1.1, 1.], [1., 1.], [0.9, 0.9], [1.1, 1.1], [1., 0.9],
                [0.9, 1.]],
    scale=[[1., 0.5], [0.8, 0.6], [1., 0.4], [0.9, 0.5], [1.1, 0.6], [0.8, 0.4], [1., 0.5],
           [0.9, 0.6]],
    bend=[0.5, 0.4, 0.6, 0.3, 0.5, 0.7, 0.4, 0.6],
    shear=[0.3, -0.3, 0.2, -0.4, 0.4, -0.2, 0.3, -0.3],
    log_scale_slope=[0.3, -0.3, 0.4, -0.2, 0.3, -0.4, 0.2, -0.3],
)

_BIMODAL_NOISE = 0.4
_NONLINEAR_NOISE = 0.2


def _phaseless(u):
  """`h_b(x_b) = x_{b,1}^2`."""
  return u[..., 0]**2


def _cubic(u):
  """`h_b(x_b) = x_{b,1} + x_{b,2} + x_{b,1}^3 / 4`."""
  return u[..., 0] + u[..., 1] + 0.25 * u[..., 0]**3


def _sign_modes(u):
  """Mode `1` where `x_{b,1} > 0`, else `0`: `[n, B, 2] -> [n, B]`."""
  return (np.asarray(u)[..., 0] > 0).astype(np.int64)


def _table(table, num_blocks):
  num_blocks = _positive_int(num_blocks, "num_blocks", upper=MAX_BLOCKS)
  params = {k: np.asarray(v, np.float64)[:num_blocks] for k, v in table.items()
            if k != "observation"}
  return params, np.asarray(table["observation"], np.float64)[:num_blocks]


def _rotation(num_blocks, seed):
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"`seed` must be a non-negative integer, got {seed!r} of type "
                     f"{type(seed).__name__}.")
  return _random_orthogonal(2 * num_blocks, [int(seed), 2 * num_blocks])


def _rotations(name, num_blocks, rotation_seed, latent_rotation_seed):
  """The problem's name and its `Q` (after `f`) and `R` (before `f`), each `None` or seeded."""
  rotation = latent = None
  if rotation_seed is not None:
    rotation, name = _rotation(num_blocks, rotation_seed), "rotated_" + name
  if latent_rotation_seed is not None:
    latent, name = _rotation(num_blocks, latent_rotation_seed), "latent_rotated_" + name
  return name, rotation, latent


def bimodal_blocks(num_blocks=8, grid_size=512, rotation_seed=None,
                   latent_rotation_seed=None):
  """Phaseless block measurements `y_b = x_{b,1}^2 + N(0, 0.4^2)`: two modes per block.

  Args:
    num_blocks: positive int up to 8; the first `num_blocks` blocks (`D = 2 num_blocks`).
    grid_size: grid points per axis and block.
    rotation_seed: optional non-negative int: view the problem through the random
      orthogonal `Q` of this seed (`rotated_bimodal_blocks`).
    latent_rotation_seed: optional non-negative int: start the prior's flow with the random
      orthogonal `R` of this seed, `x = f(R z)` (`latent_rotated_bimodal_blocks`).

  Returns:
    A `BlockProblem` with `mode_masses[b] = (1 - BIMODAL_MASSES[b], BIMODAL_MASSES[b])`.
  """
  params, y = _table(_BIMODAL, num_blocks)
  name, rotation, latent = _rotations("bimodal_blocks", len(y), rotation_seed,
                                      latent_rotation_seed)
  return BlockProblem(name, params, _phaseless, y, ("gaussian", _BIMODAL_NOISE),
                      mode_fn=_sign_modes, num_modes=2, rotation=rotation,
                      latent_rotation=latent, grid_size=grid_size)


def nonlinear_blocks(num_blocks=8, grid_size=512, rotation_seed=None,
                     latent_rotation_seed=None):
  """A cubic sensor `y_b = x_{b,1} + x_{b,2} + x_{b,1}^3 / 4 + N(0, 0.2^2)` per block.

  Through a bent, sheared, skewed prior: curved, skewed, unimodal posteriors.

  Args:
    num_blocks: positive int up to 8; the first `num_blocks` blocks (`D = 2 num_blocks`).
    grid_size: grid points per axis and block.
    rotation_seed: optional non-negative int: view the problem through the random
      orthogonal `Q` of this seed (`rotated_nonlinear_blocks`).
    latent_rotation_seed: optional non-negative int: start the prior's flow with the random
      orthogonal `R` of this seed, `x = f(R z)` (`latent_rotated_nonlinear_blocks`).

  Returns:
    A `BlockProblem` (no modes).
  """
  params, y = _table(_NONLINEAR, num_blocks)
  name, rotation, latent = _rotations("nonlinear_blocks", len(y), rotation_seed,
                                      latent_rotation_seed)
  return BlockProblem(name, params, _cubic, y, ("gaussian", _NONLINEAR_NOISE),
                      rotation=rotation, latent_rotation=latent, grid_size=grid_size)


def rotated_bimodal_blocks(num_blocks=8, grid_size=512, seed=0):
  """`bimodal_blocks` seen through a random orthogonal `Q` (seeded): `x = Q u`."""
  return bimodal_blocks(num_blocks, grid_size, rotation_seed=seed)


def rotated_nonlinear_blocks(num_blocks=8, grid_size=512, seed=0):
  """`nonlinear_blocks` seen through a random orthogonal `Q` (seeded): `x = Q u`."""
  return nonlinear_blocks(num_blocks, grid_size, rotation_seed=seed)


def latent_rotated_bimodal_blocks(num_blocks=8, grid_size=512, seed=0):
  """`bimodal_blocks` with a random orthogonal `R` (seeded) first in the prior's flow.

  `x = f(R z)`: the same `p(x)`, observation and exact posterior in `x` as
  `bimodal_blocks`, but the latent posterior `p(z | y)` is not block-wise: the blocks'
  latent posterior is bimodal along the axes `w_{b,1}` and standard normal along the
  others (`x_{b,1} = loc_{b,1} + w_{b,1}`), so `p(z | y)` has its `2^B` modes along the
  rotated axes `R^T e_{2b-1}` and no latent coordinate separates them.
  """
  return bimodal_blocks(num_blocks, grid_size, latent_rotation_seed=seed)


def latent_rotated_nonlinear_blocks(num_blocks=8, grid_size=512, seed=0):
  """`nonlinear_blocks` with a random orthogonal `R` (seeded) first in the prior's flow.

  `x = f(R z)`: the same `p(x)` and exact posterior in `x` as `nonlinear_blocks`; the latent
  posterior `p(z | y)` mixes all blocks.
  """
  return nonlinear_blocks(num_blocks, grid_size, latent_rotation_seed=seed)


def linear_gaussian(dim=64, num_obs=None, noise=0.1, min_scale=1e-2, max_scale=1e1, seed=0):
  """Linear-Gaussian with prior scales spanning decades and full correlations.

  Prior `x = mu + L z`, `L L^T = S C S`: `S` holds `dim` marginal scales log-spaced over
  `[min_scale, max_scale]` in a seeded random order, `C` a random correlation matrix
  (normalized `W W^T / dim + I / 2`, `W_ij ~ N(0, 1)`), `mu = S n`, `n ~ N(0, I)`.
  Observation `y = A x* + N(0, noise^2 I)`, `A_ij ~ N(0, 1 / dim)`, `x*` a prior draw.

  Args:
    dim: positive int, `D`.
    num_obs: positive int, `m` (default `D // 2`, at least 1).
    noise: positive float, the noise standard deviation `s`.
    min_scale, max_scale: positive floats, the range of the prior's marginal scales.
    seed: non-negative int.

  Returns:
    A `GaussianProblem` named `linear_gaussian_{dim}`.
  """
  dim = _positive_int(dim, "dim")
  num_obs = max(dim // 2, 1) if num_obs is None else _positive_int(num_obs, "num_obs")
  if not (np.isfinite(noise) and noise > 0):
    raise ValueError(f"`noise` must be positive and finite, got {noise!r}.")
  if not (0 < min_scale <= max_scale < np.inf):
    raise ValueError(f"`min_scale` and `max_scale` must satisfy 0 < min_scale <= max_scale, "
                     f"got {min_scale!r} and {max_scale!r}.")
  rng = _rng(seed)
  scales = rng.permutation(np.geomspace(min_scale, max_scale, dim))
  w = rng.standard_normal((dim, dim))
  gram = w @ w.T / dim + 0.5 * np.eye(dim)
  corr = gram / np.sqrt(np.outer(np.diag(gram), np.diag(gram)))
  cov = corr * np.outer(scales, scales)
  tril = np.linalg.cholesky(cov)
  mu = scales * rng.standard_normal(dim)
  matrix = rng.standard_normal((num_obs, dim)) / np.sqrt(dim)
  x_true = mu + tril @ rng.standard_normal(dim)
  y = matrix @ x_true + noise * rng.standard_normal(num_obs)
  return GaussianProblem(f"linear_gaussian_{dim}", mu, tril, matrix, noise, y, x_true=x_true)


def linear_gaussian_64(seed=0):
  """`linear_gaussian(dim=64, num_obs=32, noise=0.1, seed=seed)`."""
  return linear_gaussian(dim=64, num_obs=32, noise=0.1, seed=seed)


PROBLEMS = {
    "bimodal_blocks": bimodal_blocks,
    "nonlinear_blocks": nonlinear_blocks,
    "rotated_bimodal_blocks": rotated_bimodal_blocks,
    "rotated_nonlinear_blocks": rotated_nonlinear_blocks,
    "latent_rotated_bimodal_blocks": latent_rotated_bimodal_blocks,
    "latent_rotated_nonlinear_blocks": latent_rotated_nonlinear_blocks,
    "linear_gaussian_64": linear_gaussian_64,
}


def get(name, **kwargs):
  """Builds the problem `PROBLEMS[name](**kwargs)`.

  Args:
    name: one of `PROBLEMS`.
    **kwargs: the constructor's arguments, e.g. `num_blocks=2` for the block problems.

  Returns:
    A `Problem`.
  """
  if name not in PROBLEMS:
    raise ValueError(f"`name` must be one of {sorted(PROBLEMS)}, got {name!r}.")
  return PROBLEMS[name](**kwargs)


# ---------------------------------------------------------------------------
# Small exact problems used by the unit tests of the posterior.


class LinearGaussian:
  """`x = L z + mu`, `z ~ N(0, I)`; `y = A x + N(0, s^2 I)`: a closed-form posterior.

  `L` is lower triangular with diagonal scales spanning two decades; its variables (`mu`,
  `L`) are `tf.Variable`s so that tests can check that fitting leaves them untouched.
  """

  def __init__(self, dim, num_obs, noise, seed=0, matrix=None):
    rng = np.random.RandomState(seed)
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
    """The exact posterior as a `tfd.MultivariateNormalTriL` (float64)."""
    return tfd.MultivariateNormalTriL(self.mean, tf.linalg.cholesky(self.cov))


def mc_kl(posterior, exact_log_prob, num_samples=20000, seed=7):
  """Monte Carlo `KL(q || p) = E_q[log q(x) - log p(x)]`, its standard error, and the draws."""
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
  """A 2-D posterior `p(x | y) ~ p(x) p(y | x)` normalized on a uniform grid.

  The density is evaluated in float32 through `prior.log_prob + likelihood.log_prob`
  at the `n x n` grid points of the box `[lo, hi]`; the boundary must carry less than
  1e-6 of the peak density.
  """

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
    edge = self.density.reshape(n, n)
    if max(edge[0].max(), edge[-1].max(), edge[:, 0].max(), edge[:, -1].max()) >= \
        1e-6 * self.density.max():
      raise ValueError(f"grid too small: the boundary of [{lo}, {hi}] carries more than "
                       "1e-6 of the peak density.")

  def unnormalized(self, x):
    """`log p(x) + log p(y | x)` at `[n, 2]` points (float32 evaluation, float64 result)."""
    x = tf.constant(x, tf.float32)
    return (self.prior.log_prob(x) + self.likelihood.log_prob(self.observation, x)).numpy() \
        .astype(np.float64)

  def log_prob(self, x):
    return self.unnormalized(x) - self.log_z

  def mass(self, predicate):
    """Posterior mass of the points where `predicate(grid)` holds."""
    return float(self.density[predicate(self.grid)].sum() * self.cell)
