"""End-to-end tests of experiments/train_prior.py on tiny priors: train, resume, export, load.

The TFDS download path (`--download`, fashion_mnist / cifar10 / celeb_a) runs on
`tfds.testing.mock_data`, so no test touches the network.
"""

import json
import os

from absl import flags
from absl.testing import flagsaver
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from experiments import train_prior
from tfp_composed import data
from tfp_composed import priors

FLAGS = flags.FLAGS

_TINY = dict(architecture="glow", num_levels=1, steps_per_level=1, hidden_channels=8,
             batch_size=8, learning_rate=1e-3, warmup_steps=2, log_every=2, eval_every=3,
             checkpoint_every=2, export_slice=20)


def _run(**overrides):
  if not FLAGS.is_parsed():
    FLAGS(["train_prior"])
  with flagsaver.flagsaver(**dict(_TINY, **overrides)):
    train_prior.main([])


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10", "celeb_a"])
def test_download_path_gives_the_prior_shape(name):
  with tfds.testing.mock_data(num_examples=6):
    ds = data.load(name, split="train", download=True)
    batch = next(iter(data.image_pipeline(ds, levels=256, batch_size=3)))
    images, labels = data.load_numpy(name, "test", download=True)
  shape = data.DATASET_INFO[name][0]
  assert batch.shape == (3,) + shape
  assert images.shape == (6,) + shape and images.dtype == np.uint8 and labels.shape == (6,)


def test_train_resume_export_and_load(tmp_path, caplog):
  ckpt_dir, export_dir = str(tmp_path / "run"), str(tmp_path / "export")
  common = dict(dataset="digits8x8", data_dir=str(tmp_path / "data"), checkpoint_dir=ckpt_dir)
  _run(num_steps=4, **common)
  assert tf.train.latest_checkpoint(ckpt_dir).endswith("ckpt-4")
  # Resume continues the step counter and the optimizer; export takes the best-on-test step.
  with caplog.at_level("INFO", logger="absl"):
    _run(num_steps=7, resume=True, export_dir=export_dir, **common)
  assert "ckpt-4 at step 4" in caplog.text
  assert tf.train.latest_checkpoint(ckpt_dir).endswith("ckpt-7")
  with open(os.path.join(export_dir, "config.json")) as f:
    config = json.load(f)
  assert len(config["train_commands"]) == 2 and config["train_steps"] in (3, 6, 7)
  assert config["dataset"] == "digits8x8" and config["levels"] == 17
  prior = priors.load(export_dir)
  assert prior.trainable_variables == ()
  images = data.load_numpy("digits8x8", "test", data_dir=common["data_dir"])[0][:20]
  x = data.dequantize(images, 17, seed=[0, 12345])
  bpd = float(tf.reduce_mean(data.bits_per_dim(prior.log_prob(x), 64, 17)))
  np.testing.assert_allclose(bpd, config["test_slice_bits_per_dim"], atol=1e-3)
  assert os.path.exists(os.path.join(export_dir, "samples_t1.0.png"))


def test_training_on_a_downloaded_dataset(tmp_path):
  with tfds.testing.mock_data(num_examples=16):
    _run(dataset="cifar10", download=True, num_steps=2, eval_every=2,
         checkpoint_dir=str(tmp_path / "run"), export_dir=str(tmp_path / "export"))
  prior = priors.load(str(tmp_path / "export"))
  assert prior.event_shape == [32, 32, 3]


def test_unknown_dataset_is_a_usage_error(tmp_path):
  with pytest.raises(Exception, match="--dataset must be one of"):
    _run(dataset="imagenet", num_steps=1, checkpoint_dir=str(tmp_path))


def test_non_finite_batches_are_skipped(tmp_path, monkeypatch):
  pipeline = data.image_pipeline

  def poisoned(*args, **kwargs):  # Every third training batch is NaN.
    ds = pipeline(*args, **kwargs).enumerate()
    return ds.map(lambda i, x: tf.where(i % 3 == 0, tf.fill(tf.shape(x), np.nan), x))

  monkeypatch.setattr(train_prior.data_lib, "image_pipeline", poisoned)
  ckpt_dir = str(tmp_path / "run")
  _run(dataset="digits8x8", data_dir=str(tmp_path / "data"), checkpoint_dir=ckpt_dir,
       num_steps=6)
  reader = tf.train.load_checkpoint(ckpt_dir)
  # The actnorm init takes batches 0-63 (NaN ones filtered out); steps 1-6 get batches 64-69,
  # of which 66 and 69 are NaN.
  assert reader.get_tensor("skipped/.ATTRIBUTES/VARIABLE_VALUE") == 2
  assert reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == 6
  for name in reader.get_variable_to_shape_map():
    if name.startswith("flow/"):
      assert np.all(np.isfinite(reader.get_tensor(name))), name
