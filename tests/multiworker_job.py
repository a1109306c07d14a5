"""One worker of `test_multiworker.py`: fits under MultiWorkerMirroredStrategy (cluster from
`TF_CONFIG`) and writes its losses as JSON.

    python tests/multiworker_job.py OUT_JSON CHECKPOINT_DIR
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

from tfp_composed import training  # noqa: E402

KWARGS = dict(learning_rate=0.05, verbose=0, steps_per_execution=5, convergence=None)


def make_loss(w):
  """`mean_j |w - 1 - 0.3 u_j|^2` over 8 draws; replica `i` of `m` sums rows `j = i mod m`."""

  def loss(seed, step, shard):
    del step
    u = tf.random.stateless_normal([8, 2], seed)
    rows = tf.reduce_sum((w - 1. - 0.3 * u)**2, axis=-1)
    if shard is not None:
      i, m = shard
      rows *= tf.cast(tf.equal(tf.range(8) % m, tf.cast(i, tf.int32)), rows.dtype)
    return tf.reduce_sum(rows) / 8., {}

  return loss


class StopAfter(tf_keras.callbacks.Callback):
  """Stops training after `steps` steps (a multiple of the burst length)."""

  def __init__(self, steps):
    super().__init__()
    self.steps = steps

  def on_train_batch_end(self, batch, logs=None):
    if int(self.model.optimizer.iterations) >= self.steps:
      self.model.stop_training = True


def main(out, checkpoint_dir):
  strategy = tf.distribute.MultiWorkerMirroredStrategy()
  results = {"replicas": strategy.num_replicas_in_sync}
  with strategy.scope():
    w = tf.Variable([0., 0.])
  results["plain"] = training.fit(make_loss(w), [w], num_steps=20, strategy=strategy,
                                  **KWARGS).history["loss"]
  # A checkpointed run stopped after 10 of 20 steps, then resumed by new variables (as a new
  # process would) from the shared directory.
  with strategy.scope():
    w = tf.Variable([0., 0.])
  results["first"] = training.fit(make_loss(w), [w], num_steps=20, strategy=strategy,
                                  checkpoint_dir=checkpoint_dir, checkpoint_every=5,
                                  callbacks=[StopAfter(10)], **KWARGS).history["loss"]
  with strategy.scope():
    w = tf.Variable([0., 0.])
  results["resumed"] = training.fit(make_loss(w), [w], num_steps=20, strategy=strategy,
                                    checkpoint_dir=checkpoint_dir, checkpoint_every=5,
                                    **KWARGS).history["loss"]
  results["w"] = w.numpy().tolist()
  with open(out, "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
