"""Likelihoods: observation models `p(y | x)` as TFP distributions around `A(x)`.

An observation `y` of a signal `x` arises through a forward operator `A` and a noise
distribution (Whang, Lindgren & Dimakis, ICML 2021):

    p(y | x) = prod_i Noise(y_i; loc = A(x)_i)

A `Likelihood` wraps the operator and a `noise_fn: loc -> tfd.Distribution` with one
batch member per output entry, and reinterprets the operator's output dims as the
event: `distribution(x)` is a `tfd.Independent` with batch shape the batch shape of `x`
and event shape `operator.output_shape`. `log_prob(y, x)` is the term
`log p(y | f(z))` of the latent target.

Noise parameters (`scale`, `df`) are constants, checked once at construction; their
dtype, and that of checked observations, follows the prior the likelihood is built on
(`build(input_shape, dtype=prior.dtype)`) unless `dtype` is given explicitly. `noise_fn`
is called once, eagerly, when the input shape is known, and observations are checked
once, eagerly, by `check_observation`, so that a wrong shape, a wrong `noise_fn` or a
NaN is a clear error before any training starts.

#### References

[1]: Jay Whang, Erik M. Lindgren, Alexandros G. Dimakis. Composing Normalizing Flows
     for Inverse Problems. In _International Conference on Machine Learning_, 2021.
     https://arxiv.org/abs/2002.11743
"""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_composed import operators as operators_lib

tfd = tfp.distributions

__all__ = [
    "Likelihood",
    "Gaussian",
    "Laplace",
    "StudentT",
]


def _format_shape(shape):
  return operators_lib._format_shape(shape)  # pylint: disable=protected-access


def _short_repr(value, limit=80):
  """`repr(value)` on one line, cut to `limit` characters."""
  text = " ".join(repr(value).split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _format_value(arr):
  if arr.size == 1:
    return repr(arr.reshape(()).item())
  return np.array2string(arr, threshold=8, separator=", ")


def _shape_matches(shape, event_shape, allow_batch):
  """Whether `shape` is `event_shape` (or `batch + event_shape` with `allow_batch`)."""
  if shape.rank is None:
    return True
  rank = event_shape.rank
  if allow_batch and shape.rank >= rank:
    shape = shape[shape.rank - rank:]
  return shape.rank == rank and shape.is_compatible_with(event_shape)


def _expected(event_shape, allow_batch):
  return (f"batch + {_format_shape(event_shape)}" if allow_batch
          else _format_shape(event_shape))


def _positive_array(value, name):
  """Checks that `value` is positive and finite; returns it as a NumPy array.

  The array keeps the given precision; the likelihood turns it into a constant of its
  dtype (the prior's) when it is built.
  """
  if isinstance(value, tf.Variable) or (tf.is_tensor(value) and not hasattr(value, "numpy")):
    raise TypeError(
        f"`{name}` must be a constant (Python float, NumPy array or eager tensor), got "
        f"{_short_repr(value)}.")
  try:
    arr = np.asarray(value.numpy() if tf.is_tensor(value) else value)
  except (NotImplementedError, AttributeError) as e:
    raise TypeError(
        f"`{name}` must be a constant (Python float, NumPy array or eager tensor), got "
        f"{_short_repr(value)}.") from e
  if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or
                               np.issubdtype(arr.dtype, np.floating)):
    raise TypeError(f"`{name}` must be a real number or array, got dtype {arr.dtype}.")
  if arr.size == 0:
    raise ValueError(f"`{name}` must not be empty, got shape {list(arr.shape)}.")
  bad = ~(np.isfinite(arr) & (arr > 0))
  if np.any(bad):
    if arr.size == 1:
      shown = _format_value(arr)
    else:
      index = tuple(int(i) for i in np.argwhere(bad)[0])
      shown = (f"{int(bad.sum())} bad entries of {arr.size}, first "
               f"{arr[bad].flat[0].item()!r} at index {index}")
    raise ValueError(f"`{name}` must be positive and finite, got {shown}.")
  return arr


def _floating_dtype(dtype, name="dtype"):
  try:
    dtype = tf.as_dtype(dtype)
  except TypeError:
    raise TypeError(f"`{name}` must be a floating dtype, got {dtype!r}.") from None
  if not dtype.is_floating:
    raise TypeError(f"`{name}` must be a floating dtype, got {dtype.name}.")
  return dtype


def _first_line(error):
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


class Likelihood(tf.Module):
  """An observation model `p(y | x) = prod_i noise_fn(A(x))_i(y_i)`.

  `noise_fn(loc)` returns a `tfd.Distribution` whose batch shape is the shape of
  `loc = A(x)` (one scalar noise distribution per output entry); the operator's
  output dims become the event:

      p(y | x) = tfd.Independent(noise_fn(A(x)), reinterpreted_batch_ndims=len(output_shape))

  #### Examples

  ```python
  import numpy as np
  import tensorflow_probability as tfp
  from tfp_composed import likelihoods, operators
  tfd = tfp.distributions

  # Photon counts of a blurred image.
  A = operators.Blur(np.ones([3, 3]) / 9., input_shape=[28, 28, 1])
  likelihood = likelihoods.Likelihood(A, lambda loc: tfd.Poisson(rate=loc + 1.))
  y = likelihood.check_observation(counts)      # counts: [28, 28, 1]
  likelihood.log_prob(y, x)                     # x: [8, 28, 28, 1] -> [8]
  ```
  """

  def __init__(self, operator, noise_fn, name=None, dtype=None):
    """Creates the observation model.

    Args:
      operator: a `ForwardOperator`, the map `A`.
      noise_fn: Python callable, `loc -> tfd.Distribution` with batch shape
        `loc.shape` and scalar events. Once the operator's input shape is known
        (here, or at `build`), it is called once on the operator's output at zeros and
        must return such a distribution.
      name: Python `str` name of the module.
      dtype: floating dtype of the noise parameters and of observations returned by
        `check_observation`; `None` (default) adopts the prior's dtype when the
        likelihood is built on a prior (`float32` until then).

    Raises:
      TypeError: if `operator` is not a `ForwardOperator`, `noise_fn` is not
        callable or does not return a `tfd.Distribution`, or `dtype` is not floating.
      ValueError: if `noise_fn` raises on the probe or returns a distribution whose
        batch shape is not that of `loc`.
    """
    if not isinstance(operator, operators_lib.ForwardOperator):
      raise TypeError(
          f"`operator` must be a `ForwardOperator`, got {_short_repr(operator)} of type "
          f"{type(operator).__name__}.")
    if not callable(noise_fn):
      raise TypeError(
          f"`noise_fn` must be callable, got {_short_repr(noise_fn)} of type "
          f"{type(noise_fn).__name__}.")
    explicit = dtype is not None
    dtype = _floating_dtype(tf.float32 if dtype is None else dtype)
    super().__init__(name=name)
    self._operator = operator
    self._noise_fn = noise_fn
    self._dtype = dtype
    # Where the dtype came from: "explicit" (the constructor), "prior" (adopted at `build`)
    # or None (the float32 default, not yet bound).
    self._dtype_source = "explicit" if explicit else None
    self._probed = None  # (input shape, dtype) of the last noise probe.
    self._set_dtype(dtype)
    if operator.built:
      self._check_event_shape(operator.output_shape)
      self._probe()

  @property
  def operator(self):
    """The forward operator `A`."""
    return self._operator

  @property
  def noise_fn(self):
    """The callable `loc -> tfd.Distribution`."""
    return self._noise_fn

  @property
  def dtype(self):
    """Floating dtype of the noise parameters and of checked observations."""
    return self._dtype

  @property
  def input_shape(self):
    """Event shape of `x`, or `None` before `build`."""
    return self._operator.input_shape

  @property
  def event_shape(self):
    """Event shape of `y`: the operator's output shape (requires `build`)."""
    return self._operator.output_shape

  def build(self, input_shape, dtype=None):
    """Binds the event shape of `x` (builds the operator) and the dtype; returns self.

    Args:
      input_shape: event shape of `x`, the prior's event shape.
      dtype: the prior's dtype, or `None`. A likelihood constructed without `dtype`
        adopts it (the first dtype it is built with stays); one constructed with a
        different `dtype` is an error.

    Raises:
      TypeError: if `dtype` conflicts with the likelihood's own dtype.
    """
    if dtype is not None:
      dtype = _floating_dtype(dtype)
      if dtype != self._dtype:
        if self._dtype_source is not None:
          origin = ("passed to its constructor" if self._dtype_source == "explicit" else
                    "adopted from the prior it was first built on")
          raise TypeError(
              f"The likelihood's `dtype` is {self._dtype.name} ({origin}) but the prior's "
              f"dtype is {dtype.name}; they must match. Construct "
              f"{type(self).__name__}(..., dtype=tf.{dtype.name}), or without `dtype` to "
              "follow the prior.")
        self._set_dtype(dtype)
      if self._dtype_source is None:
        self._dtype_source = "prior"
    self._operator.build(input_shape)
    self._check_event_shape(self._operator.output_shape)
    self._probe()
    return self

  def _set_dtype(self, dtype):
    """Hook: (re)creates the noise parameters' constants in `dtype`."""
    self._dtype = dtype

  def _probe(self):
    """Calls `noise_fn` once on `A(0)` (a batch of one), eagerly, and checks its result."""
    key = (tuple(self._operator.input_shape.as_list()), self._dtype)
    if self._probed == key:
      return
    with tf.init_scope():
      x = tf.zeros([1] + self._operator.input_shape.as_list(), self._dtype)
      try:
        loc = self._operator(x)
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(
            f"`operator` {self._operator!r} must map a batch of signals of the likelihood's "
            f"dtype; on zeros of shape {_format_shape(x.shape)} ({self._dtype.name}) it "
            f"raised {_first_line(e)}") from e
      try:
        noise = self._noise(loc)
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(
            f"`noise_fn` must map `loc` of shape {_format_shape(loc.shape)} (a batch of one "
            f"output of {self._operator!r}) to a distribution; calling it on that `loc` "
            f"raised {_first_line(e)}") from e
      self._check_noise(noise, loc)
    self._probed = key

  def _check_noise(self, noise, loc):
    if not isinstance(noise, tfd.Distribution):
      raise TypeError(
          f"`noise_fn` must return a `tfd.Distribution`, got {_short_repr(noise)} of type "
          f"{type(noise).__name__}.")
    if (not noise.batch_shape.is_compatible_with(loc.shape) or
        not noise.event_shape.is_compatible_with([])):
      raise ValueError(
          f"`noise_fn` must return a distribution with batch shape "
          f"{_format_shape(loc.shape)} (the shape of `loc`) and scalar events, got "
          f"batch shape {_format_shape(noise.batch_shape)} and event shape "
          f"{_format_shape(noise.event_shape)}.")

  def _check_event_shape(self, event_shape):
    """Hook: checks the noise parameters against the event shape of `y`."""
    del event_shape

  def _noise(self, loc):
    return self._noise_fn(loc)

  def distribution(self, x):
    """The distribution `p(y | x)`: batch shape of `x`, event shape `event_shape`.

    Args:
      x: signal, shape `batch_shape + operator.input_shape`.

    Returns:
      A `tfd.Independent` distribution over `y`.
    """
    with self.name_scope:
      loc = self._operator(x)
      event_shape = self._operator.output_shape
      self._check_event_shape(event_shape)
      noise = self._noise(loc)
      self._check_noise(noise, loc)
      return tfd.Independent(noise, reinterpreted_batch_ndims=event_shape.rank)

  def log_prob(self, y, x):
    """`log p(y | x)`, shape: the batch shape of `x` (`y` broadcasts against it).

    Args:
      y: observation, shape `event_shape` (or with batch dims broadcasting with `x`).
      x: signal, shape `batch_shape + operator.input_shape`.

    Returns:
      Tensor of shape `batch_shape`.
    """
    dist = self.distribution(x)
    with self.name_scope:
      y = tf.convert_to_tensor(y, dtype_hint=dist.dtype, name="y")
      if not _shape_matches(y.shape, self.event_shape, allow_batch=True):
        raise ValueError(
            f"`y` must have shape {_expected(self.event_shape, True)}, the output shape of "
            f"{self._operator!r}, got {_format_shape(y.shape)}.")
      if (y.dtype != dist.dtype and dist.dtype.is_floating and
          (y.dtype.is_floating or y.dtype.is_integer)):
        y = tf.cast(y, dist.dtype)
      return dist.log_prob(y)

  def sample(self, x, seed=None):
    """Simulates an observation `y ~ p(y | x)`, shape `batch_shape + event_shape`."""
    return self.distribution(x).sample(seed=seed)

  def check_observation(self, y, name="observation", allow_batch=False):
    """Converts an observation to a tensor of `dtype`, checking it eagerly.

    The shape must equal `event_shape` exactly (with `allow_batch`, `batch + event_shape`
    for any leading batch dimensions) and every entry must be finite.
    Values are checked with NumPy on concrete inputs; a symbolic tensor (inside a
    `tf.function`) gets the static dtype and shape checks only.

    Args:
      y: the observation: array, nested list or tensor of shape `event_shape`.
      name: Python `str` name of the argument, used in error messages.

    Returns:
      `tf.Tensor` of dtype `self.dtype` and shape `event_shape`.

    Raises:
      TypeError: if `y` is not real-valued (complex, string, boolean, object).
      ValueError: if the shape differs from `event_shape`, or `y` has NaN or Inf
        entries.
    """
    event_shape = self.event_shape
    what = f"the output shape of {self._operator!r}"
    if tf.is_tensor(y) and not hasattr(y, "numpy"):
      if not (y.dtype.is_floating or y.dtype.is_integer):
        raise TypeError(f"`{name}` must be a real floating-point array, got dtype "
                        f"{y.dtype.name}.")
      if not _shape_matches(y.shape, event_shape, allow_batch):
        raise ValueError(f"`{name}` must have shape {_expected(event_shape, allow_batch)}, "
                         f"{what}, got {_format_shape(y.shape)}.")
      return tf.cast(y, self._dtype)
    if tf.is_tensor(y) or isinstance(y, tf.Variable):
      if not (y.dtype.is_floating or y.dtype.is_integer):
        raise TypeError(f"`{name}` must be a real floating-point array, got dtype "
                        f"{y.dtype.name}.")
      arr = np.asarray(y.numpy())
    else:
      try:
        arr = np.asarray(y)
      except ValueError as e:
        raise ValueError(f"`{name}` must be a rectangular array of shape "
                         f"{_format_shape(event_shape)}, {what}: {e}") from None
      if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or
                                   np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"`{name}` must be a real floating-point array, got dtype "
                        f"{arr.dtype}.")
    if not _shape_matches(tf.TensorShape(arr.shape), event_shape, allow_batch):
      raise ValueError(f"`{name}` must have shape {_expected(event_shape, allow_batch)}, "
                       f"{what}, got {list(arr.shape)}.")
    num_bad = int(np.sum(~np.isfinite(arr)))
    if num_bad:
      raise ValueError(
          f"`{name}` must be finite, got {num_bad} NaN or Inf entries of {arr.size}.")
    return tf.constant(arr, dtype=self._dtype, name=name)

  def __repr__(self):
    return f"{type(self).__name__}(operator={self._operator!r})"


class _ScaledLikelihood(Likelihood):
  """A likelihood with constant positive noise parameters that broadcast to `y`.

  The parameters are kept as the NumPy arrays given and enter as constants of the
  likelihood's dtype (re-created from those arrays when the dtype follows the prior).
  """

  _parameter_names = ()

  def __init__(self, operator, noise_fn, values, name=None, dtype=None):
    # The noise parameters are checked first: their errors do not depend on the operator.
    self._values = {k: _positive_array(values[k], k) for k in self._parameter_names}
    self._constants = {}
    super().__init__(operator, noise_fn, name=name, dtype=dtype)

  def _set_dtype(self, dtype):
    super()._set_dtype(dtype)
    with tf.init_scope():
      self._constants = {k: tf.constant(v, dtype=dtype, name=k)
                         for k, v in self._values.items()}

  def _check_event_shape(self, event_shape):
    for name in self._parameter_names:
      shape = tuple(self._values[name].shape)
      event = tuple(event_shape.as_list())
      try:
        broadcast = np.broadcast_shapes(shape, event)
      except ValueError:
        broadcast = None
      if broadcast != event:
        raise ValueError(
            f"`{name}` of shape {list(shape)} must broadcast to the output shape "
            f"{list(event)} of {self._operator!r}.")

  def _param(self, name, loc):
    """The parameter `name` as a constant of `loc`'s dtype."""
    value = self._constants[name]
    if value.dtype == loc.dtype:
      return value
    return tf.constant(self._values[name], dtype=loc.dtype, name=name)


class Gaussian(_ScaledLikelihood):
  """Additive Gaussian noise: `p(y | x) = prod_i N(y_i; A(x)_i, scale_i^2)`.

  With a `Mask` operator and a small `scale` this is hard conditioning on the
  observed entries, smoothed.

  #### Examples

  ```python
  from tfp_composed import likelihoods, operators

  A = operators.Downsample(4, input_shape=[28, 28, 1])
  likelihood = likelihoods.Gaussian(A, scale=0.05)
  y = likelihood.check_observation(y_observed)   # [7, 7, 1]
  likelihood.log_prob(y, x)                      # x: [16, 28, 28, 1] -> [16]
  ```
  """

  _parameter_names = ("scale",)

  def __init__(self, operator, scale, name=None, dtype=None):
    """Creates the observation model.

    Args:
      operator: a `ForwardOperator`, the map `A`.
      scale: positive finite float, or array broadcasting to `operator.output_shape`,
        the noise standard deviation.
      name: Python `str` name of the module.
      dtype: floating dtype of `scale` and of checked observations; `None` follows the
        prior it is built on (see `Likelihood`).
    """
    super().__init__(operator, self._normal, dict(scale=scale), name=name, dtype=dtype)

  @property
  def scale(self):
    """Noise standard deviation, a constant `tf.Tensor` of `dtype`."""
    return self._constants["scale"]

  def _normal(self, loc):
    return tfd.Normal(loc=loc, scale=self._param("scale", loc))


class Laplace(_ScaledLikelihood):
  """Laplace noise: `p(y | x) = prod_i exp(-|y_i - A(x)_i| / b_i) / (2 b_i)`, `b = scale`.

  #### Examples

  ```python
  likelihood = likelihoods.Laplace(operators.Identity(input_shape=[10]), scale=0.1)
  likelihood.log_prob(y, x)   # x: [4, 10] -> [4]
  ```
  """

  _parameter_names = ("scale",)

  def __init__(self, operator, scale, name=None, dtype=None):
    """Creates the observation model.

    Args:
      operator: a `ForwardOperator`, the map `A`.
      scale: positive finite float, or array broadcasting to `operator.output_shape`.
      name: Python `str` name of the module.
      dtype: floating dtype of `scale` and of checked observations; `None` follows the
        prior it is built on (see `Likelihood`).
    """
    super().__init__(operator, self._laplace, dict(scale=scale), name=name, dtype=dtype)

  @property
  def scale(self):
    """Noise scale `b`, a constant `tf.Tensor` of `dtype`."""
    return self._constants["scale"]

  def _laplace(self, loc):
    return tfd.Laplace(loc=loc, scale=self._param("scale", loc))


class StudentT(_ScaledLikelihood):
  """Heavy-tailed noise: `p(y | x) = prod_i StudentT(y_i; df_i, A(x)_i, scale_i)`.

  #### Examples

  ```python
  likelihood = likelihoods.StudentT(operators.Identity(input_shape=[10]), df=3., scale=0.1)
  likelihood.log_prob(y, x)   # x: [4, 10] -> [4]
  ```
  """

  _parameter_names = ("df", "scale")

  def __init__(self, operator, df, scale=1., name=None, dtype=None):
    """Creates the observation model.

    Args:
      operator: a `ForwardOperator`, the map `A`.
      df: positive finite float, or array broadcasting to `operator.output_shape`,
        the degrees of freedom.
      scale: positive finite float, or array broadcasting to `operator.output_shape`.
      name: Python `str` name of the module.
      dtype: floating dtype of `df`, `scale` and of checked observations; `None`
        follows the prior it is built on (see `Likelihood`).
    """
    super().__init__(operator, self._student_t, dict(df=df, scale=scale), name=name,
                     dtype=dtype)

  @property
  def df(self):
    """Degrees of freedom, a constant `tf.Tensor` of `dtype`."""
    return self._constants["df"]

  @property
  def scale(self):
    """Noise scale, a constant `tf.Tensor` of `dtype`."""
    return self._constants["scale"]

  def _student_t(self, loc):
    return tfd.StudentT(df=self._param("df", loc), loc=loc, scale=self._param("scale", loc))
