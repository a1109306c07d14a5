"""Methods built on the composed posterior: `composed`, `composed_sir`, `neutra_hmc`.

* `composed`: `ComposedPosterior(prior, likelihood, y).fit(...)` with `fit()`'s defaults
  (Laplace start, its number of steps, batch size and learning rate) [1]; under a budget,
  `fit(time_limit=...)` plans the steps that fit the time left after the start, so its
  annealing and learning-rate schedules finish in time (a callback also stops it at the
  deadline); then `num_samples` draws with exact `log q(x)`.

All three accept `posterior=` (a fitted `ComposedPosterior` of the same prior and observation,
e.g. `info["posterior"]` of an earlier run) to skip the fit, and otherwise the
`ComposedPosterior` options `num_components`, `pregenerator` and any `fit` argument
(`neutra_hmc`: in `fit_options`).
* `composed_sir`: sampling-importance-resampling [2] from the fitted `q`: `M = num_proposals`
  (default `10 n`) latents `z_j ~ q(z)` with `log q(z_j)` from `g`'s forward pass,
  `log w_j = t(z_j) - log q(z_j)`, and `n` multinomial draws with probabilities
  `w_j / sum w`. As `M -> inf` the draws follow `p(x | y)`; the resampled law has no density
  (`log_prob` None). `fit_fraction` (default 0.9) of the budget goes to the fit.
* `neutra_hmc`: HMC in the pre-generator's base space [3]:
  `tfp.mcmc.TransformedTransitionKernel(HMC(t), posterior.latent_bijector)` samples
  `eps` with density `t(g(eps)) + log|det dg/deps|`, under dual-averaging step-size
  adaptation; chains start from draws of `q`'s base. `fit_fraction` (default 0.5) of the
  budget goes to the fit, the rest to HMC (`num_steps` counts HMC transitions; the fit uses
  its own defaults or `fit_options`).

#### References

[1]: Jay Whang, Erik M. Lindgren, Alexandros G. Dimakis. Composing Normalizing Flows for
     Inverse Problems. In _ICML_, 2021.
[2]: Donald B. Rubin. Using the SIR algorithm to simulate posterior distributions. In
     _Bayesian Statistics 3_, 1988.
[3]: Matthew Hoffman, Pavel Sountsov, Joshua V. Dillon, Ian Langmore, Dustin Tran, Srinivas
     Vasudevan. NeuTra-lizing Bad Geometry in Hamiltonian Monte Carlo Using Neural Transport.
     arXiv:1903.03704, 2019.
"""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_composed import checks
from tfp_composed import diagnostics
from tfp_composed.baselines import _core
from tfp_composed.baselines import mcmc as mcmc_lib

__all__ = ["composed", "composed_sir", "fit_composed", "neutra_hmc"]

# Constructor options of ComposedPosterior; every other option goes to `fit`.
_POSTERIOR_OPTIONS = ("pregenerator", "num_components", "base")
# Share of a budget kept back for drawing the returned samples after a fit.
_SAMPLING_RESERVE = 0.05
# `time_limit` given to a budgeted fit whose clock has (nearly) run out.
_MIN_FIT_SECONDS = 1e-3



def fit_composed(problem, clock, num_steps, seed, options):
  """Builds and fits a `ComposedPosterior`; returns `(posterior, info)`.

  The fit stops at `num_steps` (default: `fit()`'s) or when `clock` runs out. With the
  option `posterior` (a fitted `ComposedPosterior` of the same prior and observation), that
  posterior is used as it is and nothing is fitted.
  """
  from tfp_composed import posterior as posterior_lib  # pylint: disable=g-import-not-at-top
  options = dict(options)
  given = options.pop("posterior", None)
  if given is not None:
    if not isinstance(given, posterior_lib.ComposedPosterior):
      raise TypeError(
          f"`posterior` must be a tfc.ComposedPosterior, got {type(given).__name__}.")
    if given.prior is not problem.prior or not np.array_equal(
        given.observation.numpy(), problem.observation.numpy()):
      raise ValueError(
          "`posterior` must be a ComposedPosterior of the same `prior` object and the same "
          "`observation` as this run.")
    if options:
      raise ValueError(
          f"`posterior` is already fitted: fit options {sorted(options)} cannot apply.")
    return given, {"posterior": given, "losses": np.zeros([0]), "num_fit_steps": 0,
                   "stopped_by_budget": False,
                   "num_parameters": _core.num_parameters(given.trainable_variables),
                   "history": None}
  posterior_kwargs = {k: options.pop(k) for k in _POSTERIOR_OPTIONS if k in options}
  posterior = posterior_lib.ComposedPosterior(
      problem.prior, problem.likelihood, problem.observation, **posterior_kwargs)
  callbacks = list(options.pop("callbacks", None) or [])
  stopper = _core.StopAtDeadline(clock)
  # Under a budget the importance check after training would run past the deadline; the
  # diagnostics of a budgeted run are the caller's to compute.
  fit_kwargs = dict(seed=seed, verbose=0, check_weights=not clock.has_budget)
  if clock.has_budget:  # Plans the steps (and lays the schedules over them) to fit the clock.
    fit_kwargs["time_limit"] = max(_MIN_FIT_SECONDS, clock.remaining())
  fit_kwargs.update(options)
  if num_steps is not None:
    fit_kwargs["num_steps"] = num_steps
  history = posterior.fit(callbacks=callbacks + [stopper], **fit_kwargs)
  losses = np.asarray(history.history.get("loss", []), np.float64)
  info = {
      "posterior": posterior,
      "losses": losses,
      "num_fit_steps": int(losses.size),
      "stopped_by_budget": stopper.stopped,
      "num_parameters": _core.num_parameters(posterior.trainable_variables),
      "history": history,
  }
  return posterior, info


def composed(problem, *, clock, num_steps, seed, num_samples, **fit_options):
  """The composed posterior with `fit()`'s defaults (options: `num_components`,
  `pregenerator`, and any `fit` argument)."""
  reserve = _SAMPLING_RESERVE * max(0., clock.remaining()) if clock.has_budget else 0.
  posterior, info = fit_composed(problem, clock.until(reserve), num_steps, seed, fit_options)
  x, log_q = posterior.experimental_sample_and_log_prob(
      num_samples, seed=_core.stateless_seed(seed, 3))
  return x.numpy(), log_q.numpy(), info


def composed_sir(problem, *, clock, num_steps, seed, num_samples, num_proposals=None,
                 fit_fraction=0.9, batch_size=4096, **fit_options):
  """SIR from the fitted composed posterior (see the module docstring)."""
  fit_fraction = _core.unit_interval(fit_fraction, "fit_fraction")
  num_proposals = (10 * num_samples if num_proposals is None
                   else checks.positive_integer(num_proposals, "num_proposals"))
  batch_size = checks.positive_integer(batch_size, "batch_size")
  posterior, info = fit_composed(problem, clock.split(fit_fraction), num_steps, seed,
                                 fit_options)
  base = _core.stateless_seed(seed, 4)

  @tf.function(reduce_retracing=True)
  def proposals(count, batch_seed):
    z, log_q = posterior.latent_sample_and_log_prob(count, seed=batch_seed)
    return z, problem.target.log_prob(z) - log_q

  zs, log_w = [], []
  for b, start in enumerate(range(0, num_proposals, batch_size)):
    if b > 0 and clock.expired():
      break  # Out of time: resample from the proposals drawn so far.
    z, lw = proposals(tf.constant(min(batch_size, num_proposals - start)),
                      tf.random.experimental.stateless_fold_in(base, b))
    zs.append(z.numpy())
    log_w.append(lw.numpy())
  z = np.concatenate(zs)
  log_w = np.concatenate(log_w).astype(np.float64)
  weights_ok = np.isfinite(log_w) | (log_w == -np.inf)
  logits = np.where(weights_ok, log_w, -np.inf)
  index = tf.random.stateless_categorical(
      tf.constant(logits[None], tf.float64), num_samples,
      seed=_core.stateless_seed(seed, 5))[0].numpy()
  x = problem.prior.bijector.forward(tf.constant(z[index])).numpy()
  weights = diagnostics.importance_diagnostics(log_w)
  info.update({
      "num_proposals": int(z.shape[0]),
      "importance": weights,
      "ess": weights.ess, "ess_fraction": weights.ess_fraction, "k_hat": weights.k_hat,
      "num_unique": int(np.unique(index).size),
  })
  return x, None, info


def neutra_hmc(problem, *, clock, num_steps, seed, num_samples, fit_fraction=0.5,
               fit_options=None, posterior=None, num_chains=64, step_size=0.5, num_leapfrog_steps=4,
               target_accept=0.8, warmup_fraction=0.5, jit_compile=False):
  """HMC through the fitted pre-generator (see the module docstring)."""
  fit_fraction = _core.unit_interval(fit_fraction, "fit_fraction")
  num_chains = checks.positive_integer(num_chains, "num_chains")
  fit_options = dict(fit_options or {})
  if posterior is not None:
    fit_options["posterior"] = posterior
  posterior, fit_info = fit_composed(problem, clock.split(fit_fraction), None, seed,
                                     fit_options)
  inner = tfp.mcmc.HamiltonianMonteCarlo(
      problem.target.log_prob,
      step_size=tf.constant(checks.positive_number(step_size, "step_size"), problem.dtype),
      num_leapfrog_steps=checks.positive_integer(num_leapfrog_steps, "num_leapfrog_steps"))
  transformed = tfp.mcmc.TransformedTransitionKernel(inner, posterior.latent_bijector)
  kernel = mcmc_lib.dual_averaging(transformed, target_accept, problem.dtype)
  eps = posterior.distribution.sample(num_chains, seed=_core.stateless_seed(seed, 6))
  init = posterior.latent_bijector.forward(eps)
  x, info = mcmc_lib.sample_latent_chains(
      problem, kernel, init, clock=clock, num_steps=num_steps,
      seed=_core.stateless_seed(seed, 7), num_samples=num_samples,
      warmup_fraction=warmup_fraction, jit_compile=jit_compile)
  info.update({k: fit_info[k] for k in ("posterior", "losses", "num_fit_steps",
                                         "stopped_by_budget", "num_parameters")})
  info["num_leapfrog_steps"] = num_leapfrog_steps
  return x, None, info
