"""Projected latent MCMC (PL-MCMC) for mask operators [1], for a noisy observation.

The prior is a flow `x = f(z)`; the operator observes the entries `o` of `x` (a
`tfc.operators.Mask`), the rest `m` are hidden. PL-MCMC walks in the latent space of the flow
and *projects* every proposal onto the observed entries before the exact ambient density
judges it. Here the observed entries of the posterior are themselves uncertain (the likelihood
has noise), so the chain carries them as a second state part `v` (ambient values of the
observed entries, started at `y`):

    state (z, v);  u = f(z);  x = proj_v(u) = (v on o, u_m on m)       (the projection)
    log pi(z, v) = log p(x) + log p(y | x)                              (exact ambient density,
                                                                         log p by f^{-1})
                   + log N(u_o; v, aux_scale^2)                         (auxiliary density [1])
                   + log |det df/dz (z)|                                (change of variables)

Stationary distribution: with `u = f(z)` the density of `(u, v)` is
`p(v, u_m) p(y | v, u_m) N(u_o; v, aux_scale^2)`; integrating the auxiliary `u_o` out leaves
`p(x) p(y | x)` with `x = (v, u_m)`: the returned `x` are draws of the exact posterior
`p(x | y)` (for any `aux_scale > 0`, which only changes the mixing). As the noise goes to 0,
`v -> y` and this is [1]'s hard conditioning `p(x_m | x_o = y)`.

Transition: `tfp.mcmc.RandomWalkMetropolis` on `(z, v)` (Gaussian proposals, symmetric, so the
Metropolis ratio is `pi(z', v') / pi(z, v)`), with proposal scales `(h, h * observed_ratio)`
tuned by `tfp.mcmc.DualAveragingStepSizeAdaptation` to acceptance 0.234 during warm-up. The
chains start at base draws `z0` and at `v` nearest `y` with a finite density (`start_inside`:
a noisy `y` can lie outside the prior's support).
[1]'s proposal also mixes in occasional independent redraws from the base; here the chains
are many (`num_chains`, default 64) and start from the prior's base instead. Defaults:
`aux_scale` is the prior's standard deviation of the observed entries (from 1000 prior
draws), `observed_ratio` is the likelihood's `scale` when it has one (else `aux_scale`).
Other operators raise a `TypeError` naming `likelihood`.

#### References

[1]: Chris Cannella, Mohammadreza Soltani, Vahid Tarokh. Projected Latent Markov Chain Monte
     Carlo: Conditional Sampling of Normalizing Flows. In _ICLR_, 2021.
"""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_composed import checks
from tfp_composed import operators
from tfp_composed.baselines import _chains
from tfp_composed.baselines import _core
from tfp_composed.baselines import mcmc as mcmc_lib

tfd = tfp.distributions

__all__ = ["pl_mcmc", "ProjectedTarget", "start_inside"]


def check_mask_operator(likelihood):
  """Returns the likelihood's `Mask` operator; a clear error for any other operator."""
  operator = likelihood.operator
  if not isinstance(operator, operators.Mask):
    raise TypeError(
        "pl_mcmc needs `likelihood` to observe a subset of the entries of x: its operator must "
        f"be a tfc.operators.Mask, got {operator!r} (type {type(operator).__name__}). Use "
        "another method (e.g. 'mala', 'nuts', 'composed') for this operator.")
  return operator


class ProjectedTarget(tf.Module):
  """`log pi(z, v)` of the module docstring, and the projection `x = proj_v(f(z))`."""

  def __init__(self, problem, aux_scale):
    super().__init__(name="projected_target")
    self._prior = problem.prior
    self._likelihood = problem.likelihood
    self._y = problem.observation
    self._operator = check_mask_operator(problem.likelihood)
    self._mask = tf.constant(self._operator.mask)
    self._aux_scale = tf.cast(aux_scale, problem.dtype)
    self._latent_rank = problem.latent_shape.rank

  def project(self, z, v):
    """`(x, u)`: `u = f(z)`, `x` = `v` on the observed entries and `u` elsewhere."""
    u = self._prior.bijector.forward(z)
    return tf.where(self._mask, self._operator.fill(v), u), u

  def log_prob(self, z, v):
    x, u = self.project(z, v)
    log_joint = self._prior.log_prob(x) + self._likelihood.log_prob(self._y, x)
    aux = tf.reduce_sum(tfd.Normal(v, self._aux_scale).log_prob(self._operator(u)), axis=-1)
    fldj = self._prior.bijector.forward_log_det_jacobian(z, event_ndims=self._latent_rank)
    value = log_joint + aux + fldj
    return tf.where(tf.math.is_finite(value), value, tf.constant(-np.inf, value.dtype))


# Blending weights of `start_inside`, smallest first.
_START_BLENDS = (0., 1e-3, 1e-2, 0.03, 0.1, 0.3, 0.6, 1.)


def start_inside(target, z0, y, operator):
  """Initial observed values `v` `[chains, num_observed]`, nearest `y` with a finite `log pi`.

  A noisy observation can leave the prior's support (an image prior's density is zero
  outside a box around `[0, 1]`, and `y = x + noise` of a black pixel is often below it):
  started at `v = y` every chain would sit at `log pi = -inf` and reject every proposal. Each
  chain takes `v = (1 - t) y + t u_o`, with `u_o` the observed entries of its own `f(z0)` and
  `t` the smallest of `_START_BLENDS` whose `log pi(z0, v)` is finite (1 when none is; the
  start does not change the chains' stationary distribution).
  """
  u_o = operator(target.project(z0, tf.zeros([tf.shape(z0)[0], operator.num_observed],
                                             z0.dtype))[1])
  y = tf.cast(y, z0.dtype)
  chosen = u_o
  found = tf.zeros([tf.shape(z0)[0]], tf.bool)
  for t in _START_BLENDS:
    v = (1. - t) * y + t * u_o
    ok = tf.math.is_finite(target.log_prob(z0, v)) & ~found
    chosen = tf.where(ok[:, None], v, chosen)
    found |= ok
    if bool(tf.reduce_all(found)):  # Every chain has its start.
      break
  return chosen


def pl_mcmc(problem, *, clock, num_steps, seed, num_samples, num_chains=64, step_size=0.1,
            aux_scale=None, observed_ratio=None, target_accept=0.234, warmup_fraction=0.5,
            jit_compile=False):
  """Projected latent MCMC (see the module docstring)."""
  operator = check_mask_operator(problem.likelihood)
  num_chains = checks.positive_integer(num_chains, "num_chains")
  dtype = problem.dtype
  if aux_scale is None:
    draws = problem.prior.sample(1000, seed=_core.stateless_seed(seed, 31))
    observed = operator(draws).numpy()
    observed = observed[np.all(np.isfinite(observed), axis=-1)]
    aux_scale = np.maximum(observed.std(0), 1e-3)
  else:
    aux_scale = np.broadcast_to(np.asarray(aux_scale, np.float64), [operator.num_observed])
    if not np.all(np.isfinite(aux_scale) & (aux_scale > 0)):
      raise ValueError(f"`aux_scale` must be positive and finite, got {aux_scale!r}.")
  if observed_ratio is None:
    scale = getattr(problem.likelihood, "scale", None)
    observed_ratio = (float(np.mean(np.asarray(scale))) if scale is not None
                      else float(np.mean(aux_scale)))
  observed_ratio = checks.positive_number(observed_ratio, "observed_ratio")
  target = ProjectedTarget(problem, aux_scale)
  h = checks.positive_number(step_size, "step_size")

  def make(scales):
    return tfp.mcmc.RandomWalkMetropolis(
        target.log_prob, new_state_fn=tfp.mcmc.random_walk_normal_fn(scale=scales))

  kernel = mcmc_lib.dual_averaging(
      _chains.StepSizeInResults(make, [tf.constant(h, dtype),
                                       tf.constant(h * observed_ratio, dtype)]),
      target_accept, dtype)
  z0 = problem.prior.distribution.sample(num_chains, seed=_core.stateless_seed(seed, 1))
  v0 = start_inside(target, z0, problem.observation, operator)

  def to_x(parts):
    z, v = parts
    return target.project(tf.constant(z), tf.constant(v))[0].numpy()

  x, info = mcmc_lib.sample_latent_chains(
      problem, kernel, [z0, v0], clock=clock, num_steps=num_steps,
      seed=_core.stateless_seed(seed, 2), num_samples=num_samples,
      warmup_fraction=warmup_fraction, jit_compile=jit_compile, to_x=to_x)
  info["aux_scale"] = aux_scale
  info["observed_ratio"] = observed_ratio
  return x, None, info
