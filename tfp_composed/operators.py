"""Forward operators: differentiable maps `x -> A(x)` from a signal to what is observed.

An observation model says how a measurement `y` arises from a signal `x` through a
forward operator `A` (Whang, Lindgren & Dimakis, ICML 2021): `y ~ Noise(A(x))`. Each
operator here is a small `tf.Module` with a known input event shape (the shape of one
`x`) and output event shape (the shape of one `A(x)`); any number of leading batch
dimensions pass through.

Linear operators also provide their adjoint `A^T`, written out explicitly (gather,
scatter, transposed matrix, flipped-kernel correlation), so that the identity
`<A x, y> = <x, A^T y>` is a real test of the implementation.

Fixed parameters (masks, matrices, kernels, weights) are held as NumPy constants and
enter the computation as `tf.constant`s in the dtype of `x`: an operator computes in
`float32` by default and in `float64` when given `float64` inputs.

#### References

[1]: Jay Whang, Erik M. Lindgren, Alexandros G. Dimakis. Composing Normalizing Flows
     for Inverse Problems. In _International Conference on Machine Learning_, 2021.
     https://arxiv.org/abs/2002.11743
"""

import numpy as np
import tensorflow as tf

from tfp_composed import checks

__all__ = [
    "ForwardOperator",
    "Identity",
    "Mask",
    "Downsample",
    "Linear",
    "GaussianMeasurement",
    "Blur",
    "Grayscale",
    "Lambda",
]


# ---------------------------------------------------------------------------
# Argument checking.


def _format_shape(shape):
  """Formats a shape as `[28, 28, 1]` (unknown dims as `None`)."""
  shape = tf.TensorShape(shape)
  if shape.rank is None:
    return "<unknown rank>"
  return str(shape.as_list())


def _as_event_shape(shape, name):
  """Converts `shape` to a fully defined `tf.TensorShape` or raises `ValueError`."""
  if isinstance(shape, (tf.Tensor, np.ndarray)):
    shape = np.asarray(shape).tolist()
  try:
    result = tf.TensorShape(shape)
  except (TypeError, ValueError) as e:
    raise ValueError(
        f"`{name}` must be a list of non-negative integers, got {shape!r}.") from e
  if result.rank is None or not result.is_fully_defined():
    raise ValueError(f"`{name}` must be fully defined, got {_format_shape(result)}.")
  return result


def _as_numpy(value, name):
  """Converts a constant (array, list, eager tensor or variable) to a NumPy array."""
  if tf.is_tensor(value) or isinstance(value, tf.Variable):
    try:
      return np.asarray(value.numpy())
    except (AttributeError, NotImplementedError) as e:
      raise ValueError(
          f"`{name}` must be a constant (NumPy array or eager tensor), got the "
          f"symbolic tensor {value!r}.") from e
  return np.asarray(value)


def _as_real_array(value, name, ndim=None):
  """A finite real-valued NumPy array of `ndim` dimensions (float64)."""
  arr = _as_numpy(value, name)
  if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or
                               np.issubdtype(arr.dtype, np.floating)):
    raise TypeError(f"`{name}` must be a real-valued array, got dtype {arr.dtype}.")
  if ndim is not None and arr.ndim != ndim:
    raise ValueError(
        f"`{name}` must have {ndim} dimension(s), got shape {list(arr.shape)}.")
  if arr.size == 0:
    raise ValueError(f"`{name}` must not be empty, got shape {list(arr.shape)}.")
  num_bad = int(np.sum(~np.isfinite(arr)))
  if num_bad:
    raise ValueError(
        f"`{name}` must be finite, got {num_bad} NaN or Inf entries of {arr.size}.")
  return arr.astype(np.float64)


def _as_float_tensor(x, name):
  """Converts `x` to a floating tensor (integers and booleans become `float32`).

  Python numbers and lists become `float32`; tensors and NumPy arrays keep a floating
  dtype (a `float64` array stays `float64`).
  """
  dtype = getattr(x, "dtype", None)
  if (not tf.is_tensor(x) and dtype is not None and
      np.issubdtype(np.dtype(dtype), np.floating)):
    x = tf.convert_to_tensor(x, dtype=np.dtype(dtype), name=name)
  else:
    x = tf.convert_to_tensor(x, dtype_hint=tf.float32, name=name)
  if x.dtype.is_floating:
    return x
  if x.dtype.is_integer or x.dtype == tf.bool:
    return tf.cast(x, tf.float32)
  raise TypeError(f"`{name}` must be a real floating-point tensor, got dtype {x.dtype.name}.")


def _check_event(x, event_shape, name):
  """Raises `ValueError` unless the static shape of `x` ends in `event_shape`."""
  rank = event_shape.rank
  if x.shape.rank is None:
    raise ValueError(
        f"`{name}` must have trailing event shape {_format_shape(event_shape)}, got a "
        "tensor of unknown rank.")
  if x.shape.rank < rank or not x.shape[x.shape.rank - rank:].is_compatible_with(
      event_shape):
    raise ValueError(
        f"`{name}` must have trailing event shape {_format_shape(event_shape)}, got "
        f"shape {_format_shape(x.shape)}.")


def _apply_batched(fn, x, in_event, out_event):
  """Applies `fn: [N] + in_event -> [N] + out_event` to `batch_shape + in_event`."""
  batch_ndims = x.shape.rank - in_event.rank
  static_batch = x.shape[:batch_ndims]
  flat = tf.reshape(x, [-1] + in_event.as_list())
  out = fn(flat)
  if static_batch.is_fully_defined():
    return tf.reshape(out, static_batch.as_list() + out_event.as_list())
  batch_shape = tf.shape(x)[:batch_ndims]
  out = tf.reshape(
      out, tf.concat([batch_shape, tf.constant(out_event.as_list(), tf.int32)], 0))
  out.set_shape(static_batch.concatenate(out_event))
  return out


# ---------------------------------------------------------------------------
# Base class.


class ForwardOperator(tf.Module):
  """A differentiable forward operator `y = A(x)` with known event shapes.

  `x` has shape `batch_shape + input_shape` and `A(x)` has shape
  `batch_shape + output_shape`, for any number of batch dimensions (including none).
  The input shape is bound once, at construction or by `build`; calling an unbound
  operator binds it from the trailing dimensions of `x` when the operator knows its
  input rank.

  Subclasses implement `_forward(x)` (and `_adjoint(y)` when linear) on a single
  flattened batch dimension, `[N] + input_shape -> [N] + output_shape`, and
  `_output_shape(input_shape)`; `_check_input_shape(input_shape)` and
  `_build(input_shape)` are optional hooks.

  #### Examples

  ```python
  import numpy as np
  from tfp_composed import operators

  A = operators.Downsample(2, input_shape=[28, 28, 1])
  y = A(np.zeros([5, 28, 28, 1], np.float32))   # shape [5, 14, 14, 1]
  A.output_shape                                # TensorShape([14, 14, 1])
  x_back = A.adjoint(y)                         # shape [5, 28, 28, 1]
  ```
  """

  is_linear = False
  # Number of event dims of `x` when known without an input shape (`None`: unknown).
  _input_rank = None

  def __init__(self, input_shape=None, name=None):
    """Creates the operator.

    Args:
      input_shape: event shape of `x`, or `None` to bind it later with `build` (or on
        the first call, when the operator knows its input rank).
      name: Python `str` name of the module; defaults to the snake-case class name.
    """
    super().__init__(name=name)
    self._input_shape = None
    self._output_shape_value = None
    if input_shape is not None:
      self.build(input_shape)

  @property
  def input_shape(self):
    """Event shape of `x` as a `tf.TensorShape`, or `None` before `build`."""
    return self._input_shape

  @property
  def output_shape(self):
    """Event shape of `A(x)` as a `tf.TensorShape`; requires a bound input shape."""
    if self._output_shape_value is None:
      raise ValueError(
          f"`{type(self).__name__}` has no output shape yet: its input shape is not "
          "bound. Pass `input_shape` to the constructor, call `build(input_shape)` or "
          "call the operator on an input first.")
    return self._output_shape_value

  @property
  def built(self):
    """Whether the input shape is bound."""
    return self._input_shape is not None

  def build(self, input_shape):
    """Binds the event shape of `x`; idempotent.

    Args:
      input_shape: event shape of `x` (list, tuple or `tf.TensorShape`).

    Returns:
      self.

    Raises:
      ValueError: if `input_shape` is not a fully defined shape, differs from a
        shape bound earlier, or does not fit the operator's own parameters.
    """
    input_shape = _as_event_shape(input_shape, "input_shape")
    if self._input_shape is not None:
      if input_shape != self._input_shape:
        self._check_input_shape(input_shape)  # The more specific message, if any.
        raise ValueError(
            f"`{type(self).__name__}` is bound to input shape "
            f"{_format_shape(self._input_shape)}, got input shape "
            f"{_format_shape(input_shape)}.")
      return self
    self._check_input_shape(input_shape)
    self._build(input_shape)
    output_shape = tf.TensorShape(self._output_shape(input_shape))
    self._input_shape = input_shape
    self._output_shape_value = output_shape
    return self

  def __call__(self, x):
    """Computes `A(x)` for `x` of shape `batch_shape + input_shape`."""
    with self.name_scope:
      x = _as_float_tensor(x, "x")
      if not self.built:
        self._build_from(x)
      _check_event(x, self._input_shape, "x")
      return _apply_batched(self._forward, x, self._input_shape, self.output_shape)

  def adjoint(self, y):
    """Computes `A^T y` for `y` of shape `batch_shape + output_shape` (linear only)."""
    if not self.is_linear:
      raise NotImplementedError(
          f"`{type(self).__name__}` is not a linear operator: it has no adjoint.")
    with self.name_scope:
      y = _as_float_tensor(y, "y")
      _check_event(y, self.output_shape, "y")
      return _apply_batched(self._adjoint, y, self.output_shape, self._input_shape)

  def _build_from(self, x):
    rank = self._input_rank
    if rank is None:
      raise ValueError(
          f"`{type(self).__name__}` cannot infer its input shape from `x` of shape "
          f"{_format_shape(x.shape)}: the event rank is ambiguous. Pass "
          "`input_shape` to the constructor or call `build(input_shape)` first.")
    if x.shape.rank is None or x.shape.rank < rank:
      raise ValueError(
          f"`x` must have at least {rank} dimensions for `{type(self).__name__}`, got "
          f"shape {_format_shape(x.shape)}.")
    event = x.shape[x.shape.rank - rank:]
    if not event.is_fully_defined():
      raise ValueError(
          f"`{type(self).__name__}` cannot infer its input shape from `x` of shape "
          f"{_format_shape(x.shape)}: the event dims are not static. Call "
          "`build(input_shape)` first.")
    self.build(event)

  def _check_input_shape(self, input_shape):
    del input_shape

  def _build(self, input_shape):
    del input_shape

  def _output_shape(self, input_shape):
    raise NotImplementedError

  def _forward(self, x):
    raise NotImplementedError

  def _adjoint(self, y):
    raise NotImplementedError

  def _input_shape_error(self, expected, input_shape):
    return ValueError(
        f"`{type(self).__name__}` expects input shape {expected}, got "
        f"{_format_shape(input_shape)}.")

  def __repr__(self):
    if not self.built:
      return f"{type(self).__name__}(input_shape=None)"
    return (f"{type(self).__name__}(input_shape={_format_shape(self._input_shape)}, "
            f"output_shape={_format_shape(self.output_shape)})")


# ---------------------------------------------------------------------------
# Operators.


class Identity(ForwardOperator):
  """The identity operator `A(x) = x`: denoising, or unconditional sampling.

  #### Examples

  ```python
  A = Identity(input_shape=[28, 28, 1])
  A(x)          # == x
  A.adjoint(y)  # == y
  ```
  """

  is_linear = True

  def __init__(self, input_shape=None, name=None):
    super().__init__(input_shape=input_shape, name=name)

  def _output_shape(self, input_shape):
    return input_shape

  def _forward(self, x):
    return tf.identity(x)

  def _adjoint(self, y):
    return tf.identity(y)


class Mask(ForwardOperator):
  """Observes the entries of `x` where a mask is true: `A(x) = x[mask]`.

  The observed entries are gathered in row-major order from the flattened event into
  a vector of length `num_observed`: `A(x) = gather(vec(x), where(vec(mask)))`. The
  adjoint scatters such a vector back into an event, with zeros at the hidden entries.
  Hard conditioning on part of `x` (inpainting) is this operator with a small
  Gaussian noise scale.

  #### Examples

  ```python
  import numpy as np

  mask = np.zeros([28, 28, 1], bool)
  mask[:14] = True                       # observe the top half
  A = Mask(mask)
  A.output_shape                         # TensorShape([392])
  y = A(x)                               # x: [..., 28, 28, 1] -> y: [..., 392]
  image = A.fill(y, fill_value=np.nan)   # [..., 28, 28, 1], NaN where hidden
  ```
  """

  is_linear = True

  def __init__(self, mask, name=None):
    """Creates the operator.

    Args:
      mask: boolean or 0/1 array with the event shape of `x`; true where observed.
      name: Python `str` name of the module.

    Raises:
      TypeError: if `mask` is not boolean or numeric.
      ValueError: if `mask` has entries other than 0 and 1 or observes nothing.
    """
    arr = _as_numpy(mask, "mask")
    if arr.dtype != bool:
      if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"`mask` must be a boolean or 0/1 array, got dtype {arr.dtype}.")
      bad = ~np.isin(arr, (0, 1))
      if np.any(bad):
        raise ValueError(
            f"`mask` must be a boolean or 0/1 array, got value {arr[bad].flat[0].item()!r}.")
      arr = arr.astype(bool)
    num_observed = int(arr.sum())
    if num_observed == 0:
      raise ValueError(
          f"`mask` must observe at least one entry, got an all-false mask of shape "
          f"{list(arr.shape)}.")
    self._mask = arr
    self._observed_indices = np.flatnonzero(arr).astype(np.int32)
    # Position of each event entry in the observation, or `num_observed` (the fill
    # column) where hidden: the adjoint is a gather through this map.
    positions = np.full(arr.size, num_observed, np.int32)
    positions[self._observed_indices] = np.arange(num_observed, dtype=np.int32)
    self._positions = positions
    super().__init__(input_shape=arr.shape, name=name)

  @property
  def mask(self):
    """The boolean mask, a NumPy array with the event shape of `x`."""
    return self._mask.copy()

  @property
  def num_observed(self):
    """Number of observed entries, the length of `A(x)`."""
    return int(self._observed_indices.size)

  def _check_input_shape(self, input_shape):
    if input_shape != tf.TensorShape(self._mask.shape):
      raise ValueError(
          f"`Mask` has a mask of shape {list(self._mask.shape)}: its input shape must "
          f"be {list(self._mask.shape)}, got {_format_shape(input_shape)}.")

  def _output_shape(self, input_shape):
    return [self.num_observed]

  def _forward(self, x):
    flat = tf.reshape(x, [-1, self._mask.size])
    return tf.gather(flat, self._observed_indices, axis=-1)

  def _scatter(self, y, fill_value):
    fill = tf.fill(tf.stack([tf.shape(y)[0], 1]), tf.cast(fill_value, y.dtype))
    extended = tf.concat([y, fill], axis=-1)
    flat = tf.gather(extended, self._positions, axis=-1)
    return tf.reshape(flat, [-1] + list(self._mask.shape))

  def _adjoint(self, y):
    return self._scatter(y, 0.)

  def fill(self, y, fill_value=0.):
    """Scatters observed values `y` back into an event, `fill_value` where hidden.

    With `fill_value=0` this is the adjoint. Use `fill_value=np.nan` to plot an
    observation as an image with the hidden entries blank.

    Args:
      y: observed values, shape `batch_shape + [num_observed]`.
      fill_value: scalar written at the hidden entries.

    Returns:
      Tensor of shape `batch_shape + mask.shape`.
    """
    with self.name_scope:
      y = _as_float_tensor(y, "y")
      _check_event(y, self.output_shape, "y")
      return _apply_batched(lambda t: self._scatter(t, fill_value), y,
                            self.output_shape, self._input_shape)


def _split_channels(x, input_rank):
  """`[N, H, W]` or `[N, H, W, C]` -> `[N, H, W, C]` (adds a channel dim for rank 2)."""
  return x[..., tf.newaxis] if input_rank == 2 else x


def _merge_channels(x, input_rank):
  return x[..., 0] if input_rank == 2 else x


class Downsample(ForwardOperator):
  """Average pooling by an integer factor over the two spatial dims (super-resolution).

  `A(x)[i, j, c] = mean(x[f*i : f*i + f, f*j : f*j + f, c])` for an event `[H, W, C]`
  (or `[H, W]`) with `H` and `W` divisible by the factor `f`; the adjoint spreads
  each value over its `f x f` block divided by `f^2`.

  #### Examples

  ```python
  A = Downsample(4, input_shape=[28, 28, 1])
  A.output_shape   # TensorShape([7, 7, 1])
  y = A(x)         # x: [..., 28, 28, 1] -> y: [..., 7, 7, 1]
  ```
  """

  is_linear = True

  def __init__(self, factor, input_shape=None, name=None):
    """Creates the operator.

    Args:
      factor: positive Python `int`, the pooling window and stride.
      input_shape: event shape `[H, W, C]` or `[H, W]`; `None` to bind it later with
        `build` (the event rank is ambiguous, so it is not inferred from `x`).
      name: Python `str` name of the module.
    """
    self._factor = checks.positive_integer(factor, "factor")
    super().__init__(input_shape=input_shape, name=name)

  @property
  def factor(self):
    return self._factor

  def _check_input_shape(self, input_shape):
    if input_shape.rank not in (2, 3):
      raise self._input_shape_error("[H, W, C] or [H, W]", input_shape)
    height, width = input_shape[0], input_shape[1]
    f = self._factor
    if height % f or width % f:
      raise ValueError(
          f"`Downsample` with `factor`={f} needs H and W divisible by {f}, got input "
          f"shape {_format_shape(input_shape)}.")

  def _output_shape(self, input_shape):
    f = self._factor
    return [input_shape[0] // f, input_shape[1] // f] + input_shape.as_list()[2:]

  def _forward(self, x):
    rank = self._input_shape.rank
    x = _split_channels(x, rank)
    f = self._factor
    h, w, c = x.shape[1] // f, x.shape[2] // f, x.shape[3]
    blocks = tf.reshape(x, [-1, h, f, w, f, c])
    return _merge_channels(tf.reduce_mean(blocks, axis=[2, 4]), rank)

  def _adjoint(self, y):
    rank = self._input_shape.rank
    y = _split_channels(y, rank)
    f = self._factor
    h, w, c = y.shape[1], y.shape[2], y.shape[3]
    spread = tf.broadcast_to(y[:, :, tf.newaxis, :, tf.newaxis, :] / (f * f),
                             tf.stack([tf.shape(y)[0], h, f, w, f, c]))
    return _merge_channels(tf.reshape(spread, [-1, h * f, w * f, c]), rank)


class Linear(ForwardOperator):
  """A fixed matrix acting on the flattened event: `A(x) = M @ vec(x)`.

  `M` has shape `[m, n]` and `n` must be the number of elements of the event;
  `vec` flattens in row-major order. The adjoint is `A^T y = unvec(M^T @ y)`.

  #### Examples

  ```python
  import numpy as np

  M = np.random.randn(10, 784).astype(np.float32) / np.sqrt(10.)
  A = Linear(M, input_shape=[28, 28, 1])
  y = A(x)             # x: [..., 28, 28, 1] -> y: [..., 10]
  x_bp = A.adjoint(y)  # [..., 28, 28, 1]
  ```
  """

  is_linear = True

  def __init__(self, matrix, input_shape=None, name=None):
    """Creates the operator.

    Args:
      matrix: finite real array of shape `[m, n]`.
      input_shape: event shape of `x` with `n` elements; defaults to `[n]`.
      name: Python `str` name of the module.
    """
    self._matrix = _as_real_array(matrix, "matrix", ndim=2)
    if input_shape is None:
      input_shape = [self._matrix.shape[1]]
    super().__init__(input_shape=input_shape, name=name)

  @property
  def matrix(self):
    """The matrix `M`, a float64 NumPy array of shape `[m, n]`."""
    return self._matrix.copy()

  def _check_input_shape(self, input_shape):
    n = self._matrix.shape[1]
    if input_shape.num_elements() != n:
      raise ValueError(
          f"`{type(self).__name__}` has a `matrix` of shape {list(self._matrix.shape)}: "
          f"its input shape must have {n} elements, got {_format_shape(input_shape)} "
          f"with {input_shape.num_elements()}.")

  def _output_shape(self, input_shape):
    return [self._matrix.shape[0]]

  def _forward(self, x):
    matrix = tf.constant(self._matrix, dtype=x.dtype)
    flat = tf.reshape(x, [-1, self._matrix.shape[1]])
    return tf.linalg.matmul(flat, matrix, transpose_b=True)

  def _adjoint(self, y):
    matrix = tf.constant(self._matrix, dtype=y.dtype)
    flat = tf.linalg.matmul(y, matrix)
    return tf.reshape(flat, [-1] + self._input_shape.as_list())


class GaussianMeasurement(Linear):
  """Compressed sensing with a fixed random Gaussian matrix: `A(x) = M @ vec(x)`.

  `M[i, j] ~ N(0, 1 / m)` i.i.d. for `m = num_measurements`, drawn once when the input
  shape is bound, from a stateless seed: the same seed and shapes give the same
  matrix. Once built this is a `Linear` operator.

  #### Examples

  ```python
  A = GaussianMeasurement(100, seed=7, input_shape=[28, 28, 1])
  A.matrix.shape   # (100, 784)
  y = A(x)         # x: [..., 28, 28, 1] -> y: [..., 100]
  ```
  """

  def __init__(self, num_measurements, seed=0, input_shape=None, name=None):
    """Creates the operator.

    Args:
      num_measurements: positive Python `int`, the number `m` of measurements.
      seed: Python `int`, or a pair of `int`s, the stateless seed of the matrix.
      input_shape: event shape of `x`; `None` to bind it later with `build` (it is not
        inferred from `x`, whose event rank is unknown to this operator).
      name: Python `str` name of the module.
    """
    self._num_measurements = checks.positive_integer(num_measurements, "num_measurements")
    seed_arr = np.asarray(seed)
    if (not np.issubdtype(seed_arr.dtype, np.integer) or seed_arr.ndim > 1 or
        (seed_arr.ndim == 1 and seed_arr.size != 2)):
      raise ValueError(f"`seed` must be an integer or a pair of integers, got {seed!r}.")
    self._seed = (int(seed_arr), 0) if seed_arr.ndim == 0 else tuple(
        int(s) for s in seed_arr)
    self._matrix = None
    ForwardOperator.__init__(self, input_shape=input_shape, name=name)

  @property
  def num_measurements(self):
    return self._num_measurements

  @property
  def seed(self):
    return self._seed

  @property
  def matrix(self):
    """The matrix `M` (float64 NumPy array); requires a bound input shape."""
    if self._matrix is None:
      self.output_shape  # pylint: disable=pointless-statement  # Raises if unbound.
    return self._matrix.copy()

  def _check_input_shape(self, input_shape):
    if input_shape.num_elements() == 0:
      raise ValueError(
          f"`GaussianMeasurement` needs a non-empty input shape, got "
          f"{_format_shape(input_shape)}.")

  def _build(self, input_shape):
    shape = [self._num_measurements, input_shape.num_elements()]
    with tf.init_scope(), tf.device("/CPU:0"):
      draws = tf.random.stateless_normal(
          shape, seed=tf.constant(self._seed, tf.int64), dtype=tf.float64)
      self._matrix = draws.numpy() / np.sqrt(self._num_measurements)


class Blur(ForwardOperator):
  """Convolution of each channel with a fixed 2-D kernel, zero padding, same size.

  `A(x)[i, j, c] = sum_{a, b} k[a, b] x[i + ca - a, j + cb - b, c]` with
  `ca = (kh - 1) // 2`, `cb = (kw - 1) // 2` and zeros outside the image: the
  true (flipped) convolution, equal to `scipy.signal.convolve2d(x, k, mode='same')`
  for each channel, also for even kernel sizes. The adjoint is the correlation
  with the same kernel under the mirrored padding.

  #### Examples

  ```python
  import numpy as np

  kernel = np.outer([1., 2., 1.], [1., 2., 1.]) / 16.
  A = Blur(kernel, input_shape=[28, 28, 1])
  y = A(x)   # x: [..., 28, 28, 1] -> y: [..., 28, 28, 1]
  ```
  """

  is_linear = True

  def __init__(self, kernel, input_shape=None, name=None):
    """Creates the operator.

    Args:
      kernel: finite real array of shape `[kh, kw]`.
      input_shape: event shape `[H, W, C]` or `[H, W]`; `None` to bind it later with
        `build` (the event rank is ambiguous, so it is not inferred from `x`).
      name: Python `str` name of the module.
    """
    self._kernel = _as_real_array(kernel, "kernel", ndim=2)
    super().__init__(input_shape=input_shape, name=name)

  @property
  def kernel(self):
    """The kernel, a float64 NumPy array of shape `[kh, kw]`."""
    return self._kernel.copy()

  def _check_input_shape(self, input_shape):
    if input_shape.rank not in (2, 3):
      raise self._input_shape_error("[H, W, C] or [H, W]", input_shape)

  def _output_shape(self, input_shape):
    return input_shape

  def _correlate(self, x, kernel, paddings):
    """Correlates each channel of `x: [N, H, W, C]` with `kernel` after padding."""
    h, w, c = x.shape[1], x.shape[2], x.shape[3]
    planes = tf.reshape(tf.transpose(x, [0, 3, 1, 2]), [-1, h, w, 1])
    planes = tf.pad(planes, [[0, 0], paddings[0], paddings[1], [0, 0]])
    filters = tf.constant(kernel[:, :, np.newaxis, np.newaxis], dtype=x.dtype)
    out = tf.nn.conv2d(planes, filters, strides=1, padding="VALID")
    return tf.transpose(tf.reshape(out, [-1, c, h, w]), [0, 2, 3, 1])

  def _forward(self, x):
    rank = self._input_shape.rank
    kh, kw = self._kernel.shape
    # `conv2d` correlates, so flip the kernel; pad `k // 2` before, `(k - 1) // 2` after.
    flipped = self._kernel[::-1, ::-1]
    paddings = [[kh // 2, (kh - 1) // 2], [kw // 2, (kw - 1) // 2]]
    return _merge_channels(
        self._correlate(_split_channels(x, rank), flipped, paddings), rank)

  def _adjoint(self, y):
    rank = self._input_shape.rank
    kh, kw = self._kernel.shape
    paddings = [[(kh - 1) // 2, kh // 2], [(kw - 1) // 2, kw // 2]]
    return _merge_channels(
        self._correlate(_split_channels(y, rank), self._kernel, paddings), rank)


class Grayscale(ForwardOperator):
  """A weighted sum over channels: `A(x)[i, j, 0] = sum_c w[c] x[i, j, c]`.

  Maps an event `[H, W, C]` (RGB: `C = 3`) to `[H, W, 1]`, with the ITU-R BT.601
  luma weights by default (colourization as an inverse problem). The adjoint is
  `A^T y[i, j, c] = w[c] y[i, j, 0]`.

  #### Examples

  ```python
  A = Grayscale(input_shape=[32, 32, 3])
  y = A(x)   # x: [..., 32, 32, 3] -> y: [..., 32, 32, 1]
  ```
  """

  is_linear = True
  _input_rank = 3

  def __init__(self, weights=(0.299, 0.587, 0.114), input_shape=None, name=None):
    """Creates the operator.

    Args:
      weights: finite real vector of channel weights, length `C`.
      input_shape: event shape `[H, W, C]`; `None` to bind it on the first call.
      name: Python `str` name of the module.
    """
    self._weights = _as_real_array(weights, "weights", ndim=1)
    super().__init__(input_shape=input_shape, name=name)

  @property
  def weights(self):
    """The channel weights, a float64 NumPy array of shape `[C]`."""
    return self._weights.copy()

  def _check_input_shape(self, input_shape):
    num_channels = self._weights.size
    if input_shape.rank != 3 or input_shape[-1] != num_channels:
      raise self._input_shape_error(f"[H, W, {num_channels}]", input_shape)

  def _output_shape(self, input_shape):
    return input_shape[:2].concatenate([1])

  def _forward(self, x):
    weights = tf.constant(self._weights, dtype=x.dtype)
    return tf.reduce_sum(x * weights, axis=-1, keepdims=True)

  def _adjoint(self, y):
    weights = tf.constant(self._weights, dtype=y.dtype)
    return y * weights


class Lambda(ForwardOperator):
  """Any differentiable map `A(x) = fn(x)`, treated as non-linear.

  `fn` maps a batch, `[N] + input_shape -> [N] + output_shape`. When the input shape is
  bound (at construction or `build`), `fn` is called once, eagerly (outside any
  `tf.function`), on zeros of shape `[1] + input_shape` and `dtype`: that call infers
  `output_shape` when it is not given and checks it when it is, so that an `fn` that
  raises or returns the wrong shape is an error here, naming `fn`, and not inside a trace
  of `fit`.

  #### Examples

  ```python
  import tensorflow as tf

  # Phase-less measurements of a fixed random projection.
  M = tf.random.stateless_normal([20, 64], seed=[1, 2]) / 8.
  A = Lambda(lambda x: tf.abs(tf.linalg.matmul(x, M, transpose_b=True)),
             input_shape=[64])
  A.output_shape   # TensorShape([20]), inferred
  ```
  """

  def __init__(self, fn, output_shape=None, input_shape=None, name=None, dtype=tf.float32):
    """Creates the operator.

    Args:
      fn: Python callable, `[N] + input_shape -> [N] + output_shape`, differentiable.
      output_shape: event shape of `fn(x)`; `None` to infer it at build time.
      input_shape: event shape of `x`; `None` to bind it later with `build`.
      name: Python `str` name of the module.
      dtype: floating dtype of the zeros `fn` is probed with at build time (pass
        `tf.float64` for an `fn` that accepts float64 inputs only).

    Raises:
      TypeError: if `fn` is not callable or `dtype` is not floating.
      ValueError: if `fn` raises on the probe, or returns a shape other than
        `[1] + output_shape`.
    """
    if not callable(fn):
      raise TypeError(f"`fn` must be callable, got {fn!r} of type {type(fn).__name__}.")
    dtype = tf.as_dtype(dtype)
    if not dtype.is_floating:
      raise TypeError(f"`dtype` must be a floating dtype, got {dtype.name}.")
    self._fn = fn
    self._dtype = dtype
    self._given_output_shape = (
        None if output_shape is None else _as_event_shape(output_shape, "output_shape"))
    self._inferred_output_shape = None
    super().__init__(input_shape=input_shape, name=name)

  @property
  def fn(self):
    return self._fn

  def _build(self, input_shape):
    probe_shape = [1] + input_shape.as_list()
    with tf.init_scope():
      try:
        out = tf.convert_to_tensor(self._fn(tf.zeros(probe_shape, self._dtype)))
      except Exception as e:  # pylint: disable=broad-except
        text = str(e).strip()
        raise ValueError(
            f"`fn` must map a batch [N] + input_shape to [N] + output_shape; on zeros of "
            f"shape {probe_shape} ({self._dtype.name}) it raised {type(e).__name__}: "
            f"{text.splitlines()[0] if text else ''}") from e
    if out.shape.rank is None or out.shape.rank < 1 or out.shape[0] != 1:
      raise ValueError(
          f"`fn` must map a batch [N] + input_shape to [N] + output_shape; on zeros of "
          f"shape {probe_shape} it returned shape {_format_shape(out.shape)}.")
    if not out.dtype.is_floating:
      raise TypeError(
          f"`fn` must return a floating tensor; on zeros of shape {probe_shape} it returned "
          f"dtype {out.dtype.name}.")
    given = self._given_output_shape
    if given is not None and out.shape[1:] != given:
      raise ValueError(
          f"`fn` must return shape [N] + `output_shape` = [N] + {_format_shape(given)}; on "
          f"zeros of shape {probe_shape} it returned shape {_format_shape(out.shape)}.")
    self._inferred_output_shape = out.shape[1:]

  def _output_shape(self, input_shape):
    if self._given_output_shape is not None:
      return self._given_output_shape
    return self._inferred_output_shape

  def _forward(self, x):
    out = tf.convert_to_tensor(self._fn(x))
    expected = tf.TensorShape([None]).concatenate(self.output_shape)
    if not out.shape.is_compatible_with(expected):
      raise ValueError(
          f"`fn` must return shape [N] + {_format_shape(self.output_shape)}, got "
          f"{_format_shape(out.shape)} for input shape {_format_shape(x.shape)}.")
    return out
