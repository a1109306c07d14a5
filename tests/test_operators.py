"""Tests for `tfp_composed.operators`.

Every property test is parametrized over one registry of named operator constructors:
a new operator is tested by adding one line to `OPERATORS`. Linear-algebra identities
(linearity, adjoint, dense matrix) are checked in float64 so that a tolerance of
`rtol=1e-10` separates a correct adjoint from an almost-correct one.
"""

import re

import numpy as np
import pytest
import scipy.signal
import tensorflow as tf

from tfp_composed import operators as ops

_RNG = np.random.default_rng(0)
_MASK = _RNG.random([8, 8, 1]) < 0.4
_MATRIX = _RNG.normal(size=[4, 5])
_MATRIX_IMAGE = _RNG.normal(size=[3, 12])
_KERNEL_ODD = _RNG.normal(size=[3, 3])
_KERNEL_EVEN = _RNG.normal(size=[4, 2])

OPERATORS = {
    "identity": lambda: ops.Identity(input_shape=[5]),
    "mask": lambda: ops.Mask(_MASK),
    "downsample": lambda: ops.Downsample(2, input_shape=[8, 8, 1]),
    "downsample_2d": lambda: ops.Downsample(3, input_shape=[6, 6]),
    "linear": lambda: ops.Linear(_MATRIX),
    "linear_image": lambda: ops.Linear(_MATRIX_IMAGE, input_shape=[2, 2, 3]),
    "gaussian_measurement": lambda: ops.GaussianMeasurement(7, seed=1, input_shape=[6, 6, 3]),
    "blur_odd": lambda: ops.Blur(_KERNEL_ODD, input_shape=[6, 6, 3]),
    "blur_even_2d": lambda: ops.Blur(_KERNEL_EVEN, input_shape=[6, 5]),
    "grayscale": lambda: ops.Grayscale(input_shape=[6, 6, 3]),
    "lambda": lambda: ops.Lambda(lambda x: tf.tanh(x[:, :3] * x[:, 1:4]), input_shape=[5]),
    "lambda_image": lambda: ops.Lambda(
        lambda x: tf.reduce_mean(tf.square(x), axis=-1), input_shape=[6, 6, 3]),
}
LINEAR = [name for name, make in OPERATORS.items() if make().is_linear]
BATCH_SHAPES = [(), (3,), (2, 3)]


def _random(shape, dtype=np.float64, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def _dense_matrix(op):
  """`A` as a dense `[m, n]` matrix, built column by column from unit vectors."""
  n = op.input_shape.num_elements()
  units = np.eye(n).reshape([n] + op.input_shape.as_list())
  return op(units).numpy().reshape([n, -1]).T


def test_registry_is_nonempty_and_has_linear_and_nonlinear():
  assert set(LINEAR) < set(OPERATORS)
  assert len(LINEAR) >= 8


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES)
@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_output_shape_with_batch_dims(name, batch_shape):
  op = OPERATORS[name]()
  x = _random(batch_shape + tuple(op.input_shape), np.float32)
  y = op(x)
  assert y.dtype == tf.float32
  assert y.shape == tf.TensorShape(batch_shape).concatenate(op.output_shape)
  if batch_shape:
    # The operator acts on each batch member alone.
    index = (0,) * len(batch_shape)
    np.testing.assert_allclose(op(x[index]).numpy(), y.numpy()[index], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_follows_input_dtype(name):
  op = OPERATORS[name]()
  x = _random(tuple(op.input_shape))
  assert op(x).dtype == tf.float64
  assert op(tf.constant(x, tf.float32)).dtype == tf.float32
  assert op(x.astype(np.float16)).dtype == tf.float16


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_works_inside_tf_function_with_unknown_batch(name):
  op = OPERATORS[name]()
  x = _random((2, 3) + tuple(op.input_shape), np.float32)
  expected = op(x).numpy()
  np.testing.assert_allclose(tf.function(op)(x).numpy(), expected, rtol=1e-5, atol=1e-6)
  spec = tf.TensorSpec([None] + op.input_shape.as_list(), tf.float32)
  fn = tf.function(op, input_signature=[spec])
  flat = x.reshape([-1] + op.input_shape.as_list())
  result = fn(flat)
  np.testing.assert_allclose(
      result.numpy(), expected.reshape(result.shape), rtol=1e-5, atol=1e-6)
  traced = fn.get_concrete_function().structured_outputs
  assert traced.shape.as_list() == [None] + op.output_shape.as_list()


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_gradient_exists_and_is_finite(name):
  op = OPERATORS[name]()
  x = tf.constant(_random((3,) + tuple(op.input_shape)))
  w = tf.constant(_random((3,) + tuple(op.output_shape), seed=1))
  with tf.GradientTape() as tape:
    tape.watch(x)
    value = tf.reduce_sum(op(x) * w)
  grad = tape.gradient(value, x)
  assert grad is not None
  assert grad.shape == x.shape
  assert np.all(np.isfinite(grad.numpy()))
  if op.is_linear:
    # For linear `A`, d<A x, w>/dx = A^T w: the explicit adjoint agrees with autodiff.
    np.testing.assert_allclose(grad.numpy(), op.adjoint(w).numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", LINEAR)
def test_linearity(name):
  op = OPERATORS[name]()
  shape = (2,) + tuple(op.input_shape)
  x1, x2 = _random(shape, seed=1), _random(shape, seed=2)
  a, b = 1.7, -0.3
  lhs = op(a * x1 + b * x2).numpy()
  rhs = a * op(x1).numpy() + b * op(x2).numpy()
  np.testing.assert_allclose(lhs, rhs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", LINEAR)
def test_adjoint_identity(name):
  # float64 so that rtol=1e-10 is meaningful: <A x, y> == <x, A^T y>.
  op = OPERATORS[name]()
  x = _random((4,) + tuple(op.input_shape), seed=3)
  y = _random((4,) + tuple(op.output_shape), seed=4)
  ax, aty = op(x), op.adjoint(y)
  assert ax.dtype == aty.dtype == tf.float64
  assert aty.shape == x.shape
  axes = tuple(range(1, x.ndim))
  lhs = np.sum(ax.numpy() * y, axis=tuple(range(1, y.ndim)))
  rhs = np.sum(x * aty.numpy(), axis=axes)
  np.testing.assert_allclose(lhs, rhs, rtol=1e-10)


@pytest.mark.parametrize("name", LINEAR)
def test_adjoint_batch_dims(name):
  op = OPERATORS[name]()
  for batch_shape in BATCH_SHAPES:
    y = _random(batch_shape + tuple(op.output_shape))
    assert op.adjoint(y).shape == tf.TensorShape(batch_shape).concatenate(op.input_shape)


@pytest.mark.parametrize("name", LINEAR)
def test_matches_dense_matrix_and_adjoint_matches_transpose(name):
  op = OPERATORS[name]()
  dense = _dense_matrix(op)
  m, n = op.output_shape.num_elements(), op.input_shape.num_elements()
  assert dense.shape == (m, n)
  x = _random((3, n), seed=5)
  np.testing.assert_allclose(
      op(x.reshape([3] + op.input_shape.as_list())).numpy().reshape([3, m]), x @ dense.T,
      rtol=1e-10, atol=1e-12)
  # Rows of the adjoint applied to unit vectors of the output are the columns of M^T.
  units = np.eye(m).reshape([m] + op.output_shape.as_list())
  adjoint_dense = op.adjoint(units).numpy().reshape([m, n]).T
  np.testing.assert_allclose(adjoint_dense, dense.T, rtol=1e-10, atol=1e-12)
  if isinstance(op, ops.Linear):
    np.testing.assert_allclose(dense, op.matrix, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(set(OPERATORS) - set(LINEAR)))
def test_nonlinear_operators_have_no_adjoint(name):
  op = OPERATORS[name]()
  with pytest.raises(NotImplementedError, match="not a linear operator"):
    op.adjoint(np.zeros(op.output_shape))


# ---------------------------------------------------------------------------
# Concrete values.


def test_mask_picks_observed_entries_in_row_major_order():
  mask = np.zeros([3, 4, 2], bool)
  mask[0, 1, 1] = mask[2, 0, 0] = mask[1, 3, 0] = True
  op = ops.Mask(mask)
  assert op.num_observed == 3
  assert op.output_shape == [3]
  x = np.arange(24.).reshape([3, 4, 2])
  np.testing.assert_array_equal(op(x).numpy(), [3., 14., 16.])
  np.testing.assert_array_equal(op(x).numpy(), x[mask])
  np.testing.assert_array_equal(op.mask, mask)


def test_mask_accepts_zero_one_arrays_and_fills():
  op = ops.Mask(np.array([[1, 0], [0, 1]]))
  np.testing.assert_array_equal(op([[1., 2.], [3., 4.]]).numpy(), [1., 4.])
  filled = op.fill([[5., 6.], [7., 8.]], fill_value=np.nan).numpy()
  np.testing.assert_array_equal(filled[:, 0, 0], [5., 7.])
  assert np.all(np.isnan(filled[:, [0, 1], [1, 0]]))
  np.testing.assert_array_equal(op.fill([5., 6.]).numpy(), op.adjoint([5., 6.]).numpy())


def test_downsample_known_values():
  x = np.arange(16.).reshape([4, 4])
  expected = np.array([[2.5, 4.5], [10.5, 12.5]])
  np.testing.assert_allclose(ops.Downsample(2, input_shape=[4, 4])(x).numpy(), expected)
  images = np.stack([x, 10. * x], axis=-1)
  out = ops.Downsample(2, input_shape=[4, 4, 2])(images).numpy()
  np.testing.assert_allclose(out, np.stack([expected, 10. * expected], axis=-1))
  np.testing.assert_allclose(ops.Downsample(4).build([4, 4])(x).numpy(), [[7.5]])


def test_grayscale_weights():
  op = ops.Grayscale()
  x = np.zeros([2, 1, 3], np.float32)
  x[0, 0] = [1., 0., 0.]
  x[1, 0] = [1., 1., 1.]
  y = op(x).numpy()   # Unbound: builds from the last three dims of `x`.
  assert op.input_shape == [2, 1, 3] and y.shape == (2, 1, 1)
  np.testing.assert_allclose(y[:, 0, 0], [0.299, 1.], rtol=1e-6)
  custom = ops.Grayscale(weights=[0.5, 2.], input_shape=[1, 1, 2])
  np.testing.assert_allclose(custom([[[3., 4.]]]).numpy(), [[[9.5]]])


@pytest.mark.parametrize("kernel_shape", [(1, 1), (3, 3), (2, 2), (4, 3)])
def test_blur_delta_kernel_is_identity(kernel_shape):
  kernel = np.zeros(kernel_shape)
  kernel[(kernel_shape[0] - 1) // 2, (kernel_shape[1] - 1) // 2] = 1.   # The centre tap.
  x = _random([5, 6, 2])
  np.testing.assert_allclose(ops.Blur(kernel, input_shape=[5, 6, 2])(x).numpy(), x)


@pytest.mark.parametrize("kernel_shape", [(3, 3), (2, 2), (4, 3), (1, 5), (7, 7)])
def test_blur_matches_scipy_convolve2d_same(kernel_shape):
  kernel = _random(kernel_shape, seed=6)
  x = _random([5, 6, 2], seed=7)
  y = ops.Blur(kernel, input_shape=[5, 6, 2])(x).numpy()
  for c in range(2):
    np.testing.assert_allclose(
        y[..., c], scipy.signal.convolve2d(x[..., c], kernel, mode="same"),
        rtol=1e-12, atol=1e-12)


def test_blur_hand_computed_3x3():
  # Convolution flips the kernel: a tap right of the centre moves content right by one.
  kernel = np.array([[0., 0., 0.], [0., 0., 1.], [0., 0., 0.]])
  x = np.arange(9.).reshape([3, 3])
  expected = np.array([[0., 0., 1.], [0., 3., 4.], [0., 6., 7.]])
  np.testing.assert_allclose(ops.Blur(kernel, input_shape=[3, 3])(x).numpy(), expected)


def test_gaussian_measurement_is_deterministic_linear_with_right_variance():
  op = ops.GaussianMeasurement(50, seed=3, input_shape=[10, 20])
  assert isinstance(op, ops.Linear) and op.is_linear
  assert op.matrix.shape == (50, 200)
  np.testing.assert_array_equal(
      op.matrix, ops.GaussianMeasurement(50, seed=3).build([10, 20]).matrix)
  assert not np.allclose(op.matrix, ops.GaussianMeasurement(50, seed=4).build([200]).matrix)
  assert abs(np.var(op.matrix) * 50 - 1.) < 0.1
  assert abs(np.mean(op.matrix)) < 0.03


def test_lambda_infers_or_takes_output_shape():
  fn = lambda x: tf.reshape(x, [-1, 2, 3])   # noqa: E731
  inferred = ops.Lambda(fn, input_shape=[6])
  assert inferred.output_shape == [2, 3]
  assert not inferred.is_linear
  given = ops.Lambda(fn, output_shape=[2, 3]).build([3, 2])
  assert given(np.zeros([4, 3, 2])).shape == [4, 2, 3]


# ---------------------------------------------------------------------------
# Binding the input shape.


@pytest.mark.parametrize("make", [
    ops.Identity, lambda: ops.Downsample(2), lambda: ops.GaussianMeasurement(3),
    lambda: ops.Blur(np.ones([3, 3])), lambda: ops.Lambda(tf.identity), ops.Grayscale,
])
def test_output_shape_before_build_raises(make):
  op = make()
  assert op.input_shape is None and not op.built
  with pytest.raises(ValueError, match="no output shape yet.*input shape is not bound"):
    op.output_shape  # pylint: disable=pointless-statement


def test_unbound_operator_with_ambiguous_rank_refuses_to_guess():
  with pytest.raises(ValueError, match=r"`Downsample` cannot infer its input shape.*\[5, 8, 8\]"):
    ops.Downsample(2)(np.zeros([5, 8, 8]))
  with pytest.raises(ValueError, match="`Identity` cannot infer"):
    ops.Identity()(np.zeros([3]))


def test_build_is_idempotent_and_rejects_a_different_shape():
  op = ops.Downsample(2)
  assert op.build([4, 4, 1]) is op
  assert op.build(tf.TensorShape([4, 4, 1])) is op
  with pytest.raises(ValueError,
                     match=re.escape("bound to input shape [4, 4, 1], got input shape [4, 4, 3]")):
    op.build([4, 4, 3])
  with pytest.raises(ValueError, match="`input_shape` must be fully defined"):
    ops.Identity().build([None, 3])


# ---------------------------------------------------------------------------
# Errors name the argument and echo the bad value.


def test_wrong_input_shapes_are_reported():
  op = ops.Mask(np.ones([8, 8, 1], bool))
  with pytest.raises(ValueError,
                     match=re.escape("`x` must have trailing event shape [8, 8, 1], "
                                     "got shape [5, 8, 8]")):
    op(np.zeros([5, 8, 8]))
  with pytest.raises(ValueError, match=r"`Mask` has a mask of shape \[8, 8, 1\].*got \[8, 8, 3\]"):
    op.build([8, 8, 3])
  with pytest.raises(ValueError,
                     match=re.escape("`y` must have trailing event shape [64], got shape [2, 63]")):
    op.adjoint(np.zeros([2, 63]))
  with pytest.raises(ValueError,
                     match=re.escape("`Grayscale` expects input shape [H, W, 3], got [8, 8, 1]")):
    ops.Grayscale(input_shape=[8, 8, 1])
  with pytest.raises(ValueError,
                     match=re.escape("`Blur` expects input shape [H, W, C] or [H, W], got [8]")):
    ops.Blur(np.ones([2, 2]), input_shape=[8])


def test_mask_errors():
  with pytest.raises(ValueError, match="`mask` must observe at least one entry"):
    ops.Mask(np.zeros([4, 4], bool))
  with pytest.raises(ValueError, match="`mask` must be a boolean or 0/1 array, got value 2"):
    ops.Mask(np.array([0, 1, 2]))
  with pytest.raises(TypeError, match="`mask` must be a boolean or 0/1 array, got dtype <U1"):
    ops.Mask(np.array(["a"]))


def test_downsample_errors():
  with pytest.raises(ValueError,
                     match=re.escape("`factor`=3 needs H and W divisible by 3, "
                                     "got input shape [8, 8, 1]")):
    ops.Downsample(3, input_shape=[8, 8, 1])
  with pytest.raises(ValueError, match="`factor` must be a positive integer, got 2.5"):
    ops.Downsample(2.5)
  with pytest.raises(ValueError, match="`factor` must be a positive integer, got 0"):
    ops.Downsample(0)


def test_linear_errors():
  with pytest.raises(ValueError,
                     match=r"`matrix` of shape \[4, 5\].*5 elements, got \[2, 3\] with 6"):
    ops.Linear(_MATRIX, input_shape=[2, 3])
  with pytest.raises(ValueError, match=r"`matrix` must have 2 dimension\(s\), got shape \[3\]"):
    ops.Linear(np.ones(3))
  with pytest.raises(ValueError, match="`matrix` must be finite, got 1 NaN or Inf entries of 4"):
    ops.Linear(np.array([[1., np.nan], [0., 1.]]))
  with pytest.raises(ValueError, match="`num_measurements` must be a positive integer, got 0"):
    ops.GaussianMeasurement(0)
  with pytest.raises(ValueError, match="`seed` must be an integer or a pair of integers"):
    ops.GaussianMeasurement(3, seed=1.5)


def test_lambda_errors():
  with pytest.raises(TypeError, match="`fn` must be callable, got 3"):
    ops.Lambda(3)
  with pytest.raises(ValueError, match=r"`fn` must map a batch.*returned shape \[\]"):
    ops.Lambda(tf.reduce_sum, input_shape=[3])


def test_lambda_is_probed_at_build_even_with_an_output_shape():
  # A contradicting `output_shape` or a raising `fn` is found at build, not inside a trace.
  with pytest.raises(ValueError, match=r"`fn` must return shape \[N\] \+ `output_shape` = \[N\] \+ "
                                       r"\[3\]; on zeros of shape \[1, 2\] it returned shape "
                                       r"\[1, 2\]"):
    ops.Lambda(tf.identity, output_shape=[3], input_shape=[2])
  late = ops.Lambda(tf.identity, output_shape=[3])
  with pytest.raises(ValueError, match=r"`fn` must return shape \[N\] \+ `output_shape`"):
    late.build([2])

  def broken(x):
    return tf.linalg.matmul(x, tf.ones([5, 1]))  # Input has 2 columns, not 5.

  for output_shape in (None, [1]):
    with pytest.raises(ValueError, match=r"`fn` must map a batch \[N\] \+ input_shape to \[N\] \+ "
                                         r"output_shape; on zeros of shape \[1, 2\] \(float32\) it "
                                         r"raised InvalidArgumentError"):
      ops.Lambda(broken, output_shape=output_shape, input_shape=[2])
  with pytest.raises(TypeError, match=r"`fn` must return a floating tensor.*dtype int32"):
    ops.Lambda(lambda x: tf.cast(x, tf.int32), input_shape=[2])


def test_lambda_probe_dtype():
  matrix = tf.constant([[1.], [2.]], tf.float64)
  fn = lambda x: tf.linalg.matmul(x, matrix)  # noqa: E731  float64 inputs only.
  with pytest.raises(ValueError, match=r"\(float32\) it raised"):
    ops.Lambda(fn, input_shape=[2])
  op = ops.Lambda(fn, input_shape=[2], dtype=tf.float64)
  assert op.output_shape == [1]
  assert op(np.ones([3, 2])).dtype == tf.float64


def test_string_input_is_a_type_error():
  with pytest.raises(TypeError, match="`x` must be a real floating-point tensor, got dtype string"):
    ops.Identity(input_shape=[2])(tf.constant(["a", "b"]))
