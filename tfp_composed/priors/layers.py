"""Building blocks of multi-scale image flows: actnorm, invertible 1x1 conv, affine couplings.

Every block is a `tf.Module` acting on `[batch, H, W, C]` tensors with two methods:

    forward(z) -> (x, log|det dx/dz|)        # latent -> data direction
    inverse(x) -> (z, log|det dz/dx|)        # data -> latent direction (used by log_prob)

Log-dets are summed over the event, shape `[batch]`. Variables are created eagerly from the
known channel count; `trainable=False` creates them frozen. `MultiScaleFlowBijector` wraps a
whole flow as one TFP bijector that computes the transform and its log-det in one pass.

#### References

[1]: Laurent Dinh, Jascha Sohl-Dickstein and Samy Bengio. Density estimation using Real NVP.
     In _ICLR_, 2017. https://arxiv.org/abs/1605.08803
[2]: Diederik P. Kingma and Prafulla Dhariwal. Glow: Generative flow with invertible 1x1
     convolutions. In _NeurIPS_, 2018. https://arxiv.org/abs/1807.03039
"""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.internal import cache_util

tfb = tfp.bijectors

__all__ = [
    "ActNorm",
    "ChannelCoupling",
    "CheckerboardCoupling",
    "ConvResNet",
    "InvertibleConv1x1",
    "MultiScaleFlow",
    "MultiScaleFlowBijector",
    "SplitPrior",
]


def _sum_event(t):
  return tf.reduce_sum(t, axis=[1, 2, 3])


class Conv2D(tf.Module):
  """A 'SAME'-padded 2-D convolution `y = conv(x, w) + b` with eagerly created variables."""

  def __init__(self, in_channels, out_channels, kernel_size=3, zero_init=False, trainable=True,
               name=None):
    super().__init__(name=name)
    shape = [kernel_size, kernel_size, in_channels, out_channels]
    if zero_init:
      w = tf.zeros(shape)
    else:
      fan_in = kernel_size * kernel_size * in_channels
      w = tf.random.normal(shape, stddev=float(np.sqrt(1.0 / fan_in)))
    self.w = tf.Variable(w, trainable=trainable, name="w")
    self.b = tf.Variable(tf.zeros([out_channels]), trainable=trainable, name="b")

  def __call__(self, x):
    return tf.nn.conv2d(x, self.w, strides=1, padding="SAME") + self.b


class ConvResNet(tf.Module):
  """Coupling network: `conv3x3 -> [residual blocks] -> conv1x1 -> zero-initialized conv3x3`.

  Each residual block is `h + conv1x1(relu(conv3x3(relu(h))))`. The last layer starts at zero, so
  a coupling built on it starts close to the identity. No batch statistics are used.
  """

  def __init__(self, in_channels, out_channels, hidden_channels, num_blocks=1, trainable=True,
               name=None):
    super().__init__(name=name)
    self.conv_in = Conv2D(in_channels, hidden_channels, 3, trainable=trainable)
    self.blocks = [(Conv2D(hidden_channels, hidden_channels, 3, trainable=trainable),
                    Conv2D(hidden_channels, hidden_channels, 1, trainable=trainable))
                   for _ in range(num_blocks)]
    self.conv_mid = Conv2D(hidden_channels, hidden_channels, 1, trainable=trainable)
    self.conv_out = Conv2D(hidden_channels, out_channels, 3, zero_init=True, trainable=trainable)

  def __call__(self, x):
    h = self.conv_in(x)
    for conv_a, conv_b in self.blocks:
      h = h + conv_b(tf.nn.relu(conv_a(tf.nn.relu(h))))
    h = tf.nn.relu(self.conv_mid(tf.nn.relu(h)))
    return self.conv_out(h)


class ActNorm(tf.Module):
  """Per-channel affine map `x = z * exp(log_scale) + loc` with data-dependent initialization.

  `inverse(x, init=True)` (eager) sets `loc`, `log_scale` so that the batch `x` maps to zero mean
  and unit variance per channel (Kingma & Dhariwal, 2018).
  """

  def __init__(self, channels, trainable=True, name=None):
    super().__init__(name=name)
    self.loc = tf.Variable(tf.zeros([channels]), trainable=trainable, name="loc")
    self.log_scale = tf.Variable(tf.zeros([channels]), trainable=trainable, name="log_scale")

  def _hw(self, x):
    return tf.cast(tf.shape(x)[1] * tf.shape(x)[2], x.dtype)

  def forward(self, z):
    x = z * tf.exp(self.log_scale) + self.loc
    return x, self._hw(z) * tf.reduce_sum(self.log_scale) * tf.ones([tf.shape(z)[0]], z.dtype)

  def inverse(self, x, init=False):
    if init:
      mean, var = tf.nn.moments(x, axes=[0, 1, 2])
      self.loc.assign(mean)
      self.log_scale.assign(0.5 * tf.math.log(var + 1e-6))
    z = (x - self.loc) * tf.exp(-self.log_scale)
    return z, -self._hw(x) * tf.reduce_sum(self.log_scale) * tf.ones([tf.shape(x)[0]], x.dtype)


class InvertibleConv1x1(tf.Module):
  """Invertible 1x1 convolution `z = x W` per pixel; `log|det| = H W log|det W|` (Glow)."""

  def __init__(self, channels, trainable=True, seed=None, name=None):
    super().__init__(name=name)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(channels, channels)))
    self.w = tf.Variable(q.astype(np.float32), trainable=trainable, name="w")

  def _ldj(self, x):
    hw = tf.cast(tf.shape(x)[1] * tf.shape(x)[2], x.dtype)
    # `log|det W| = sum log|diag R|` for `W = QR`: XLA compiles QR but not `slogdet`.
    logabsdet = tf.reduce_sum(tf.math.log(tf.abs(tf.linalg.diag_part(tf.linalg.qr(self.w)[1]))))
    return hw * logabsdet * tf.ones([tf.shape(x)[0]], x.dtype)

  def forward(self, z):
    w_inv = tf.linalg.inv(self.w)
    return tf.einsum("bhwc,cd->bhwd", z, w_inv), -self._ldj(z)

  def inverse(self, x, init=False):
    del init
    return tf.einsum("bhwc,cd->bhwd", x, self.w), self._ldj(x)


def _affine_params(h):
  shift, raw = tf.split(h, 2, axis=-1)
  log_scale = tf.math.log_sigmoid(raw + 2.0)  # scale in (0, 1), about 0.88 at init (Glow).
  return shift, log_scale


class ChannelCoupling(tf.Module):
  """Affine coupling over a channel split (Dinh et al., 2017; Kingma & Dhariwal, 2018).

  With `x = [x_a, x_b]` split along channels (`parity` swaps the roles):

      inverse: z_a = x_a,  z_b = (x_b + t(x_a)) * s(x_a),   log|det| = sum log s(x_a)
      forward: x_a = z_a,  x_b = z_b / s(z_a) - t(z_a),     log|det| = -sum log s(z_a)

  with `s = sigmoid(h + 2)`, `(t, h) = ConvResNet(x_a)`.
  """

  def __init__(self, channels, hidden_channels, num_blocks=1, parity=0, trainable=True,
               name=None):
    super().__init__(name=name)
    if channels < 2:
      raise ValueError(f"A channel coupling needs at least 2 channels. Got: {channels}.")
    self.num_a = channels // 2 if parity == 0 else channels - channels // 2
    self.num_b = channels - self.num_a
    self.parity = parity
    self.net = ConvResNet(self.num_a, 2 * self.num_b, hidden_channels, num_blocks,
                          trainable=trainable)

  def _split(self, x):
    if self.parity == 0:
      return x[..., :self.num_a], x[..., self.num_a:]
    return x[..., self.num_b:], x[..., :self.num_b]

  def _join(self, a, b):
    return tf.concat([a, b] if self.parity == 0 else [b, a], axis=-1)

  def forward(self, z):
    z_a, z_b = self._split(z)
    shift, log_scale = _affine_params(self.net(z_a))
    x_b = z_b * tf.exp(-log_scale) - shift
    return self._join(z_a, x_b), -_sum_event(log_scale)

  def inverse(self, x, init=False):
    del init
    x_a, x_b = self._split(x)
    shift, log_scale = _affine_params(self.net(x_a))
    z_b = (x_b + shift) * tf.exp(log_scale)
    return self._join(x_a, z_b), _sum_event(log_scale)


def checkerboard(height, width, parity):
  """A `[1, H, W, 1]` float mask that is 1 where `(i + j + parity)` is even."""
  ii, jj = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return tf.constant(((ii + jj + parity) % 2 == 0).astype(np.float32)[None, :, :, None])


class CheckerboardCoupling(tf.Module):
  """Affine coupling with a spatial checkerboard mask `m` (Dinh et al., 2017).

      inverse: z = m x + (1 - m) (x + t(m x)) s(m x),   log|det| = sum (1 - m) log s(m x)
      forward: x = m z + (1 - m) (z / s(m z) - t(m z))

  The network sees `m x` and `m` itself (so it knows which pixels are masked).
  """

  def __init__(self, height, width, channels, hidden_channels, num_blocks=1, parity=0,
               trainable=True, name=None):
    super().__init__(name=name)
    self.mask = checkerboard(height, width, parity)
    self.parity = parity
    self.net = ConvResNet(channels + 1, 2 * channels, hidden_channels, num_blocks,
                          trainable=trainable)

  def _params(self, masked):
    mask = tf.ones_like(masked[..., :1]) * self.mask
    shift, log_scale = _affine_params(self.net(tf.concat([masked, mask], axis=-1)))
    return shift * (1.0 - self.mask), log_scale * (1.0 - self.mask)

  def forward(self, z):
    shift, log_scale = self._params(z * self.mask)
    x = z * self.mask + (1.0 - self.mask) * (z * tf.exp(-log_scale) - shift)
    return x, -_sum_event(log_scale)

  def inverse(self, x, init=False):
    del init
    shift, log_scale = self._params(x * self.mask)
    z = x * self.mask + (1.0 - self.mask) * ((x + shift) * tf.exp(log_scale))
    return z, _sum_event(log_scale)


class SplitPrior(tf.Module):
  """Learned conditional prior of factored-out channels (Kingma & Dhariwal, 2018, Sec. 3.3).

  Given the kept half `h` of a split, the factored-out half `x_out` is modelled as
  `N(mean(h), exp(log_scale(h))^2)`, i.e. standardized before it joins the latent:

      inverse: z_out = (x_out - mean(h)) * exp(-log_scale(h)),  log|det| = -sum log_scale
      forward: x_out = z_out * exp(log_scale(h)) + mean(h),     log|det| = +sum log_scale

  `log_scale = 3 tanh(raw / 3)` keeps each scale in `(e^-3, e^3)` so the latent -> data pass
  cannot overflow here. The network's last layer starts at zero, so a new split prior is the
  identity (standard normal factored-out variables, as without it).
  """

  def __init__(self, cond_channels, channels, hidden_channels, trainable=True, name=None):
    super().__init__(name=name)
    self.net = ConvResNet(cond_channels, 2 * channels, hidden_channels, num_blocks=0,
                          trainable=trainable)

  def _params(self, h):
    mean, raw = tf.split(self.net(h), 2, axis=-1)
    return mean, 3.0 * tf.tanh(raw / 3.0)

  def forward(self, z_out, h):
    mean, log_scale = self._params(h)
    return z_out * tf.exp(log_scale) + mean, _sum_event(log_scale)

  def inverse(self, x_out, h):
    mean, log_scale = self._params(h)
    return (x_out - mean) * tf.exp(-log_scale), -_sum_event(log_scale)


class MultiScaleFlow(tf.Module):
  """One level of a multi-scale flow, holding the next level recursively.

  In the data -> latent direction a level runs its `pre_steps` at the input resolution,
  squeezes `[H, W, C] -> [H/2, W/2, 4C]` (if `squeeze`), runs its `post_steps`, factors out
  half of the channels as latent variables and passes the other half to `next_level`; the
  results are concatenated and un-squeezed, so the latent has the shape of the image. The
  factored-out variables are standard normal under the base distribution (Dinh et al., 2017),
  or, with a `split_prior`, conditionally Gaussian given the kept half (Glow's learned prior).
  """

  def __init__(self, pre_steps=(), post_steps=(), squeeze=True, next_level=None,
               split_prior=None, name=None):
    super().__init__(name=name)
    if split_prior is not None and next_level is None:
      raise ValueError("A `split_prior` needs a `next_level` (a level that factors out channels).")
    self.pre_steps = list(pre_steps)
    self.post_steps = list(post_steps)
    self.squeeze = squeeze
    self.next_level = next_level
    self.split_prior = split_prior

  def inverse(self, x, init=False):
    """Data -> latent: returns `(z, log|det dz/dx|)`; `init=True` runs actnorm data init."""
    ldj = tf.zeros([tf.shape(x)[0]], x.dtype)
    for step in self.pre_steps:
      x, l = step.inverse(x, init=init)
      ldj += l
    if self.squeeze:
      x = tf.nn.space_to_depth(x, 2)
    for step in self.post_steps:
      x, l = step.inverse(x, init=init)
      ldj += l
    if self.next_level is not None:
      c = x.shape[-1] // 2
      z_out, h = x[..., :c], x[..., c:]
      if self.split_prior is not None:
        z_out, l = self.split_prior.inverse(z_out, h)
        ldj += l
      z_h, l = self.next_level.inverse(h, init=init)
      ldj += l
      x = tf.concat([z_out, z_h], axis=-1)
    if self.squeeze:
      x = tf.nn.depth_to_space(x, 2)
    return x, ldj

  def forward(self, z):
    """Latent -> data: returns `(x, log|det dx/dz|)`."""
    ldj = tf.zeros([tf.shape(z)[0]], z.dtype)
    if self.squeeze:
      z = tf.nn.space_to_depth(z, 2)
    if self.next_level is not None:
      c = z.shape[-1] // 2
      z_out, z_h = z[..., :c], z[..., c:]
      h, l = self.next_level.forward(z_h)
      ldj += l
      if self.split_prior is not None:
        z_out, l = self.split_prior.forward(z_out, h)
        ldj += l
      z = tf.concat([z_out, h], axis=-1)
    for step in reversed(self.post_steps):
      z, l = step.forward(z)
      ldj += l
    if self.squeeze:
      z = tf.nn.depth_to_space(z, 2)
    for step in reversed(self.pre_steps):
      z, l = step.forward(z)
      ldj += l
    return z, ldj


def _flatten_batch(x, event_ndims=3):
  """Reshapes `[*batch, H, W, C]` to `[prod(batch), H, W, C]`; returns the batch shape too."""
  shape = tf.shape(x)
  batch_shape = shape[:-event_ndims]
  flat = tf.reshape(x, tf.concat([[-1], shape[-event_ndims:]], axis=0))
  flat = tf.ensure_shape(flat, [None] + x.shape[-event_ndims:].as_list())
  return flat, batch_shape


class MultiScaleFlowBijector(tfb.Bijector):
  """A `MultiScaleFlow` module as a TFP bijector from latents `z` to images `x` (rank-3 events).

  The transform and its log-det come from one pass of the module; TFP's bijector cache keeps
  the log-det of each pass (as `tfb.FFJORD` does), so `log_prob` costs one inverse pass. Any
  leading batch dimensions are flattened for the convolutions and restored.

  #### Examples

  ```python
  flow = MultiScaleFlow(post_steps=[ChannelCoupling(4, 16)], squeeze=True)
  bij = MultiScaleFlowBijector(flow)
  x = bij.forward(tf.random.normal([2, 4, 4, 1]))
  ```
  """

  _cache = cache_util.BijectorCacheWithGreedyAttrs(
      forward_name="_augmented_forward", inverse_name="_augmented_inverse")

  def __init__(self, flow, validate_args=False, name="multi_scale_flow"):
    parameters = dict(locals())
    if not isinstance(flow, MultiScaleFlow):
      raise TypeError(f"`flow` must be a MultiScaleFlow. Got: {flow!r} of type {type(flow)}.")
    with tf.name_scope(name) as name:
      self._flow = flow
      super().__init__(forward_min_event_ndims=3, validate_args=validate_args,
                       parameters=parameters, name=name)

  @property
  def flow(self):
    return self._flow

  @classmethod
  def _parameter_properties(cls, dtype):
    return dict()

  def _augmented_forward(self, z):
    flat, batch_shape = _flatten_batch(z)
    x, fldj = self._flow.forward(flat)
    x = tf.reshape(x, tf.shape(z))
    fldj = tf.reshape(fldj, batch_shape)
    return x, {"fldj": fldj, "ildj": -fldj}

  def _augmented_inverse(self, x):
    flat, batch_shape = _flatten_batch(x)
    z, ildj = self._flow.inverse(flat)
    z = tf.reshape(z, tf.shape(x))
    ildj = tf.reshape(ildj, batch_shape)
    return z, {"ildj": ildj, "fldj": -ildj}

  def _forward(self, z):
    return self._augmented_forward(z)[0]

  def _inverse(self, x):
    return self._augmented_inverse(x)[0]

  def _forward_log_det_jacobian(self, z):
    cached = self._cache.forward_attributes(z)
    if "fldj" not in cached:
      cached.update(self._augmented_forward(z)[1])
    return cached["fldj"]

  def _inverse_log_det_jacobian(self, x):
    cached = self._cache.inverse_attributes(x)
    if "ildj" not in cached:
      cached.update(self._augmented_inverse(x)[1])
    return cached["ildj"]
