"""Baselines: every posterior-sampling method on one latent target, behind one `run`.

`run(method, prior, likelihood, observation, ...)` builds the latent target
`t(z) = log p_base(z) + log p(y | f(z))` (`tfc.targets.LatentTarget`) and hands it to the
method named `method` in `METHODS`; the method returns samples of `x`, their density under the
method's `q` where it has one, and its own diagnostics, in a `Result`.

| method | algorithm |
| --- | --- |
| `composed` | `ComposedPosterior.fit` with its defaults: the composed posterior [1] |
| `composed_sir` | sampling-importance-resampling from the fitted composed posterior |
| `ambient_vi` | a RealNVP flow trained in x-space on `-E_q[log p(x) + log p(y|x) - log q(x)]` [1] |
| `ula`, `mala`, `hmc`, `nuts` | `tfp.mcmc` chains on the latent target |
| `pl_mcmc` | projected latent MCMC for mask operators [2] |
| `map` | latent MAP by batched L-BFGS from several restarts [3] |
| `neutra_hmc` | HMC through the fitted pre-generator (NeuTra) [4] |

A wall-clock budget (`budget_seconds`) covers the whole call, tracing included: iterative
methods run in compiled chunks and read the clock between them, variational fits stop through a
`tf_keras` callback. Without a budget, `num_steps` sets the length of the run. With both, the
run stops at whichever ends first. Randomness comes from `seed` alone (stateless seeds); with
`num_steps` and no budget the result is deterministic.

Adding a method: write `fn(problem, *, clock, num_steps, seed, num_samples, **options) ->
(x, log_prob, info)` and add one line to `METHODS`.

#### Examples

```python
result = tfc.baselines.run("nuts", prior, likelihood, y, budget_seconds=60, seed=0)
result.x.shape, result.info["ess_min"], result.seconds
```

#### References

[1]: Jay Whang, Erik M. Lindgren, Alexandros G. Dimakis. Composing Normalizing Flows for
     Inverse Problems. In _International Conference on Machine Learning_, 2021.
[2]: Chris Cannella, Mohammadreza Soltani, Vahid Tarokh. Projected Latent Markov Chain Monte
     Carlo: Conditional Sampling of Normalizing Flows. In _ICLR_, 2021.
[3]: Muhammad Asim, Max Daniels, Oscar Leong, Ali Ahmed, Paul Hand. Invertible generative
     models for inverse problems: mitigating representation error and dataset bias. In
     _ICML_, 2020.
[4]: Matthew Hoffman, Pavel Sountsov, Joshua V. Dillon, Ian Langmore, Dustin Tran, Srinivas
     Vasudevan. NeuTra-lizing Bad Geometry in Hamiltonian Monte Carlo Using Neural Transport.
     arXiv:1903.03704, 2019.
"""

import math
import numbers

import numpy as np

from tfp_composed import checks
from tfp_composed import targets as targets_lib
from tfp_composed.baselines import ambient as _ambient
from tfp_composed.baselines import composed as _composed
from tfp_composed.baselines import latent_map as _latent_map
from tfp_composed.baselines import mcmc as _mcmc
from tfp_composed.baselines import pl_mcmc as _pl_mcmc
from tfp_composed.baselines._core import Clock, Problem, Result  # noqa: F401

__all__ = ["METHODS", "Result", "run"]

METHODS = {
    "composed": _composed.composed,
    "composed_sir": _composed.composed_sir,
    "ambient_vi": _ambient.ambient_vi,
    "ula": _mcmc.ula,
    "mala": _mcmc.mala,
    "hmc": _mcmc.hmc,
    "nuts": _mcmc.nuts,
    "pl_mcmc": _pl_mcmc.pl_mcmc,
    "map": _latent_map.latent_map,
    "neutra_hmc": _composed.neutra_hmc,
}

# `num_samples` when not given: draws for samplers, restarts for `map`.
_DEFAULT_NUM_SAMPLES = {"map": 16}


def run(method, prior, likelihood, observation, *, budget_seconds=None, num_steps=None,
        seed=0, num_samples=None, **options):
  """Runs `METHODS[method]` on the posterior `p(x | y) ~ prior(x) likelihood(y | x)`.

  Args:
    method: a name in `METHODS`.
    prior: the frozen flow prior, a `tfd.TransformedDistribution(base, f)`.
    likelihood: a `tfc.likelihoods.Likelihood`.
    observation: `y`, of the likelihood's event shape.
    budget_seconds: wall time for the whole call, tracing included, or None.
    num_steps: the method's number of steps (optimizer steps, MCMC transitions including
      warm-up, L-BFGS iterations) when there is no budget, or a cap with one; None: the
      method's default (a budget must then be given for the MCMC methods).
    seed: int; everything random derives from it.
    num_samples: draws to return (for `map`: restarts, one optimum each); default 1000
      (`map`: 16).
    **options: the method's own options (see its docstring).

  Returns:
    A `Result`.
  """
  clock = Clock(None)
  if not isinstance(method, str) or method not in METHODS:
    raise ValueError(
        f"`method` must be one of {sorted(METHODS)}, got {method!r}.")
  if budget_seconds is not None:
    if (isinstance(budget_seconds, bool) or not isinstance(budget_seconds, numbers.Real)
        or not (math.isfinite(budget_seconds) and budget_seconds > 0)):
      raise ValueError(
          f"`budget_seconds` must be a positive finite number or None, got {budget_seconds!r}.")
    budget_seconds = float(budget_seconds)
  if num_steps is not None:
    num_steps = checks.positive_integer(num_steps, "num_steps")
  seed = checks.seed(seed)
  if num_samples is None:
    num_samples = _DEFAULT_NUM_SAMPLES.get(method, 1000)
  num_samples = checks.positive_integer(num_samples, "num_samples")
  if budget_seconds is not None:
    clock = Clock(start=clock.start, deadline=clock.start + budget_seconds)
  target = targets_lib.LatentTarget(prior, likelihood, observation)
  if target.observation_batch_shape.rank != 0:
    raise ValueError(
        "`observation` must be one observation of shape "
        f"{target.likelihood.event_shape.as_list()}, got shape "
        f"{target.observation.shape.as_list()}.")
  problem = Problem(prior=prior, likelihood=likelihood, observation=target.observation,
                    target=target)
  x, log_prob, info = METHODS[method](problem, clock=clock, num_steps=num_steps, seed=seed,
                                      num_samples=num_samples, **options)
  x = np.asarray(x)
  if log_prob is not None:
    log_prob = np.asarray(log_prob)
  return Result(method=method, x=x, log_prob=log_prob, seconds=clock.elapsed(),
                info=dict(info, budget_seconds=budget_seconds))
