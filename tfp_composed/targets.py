"""The latent target: the unnormalized posterior of the prior's latent `z`.

For a flow prior `p(x) = TransformedDistribution(p_base, f)` and an observation model
`p(y | x)`, the posterior of `z = f^{-1}(x)` is, up to the evidence `p(y)`,

    log p(z | y) = log p_base(z) + log p(y | f(z)) - log p(y).

`LatentTarget` is that function (with an optional likelihood weight `w` for tempering):
the centre every method consumes -- the composed variational fit, the MCMC baselines, the
mode search and the diagnostics. It needs forward passes of `f` only [1].

Rows are independent: the value at one latent never depends on another latent in the batch,
so MCMC chains, batched observations and the mode search can share it.

#### References

[1]: Jay Whang, Erik M. Lindgren, Alexandros G. Dimakis. Composing Normalizing Flows for
     Inverse Problems. In _International Conference on Machine Learning_, 2021.
     https://arxiv.org/abs/2002.11743
"""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.distributions import transformed_distribution as _td

from tfp_composed import likelihoods as likelihoods_lib

tfd = tfp.distributions

__all__ = ["LatentTarget", "finite_gradient_rows", "validate_prior"]


def validate_prior(prior):
  """Checks that `prior` is a flow `TransformedDistribution` with a fixed event shape and a
  continuous base whose support is all of `R^d` (the latent space every method searches).

  Raises:
    TypeError: if `prior` is not a flow, its dtype is not floating, or its base is
      discrete.
    ValueError: for a batch shape, a scalar or unknown event shape, or a base with bounded
      (or otherwise constrained) support.
  """
  if not isinstance(prior, _td._TransformedDistribution):  # pylint: disable=protected-access
    raise TypeError(
        "`prior` must be a flow: a tfd.TransformedDistribution(base, bijector), got "
        f"{type(prior).__name__}.")
  if not prior.dtype.is_floating:
    raise TypeError(f"`prior` must have a floating dtype, got {prior.dtype.name}.")
  if not prior.event_shape.is_fully_defined() or prior.event_shape.rank == 0:
    raise ValueError(
        "`prior` must have a fully defined event shape of rank >= 1, got "
        f"{prior.event_shape}. Wrap a scalar base in tfd.Sample(base, [d]).")
  if prior.batch_shape.rank != 0:
    raise ValueError(
        f"`prior` must have batch shape [], got {prior.batch_shape}. Use tfd.Independent or "
        "tfd.Sample so that all dimensions are event dimensions.")
  base = prior.distribution
  base_shape = base.event_shape
  if not base_shape.is_fully_defined() or base_shape.rank == 0:
    raise ValueError(
        f"`prior`'s base distribution must have a fully defined event shape, got {base_shape}.")
  _check_base_support(base)
  return prior


# Distributions whose support is that of the distribution they wrap.
_WRAPPERS = (tfd.Sample, tfd.Independent, tfd.BatchReshape, tfd.BatchBroadcast)


def _check_base_support(base):
  """Raises unless `base` is continuous with support `R^d`, as far as TFP can tell.

  TFP's `experimental_default_event_space_bijector()` maps `R^d` onto a distribution's
  support: it is `None` for discrete distributions (and mixtures, whose components are
  checked instead) and the identity exactly when the support is all of `R^d`. Bases for
  which TFP cannot tell are accepted.
  """
  problem = _support_problem(base)
  if problem is None:
    return
  kind, leaf, detail = problem
  where = "" if leaf is base else f" (in {_describe(base)})"
  if kind == "discrete":
    raise TypeError(
        f"`prior`'s base distribution must be continuous, with support R^d: the latent "
        f"posterior is a density over R^d; got the discrete {_describe(leaf)}{where}"
        f"{detail}.")
  raise ValueError(
      f"`prior`'s base distribution must have support R^d (the latent posterior and the "
      f"pre-generator range over all of R^d), got {_describe(leaf)}{where} with "
      f"{kind} support{detail}: latents outside it have log-density -inf and training "
      "cannot proceed. Reparameterize with an unconstrained base, e.g. in place of a "
      "tfd.Uniform(0., 1.) base under `f`: tfd.TransformedDistribution(tfd.Sample("
      "tfd.Normal(0., 1.), d), tfb.Chain([f, tfb.NormalCDF()])), the same prior.")


def _describe(dist):
  """`Sample(Uniform)`: the class names of a distribution and those it wraps."""
  if isinstance(dist, _WRAPPERS):
    return f"{type(dist).__name__}({_describe(dist.distribution)})"
  if isinstance(dist, tfd.MixtureSameFamily):
    return f"{type(dist).__name__}({_describe(dist.components_distribution)})"
  return type(dist).__name__


def _support_problem(dist):
  """`None`, or `(kind, distribution, detail)` describing why `dist`'s support is not R^d."""
  if isinstance(dist, tfd.MixtureSameFamily):
    return _support_problem(dist.components_distribution)
  if isinstance(dist, tfd.Mixture):
    for component in dist.components:
      problem = _support_problem(component)
      if problem is not None:
        return problem
    return None
  if not dist.dtype.is_floating:
    return "discrete", dist, f" of dtype {dist.dtype.name}"
  try:
    bijector = dist.experimental_default_event_space_bijector()
  except Exception:  # pylint: disable=broad-except  # Not implemented: cannot tell.
    return None
  if bijector is None:
    if isinstance(dist, _WRAPPERS):
      return _support_problem(dist.distribution)
    return "discrete", dist, ""
  if not tf.executing_eagerly():
    return None  # Rebuilt inside a `tf.function`: checked when first built.
  try:
    event = dist.event_shape
    if bijector.inverse_event_shape(event) != event:
      return "constrained", dist, (f" (its unconstrained event shape is "
                                   f"{bijector.inverse_event_shape(event)}, not {event})")
    shape = dist.batch_shape.concatenate(event)
    for value in (-5., 0.3, 4.):
      x = tf.fill(shape.as_list(), tf.constant(value, dist.dtype))
      y = bijector.forward(x)
      if not np.allclose(y.numpy(), x.numpy(), rtol=1e-6, atol=1e-6):
        return "bounded", dist, (f" (its default event-space bijector "
                                 f"{type(bijector).__name__} maps {value} to "
                                 f"{np.asarray(y.numpy()).flat[0]:.4g})")
  except Exception:  # pylint: disable=broad-except  # The bijector cannot be probed.
    return None
  return None


def _num_elements(shape):
  return int(np.prod(shape.as_list()))


class LatentTarget(tf.Module):
  """`log p_base(z) + w log p(y | f(z))`: the unnormalized latent posterior of a flow prior.

  Where the prior's forward pass `f(z)` is not finite (a trained flow can overflow far from
  the latents it was trained on), the target is `-inf`: the posterior restricted to the
  latents where `f` is numerically defined. The gradient rows of such latents that come
  back through `f` (NaN: `0 * inf` in `f`'s backward pass) are zeroed where they enter `f`,
  so they cannot poison the other rows of a batch. A likelihood that is NaN at a finite `x`
  stays NaN.

  The observation may carry leading batch dimensions `B`: `log_prob(z)` of latents with
  batch shape `S` (broadcasting against `B`) has shape `broadcast(S, B)`.

  #### Examples

  ```python
  target = tfc.targets.LatentTarget(prior, tfc.likelihoods.Gaussian(op, 0.05), y)
  z = prior.distribution.sample(8, seed=0)
  target.log_prob(z)                # [8]
  target.log_prob(z, likelihood_weight=0.5)
  ```
  """

  def __init__(self, prior, likelihood, observation, name="latent_target"):
    """Builds the target.

    Args:
      prior: the frozen flow prior, a `tfd.TransformedDistribution`.
      likelihood: a `tfc.likelihoods.Likelihood`; built on the prior's event shape and
        dtype here.
      observation: `y`, shape `batch + likelihood.event_shape` (batch may be empty).
      name: module name.
    """
    validate_prior(prior)
    if not isinstance(likelihood, likelihoods_lib.Likelihood):
      raise TypeError(
          "`likelihood` must be a tfp_composed.likelihoods.Likelihood (e.g. "
          f"tfc.likelihoods.Gaussian(operator, scale)), got {type(likelihood).__name__}.")
    super().__init__(name=name)
    likelihood.build(prior.event_shape, dtype=prior.dtype)
    self._prior = prior
    self._likelihood = likelihood
    self._observation = likelihood.check_observation(observation, name="observation",
                                                     allow_batch=True)
    if self._observation.dtype != prior.dtype:
      raise TypeError(
          f"`observation` has dtype {self._observation.dtype.name} but `prior` has dtype "
          f"{prior.dtype.name}; they must match.")
    self._latent_shape = prior.distribution.event_shape

  @property
  def prior(self):
    """The frozen flow prior `p(x) = TransformedDistribution(p_base, f)`."""
    return self._prior

  @property
  def likelihood(self):
    """The observation model `p(y | x)`."""
    return self._likelihood

  @property
  def observation(self):
    """The observation `y`, shape `observation_batch_shape + likelihood.event_shape`."""
    return self._observation

  @property
  def observation_batch_shape(self):
    """Leading batch dimensions of the observation (`[]` for one observation)."""
    rank = self._likelihood.event_shape.rank
    return self._observation.shape[:self._observation.shape.rank - rank]

  @property
  def dtype(self):
    return self._prior.dtype

  @property
  def event_shape(self):
    """Event shape of `x`."""
    return self._prior.event_shape

  @property
  def latent_event_shape(self):
    """Event shape of the latent `z`."""
    return self._latent_shape

  @property
  def latent_size(self):
    """Number of latent dimensions."""
    return _num_elements(self._latent_shape)

  def log_prob_parts(self, z):
    """`(log p_base(z), log p(y | f(z)), x = f(z))`; the likelihood is `-inf` where `x` is not
    finite (see the class docstring)."""
    z = tf.convert_to_tensor(z, self.dtype, name="z")
    x = self._prior.bijector.forward(finite_gradient_rows(z, self._latent_shape.rank))
    log_likelihood = self._likelihood.log_prob(self._observation, x)
    ok = tf.reduce_all(tf.math.is_finite(x), axis=tf.range(-self._prior.event_shape.rank, 0))
    ok = tf.broadcast_to(ok, tf.shape(log_likelihood))
    log_likelihood = tf.where(ok, log_likelihood,
                              tf.constant(-np.inf, log_likelihood.dtype))
    return self._prior.distribution.log_prob(z), log_likelihood, x

  def log_prob(self, z, likelihood_weight=1.):
    """`log p_base(z) + w log p(y | f(z))`, shape: the batch shape of `z` (with the
    observation's batch broadcast in).

    Args:
      z: latents, shape `batch + latent_event_shape`.
      likelihood_weight: the likelihood's weight `w` (1 for the posterior).
    """
    log_prior, log_likelihood, _ = self.log_prob_parts(z)
    if isinstance(likelihood_weight, (int, float)) and likelihood_weight == 1:
      return log_prior + log_likelihood
    weight = tf.cast(likelihood_weight, log_likelihood.dtype)
    # 0 * -inf is NaN: a zero weight gives the prior, even where f overflows.
    return log_prior + tf.where(weight > 0, weight * log_likelihood,
                                tf.zeros_like(log_likelihood))

  __call__ = log_prob

  def flat_log_prob(self, z_flat):
    """`log_prob` of latents flattened to vectors, shape `batch + [latent_size]`."""
    z_flat = tf.convert_to_tensor(z_flat, self.dtype)
    z = tf.reshape(z_flat, tf.concat([tf.shape(z_flat)[:-1], self._latent_shape], 0))
    return self.log_prob(z)


def finite_gradient_rows(z, event_rank):
  """Identity on `z` whose gradient zeroes each event (row) that is not all finite."""

  @tf.custom_gradient
  def identity(z):

    def grad(dz):
      axes = tf.range(tf.rank(dz) - event_rank, tf.rank(dz))
      ok = tf.reduce_all(tf.math.is_finite(dz), axis=axes, keepdims=True)
      return tf.where(ok, dz, tf.zeros_like(dz))

    return tf.identity(z), grad

  return identity(z)
