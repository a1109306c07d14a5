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

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.distributions import transformed_distribution as _td

from tfp_composed import likelihoods as likelihoods_lib
from tfp_composed import pregenerators as pregenerators_lib

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = ["ComposedPosterior", "condition", "validate_prior"]

# Base-mixture components are full-covariance Gaussians up to this latent dimension and
# diagonal (in the affine stage's whitened coordinates) above it.
_FULL_COMPONENT_MAX_DIM = 64


def validate_prior(prior):
  """Checks that `prior` is a flow `TransformedDistribution` with a fixed event shape."""
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
  base_shape = prior.distribution.event_shape
  if not base_shape.is_fully_defined() or base_shape.rank == 0:
    raise ValueError(
        f"`prior`'s base distribution must have a fully defined event shape, got {base_shape}.")
  return prior


def _num_elements(shape):
  return int(np.prod(shape.as_list()))


class ComposedPosterior(tfd.TransformedDistribution):
  """Approximate posterior `q(x) ~= p(x | y)` of a frozen flow prior, as a TFP distribution.

  `x = f(g(eps))`, `eps ~ q_base`, where `f` is the prior's bijector (frozen), `g` the
  trainable pre-generator and `q_base` either `N(0, I)` (`num_components=1`) or a learned
  mixture of Gaussians (full-covariance up to 64 latent dimensions, diagonal above) whose
  components `fit` places at the latent posterior's modes.
  `log_prob`, `sample` and `experimental_sample_and_log_prob` are the exact ones of `q`.

  #### Examples

  ```python
  prior = tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0., 1.), [2]), flow)
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Mask([True, False]), scale=0.05)
  posterior = tfc.ComposedPosterior(prior, likelihood, observation=[0.7])
  posterior.fit(seed=0)
  x, log_q = posterior.experimental_sample_and_log_prob(16, seed=1)
  ```

  #### References

  [1]: Jay Whang, Erik M. Lindgren, Alexandros G. Dimakis. Composing Normalizing Flows for
       Inverse Problems. In _International Conference on Machine Learning_, 2021.
  """

  def __init__(self, prior, likelihood, observation, pregenerator=None, num_components=8,
               validate_args=False, name="ComposedPosterior", _state=None):
    parameters = dict(locals())
    validate_prior(prior)
    if not isinstance(likelihood, likelihoods_lib.Likelihood):
      raise TypeError(
          "`likelihood` must be a tfp_composed.likelihoods.Likelihood (e.g. "
          f"tfc.likelihoods.Gaussian(operator, scale)), got {type(likelihood).__name__}.")
    if (not isinstance(num_components, (int, np.integer)) or isinstance(num_components, bool)
        or num_components < 1):
      raise ValueError(f"`num_components` must be a positive integer, got {num_components!r}.")
    with tf.name_scope(name) as name:
      dtype = prior.dtype
      likelihood.build(prior.event_shape)
      self._prior = prior
      self._likelihood = likelihood
      self._observation = likelihood.check_observation(observation, name="observation")
      if self._observation.dtype != dtype:
        raise TypeError(
            f"`observation` has dtype {self._observation.dtype.name} but `prior` has dtype "
            f"{dtype.name}; they must match.")
      self._latent_shape = prior.distribution.event_shape
      self._latent_size = _num_elements(self._latent_shape)
      if pregenerator is None:
        pregenerator = _default_pregenerator(self._latent_shape, dtype)
      self._check_pregenerator(pregenerator)
      self._pregenerator = pregenerator
      self._num_components = int(num_components)
      size = self._latent_size
      k = self._num_components
      if _state is None:  # Rebuilt copies (`copy()`, slicing) share the variables instead.
        _state = {"initialized": tf.Variable(False, trainable=False, name="initialized")}
        if k > 1:
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
      if k == 1:
        self._mixture_logits = self._component_locs = self._component_scales = None
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
    return self._prior

  @property
  def likelihood(self):
    """The observation model `p(y | x)`."""
    return self._likelihood

  @property
  def observation(self):
    """The observation `y`."""
    return self._observation

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
    return self._latent_shape

  @property
  def initialized(self):
    """Whether `initialize` (the multi-start Laplace start) has run."""
    return self._initialized

  @property
  def trainable_variables(self):
    """Variables of the pre-generator and the base mixture: all that `fit` changes.

    The prior's variables are never included.
    """
    variables = list(self._pregenerator.trainable_variables)
    if self._num_components > 1:
      variables += [self._mixture_logits, self._component_locs]
      variables += list(self._component_scales.trainable_variables)
    return tuple(variables)

  # ---------------------------------------------------------------- the paper's objective

  def latent_target_log_prob(self, z, likelihood_weight=1.):
    """Unnormalized latent posterior `log p_base(z) + w log p(y | f(z))`.

    The one function shared by composed VI, the MCMC baselines and the diagnostics.

    Where the prior's forward pass `f(z)` is not finite (a trained flow can overflow far from
    the latents it was trained on), `log p(y | f(z))` is replaced by the lowest finite value in
    the batch (a constant; `-inf` if there is none) instead of a NaN, and the gradient rows of
    such latents that come back through `f` (NaN: `0 * inf` in `f`'s backward pass) are zeroed
    where they enter `f`, so they cannot poison the rest of the batch; `log p_base(z)` keeps its
    gradient, which pulls such latents back. `f` has no trainable variables here and its
    samples do not interact, so every other row's gradient is exact.

    Args:
      z: latents, shape `batch + latent_event_shape`.
      likelihood_weight: the likelihood's weight `w` (1 for the posterior).

    Returns:
      Tensor of shape `batch`.
    """
    z = tf.convert_to_tensor(z, self.dtype)
    x = self._prior.bijector.forward(_finite_gradient_rows(z, self._latent_shape.rank))
    log_likelihood = self._likelihood.log_prob(self._observation, x)
    # Only the prior's overflow is imputed; a likelihood that is NaN at a finite `x` stays NaN
    # (fit skips such steps).
    ok = tf.reduce_all(tf.math.is_finite(x), axis=tf.range(-self._prior.event_shape.rank, 0))
    # Pessimistic imputation: the batch's lowest finite log-likelihood (a constant), so the
    # prior term's gradient still pulls such latents back (-inf if none is finite).
    worst = tf.stop_gradient(tf.reduce_min(tf.where(
        ok & tf.math.is_finite(log_likelihood), log_likelihood,
        tf.constant(np.inf, log_likelihood.dtype))))
    worst = tf.where(tf.math.is_finite(worst), worst, tf.constant(-np.inf, worst.dtype))
    log_likelihood = tf.where(ok, log_likelihood, worst)
    return (self._prior.distribution.log_prob(z)
            + likelihood_weight * log_likelihood)

  def _flat_target(self, z_flat):
    z = tf.reshape(z_flat, tf.concat([tf.shape(z_flat)[:-1], self._latent_shape], 0))
    return self.latent_target_log_prob(z)

  def _components(self):
    """Mixture log-weights `[K]` and the component distribution (batch `[K]`)."""
    if self._num_components == 1:
      size = self._latent_size
      return (tf.zeros([1], self.dtype),
              tfd.MultivariateNormalDiag(loc=tf.zeros([1, size], self.dtype),
                                         scale_diag=tf.ones([1, size], self.dtype)))
    return (tf.math.log_softmax(self._mixture_logits),
            self.distribution.components_distribution)

  def negative_elbo_terms(self, samples_per_component, seed, likelihood_weight=1.,
                          shard=None):
    """Per-sample terms `log q_g(z) - log p_base(z) - w log p(y | f(z))`, shape `[n, K]`.

    Component `k` contributes `n` reparameterized draws `eps ~ q_k`. With `shard=(i, m)`,
    all `n` draws are made with `seed` and only the `i`-th of `m` equal slices is evaluated,
    so the shards of `m` replicas together compute exactly the unsharded terms.
    """
    _, components = self._components()
    eps = components.sample(samples_per_component, seed=seed)  # [n, K, D]
    if shard is not None:
      index, count = shard
      per = samples_per_component // count
      eps = eps[index * per:(index + 1) * per]
    n = tf.shape(eps)[0]
    log_base = self.distribution.log_prob(eps)  # [n, K]
    flat = tf.reshape(eps, [-1, self._latent_size])
    eps_latent = tf.reshape(flat, tf.concat([[-1], self._latent_shape], 0))
    z = self._pregenerator.forward(eps_latent)
    fldj = self._pregenerator.forward_log_det_jacobian(
        eps_latent, event_ndims=self._latent_shape.rank)
    target = self.latent_target_log_prob(z, likelihood_weight)
    terms = tf.reshape(-fldj - target, [n, self._num_components])
    return log_base + terms

  def loss(self, batch_size=64, seed=None, likelihood_weight=1.):
    """The latent-space negative ELBO: `KL(q || p(. | y)) - log p(y)`, in nats.

    `E_{eps ~ q_base}[log q_base(eps) - log|det dg/deps| - log p_base(z) - log p(y | f(z))]`
    with `z = g(eps)` [1, eq. 5]. With a mixture base the expectation is stratified over the
    components, `sum_k w_k E_{eps ~ q_k}[...]`, which makes the gradient with respect to the
    mixture weights exact and keeps every component's reparameterization gradient.

    Draws whose terms are not finite (a trained flow `f` can overflow far from the latents it
    was trained on, long before `p_base` is negligible) are left out of the average: the
    estimate is the negative ELBO of `q` restricted to where `f` is numerically defined. If
    every draw of a component is non-finite the loss is NaN and `fit` skips the step.

    Args:
      batch_size: total number of samples (split evenly over the components).
      seed: a stateless seed (int or shape-[2] tensor); None draws a fresh one.
      likelihood_weight: weight of the log-likelihood term (1 for the posterior).

    Returns:
      Scalar loss tensor.
    """
    if seed is None:
      seed = tfp.random.sanitize_seed(None)
    per_component = max(1, -(-int(batch_size) // self._num_components))
    terms = self.negative_elbo_terms(per_component, seed, likelihood_weight)
    log_weights, _ = self._components()
    finite = tf.math.is_finite(terms)
    count = tf.reduce_sum(tf.cast(finite, terms.dtype), axis=0)
    return tf.reduce_sum(tf.exp(log_weights) * tf.reduce_sum(
        tf.where(finite, terms, tf.zeros_like(terms)), axis=0) / count)

  # ---------------------------------------------------------------- initialization

  def initialize(self, num_starts=None, seed=0, num_steps=500):
    """Multi-start Laplace start: locates the latent posterior's modes and fits `q` to them.

    1. `num_starts` points (default `max(16, 4 K)`, `2 K` above 256 latent dimensions) drawn
       from the prior's base climb the latent target (batched Adam, `num_steps` steps, then
       damped Newton steps for up to 16 dimensions); up to 256 dimensions the distinct maxima
       are polished by Newton steps.
    2. Distinct local maxima `mu_k` (greedily, best first; a point joined to a kept mode by
       a segment that never dips 1 nat below its lower end is a duplicate) get Laplace
       approximations `N(mu_k, H_k^{-1})` with `H_k` the negative Hessian of the latent target
       (autodiff), shrunk where that raises their ELBO (curved modes), with weights
       `w_k ~ Z_k`, each mode's evidence estimated by importance sampling; components under
       1e-3 of the best weight go.
    3. The pre-generator's affine stage takes the moment-matched Gaussian of that mixture;
       the base components take each mode's whitened mean and scales.

    For a unimodal posterior this is the exact posterior of a linear-Gaussian problem.
    """
    dtype = self.dtype
    size = self._latent_size
    k_max = self._num_components
    large = size > _LARGE_DIM
    if num_starts is None:
      num_starts = 2 * k_max if large else max(16, 4 * k_max)
    draws = self._prior.distribution.sample(max(256, num_starts),
                                            seed=tfp.random.sanitize_seed(seed))
    draws = tf.reshape(tf.cast(draws, dtype), [-1, size])
    starts = draws[:num_starts]
    # No latent posterior is taken to be wider than the prior's base: curvature is floored
    # at half the base's average precision (non-convex likelihoods can make it vanish).
    min_precision = 0.5 / float(np.mean(np.var(draws.numpy().astype(np.float64), axis=0)))
    modes, values = _find_modes(self._flat_target, starts, num_steps)
    modes, values = modes.numpy().astype(np.float64), values.numpy().astype(np.float64)
    if size <= _NEWTON_MAX_DIM:  # Ridges and stiff directions: curvature-aware ascent.
      modes, values = _newton_ascent(self._flat_target, modes, values, dtype, min_precision)
    finite = np.isfinite(values) & np.all(np.isfinite(modes), axis=-1)
    if not finite.any():
      raise FloatingPointError(
          "The latent target is not finite at any of the optimized starting points; check "
          "the observation, the likelihood's scale and the prior.")
    order = [i for i in np.argsort(-values) if finite[i]]
    derivatives = _compiled_derivatives(self._flat_target)
    selected = []  # (mode, value, precision, covariance, log evidence)
    for i in order:
      if len(selected) == k_max:
        break
      mu = modes[i]
      if any(_same_basin(self._flat_target, mu, values[i], m, v, dtype)
             for m, v, _, _, _ in selected):
        continue
      mu, value, precision, covariance, _ = _laplace(
          self._flat_target, derivatives, mu, float(values[i]), dtype, min_precision,
          newton_steps=0 if large else 3)
      # A curved mode gets a narrower Gaussian; its weight is its estimated evidence.
      covariance, log_evidence = _fit_gaussian_scale(
          self._flat_target, mu, covariance, dtype, seed + len(selected))
      if not np.isfinite(log_evidence):
        continue
      selected.append((mu, value, precision, covariance, log_evidence))

    if not selected:
      raise FloatingPointError(
          "No mode of the latent target has a finite Laplace evidence bound; check the "
          "observation, the likelihood's scale and the prior.")
    best = max(entry[4] for entry in selected)
    # Components below 1e-3 of the best weight are dropped: they would only add noise.
    selected = [entry for entry in selected if entry[4] > best - 7.]
    num_modes = len(selected)
    assignment = [j % num_modes for j in range(k_max)]
    counts = np.bincount(assignment, minlength=num_modes)
    log_w = np.array([selected[j][4] - np.log(counts[j]) for j in assignment])
    log_w -= np.logaddexp.reduce(log_w)
    w = np.exp(log_w)
    mus = np.stack([selected[j][0] for j in assignment])
    covs = np.stack([selected[j][3] for j in assignment])
    mean = np.einsum("k,kd->d", w, mus)
    centred = mus - mean
    second = covs + np.einsum("ki,kj->kij", centred, centred)
    covariance = np.einsum("k,kij->ij", w, second)
    covariance = 0.5 * (covariance + covariance.T)

    stage = pregenerators_lib.find_affine_stage(self._pregenerator)
    if stage is not None:
      stage.set_gaussian(mean, covariance)
      linear = stage._linear().to_dense().numpy()  # pylint: disable=protected-access
    else:
      linear = np.eye(size)
      mean = np.zeros([size])
    if self._num_components > 1:
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
    self._initialized.assign(True)
    self.modes_found = num_modes
    return self

  # ---------------------------------------------------------------- training

  def fit(self, num_steps=2000, batch_size=64, learning_rate=1e-3, seed=0, callbacks=None,
          strategy=None, jit_compile=None, checkpoint_dir=None, verbose=1, **kwargs):
    """Fits the pre-generator (and base mixture) by minimizing `loss`; see `training.fit`.

    Returns:
      A `tf_keras.callbacks.History` whose `history` holds per-step `loss` and `grad_norm`.
    """
    from tfp_composed import training  # pylint: disable=g-import-not-at-top
    return training.fit(self, num_steps=num_steps, batch_size=batch_size,
                        learning_rate=learning_rate, seed=seed, callbacks=callbacks,
                        strategy=strategy, jit_compile=jit_compile,
                        checkpoint_dir=checkpoint_dir, verbose=verbose, **kwargs)


def _finite_gradient_rows(z, event_rank):
  """Identity on `z` whose gradient zeroes each event (row) that is not all finite."""

  @tf.custom_gradient
  def identity(z):

    def grad(dz):
      axes = tf.range(tf.rank(dz) - event_rank, tf.rank(dz))
      ok = tf.reduce_all(tf.math.is_finite(dz), axis=axes, keepdims=True)
      return tf.where(ok, dz, tf.zeros_like(dz))

    return tf.identity(z), grad

  return identity(z)


def _default_pregenerator(latent_shape, dtype):
  """RealNVP on flat latents; convolutional couplings for large image-shaped latents."""
  size = _num_elements(latent_shape)
  if latent_shape.rank == 3 and size > 1024:
    return pregenerators_lib.conv(latent_shape, dtype=dtype)
  hidden = int(min(256, max(64, 4 * size)))
  return pregenerators_lib.real_nvp(latent_shape, num_layers=4, hidden_units=(hidden, hidden),
                                    dtype=dtype)


def _find_modes(target, starts, num_steps, learning_rate=0.1):
  """Batched Adam ascent of `target` from each row of `starts`: (positions, values).

  Adam's per-coordinate step normalization copes with the stiff directions of
  near-hard constraints; the learning rate decays geometrically to 1% of its initial value.
  Each row is an independent optimization.
  """

  @tf.function
  def ascend(z):
    m = tf.zeros_like(z)
    v = tf.zeros_like(z)
    for i in tf.range(num_steps):
      with tf.GradientTape() as tape:
        tape.watch(z)
        value = tf.reduce_sum(target(z))
      g = tape.gradient(value, z)
      g = tf.where(tf.math.is_finite(g), g, tf.zeros_like(g))
      t = tf.cast(i + 1, z.dtype)
      m = 0.9 * m + 0.1 * g
      v = 0.999 * v + 0.001 * tf.square(g)
      rate = learning_rate * tf.pow(tf.constant(0.01, z.dtype), (t - 1.) / num_steps)
      step = rate * (m / (1. - 0.9**t)) / (tf.sqrt(v / (1. - 0.999**t)) + 1e-8)
      z = z + step
    return z, target(z)

  return ascend(starts)


_NEWTON_MAX_DIM = 16
# Above this many latent dimensions `initialize` uses fewer starts and one Hessian per mode
# (each Hessian costs `size` Hessian-vector products).
_LARGE_DIM = 256


def _newton_ascent(target, z, values, dtype, min_precision, num_iterations=25):
  """Batched damped Newton ascent (full Hessians; small latent dimensions only).

  Each step solves with the negative Hessian whose eigenvalues are floored at
  `min_precision`, and keeps the best of five step lengths that increases the target.
  """

  @tf.function
  def gradient_and_hessian(points):
    with tf.GradientTape() as outer:
      outer.watch(points)
      with tf.GradientTape() as inner:
        inner.watch(points)
        value = tf.reduce_sum(target(points))
      grad = inner.gradient(value, points)
    return grad, outer.batch_jacobian(grad, points)

  lengths = np.array([1., 0.5, 0.25, 0.1, 0.03])
  for _ in range(num_iterations):
    grad, hess = gradient_and_hessian(tf.constant(z, dtype))
    grad = grad.numpy().astype(np.float64)
    precision = -hess.numpy().astype(np.float64)
    precision = 0.5 * (precision + np.swapaxes(precision, -1, -2))
    eigvals, eigvecs = np.linalg.eigh(precision)
    eigvals = np.clip(eigvals, min_precision, None)
    step = np.einsum("nij,nj->ni", eigvecs,
                     np.einsum("nji,nj->ni", eigvecs, grad) / eigvals)
    step = np.where(np.isfinite(step), step, 0.)
    candidates = z[None] + lengths[:, None, None] * step[None]  # [5, N, D]
    cand_values = target(tf.constant(candidates.reshape(-1, z.shape[1]), dtype)).numpy()
    cand_values = np.where(np.isfinite(cand_values), cand_values, -np.inf).reshape(5, -1)
    best = np.argmax(cand_values, axis=0)
    best_values = cand_values[best, np.arange(z.shape[0])]
    improved = best_values > values
    z = np.where(improved[:, None], candidates[best, np.arange(z.shape[0])], z)
    values = np.where(improved, best_values, values)
    if not improved.any():
      break
  return z, values


def _same_basin(target, a, value_a, b, value_b, dtype, barrier=1.):
  """Whether the segment from `a` to `b` stays within `barrier` nats of its lower end."""
  t = np.linspace(0., 1., 11)[1:-1, None]
  path = (1. - t) * a[None] + t * b[None]
  values = target(tf.constant(path, dtype)).numpy().astype(np.float64)
  return bool(np.all(values >= min(value_a, value_b) - barrier))


def _fit_gaussian_scale(target, mean, covariance, dtype, seed, num_samples=128):
  """Shrinks a Laplace Gaussian to fit a curved mode and estimates the mode's evidence.

  For `c` in (1, 1/2, 1/4, 1/10, 1/30), draws `z ~ N(mean, c covariance)` (common random
  numbers) and computes the ELBO `E[target(z)] + entropy` and the importance-sampling
  estimate `log mean exp(target(z) - log N(z))` of the mode's log-evidence. Returns
  `(c covariance, log evidence)` for the `c` with the best ELBO and the largest estimate
  over all `c` (each is a stochastic lower bound on the mode's mass).
  """
  size = mean.shape[0]
  root = np.linalg.cholesky(covariance)
  eps = np.random.RandomState(seed % 2**31).randn(num_samples, size)
  factors = np.array([1., 0.5, 0.25, 0.1, 1. / 30.])
  z = mean + np.sqrt(factors)[:, None, None] * (eps @ root.T)[None]  # [5, n, D]
  values = target(tf.constant(z.reshape(-1, size), dtype)).numpy().astype(np.float64)
  values = np.where(np.isfinite(values), values, -np.inf).reshape(len(factors), num_samples)
  log_norm = (-0.5 * np.sum(eps**2, axis=-1) - 0.5 * size * np.log(2 * np.pi)
              - np.sum(np.log(np.diag(root))))[None] - 0.5 * size * np.log(factors)[:, None]
  entropy = (0.5 * size * np.log(2 * np.pi * np.e) + np.sum(np.log(np.diag(root)))
             + 0.5 * size * np.log(factors))
  elbos = values.mean(axis=1) + entropy
  log_weights = values - log_norm
  log_evidence = np.logaddexp.reduce(log_weights, axis=1) - np.log(num_samples)
  best = int(np.nanargmax(np.where(np.isfinite(elbos), elbos, -np.inf)))
  return factors[best] * covariance, float(np.max(log_evidence))


def _hessian_vector_products(target, z, vectors):
  """Rows `H(z) v_i` for the rows `v_i` of `vectors`, by reverse-over-reverse autodiff."""
  points = tf.tile(z[tf.newaxis], [tf.shape(vectors)[0], 1])
  with tf.GradientTape() as outer:
    outer.watch(points)
    with tf.GradientTape() as inner:
      inner.watch(points)
      value = tf.reduce_sum(target(points))
    grad = inner.gradient(value, points)
    gv = tf.reduce_sum(grad * vectors)
  return outer.gradient(gv, points)


def _compiled_derivatives(target):
  """Compiled Hessian-vector products and gradient of `target` (trace once, reuse per mode)."""
  hvp = tf.function(lambda z, v: _hessian_vector_products(target, z, v), reduce_retracing=True)
  grad_fn = tf.function(lambda z: tfp.math.value_and_gradient(target, z[tf.newaxis])[1][0])
  return hvp, grad_fn


def _laplace(target, derivatives, mu, value, dtype, min_precision, newton_steps=3,
             chunk=128):
  """Laplace approximation at a (polished) mode of `target` near `mu`.

  Up to `newton_steps` damped Newton steps `mu <- mu + P^{-1} grad` refine `mu` (a step is
  kept only if it increases the target). Returns `(mu, value, P, P^{-1}, log det P^{-1})`,
  with `P` the negative Hessian, its eigenvalues clipped below at `min_precision`.
  """
  size = mu.shape[0]
  hvp, grad_fn = derivatives
  eye = np.eye(size)

  def curvature(point):
    rows = [hvp(tf.constant(point, dtype), tf.constant(eye[i:i + chunk], dtype)).numpy()
            for i in range(0, size, chunk)]
    precision = -np.concatenate(rows, axis=0).astype(np.float64)
    precision = 0.5 * (precision + precision.T)
    eigvals, eigvecs = np.linalg.eigh(precision)
    eigvals = np.clip(eigvals, min_precision, None)
    return eigvals, eigvecs

  eigvals, eigvecs = curvature(mu)
  for _ in range(newton_steps):
    grad = grad_fn(tf.constant(mu, dtype))
    candidate = mu + (eigvecs / eigvals) @ (eigvecs.T @ grad.numpy().astype(np.float64))
    new_value = float(target(tf.constant(candidate[None], dtype))[0])
    if not np.isfinite(new_value) or new_value <= value:
      break
    mu, value = candidate, new_value
    eigvals, eigvecs = curvature(mu)
  precision = (eigvecs * eigvals) @ eigvecs.T
  covariance = (eigvecs / eigvals) @ eigvecs.T
  return mu, value, precision, covariance, -np.sum(np.log(eigvals))


def condition(prior, likelihood, observation, pregenerator=None, num_components=8,
              **fit_kwargs):
  """Builds and fits a `ComposedPosterior` for `p(x | y)`; returns the fitted posterior.

  #### Examples

  ```python
  posterior = tfc.condition(prior, tfc.likelihoods.Gaussian(op, 0.05), y, seed=0)
  ```
  """
  posterior = ComposedPosterior(prior, likelihood, observation, pregenerator=pregenerator,
                                num_components=num_components)
  posterior.fit(**fit_kwargs)
  return posterior
