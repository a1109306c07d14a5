r"""Named inverse-problem tasks: a forward operator, a noise model and a name.

The composed-flow paper (Whang, Lindgren & Dimakis, ICML 2021) poses inverse problems on
MNIST as an observation `y ~ Noise(A(x))` of an image `x` in `[0, 1]^{H x W x C}`. A task
fixes the forward operator `A`, the noise and a name, for any image shape, so that every
method (the composed posterior and the baselines) is scored on the same problems:

| name | operator `A` | noise | `unobserved_mask` |
| --- | --- | --- | --- |
| `inpaint_lower_half` | rows `H // 2 ..` missing: the partition `p(x2 \| x1)` | N(0, 0.05^2) | lower half |
| `inpaint_center` | a centred `H // 2 x W // 2` square missing | N(0, 0.05^2) | the square |
| `inpaint_random_90` | `round(0.9 H W)` random pixels missing (fixed by `seed`) | N(0, 0.05^2) | those pixels |
| `super_resolution_2x` | 2 x 2 average pooling | N(0, 0.05^2) | all pixels |
| `super_resolution_4x` | 4 x 4 average pooling | N(0, 0.05^2) | all pixels |
| `compressed_sensing_m50` | `m` Gaussian measurements, `M_ij ~ N(0, 1/m)` | N(0, 0.05^2) | all pixels |
| `compressed_sensing_m200` | as above | N(0, 0.05^2) | all pixels |
| `denoise` | identity | N(0, 0.5^2) | all pixels |
| `saturation` | saturating sensor `tanh(k x) / tanh(k)`, `k = 3` | N(0, 0.05^2) | all pixels |
| `quantize_1bit` | dithered one-bit sensor `y = 1[x + e > 1/2]` | `e ~ Logistic(0, 0.05)` | all pixels |

Sizes scale with the image: the centre square is `H // 2 x W // 2`, and the compressed
sensing tasks keep the fraction of MNIST's 784 pixels that they measure,
`m = max(1, round(m_784 * H W C / 784))` (50 and 200 at 28 x 28 x 1, 4 and 16 at 8 x 8 x 1).

The one-bit sensor's likelihood is the logistic (rounded-logistic) model

    p(y | x) = prod_i sigmoid(s_i (x_i - 1/2) / 0.05),   s_i = 2 y_i - 1,   y_i in {0, 1}

#### Examples

```python
import tfp_composed as tfc

task = tfc.tasks.get("inpaint_lower_half", image_shape=[28, 28, 1])
y = task.observe(x_true, seed=0)                 # [392]
posterior = tfc.ComposedPosterior(prior, task.likelihood, y)
sorted(tfc.tasks.TASKS)                          # every task name
```

#### References

[1]: Jay Whang, Erik M. Lindgren, Alexandros G. Dimakis. Composing Normalizing Flows
     for Inverse Problems. In _International Conference on Machine Learning_, 2021.
     https://arxiv.org/abs/2002.11743
"""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_composed import likelihoods
from tfp_composed import operators

tfd = tfp.distributions

__all__ = [
    "MASK_NOISE",
    "DENOISE_NOISE",
    "SATURATION_GAIN",
    "QUANTIZER_THRESHOLD",
    "QUANTIZER_DITHER",
    "TASKS",
    "Task",
    "get",
]

# Noise standard deviations (images in [0, 1]).
MASK_NOISE = 0.05  # Inpainting, super-resolution, compressed sensing, saturation.
DENOISE_NOISE = 0.5
SATURATION_GAIN = 3.
QUANTIZER_THRESHOLD = 0.5
QUANTIZER_DITHER = 0.05  # Scale of the logistic dither of the one-bit sensor.
_MNIST_PIXELS = 784


def _as_image_shape(image_shape):
  """`[H, W, C]` as a tuple of positive ints, or `ValueError` naming `image_shape`."""
  try:
    shape = tuple(np.asarray(image_shape).tolist())
  except (TypeError, ValueError):
    shape = None
  if (shape is None or len(shape) != 3 or
      not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
    raise ValueError(
        f"`image_shape` must be [H, W, C] with positive integers, got {image_shape!r}.")
  return shape


def _as_seed_pair(seed, name="seed"):
  """An int or a pair of ints as a stateless seed `(a, b)`."""
  arr = np.asarray(seed)
  if (not np.issubdtype(arr.dtype, np.integer) or arr.ndim > 1 or
      (arr.ndim == 1 and arr.size != 2)):
    raise ValueError(f"`{name}` must be an integer or a pair of integers, got {seed!r}.")
  return (int(arr), 0) if arr.ndim == 0 else (int(arr[0]), int(arr[1]))


class Task:
  """A named inverse problem `y ~ Noise(A(x))` for images of one shape.

  Attributes:
    name: the registry name.
    image_shape: `(H, W, C)` of `x`.
    operator: the forward operator `A` (`tfc.operators.ForwardOperator`).
    likelihood: the observation model `p(y | x)` (`tfc.likelihoods.Likelihood`).
    noise_scale: the noise standard deviation (for `quantize_1bit`: the dither scale).
    unobserved_mask: boolean `[H, W, C]`, true where a pixel is not directly observed
      (the missing pixels of a mask, every pixel otherwise); calibration is scored there.
    description: one sentence stating the operator, the sizes and the noise.
    seed: the seed that fixed the task's random parts (random mask, measurement matrix).
  """

  def __init__(self, name, image_shape, likelihood, noise_scale, unobserved_mask,
               description, seed=0, display_fn=None):
    self.name = name
    self.image_shape = tuple(image_shape)
    self.likelihood = likelihood
    self.operator = likelihood.operator
    self.noise_scale = float(noise_scale)
    self.unobserved_mask = np.asarray(unobserved_mask, bool)
    self.description = description
    self.seed = seed
    self._display_fn = display_fn

  @property
  def observation_shape(self):
    """Event shape of `y`, a tuple."""
    return tuple(self.likelihood.event_shape.as_list())

  @property
  def num_measurements(self):
    """`m`, the number of entries of `y`."""
    return int(np.prod(self.observation_shape))

  def observe(self, x_true, seed):
    """Simulates `y ~ p(y | x_true)` from a stateless seed.

    Args:
      x_true: image(s), shape `[..., H, W, C]`.
      seed: an int or a pair of ints; the same seed gives the same `y`.

    Returns:
      float32 `tf.Tensor` of shape `[...] + observation_shape`.
    """
    x = tf.convert_to_tensor(x_true, tf.float32, name="x_true")
    if x.shape.rank is None or tuple(x.shape[x.shape.rank - 3:].as_list()) != self.image_shape:
      raise ValueError(f"`x_true` must have trailing shape {list(self.image_shape)} for task "
                       f"{self.name!r}, got shape {x.shape.as_list()}.")
    return self.likelihood.sample(x, seed=tf.constant(_as_seed_pair(seed), tf.int32))

  def observation_image(self, y):
    """An image `[H, W, C]` that shows `y` (NaN where nothing is observed), for figures."""
    y = np.asarray(y, np.float32)
    if self._display_fn is None:
      return y.reshape(self.image_shape)
    return np.asarray(self._display_fn(y), np.float32).reshape(self.image_shape)

  def __repr__(self):
    return f"Task({self.name!r}, image_shape={list(self.image_shape)})"


# ---------------------------------------------------------------------------
# Builders: (image_shape, seed) -> Task.


def _mask_task(name, shape, observed, what, seed):
  operator = operators.Mask(observed)
  likelihood = likelihoods.Gaussian(operator, scale=MASK_NOISE)
  missing = ~observed
  description = (f"Inpainting, {what} missing: {int(missing.sum())} of {missing.size} pixels "
                 f"({missing.mean():.1%}); the rest observed with Gaussian noise {MASK_NOISE}.")
  return Task(name, shape, likelihood, MASK_NOISE, missing, description, seed,
              display_fn=lambda y: operator.fill(y, np.nan).numpy())


def _inpaint_lower_half(shape, seed):
  h = shape[0]
  observed = np.ones(shape, bool)
  observed[h // 2:] = False
  return _mask_task("inpaint_lower_half", shape, observed,
                    f"the lower half (rows {h // 2}-{h - 1}; the partition p(x2 | x1))", seed)


def _inpaint_center(shape, seed):
  h, w, _ = shape
  sh, sw = h // 2, w // 2
  if sh == 0 or sw == 0:
    raise ValueError(f"`image_shape` {list(shape)} is too small for a centre square.")
  top, left = (h - sh) // 2, (w - sw) // 2
  observed = np.ones(shape, bool)
  observed[top:top + sh, left:left + sw] = False
  return _mask_task("inpaint_center", shape, observed,
                    f"a centred {sh} x {sw} square (rows {top}-{top + sh - 1}, columns "
                    f"{left}-{left + sw - 1})", seed)


def _inpaint_random_90(shape, seed):
  h, w, _ = shape
  num_missing = int(round(0.9 * h * w))
  if num_missing >= h * w:
    raise ValueError(f"`image_shape` {list(shape)} is too small to observe 10% of its pixels.")
  rng = np.random.default_rng(_as_seed_pair(seed))
  missing_pixels = rng.permutation(h * w)[:num_missing]
  observed = np.ones([h * w], bool)
  observed[missing_pixels] = False
  observed = np.broadcast_to(observed.reshape(h, w, 1), shape).copy()
  return _mask_task("inpaint_random_90", shape, observed,
                    f"90% of the pixels, chosen at random (seed {seed})", seed)


def _super_resolution(factor):
  def build(shape, seed):
    operator = operators.Downsample(factor, input_shape=shape)
    likelihood = likelihoods.Gaussian(operator, scale=MASK_NOISE)
    out = operator.output_shape.as_list()
    description = (f"Super-resolution {factor}x: {factor} x {factor} average pooling to "
                   f"{out[0]} x {out[1]}, Gaussian noise {MASK_NOISE}.")

    def display(y):
      return np.repeat(np.repeat(y.reshape(out), factor, axis=0), factor, axis=1)

    return Task(f"super_resolution_{factor}x", shape, likelihood, MASK_NOISE,
                np.ones(shape, bool), description, seed, display_fn=display)
  return build


def _compressed_sensing(m_784):
  def build(shape, seed):
    size = int(np.prod(shape))
    m = max(1, int(round(m_784 * size / _MNIST_PIXELS)))
    operator = operators.GaussianMeasurement(m, seed=_as_seed_pair(seed), input_shape=shape)
    likelihood = likelihoods.Gaussian(operator, scale=MASK_NOISE)
    description = (f"Compressed sensing: m = {m} Gaussian measurements (M_ij ~ N(0, 1/m), "
                   f"{m / size:.1%} of {size} pixels; {m_784} at 784), Gaussian noise "
                   f"{MASK_NOISE}.")
    matrix = operator.matrix

    def display(y):  # The minimum-norm least-squares image.
      return np.linalg.lstsq(matrix, y.astype(np.float64), rcond=None)[0]

    return Task(f"compressed_sensing_m{m_784}", shape, likelihood, MASK_NOISE,
                np.ones(shape, bool), description, seed, display_fn=display)
  return build


def _denoise(shape, seed):
  likelihood = likelihoods.Gaussian(operators.Identity(input_shape=shape), scale=DENOISE_NOISE)
  description = f"Denoising: every pixel observed with Gaussian noise {DENOISE_NOISE}."
  return Task("denoise", shape, likelihood, DENOISE_NOISE, np.ones(shape, bool), description,
              seed)


def _saturation(shape, seed):
  k = SATURATION_GAIN
  norm = float(np.tanh(k))
  operator = operators.Lambda(lambda x: tf.tanh(k * x) / tf.cast(norm, x.dtype),
                              output_shape=shape, input_shape=shape, name="saturation")
  likelihood = likelihoods.Gaussian(operator, scale=MASK_NOISE)
  description = (f"Saturating sensor: A(x) = tanh({k:g} x) / tanh({k:g}) (slope {k / norm:.2f} "
                 f"at 0, {k * (1 - norm**2) / norm:.3f} at 1), Gaussian noise {MASK_NOISE}.")

  def display(y):  # The pointwise inverse of the sensor, clipped to its range.
    return np.arctanh(np.clip(y * norm, -0.999, 0.999)) / k

  return Task("saturation", shape, likelihood, MASK_NOISE, np.ones(shape, bool), description,
              seed, display_fn=display)


def _quantize_1bit(shape, seed):
  t, s = QUANTIZER_THRESHOLD, QUANTIZER_DITHER

  def noise_fn(loc):
    return tfd.Bernoulli(logits=(loc - tf.cast(t, loc.dtype)) / tf.cast(s, loc.dtype),
                         dtype=loc.dtype)

  likelihood = likelihoods.Likelihood(operators.Identity(input_shape=shape), noise_fn)
  description = (f"One-bit sensor: y = 1[x + e > {t}], logistic dither e ~ Logistic(0, {s}), "
                 f"so p(y = 1 | x) = sigmoid((x - {t}) / {s}).")
  return Task("quantize_1bit", shape, likelihood, s, np.ones(shape, bool), description, seed)


TASKS = {
    "inpaint_lower_half": _inpaint_lower_half,
    "inpaint_center": _inpaint_center,
    "inpaint_random_90": _inpaint_random_90,
    "super_resolution_2x": _super_resolution(2),
    "super_resolution_4x": _super_resolution(4),
    "compressed_sensing_m50": _compressed_sensing(50),
    "compressed_sensing_m200": _compressed_sensing(200),
    "denoise": _denoise,
    "saturation": _saturation,
    "quantize_1bit": _quantize_1bit,
}


def get(name, image_shape=(28, 28, 1), seed=0):
  """Builds the task `name` for images of shape `image_shape`.

  Args:
    name: a key of `TASKS`.
    image_shape: `[H, W, C]`, e.g. `[28, 28, 1]` (MNIST) or `[8, 8, 1]`.
    seed: an int or a pair of ints fixing the random mask or measurement matrix.

  Returns:
    A `Task`.

  Raises:
    ValueError: for an unknown `name`, a bad `image_shape` or `seed`, or a shape the
      operator cannot take (e.g. super-resolution 4x of a width not divisible by 4).
  """
  if name not in TASKS:
    raise ValueError(f"`name` must be one of {sorted(TASKS)}, got {name!r}.")
  shape = _as_image_shape(image_shape)
  _as_seed_pair(seed)
  return TASKS[name](shape, seed)
