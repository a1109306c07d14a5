"""Ambient VI: a trainable flow fitted directly in x-space (the baseline of [1]).

`q(x) = TransformedDistribution(N(0, I), Chain([s, h]))` with a RealNVP `h`
(`tfc.pregenerators.real_nvp` on the prior's event shape) and a fixed elementwise map `s` from
`R^D` onto the prior's support (`support_bijector`: the logit preprocessing of the image priors
of `tfc.priors`, whose density is zero outside a box around `[0, 1]^D`; the identity for other
priors; `support=` overrides it), as one fits VI to any constrained density: without it most of
an unconstrained `q`'s draws fall where `log p(x) = -inf`, and the fit learns nothing from them.
`h`'s final affine stage starts at the per-coordinate median and normal-consistent median
absolute deviation of `s^{-1}` of `num_init_samples` prior draws (robust: a flow's draws are
heavy-tailed, and on the MNIST prior a Gaussian with their raw moments put every draw where
`f^{-1}` overflows); `f` is used for these draws only, never inside `q`. It minimizes

    -ELBO = E_{x ~ q}[ log q(x) - log p(x) - log p(y | x) ],

where `log p(x)` is the prior's exact density, which inverts `f` (`f^{-1}` and its log-det) for
every draw of `q` -- the cost the composed posterior avoids [1].

Draws where `log p(x) + log p(y | x)` is not finite (`f^{-1}` overflows far from the prior's
support, or `x` itself is not finite): their joint term is replaced by the lowest finite one in
the batch (a constant: pessimistic, so `q` is pushed away from such regions through its
`log q` term), and the gradient rows that come back through `log p` for those draws are zeroed
where they enter it, so one bad draw cannot make the step NaN. Their share is logged per step
(`nonfinite_fraction`); a step that is still not finite is skipped by `training.fit`.

#### References

[1]: Jay Whang, Erik M. Lindgren, Alexandros G. Dimakis. Composing Normalizing Flows for
     Inverse Problems. In _ICML_, 2021.
"""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_composed import checks
from tfp_composed import pregenerators
from tfp_composed import targets as targets_lib
from tfp_composed import training
from tfp_composed.baselines import _core

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = ["ambient_vi", "ambient_flow", "negative_elbo", "support_bijector"]

DEFAULT_NUM_STEPS = 2000
# The median absolute deviation times this is a normal's standard deviation.
_MAD_TO_STD = 1.4826
_MIN_INIT_STD = 1e-3
_SAMPLING_RESERVE = 0.05


def support_bijector(prior):
  """The fixed map from `R^D` onto the prior's support that ends ambient VI's `q`.

  A prior whose bijector is a `tfb.Chain` applying `tfc.data.logit_bijector` last (every image
  prior of `tfc.priors`) has its density on that bijector's range: that bijector. Any other
  prior: `tfb.Identity()`.
  """
  bijector = prior.bijector
  if isinstance(bijector, tfb.Composition) and bijector.bijectors:  # A tfb.Chain.
    outer = bijector.bijectors[0]  # A Chain applies its first bijector last.
    if outer.name == "logit_preprocessing" and not outer.trainable_variables:
      return outer
  return tfb.Identity()


def ambient_flow(prior, flow=None, num_init_samples=1000, seed=0, num_layers=4,
                 hidden_units=None, support=None):
  """`q(x)`: a RealNVP flow on the prior's event shape ending in the prior's support map,
  affine start at the moments of the prior's draws mapped back through it.

  `support`: a fixed `tfb.Bijector` from `R^D` onto the prior's support (default
  `support_bijector(prior)`). Returns `(distribution, flow)`; only `flow` is trainable.
  """
  if support is None:
    support = support_bijector(prior)
  elif not isinstance(support, tfb.Bijector):
    raise TypeError(f"`support` must be a tfb.Bijector onto the prior's support, got "
                    f"{type(support).__name__}.")
  event_shape = prior.event_shape
  size = int(np.prod(event_shape.as_list()))
  if flow is None:
    hidden = hidden_units or (int(min(256, max(64, 4 * size))),) * 2
    flow = pregenerators.real_nvp(event_shape, num_layers=num_layers, hidden_units=hidden,
                                  dtype=prior.dtype)
  elif not isinstance(flow, tfb.Bijector):
    raise TypeError(f"`flow` must be a tfb.Bijector on x-space, got {type(flow).__name__}.")
  stage = pregenerators.find_affine_stage(flow)
  if stage is not None:
    x = prior.sample(checks.positive_integer(num_init_samples, "num_init_samples"),
                     seed=_core.stateless_seed(seed, 11))
    x = support.inverse(x).numpy().reshape(-1, size)
    x = x[np.all(np.isfinite(x), axis=1)].astype(np.float64)
    # Robust moments: a flow's draws are heavy-tailed (a few far latents), and a Gaussian
    # with their raw standard deviation (up to 7.5 logits on MNIST) put every draw where
    # `f^{-1}` overflows and `log p(x)` is not finite.
    loc = np.median(x, axis=0)
    std = np.maximum(_MAD_TO_STD * np.median(np.abs(x - loc), axis=0), _MIN_INIT_STD)
    stage.set_gaussian(loc, np.diag(std**2))
  base = tfd.Sample(tfd.Normal(tf.zeros([], prior.dtype), tf.ones([], prior.dtype)),
                    event_shape)
  return tfd.TransformedDistribution(base, tfb.Chain([support, flow])), flow


def negative_elbo(q, prior, likelihood, y, batch_size, seed):
  """The ambient objective `E_{x ~ q}[log q(x) - log p(x) - log p(y | x)]` on `batch_size` draws.

  `log p(x)` inverts the prior's flow for every draw (the cost the composed posterior avoids);
  non-finite joint terms are handled as in the module docstring. Returns `(loss, metrics)` with
  the share of non-finite draws in `metrics["nonfinite_fraction"]`.
  """
  dtype = prior.dtype
  x, log_q = q.experimental_sample_and_log_prob(batch_size, seed=seed)
  x_in = targets_lib.finite_gradient_rows(x, prior.event_shape.rank)
  log_joint = prior.log_prob(x_in) + likelihood.log_prob(y, x_in)
  ok = tf.math.is_finite(log_joint)
  worst = tf.stop_gradient(tf.reduce_min(tf.where(ok, log_joint, tf.constant(np.inf, dtype))))
  worst = tf.where(tf.math.is_finite(worst), worst, tf.zeros([], dtype))
  log_joint = tf.where(ok, log_joint, worst)
  return (tf.reduce_mean(log_q - log_joint),
          {"nonfinite_fraction": 1. - tf.reduce_mean(tf.cast(ok, dtype))})


def ambient_vi(problem, *, clock, num_steps, seed, num_samples, batch_size=64,
               learning_rate=1e-3, flow=None, num_init_samples=1000, support=None, verbose=0,
               **fit_options):
  """Ambient VI (see the module docstring). Options: `batch_size`, `learning_rate`, `flow`
  (a bijector on x-space before the support map), `num_init_samples`, `support`, and
  `training.fit` arguments."""
  batch_size = checks.positive_integer(batch_size, "batch_size")
  q, flow = ambient_flow(problem.prior, flow, num_init_samples, seed, support=support)
  prior, likelihood, y = problem.prior, problem.likelihood, problem.observation

  def loss(step_seed, step, shard):
    del step
    if shard is not None:
      raise ValueError("ambient_vi runs on one device; `strategy` is not supported.")
    return negative_elbo(q, prior, likelihood, y, batch_size, step_seed)

  reserve = _SAMPLING_RESERVE * max(0., clock.remaining()) if clock.has_budget else 0.
  stopper = _core.StopAtDeadline(clock.until(reserve))
  callbacks = list(fit_options.pop("callbacks", None) or []) + [stopper]
  history = training.fit(
      loss, flow.trainable_variables, num_steps=num_steps or DEFAULT_NUM_STEPS,
      learning_rate=learning_rate, seed=seed, callbacks=callbacks, verbose=verbose,
      **fit_options)
  x, log_q = q.experimental_sample_and_log_prob(num_samples,
                                                seed=_core.stateless_seed(seed, 12))
  losses = np.asarray(history.history.get("loss", []), np.float64)
  info = {
      "distribution": q,
      "losses": losses,
      "num_fit_steps": int(losses.size),
      "nonfinite_fraction": np.asarray(history.history.get("nonfinite_fraction", [])),
      "stopped_by_budget": stopper.stopped,
      "num_parameters": _core.num_parameters(flow.trainable_variables),
  }
  return x.numpy(), log_q.numpy(), info
