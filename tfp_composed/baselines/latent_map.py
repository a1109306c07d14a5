"""Latent MAP: `z* = argmax_z log p_base(z) + log p(y | f(z))`, `x* = f(z*)` [1].

`tfp.optimizer.lbfgs_minimize` on the negative latent target, batched over `num_samples`
restarts drawn from the prior's base (one optimum per restart, sorted best first, so
`x[0]` is the best found). Each restart stops when its gradient norm is below `tolerance`
(default 1e-4) or its objective changes by less than `f_relative_tolerance` (default 1e-7,
float32 resolution) relatively;
the run stops when all have converged or failed, after `num_steps` iterations (default 1000),
or when the budget runs out -- the clock is read at every iteration through the optimizer's
`stopping_condition`. The optimizer's loop runs eagerly around a compiled value-and-gradient
(tracing `lbfgs_minimize` took 16-27 s here, against about a second for a whole 2-D run). A point estimate: `log_prob` is None.

#### References

[1]: Muhammad Asim, Max Daniels, Oscar Leong, Ali Ahmed, Paul Hand. Invertible generative
     models for inverse problems: mitigating representation error and dataset bias. In
     _ICML_, 2020.
"""

import time

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_composed import checks
from tfp_composed.baselines import _core

__all__ = ["latent_map"]

DEFAULT_NUM_STEPS = 1000
# Seconds kept back for mapping the optima through `f` after the optimizer.
_RESERVE = 0.02


def latent_map(problem, *, clock, num_steps, seed, num_samples, tolerance=1e-4,
               f_relative_tolerance=1e-7, num_correction_pairs=10, init_scale=1.):
  """Batched multi-restart L-BFGS on the latent target (see the module docstring)."""
  target = problem.target
  size = target.latent_size
  dtype = problem.dtype
  init_scale = checks.positive_number(init_scale, "init_scale")
  tolerance = checks.positive_number(tolerance, "tolerance")
  f_relative_tolerance = checks.positive_number(f_relative_tolerance, "f_relative_tolerance")
  max_iterations = num_steps or DEFAULT_NUM_STEPS
  z0 = init_scale * tf.reshape(
      problem.prior.distribution.sample(num_samples, seed=_core.stateless_seed(seed, 21)),
      [num_samples, size])
  deadline = clock.deadline - _RESERVE * max(0., clock.remaining()) if clock.has_budget \
      else None

  @tf.function
  def value_and_gradients(z_flat):
    value, grad = tfp.math.value_and_gradient(lambda z: -target.flat_log_prob(z), z_flat)
    # Restarts that reach a latent where f overflows get a large finite value, so the
    # line search backs off instead of failing.
    bad = ~tf.math.is_finite(value)
    value = tf.where(bad, tf.constant(1e30, dtype), value)
    grad = tf.where(bad[:, None], tf.zeros_like(grad), grad)
    return value, grad

  def stopping_condition(converged, failed):
    # The optimizer's loop runs eagerly (tracing `lbfgs_minimize` costs far more than a
    # small problem's whole run), so the clock can be read at every iteration.
    late = deadline is not None and time.perf_counter() >= deadline
    return tfp.optimizer.converged_all(converged, failed) | tf.constant(late)

  results = tfp.optimizer.lbfgs_minimize(
      value_and_gradients, initial_position=z0, tolerance=tolerance,
      f_relative_tolerance=f_relative_tolerance,
      num_correction_pairs=checks.positive_integer(num_correction_pairs,
                                                   "num_correction_pairs"),
      max_iterations=max_iterations, stopping_condition=stopping_condition)
  z = results.position.numpy()
  values = -results.objective_value.numpy()
  values = np.where(values <= -1e29, -np.inf, values)
  order = np.argsort(-values, kind="stable")
  z = z[order]
  x = problem.prior.bijector.forward(
      tf.reshape(tf.constant(z), [num_samples] + target.latent_event_shape.as_list())).numpy()
  info = {
      "log_target": values[order],
      "z": z,
      "converged": results.converged.numpy()[order],
      "failed": results.failed.numpy()[order],
      "num_iterations": int(results.num_iterations.numpy()),
      "num_objective_evaluations": int(results.num_objective_evaluations.numpy()),
      "num_parameters": 0,
  }
  return x, None, info
