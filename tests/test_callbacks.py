"""Stock tf_keras callbacks through a real `training.fit`, each checked by its effect."""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from tfp_composed import training

cbs = tf_keras.callbacks


def _linear():
  """`L(w) = w`: Adam's step on a constant unit gradient is exactly `-lr_t` (bias-corrected
  moments m = v = 1), so `w` after training is `-sum_t lr_t`: the rates used are observable."""
  w = tf.Variable(0., dtype=tf.float64)

  def loss(seed, step, shard):
    del seed, step, shard
    return w * 1., {}

  return w, loss


def _quadratic(nan_at=None):
  """`E[(w - 3 - 0.1 u)^2]`, `u ~ N(0, 1)`: a noisy loss; NaN at step `nan_at` if given."""
  w = tf.Variable([0.])

  def loss(seed, step, shard):
    u = tf.random.stateless_normal([64], seed)
    value = tf.reduce_mean((w - 3. - 0.1 * u)**2)
    if nan_at is not None:
      value = tf.where(tf.equal(step, nan_at), np.nan, value)
    return value, {}

  return w, loss


def _fit(loss, w, **kwargs):
  options = dict(num_steps=40, learning_rate=1e-2, verbose=0, steps_per_execution=10,
                 convergence=None)
  options.update(kwargs)
  return training.fit(loss, [w], **options)


def read_scalars(directory):
  """`{tag: [(step, value), ...]}` from every event file under `directory`."""
  scalars = {}
  for path in sorted(glob.glob(os.path.join(directory, "**", "events.out.tfevents.*"),
                               recursive=True)):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == "scalars":
          scalars.setdefault(value.tag, []).append(
              (event.step, float(tf.make_ndarray(value.tensor))))
  return scalars


def test_tensorboard_callback_writes_epoch_losses_and_histograms(tmp_path):
  w, loss = _quadratic()
  history = _fit(loss, w, callbacks=[cbs.TensorBoard(str(tmp_path), histogram_freq=1)])
  scalars = read_scalars(str(tmp_path / "train"))
  epoch_loss = scalars["epoch_loss"]
  assert [s for s, _ in epoch_loss] == [0, 1, 2, 3]
  per_step = np.reshape(history.history["loss"], [4, 10])
  np.testing.assert_allclose([v for _, v in epoch_loss], per_step.mean(1), rtol=1e-5)
  assert "epoch_learning_rate" in scalars
  histograms = [v.tag for path in glob.glob(str(tmp_path / "train" / "events*"))
                for e in tf.compat.v1.train.summary_iterator(path) for v in e.summary.value
                if v.metadata.plugin_data.plugin_name == "histograms"]
  assert histograms, "histogram_freq=1 writes the trained variables"


def test_tensorboard_callback_batch_frequency_uses_the_global_step(tmp_path):
  w, loss = _quadratic()
  history = _fit(loss, w, callbacks=[cbs.TensorBoard(str(tmp_path), update_freq=5)])
  batch_loss = dict(read_scalars(str(tmp_path / "train"))["batch_loss"])
  # Written at steps 5, 10, ..., 40 (steps done), each with that step's own loss.
  assert sorted(batch_loss) == list(range(5, 41, 5))
  for step, value in batch_loss.items():
    np.testing.assert_allclose(value, history.history["loss"][step - 1], rtol=1e-6)


def test_reduce_lr_on_plateau_lowers_the_learning_rate_used():
  w, loss = _linear()
  # min_delta so large that no epoch counts as an improvement after the first.
  history = _fit(loss, w, callbacks=[cbs.ReduceLROnPlateau("loss", factor=0.5, patience=1,
                                                           min_delta=1e9)])
  rates = np.reshape(history.history["learning_rate"], [4, 10])
  # The warm-up/cosine factor is off with an LR callback: epochs 0 and 1 at the peak rate.
  np.testing.assert_allclose(rates[:, 0], [1e-2, 1e-2, 5e-3, 2.5e-3], rtol=1e-6)
  np.testing.assert_allclose(rates, rates[:, :1] * np.ones([1, 10]))
  np.testing.assert_allclose(w.numpy(), -rates.sum(), rtol=1e-5)


def test_learning_rate_scheduler_sets_the_learning_rate_used():
  w, loss = _linear()
  history = _fit(loss, w, callbacks=[cbs.LearningRateScheduler(lambda e, lr: 0.1 / (e + 1))])
  rates = np.reshape(history.history["learning_rate"], [4, 10])
  np.testing.assert_allclose(rates, 0.1 / np.arange(1, 5)[:, None] * np.ones([1, 10]),
                             rtol=1e-6)
  np.testing.assert_allclose(w.numpy(), -rates.sum(), rtol=1e-5)


def test_without_lr_callbacks_the_schedule_warms_up_and_decays():
  w, loss = _linear()
  history = _fit(loss, w, num_steps=100)
  rates = np.array(history.history["learning_rate"])
  np.testing.assert_allclose(rates[:5], 1e-2 * np.arange(1, 6) / 5, rtol=1e-6)  # Warm-up.
  assert rates[-1] < 0.07 * 1e-2 and np.all(np.diff(rates[5:]) <= 0)  # Cosine to 5%.
  np.testing.assert_allclose(w.numpy(), -rates.sum(), rtol=1e-5)


def test_model_checkpoint_writes_restorable_weights(tmp_path):
  w, loss = _quadratic()
  _fit(loss, w, callbacks=[cbs.ModelCheckpoint(str(tmp_path / "w-{epoch:02d}"),
                                               save_weights_only=True)])
  assert sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "*.index"))) == [
      f"w-{e:02d}.index" for e in range(1, 5)]
  fresh = tf.Variable([0.])
  tf.train.Checkpoint(variables=[fresh]).read(str(tmp_path / "w-04")).expect_partial()
  np.testing.assert_array_equal(fresh.numpy(), w.numpy())
  tf.train.Checkpoint(variables=[fresh]).read(str(tmp_path / "w-01")).expect_partial()
  assert not np.array_equal(fresh.numpy(), w.numpy())  # An earlier epoch's weights.


class _Interrupt(cbs.Callback):
  """Raises at the end of global step `at`, as a kill would."""

  def __init__(self, at):
    super().__init__()
    self.at = at

  def on_train_batch_end(self, batch, logs=None):
    if int(self.model.optimizer.iterations) == self.at + 1:
      raise KeyboardInterrupt


def test_backup_and_restore_resumes_after_an_interrupt(tmp_path):
  w, loss = _quadratic()
  full = _fit(loss, w, num_steps=60).history["loss"]
  backup = str(tmp_path / "backup")
  w, loss = _quadratic()
  with pytest.raises(KeyboardInterrupt):
    _fit(loss, w, num_steps=60, callbacks=[cbs.BackupAndRestore(backup), _Interrupt(35)])
  # A new process: new variables and loss, only the backup carries over. The last epoch
  # backed up ended at step 30.
  w, loss = _quadratic()
  resumed = _fit(loss, w, num_steps=60, callbacks=[cbs.BackupAndRestore(backup)])
  assert len(resumed.history["loss"]) == 30
  np.testing.assert_allclose(resumed.history["loss"], full[30:], rtol=1e-5)
  assert not os.path.exists(os.path.join(backup, "chief"))  # Deleted after a finished fit.


def test_progbar_logger_prints(capsys):
  w, loss = _quadratic()
  _fit(loss, w, num_steps=20, verbose=1, callbacks=[cbs.ProgbarLogger(count_mode="steps")])
  out = capsys.readouterr().out
  assert "Epoch 1/2" in out and "Epoch 2/2" in out and "10/10" in out and "loss:" in out


def test_terminate_on_nan_stops_at_the_first_nan_step():
  w, loss = _quadratic(nan_at=13)
  history = _fit(loss, w, num_steps=40, callbacks=[cbs.TerminateOnNaN()])
  losses = history.history["loss"]
  # Steps 0..13 ran; the burst of steps 10..19 ended at the NaN step.
  assert len(losses) == 14 and np.isnan(losses[-1]) and np.all(np.isfinite(losses[:-1]))


def test_early_stopping_restores_the_best_weights():
  w, loss = _quadratic()
  best = []

  class Record(cbs.Callback):

    def on_epoch_end(self, epoch, logs=None):
      best.append((logs["loss"], w.numpy().copy()))

  history = _fit(loss, w, callbacks=[Record(), cbs.EarlyStopping(
      "loss", patience=1, min_delta=1e9, restore_best_weights=True)])
  assert len(history.history["loss"]) == 20  # Stopped after the second epoch.
  np.testing.assert_array_equal(w.numpy(), best[0][1])  # The first epoch was the "best".


def test_csv_logger_writes_one_row_per_epoch(tmp_path):
  w, loss = _quadratic()
  _fit(loss, w, callbacks=[cbs.CSVLogger(str(tmp_path / "log.csv"))])
  rows = open(tmp_path / "log.csv").read().strip().splitlines()
  assert rows[0].split(",")[:2] == ["epoch", "grad_norm"] and len(rows) == 5


@pytest.mark.parametrize("callback, match", [
    (lambda p: cbs.ModelCheckpoint(str(p / "m")), r"ModelCheckpoint\(save_weights_only=False\)"),
    (lambda p: cbs.ModelCheckpoint(str(p / "m.h5"), save_weights_only=True),
     r"ModelCheckpoint filepath .*m.h5"),
    (lambda p: cbs.TensorBoard(str(p), embeddings_freq=1), r"TensorBoard\(embeddings_freq=1\)"),
    (lambda p: cbs.EarlyStopping("val_loss"), r"EarlyStopping\(monitor='val_loss'\)"),
    (lambda p: cbs.ReduceLROnPlateau("val_loss"), r"ReduceLROnPlateau\(monitor='val_loss'\)"),
])
def test_callbacks_that_cannot_apply_are_an_error_at_the_door(tmp_path, callback, match):
  w, loss = _quadratic()
  with pytest.raises(ValueError, match=r"`callbacks`: " + match):
    _fit(loss, w, callbacks=[callback(tmp_path)])
  assert w.numpy()[0] == 0.
