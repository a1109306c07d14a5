"""Tests for `tfp_composed.tasks`: every task on 28x28x1 and 8x8x1, noise levels, masks, closed forms.

Statistical checks use 5 standard errors of the Monte Carlo estimate (a false alarm about once in
1.7 million runs per check); every seed is fixed, so the outcomes are deterministic.
"""

import numpy as np
import pytest
import scipy.special
import scipy.stats
import tensorflow as tf

from tfp_composed import tasks

SHAPES = [(28, 28, 1), (8, 8, 1)]
GAUSSIAN_TASKS = [name for name in tasks.TASKS if name != "quantize_1bit"]
MASK_TASKS = ["inpaint_lower_half", "inpaint_center", "inpaint_random_90"]


def _image(shape, seed=0):
  return np.random.default_rng(seed).uniform(0.02, 0.98, size=shape).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES, ids=["28x28x1", "8x8x1"])
@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_every_task_builds_and_observes(name, shape):
  task = tasks.get(name, image_shape=list(shape), seed=0)
  assert task.name == name and task.image_shape == shape
  x = _image(shape)
  y = task.observe(x, seed=3)
  assert tuple(y.shape) == task.observation_shape == tuple(task.likelihood.event_shape)
  assert y.dtype == tf.float32
  np.testing.assert_array_equal(y.numpy(), task.observe(x, seed=3).numpy())
  assert not np.array_equal(y.numpy(), task.observe(x, seed=4).numpy())
  log_p = task.likelihood.log_prob(y, x[None]).numpy()
  assert log_p.shape == (1,) and np.isfinite(log_p).all()
  assert task.unobserved_mask.shape == shape and task.unobserved_mask.dtype == bool
  if name not in MASK_TASKS:
    assert task.unobserved_mask.all()
  assert f"{task.noise_scale:g}" in task.description
  assert task.observation_image(y).shape == shape
  batch = task.observe(np.stack([x, x]), seed=3)
  assert tuple(batch.shape) == (2,) + task.observation_shape


@pytest.mark.parametrize("shape", SHAPES, ids=["28x28x1", "8x8x1"])
@pytest.mark.parametrize("name", GAUSSIAN_TASKS)
def test_gaussian_noise_has_the_stated_level(name, shape):
  task = tasks.get(name, image_shape=list(shape))
  expected = tasks.DENOISE_NOISE if name == "denoise" else tasks.MASK_NOISE
  assert task.noise_scale == expected
  x = _image(shape, seed=1)
  n = 256
  y = task.observe(np.broadcast_to(x, (n,) + shape), seed=7).numpy()
  z = ((y - task.operator(x[None]).numpy()) / expected).ravel()
  # Standard errors: 1 / sqrt(N) for the mean, 1 / sqrt(2N) for the standard deviation.
  assert abs(z.mean()) < 5. / np.sqrt(z.size)
  assert abs(z.std() - 1.) < 5. / np.sqrt(2. * z.size)


@pytest.mark.parametrize("shape", SHAPES, ids=["28x28x1", "8x8x1"])
def test_masks_miss_the_stated_pixels(shape):
  h, w, _ = shape
  lower = tasks.get("inpaint_lower_half", image_shape=shape).unobserved_mask
  assert lower.mean() == 0.5 and lower[h // 2:].all() and not lower[:h // 2].any()
  center = tasks.get("inpaint_center", image_shape=shape).unobserved_mask
  assert center.mean() == 0.25
  rows, cols = np.nonzero(center[..., 0])
  assert (rows.min(), rows.max() + 1) == (h // 4, h // 4 + h // 2)
  assert (cols.min(), cols.max() + 1) == (w // 4, w // 4 + w // 2)
  random = tasks.get("inpaint_random_90", image_shape=shape, seed=0).unobserved_mask
  assert random.sum() == round(0.9 * h * w)
  assert abs(random.mean() - 0.9) < 1. / (h * w)
  np.testing.assert_array_equal(
      random, tasks.get("inpaint_random_90", image_shape=shape, seed=0).unobserved_mask)
  assert not np.array_equal(
      random, tasks.get("inpaint_random_90", image_shape=shape, seed=1).unobserved_mask)
  for name in MASK_TASKS:
    task = tasks.get(name, image_shape=shape)
    np.testing.assert_array_equal(task.operator.mask, ~task.unobserved_mask)
    image = task.observation_image(task.observe(_image(shape), seed=0))
    np.testing.assert_array_equal(np.isnan(image), task.unobserved_mask)


def test_sizes_scale_with_the_image():
  assert tasks.get("compressed_sensing_m50").num_measurements == 50
  assert tasks.get("compressed_sensing_m200").num_measurements == 200
  assert tasks.get("compressed_sensing_m50", image_shape=[8, 8, 1]).num_measurements == 4
  assert tasks.get("compressed_sensing_m200", image_shape=[8, 8, 1]).num_measurements == 16
  assert tasks.get("super_resolution_4x").observation_shape == (7, 7, 1)
  assert tasks.get("super_resolution_2x", image_shape=[8, 8, 1]).observation_shape == (4, 4, 1)
  matrix = tasks.get("compressed_sensing_m50", seed=0).operator.matrix
  np.testing.assert_array_equal(matrix, tasks.get("compressed_sensing_m50", seed=0).operator.matrix)
  assert not np.array_equal(matrix, tasks.get("compressed_sensing_m50", seed=1).operator.matrix)


def test_super_resolution_display_repeats_each_low_resolution_pixel():
  task = tasks.get("super_resolution_4x", image_shape=[8, 8, 1])
  y = np.array([[1., 2.], [3., 4.]], np.float32)[..., None]
  image = task.observation_image(y)
  np.testing.assert_array_equal(image[:4, :4], 1.)
  np.testing.assert_array_equal(image[4:, 4:], 4.)


def test_saturation_log_prob_matches_the_closed_form():
  task = tasks.get("saturation", image_shape=[8, 8, 1])
  x = np.stack([_image([8, 8, 1], seed=s) for s in range(3)])
  y = task.observe(x[0], seed=0).numpy()
  k = tasks.SATURATION_GAIN
  loc = np.tanh(k * x.astype(np.float64)) / np.tanh(k)
  expected = scipy.stats.norm.logpdf(y, loc, tasks.MASK_NOISE).sum(axis=(1, 2, 3))
  np.testing.assert_allclose(task.likelihood.log_prob(y, x).numpy(), expected, rtol=1e-5)
  # Its display inverts the sensor where it is not saturated.
  x_mid = np.full([8, 8, 1], 0.3, np.float32)
  np.testing.assert_allclose(task.observation_image(task.operator(x_mid[None]).numpy()[0]),
                             x_mid, atol=1e-5)


def test_quantizer_log_prob_and_frequencies_match_the_closed_form():
  task = tasks.get("quantize_1bit", image_shape=[8, 8, 1])
  t, s = tasks.QUANTIZER_THRESHOLD, tasks.QUANTIZER_DITHER
  x = np.linspace(0.3, 0.7, 64).reshape(8, 8, 1).astype(np.float32)
  y = task.observe(x, seed=0).numpy()
  assert set(np.unique(y)) <= {0., 1.}
  u = (x.astype(np.float64) - t) / s
  expected = np.sum(y * scipy.special.log_expit(u) + (1. - y) * scipy.special.log_expit(-u))
  np.testing.assert_allclose(task.likelihood.log_prob(y, x[None]).numpy(), [expected], rtol=1e-5)
  n = 4000
  freq = task.observe(np.broadcast_to(x, (n, 8, 8, 1)), seed=1).numpy().mean(axis=0)
  p = scipy.special.expit(u)
  # Binomial standard error per pixel, floored at one count for the extreme pixels.
  se = np.sqrt(np.maximum(p * (1. - p), 1. / n) / n)
  assert np.all(np.abs(freq - p) < 5. * se)


def test_bad_arguments_name_the_argument_and_echo_the_value():
  with pytest.raises(ValueError, match=r"`name` must be one of .*'inpaint_upper'"):
    tasks.get("inpaint_upper")
  with pytest.raises(ValueError, match=r"`image_shape` must be \[H, W, C\].*\[28, 28\]"):
    tasks.get("denoise", image_shape=[28, 28])
  with pytest.raises(ValueError, match=r"`seed` must be an integer.*1.5"):
    tasks.get("denoise", seed=1.5)
  with pytest.raises(ValueError, match="divisible by 4"):
    tasks.get("super_resolution_4x", image_shape=[6, 6, 1])
  task = tasks.get("denoise", image_shape=[8, 8, 1])
  with pytest.raises(ValueError, match=r"`x_true` must have trailing shape \[8, 8, 1\].*\[28, 28, 1\]"):
    task.observe(np.zeros([28, 28, 1]), seed=0)
