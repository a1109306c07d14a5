"""Trainable pre-generators: bijectors `g: eps -> z` in the prior's latent space.

A pre-generator is chained before the frozen prior flow `f`, so the composed posterior is
`x = f(g(eps))`. Every builder here returns a `tfb.Bijector` that

* maps tensors of the latent event shape to the same shape,
* is the identity at initialization (the composed posterior starts at the prior), and
* ends in an `AffineStage` (`z = shift + L u`) that `ComposedPosterior.fit` can start from a
  Laplace approximation of the latent posterior.

`z = g(eps) = affine(h(eps))`, where `h` is the flexible part (coupling layers, autoregressive
layers, convolutional couplings), so `h` works in whitened coordinates.

#### References

[1]: Jay Whang, Erik M. Lindgren, Alexandros G. Dimakis. Composing Normalizing Flows for
     Inverse Problems. In _International Conference on Machine Learning_, 2021.
     https://arxiv.org/abs/2002.11743
"""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

tfb = tfp.bijectors

__all__ = [
    "AffineStage",
    "affine",
    "conv",
    "find_affine_stage",
    "iaf",
    "maf",
    "real_nvp",
    "REGISTRY",
]

# Soft bound on per-layer log-scales: keeps early training finite without limiting the
# global scale, which the affine stage carries.
_LOG_SCALE_BOUND = 3.


def _event_shape(event_shape):
  """Validates `event_shape` and returns (TensorShape, number of elements)."""
  try:
    shape = tf.TensorShape(event_shape)
  except (TypeError, ValueError) as e:
    raise TypeError(
        f"`event_shape` must be a shape such as [2] or [28, 28, 1], got {event_shape!r}."
    ) from e
  if shape.rank is None or not shape.is_fully_defined() or shape.rank == 0:
    raise ValueError(
        f"`event_shape` must be a fully defined shape of rank >= 1, got {event_shape!r}.")
  size = int(np.prod(shape.as_list()))
  if size < 1:
    raise ValueError(f"`event_shape` must have at least one element, got {event_shape!r}.")
  return shape, size


def _bounded_log_scale(raw):
  return _LOG_SCALE_BOUND * tf.tanh(raw / _LOG_SCALE_BOUND)


def _flat(flat_bijector, shape, size, name):
  """Wraps a bijector on `[size]` vectors into one on events of `shape`."""
  if shape.rank == 1:
    return flat_bijector
  return tfb.Chain([
      tfb.Reshape(event_shape_out=shape, event_shape_in=[size]),
      flat_bijector,
      tfb.Reshape(event_shape_out=[size], event_shape_in=shape),
  ], name=name)


class AffineStage(tfb.Bijector):
  """Trainable affine map `z = shift + L u`, full-rank (lower-triangular `L`) or diagonal.

  `log|det dz/du| = sum(log|diag(L)|)`. Identity at initialization. Operates on vectors
  (`forward_min_event_ndims=1`); `set_gaussian(mean, covariance)` makes `z` distributed as
  `N(mean, covariance)` when `u ~ N(0, I)`.

  #### Examples

  ```python
  stage = AffineStage(3)
  stage.set_gaussian(mean=[1., 2., 3.], covariance=np.diag([1., 4., 9.]))
  stage.forward(tf.zeros([3]))  # [1., 2., 3.]
  ```
  """

  def __init__(self, size, full_rank=True, dtype=tf.float32, validate_args=False,
               name="affine_stage"):
    parameters = dict(locals())
    if not isinstance(size, (int, np.integer)) or size < 1:
      raise ValueError(f"`size` must be a positive integer, got {size!r}.")
    with tf.name_scope(name) as name:
      self._size = int(size)
      self._full_rank = bool(full_rank)
      self.shift = tf.Variable(tf.zeros([size], dtype), name="shift")
      if self._full_rank:
        self.scale_tril = tfp.util.TransformedVariable(
            tf.eye(size, dtype=dtype),
            tfb.FillScaleTriL(diag_bijector=tfb.Exp(), diag_shift=None),
            name="scale_tril")
      else:
        self.scale_diag = tfp.util.TransformedVariable(
            tf.ones([size], dtype), tfb.Exp(), name="scale_diag")
      super().__init__(
          forward_min_event_ndims=1, dtype=dtype, validate_args=validate_args,
          parameters=parameters, name=name)

  @property
  def full_rank(self):
    return self._full_rank

  def scale_operator(self):
    """The scale `L` as a `tf.linalg.LinearOperator` (lower-triangular or diagonal)."""
    return self._linear()

  def _linear(self):
    if self._full_rank:
      return tf.linalg.LinearOperatorLowerTriangular(tf.convert_to_tensor(self.scale_tril))
    return tf.linalg.LinearOperatorDiag(tf.convert_to_tensor(self.scale_diag))

  def _forward(self, u):
    return self._linear().matvec(u) + self.shift

  def _inverse(self, z):
    return self._linear().solvevec(z - self.shift)

  def _forward_log_det_jacobian(self, u):
    return self._linear().log_abs_determinant()

  def _inverse_log_det_jacobian(self, z):
    return -self._linear().log_abs_determinant()

  def set_gaussian(self, mean, covariance):
    """Sets `shift = mean` and `L L^T = covariance` (diagonal stage: `diag(covariance)`)."""
    mean = tf.convert_to_tensor(mean, self.dtype)
    covariance = tf.convert_to_tensor(covariance, self.dtype)
    self.shift.assign(mean)
    if self._full_rank:
      self.scale_tril.assign(tf.linalg.cholesky(covariance))
    else:
      self.scale_diag.assign(tf.sqrt(tf.linalg.diag_part(covariance)))


def find_affine_stage(bijector):
  """Returns the `AffineStage` that is applied last in `bijector`'s forward pass, or None."""
  if isinstance(bijector, AffineStage):
    return bijector
  if isinstance(bijector, tfb.Composition):
    for b in bijector.bijectors:  # Chain applies its bijectors right to left.
      if isinstance(b, tfb.Reshape):
        continue
      return find_affine_stage(b)
  return None


class _DenseNet(tf.Module):
  """An MLP with a zero-initialized output layer: output 0 at initialization."""

  def __init__(self, hidden_units, output_units, activation="elu", seed=0, name=None):
    super().__init__(name=name)
    self.layers = [
        tf_keras.layers.Dense(h, activation=activation,
                              kernel_initializer=tf_keras.initializers.GlorotUniform(seed + j))
        for j, h in enumerate(hidden_units)]
    self.out = tf_keras.layers.Dense(output_units, kernel_initializer="zeros")

  def __call__(self, x):
    shape = tf.shape(x)
    h = tf.reshape(x, [-1, x.shape[-1]])  # Dense layers need a batch dimension.
    for layer in self.layers:
      h = layer(h)
    h = self.out(h)
    return tf.reshape(h, tf.concat([shape[:-1], tf.shape(h)[-1:]], 0))


class _CouplingFn(tf.Module):
  """`shift_and_log_scale_fn` for `tfb.RealNVP`: an MLP of the conditioning half."""

  def __init__(self, input_units, output_units, hidden_units, dtype, seed, name=None):
    super().__init__(name=name)
    self.net = _DenseNet(hidden_units, 2 * output_units, seed=seed)
    self.net(tf.zeros([1, input_units], dtype))  # Creates the variables now.

  def __call__(self, x, output_units, **unused):
    shift, raw = tf.split(self.net(x), 2, axis=-1)
    return shift, _bounded_log_scale(raw)


def _permuted(bijector, size, seed):
  """`P^-1 o bijector o P` for a fixed random permutation `P`: acts on a random split of the
  coordinates and restores their order, so an identity `bijector` gives an identity layer."""
  perm = np.random.RandomState(seed).permutation(size).astype(np.int32)
  return tfb.Chain([tfb.Permute(np.argsort(perm).astype(np.int32)), bijector,
                    tfb.Permute(perm)], name=f"permuted_{bijector.name}")


def affine(event_shape, full_rank=True, dtype=tf.float32, name="affine"):
  """Affine pre-generator `z = shift + L eps` (`tfb.Shift` + lower-triangular scale).

  With a Laplace start this is exact for linear-Gaussian problems; it is also the last stage
  of every other pre-generator.

  #### Examples

  ```python
  g = tfc.pregenerators.affine([16])
  ```
  """
  shape, size = _event_shape(event_shape)
  return _flat(AffineStage(size, full_rank=full_rank, dtype=dtype), shape, size, name)


def real_nvp(event_shape, num_layers=4, hidden_units=(256, 256), affine_stage=True,
             full_rank=None, activation="elu", seed=0, dtype=tf.float32, name="real_nvp"):
  """RealNVP pre-generator: `num_layers` affine couplings (`tfb.RealNVP`) then an affine stage.

  Each coupling `y_B = x_B * exp(s(x_A)) + t(x_A)` conditions one half of a fixed random
  permutation of the coordinates on the other; `s, t` are MLPs with zero-initialized outputs,
  so the bijector starts at the identity. `full_rank=None` picks a full-rank affine stage for
  up to 1024 latent dimensions and a diagonal one above.

  #### Examples

  ```python
  g = tfc.pregenerators.real_nvp([2], num_layers=4, hidden_units=(64, 64))
  eps = tf.random.normal([5, 2])
  g.forward(eps)  # Equal to eps at initialization.
  ```
  """
  shape, size = _event_shape(event_shape)
  if not isinstance(num_layers, (int, np.integer)) or num_layers < 0:
    raise ValueError(f"`num_layers` must be a non-negative integer, got {num_layers!r}.")
  hidden_units = tuple(int(h) for h in hidden_units)
  bijectors = []  # In forward-application order; reversed for tfb.Chain at the end.
  if size >= 2:
    num_masked = size // 2
    for i in range(num_layers):
      bijectors.append(_permuted(tfb.RealNVP(
          num_masked=num_masked,
          shift_and_log_scale_fn=_CouplingFn(
              num_masked, size - num_masked, hidden_units, dtype, seed=1000 * (seed + i),
              name=f"coupling_net_{i}"),
          name=f"coupling_{i}"), size, seed + i))
  if affine_stage:
    bijectors.append(AffineStage(
        size, full_rank=size <= 1024 if full_rank is None else full_rank, dtype=dtype))
  return _flat(tfb.Chain(bijectors[::-1], name=name), shape, size, name)


class _ZeroOutputMADE(tf.Module):
  """`tfb.AutoregressiveNetwork` whose output layer starts at zero (identity flow)."""

  def __init__(self, size, hidden_units, activation, dtype, seed, name=None):
    super().__init__(name=name)
    self.made = tfb.AutoregressiveNetwork(
        params=2, event_shape=[size], hidden_units=list(hidden_units), activation=activation,
        kernel_initializer=tf_keras.initializers.GlorotUniform(seed), dtype=dtype)
    self.made(tf.zeros([1, size], dtype))  # Variables are created lazily.
    for v in self.made._network.layers[-1].trainable_variables:  # pylint: disable=protected-access
      v.assign(tf.zeros_like(v))  # The output layer's kernel and bias.

  def __call__(self, x):
    shape = tf.shape(x)
    params = self.made(tf.reshape(x, [-1, x.shape[-1]]))
    params = tf.reshape(params, tf.concat([shape, [2]], 0))
    shift, raw = tf.unstack(params, axis=-1)
    return shift, _bounded_log_scale(raw)


def _autoregressive(event_shape, num_layers, hidden_units, affine_stage, full_rank, activation,
                    seed, dtype, name, inverse_autoregressive):
  shape, size = _event_shape(event_shape)
  bijectors = []
  if size >= 2:
    for i in range(num_layers):
      flow = tfb.MaskedAutoregressiveFlow(
          shift_and_log_scale_fn=_ZeroOutputMADE(size, hidden_units, activation, dtype,
                                                 seed=1000 * (seed + i), name=f"made_{i}"),
          name=f"maf_{i}")
      bijectors.append(_permuted(
          tfb.Invert(flow, name=f"iaf_{i}") if inverse_autoregressive else flow, size, seed + i))
  if affine_stage:
    bijectors.append(AffineStage(
        size, full_rank=size <= 1024 if full_rank is None else full_rank, dtype=dtype))
  return _flat(tfb.Chain(bijectors[::-1], name=name), shape, size, name)


def iaf(event_shape, num_layers=4, hidden_units=(256, 256), affine_stage=True, full_rank=None,
        activation="elu", seed=0, dtype=tf.float32, name="iaf"):
  """Inverse autoregressive flow pre-generator (fast sampling and training, slow `log_prob`).

  Forward: `z_i = eps_i * exp(s_i(z_<i)) ...` is inverted so that the forward pass
  `z = g(eps)` is one network evaluation: `z_i = eps_i * exp(s_i(eps_<i)) + t_i(eps_<i)`.

  #### Examples

  ```python
  g = tfc.pregenerators.iaf([8], num_layers=2, hidden_units=(32,))
  ```
  """
  return _autoregressive(event_shape, num_layers, hidden_units, affine_stage, full_rank,
                         activation, seed, dtype, name, inverse_autoregressive=True)


def maf(event_shape, num_layers=4, hidden_units=(256, 256), affine_stage=True, full_rank=None,
        activation="elu", seed=0, dtype=tf.float32, name="maf"):
  """Masked autoregressive flow pre-generator (fast `log_prob`, sequential sampling).

  `z_i = eps_i * exp(s_i(z_<i)) + t_i(z_<i)`; the forward pass takes `D` network evaluations.

  #### Examples

  ```python
  g = tfc.pregenerators.maf([8], num_layers=2, hidden_units=(32,))
  ```
  """
  return _autoregressive(event_shape, num_layers, hidden_units, affine_stage, full_rank,
                         activation, seed, dtype, name, inverse_autoregressive=False)


class _ConvNet(tf.Module):
  """A small CNN with a zero-initialized output convolution."""

  def __init__(self, channels, filters, seed=0, name=None):
    super().__init__(name=name)
    init = tf_keras.initializers.GlorotUniform
    self.hidden = [
        tf_keras.layers.Conv2D(filters, 3, padding="same", activation="elu",
                               kernel_initializer=init(seed)),
        tf_keras.layers.Conv2D(filters, 1, padding="same", activation="elu",
                               kernel_initializer=init(seed + 1)),
    ]
    self.out = tf_keras.layers.Conv2D(2 * channels, 3, padding="same",
                                      kernel_initializer="zeros")

  def __call__(self, x):
    for layer in self.hidden:
      x = layer(x)
    return self.out(x)


class CheckerboardCoupling(tfb.Bijector):
  """Affine coupling on images with a checkerboard mask `m` (1 = conditioning pixel).

  `y = m x + (1 - m) (x exp(s(m x)) + t(m x))`, `log|det dy/dx| = sum((1 - m) s(m x))`,
  inverse `x = m y + (1 - m) (y - t(m y)) exp(-s(m y))`. `s, t` come from a CNN with a
  zero-initialized output, so the coupling starts at the identity.
  """

  def __init__(self, image_shape, parity, filters=32, seed=0, dtype=tf.float32,
               validate_args=False, name="checkerboard_coupling"):
    parameters = dict(locals())
    with tf.name_scope(name) as name:
      h, w, c = image_shape
      grid = (np.arange(h)[:, None] + np.arange(w)[None, :] + parity) % 2
      self._mask = tf.constant(np.repeat(grid[:, :, None], c, axis=-1), dtype)
      self._image_shape = tuple(image_shape)
      self.net = _ConvNet(c, filters, seed=seed)
      self.net(tf.zeros((1,) + self._image_shape, dtype))
      super().__init__(forward_min_event_ndims=3, dtype=dtype, validate_args=validate_args,
                       parameters=parameters, name=name)

  def _shift_and_log_scale(self, x_cond):
    batch = tf.shape(x_cond)[:-3]
    flat = tf.reshape(x_cond, tf.concat([[-1], self._image_shape], 0))
    shift, raw = tf.split(self.net(flat), 2, axis=-1)
    shape = tf.concat([batch, self._image_shape], 0)
    free = 1. - self._mask
    return tf.reshape(shift, shape) * free, tf.reshape(_bounded_log_scale(raw), shape) * free

  def _forward(self, x):
    shift, log_scale = self._shift_and_log_scale(x * self._mask)
    return x * tf.exp(log_scale) + shift

  def _inverse(self, y):
    shift, log_scale = self._shift_and_log_scale(y * self._mask)
    return (y - shift) * tf.exp(-log_scale)

  def _forward_log_det_jacobian(self, x):
    _, log_scale = self._shift_and_log_scale(x * self._mask)
    return tf.reduce_sum(log_scale, axis=[-3, -2, -1])

  def _inverse_log_det_jacobian(self, y):
    _, log_scale = self._shift_and_log_scale(y * self._mask)
    return -tf.reduce_sum(log_scale, axis=[-3, -2, -1])


def conv(event_shape, num_layers=4, filters=32, affine_stage=True, full_rank=None, seed=0,
         dtype=tf.float32, name="conv"):
  """Convolutional (Glow-style) pre-generator for image-shaped latents `[H, W, C]`.

  `num_layers` checkerboard affine couplings of alternating parity with small CNNs, then an
  affine stage on the flattened latent (full-rank up to 1024 dimensions, diagonal above).

  #### Examples

  ```python
  g = tfc.pregenerators.conv([8, 8, 1], num_layers=2, filters=16)
  ```
  """
  shape, size = _event_shape(event_shape)
  if shape.rank != 3:
    raise ValueError(
        f"`event_shape` of a conv pre-generator must be [H, W, C], got {event_shape!r}.")
  couplings = [
      CheckerboardCoupling(tuple(shape.as_list()), parity=i % 2, filters=filters,
                           seed=1000 * (seed + i), dtype=dtype, name=f"coupling_{i}")
      for i in range(num_layers)
  ]
  bijectors = list(reversed(couplings))
  if affine_stage:
    stage = AffineStage(size, full_rank=size <= 1024 if full_rank is None else full_rank,
                        dtype=dtype)
    bijectors = [_flat(stage, shape, size, "affine")] + bijectors
  return tfb.Chain(bijectors, name=name)


# Named small instances, one line each: `name: (event_shape, builder)`, with
# `builder(event_shape)` returning the bijector. Property tests run over all of them.
REGISTRY = {
    "affine": ([5], affine),
    "affine_diag": ([2, 3], lambda shape: affine(shape, full_rank=False)),
    "real_nvp": ([4], lambda shape: real_nvp(shape, num_layers=2, hidden_units=(16,))),
    "real_nvp_image": ([2, 2, 1], lambda shape: real_nvp(shape, num_layers=2, hidden_units=(8,))),
    "iaf": ([4], lambda shape: iaf(shape, num_layers=2, hidden_units=(16,))),
    "maf": ([3], lambda shape: maf(shape, num_layers=2, hidden_units=(16,))),
    "conv": ([4, 4, 1], lambda shape: conv(shape, num_layers=2, filters=8)),
}
