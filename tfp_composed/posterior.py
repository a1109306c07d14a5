"""The composed posterior: a trainable pre-generator chained before a frozen flow prior.

Given a flow prior `p(x) = TransformedDistribution(p_base, f)` and an observation model
`p(y | x)`, the composed posterior is

    q(x) = TransformedDistribution(q_base, Chain([f, g])),

with a trainable pre-generator `g` and a (learned mixture or standard normal) base `q_base`.
Since KL divergence is invariant under the bijection `f` [1, eq. 5],

    KL(q(x) || p(x | y)) = E_{eps ~ q_base}[ log q_base(eps) - log|det dg/deps|
                                            - log p_base(z) - log p(y | f(z)) ] + log p(y),
    z = g(eps),

so fitting `g` needs forward passes of `f` only: never `f^{-1}` nor `f`'s log-det.

#### References

[1]: Jay Whang, Erik M. Lindgren, Alexandros G. Dimakis. Composing Normalizing Flows for
     Inverse Problems. In _International Conference on Machine Learning_, 2021.
     https://arxiv.org/abs/2002.11743
"""

import time
import warnings

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_composed import checks
from tfp_composed import initialization
from tfp_composed import mixtures
from tfp_composed import pregenerators as pregenerators_lib
from tfp_composed import targets as targets_lib
from tfp_composed.targets import validate_prior

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = ["BatchIndexError", "ComposedPosterior", "NegativeElbo", "condition", "validate_prior"]

_BASES = ("factorized", "mixture", "normal")
# `importance_check`: largest log-weight at a start mode above q's largest draw, nats.
MAX_MODE_GAP = 5.
# Share of `fit(time_limit=...)` the start (mode search or MAP) may take before `q` starts at
# the prior.
_START_SHARE = 0.4
# `fit(time_limit=...)` without `num_steps` trains up to this many times the default steps,
# as many as fit in the time.
_TIME_LIMIT_STEPS = 4
# Share of `fit(time_limit=...)` kept for the importance check after training.
_CHECK_SHARE = 0.05
# First likelihood weight of the geometric annealing schedule.
_ANNEAL_START = 1e-3
# Learning-rate multiplier of the factorized base's parameters.
_BASE_RATE = 10.
# Variance of the factorized base's component locations (component scales sqrt(1 - v)):
# at the prior start, spread for training to move the components apart; at a one-mode
# (Laplace) start, where `q` should be that Gaussian, closer to N(0, 1) (KL 4e-6 nats per
# dimension against 3.7e-4, 4 components: 0.0003 instead of 0.023 nats at 64 dimensions).
_PRIOR_BASE_SPREAD = 0.3
_LAPLACE_BASE_SPREAD = 0.1
# `fit(num_steps=None)` does not train a one-mode start whose importance-sampling gap
# `log mean w - mean log w` (an estimate of KL(q || p), 2048 draws) is at most this, nats.
EXACT_START_GAP = 0.01
# Components per latent dimension (factorized) or in all (mixture) when not given.
_DEFAULT_COMPONENTS = {"factorized": 4, "mixture": 8, "normal": 1}

# Base-mixture components are full-covariance Gaussians up to this latent dimension and
# diagonal (in the affine stage's whitened coordinates) above it.
_FULL_COMPONENT_MAX_DIM = 64
# Up to this latent dimension the default pre-generator's affine stage has axes that the
# start turns onto the directions separating the modes it found (`mode_axes`: 8 D more
# ascents, run only when the search finds several modes).
_MODE_AXES_MAX_DIM = 64

# ---- Large latents (images): defaults of `fit` above this many latent dimensions. ----------
# Measured on the shipped MNIST Glow prior (784 dimensions; `experiments/image_defaults.py`,
# results/image_defaults.md): a MAP + low-rank Laplace start, batches of 16, the path gradient and
# `_LARGE_SAMPLE_DIMS / latent_size` steps (1800) take 98-99 s on 2 cores and end 1.6 +- 1.2 nats
# above 3000 steps from the prior (which take 3.5 minutes) on test image 0 and 9.3 +- 1.2 above
# them on image 1 (note [9]). The path gradient ("sticking the landing") added 3.5 and 7.8 nats at
# 1280 steps on images 0 and 1 (5.0 at 1800 steps); 1800 steps instead of 1280 added 9 nats. (On the ground-truth problems, 16-64 dimensions, it gained nothing under
# fit's 60 s budget, nonlinear_blocks KL 0.194 +- 0.015 against 0.184 +- 0.013: off below this
# size.)
# Earlier (1280 steps, no path gradient): learning rates 5e-4 and 1e-3 ended within a nat of each
# other (3e-3: 11 lower), 1410 steps and 100 L-BFGS iterations no higher, 2560 steps of 8 1.6
# higher for 1.5 times the CPU, a prior start with the same budget 12 lower. A second L-BFGS start
# (0.5 N(0, I)) ended 2500 nats below the one from 0 (image 0): one start. XLA compiled 2.6x
# slower and ran each step 1.4x slower there: it stays off.
LARGE_LATENT_SIZE = 256
_LARGE_BATCH_SIZE = 16
_LARGE_SAMPLE_DIMS = 1.41e6  # steps * latent size: the cost of a step grows with the latent.
_LARGE_MIN_STEPS, _LARGE_MAX_STEPS = 200, 2000
_LARGE_MAP_STARTS = 1
_LARGE_MAP_ITERATIONS = 50
_LARGE_LAPLACE_RANK = 56


def large_latent_defaults(latent_size):
  """`fit`'s defaults above `LARGE_LATENT_SIZE` latent dimensions, as a dict.

  `num_steps = clip(round(1.41e6 / D, -1), 200, 2000)` for `D` latent dimensions (1800 for
  MNIST's 784), `batch_size = 16`, `init = "map"` (`initialize_map`: L-BFGS MAP from `0`, 50
  iterations, rank-56 Laplace), `jit_compile = False`, `path_gradient = True`. On MNIST
  inpainting (results/image_defaults.md, note [9]) they take 98-99 s on 2 cores and end
  1.6 +- 1.2 nats above 3000 steps of 16 from the prior on test image 0 and 9.3 +- 1.2 above
  them on image 1.
  """
  latent_size = checks.positive_integer(latent_size, "latent_size")
  steps = int(np.clip(round(_LARGE_SAMPLE_DIMS / latent_size, -1), _LARGE_MIN_STEPS,
                      _LARGE_MAX_STEPS))
  return {"num_steps": steps, "batch_size": _LARGE_BATCH_SIZE, "init": "map",
          "jit_compile": False, "path_gradient": True}


def fit_defaults(latent_size):
  """`fit`'s defaults for a latent of `latent_size` dimensions, as a dict: those of
  `large_latent_defaults` above `LARGE_LATENT_SIZE`, else 2000 steps of 64, the multi-start
  Laplace start, no XLA and no path gradient."""
  latent_size = checks.positive_integer(latent_size, "latent_size")
  if latent_size > LARGE_LATENT_SIZE:
    return large_latent_defaults(latent_size)
  return {"num_steps": 2000, "batch_size": 64, "init": "laplace", "jit_compile": None,
          "path_gradient": False}
# ---- end of the large-latent defaults. ------------------------------------------------------


def _num_elements(shape):
  return int(np.prod(shape.as_list()))


class BatchIndexError(IndexError, tf.errors.InvalidArgumentError):
  """An index beyond a distribution's batch shape (TFP raises `InvalidArgumentError` there)."""

  def __init__(self, message):
    tf.errors.InvalidArgumentError.__init__(self, None, None, message)


def _concrete_index(item):
  """`item` of a slice tuple with eager tensors replaced by NumPy values."""
  if isinstance(item, slice):
    return slice(*(_concrete_index(v) for v in (item.start, item.stop, item.step)))
  if tf.is_tensor(item):
    if not hasattr(item, "numpy"):
      raise TypeError(
          f"Indexing a `ComposedPosterior` (batch shape []) needs concrete indices, got the "
          f"symbolic tensor {item!r}.")
    return item.numpy()
  return item


class ComposedPosterior(tfd.TransformedDistribution):
  """Approximate posterior `q(x) ~= p(x | y)` of a frozen flow prior, as a TFP distribution.

  `x = f(g(eps))`, `eps ~ q_base`, where `f` is the prior's bijector (frozen), `g` the
  trainable pre-generator and `q_base` one of

  * `base="factorized"` (default): `q_base(eps) = prod_d sum_k pi_dk N(eps_d; mu_dk,
    sigma_dk)`, `K = num_components` (default 4) per dimension: up to `K^D` joint modes
    from `D K` weights (an affine coupling cannot make a coordinate bimodal; this base can),
    sampled with implicit reparameterization; it starts close to `N(0, I)` (evenly spaced
    locations of variance 0.3, scales `sqrt(0.7)`), so `q` starts at the prior.
  * `base="mixture"`: a learned mixture of `K` (default 8) Gaussians (full-covariance up to
    64 latent dimensions, diagonal above) whose components `initialize` places at the
    latent posterior's modes.
  * `base="normal"`: `N(0, I)`.
  `log_prob`, `sample` and `experimental_sample_and_log_prob` are the exact ones of `q`.

  #### Examples

  ```python
  prior = tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0., 1.), [2]), flow)
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Mask([True, False]), scale=0.05)
  posterior = tfc.ComposedPosterior(prior, likelihood, observation=[0.7])
  posterior.fit(seed=0)
  x, log_q = posterior.experimental_sample_and_log_prob(16, seed=1)

  # A composite tensor like other TFP distributions: an argument of a `tf.function`, traced
  # once per posterior object and reading its variables' current values.
  log_prob = tf.function(lambda dist, x: dist.log_prob(x))
  log_prob(posterior, x)
  ```

  #### References

  [1]: Jay Whang, Erik M. Lindgren, Alexandros G. Dimakis. Composing Normalizing Flows for
       Inverse Problems. In _International Conference on Machine Learning_, 2021.
  """

  def __init__(self, prior, likelihood, observation, pregenerator=None, num_components=None,
               base="factorized", validate_args=False, name="ComposedPosterior", _state=None):
    parameters = dict(locals())
    validate_prior(prior)
    if base not in _BASES:
      raise ValueError(f"`base` must be one of {_BASES}, got {base!r}.")
    if num_components is None:
      num_components = _DEFAULT_COMPONENTS[base]
    num_components = checks.positive_integer(num_components, "num_components")
    if base == "normal" and num_components != 1:
      raise ValueError(f"`num_components` must be 1 (or None) for base='normal', got "
                       f"{num_components}.")
    if base == "mixture" and num_components == 1:
      base = "normal"
    with tf.name_scope(name) as name:
      dtype = prior.dtype
      if hasattr(likelihood, "check_observation"):
        likelihood.build(prior.event_shape, dtype=dtype)
        # One observation: its shape is exactly the likelihood's event shape.
        observation = likelihood.check_observation(observation, name="observation")
      self._target = targets_lib.LatentTarget(prior, likelihood, observation)
      self._prior = prior
      self._likelihood = likelihood
      self._observation = self._target.observation
      self._latent_shape = prior.distribution.event_shape
      self._latent_size = _num_elements(self._latent_shape)
      if pregenerator is None:
        pregenerator = _default_pregenerator(self._latent_shape, dtype)
      self._check_pregenerator(pregenerator)
      self._pregenerator = pregenerator
      self._num_components = num_components
      # `loss` stratifies its draws over the mixture's components; other bases are one stratum.
      self._num_strata = num_components if base == "mixture" else 1
      self._objectives = {}
      size = self._latent_size
      k = self._num_components
      if _state is None:  # Rebuilt copies (`copy()`, slicing) share the variables instead.
        _state = {"initialized": tf.Variable(False, trainable=False, name="initialized"),
                  "from_prior": tf.Variable(True, trainable=False, name="from_prior")}
        if base == "factorized":
          locs, scale = _factorized_start(k)
          # Stored divided by `_BASE_RATE`: Adam moves them that many times faster than the
          # pre-generator's weights (they travel O(1) distances to reach the modes).
          rate = tfb.Scale(tf.constant(_BASE_RATE, dtype))
          _state["base_logits"] = tfp.util.TransformedVariable(
              tf.zeros([size, k], dtype), rate, name="base_logits")
          _state["base_locs"] = tfp.util.TransformedVariable(
              tf.constant(np.tile(locs, [size, 1]), dtype), rate, name="base_locs")
          _state["base_scales"] = tfp.util.TransformedVariable(
              tf.fill([size, k], tf.constant(scale, dtype)), tfb.Chain([tfb.Exp(), rate]),
              name="base_scales")
        elif k > 1:
          _state["mixture_logits"] = tf.Variable(tf.zeros([k], dtype), name="mixture_logits")
          _state["component_locs"] = tf.Variable(tf.zeros([k, size], dtype),
                                                 name="component_locs")
          if size <= _FULL_COMPONENT_MAX_DIM:  # Full-covariance components.
            _state["component_scales"] = tfp.util.TransformedVariable(
                tf.eye(size, batch_shape=[k], dtype=dtype),
                tfb.FillScaleTriL(diag_bijector=tfb.Exp(), diag_shift=None),
                name="component_scale_trils")
          else:
            _state["component_scales"] = tfp.util.TransformedVariable(
                tf.ones([k, size], dtype), tfb.Exp(), name="component_scales")
      parameters.update(pregenerator=pregenerator, _state=_state)
      self._initialized = _state["initialized"]
      self._from_prior = _state["from_prior"]
      self.start_modes = None  # Local maxima of the latent target found by the start.
      self._base_kind = base
      self._mixture_logits = self._component_locs = self._component_scales = None
      if base == "factorized":
        self._component_locs = _state["base_locs"]
        self._mixture_logits = _state["base_logits"]
        self._component_scales = _state["base_scales"]
        base = _factorized_mixture(self._mixture_logits, self._component_locs,
                                   self._component_scales)
      elif k == 1:
        base = tfd.MultivariateNormalDiag(loc=tf.zeros([size], dtype),
                                          scale_diag=tf.ones([size], dtype))
      else:
        self._mixture_logits = _state["mixture_logits"]
        self._component_locs = _state["component_locs"]
        self._component_scales = _state["component_scales"]
        base = tfd.MixtureSameFamily(
            tfd.Categorical(logits=self._mixture_logits),
            tfd.MultivariateNormalTriL(loc=self._component_locs,
                                       scale_tril=self._component_scales)
            if size <= _FULL_COMPONENT_MAX_DIM else
            tfd.MultivariateNormalDiag(loc=self._component_locs,
                                       scale_diag=self._component_scales))
      bijectors = [prior.bijector, pregenerator]
      if self._latent_shape.rank != 1:
        bijectors.append(tfb.Reshape(event_shape_out=self._latent_shape,
                                     event_shape_in=[size]))
      super().__init__(distribution=base, bijector=tfb.Chain(bijectors),
                       validate_args=validate_args, parameters=parameters, name=name)

  @classmethod
  def _parameter_properties(cls, dtype, num_classes=None):
    # The posterior's parameters (prior, likelihood, observation, pre-generator) are not
    # batchable tensors; its batch shape is that of the base distribution, which is [].
    return {}

  def __getitem__(self, slices):
    """Slices the batch axes like any TFP distribution; the batch shape is `[]`.

    `posterior[...]` and `posterior[()]` return an equal posterior sharing the variables;
    `tf.newaxis` adds batch dimensions (a `tfd.BatchBroadcast` of this posterior); an
    integer or slice has no batch axis to index and raises `BatchIndexError` (an
    `IndexError` and a `tf.errors.InvalidArgumentError`, which TFP raises there).
    """
    index = slices if isinstance(slices, tuple) else (slices,)
    index = tuple(_concrete_index(item) for item in index)
    try:
      batch_shape = np.zeros([])[index].shape
    except IndexError:
      raise BatchIndexError(
          f"`{type(self).__name__}` has batch shape [] (it is one distribution): the index "
          f"{slices!r} has no batch axis to apply to. Only `...`, `()` and `tf.newaxis` "
          "apply.") from None
    if batch_shape:
      return tfd.BatchBroadcast(self, list(batch_shape))
    return super().__getitem__(())

  def _check_value(self, value, method):
    """Raises a `ValueError` unless the static shape of `value` ends in the event shape."""
    event = self.event_shape
    shape = value.shape
    if shape.rank is None:
      return  # Unknown rank (a traced input): nothing to check statically.
    if shape.rank < event.rank or not shape[shape.rank - event.rank:].is_compatible_with(event):
      raise ValueError(
          f"`value` of `{type(self).__name__}.{method}` must have shape batch_shape + "
          f"{event.as_list()} (the posterior's event shape, the prior's), got shape "
          f"{shape.as_list()}.")

  def _log_prob(self, x, **kwargs):
    self._check_value(x, "log_prob")
    return super()._log_prob(x, **kwargs)

  def _prob(self, x, **kwargs):
    self._check_value(x, "prob")
    return super()._prob(x, **kwargs)

  def _check_pregenerator(self, pregenerator):
    if not isinstance(pregenerator, tfb.Bijector):
      raise TypeError(
          "`pregenerator` must be a tfb.Bijector on the prior's latent space (e.g. "
          f"tfc.pregenerators.real_nvp({self._latent_shape.as_list()})), got "
          f"{type(pregenerator).__name__}.")
    try:
      out = pregenerator.forward(tf.zeros([1] + self._latent_shape.as_list(), self._prior.dtype))
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          "`pregenerator` must map tensors of the prior's latent event shape "
          f"{self._latent_shape.as_list()} to the same shape; calling it on a batch of that "
          f"shape failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if out.shape[1:] != self._latent_shape:
      raise ValueError(
          "`pregenerator` must map the prior's latent event shape "
          f"{self._latent_shape.as_list()} to itself, got output event shape "
          f"{out.shape[1:].as_list()}.")
    if not pregenerator.trainable_variables:
      raise ValueError("`pregenerator` has no trainable variables.")

  # ---------------------------------------------------------------- properties

  @property
  def prior(self):
    """The frozen flow prior `p(x) = TransformedDistribution(p_base, f)`."""
    return self._target.prior

  @property
  def likelihood(self):
    """The observation model `p(y | x)`."""
    return self._target.likelihood

  @property
  def observation(self):
    """The observation `y`."""
    return self._target.observation

  @property
  def pregenerator(self):
    """The trainable latent bijector `g`."""
    return self._pregenerator

  @property
  def num_components(self):
    return self._num_components

  @property
  def latent_event_shape(self):
    """Event shape of the prior's latent `z` (the pre-generator's domain)."""
    return self._target.latent_event_shape

  @property
  def initialized(self):
    """Whether a start (`initialize` or `initialize_map`) has run."""
    return self._initialized

  @property
  def trainable_variables(self):
    """Variables of the pre-generator and the base mixture: all that `fit` changes.

    The prior's variables are never included.
    """
    variables = list(self._pregenerator.trainable_variables)
    if self._base_kind == "factorized":
      for v in (self._mixture_logits, self._component_locs, self._component_scales):
        variables += list(v.trainable_variables)
    elif self._base_kind == "mixture":
      variables += [self._mixture_logits, self._component_locs]
      variables += list(self._component_scales.trainable_variables)
    return tuple(variables)

  @property
  def target(self):
    """The latent target `log p_base(z) + log p(y | f(z))` (a `tfc.targets.LatentTarget`)."""
    return self._target

  @property
  def latent_posterior(self):
    """`q(z)`: the distribution of `z = g(eps)`, `eps ~ q_base`, over the prior's latent.

    A `tfd.TransformedDistribution` sharing this posterior's variables; its bijector
    (`latent_bijector`) maps the flat base space to the latent event shape.
    """
    return tfd.TransformedDistribution(self.distribution, self.latent_bijector)

  @property
  def latent_bijector(self):
    """`g` on flat base vectors `[latent_size]`, into the latent event shape."""
    bijectors = [self._pregenerator]
    if self._latent_shape.rank != 1:
      bijectors.append(tfb.Reshape(event_shape_out=self._latent_shape,
                                   event_shape_in=[self._latent_size]))
    return tfb.Chain(bijectors)

  def latent_sample_and_log_prob(self, sample_shape=(), seed=None):
    """Draws `z ~ q(z)` with `log q(z)` from `g`'s forward pass (no inversion of `g` or `f`).

    `log w = target.log_prob(z) - log q(z)` are the importance log-weights of `p(x | y)` vs
    `q(x)` (the Jacobian of `f` cancels), used by SIR and the diagnostics.
    """
    return self.latent_posterior.experimental_sample_and_log_prob(sample_shape, seed=seed)

  # ---------------------------------------------------------------- the paper's objective

  def latent_target_log_prob(self, z, likelihood_weight=1.):
    """Unnormalized latent posterior `log p_base(z) + w log p(y | f(z))`; see `target`.

    `-inf` where the prior's forward pass `f(z)` is not finite, row by row.

    Args:
      z: latents, shape `batch + latent_event_shape`.
      likelihood_weight: the likelihood's weight `w` (1 for the posterior).

    Returns:
      Tensor of shape `batch`.
    """
    return self._target.log_prob(z, likelihood_weight)

  def mixture_log_weights(self):
    """Log weights `[K]` of the base mixture's components (`[0.]` for a normal or factorized
    base, which `loss` samples as one stratum)."""
    if self._base_kind != "mixture":
      return tf.zeros([1], self.dtype)
    return tf.math.log_softmax(self._mixture_logits)

  def _component_distribution(self):
    """The strata of `loss` as one distribution with batch shape `[K]`: the mixture's
    components, or the whole base (`K = 1`)."""
    if self._base_kind == "normal":
      size = self._latent_size
      return tfd.MultivariateNormalDiag(loc=tf.zeros([1, size], self.dtype),
                                        scale_diag=tf.ones([1, size], self.dtype))
    if self._base_kind == "factorized":
      return _OneStratum(self.distribution)
    return self.distribution.components_distribution

  def negative_elbo_terms(self, samples_per_component, seed, likelihood_weight=1.,
                          shard=None):
    """Per-sample terms `log q_g(z) - log p_base(z) - w log p(y | f(z))`, shape `[n, K]`.

    Component `k` contributes `n` reparameterized draws `eps ~ q_k`, `z = g(eps)`, with
    `log q_g(z) = log q_base(eps) - log|det dg/deps|` from `g`'s forward pass. With
    `shard=(i, m)`, all `n` draws are made with `seed` and only the `i`-th of `m` equal slices
    is evaluated, so the shards of `m` replicas together compute exactly the unsharded terms.

    Where the prior's forward pass overflows (the latent target is `-inf` there), the
    log-likelihood of that draw is replaced by the lowest finite one among the evaluated
    draws (a constant; pessimistic), so the term stays finite and the prior term's gradient
    pulls such draws back. A likelihood that is NaN at a finite `x` leaves the term NaN (and
    `fit` skips the step).
    """
    return self._terms_and_latents(samples_per_component, seed, likelihood_weight, shard)[0]

  def _terms_and_latents(self, samples_per_component, seed, likelihood_weight=1., shard=None,
                         fixed_log_q=False):
    """`(negative_elbo_terms [n, K], z [n K] + latent_event_shape)`, rows in the same order.

    `fixed_log_q`: the terms' `log q_g(z) = log q_base(eps) - log|det dg/deps|` carries no
    gradient (the path gradient adds its own, through `z`)."""
    strata = self._component_distribution()
    base = self.distribution
    if self._base_kind == "factorized":
      # The reverse KL's implicit-reparameterization gradient with respect to the mixture
      # weights is very noisy (its spread was ~7x its mean at 64 draws); the weights learn
      # from the mass-covering term of `loss` only.
      base = _factorized_mixture(tf.stop_gradient(self._mixture_logits), self._component_locs,
                                 self._component_scales)
      strata = _OneStratum(base)
    eps = strata.sample(samples_per_component, seed=seed)  # [n, K, D]
    if shard is not None:
      index, count = shard
      per = samples_per_component // count
      eps = eps[index * per:(index + 1) * per]
    n = tf.shape(eps)[0]
    log_base = base.log_prob(eps)  # [n, K]
    eps_latent = tf.reshape(eps, tf.concat([[-1], self._latent_shape], 0))
    z = self._pregenerator.forward(eps_latent)
    fldj = self._pregenerator.forward_log_det_jacobian(
        eps_latent, event_ndims=self._latent_shape.rank)
    if fixed_log_q:
      log_base, fldj = tf.stop_gradient(log_base), tf.stop_gradient(fldj)
    log_prior, log_likelihood, _ = self._target.log_prob_parts(z)
    overflow = tf.equal(log_likelihood, tf.constant(-np.inf, log_likelihood.dtype))
    worst = tf.stop_gradient(tf.reduce_min(tf.where(
        tf.math.is_finite(log_likelihood), log_likelihood,
        tf.constant(np.inf, log_likelihood.dtype))))
    # A score-function gradient pushing q out of such latents, `(T_i - mean T)_+ grad log
    # q(stop(z_i))` on the overflowing draws, was measured and left out: on a 2-D prior cut
    # at |z1| < 2.5 it lowered q's mass past the edge from 16 % to 3 %, but on the MNIST Glow
    # (super-resolution 2x, 60 s) it raised q's non-finite draws from 2.9 % to 23 %: its
    # coefficients of hundreds of nats swamp the pathwise gradient there.
    log_likelihood = tf.where(overflow, worst, log_likelihood)
    weight = tf.cast(likelihood_weight, log_likelihood.dtype)
    terms = -fldj - log_prior - weight * log_likelihood
    return log_base + tf.reshape(terms, [n, self._num_strata]), z

  def loss(self, batch_size=64, seed=None, likelihood_weight=1., shard=None,
           forward_weight=0., path_gradient=False):
    """The latent-space negative ELBO: `KL(q || p(. | y)) - log p(y)`, in nats.

    `E_{eps ~ q_base}[log q_base(eps) - log|det dg/deps| - log p_base(z) - log p(y | f(z))]`
    with `z = g(eps)` [1, eq. 5]. With a mixture base the expectation is stratified over the
    components, `sum_k w_k E_{eps ~ q_k}[...]`, which makes the gradient with respect to the
    mixture weights exact and keeps every component's reparameterization gradient.

    With `forward_weight = lam > 0` the gradient also carries `lam` times the gradient of
    the mass-covering `KL(p_w || q)`, estimated by self-normalized importance sampling from
    the same draws held fixed,

        grad KL(p_w || q) ~= -sum_i wbar_i grad log q(stop_gradient(z_i)),
        wbar_i ~ p_w(z_i) / q(z_i)  (normalized, no gradient),

    where `log q(z)` inverts `g` at fixed `z` (`p_w` is the tempered latent target). It
    moves mass between separated modes, which the reverse KL's gradient barely does. The
    returned value stays the negative ELBO (the added term's value is cancelled). Under
    `shard`, the weights are normalized over all replicas' draws (an all-reduce in the
    replica context), so the shards' gradients still add up to the unsharded one.

    With `path_gradient=True` the reparameterization gradient drops its score term
    `sum_i m_i grad log q(stop_gradient(z_i))` (zero in expectation; "sticking the landing"
    [2]): the estimate stays unbiased, and its variance vanishes as `q` reaches the
    posterior. What is left reaches the parameters through the draws only,
    `sum_i m_i (grad_z log q(z_i) - grad_z log p(z_i, y)) dz_i`, with `grad_z log q` taken at
    fixed parameters: one inversion of `g` on the draws and its gradient with respect to its
    input, not to `g`'s parameters (results/benchmark.md, last section). The draws' masses `m_i` (mixture weights / n) keep their own gradient.

    This is the one definition of the objective: `fit` minimizes it.

    Args:
      batch_size: total number of samples (split evenly over the components, rounded up).
      seed: a stateless seed (int or shape-[2] tensor); None draws a fresh one.
      likelihood_weight: weight of the log-likelihood term (1 for the posterior).
      shard: `(i, m)`: the contribution of the `i`-th of `m` equal slices of the draws; the
        `m` contributions sum to the unsharded loss (`samples_per_component(batch_size, m)`
        draws per component are made).
      forward_weight: `lam`, the weight of the mass-covering gradient (0: the plain ELBO).
      path_gradient: drop the score term of the reparameterization gradient (see above).

    Returns:
      Scalar loss tensor.

    #### References

    [1]: Jay Whang, Erik M. Lindgren, Alexandros G. Dimakis. Composing Normalizing Flows for
         Inverse Problems. In _ICML_, 2021.
    [2]: Geoffrey Roeder, Yuhuai Wu, David Duvenaud. Sticking the Landing: Simple,
         Lower-Variance Gradient Estimators for Variational Inference. In _NeurIPS_, 2017.
    """
    if seed is None:
      seed = tfp.random.sanitize_seed(None)
    num_shards = 1 if shard is None else shard[1]
    per_component = self.samples_per_component(batch_size, num_shards)
    terms, z = self._terms_and_latents(per_component, seed, likelihood_weight, shard=shard,
                                       fixed_log_q=path_gradient)
    log_weights = self.mixture_log_weights()
    value = tf.reduce_sum(tf.exp(log_weights) * tf.reduce_sum(terms, axis=0)) / per_component
    forward = not (isinstance(forward_weight, (int, float)) and forward_weight == 0)
    if not (forward or path_gradient):
      return value
    z_fixed = tf.stop_gradient(z)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
      tape.watch(z_fixed)
      log_q = self.latent_posterior.log_prob(z_fixed)  # [n K]; inverts g.
    if path_gradient:
      score = tf.stop_gradient(tape.gradient(log_q, z_fixed))  # grad_z log q, fixed parameters.
      score = tf.where(tf.math.is_finite(score), score, tf.zeros_like(score))
      mass = tf.stop_gradient(
          tf.reshape(tf.exp(log_weights) * tf.ones_like(terms), [-1]) / per_component)
      pull = tf.reduce_sum(mass * tf.reduce_sum(tf.reshape(score * z, [tf.shape(mass)[0], -1]),
                                                axis=-1))
      value += pull - tf.stop_gradient(pull)
    if not forward:
      return value
    # Stratified draws: the draw of component k stands for mass w_k / n of q.
    log_is = tf.reshape(tf.stop_gradient(log_weights - terms), [-1])
    log_is = tf.where(tf.math.is_finite(log_is), log_is, tf.constant(-np.inf, log_is.dtype))
    top = tf.reduce_max(log_is)
    if shard is not None:  # Normalize over all replicas' draws, as without sharding.
      context = tf.distribute.get_replica_context()
      top = tf.reduce_max(context.all_gather(top[tf.newaxis], axis=0))
    unnormalized = tf.exp(log_is - top)
    total = tf.reduce_sum(unnormalized)
    if shard is not None:
      total = context.all_reduce(tf.distribute.ReduceOp.SUM, total)
    normalized = tf.stop_gradient(unnormalized / total)
    log_q = tf.where(normalized > 0, log_q, tf.zeros_like(log_q))
    forward = -tf.reduce_sum(normalized * log_q)
    lam = tf.cast(forward_weight, value.dtype)
    return value + lam * (forward - tf.stop_gradient(forward))

  def samples_per_component(self, batch_size, num_shards=1):
    """Draws per mixture component for `batch_size` samples: `ceil(batch_size / K)`, rounded
    up to a multiple of `num_shards`."""
    per_component = -(-int(batch_size) // self._num_strata)
    return -(-per_component // num_shards) * num_shards

  # ---------------------------------------------------------------- initialization

  def initialize(self, num_starts=None, seed=0, num_steps=500, deadline=None,
                 principal_axes=True):
    """Multi-start Laplace start: locates the latent posterior's modes and fits `q` to them.

    `tfc.initialization.find_modes` finds distinct modes with Laplace approximations
    weighted by their evidence.

    * Mixture base: the pre-generator's affine stage takes the moment-matched Gaussian of up
      to `num_components` modes and the base components take each mode's whitened mean and
      scales (modes are repeated when there are fewer than components).
    * Factorized base: the search stops at the second distinct mode. With one mode the
      affine stage takes its Laplace Gaussian (`z = mu + L eps`, `L L^T = Sigma`) and the
      base restarts near the standard normal (`_LAPLACE_BASE_SPREAD`: 3e-4 nats from it at
      64 dimensions). A stage with axes (the default pre-generator's, up to
      `_MODE_AXES_MAX_DIM` = 64 dimensions) takes `Sigma`'s eigenvectors as its axes if
      `principal_axes` (`z = mu + V diag(lambda)^(1/2) eps`), so that the couplings'
      coordinates do not depend on how the latent's axes happen to lie: on curved posteriors
      whose blocks a latent rotation mixes, the Cholesky factor's coordinates mix them too
      (KL 0.40 against 0.26 with the eigenvectors; results/mode_coverage.md). With several
      modes `q` is reset to the prior (identity `g`), which covers every mode, for `fit` to
      anneal from, and a stage with axes has them turned onto the directions that separate
      the modes
      (`tfc.initialization.mode_axes`: `8 D` more ascents; the prior is isotropic, so `q`
      still starts at it), so that the factorized base can hold modes that no latent
      coordinate separates (measured in `results/mode_coverage.md`).

    For a unimodal posterior this is the exact posterior of a linear-Gaussian problem.
    Sets `modes_found` (1 for one mode) and returns `self`.

    `deadline` (a `time.perf_counter()` time; factorized base only; `fit(time_limit=...)`
    gives the start `_START_SHARE` of its limit): a search still running past it is
    abandoned and `q` starts at the prior, as for several modes (`modes_found` None).
    """
    dtype = self.dtype
    size = self._latent_size
    factorized = self._base_kind == "factorized"
    k_max = 2 if factorized else self._num_components
    search_start = time.perf_counter()
    try:
      found = initialization.find_modes(self._target, k_max, seed=seed, num_starts=num_starts,
                                        num_steps=num_steps,
                                        deadline=deadline if factorized else None)
    except initialization.SearchTimeout:
      found = None
    if found is None:  # Out of time: the prior covers every mode; `fit` anneals from it.
      return self._start_at_prior()
    num_modes = found.num_modes
    points = found.locs if found.ascents is None else np.concatenate([found.locs, found.ascents])
    self.start_modes = points.reshape((-1,) + tuple(self.latent_event_shape))
    stage = pregenerators_lib.find_affine_stage(self._pregenerator)
    if factorized:
      self._reset_factorized_base(_LAPLACE_BASE_SPREAD if num_modes == 1 and stage is not None
                                  else _PRIOR_BASE_SPREAD)
      if stage is not None:
        if num_modes == 1:
          axes = None
          if principal_axes and stage.axes is not None:
            axes = np.linalg.eigh(found.covariances[0])[1]
          _set_stage(stage, found.locs[0], found.covariances[0], axes)
        else:  # The prior (any axes: it is isotropic), its axes along the modes' choices.
          axes = None
          # The axes' ascents cost about what the search did: under a deadline that would
          # pass first, the axes stay the identity.
          search_seconds = time.perf_counter() - search_start
          if stage.axes is not None and (
              deadline is None or time.perf_counter() + search_seconds < deadline):
            try:
              axes, points = initialization.mode_axes(self._target, found, seed=seed,
                                                      num_steps=num_steps, deadline=deadline)
              self.start_modes = np.concatenate([found.locs, points]).reshape(
                  (-1,) + tuple(self.latent_event_shape))
            except initialization.SearchTimeout:
              pass
          _set_stage(stage, np.zeros([size]), np.eye(size), axes)
      self._from_prior.assign(num_modes > 1)
      self._initialized.assign(True)
      self.modes_found = num_modes
      return self

    assignment = [j % num_modes for j in range(k_max)]
    counts = np.bincount(assignment, minlength=num_modes)
    log_w = np.array([found.log_weights[j] - np.log(counts[j]) for j in assignment])
    log_w -= np.logaddexp.reduce(log_w)
    mixture = initialization.ModeMixture(
        locs=found.locs[assignment], covariances=found.covariances[assignment],
        log_weights=log_w, values=found.values[assignment])
    mean, covariance = mixture.moments()
    mus, covs = mixture.locs, mixture.covariances

    if stage is not None:
      _set_stage(stage, mean, covariance)
      linear = stage.matrix().numpy()
    else:
      linear = np.eye(size)
      mean = np.zeros([size])
    if self._base_kind == "mixture":
      inv = np.linalg.inv(linear)
      locs = np.einsum("ij,kj->ki", inv, mus - mean)
      if size <= _FULL_COMPONENT_MAX_DIM:
        white_covs = inv[None] @ covs @ inv.T[None]
        white_covs = 0.5 * (white_covs + np.swapaxes(white_covs, -1, -2))
        scales = np.linalg.cholesky(white_covs + 1e-9 * np.eye(size))
      else:  # Diagonal components: only the diagonal of inv C inv^T is needed.
        white_vars = np.sum((inv[None] @ covs) * inv[None], axis=-1)
        scales = np.sqrt(np.maximum(white_vars, 1e-12))
      self._mixture_logits.assign(tf.cast(log_w, dtype))
      self._component_locs.assign(tf.cast(locs, dtype))
      self._component_scales.assign(tf.cast(scales, dtype))
    self._from_prior.assign(False)
    self._initialized.assign(True)
    self.modes_found = num_modes
    return self

  def _start_at_prior(self):
    """`q` at the prior (identity `g`, near-standard base) for `fit` to anneal from: the start
    of a search that ran out of time. Factorized base only. Returns `self`."""
    self._reset_factorized_base()
    stage = pregenerators_lib.find_affine_stage(self._pregenerator)
    if stage is not None:
      _set_stage(stage, np.zeros([self._latent_size]), np.eye(self._latent_size))
    self._from_prior.assign(True)
    self._initialized.assign(True)
    self.modes_found = None
    self.start_modes = None
    return self

  def _reset_factorized_base(self, spread=_PRIOR_BASE_SPREAD):
    """The factorized base back at its near-standard-normal start."""
    locs, scale = _factorized_start(self._num_components, spread)
    self._mixture_logits.assign(tf.zeros_like(self._mixture_logits))
    self._component_locs.assign(tf.constant(np.tile(locs, [self._latent_size, 1]), self.dtype))
    self._component_scales.assign(tf.fill([self._latent_size, self._num_components],
                                          tf.constant(scale, self.dtype)))

  def initialize_map(self, num_starts=_LARGE_MAP_STARTS, seed=0,
                     max_iterations=_LARGE_MAP_ITERATIONS, rank=_LARGE_LAPLACE_RANK,
                     fit_scales=False, deadline=None):
    """MAP + low-rank Laplace start for large latents (`fit`'s start above 256 dimensions).

    `tfc.initialization.find_map` climbs the latent target by L-BFGS from `num_starts`
    starts; `tfc.initialization.laplace_low_rank` approximates the curvature at the best
    optimum `z*` by `Sigma^{-1} = D^{1/2} (I + V diag(lambda) V^T) D^{1/2}` (rank `rank`),
    `tfc.initialization.fit_laplace_scales` rescales its variances by ELBO if `fit_scales`
    (it raised the start's ELBO on MNIST from about -2560 to -170 but ended 6 nats lower
    after 1280 steps, one seed: off by default), and
    the pre-generator's affine stage takes `N(z*, Sigma)` (full-rank: `L L^T = Sigma`;
    diagonal: `diag(Sigma)`). The base mixture's components stay at `N(0, I)` in the
    stage's whitened coordinates. Costs `(3 + num_starts * max_iterations)`-odd gradient
    batches instead of the `D` Hessian-vector products of `initialize`.

    `deadline` (a `time.perf_counter()` time; factorized base only; `fit(time_limit=...)`
    gives the start `_START_SHARE` of its limit): L-BFGS stops as soon as its measured pace
    says it cannot finish by then, and the Laplace fit is checked before each batch of
    Hessian-vector products; a start out of time leaves `q` at the prior (`modes_found`
    None), which `fit` anneals from.
    """
    if self._base_kind != "factorized":
      deadline = None
    try:
      found_locs, found_values = initialization.find_map(
          self._target, num_starts=num_starts, seed=seed, max_iterations=max_iterations,
          deadline=deadline)
      laplace = initialization.laplace_low_rank(self._target, found_locs[0], rank=rank,
                                                seed=seed, value=found_values[0],
                                                deadline=deadline)
    except initialization.SearchTimeout:
      return self._start_at_prior()
    if fit_scales:
      laplace, _ = initialization.fit_laplace_scales(self._target, laplace, seed=seed)
    stage = pregenerators_lib.find_affine_stage(self._pregenerator)
    if stage is None:
      warnings.warn("The pre-generator has no affine stage: `initialize_map` changes nothing.",
                    stacklevel=2)
    elif stage.full_rank:
      _set_stage(stage, laplace.loc, laplace.covariance())
    else:  # Only the diagonal: no dense [D, D] matrix.
      if stage.axes is not None:
        stage.axes.assign(tf.eye(stage.size, dtype=stage.dtype))
      stage.shift.assign(tf.cast(laplace.loc, stage.dtype))
      stage.scale_diag.assign(tf.cast(np.sqrt(laplace.variance()), stage.dtype))
    self._from_prior.assign(False)
    self._initialized.assign(True)
    self.modes_found = 1
    self.map_start = laplace
    self.start_modes = np.asarray(found_locs[:1]).reshape((1,) + tuple(self.latent_event_shape))
    return self

  # ---------------------------------------------------------------- training

  def fit(self, num_steps=None, batch_size=None, learning_rate=1e-3, seed=0, callbacks=None,
          strategy=None, jit_compile=None, checkpoint_dir=None, verbose=1, init="auto",
          anneal_steps=None, forward_weight=None, path_gradient=None, check_weights=True,
          log_dir=None, image_every=None, time_limit=None, **kwargs):
    """Fits the pre-generator and the base by minimizing `loss` with `training.fit`.

    The defaults minimize, at step `t`,

        L_t = KL(q || p_{w_t}) + lam KL_SNIS(p_{w_t} || q),   p_w(z) ~ p_base(z) p(y | f(z))^w

    (the reverse KL's value and gradient, plus `lam` times the self-normalized importance-
    sampling gradient of the forward KL on the same draws; see `loss`), and choose the start:

    * `initialize` searches the latent posterior's modes. One mode: `q` starts at its
      Laplace Gaussian (exact for linear-Gaussian problems) and `w_t = 1`. Several modes:
      `q` starts at the prior, which covers every mode, and the geometric schedule
      `w_t = 1e-3^(1 - min(1, 2 t / num_steps))` anneals the likelihood in from ~0, spending
      its early steps at small weights, where the modes separate (a linear schedule lost the
      minor mode of a narrow two-mode posterior), so each mode is reached before the
      barriers between them rise.
    * The factorized base `prod_d sum_k pi_dk N(eps_d; mu_dk, sigma_dk)` (see the class) can
      hold `K^D` joint modes with `D K` weights; the reverse KL would collapse them, the
      forward term does not (it is the only gradient of the weights `pi`, whose reverse-KL
      gradient is too noisy to move mass between separated modes).

    Measured with these defaults on `tfc.problems` (D = 16 to 64; `experiments/mode_coverage.py`):
    products of 8 bimodal blocks keep all 256 modes with masses within 0.02, where reverse KL
    from a Laplace start kept one mode in most blocks. After training `importance_check`
    runs; if the importance weights say `q` is not accurate enough, a one-line warning names
    the refinement (SIR or NeuTra HMC in `tfc.baselines`).

    Above `LARGE_LATENT_SIZE` (256) latent dimensions the defaults are
    `large_latent_defaults(latent_size)`: `num_steps = clip(round(1.41e6 / D, -1), 200, 2000)`,
    `batch_size = 16`, `init = "auto"` meaning `initialize_map`, no XLA, the path gradient.

    Args:
      num_steps: total optimizer steps (a resumed run counts the restored ones); default
        2000 (large latents: see above). With the default, a one-mode start that is
        already exact is not trained: `importance_check` runs on the start, and if its
        importance-sampling gap `log mean w - mean log w` (a Monte Carlo estimate of
        KL(q || p)) is at most `EXACT_START_GAP` (0.01 nats) with a trustworthy k-hat, no
        step runs (`history.exact_start`; e.g. linear-Gaussian problems, whose Laplace start
        is their posterior). Pass `num_steps` to train regardless. With `time_limit` the
        default is `_TIME_LIMIT_STEPS` (4) times as many, of which as many run as fit in
        the time: a budget is used, not left unspent after 2000 steps.
      batch_size: samples per step, split evenly over a mixture base's components;
        default 64 (large latents: 16).
      learning_rate: peak Adam learning rate (warm-up, then cosine decay); the factorized
        base's parameters move 10 times faster.
      seed: int; step `t` uses the stateless seed `fold_in(seed, t)`.
      callbacks: `tf_keras` callbacks (see `training.fit`).
      strategy: a `tf.distribute.Strategy` under whose scope the posterior was built.
      jit_compile: compile the step with XLA.
      checkpoint_dir: a `tf.train.CheckpointManager` directory; resumes from it.
      verbose: 0 silent, 1 a progress bar.
      init: "auto" runs `initialize(seed=seed)` (above 256 latent dimensions
        `initialize_map(seed=seed)`) unless a start has already run or a checkpoint is
        restored; "laplace" always runs `initialize`, "map" always `initialize_map`; None
        skips both (`q` stays where it is: at the prior for a new posterior).
      anneal_steps: an int: the likelihood weight rises linearly from 0 to 1 over these
        first steps; None: geometrically over `num_steps // 2` steps when `q` starts at the
        prior (several modes found, or a new posterior fitted with `init=None`), none
        otherwise.
      forward_weight: `lam`, the weight of the mass-covering forward-KL gradient (0: the
        paper's reverse KL alone); default 1 (large latents: 0).
      path_gradient: drop the zero-mean score term of the reparameterization gradient
        ("sticking the landing", see `loss`); default False (large latents: True).
      check_weights: run `importance_check` after training (result in `diagnosis`).
      log_dir: TensorBoard directory: per-step `train/loss`, `train/grad_norm`,
        `train/learning_rate`, `train/likelihood_weight` (see `training.fit`).
      image_every: with `log_dir` and an image-shaped event, write a grid of 64 posterior
        samples, their mean and std (`posterior/samples`, `posterior/mean`, `posterior/std`)
        every this many steps.
      time_limit: optional seconds for the whole call (start, training and the importance
        check): after the start, the steps that fit the time left are planned from the
        measured step time (at most `num_steps`), and the annealing and learning-rate
        schedules are laid over the planned steps, so they finish in time. The mode search
        may take `_START_SHARE` (40%) of the limit, past which `q` starts at the prior (and
        anneals); an ascent (or the L-BFGS of large latents) whose measured pace says it
        cannot finish in that share stops at once, giving the time to training.
        `check_weights` is given `_CHECK_SHARE` (5%) of the limit.
      **kwargs: further options of `training.fit` (`steps_per_execution`,
        `checkpoint_every`, `max_bad_steps`, `clip_norm`, `steps_per_epoch`, `convergence`).

    Returns:
      A `tf_keras.callbacks.History` whose `history` holds per-step `loss`, `grad_norm` and
      `likelihood_weight`, and whose `diagnostics` holds `diagnose()`'s result when
      `verbose` (None otherwise).
    """
    from tfp_composed import training  # pylint: disable=g-import-not-at-top
    if init not in ("auto", "laplace", "map", None) or isinstance(init, bool):
      raise ValueError(f"`init` must be 'auto', 'laplace', 'map' or None, got {init!r}.")
    # ---- Large-latent defaults (see `large_latent_defaults`).
    large = self._latent_size > LARGE_LATENT_SIZE
    steps_given = num_steps is not None
    defaults = fit_defaults(self._latent_size)
    if num_steps is None:  # A time limit is used: up to `_TIME_LIMIT_STEPS` x the default.
      num_steps = defaults["num_steps"] * (1 if time_limit is None else _TIME_LIMIT_STEPS)
    batch_size = defaults["batch_size"] if batch_size is None else batch_size
    jit_compile = defaults["jit_compile"] if jit_compile is None else jit_compile
    if forward_weight is None:  # Measured on small and medium latents (mode coverage).
      forward_weight = 0. if large else 1.
    if path_gradient is None:
      path_gradient = defaults["path_gradient"]
    # ---- end of the large-latent defaults.
    batch_size = checks.positive_integer(batch_size, "batch_size")
    num_steps = checks.positive_integer(num_steps, "num_steps")
    if anneal_steps is None:  # Anneal geometrically when `q` starts at the prior.
      anneal_steps, gate, schedule = int(num_steps) // 2, self._from_prior, "geometric"
    else:
      gate, schedule = None, "linear"
    anneal_steps = checks.non_negative_integer(anneal_steps, "anneal_steps")
    if batch_size < self._num_strata:
      raise ValueError(
          f"`batch_size` must be at least `num_components` ({self._num_strata}): each "
          f"step draws the same number of samples from every mixture component; got "
          f"{batch_size}.")
    if batch_size % self._num_strata:
      warnings.warn(
          f"`batch_size` {batch_size} is not a multiple of `num_components` "
          f"({self._num_strata}); each step draws "
          f"{self.samples_per_component(batch_size) * self._num_strata} samples.",
          stacklevel=2)
    # One objective object per setting, so repeated fits can reuse its compiled step.
    forward_weight = checks.non_negative_number(forward_weight, "forward_weight")
    if time_limit is not None:
      time_limit = checks.positive_number(time_limit, "time_limit")
      if check_weights:
        time_limit *= 1. - _CHECK_SHARE
    path_gradient = checks.boolean(path_gradient, "path_gradient")
    key = (batch_size, anneal_steps > 0, gate is None, forward_weight, schedule, path_gradient)
    if key not in self._objectives:
      self._objectives[key] = NegativeElbo(self, batch_size, anneal_steps, anneal_if=gate,
                                           forward_weight=forward_weight, schedule=schedule,
                                           path_gradient=path_gradient)
    objective = self._objectives[key]

    def on_horizon(planned_steps):  # The annealing covers the same share of the planned steps.
      if objective.annealed:
        objective.anneal_steps = max(1, round(anneal_steps * planned_steps / num_steps))

    # Under a time limit the start (mode search, or the L-BFGS MAP and low-rank Laplace
    # of large latents) may take `_START_SHARE` of it; out of time, q starts at the prior.
    start_deadline = (None if time_limit is None
                      else time.perf_counter() + _START_SHARE * time_limit)
    start_options = {"deadline": start_deadline}

    start_check = {}  # The start's importance check and whether it found the start exact.

    def on_fresh_start():  # True: the start is exact enough, `training.fit` runs no step.
      auto = init == "auto" and not bool(self._initialized.numpy())
      if init == "laplace" or (auto and defaults["init"] == "laplace"):
        self.initialize(seed=seed, **start_options)
      elif init == "map" or auto:
        self.initialize_map(seed=seed, **start_options)
      else:
        return False
      if large or steps_given or getattr(self, "modes_found", None) != 1:
        return False
      check = self.importance_check(seed=seed)
      d = check["diagnostics"]
      start_check.update(check=check, exact=bool(d.trustworthy) and d.gap <= EXACT_START_GAP)
      return start_check["exact"]

    def on_resume():
      if init == "laplace":
        self.initialize(seed=seed)
      elif init == "map":
        self.initialize_map(seed=seed)

    if image_every is not None:
      image_every = checks.positive_integer(image_every, "image_every")
      if log_dir is None:
        raise ValueError(f"`image_every` ({image_every}) needs `log_dir`, got log_dir=None.")
      kwargs.update(summary_every=image_every, summary_fn=training.image_summaries(
          lambda n, sample_seed: self.sample(n, seed=sample_seed), self.event_shape, seed=seed))

    history = training.fit(
        objective, self.trainable_variables, num_steps=num_steps,
        learning_rate=learning_rate, seed=seed, callbacks=callbacks, strategy=strategy,
        jit_compile=jit_compile, checkpoint_dir=checkpoint_dir, verbose=verbose,
        checkpoint_objects={"initialized": self._initialized, "from_prior": self._from_prior},
        on_fresh_start=on_fresh_start, on_resume=on_resume, log_dir=log_dir,
        time_limit=time_limit, on_horizon=on_horizon, **kwargs)
    history.diagnostics = None
    history.exact_start = start_check.get("exact", False)
    if history.exact_start and verbose:
      print(f"fit: the start is exact to {start_check['check']['diagnostics'].gap:.2g} nats "
            f"(importance-sampling gap, limit {EXACT_START_GAP:g}): not trained.")
    if check_weights:
      self.diagnosis = (start_check["check"] if history.exact_start
                        else self.importance_check(seed=seed))
      history.diagnostics = self.diagnosis["diagnostics"]
      if verbose:
        print(f"diagnostics: {history.diagnostics.summary()}")
      if not self.diagnosis["adequate"]:
        warnings.warn(self.diagnosis["message"], stacklevel=2)
    return history

  def diagnose(self, num_samples=4096, seed=0, batch_size=1024):
    """Importance-weight diagnostics of `q` against the latent target: ELBO, IW bound on
    `log p(y)`, ESS, PSIS k-hat and `trustworthy` (see `tfc.diagnostics.diagnose`)."""
    from tfp_composed import diagnostics  # pylint: disable=g-import-not-at-top
    return diagnostics.diagnose(self, num_samples=num_samples, seed=seed,
                                batch_size=batch_size)

  def importance_check(self, num_samples=2048, seed=0, min_ess_fraction=0.1,
                       max_mode_gap=MAX_MODE_GAP):
    """Whether `q` is close enough to `p(x | y)` for its own samples and densities.

    From the log-weights `log w = log p_base(z) + log p(y | f(z)) - log q(z)`, `z ~ q(z)`
    (forward passes only; `diagnose`), `q` is adequate when the PSIS Pareto `k_hat` is below
    `min(1 - 1 / log10(n), 0.7)` (`trustworthy`; 0.70 at n = 2048, Vehtari et al.) and the
    normalized effective sample size `(sum w)^2 / (n sum w^2) >= min_ess_fraction`.

    Draws of `q` cannot show a mode `q` has missed: its weights there are never drawn (a `q`
    holding one of 256 joint modes had ESS 72% and k-hat 0.42). So the modes found by the
    start (`start_modes`, when a start ran) are checked too: `q` misses one when its
    log-weight there exceeds the largest log-weight of the `n` draws by more than
    `max_mode_gap` nats (default 5: `p / q` at that point is over 148 times its largest value
    anywhere `q` put a draw; for `q = p` the gap is 0). Otherwise the returned message names the
    refinements that reweight or correct `q`'s samples (which cannot restore a missed mode).

    Returns:
      A dict: `ess_fraction`, `k_hat`, `mode_gap` (nats; None without start modes),
      `adequate`, `message`, `diagnostics` (the `tfc.diagnostics.ImportanceDiagnostics`).
    """
    from tfp_composed import diagnostics  # pylint: disable=g-import-not-at-top
    log_w = diagnostics.importance_log_weights(self, num_samples, seed, batch_size=1024)
    d = diagnostics.importance_diagnostics(log_w)
    weights_ok = bool(d.trustworthy) and d.ess_fraction >= min_ess_fraction
    mode_gap = self._mode_gap(log_w)
    modes_ok = mode_gap is None or mode_gap <= max_mode_gap
    adequate = weights_ok and modes_ok
    message = (
        f"fit: q is {'adequate' if adequate else 'not accurate enough'} (importance-weight "
        f"ESS {100 * d.ess_fraction:.1f}% of {num_samples}, k-hat {d.k_hat:.2f}"
        + ("" if mode_gap is None else f", mode gap {mode_gap:.1f} nats") + ")")
    if not modes_ok:
      message += (
          f"; q misses a mode the start found (its log-weight there is {mode_gap:.1f} nats "
          f"above the largest of q's draws, limit {max_mode_gap:g}): q's samples leave out part "
          "of the posterior, and reweighting them (SIR) or HMC started from q cannot restore "
          "it (the start's points are in posterior.start_modes).")
    elif not adequate:
      message += (
          "; refine its samples: tfc.baselines.run('composed_sir', ..., posterior=posterior) "
          "resamples q by its importance weights, tfc.baselines.run('neutra_hmc', ..., "
          "posterior=posterior) runs HMC through g.")
    return {"ess_fraction": d.ess_fraction, "k_hat": d.k_hat, "mode_gap": mode_gap,
            "adequate": adequate, "message": message, "diagnostics": d}

  def _mode_gap(self, log_w):
    """`max_modes log w - max_draws log w` over `start_modes` (None without them)."""
    modes = getattr(self, "start_modes", None)
    finite = log_w[np.isfinite(log_w)]
    if modes is None or not finite.size:
      return None
    z = tf.constant(modes, self.dtype)
    at_modes = (self._target.log_prob(z) - self.latent_posterior.log_prob(z)).numpy()
    at_modes = at_modes[np.isfinite(at_modes)]
    if not at_modes.size:
      return None
    return float(at_modes.max() - finite.max())


# TFP makes every `TransformedDistribution` subclass an `AutoCompositeTensor` (its
# metaclass sets `_type_spec` after the class is made), whose type spec holds the
# constructor's non-tensor arguments by value. The likelihood (a `tf.Module`) and a prior
# that is not itself a composite tensor have no value to compare, so the spec was unhashable
# and a posterior could not be passed to a `tf.function`. They are held by reference
# instead, as TFP holds callables (the pre-generator): a `tf.function` traces once per
# posterior object, rebuilds it from its variables and sees their current values.
_BY_REFERENCE = ("prior", "likelihood")
_auto_type_spec = ComposedPosterior._type_spec  # pylint: disable=protected-access


def _type_spec(self):
  spec = _auto_type_spec.fget(self)
  # pylint: disable=protected-access
  by_value = dict(spec._non_tensor_params)
  by_reference = dict(spec._callable_params)
  for name in _BY_REFERENCE:
    if name in by_value:
      by_reference[name] = by_value.pop(name)
  return spec._copy(non_tensor_params=by_value, callable_params=by_reference)


ComposedPosterior._type_spec = property(_type_spec)  # pylint: disable=protected-access


class NegativeElbo:
  """The composed posterior's training loss, `loss(seed, step, shard) -> (value, logs)`.

      L_t = E_{eps ~ q_base}[log q_base(eps) - log|det dg/deps| - log p_base(z)
                             - w_t log p(y | f(z))],   z = g(eps),   w_t = min(1, t / T_anneal)

  (`ComposedPosterior.loss` with `batch_size` samples and the likelihood weight `w_t` of step
  `t`; `w_t = 1` without annealing; `schedule="geometric"`: `w_t = 1e-3^(1 - min(1, t /
  T_anneal))`), plus `forward_weight` times the mass-covering gradient of `loss`. The value
  at `w = 1` is `KL(q || p(. | y)) - log p(y)`.

  Args:
    posterior: the `ComposedPosterior`.
    batch_size: samples per step.
    anneal_steps: `T_anneal`; 0 for no annealing.
    anneal_if: optional boolean variable: anneal only while it is True (else `w_t = 1`).
    forward_weight: weight of the forward-KL gradient (see `ComposedPosterior.loss`).
    schedule: "linear" or "geometric".
    path_gradient: drop the score term of the gradient (see `ComposedPosterior.loss`).
  """

  def __init__(self, posterior, batch_size, anneal_steps=0, anneal_if=None,
               forward_weight=0., schedule="linear", path_gradient=False):
    if schedule not in ("linear", "geometric"):
      raise ValueError(f"`schedule` must be 'linear' or 'geometric', got {schedule!r}.")
    self.schedule = schedule
    self.posterior = posterior
    self.forward_weight = checks.non_negative_number(forward_weight, "forward_weight")
    self.path_gradient = checks.boolean(path_gradient, "path_gradient")
    self.batch_size = checks.positive_integer(batch_size, "batch_size")
    anneal_steps = checks.non_negative_integer(anneal_steps, "anneal_steps")
    self.annealed = anneal_steps > 0
    # A variable, so that a new `T_anneal` (another `num_steps`, or a plan under a time
    # limit) reuses the compiled step.
    self._anneal_steps = tf.Variable(float(max(1, anneal_steps)), trainable=False,
                                     name="anneal_steps")
    self.anneal_if = anneal_if

  @property
  def anneal_steps(self):
    """`T_anneal` (0 without annealing)."""
    return int(self._anneal_steps.numpy()) if self.annealed else 0

  @anneal_steps.setter
  def anneal_steps(self, value):
    value = checks.positive_integer(value, "anneal_steps")
    if not self.annealed:
      raise ValueError("This objective does not anneal: `anneal_steps` cannot be set.")
    self._anneal_steps.assign(float(value))

  def likelihood_weight(self, step):
    """`w_t` for optimizer step `t`."""
    if not self.annealed:
      return tf.ones([], self.posterior.dtype)
    fraction = tf.minimum(1., tf.cast(step, tf.float32) / self._anneal_steps)
    if self.schedule == "linear":
      weight = fraction
    else:
      weight = tf.pow(_ANNEAL_START, 1. - fraction)
    if self.anneal_if is not None:
      weight = tf.where(self.anneal_if, weight, 1.)
    return tf.cast(weight, self.posterior.dtype)

  # Plain TensorFlow all through (no tensor-dependent Python control flow): without AutoGraph's
  # conversion of the ~30 functions below, `fit`'s first call on
  # `latent_rotated_nonlinear_blocks` took 8.4 s instead of 11.4 (medians of 5 processes
  # each, `python -m experiments.trace_cost [--autograph]`).
  @tf.autograph.experimental.do_not_convert
  def __call__(self, seed, step, shard=None):
    weight = self.likelihood_weight(step)
    value = self.posterior.loss(self.batch_size, seed, weight, shard=shard,
                                forward_weight=self.forward_weight,
                                path_gradient=self.path_gradient)
    return value, {"likelihood_weight": weight}


def _factorized_mixture(logits, locs, scales):
  """`prod_d sum_k pi_dk N(eps_d; mu_dk, sigma_dk)`, implicitly reparameterized (gradients
  computed only when taken: `mixtures.FactorizedNormalMixture`)."""
  return mixtures.FactorizedNormalMixture(logits, locs, scales)


class _OneStratum:
  """A base distribution seen as one stratum: `sample(n)` has shape `[n, 1, D]`."""

  def __init__(self, distribution):
    self._distribution = distribution

  def sample(self, sample_shape, seed=None):
    return self._distribution.sample(sample_shape, seed=seed)[:, tf.newaxis]


def _factorized_start(num_components, spread=_PRIOR_BASE_SPREAD):
  """Locations `[K]` and common scale of a per-dimension mixture close to `N(0, 1)`.

  Equal weights, locations evenly spaced with variance `spread` and scales
  `sqrt(1 - spread)`: unit variance, and distinct components so that training can move them
  apart.
  """
  if num_components == 1:
    return np.zeros([1]), 1.
  grid = np.linspace(-1., 1., num_components)
  locs = grid * np.sqrt(spread / np.mean(grid**2))
  return locs, float(np.sqrt(1. - spread))


def _set_stage(stage, mean, covariance, axes=None):
  """`stage.set_gaussian`; a stage with axes gets `axes` (None: the identity)."""
  if stage.axes is not None and axes is None:
    axes = np.eye(stage.size)
  stage.set_gaussian(mean, covariance, axes=axes)


def _default_pregenerator(latent_shape, dtype, mixing="permutation"):
  """RealNVP on flat latents (with mode axes up to `_MODE_AXES_MAX_DIM` dimensions; `mixing`
  as `real_nvp`'s); convolutional couplings for large image-shaped latents."""
  size = _num_elements(latent_shape)
  if latent_shape.rank == 3 and size > 1024:
    return pregenerators_lib.conv(latent_shape, dtype=dtype)
  hidden = int(min(256, max(64, 4 * size)))
  return pregenerators_lib.real_nvp(latent_shape, num_layers=4, hidden_units=(hidden, hidden),
                                    dtype=dtype, axes=size <= _MODE_AXES_MAX_DIM,
                                    mixing=mixing)


def condition(prior, likelihood, observation, pregenerator=None, num_components=None,
              base="factorized", **fit_kwargs):
  """Builds and fits a `ComposedPosterior` for `p(x | y)`; returns the fitted posterior.

  #### Examples

  ```python
  posterior = tfc.condition(prior, tfc.likelihoods.Gaussian(op, 0.05), y, seed=0)
  ```
  """
  posterior = ComposedPosterior(prior, likelihood, observation, pregenerator=pregenerator,
                                num_components=num_components, base=base)
  posterior.fit(**fit_kwargs)
  return posterior
