"""Diagnostics: is an approximate posterior, or a set of MCMC chains, to be trusted?

Importance weights. For a density method with draws `z_i ~ q(z)` and exact `log q(z_i)`, the
importance log-weights against the unnormalized latent target `t(z) = log p_base(z) +
log p(y | f(z))` (the prior's Jacobian cancels: they are also the weights of `p(x | y)` vs
`q(x)`) are

    log w_i = t(z_i) - log q(z_i),

and with `n` draws

    ELBO       = (1/n) sum_i log w_i                          <= log p(y)
    IW bound   = logsumexp_i(log w_i) - log n                  <= log p(y)  (in expectation)
    gap        = IW bound - ELBO                               >= 0
    ESS        = (sum_i w_i)^2 / sum_i w_i^2,   ESS fraction = ESS / n.

`KL(q || p(. | y)) = log p(y) - E[ELBO]`, so the gap estimates (a lower bound of) the KL when
the IW bound is close to `log p(y)`. The Pareto shape `k-hat` of the largest weights is
PSIS's estimate [1, 2] (computed by ArviZ, `arviz.psislw`): importance sampling, and hence
`q`, is trustworthy when

    k-hat < min(1 - 1 / log10(n), 0.7)                                           [2, Sec. 3]

(0.7 for n >= 2,154 draws). Above it the weights' variance is effectively infinite and
the IW bound and ESS are unreliable, however many draws are taken.

MCMC. `effective_sample_size` and `potential_scale_reduction` wrap `tfp.mcmc`'s estimators on
draws `[num_draws, num_chains] + event_shape` (cross-chain ESS, split R-hat [3]).

#### References

[1]: Aki Vehtari, Andrew Gelman, Jonah Gabry. Pareto Smoothed Importance Sampling.
     arXiv:1507.02646, 2015.
[2]: Aki Vehtari, Daniel Simpson, Andrew Gelman, Yuling Yao, Jonah Gabry. Pareto Smoothed
     Importance Sampling. _Journal of Machine Learning Research_ 25(72), 2024.
[3]: Aki Vehtari, Andrew Gelman, Daniel Simpson, Bob Carpenter, Paul-Christian Buerkner.
     Rank-normalization, folding, and localization: an improved R-hat for assessing
     convergence of MCMC. _Bayesian Analysis_ 16(2), 2021.
"""

import dataclasses
import math
import warnings
import weakref

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_composed import checks

__all__ = [
    "ImportanceDiagnostics",
    "diagnose",
    "effective_sample_size",
    "importance_diagnostics",
    "k_hat_threshold",
    "mcmc_summary",
    "pareto_k_hat",
    "potential_scale_reduction",
]

# The PSIS literature's ceiling on k-hat [2].
K_HAT_MAX = 0.7


@dataclasses.dataclass
class ImportanceDiagnostics:
  """Importance-weight diagnostics of an approximate posterior (see the module docstring).

  Attributes:
    elbo: mean log-weight over the finite weights, nats.
    iw_bound: `logsumexp(log w) - log n` over all `n` weights (non-finite ones count as 0).
    gap: `iw_bound - elbo`.
    ess: importance-weight effective sample size `(sum w)^2 / sum w^2`.
    ess_fraction: `ess / n`.
    k_hat: PSIS Pareto shape estimate.
    k_hat_threshold: `min(1 - 1/log10(n), 0.7)`.
    num_samples: `n`.
    num_nonfinite: draws whose log-weight is not finite (the prior's forward pass overflowed:
      a zero weight; or NaN).
    trustworthy: `k_hat < k_hat_threshold` and every log-weight finite or `-inf`.
  """
  elbo: float
  iw_bound: float
  gap: float
  ess: float
  ess_fraction: float
  k_hat: float
  k_hat_threshold: float
  num_samples: int
  num_nonfinite: int
  trustworthy: bool

  def summary(self):
    """One line for logs."""
    return (f"ELBO {self.elbo:.4g}, IW bound {self.iw_bound:.4g} (gap {self.gap:.3g}), "
            f"ESS {self.ess:.1f}/{self.num_samples} ({100 * self.ess_fraction:.1f}%), "
            f"k-hat {self.k_hat:.2f} ({'<' if self.k_hat < self.k_hat_threshold else '>='} "
            f"{self.k_hat_threshold:.2f}: {'trustworthy' if self.trustworthy else 'not trustworthy'})")

  def as_dict(self):
    return dataclasses.asdict(self)


def k_hat_threshold(num_samples):
  """`min(1 - 1 / log10(n), 0.7)`: the sample-size dependent k-hat threshold of [2]."""
  n = checks.integer(num_samples, "num_samples", minimum=2)
  return min(1. - 1. / math.log10(n), K_HAT_MAX) if n > 10 else 0.


def pareto_k_hat(log_weights):
  """PSIS Pareto shape `k-hat` of finite log-weights (ArviZ's `psislw`)."""
  lw = np.asarray(log_weights, np.float64).reshape(-1)
  lw = lw[np.isfinite(lw)]
  if lw.size < 5:
    return float("inf")
  with warnings.catch_warnings():
    # ArviZ announces its refactor on import and warns for k-hat > 0.7 (`trustworthy` says so).
    warnings.simplefilter("ignore")
    import arviz  # pylint: disable=g-import-not-at-top  # Heavy; only needed here.
    _, k_hat = arviz.psislw(lw - lw.max())
  return float(np.asarray(k_hat).reshape(-1)[0])


def importance_diagnostics(log_weights):
  """`ImportanceDiagnostics` of log-weights `log w_i = log p~(z_i) - log q(z_i)`, `z_i ~ q`.

  Args:
    log_weights: array `[n]` (any shape is flattened); `-inf` is a zero weight, NaN is
      dropped and counted.
  """
  lw = np.asarray(log_weights, np.float64).reshape(-1)
  n = lw.size
  if n < 2:
    raise ValueError(f"`log_weights` must hold at least 2 values, got {n}.")
  if np.any(lw == np.inf):
    raise ValueError("`log_weights` must not contain +inf (a density q of zero at a draw of q).")
  nan = np.isnan(lw)
  finite = np.isfinite(lw)
  if not finite.any():
    raise ValueError(f"`log_weights` has no finite value (of {n}).")
  valid = lw[~nan]
  m = valid[np.isfinite(valid)].max()
  w = np.exp(valid - m)  # exp(-inf) = 0.
  iw_bound = m + math.log(w.sum()) - math.log(n)
  elbo = float(lw[finite].mean())
  ess = float(w.sum()**2 / np.sum(w**2))
  k_hat = pareto_k_hat(lw[finite])
  threshold = k_hat_threshold(n)
  return ImportanceDiagnostics(
      elbo=elbo, iw_bound=float(iw_bound), gap=float(iw_bound - elbo), ess=ess,
      ess_fraction=ess / n, k_hat=k_hat, k_hat_threshold=threshold, num_samples=n,
      num_nonfinite=int(n - finite.sum()),
      trustworthy=bool(k_hat < threshold and not nan.any()))


# posterior -> its compiled `_compile_log_weights` function; entries die with the posterior.
_LOG_WEIGHT_FNS = weakref.WeakKeyDictionary()


def _compile_log_weights(posterior_ref):
  """`(count, seed) -> log w` of `count` draws, compiled; `posterior_ref()` is the posterior."""

  @tf.function(reduce_retracing=True)
  def log_weights(count, batch_seed):
    posterior = posterior_ref()
    z, log_q = posterior.latent_sample_and_log_prob(count, seed=batch_seed)
    return posterior.target.log_prob(z) - log_q

  return log_weights


def _log_weights_fn(posterior):
  """The compiled log-weight function of `posterior`: one per posterior object, so repeated
  diagnoses (one after every `fit`) do not retrace, each trace holding memory TF never
  returns. The cache holds the posterior weakly: it does not keep it alive."""
  try:
    fn = _LOG_WEIGHT_FNS.get(posterior)
  except TypeError:  # Not weakly referenceable or not hashable: no reuse.
    return _compile_log_weights(lambda: posterior)
  if fn is None:
    fn = _LOG_WEIGHT_FNS[posterior] = _compile_log_weights(weakref.ref(posterior))
  return fn


def importance_log_weights(posterior, num_samples=4096, seed=0, batch_size=1024):
  """`log w = target(z) - log q(z)` for `z ~ q(z)` of a `ComposedPosterior`, NumPy `[n]`.

  Draws in batches of `batch_size`; batch `b` uses the stateless seed `fold_in(seed, b)`.
  """
  num_samples = checks.integer(num_samples, "num_samples", minimum=2)
  batch_size = checks.positive_integer(batch_size, "batch_size")
  seed = checks.seed(seed)
  base = tf.constant([seed % 2**31, (seed // 2**31) % 2**31], tf.int32)

  batch = _log_weights_fn(posterior)
  out = []
  for b, start in enumerate(range(0, num_samples, batch_size)):
    count = min(batch_size, num_samples - start)
    out.append(batch(count, tf.random.experimental.stateless_fold_in(base, b)).numpy())
  return np.concatenate(out).astype(np.float64)


def diagnose(posterior, num_samples=4096, seed=0, batch_size=1024):
  """Importance-weight diagnostics of a fitted `ComposedPosterior` (see the module docstring).

  `trustworthy` is `k_hat < min(1 - 1/log10(num_samples), 0.7)` (Vehtari et al. [2]).

  #### Examples

  ```python
  posterior.fit(seed=0)
  d = tfc.diagnostics.diagnose(posterior, num_samples=4096, seed=1)
  d.iw_bound, d.k_hat, d.trustworthy
  ```

  Args:
    posterior: a `ComposedPosterior` (anything with `latent_sample_and_log_prob` and
      `target`).
    num_samples: number of draws `n` from `q`.
    seed: int.
    batch_size: draws per forward pass.

  Returns:
    `ImportanceDiagnostics`.
  """
  if not (hasattr(posterior, "latent_sample_and_log_prob") and hasattr(posterior, "target")):
    raise TypeError(
        "`posterior` must be a tfc.ComposedPosterior (with `latent_sample_and_log_prob` and "
        f"`target`), got {type(posterior).__name__}.")
  return importance_diagnostics(
      importance_log_weights(posterior, num_samples, seed, batch_size))


def _draws(draws, name="draws"):
  draws = tf.convert_to_tensor(draws, dtype_hint=tf.float64)
  if draws.shape.rank is None or draws.shape.rank < 2:
    raise ValueError(
        f"`{name}` must have shape [num_draws, num_chains] + event_shape, got {draws.shape}.")
  return tf.cast(draws, tf.float64)


def effective_sample_size(draws):
  """Cross-chain ESS (`tfp.mcmc.effective_sample_size`) of draws `[R, C] + event`: `event`."""
  draws = _draws(draws)
  if draws.shape[0] < 2:
    raise ValueError(f"`draws` must hold at least 2 draws per chain, got {draws.shape[0]}.")
  cross = 1 if draws.shape[1] > 1 else None
  return tfp.mcmc.effective_sample_size(draws, cross_chain_dims=cross).numpy()


def potential_scale_reduction(draws, split_chains=True):
  """Split R-hat (`tfp.mcmc.potential_scale_reduction`) of draws `[R, C] + event`: `event`."""
  draws = _draws(draws)
  if draws.shape[0] < (4 if split_chains else 2):
    raise ValueError(
        f"`draws` must hold at least {4 if split_chains else 2} draws per chain, got "
        f"{draws.shape[0]}.")
  return tfp.mcmc.potential_scale_reduction(
      draws, independent_chain_ndims=1, split_chains=split_chains).numpy()


def mcmc_summary(draws):
  """`{"ess", "ess_min", "rhat", "rhat_max"}` of draws `[R, C] + event` (arrays `event`).

  Fewer than 4 draws per chain give NaN.
  """
  draws = _draws(draws)
  if draws.shape[0] < 4:
    nan = np.full(draws.shape[2:], np.nan)
    return {"ess": nan, "ess_min": float("nan"), "rhat": nan, "rhat_max": float("nan")}
  ess = effective_sample_size(draws)
  rhat = potential_scale_reduction(draws)
  return {"ess": ess, "ess_min": float(np.min(ess)), "rhat": rhat,
          "rhat_max": float(np.max(rhat))}
