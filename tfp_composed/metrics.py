r"""Metrics of posterior samples on an inverse problem: quality, calibration, consistency.

Given samples `x_1..x_n ~ q(x | y)` of a method, the true image `x*` and the task that made
`y ~ p(y | x*)` (`tfc.tasks`), these score:

- quality: PSNR and SSIM (`tf.image.psnr` / `tf.image.ssim`, `max_val = 1`) of the posterior
  mean `xbar = mean_i x_i` and the best of the first `k = 16` samples;
- calibration: the coverage `mean_{j in U} 1[lo_j <= x*_j <= hi_j]` of per-pixel central
  intervals at level `a` (`lo_j`, `hi_j` the `(1 - a) / 2`, `(1 + a) / 2` sample quantiles)
  over the unobserved pixels `U` (target `a`), and, where the method has a density, the rank
  `r = (#{i: log q(x_i) < log q(x*)} + #{i: log q(x_i) = log q(x*)} / 2) / n` of the truth's
  log density among the samples' (uniform on [0, 1] across problems when `x* ~ q`; near 0 when
  `q` is too narrow or misplaced, near 1 when too wide);
- consistency: the normalized residual
  `rho(x) = sqrt(mean_i ((y_i - E[y_i | x]) / sd[y_i | x])^2)`, which for Gaussian noise is
  `||y - A(x)|| / (sigma sqrt(m))`; about 1 for `x = x*`;
- spread: per-pixel posterior standard deviations and the sample diversity
  `mean_{i < l} ||x_i - x_l||_2`.

Samples with a NaN or Inf entry (a flow prior can overflow far from its data) are counted and
left out of every metric. Images live in `[0, 1]`: samples are clipped to `[0, 1]` for the
image metrics (PSNR, SSIM, intervals, standard deviations, diversity); the residuals use the
unclipped samples, which the likelihood scored.

#### Examples

```python
import tfp_composed as tfc

task = tfc.tasks.get("inpaint_lower_half", image_shape=[28, 28, 1])
y = task.observe(x_true, seed=0)
samples = posterior.sample(256).numpy()
row = tfc.metrics.summarize(samples, x_true, task, observation=y,
                            log_q=posterior.log_prob(samples), log_q_true=posterior.log_prob(x_true))
row["psnr_mean"], row["coverage_90"], row["log_q_rank"]
```
"""

import math

import numpy as np
import tensorflow as tf

from tfp_composed import diagnostics

__all__ = [
    "BEST_OF_K",
    "COVERAGE_LEVELS",
    "IMPORTANCE_KEYS",
    "best_of_k",
    "central_interval",
    "coverage",
    "diversity",
    "finite_rows",
    "importance_summary",
    "log_prob_rank",
    "normalized_residual",
    "posterior_std",
    "psnr",
    "ssim",
    "ssim_filter_size",
    "summarize",
]

BEST_OF_K = 16
COVERAGE_LEVELS = (0.25, 0.5, 0.75, 0.9, 0.95)


def _as_images(x, name, image_shape=None):
  """`x` as a float32 NumPy array `[n, H, W, C]` (one image `[H, W, C]` becomes `n = 1`)."""
  arr = np.asarray(x.numpy() if tf.is_tensor(x) else x)
  if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
    raise TypeError(f"`{name}` must be a real array, got dtype {arr.dtype}.")
  arr = arr.astype(np.float32)
  if arr.ndim == 3:
    arr = arr[None]
  if arr.ndim != 4:
    raise ValueError(f"`{name}` must have shape [n, H, W, C] or [H, W, C], got {list(arr.shape)}.")
  if image_shape is not None and tuple(arr.shape[1:]) != tuple(image_shape):
    raise ValueError(f"`{name}` must have image shape {list(image_shape)}, got "
                     f"{list(arr.shape[1:])}.")
  return arr


def _check_level(level):
  if isinstance(level, bool) or not isinstance(level, (float, int, np.floating)) or not (
      0. < level < 1.):
    raise ValueError(f"`level` must be a float in (0, 1), got {level!r}.")
  return float(level)


def _positive_int(value, name):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
  return int(value)


def finite_rows(samples):
  """Boolean `[n]`: true where sample `i` has no NaN or Inf entry."""
  arr = np.asarray(samples)
  return np.all(np.isfinite(arr.reshape(arr.shape[0], -1)), axis=1)


def ssim_filter_size(image_shape):
  """SSIM window: 11 (the standard) or `min(H, W) // 2 + 1` when the image is smaller."""
  return int(min(11, min(image_shape[0], image_shape[1]) // 2 + 1))


def psnr(x, x_true, max_val=1.):
  """`10 log10(max_val^2 / mean_j (x_j - x*_j)^2)` per image: float64 `[n]`."""
  x = _as_images(x, "x")
  x_true = _as_images(x_true, "x_true", x.shape[1:])
  return tf.image.psnr(x, x_true, max_val=max_val).numpy().astype(np.float64)


def ssim(x, x_true, max_val=1., filter_size=None):
  """SSIM of each image against `x_true` (`tf.image.ssim`, `filter_sigma = 1.5`): float64 `[n]`.

  `filter_size` defaults to `ssim_filter_size(image_shape)` (11 for 28 x 28, 5 for 8 x 8).
  """
  x = _as_images(x, "x")
  x_true = _as_images(x_true, "x_true", x.shape[1:])
  size = ssim_filter_size(x.shape[1:]) if filter_size is None else filter_size
  x_true = np.broadcast_to(x_true, x.shape)
  return tf.image.ssim(x, x_true, max_val=max_val, filter_size=size).numpy().astype(np.float64)


def best_of_k(values, k=BEST_OF_K):
  """`max(values[:k])`, the score of the best of the first `k` samples."""
  k = _positive_int(k, "k")
  values = np.asarray(values, np.float64)
  if values.size == 0:
    raise ValueError("`values` must not be empty.")
  return float(np.max(values[:k]))


def central_interval(samples, level):
  """Per-entry sample quantiles `(lo, hi)` at `(1 - level) / 2` and `(1 + level) / 2`."""
  level = _check_level(level)
  samples = np.asarray(samples, np.float64)
  lo, hi = np.quantile(samples, [(1. - level) / 2., (1. + level) / 2.], axis=0)
  return lo, hi


def coverage(samples, x_true, level=0.9, where=None):
  """`mean_{j in where} 1[lo_j <= x*_j <= hi_j]` for per-entry central intervals at `level`.

  Args:
    samples: `[n, ...]` draws of `q`, finite, `n >= 2`.
    x_true: the truth, shape `samples.shape[1:]`.
    level: float in (0, 1), the nominal coverage of each interval.
    where: optional boolean array of the truth's shape; entries scored (default: all).

  Returns:
    Python float in [0, 1]; about `level` when `x*_j ~ q_j` independently.
  """
  samples = np.asarray(samples, np.float64)
  x_true = np.asarray(x_true, np.float64)
  if samples.ndim < 1 or samples.shape[0] < 2:
    raise ValueError(f"`samples` must hold at least 2 draws, got shape {list(samples.shape)}.")
  if samples.shape[1:] != x_true.shape:
    raise ValueError(f"`x_true` must have shape {list(samples.shape[1:])} (a sample's), got "
                     f"{list(x_true.shape)}.")
  lo, hi = central_interval(samples, level)
  inside = (lo <= x_true) & (x_true <= hi)
  if where is not None:
    where = np.asarray(where, bool)
    if where.shape != x_true.shape or not where.any():
      raise ValueError(f"`where` must be a non-empty boolean mask of shape "
                       f"{list(x_true.shape)}, got shape {list(where.shape)} with "
                       f"{int(where.sum())} true entries.")
    inside = inside[where]
  return float(np.mean(inside))


def log_prob_rank(log_q, log_q_true):
  """`(#{i: l_i < l*} + #{i: l_i = l*} / 2) / n` for `l_i = log q(x_i)`, `l* = log q(x*)`.

  Uniform on [0, 1] across problems when `x* ~ q`; near 0 when the truth lies where `q` puts
  little mass (too narrow or misplaced), near 1 when `q` is too wide.
  """
  log_q = np.asarray(log_q, np.float64).ravel()
  log_q_true = float(np.asarray(log_q_true, np.float64).reshape(()))
  if log_q.size == 0:
    raise ValueError("`log_q` must not be empty.")
  if not np.all(np.isfinite(log_q)) or not np.isfinite(log_q_true):
    raise ValueError("`log_q` and `log_q_true` must be finite.")
  return float((np.sum(log_q < log_q_true) + 0.5 * np.sum(log_q == log_q_true)) / log_q.size)


def normalized_residual(likelihood, y, x):
  """`rho(x) = sqrt(mean_i ((y_i - E[y_i | x]) / sd[y_i | x])^2)` per row of `x`: float64 `[n]`.

  For Gaussian noise of scale `sigma` this is `||y - A(x)|| / (sigma sqrt(m))`; it is about 1
  when `y ~ p(y | x)`.
  """
  x = tf.convert_to_tensor(np.asarray(x, np.float32))
  dist = likelihood.distribution(x)
  y = tf.cast(tf.convert_to_tensor(y), dist.dtype)
  z = (y - dist.mean()) / dist.stddev()
  axes = list(range(1, z.shape.rank))
  return np.sqrt(tf.reduce_mean(tf.square(z), axis=axes).numpy().astype(np.float64))


def posterior_std(samples):
  """Per-entry sample standard deviation (`ddof = 0`) over the first axis."""
  return np.asarray(samples, np.float64).std(axis=0)


def diversity(samples, max_samples=64):
  """`mean_{i < l} ||x_i - x_l||_2` over the first `max_samples` samples (`n >= 2`)."""
  max_samples = _positive_int(max_samples, "max_samples")
  flat = np.asarray(samples, np.float64)
  flat = flat.reshape(flat.shape[0], -1)[:max_samples]
  n = flat.shape[0]
  if n < 2:
    raise ValueError(f"`samples` must hold at least 2 draws, got {n}.")
  sq = np.sum(flat**2, axis=1)
  d2 = np.maximum(sq[:, None] + sq[None, :] - 2. * flat @ flat.T, 0.)
  i, l = np.triu_indices(n, 1)
  return float(np.mean(np.sqrt(d2[i, l])))


def _level_key(level):
  return f"coverage_{int(round(100 * level))}"


IMPORTANCE_KEYS = ("elbo", "iw_bound", "ess_fraction", "k_hat")


def importance_summary(log_joint, log_q, finite=None):
  """`{elbo, iw_bound, ess_fraction, k_hat}` of the weights `exp(log_joint - log_q)`.

  Rows where `finite` is False (a sample that is not finite) or `log_joint` is not finite
  are zero weights; rows with a non-finite `log_q` are left out. All None without a finite
  weight.
  """
  log_joint = np.asarray(log_joint, np.float64).ravel()
  log_q = np.asarray(log_q.numpy() if tf.is_tensor(log_q) else log_q, np.float64).ravel()
  if log_joint.shape != log_q.shape:
    raise ValueError(f"`log_joint` must hold one value per sample ({log_q.shape[0]}), got "
                     f"{log_joint.shape[0]}.")
  keep = np.ones(log_q.shape, bool) if finite is None else np.asarray(finite, bool)
  zero = ~keep | ~np.isfinite(log_joint)
  log_w = np.where(zero, -np.inf, log_joint - np.where(zero, 0., log_q))[np.isfinite(log_q)]
  if log_w.size < 2 or not np.isfinite(log_w).any():
    return {key: None for key in IMPORTANCE_KEYS}
  d = diagnostics.importance_diagnostics(log_w)
  return {"elbo": d.elbo, "iw_bound": d.iw_bound, "ess_fraction": d.ess_fraction,
          "k_hat": d.k_hat if math.isfinite(d.k_hat) else None}


def summarize(samples, x_true, task, log_q=None, log_q_true=None, observation=None,
              k=BEST_OF_K, levels=COVERAGE_LEVELS, log_joint=None):
  """Every metric of one method on one problem, as a flat dict of numbers (or `None`).

  Args:
    samples: `[n, H, W, C]` posterior draws (NumPy or tensor); non-finite rows are left out.
    x_true: the true image `[H, W, C]`.
    task: the `tfc.tasks.Task` (its `unobserved_mask` and `likelihood` are used).
    log_q: optional `[n]` log densities of the samples under the method's `q`.
    log_q_true: optional scalar `log q(x_true)`; with `log_q`, gives `log_q_rank`.
    observation: optional `y`; gives the normalized residuals.
    k: best-of-`k` for `psnr_best_of_<k>` and `ssim_best_of_<k>`.
    levels: nominal levels of the `coverage_<100 level>` entries.
    log_joint: optional `[n]` values of `log p(x_i) + log p(y | x_i)` at the samples; with
      `log_q`, the importance weights `w_i = p(x_i, y) / q(x_i)` give `elbo`, `iw_bound` (on
      `log p(y)`), `ess_fraction` and `k_hat` (`tfc.diagnostics.importance_diagnostics`;
      a non-finite sample or joint is a zero weight, a non-finite `log_q` is left out).

  Returns:
    dict: `num_samples`, `num_nonfinite`, `psnr_mean`, `ssim_mean`, `mse_mean_unobserved`,
    `psnr_best_of_<k>`, `ssim_best_of_<k>`, `coverage_<l>` for each level, `log_q_rank`,
    `residual_of_mean`, `residual_median`, `residual_true`, `std_mean`, `std_unobserved`,
    `diversity`, `elbo`, `iw_bound`, `ess_fraction`, `k_hat`. Entries that need what is missing
    (a density, an observation, two finite samples) are `None`.
  """
  k = _positive_int(k, "k")
  levels = tuple(_check_level(level) for level in levels)
  x_true = _as_images(x_true, "x_true", task.image_shape)[0]
  samples = _as_images(samples, "samples", task.image_shape)
  finite = finite_rows(samples)
  raw = samples[finite]
  out = {"num_samples": int(samples.shape[0]), "num_nonfinite": int(np.sum(~finite))}
  names = (["psnr_mean", "ssim_mean", "mse_mean_unobserved", f"psnr_best_of_{k}",
            f"ssim_best_of_{k}"] + [_level_key(level) for level in levels] +
           ["log_q_rank", "residual_of_mean", "residual_median", "residual_true", "std_mean",
            "std_unobserved", "diversity"] + list(IMPORTANCE_KEYS))
  out.update({name: None for name in names})
  if log_q is not None and log_joint is not None:
    out.update(importance_summary(log_joint, log_q, finite))
  unobserved = task.unobserved_mask
  if observation is not None:
    out["residual_true"] = float(normalized_residual(task.likelihood, observation,
                                                     x_true[None])[0])
  if raw.shape[0] == 0:
    return out
  x = np.clip(raw, 0., 1.)
  mean = x.mean(axis=0)
  out["psnr_mean"] = float(psnr(mean, x_true)[0])
  out["ssim_mean"] = float(ssim(mean, x_true)[0])
  out["mse_mean_unobserved"] = float(np.mean((mean[unobserved] - x_true[unobserved])**2))
  first_k = x[:k]
  out[f"psnr_best_of_{k}"] = best_of_k(psnr(first_k, x_true), k)
  out[f"ssim_best_of_{k}"] = best_of_k(ssim(first_k, x_true), k)
  std = posterior_std(x)
  out["std_mean"] = float(std.mean())
  out["std_unobserved"] = float(std[unobserved].mean())
  if x.shape[0] >= 2:
    for level in levels:
      out[_level_key(level)] = coverage(x, x_true, level, where=unobserved)
    out["diversity"] = diversity(x)
  if observation is not None:
    out["residual_of_mean"] = float(normalized_residual(task.likelihood, observation,
                                                        raw.mean(axis=0)[None])[0])
    out["residual_median"] = float(np.median(normalized_residual(task.likelihood, observation,
                                                                 raw)))
  if log_q is not None and log_q_true is not None:
    log_q = np.asarray(log_q.numpy() if tf.is_tensor(log_q) else log_q, np.float64).ravel()
    if log_q.shape[0] != samples.shape[0]:
      raise ValueError(f"`log_q` must hold one value per sample ({samples.shape[0]}), got "
                       f"{log_q.shape[0]}.")
    log_q = log_q[finite]
    log_q = log_q[np.isfinite(log_q)]
    log_q_true = float(np.asarray(log_q_true).reshape(()))
    if log_q.size and np.isfinite(log_q_true):
      out["log_q_rank"] = log_prob_rank(log_q, log_q_true)
  return out
