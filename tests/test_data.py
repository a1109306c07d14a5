"""Tests for `tfp_composed.data`: IDX parsing, offline TFDS builders, dequantization, bits/dim.

Nothing here touches the network: the MNIST builder is exercised on tiny IDX files written to a
temporary directory, the pipeline on `tfds.testing.mock_data`.
"""

import os
import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import tensorflow_probability as tfp

from tfp_composed import data

tfd = tfp.distributions


def _write_idx(path, array):
  codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
  header = bytes([0, 0, codes[array.dtype], array.ndim])
  header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  with open(path, "wb") as f:
    f.write(header + array.tobytes())


def _tiny_mnist_dir(directory, num_train=6, num_test=4):
  rng = np.random.default_rng(0)
  for split, n in (("train", num_train), ("t10k", num_test)):
    _write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte"),
               rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
    _write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte"),
               np.arange(n, dtype=np.uint8) % 10)
  return directory


# ---------------------------------------------------------------------------
# IDX files and the offline MNIST builder.


def test_read_idx_round_trip(tmp_path):
  images = np.random.default_rng(1).integers(0, 256, size=(3, 5, 7), dtype=np.uint8)
  path = str(tmp_path / "x-idx3-ubyte")
  _write_idx(path, images)
  np.testing.assert_array_equal(data.read_idx(path), images)


def test_read_idx_rejects_bad_magic(tmp_path):
  path = str(tmp_path / "bad")
  with open(path, "wb") as f:
    f.write(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
  with pytest.raises(ValueError, match="not an IDX file"):
    data.read_idx(path)


def test_read_idx_rejects_truncated_file(tmp_path):
  path = str(tmp_path / "short")
  with open(path, "wb") as f:
    f.write(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"\x00\x01")
  with pytest.raises(ValueError, match=re.escape("shape (5,) but holds 2")):
    data.read_idx(path)


def test_mnist_local_builder_reads_manual_dir(tmp_path):
  (tmp_path / "manual").mkdir()
  manual = _tiny_mnist_dir(str(tmp_path / "manual"))
  builder = tfds.builder("mnist_local", data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual))
  test = list(tfds.as_numpy(builder.as_dataset(split="test")))
  assert len(test) == 4 and builder.info.splits["train"].num_examples == 6
  assert test[0]["image"].shape == (28, 28, 1) and test[0]["image"].dtype == np.uint8
  expected = data.read_idx(os.path.join(manual, "t10k-images-idx3-ubyte"))
  labels = data.read_idx(os.path.join(manual, "t10k-labels-idx1-ubyte"))
  for ex in test:  # TFDS may reorder examples; each must be one of the file's images.
    i = int(np.argmax([np.array_equal(ex["image"][..., 0], e) for e in expected]))
    np.testing.assert_array_equal(ex["image"][..., 0], expected[i])
    assert ex["label"] == labels[i]


def test_fetch_mnist_uses_existing_files_without_network(tmp_path):
  directory = _tiny_mnist_dir(str(tmp_path))
  assert data.fetch_mnist(directory) == directory


# ---------------------------------------------------------------------------
# Pipelines.


def test_load_and_pipeline_with_mock_data():
  with tfds.testing.mock_data(num_examples=10):
    ds = data.load("mnist", split="train")
    batch = next(iter(data.image_pipeline(ds, levels=256, batch_size=4, shuffle_buffer=10,
                                          repeat=True)))
  assert batch.shape == (4, 28, 28, 1) and batch.dtype == tf.float32
  assert 0.0 <= float(tf.reduce_min(batch)) and float(tf.reduce_max(batch)) < 1.0


def test_digits8x8_builder(tmp_path):
  images, labels = data.load_numpy("digits8x8", "test", data_dir=str(tmp_path))
  assert images.shape == (297, 8, 8, 1) and images.dtype == np.uint8
  assert images.max() == 16 and set(np.unique(labels)) == set(range(10))
  shipped = np.load(os.path.join(os.path.dirname(__file__), "data", "digits8x8_test.npz"))
  np.testing.assert_array_equal(images, shipped["images"])


def test_load_rejects_bad_name():
  with pytest.raises(ValueError, match=re.escape("non-empty string. Got: 3")):
    data.load(3)


# ---------------------------------------------------------------------------
# Dequantization and bits/dim.


def test_dequantize_stays_in_its_bin():
  k = np.arange(256, dtype=np.uint8).reshape(16, 16)
  x = data.dequantize(k, 256, seed=[1, 2]).numpy()
  np.testing.assert_array_equal(np.floor(x * 256).astype(np.uint8), k)
  np.testing.assert_array_equal(x, data.dequantize(k, 256, seed=[1, 2]).numpy())


def test_dequantize_rejects_bad_levels():
  with pytest.raises(ValueError, match=re.escape("Got: 1.5")):
    data.dequantize(np.zeros(3, np.uint8), 1.5)


def test_bits_per_dim_of_uniform_density_is_log2_levels():
  np.testing.assert_allclose(data.bits_per_dim(tf.zeros([2]), 784, 256).numpy(), [8.0, 8.0])
  np.testing.assert_allclose(data.bits_per_dim(0.0, 64, 17).numpy(), np.log2(17.0), rtol=1e-6)


def test_bits_per_dim_identity_flow_on_logits_known_answer():
  # Prior: y = logit(alpha + (1 - 2 alpha) x) is standard normal, i.e. the flow is the
  # identity on logits. By hand, per pixel:
  #   log p(x) = log N(y; 0, 1) + log(1 - 2 alpha) - log s - log(1 - s),  s = alpha + (1-2alpha)x
  # and bits/dim = (-sum log p / D + log 256) / log 2.
  alpha, shape = 0.05, (4, 4, 1)
  prior = tfd.TransformedDistribution(
      tfd.Sample(tfd.Normal(0.0, 1.0), shape), data.logit_bijector(alpha))
  k = np.random.default_rng(0).integers(0, 256, size=(3,) + shape).astype(np.uint8)
  x = data.dequantize(k, 256, seed=[3, 4]).numpy().astype(np.float64)
  s = alpha + (1 - 2 * alpha) * x
  y = np.log(s) - np.log1p(-s)
  log_p = (-0.5 * y**2 - 0.5 * np.log(2 * np.pi) + np.log(1 - 2 * alpha) - np.log(s)
           - np.log1p(-s)).sum(axis=(1, 2, 3))
  expected = (-log_p / 16 + np.log(256)) / np.log(2)
  got = data.bits_per_dim(prior.log_prob(x.astype(np.float32)), 16, 256).numpy()
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_logit_bijector_range_contains_unit_interval():
  b = data.logit_bijector(0.05)
  np.testing.assert_allclose(b.forward(b.inverse(tf.constant([0.0, 0.5, 1.0]))).numpy(),
                             [0.0, 0.5, 1.0], atol=1e-6)
  with pytest.raises(ValueError, match=re.escape("Got: 0.5")):
    data.logit_bijector(0.5)


def test_bits_per_dim_rejects_bad_event_size():
  with pytest.raises(ValueError, match=re.escape("Got: 0")):
    data.bits_per_dim(0.0, 0, 256)


# ---------------------------------------------------------------------------
# 2-D toys.


@pytest.mark.parametrize("name", sorted(data.TOY_DENSITIES))
def test_toy_2d(name):
  x = data.toy_2d(name, 500, seed=3)
  assert x.shape == (500, 2) and x.dtype == np.float32 and np.all(np.isfinite(x))
  assert np.abs(x).max() < 8.0
  np.testing.assert_array_equal(x, data.toy_2d(name, 500, seed=3))


def test_toy_2d_rejects_unknown_name():
  with pytest.raises(ValueError, match="Unknown toy density 'donut'"):
    data.toy_2d("donut", 10)
