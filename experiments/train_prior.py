r"""Trains a flow prior (RealNVP or Glow) on an image dataset by maximum likelihood.

Minimizes the negative log-likelihood of uniformly dequantized images `x = (k + u) / L`, in
bits/dim: `(-log p(x) / D + log L) / log 2`. Reports train bits/dim with a tf_keras Progbar and
absl logs, writes TensorBoard scalars and sample grids to `<checkpoint_dir>/tb`, evaluates test
bits/dim every `--eval_every` steps (fixed dequantization noise), keeps the latest checkpoints
(`tf.train.CheckpointManager`, `--resume` continues after a kill) and the best-on-test one in
`<checkpoint_dir>/best`, and skips steps whose loss or gradient is not finite.

With `--export_dir`, the best checkpoint is written as a shipped prior (`tfc.priors.save`) with
its full-test-set bits/dim, training time and commands recorded in `config.json`.

Examples:

  python -m experiments.train_prior --dataset=digits8x8 --architecture=realnvp \
    --num_steps=3000 --checkpoint_dir=/tmp/runs/digits --export_dir=/tmp/priors/digits8x8

  python -m experiments.train_prior --dataset=mnist --architecture=glow --num_steps=20000 \
    --checkpoint_dir=/tmp/runs/mnist --resume
"""

import math
import os
import shlex
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf
import tf_keras

from tfp_composed import data as data_lib
from tfp_composed import priors

FLAGS = flags.FLAGS

flags.DEFINE_string("dataset", "mnist", "Dataset: mnist, digits8x8 (offline), fashion_mnist, "
                    "cifar10 or celeb_a (with --download).")
flags.DEFINE_enum("architecture", "glow", ["glow", "realnvp"], "Prior architecture.")
flags.DEFINE_integer("num_steps", 10000, "Total number of training steps.")
flags.DEFINE_integer("batch_size", 64, "Training batch size.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak Adam learning rate.")
flags.DEFINE_integer("warmup_steps", 200, "Linear learning-rate warm-up steps.")
flags.DEFINE_integer("decay_steps", 0,
                     "Cosine-decay the learning rate to 5% over the last decay_steps steps.")
flags.DEFINE_float("clip_norm", 100.0, "Global gradient-norm clipping.")
flags.DEFINE_string("checkpoint_dir", "/tmp/tfp_composed_runs/prior", "Checkpoints and logs.")
flags.DEFINE_bool("resume", False, "Resume from the latest checkpoint in checkpoint_dir.")
flags.DEFINE_integer("eval_every", 1000, "Evaluate test bits/dim every this many steps.")
flags.DEFINE_integer("eval_examples", 0, "Test examples for periodic evaluation (0: all).")
flags.DEFINE_integer("log_every", 50, "Log train bits/dim every this many steps.")
flags.DEFINE_integer("checkpoint_every", 250, "Save a checkpoint every this many steps.")
flags.DEFINE_string("data_dir", None, "TFDS data directory (default: tfc.data.default_data_dir()).")
flags.DEFINE_bool("download", False, "Use stock TFDS builders that download (e.g. tfds 'mnist').")
flags.DEFINE_integer("num_levels", 2, "Glow levels / RealNVP scales.")
flags.DEFINE_integer("steps_per_level", 8, "Glow flow steps per level.")
flags.DEFINE_integer("hidden_channels", 64, "Width of the coupling networks.")
flags.DEFINE_integer("num_blocks", 0, "Residual blocks per coupling network.")
flags.DEFINE_bool("learned_prior", False,
                  "Glow: learned conditional prior of the factored-out channels.")
flags.DEFINE_string("init_from", None,
                    "Start from this saved prior (name or directory) of the same layout, widened "
                    "to --hidden_channels without changing its density (tfc.priors.grow_from).")
flags.DEFINE_float("alpha", 0.05, "Logit preprocessing constant.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_float("sample_temperature", 0.8, "Temperature of the logged sample grids (also 1.0).")
flags.DEFINE_string("export_dir", None, "If set, export the best checkpoint here at the end.")
flags.DEFINE_bool("export_only", False, "Skip training; only export the best checkpoint.")
flags.DEFINE_integer("export_slice", 500,
                     "Also record bits/dim on the first export_slice test images, each dequantized "
                     "with seed [seed, 12345] (checked by tests/test_priors.py).")


def build_prior(shape):
  if FLAGS.architecture == "glow":
    return priors.glow(shape, num_levels=FLAGS.num_levels, num_steps=FLAGS.steps_per_level,
                       hidden_channels=FLAGS.hidden_channels, num_blocks=FLAGS.num_blocks,
                       alpha=FLAGS.alpha, learned_prior=FLAGS.learned_prior, seed=FLAGS.seed)
  return priors.realnvp(shape, num_scales=FLAGS.num_levels, hidden_channels=FLAGS.hidden_channels,
                        num_blocks=FLAGS.num_blocks, alpha=FLAGS.alpha)


class WarmupCosine(tf_keras.optimizers.schedules.LearningRateSchedule):
  """Linear warm-up to `peak`, constant, then cosine decay to 5% over the last `decay` steps."""

  def __init__(self, peak, warmup, total, decay):
    self.peak, self.warmup, self.total, self.decay = peak, warmup, total, decay

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    lr = self.peak * tf.minimum(1.0, (step + 1.0) / max(self.warmup, 1))
    if self.decay > 0:
      frac = tf.clip_by_value((step - (self.total - self.decay)) / self.decay, 0.0, 1.0)
      lr *= 0.05 + 0.95 * 0.5 * (1.0 + tf.cos(math.pi * frac))
    return lr

  def get_config(self):
    return dict(peak=self.peak, warmup=self.warmup, total=self.total, decay=self.decay)


def image_grid(images, rows):
  """`[N, H, W, C]` -> `[1, rows * H, (N / rows) * W, C]`."""
  n, h, w, c = images.shape
  cols = n // rows
  grid = tf.reshape(images[:rows * cols], [rows, cols, h, w, c])
  grid = tf.transpose(grid, [0, 2, 1, 3, 4])
  return tf.reshape(grid, [1, rows * h, cols * w, c])


def evaluate(log_prob_fn, x, event_size, levels, batch=500):
  lps = [log_prob_fn(x[i:i + batch]) for i in range(0, len(x), batch)]
  lp = tf.concat(lps, 0)
  return float(tf.reduce_mean(data_lib.bits_per_dim(lp, event_size, levels)))


def main(argv):
  del argv
  tf.random.set_seed(FLAGS.seed)
  ckpt_dir = FLAGS.checkpoint_dir
  os.makedirs(ckpt_dir, exist_ok=True)
  command = "python -m experiments.train_prior " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  if not FLAGS.export_only:
    with open(os.path.join(ckpt_dir, "commands.txt"), "a") as f:
      f.write(command + "\n")

  if FLAGS.dataset not in data_lib.DATASET_INFO:
    raise app.UsageError(f"--dataset must be one of {sorted(data_lib.DATASET_INFO)}. "
                         f"Got: {FLAGS.dataset!r}.")
  shape, levels = data_lib.DATASET_INFO[FLAGS.dataset]
  event_size = int(np.prod(shape))
  prior = build_prior(list(shape))
  module = priors.flow_module(prior)
  variables = module.trainable_variables
  logging.info("Prior %s with %d parameters.", FLAGS.architecture,
               sum(int(np.prod(v.shape)) for v in variables))

  test_images, _ = data_lib.load_numpy(FLAGS.dataset, "test", FLAGS.data_dir, FLAGS.download)
  test_x = data_lib.dequantize(test_images, levels, seed=[FLAGS.seed, 12345])
  eval_x = test_x[:FLAGS.eval_examples] if FLAGS.eval_examples else test_x

  schedule = WarmupCosine(FLAGS.learning_rate, FLAGS.warmup_steps, FLAGS.num_steps,
                          FLAGS.decay_steps)
  optimizer = tf_keras.optimizers.Adam(schedule)
  optimizer.build(variables)
  step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
  skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped")
  elapsed = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="elapsed_seconds")
  best_bpd = tf.Variable(np.inf, dtype=tf.float64, trainable=False, name="best_bpd")
  ckpt = tf.train.Checkpoint(flow=module, optimizer=optimizer, step=step, skipped=skipped,
                             elapsed=elapsed, best_bpd=best_bpd)
  manager = tf.train.CheckpointManager(ckpt, ckpt_dir, max_to_keep=2)
  best_ckpt = tf.train.Checkpoint(flow=module, step=step, elapsed=elapsed, best_bpd=best_bpd)
  best_manager = tf.train.CheckpointManager(best_ckpt, os.path.join(ckpt_dir, "best"),
                                            max_to_keep=1)

  @tf.function
  def log_prob_fn(x):
    return prior.log_prob(x)

  if FLAGS.export_only:
    return export(prior, best_manager, best_ckpt, log_prob_fn, test_x, event_size, levels,
                  step, elapsed, ckpt_dir)

  train_ds = data_lib.image_pipeline(
      data_lib.load(FLAGS.dataset, "train", FLAGS.data_dir, FLAGS.download), levels,
      FLAGS.batch_size, shuffle_buffer=10000, repeat=True, seed=FLAGS.seed)
  train_iter = iter(train_ds)

  if FLAGS.resume and manager.latest_checkpoint:
    ckpt.restore(manager.latest_checkpoint)
    logging.info("Resumed from %s at step %d.", manager.latest_checkpoint, int(step))
  elif FLAGS.init_from:
    priors.grow_from(prior, priors.load(FLAGS.init_from))
    logging.info("Grown from %s: initial test bits/dim %.4f", FLAGS.init_from,
                 evaluate(log_prob_fn, eval_x[:1000], event_size, levels))
  else:
    init_batch = tf.concat([next(train_iter) for _ in range(max(1, 512 // FLAGS.batch_size))], 0)
    # Actnorm statistics from the finite images only (a corrupt batch must not poison them).
    init_batch = tf.boolean_mask(
        init_batch, tf.reduce_all(tf.math.is_finite(init_batch), axis=[1, 2, 3]))
    priors.data_init(prior, init_batch)
    logging.info("Initial test bits/dim %.4f", evaluate(log_prob_fn, eval_x[:1000], event_size,
                                                         levels))

  @tf.function
  def train_step(x):
    with tf.GradientTape() as tape:
      lp = prior.log_prob(x)
      loss = -tf.reduce_mean(lp) / event_size  # nats/dim of the [0, 1] density.
    grads = tape.gradient(loss, variables)
    grad_norm = tf.linalg.global_norm(grads)
    ok = tf.math.is_finite(loss) & tf.math.is_finite(grad_norm)

    def apply():
      clipped, _ = tf.clip_by_global_norm(grads, FLAGS.clip_norm, use_norm=grad_norm)
      optimizer.apply_gradients(zip(clipped, variables))
      return tf.constant(0, tf.int64)

    num_skipped = tf.cond(ok, apply, lambda: tf.constant(1, tf.int64))
    skipped.assign_add(num_skipped)
    step.assign_add(1)
    bpd = (loss + math.log(levels)) / math.log(2.0)
    return bpd, grad_norm

  @tf.function
  def sample_fn(temperature):
    z = prior.distribution.sample(64) * temperature
    return tf.clip_by_value(prior.bijector.forward(z), 0.0, 1.0)

  writer = tf.summary.create_file_writer(os.path.join(ckpt_dir, "tb"))
  progbar = tf_keras.utils.Progbar(FLAGS.num_steps, stateful_metrics=["test_bpd", "skipped"],
                                   interval=30.0)
  t_last = time.time()
  window = []
  while int(step) < FLAGS.num_steps:
    bpd, grad_norm = train_step(next(train_iter))
    s = int(step)
    window.append(float(bpd))
    if s % FLAGS.log_every == 0 or s == FLAGS.num_steps:
      now = time.time()
      elapsed.assign_add(now - t_last)
      t_last = now
      mean_bpd = float(np.nanmean(window))
      window = []
      with writer.as_default(step=s):
        tf.summary.scalar("train/bits_per_dim", mean_bpd)
        tf.summary.scalar("train/grad_norm", grad_norm)
        tf.summary.scalar("train/learning_rate", schedule(s))
        tf.summary.scalar("train/skipped_steps", skipped)
      logging.info("step %d train bpd %.4f grad_norm %.2f lr %.2e skipped %d elapsed %.0fs", s,
                   mean_bpd, float(grad_norm), float(schedule(s)), int(skipped),
                   float(elapsed))
      progbar.update(s, [("train_bpd", mean_bpd), ("skipped", int(skipped))])
    if s % FLAGS.eval_every == 0 or s == FLAGS.num_steps:
      test_bpd = evaluate(log_prob_fn, eval_x, event_size, levels)
      with writer.as_default(step=s):
        tf.summary.scalar("test/bits_per_dim", test_bpd)
        for temp in sorted({FLAGS.sample_temperature, 1.0}):
          grid = image_grid(sample_fn(tf.constant(temp)), 8)
          tf.summary.image(f"samples/temperature_{temp}", grid)
          tf.io.write_file(os.path.join(ckpt_dir, f"samples_t{temp}.png"),
                           tf.io.encode_png(tf.cast(grid[0] * 255.0 + 0.5, tf.uint8)))
      logging.info("step %d TEST bpd %.4f (best %.4f)", s, test_bpd, float(best_bpd))
      progbar.update(s, [("test_bpd", test_bpd)])
      if test_bpd < float(best_bpd):
        best_bpd.assign(test_bpd)
        best_manager.save(checkpoint_number=s)
      manager.save(checkpoint_number=s)
      t_last = time.time()  # Evaluation time is not training time.
    elif s % FLAGS.checkpoint_every == 0:
      manager.save(checkpoint_number=s)
  writer.flush()
  if FLAGS.export_dir:
    export(prior, best_manager, best_ckpt, log_prob_fn, test_x, event_size, levels, step, elapsed,
           ckpt_dir)


def export(prior, best_manager, best_ckpt, log_prob_fn, test_x, event_size, levels, step, elapsed,
           ckpt_dir):
  """Restores the best checkpoint, evaluates on the whole test split and saves the prior."""
  if not FLAGS.export_dir:
    raise app.UsageError("--export_only needs --export_dir.")
  if not best_manager.latest_checkpoint:
    raise app.UsageError(f"No best checkpoint in {ckpt_dir}/best to export.")
  best_ckpt.restore(best_manager.latest_checkpoint).expect_partial()
  test_bpd = evaluate(log_prob_fn, test_x, event_size, levels)
  slice_images = data_lib.load_numpy(FLAGS.dataset, "test", FLAGS.data_dir,
                                     FLAGS.download)[0][:FLAGS.export_slice]
  slice_x = data_lib.dequantize(slice_images, levels, seed=[FLAGS.seed, 12345])
  slice_bpd = evaluate(log_prob_fn, slice_x, event_size, levels)
  commands_path = os.path.join(ckpt_dir, "commands.txt")
  commands = open(commands_path).read().strip().splitlines() if os.path.exists(commands_path) else []
  config = {
      "dataset": FLAGS.dataset,
      "levels": levels,
      "event_space": "images in [0, 1], shape %s; dequantized x = (k + u) / %d" % (
          list(data_lib.DATASET_INFO[FLAGS.dataset][0]), levels),
      "test_bits_per_dim": round(test_bpd, 4),
      "test_examples": int(test_x.shape[0]),
      "test_slice_examples": int(slice_x.shape[0]),
      "test_slice_bits_per_dim": round(slice_bpd, 4),
      "test_dequantization_seed": [FLAGS.seed, 12345],
      "train_steps": int(step),
      "batch_size": FLAGS.batch_size,
      "training_time_seconds": round(float(elapsed), 1),
      "train_commands": commands,
      "export_command": "python -m experiments.train_prior " + " ".join(
          shlex.quote(a) for a in sys.argv[1:]),
      "num_parameters": int(sum(int(np.prod(v.shape)) for v in prior.variables)),
  }
  priors.save(prior, FLAGS.export_dir, config)
  tf.random.set_seed(FLAGS.seed)
  for temp in sorted({FLAGS.sample_temperature, 1.0}):
    z = prior.distribution.sample(64) * temp
    grid = image_grid(tf.clip_by_value(prior.bijector.forward(z), 0.0, 1.0), 8)
    tf.io.write_file(os.path.join(FLAGS.export_dir, f"samples_t{temp}.png"),
                     tf.io.encode_png(tf.cast(grid[0] * 255.0 + 0.5, tf.uint8)))
  logging.info("Exported step %d (test bpd %.4f over %d images) to %s", int(step), test_bpd,
               int(test_x.shape[0]), FLAGS.export_dir)


if __name__ == "__main__":
  app.run(main)
