"""Mode axes (`tfc.initialization.mode_axes`): the directions that separate independent modes."""

import time

import numpy as np
import pytest

import tfp_composed as tfc
from tfp_composed import initialization


def _corners(axes, lengths, probs, num_points, seed=0, noise=1e-4):
  """End points `c + sum_b s_b l_b a_b`, `s_b ~ Bernoulli(p_b)`, with a little noise."""
  rng = np.random.RandomState(seed)
  bits = rng.uniform(size=[num_points, len(probs)]) < np.asarray(probs)
  centre = rng.randn(axes.shape[0])
  return centre + (bits * lengths) @ axes.T + noise * rng.randn(num_points, axes.shape[0])


def _turned(size, num_factors, seed=1):
  q, _ = np.linalg.qr(np.random.RandomState(seed).randn(size, size))
  return q[:, :num_factors]


def test_recurring_differences_are_the_factors_displacements():
  # 4 binary factors along turned axes of a 10-D latent (16 joint modes, unequal masses):
  # every displacement is found to cosine 0.999 (noise 1e-4 against lengths of 2 or more).
  axes = _turned(10, 4)
  points = _corners(axes, [2., 2.5, 3., 3.5], [0.5, 0.3, 0.7, 0.2], 80)
  found = initialization._recurring_differences(points)  # pylint: disable=protected-access
  assert found.shape == (10, 4)
  cosines = np.abs(axes.T @ found)
  np.testing.assert_array_less(0.999, cosines.max(axis=1))
  assert len(set(cosines.argmax(axis=1))) == 4  # One column per factor.
  rotation = initialization._complete_near_identity(found)  # pylint: disable=protected-access
  np.testing.assert_allclose(rotation.T @ rotation, np.eye(10), atol=1e-10)
  np.testing.assert_array_less(0.999, np.abs(axes.T @ rotation).max(axis=1))


def test_axis_aligned_factors_keep_the_identity():
  # The same factors along coordinate axes: the identity already separates the modes.
  axes = np.eye(10)[:, [1, 4, 6, 9]]
  points = _corners(axes, [2., 2.5, 3., 3.5], [0.5, 0.3, 0.7, 0.2], 80)
  found = initialization._recurring_differences(points)  # pylint: disable=protected-access
  np.testing.assert_array_less(0.999, np.abs(found).max(axis=0))
  assert initialization._complete_near_identity(found) is None  # pylint: disable=protected-access


@pytest.mark.parametrize("points", [
    np.array([[0., 0.], [3., 0.1], [1., 2.]]),  # Three modes, no difference recurs.
    np.zeros([20, 3]),                         # One mode.
    np.ones([2, 3]),                           # Too few points.
])
def test_no_recurring_difference_gives_no_axes(points):
  assert initialization._recurring_differences(points) is None  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def turned_blocks():
  return tfc.problems.latent_rotated_bimodal_blocks(num_blocks=2, grid_size=64)


def _stage_axes(posterior):
  return tfc.pregenerators.find_affine_stage(posterior.pregenerator).axes.numpy()


def test_the_start_turns_the_axes_onto_the_modes(turned_blocks):
  # 2 bimodal blocks along turned latent axes: the start finds several modes, and the
  # stage's axes hold both blocks' bimodal axes `R^T e_{2b-1}` (cosine above 0.99).
  posterior = tfc.ComposedPosterior(turned_blocks.prior, turned_blocks.likelihood,
                                    turned_blocks.observation)
  posterior.initialize(seed=0)
  assert posterior.modes_found > 1
  turned = turned_blocks.latent_rotation.T[:, 0::2]
  np.testing.assert_array_less(0.99, np.abs(turned.T @ _stage_axes(posterior)).max(axis=1))
  assert posterior.start_modes.shape[0] > 4 * 4  # The axes' ascents are checked too.


def test_out_of_time_the_axes_stay_the_identity(turned_blocks, monkeypatch):
  def late(*args, **kwargs):
    raise initialization.SearchTimeout("late")
  monkeypatch.setattr(initialization, "mode_axes", late)
  posterior = tfc.ComposedPosterior(turned_blocks.prior, turned_blocks.likelihood,
                                    turned_blocks.observation)
  posterior.initialize(seed=0, deadline=time.perf_counter() + 600.)
  assert posterior.modes_found > 1 and bool(posterior.initialized.numpy())
  np.testing.assert_array_equal(_stage_axes(posterior), np.eye(4))


def test_the_ascent_in_chunks_is_the_ascent_in_one_call():
  # The deadline is checked between compiled chunks of the ascent; chunking changes nothing.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  target = initialization._Compiled(  # pylint: disable=protected-access
      lambda z: -tf.reduce_sum((z - 1.)**2 * tf.constant([1., 100.]), axis=-1), 2, tf.float32)
  starts = tf.constant(np.random.RandomState(0).randn(5, 2), tf.float32)
  whole = initialization._ascend(target, starts, 250, chunk=250)  # pylint: disable=protected-access
  parts = initialization._ascend(target, starts, 250, chunk=100)  # pylint: disable=protected-access
  np.testing.assert_allclose(parts[0], whole[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(whole[0], np.ones([5, 2]), atol=1e-2)
  with pytest.raises(initialization.SearchTimeout, match="during the ascent"):
    initialization._ascend(target, starts, 250, deadline=0.)  # pylint: disable=protected-access


class _Clock:
  """A fake search clock: each compiled Adam chunk takes `per_step` seconds a step."""

  def __init__(self, compiled, per_step):
    self.time, self.calls = 0., 0
    steps = compiled.adam_steps

    def timed(z, m, v, first, count, *args):
      self.calls += 1
      self.time += per_step * int(count)
      return steps(z, m, v, first, count, *args)

    compiled.adam_steps = timed

  def __call__(self):
    return self.time


def test_an_ascent_that_cannot_finish_stops_at_once(monkeypatch):
  # 1000 steps at 10 ms a step need 10 s: with 5 s to the deadline the ascent gives up after
  # the first chunk that did not trace, at 1 s (2 s when its first chunk traced), instead of
  # climbing to the deadline; with 20 s it runs to the end.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  target = initialization._Compiled(  # pylint: disable=protected-access
      lambda z: -tf.reduce_sum((z - 1.)**2, axis=-1), 2, tf.float32)
  clock = _Clock(target, per_step=0.01)
  monkeypatch.setattr(initialization, "_now", clock)
  starts = tf.zeros([3, 2])
  with pytest.raises(initialization.SearchTimeout, match="would pass its deadline"):
    initialization._ascend(target, starts, 1000, deadline=5.)  # pylint: disable=protected-access
  assert clock.calls == 2 and clock.time == pytest.approx(2.)  # The first chunk traced.
  clock.time, clock.calls = 0., 0
  with pytest.raises(initialization.SearchTimeout, match="would pass its deadline"):
    initialization._ascend(target, starts, 1000, deadline=5.)  # pylint: disable=protected-access
  assert clock.calls == 1 and clock.time == pytest.approx(1.)  # Traced before: one chunk.
  clock.time, clock.calls = 0., 0
  z, _ = initialization._ascend(target, starts, 1000, deadline=20.)  # pylint: disable=protected-access
  assert clock.calls == 10
  np.testing.assert_allclose(z, np.ones([3, 2]), atol=1e-2)


def test_the_start_is_the_same_at_every_call_in_a_process(turned_blocks):
  # Its starting draws come from stateless seeds: a second search in the same process
  # (as in a test session or a grid of fits) finds the same end points as the first.
  target = tfc.targets.LatentTarget(turned_blocks.prior, turned_blocks.likelihood,
                                    turned_blocks.observation)
  first = initialization.find_modes(target, 2, seed=3)
  axes_first, points_first = initialization.mode_axes(target, first, seed=3)
  # The search's functions are traced once per target, for any number of rows: the second
  # search and the axes' ascents (8 D starts instead of 16) trace nothing new.
  compiled = initialization._compiled(target)  # pylint: disable=protected-access
  functions = (compiled.value, compiled.curvature, compiled.adam_steps)
  traces = [f.experimental_get_tracing_count() for f in functions]
  assert traces == [1, 1, 1]
  second = initialization.find_modes(target, 2, seed=3)
  np.testing.assert_array_equal(first.ascents, second.ascents)
  axes_second, points_second = initialization.mode_axes(target, second, seed=3)
  assert [f.experimental_get_tracing_count() for f in functions] == traces
  np.testing.assert_array_equal(points_first, points_second)
  np.testing.assert_array_equal(axes_first, axes_second)


def test_curvature_gives_the_rows_gradients_and_hessian_vector_products():
  # Rows of t(z) = -z^T A z / 2 + b^T z (A symmetric, per-row independent): gradient
  # b - A z, Hessian -A, so H v = -A v exactly (float64, to rounding).
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  a = rng.randn(3, 3)
  a = a @ a.T + np.eye(3)
  b = rng.randn(3)
  target = lambda z: -0.5 * tf.einsum("ni,ij,nj->n", z, a, z) + tf.linalg.matvec(z, b)
  points, vectors = rng.randn(4, 3), rng.randn(2, 3)
  grad, hv = initialization._curvature(  # pylint: disable=protected-access
      target, tf.constant(points), tf.constant(vectors))
  np.testing.assert_allclose(grad.numpy(), b - points @ a, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(hv.numpy(), np.broadcast_to(-vectors @ a, (4, 2, 3)),
                             rtol=1e-12, atol=1e-12)
  grad_only, none = initialization._curvature(  # pylint: disable=protected-access
      target, tf.constant(points), tf.zeros([0, 3], tf.float64))
  np.testing.assert_allclose(grad_only.numpy(), b - points @ a, rtol=1e-12, atol=1e-12)
  assert none.shape == (4, 0, 3)
