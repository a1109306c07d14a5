"""Latent MCMC baselines: ULA, MALA, HMC and NUTS on the latent target.

All four sample the latent posterior `p(z | y) ~ p_base(z) p(y | f(z))`
(`tfc.targets.LatentTarget`: forward passes of `f` only) with `num_chains` parallel chains
started from the prior's base `p_base`, and return `x = f(z)`:

* `mala`: `tfp.mcmc.MetropolisAdjustedLangevinAlgorithm`, step size by dual averaging
  (`tfp.mcmc.DualAveragingStepSizeAdaptation`) to acceptance 0.574 [1];
* `hmc`: `tfp.mcmc.HamiltonianMonteCarlo` with `num_leapfrog_steps` (default 8) leapfrog
  steps, dual averaging to acceptance 0.8;
* `nuts`: `tfp.mcmc.NoUTurnSampler` (`max_tree_depth` 8), dual averaging to acceptance 0.8;
* `ula`: `tfp.mcmc.UncalibratedLangevin` (no accept/reject, so biased by its step size `h`:
  for a Gaussian of variance `s^2` its stationary variance is `s^2 / (1 - h / (4 s^2))`).
  Rule for `h`: the warm-up runs MALA with dual averaging to acceptance 0.574 [1]; ULA then
  runs with the fixed step `h = ula_step_factor * h_MALA` (default 0.1). MALA's adapted step
  is a few times the smallest latent variance `s^2` in low dimensions (3.4 s^2 on the 2-D test
  problem; `1.65^2 d^(-1/3) s^2` asymptotically [1]), so the variance inflation
  `h / (4 s^2)` along the narrowest direction is under about 10% (8.5% on the test
  problem), smaller along wider ones; mixing along a direction of variance `v` takes about
  `2 v / h` steps. MALA's warm-up cannot diverge, which ULA's could.
  While dual averaging changes the step size, `_chains.StepSizeInResults` recomputes the
  drift that TFP's Langevin kernels cache in their results at the new step size (with the
  cached drift of the old step the acceptance ratio is wrong and the step collapsed to 0).

Warm-up (`warmup_fraction` of the steps or the time, default half) is discarded; the step size
is then frozen at the dual-averaging average and every `thin`-th state is recorded so that
`max(ceil(num_samples / num_chains), 64)` states per chain are kept; `num_samples` of them,
evenly spaced in time, from every chain, are returned. `info` holds the step size, the
acceptance rate, ESS and split R-hat of the recorded latent coordinates
(`tfc.diagnostics.mcmc_summary`).

#### References

[1]: Gareth O. Roberts, Jeffrey S. Rosenthal. Optimal scaling of discrete approximations to
     Langevin diffusions. _JRSS B_ 60(1), 1998.
[2]: Matthew D. Hoffman, Andrew Gelman. The No-U-Turn Sampler. _JMLR_ 15, 2014.
"""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_composed import checks
from tfp_composed import diagnostics
from tfp_composed.baselines import _chains
from tfp_composed.baselines import _core

__all__ = ["dual_averaging", "hmc", "mala", "nuts", "ula", "sample_latent_chains"]

_DEFAULT_CHAINS = 64
# Transitions (warm-up included) when neither `num_steps` nor a budget is given.
DEFAULT_NUM_STEPS = 2000




def sample_latent_chains(problem, kernel, init_state, *, clock, num_steps, seed, num_samples,
                         warmup_fraction=0.5, jit_compile=False, sampling_kernel=None,
                         to_x=None, adapt=True):
  """Runs `kernel` with `_chains.run_chains` and packs `x`, ESS, R-hat into `(x, info)`.

  `to_x(parts)` maps the selected state parts to `x` (default: `f(z)` of the only part).
  """
  warmup_fraction = _core.unit_interval(warmup_fraction, "warmup_fraction")
  if num_steps is None and not clock.has_budget:
    num_steps = DEFAULT_NUM_STEPS
  out = _chains.run_chains(
      kernel, init_state, clock=clock, seed=seed, num_steps=num_steps,
      num_samples=num_samples, adapt=adapt, sampling_kernel=sampling_kernel,
      warmup_fraction=warmup_fraction, jit_compile=jit_compile)
  chosen = [_chains.select(r, num_samples) for r in out.records]
  if to_x is None:
    x = problem.prior.bijector.forward(tf.constant(chosen[0])).numpy()
  else:
    x = np.asarray(to_x(chosen))
  flat = np.concatenate([r.reshape(r.shape[:2] + (-1,)) for r in out.records], axis=-1)
  summary = diagnostics.mcmc_summary(flat)
  info = {
      "step_size": out.step_size,
      "acceptance": float(np.mean(out.acceptance)),
      "acceptance_per_chain": out.acceptance,
      "ess": summary["ess"], "ess_min": summary["ess_min"],
      "rhat": summary["rhat"], "rhat_max": summary["rhat_max"],
      "num_chains": int(flat.shape[1]), "num_records": int(flat.shape[0]),
      "num_warmup_steps": out.num_warmup_steps, "num_sampling_steps": out.num_sampling_steps,
      "thin": out.thin, "warmup_seconds": out.warmup_seconds, "num_parameters": 0,
  }
  if x.shape[0] < num_samples:
    info["warning"] = (f"only {x.shape[0]} of {num_samples} draws: the budget ended before "
                       "enough states were recorded")
  return x, info


def dual_averaging(kernel, target_accept, dtype):
  """`kernel` with its step size adapted by dual averaging to acceptance `target_accept`.

  The adaptation has no end of its own (`num_adaptation_steps=2**30`): `_chains.run_chains`
  freezes the step size when the warm-up ends.
  """
  return tfp.mcmc.DualAveragingStepSizeAdaptation(
      kernel, num_adaptation_steps=2**30,
      target_accept_prob=tf.constant(_core.unit_interval(target_accept, "target_accept"),
                                     dtype))


def _init(problem, num_chains, seed):
  num_chains = checks.positive_integer(num_chains, "num_chains")
  return problem.prior.distribution.sample(num_chains, seed=_core.stateless_seed(seed, 1))


def _step(problem, value, name="step_size"):
  return tf.constant(checks.positive_number(value, name), problem.dtype)


def _mala_kernel(problem, step_size):
  """MALA on the latent target, its step size in the results (`_chains.StepSizeInResults`)."""
  target = problem.target.log_prob
  make = lambda h: tfp.mcmc.MetropolisAdjustedLangevinAlgorithm(target, step_size=h)
  return _chains.StepSizeInResults(make, _step(problem, step_size))


def _run(problem, kernel, target_accept, *, clock, num_steps, seed, num_samples, num_chains,
         warmup_fraction, jit_compile, sampling_kernel=None):
  """Adapts `kernel` to `target_accept` and runs it from `num_chains` draws of `p_base`."""
  return sample_latent_chains(
      problem, dual_averaging(kernel, target_accept, problem.dtype),
      _init(problem, num_chains, seed), clock=clock, num_steps=num_steps,
      seed=_core.stateless_seed(seed, 2), num_samples=num_samples,
      warmup_fraction=warmup_fraction, jit_compile=jit_compile,
      sampling_kernel=sampling_kernel)


def mala(problem, *, clock, num_steps, seed, num_samples, num_chains=_DEFAULT_CHAINS,
         step_size=0.1, target_accept=0.574, warmup_fraction=0.5, jit_compile=False):
  """Metropolis-adjusted Langevin on the latent target (see the module docstring)."""
  x, info = _run(
      problem, _mala_kernel(problem, step_size), target_accept, clock=clock,
      num_steps=num_steps, seed=seed, num_samples=num_samples, num_chains=num_chains,
      warmup_fraction=warmup_fraction, jit_compile=jit_compile)
  return x, None, info


def ula(problem, *, clock, num_steps, seed, num_samples, num_chains=_DEFAULT_CHAINS,
        step_size=0.1, ula_step_factor=0.1, warmup_fraction=0.5, jit_compile=False):
  """Unadjusted Langevin with `ula_step_factor` times MALA's adapted step (module docstring)."""
  factor = _core.unit_interval(ula_step_factor, "ula_step_factor")
  mala_kernel = _mala_kernel(problem, step_size)
  ula_step = tf.Variable(tf.constant(step_size, problem.dtype), trainable=False,
                         name="ula_step_size")

  def set_step_size(h_mala):
    ula_step.assign(tf.cast(h_mala, problem.dtype) * factor)

  sampling_kernel = (tfp.mcmc.UncalibratedLangevin(problem.target.log_prob, step_size=ula_step),
                     set_step_size)

  x, info = _run(
      problem, mala_kernel, 0.574, clock=clock, num_steps=num_steps, seed=seed,
      num_samples=num_samples, num_chains=num_chains, warmup_fraction=warmup_fraction,
      jit_compile=jit_compile, sampling_kernel=sampling_kernel)
  info["mala_step_size"] = info["step_size"]
  info["step_size"] = float(ula_step.numpy())
  info["acceptance"] = 1.  # Every ULA proposal is taken.
  info.pop("acceptance_per_chain")
  return x, None, info


def hmc(problem, *, clock, num_steps, seed, num_samples, num_chains=_DEFAULT_CHAINS,
        step_size=0.1, num_leapfrog_steps=8, target_accept=0.8, warmup_fraction=0.5,
        jit_compile=False):
  """Hamiltonian Monte Carlo on the latent target (see the module docstring)."""
  inner = tfp.mcmc.HamiltonianMonteCarlo(
      problem.target.log_prob, step_size=_step(problem, step_size),
      num_leapfrog_steps=checks.positive_integer(num_leapfrog_steps, "num_leapfrog_steps"))
  x, info = _run(
      problem, inner, target_accept, clock=clock, num_steps=num_steps, seed=seed,
      num_samples=num_samples, num_chains=num_chains, warmup_fraction=warmup_fraction,
      jit_compile=jit_compile)
  info["num_leapfrog_steps"] = num_leapfrog_steps
  return x, None, info


def nuts(problem, *, clock, num_steps, seed, num_samples, num_chains=_DEFAULT_CHAINS,
         step_size=0.1, max_tree_depth=8, target_accept=0.8, warmup_fraction=0.5,
         jit_compile=False):
  """No-U-Turn sampler on the latent target (see the module docstring)."""
  inner = tfp.mcmc.NoUTurnSampler(
      problem.target.log_prob, step_size=_step(problem, step_size),
      max_tree_depth=checks.positive_integer(max_tree_depth, "max_tree_depth"))
  x, info = _run(
      problem, inner, target_accept, clock=clock, num_steps=num_steps, seed=seed,
      num_samples=num_samples, num_chains=num_chains, warmup_fraction=warmup_fraction,
      jit_compile=jit_compile)
  info["max_tree_depth"] = max_tree_depth
  return x, None, info
