r"""Cost of one optimizer step: the composed posterior against ambient VI, in one run.

The paper's cost claim [1]: a composed-posterior step needs only the prior's forward pass
`x = f(z)` (and the pre-generator's forward pass and log-det), while an ambient-VI step needs the
prior's density `log p(x)` of every draw, that is `f^{-1}` and its log-det. Both steps here are a
compiled `tf.function` of the objective's gradient and one Adam update, on the same prior, task,
observation and batch size; the first call (tracing) is excluded, the median of `--repeats`
steps is reported.

    python -m experiments.step_cost --prior=mnist --task=inpaint_lower_half --batch_size=64

#### References

[1]: Jay Whang, Erik M. Lindgren, Alexandros G. Dimakis. Composing Normalizing Flows for
     Inverse Problems. In _ICML_, 2021.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf
import tf_keras

import tfp_composed as tfc
from tfp_composed.baselines import ambient

_PRIOR = flags.DEFINE_enum("prior", "mnist", ["mnist", "digits8x8"], "Shipped prior.")
_TASK = flags.DEFINE_string("task", "inpaint_lower_half", "Task name (tfc.tasks.TASKS).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Samples per step (both methods).")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps per method (after one warm-up).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the observation and the draws.")


def compiled_step(loss_fn, variables):
  """A `tf.function` of one Adam step on `loss_fn(seed)` (returning the loss, then metrics)."""
  optimizer = tf_keras.optimizers.Adam(1e-3)

  @tf.function
  def step(seed):
    with tf.GradientTape() as tape:
      loss = loss_fn(seed)
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  return step


def median_seconds(step, repeats, seed):
  step(tf.constant([seed, 0]))  # Tracing and the first call: not timed.
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    float(step(tf.constant([seed, i + 1])))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
  seed, batch_size = _SEED.value, _BATCH_SIZE.value
  prior = tfc.priors.load(_PRIOR.value)
  config = tfc.priors.load_config(_PRIOR.value)
  shape = tuple(prior.event_shape.as_list())
  task = tfc.tasks.get(_TASK.value, image_shape=shape, seed=seed)
  images, _ = tfc.data.load_numpy(config["dataset"], "test")
  truth = (images[0].astype(np.float32) + 0.5) / int(config["levels"])
  y = task.observe(truth, seed=[seed, 0])

  posterior = tfc.ComposedPosterior(prior, task.likelihood, y)
  composed_step = compiled_step(lambda s: posterior.loss(batch_size, seed=s),
                                posterior.trainable_variables)
  q, flow = ambient.ambient_flow(prior, num_init_samples=256, seed=seed)
  ambient_step = compiled_step(
      lambda s: ambient.negative_elbo(q, prior, task.likelihood, y, batch_size, s)[0],
      flow.trainable_variables)
  composed_seconds = median_seconds(composed_step, _REPEATS.value, seed)
  ambient_seconds = median_seconds(ambient_step, _REPEATS.value, seed)
  print(json.dumps({
      "prior": _PRIOR.value, "task": _TASK.value, "batch_size": batch_size,
      "repeats": _REPEATS.value, "composed_step_seconds": round(composed_seconds, 4),
      "ambient_vi_step_seconds": round(ambient_seconds, 4),
      "ambient_over_composed": round(ambient_seconds / composed_seconds, 2)}, indent=2))


if __name__ == "__main__":
  app.run(main)
