r"""Benchmark of the composed fit, measured in one run: step time, sampling cost and memory.

For a 2-D problem and an image inpainting problem it measures

* fit step / raw forward+backward pass of `f o g`: the step of `posterior.fit` against the
  gradient of `sum(f(g(eps)))` with respect to the pre-generator's variables on a batch of
  the same size, compiled the same way (a `tf.range` loop of `steps_per_execution` steps in
  one `tf.function`, no XLA), each pass starting when the previous one has ended, as
  training steps do. Target <= 1.1. The ratio to the same loop with overlapping passes (TF
  runs independent loop iterations in parallel) is reported too.
* fit step / step of `tfp.vi.fit_surrogate_posterior` with the same surrogate (the
  posterior's own base distribution and pre-generator, over the latent), the same target
  (`posterior.latent_target_log_prob`) and the same sample size. Target <= 1.0. Measured as
  users call it (eagerly; TFP compiles each step; per-step host timestamps, not paired with
  fit's executions) and inside one `tf.function` (as `fit` compiles its loop; paired).
* composed fit step / ambient-VI step (the paper's cost claim): one step of
  `tfc.baselines.ambient` -- a RealNVP on x-space (the baseline's defaults, its parameter
  count reported), whose loss inverts `f` for every draw -- with its loss, gradient and the
  same fused Adam update as fit, on the same batch, paired with fit's executions like the raw
  pass. The ambient step has no schedule, clipping or NaN guard, so the pairing favours it by
  fit's bookkeeping (0.01-0.03 of the step on the MNIST prior).
* posterior / prior throughput of `sample` + `log_prob` (one `tf.function` each, same batch,
  samples/s). Target >= 0.8.
* peak resident memory of a fit (RSS sampled with psutil every 5 ms during a fit, and the
  process's `resource.getrusage` maxrss).
* prior training throughput (images/s) of the image prior: the maximum-likelihood step of
  `experiments/train_prior.py` (see `prior_training_throughput` for why it is not reused).

How the fit step is timed: a tf_keras callback records the wall time of each compiled
execution of `fit` (`on_epoch_begin` -> `on_epoch_end` brackets one `steps_per_execution`-step
call of fit's own compiled loop plus its host-side bookkeeping), so the number is the library's
real step. The first execution (tracing) is dropped. Between two executions the callback runs
the comparison workloads (raw pass, tfp.vi in one tf.function) for the same number of steps, so
each ratio is a pair measured under the same machine load; the table reports medians of these
paired ratios. Every other figure is the median of repeated timings after a warm-up call.
Each ratio is also given in process CPU time (all threads), which other processes on a shared
machine disturb less than wall time. `--profile` times the parts of the step the same way.

Example:

  python -m experiments.benchmark --output_json=/tmp/benchmark.json
  python -m experiments.benchmark --problems=image --prior=mnist
  python -m experiments.benchmark --device=/GPU:0   # after `pip install .[gpu]`
"""

import contextlib
import json
import math
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import threading
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@contextlib.contextmanager
def _quiet_stderr():
  """Redirects the process's stderr (fd 2) to /dev/null: TF's native start-up messages."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(devnull)
    os.close(saved)


# pylint: disable=g-import-not-at-top,g-bad-import-order,wrong-import-position
with _quiet_stderr():
  import tensorflow as tf
  import tensorflow_probability as tfp
  import tf_keras

from absl import app
from absl import flags
import numpy as np
import psutil

import tfp_composed as tfc
from tfp_composed import likelihoods
from tfp_composed import operators
from tfp_composed import posterior as tfc_posterior
from tfp_composed import priors
from tfp_composed import training
# pylint: enable=g-import-not-at-top,g-bad-import-order,wrong-import-position

tfb = tfp.bijectors
tfd = tfp.distributions

FLAGS = flags.FLAGS

def define_flags():
  """Defines the command-line flags (only when run as a program, so that importing this
  module next to other experiments defines no clashing flags)."""
  flags.DEFINE_list("problems", ["2d", "image"], "Problems to run: 2d, image.")
  flags.DEFINE_integer("steps", 400, "Fit steps timed on the 2-D problem.")
  flags.DEFINE_integer("image_steps", 50, "Fit steps timed on the image problem.")
  flags.DEFINE_integer("batch_size_2d", 64, "Fit batch size (samples per step) of the 2-D problem.")
  flags.DEFINE_integer("image_batch_size", 16, "Fit batch size of the image problem.")
  flags.DEFINE_integer("steps_per_execution", 20,
                       "fit's steps per compiled call on the 2-D problem (fit's default).")
  flags.DEFINE_integer("image_steps_per_execution", 5,
                       "fit's steps per compiled call on the image problem.")
  flags.DEFINE_integer("throughput_batch", 256, "Batch of the 2-D sample + log_prob throughput.")
  flags.DEFINE_integer("image_throughput_batch", 64,
                       "Batch of the image sample + log_prob throughput.")
  flags.DEFINE_integer("repeats", 7, "Repeated timings behind each median.")
  flags.DEFINE_enum("prior", "random", ["random", "mnist"],
                    "Image prior: an untrained Glow ('random') or the shipped MNIST prior.")
  flags.DEFINE_integer("image_hidden_channels", 96, "Coupling width of the untrained Glow prior.")
  flags.DEFINE_integer("train_steps", 2, "Prior training steps per timed call (0 skips).")
  flags.DEFINE_bool("profile", False, "Also time the parts of the fit step (slower).")
  flags.DEFINE_string("output_json", None, "Write the figures to this JSON file.")
  flags.DEFINE_string("device", None,
                      "Device to run everything on, e.g. /GPU:0 or /CPU:0 (one of "
                      "tf.config.list_logical_devices()); default: TensorFlow's placement, "
                      "a GPU when one is visible.")


TARGETS = {
    "fit_over_raw": ("<=", 1.1),
    "fit_over_raw_cpu": ("<=", 1.1),
    "fit_over_tfp_vi": ("<=", 1.0),
    "fit_over_tfp_vi_cpu": ("<=", 1.0),
    "fit_over_tfp_vi_graph": ("<=", 1.0),
    "fit_over_tfp_vi_graph_cpu": ("<=", 1.0),
    "posterior_over_prior_throughput": (">=", 0.8),
    "posterior_over_prior_throughput_cpu": (">=", 0.8),
}


# ------------------------------------------------------------------------------ problems


def two_d_problem(seed=0, num_layers=6, hidden_units=64):
  """A 2-D RealNVP prior with random weights; the first coordinate observed with noise 0.1."""
  tf.random.set_seed(seed)
  prior = priors.realnvp_dense(2, num_layers=num_layers, hidden_units=hidden_units,
                               trainable=False)
  rng = np.random.RandomState(seed)
  for net in prior.prior_modules:  # The builder zero-initializes the outputs (identity flow).
    net.out_kernel.assign(0.3 * rng.randn(*net.out_kernel.shape).astype(np.float32))
  likelihood = likelihoods.Gaussian(operators.Mask([True, False]), scale=0.1)
  posterior = tfc.ComposedPosterior(prior, likelihood, observation=[0.5])
  return {"name": "2d", "prior": prior, "posterior": posterior,
          "description": f"realnvp_dense(2, num_layers={num_layers}, hidden_units={hidden_units})"
                         ", random weights; Gaussian(Mask x1), scale 0.1"}


def image_problem(prior_name="random", hidden_channels=96, seed=0):
  """Inpainting of a 28x28x1 image (top half observed, noise 0.05) under a Glow prior."""
  tf.random.set_seed(seed)
  if prior_name == "mnist":
    if "mnist" not in priors.available():
      raise app.UsageError(f"No shipped MNIST prior; shipped: {priors.available()}.")
    prior = priors.load("mnist")
    what = "shipped MNIST prior"
  else:
    prior = priors.glow([28, 28, 1], num_levels=2, num_steps=8,
                        hidden_channels=hidden_channels, trainable=False, seed=seed)
    what = f"glow([28, 28, 1], num_levels=2, num_steps=8, hidden_channels={hidden_channels})"
  num_params = sum(int(np.prod(v.shape)) for v in priors.flow_module(prior).variables)
  mask = np.zeros([28, 28, 1], bool)
  mask[:14] = True
  likelihood = likelihoods.Gaussian(operators.Mask(mask), scale=0.05)
  truth = tf.clip_by_value(prior.sample(seed=[seed, 1]), 0., 1.)
  observation = likelihood.operator(truth[tf.newaxis])[0]
  posterior = tfc.ComposedPosterior(prior, likelihood, observation=observation)
  return {"name": "image", "prior": prior, "posterior": posterior,
          "description": f"{what}, {num_params} parameters; Gaussian(Mask top half), scale 0.05",
          "prior_parameters": num_params}


def latent_surrogate(posterior):
  """The posterior over the latent: its base distribution and pre-generator, without `f`."""
  bijectors = [posterior.pregenerator]
  shape = posterior.latent_event_shape
  if shape.rank != 1:
    bijectors.append(tfb.Reshape(event_shape_out=shape,
                                 event_shape_in=[int(np.prod(shape.as_list()))]))
  return tfd.TransformedDistribution(posterior.distribution, tfb.Chain(bijectors),
                                     name="latent_surrogate")


# ------------------------------------------------------------------------------ timing


def _block(value):
  """Waits for the result of a call (fetching it to the host)."""
  for t in tf.nest.flatten(value):
    if tf.is_tensor(t):
      t.numpy()
  return value


def _seconds(fn, *args):
  return _wall_and_cpu(fn, *args)[0]


def _wall_and_cpu(fn, *args):
  """Wall-clock and process CPU seconds (all threads) of one call."""
  wall, cpu = time.perf_counter(), time.process_time()
  _block(fn(*args))
  return time.perf_counter() - wall, time.process_time() - cpu


def compiled_loop(body, dtype, seed=0, sequential=True):
  """`run(count)`: `body(step_seed) -> scalar` `count` times in one `tf.function`, like `fit`.

  Summing the scalars into the loop state keeps every iteration's work alive. `sequential`:
  an iteration starts only when the previous one has ended (its seed waits for the running
  sum), as a training step waits for the previous step's update. Without it, TF's while
  loop runs up to 10 independent iterations at once; on 2 cores that made the MNIST raw pass
  0.8 times as long per iteration as one pass after another (29 against 36 ms), a speed no
  training loop can reach.
  """
  seed_tensor = tf.constant([seed, 7], tf.int32)

  @tf.function(jit_compile=False, reduce_retracing=True)
  def run(count):
    total = tf.zeros([], dtype)
    for i in tf.range(count):
      with tf.control_dependencies([total] if sequential else []):
        step_seed = tf.random.experimental.stateless_fold_in(seed_tensor, i)
      total += tf.cast(body(step_seed), dtype)
    return total

  return run


def raw_pass_body(posterior, batch_size):
  """Gradient of `sum(f(g(eps)))` w.r.t. the pre-generator's variables: the reference pass."""
  shape = [batch_size] + posterior.latent_event_shape.as_list()
  g = posterior.pregenerator
  f = posterior.prior.bijector
  variables = g.trainable_variables

  def body(seed):
    eps = tf.random.stateless_normal(shape, seed, dtype=posterior.dtype)
    with tf.GradientTape() as tape:
      value = tf.reduce_sum(f.forward(g.forward(eps)))
    return tf.linalg.global_norm(tape.gradient(value, variables))

  return body


def ambient_vi_body(posterior, batch_size, seed=0):
  """One ambient-VI step (`tfc.baselines.ambient` with its default flow): loss, gradient and
  fit's fused Adam update. Returns `(body, number of trainable parameters)`."""
  from tfp_composed.baselines import ambient  # pylint: disable=g-import-not-at-top
  q, flow = ambient.ambient_flow(posterior.prior, seed=seed)
  variables = flow.trainable_variables
  optimizer = tfc.training.FusedAdam(1e-5)
  optimizer.build(variables)

  def body(step_seed):
    with tf.GradientTape() as tape:
      loss, _ = ambient.negative_elbo(q, posterior.prior, posterior.likelihood,
                                      posterior.observation, batch_size, step_seed)
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  return body, int(sum(np.prod(v.shape) for v in variables))


def fit_batch(posterior, batch_size):
  """Samples per step that `fit` draws: `batch_size` rounded up to whole components."""
  k = posterior.num_components
  return -(-batch_size // k) * k


def step_part_bodies(posterior, batch_size):
  """Pieces of the fit step, each a `body(seed) -> scalar` for `compiled_loop`; the loss is
  fit's default (with the path gradient where fit uses it)."""
  shape = [batch_size] + posterior.latent_event_shape.as_list()
  rank = posterior.latent_event_shape.rank
  g = posterior.pregenerator
  f = posterior.prior.bijector
  g_vars = g.trainable_variables
  all_vars = posterior.trainable_variables
  dtype = posterior.dtype

  def eps_of(seed):
    return tf.random.stateless_normal(shape, seed, dtype=dtype)

  def g_forward(seed):
    return tf.reduce_sum(g.forward(eps_of(seed)))

  def g_forward_and_log_det(seed):  # As `negative_elbo_terms` calls them.
    eps = eps_of(seed)
    return (tf.reduce_sum(g.forward(eps))
            + tf.reduce_sum(g.forward_log_det_jacobian(eps, event_ndims=rank)))

  def f_forward(seed):
    return tf.reduce_sum(f.forward(eps_of(seed)))

  def raw_with_log_det(seed):  # The raw pass plus g's log-det, as the ELBO needs it.
    eps = eps_of(seed)
    with tf.GradientTape() as tape:
      value = (tf.reduce_sum(f.forward(g.forward(eps)))
               - tf.reduce_sum(g.forward_log_det_jacobian(eps, event_ndims=rank)))
    return tf.linalg.global_norm(tape.gradient(value, g_vars))

  path_gradient = tfc_posterior.fit_defaults(
      posterior.latent_event_shape.num_elements())["path_gradient"]

  def loss_and_gradients(seed):  # (loss, [(gradient, variable)]) of the variables that get one.
    with tf.GradientTape() as tape:
      loss = posterior.loss(batch_size, seed, path_gradient=path_gradient)
    pairs = [(g, v) for g, v in zip(tape.gradient(loss, all_vars), all_vars) if g is not None]
    return loss, pairs

  def loss_forward(seed):
    return posterior.loss(batch_size, seed, path_gradient=path_gradient)

  def loss_gradient(seed):  # fit's loss and gradient, without the optimizer.
    return tf.linalg.global_norm([g for g, _ in loss_and_gradients(seed)[1]])

  def loss_gradient_plain(seed):  # The same without the path gradient.
    with tf.GradientTape() as tape:
      loss = posterior.loss(batch_size, seed)
    return tf.linalg.global_norm([g for g in tape.gradient(loss, all_vars) if g is not None])

  optimizers = {"adam": tf_keras.optimizers.Adam(1e-5), "fused": training.FusedAdam(1e-5)}
  for optimizer in optimizers.values():
    optimizer.build(all_vars)

  def with_optimizer(name):  # Plus an Adam update (constant rate).
    def body(seed):
      loss, pairs = loss_and_gradients(seed)
      optimizers[name].apply_gradients(pairs)
      return loss
    return body

  return {
      "g_forward": g_forward,
      "g_forward_and_log_det": g_forward_and_log_det,
      "f_forward": f_forward,
      "raw_forward_backward": raw_pass_body(posterior, batch_size),
      "raw_plus_g_log_det": raw_with_log_det,
      "loss_forward": loss_forward,
      "loss_gradient": loss_gradient,
      **({"loss_gradient_plain": loss_gradient_plain} if path_gradient else {}),
      "loss_gradient_adam": with_optimizer("adam"),
      "loss_gradient_fused_adam": with_optimizer("fused"),
  }


@contextlib.contextmanager
def _no_reparameterization_warning():
  """tfp.vi warns that a mixture base (`MixtureSameFamily`, not reparameterized) gets no
  gradient through its component choice; the benchmark times it as it is."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Reparameterization gradients requested")
    yield


def tfp_vi_graph(posterior, batch_size, seed=0):
  """`run(count)`: `count` steps of `tfp.vi.fit_surrogate_posterior` inside one `tf.function`."""
  surrogate = latent_surrogate(posterior)
  variables = posterior.trainable_variables
  optimizer = tf_keras.optimizers.Adam(1e-3)
  optimizer.build(variables)

  @tf.function(jit_compile=False, reduce_retracing=True)
  def run(count):
    with _no_reparameterization_warning():
      losses = tfp.vi.fit_surrogate_posterior(
          posterior.latent_target_log_prob, surrogate, optimizer, num_steps=count,
          sample_size=batch_size, trainable_variables=variables, seed=[seed, 11])
    return tf.reduce_sum(losses)

  return run


def tfp_vi_eager_step_seconds(posterior, batch_size, num_steps, seed=0):
  """Per-step wall times of `tfp.vi.fit_surrogate_posterior` called eagerly, as users call it.

  TFP compiles each step as a `tf.function` and runs the loop in Python; `trace_fn` runs after
  every step, so consecutive host timestamps give per-step times. The first step (which
  traces) comes before the first timestamp and is excluded. Returns `(wall, cpu)` lists.
  """
  surrogate = latent_surrogate(posterior)
  variables = posterior.trainable_variables
  optimizer = tf_keras.optimizers.Adam(1e-3)
  optimizer.build(variables)
  stamps = []

  def trace_fn(traceable):
    stamps.append((time.perf_counter(), time.process_time()))
    return traceable.loss

  with _no_reparameterization_warning():
    tfp.vi.fit_surrogate_posterior(
        posterior.latent_target_log_prob, surrogate, optimizer, num_steps=num_steps,
        sample_size=batch_size, trainable_variables=variables, seed=[seed, 13],
        trace_fn=trace_fn)
  steps = np.diff(np.asarray(stamps), axis=0)[1:]
  return list(steps[:, 0]), list(steps[:, 1])


class PeakRSS:
  """Samples the process's resident set size every `interval` seconds in a thread (psutil).

  `window_peak()` returns the largest sample since the previous call (or since `start`).
  """

  def __init__(self, interval=0.005):
    self.interval = interval
    self.process = psutil.Process()
    self.before = self.process.memory_info().rss
    self._peak = self.before
    self._stop = threading.Event()
    self._lock = threading.Lock()
    self._thread = threading.Thread(target=self._sample, daemon=True)

  def _sample(self):
    while not self._stop.is_set():
      rss = self.process.memory_info().rss
      with self._lock:
        self._peak = max(self._peak, rss)
      time.sleep(self.interval)

  def start(self):
    self.before = self.process.memory_info().rss
    self._peak = self.before
    self._thread.start()
    return self

  def window_peak(self):
    rss = self.process.memory_info().rss
    with self._lock:
      peak, self._peak = max(self._peak, rss), rss
    return peak

  def stop(self):
    self._stop.set()
    self._thread.join()


class ExecutionTimer(tf_keras.callbacks.Callback):
  """Times each compiled execution of `fit`; runs paired comparisons between executions.

  `fit` calls `on_epoch_begin` right before and `on_epoch_end` right after each compiled call
  of `steps_per_execution` steps, so the bracket is the library's real step plus its host-side
  bookkeeping. The first execution also traces. `comparisons` maps a name to `run(count)`;
  after the first execution each is traced (running one step), after every later one it runs
  for the same number of steps and is timed. With `rss`, the peak resident memory of every
  execution is recorded (the first one is the fit alone: nothing else has run inside it).
  """

  def __init__(self, steps_per_execution, comparisons=None, rss=None):
    super().__init__()
    self.steps_per_execution = steps_per_execution
    self.comparisons = dict(comparisons or {})
    self.rss = rss
    self.fit_seconds = []
    self.fit_cpu_seconds = []
    self.rss_peaks = []
    self.comparison_seconds = {name: [] for name in self.comparisons}
    self.comparison_cpu_seconds = {name: [] for name in self.comparisons}
    self._start = self._cpu_start = None

  def on_epoch_begin(self, epoch, logs=None):
    if self.rss is not None and epoch > 0:
      self.rss.window_peak()  # Drops the comparisons' samples.
    self._start, self._cpu_start = time.perf_counter(), time.process_time()

  def on_epoch_end(self, epoch, logs=None):
    self.fit_seconds.append(time.perf_counter() - self._start)
    self.fit_cpu_seconds.append(time.process_time() - self._cpu_start)
    if self.rss is not None:
      self.rss_peaks.append(self.rss.window_peak())
    count = tf.constant(self.steps_per_execution)
    for name, run in self.comparisons.items():
      if epoch == 0:
        _block(run(tf.constant(1)))  # Traces (and runs one step).
      else:
        wall, cpu = _wall_and_cpu(run, count)
        self.comparison_seconds[name].append(wall)
        self.comparison_cpu_seconds[name].append(cpu)


def _maxrss_mb():
  scale = 1024. if platform.system() != "Darwin" else 1024. * 1024.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _median(values):
  return float(np.median(np.asarray(values, np.float64)))


def throughput(distribution, batch, seed=0):
  """`run()`: `sample(batch)` then `log_prob` of the samples, in one `tf.function`."""

  @tf.function(jit_compile=False)
  def run():
    x = distribution.sample(batch, seed=[seed, 3])
    return tf.reduce_sum(distribution.log_prob(x))

  return run


def measure_throughputs(posterior, prior, batch, repeats):
  """Samples/s of `sample` + `log_prob`, timed alternately (median).

  Of the posterior, the prior, the posterior's latent part alone (base and pre-generator,
  without `f`) and its base alone, which shows what the posterior adds to the prior.
  """
  runs = {"posterior": throughput(posterior, batch), "prior": throughput(prior, batch),
          "latent": throughput(latent_surrogate(posterior), batch),
          "base": throughput(posterior.distribution, batch)}
  for run in runs.values():
    _block(run())  # Traces.
    _block(run())  # Warm-up.
  wall = {name: [] for name in runs}
  cpu = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      w, c = _wall_and_cpu(run)
      wall[name].append(w)
      cpu[name].append(c)

  def ratio(seconds):  # Throughput ratio = time ratio, paired by repeat.
    return _median(np.asarray(seconds["prior"]) / np.asarray(seconds["posterior"]))

  return {"posterior_samples_per_second": batch / _median(wall["posterior"]),
          "prior_samples_per_second": batch / _median(wall["prior"]),
          "latent_samples_per_second": batch / _median(wall["latent"]),
          "base_samples_per_second": batch / _median(wall["base"]),
          "posterior_over_prior_throughput": ratio(wall),
          "posterior_over_prior_throughput_cpu": ratio(cpu)}


def prior_training_throughput(prior_config, batch_size, repeats, steps=2, seed=0):
  """Images/s of maximum-likelihood training steps of a prior built from `prior_config`.

  The step is the one of `experiments/train_prior.py` (`-mean log_prob(x)`, its gradient,
  global-norm clipping, Adam), on uniform images held in memory (no input pipeline), compiled
  as a loop. The package has no single train step to reuse: `train_prior.py` defines its step
  inside `main`, and `tfc.priors.fit_maximum_likelihood` compiles a whole loop per call, so
  its step time cannot be separated from its tracing time.
  """
  prior = priors.build(prior_config, trainable=True)
  variables = priors.flow_module(prior).trainable_variables
  optimizer = tf_keras.optimizers.Adam(1e-4)
  optimizer.build(variables)
  shape = [batch_size] + prior.event_shape.as_list()

  def body(step_seed):
    x = tf.random.stateless_uniform(shape, step_seed)
    with tf.GradientTape() as tape:
      loss = -tf.reduce_mean(prior.log_prob(x))
    grads = tape.gradient(loss, variables)
    clipped, _ = tf.clip_by_global_norm(grads, 100.)
    optimizer.apply_gradients(zip(clipped, variables))
    return loss

  run = compiled_loop(body, tf.float32, seed=seed)
  _block(run(tf.constant(1)))  # Traces.
  per_step = _median([_seconds(run, tf.constant(steps)) / steps for _ in range(repeats)])
  return {"prior_train_step_seconds": per_step,
          "prior_train_images_per_second": batch_size / per_step,
          "prior_train_batch_size": batch_size}


# ------------------------------------------------------------------------------ the benchmark


def run_problem(problem, num_steps, batch_size, steps_per_execution=20, repeats=7,
                throughput_batch=256, profile=True, train_steps=0, log=print):
  """Measures one problem; returns a dict of figures (seconds, ratios, MB, samples/s)."""
  posterior = problem["posterior"]
  prior = problem["prior"]
  spe = int(steps_per_execution)
  executions = max(2, -(-int(num_steps) // spe))
  samples = fit_batch(posterior, batch_size)
  out = {"description": problem["description"], "fit_batch_size": samples,
         "steps_per_execution": spe,
         "pregenerator_parameters": int(sum(np.prod(v.shape)
                                            for v in posterior.pregenerator.trainable_variables)),
         "posterior_parameters": int(sum(np.prod(v.shape)
                                         for v in posterior.trainable_variables))}
  if "prior_parameters" in problem:
    out["prior_parameters"] = problem["prior_parameters"]

  # Fit step, with the raw pass and tfp.vi (one tf.function) paired between its executions,
  # and the resident memory of the fit's executions.
  ambient_body, out["ambient_vi_parameters"] = ambient_vi_body(posterior, samples)
  comparisons = {
      "raw": compiled_loop(raw_pass_body(posterior, samples), posterior.dtype),
      "raw_overlapped": compiled_loop(raw_pass_body(posterior, samples), posterior.dtype,
                                      sequential=False),
      "tfp_vi_graph": tfp_vi_graph(posterior, samples),
      "ambient_vi": compiled_loop(ambient_body, posterior.dtype),
  }
  log(f"[{problem['name']}] fit: {executions} executions of {spe} steps, paired with raw, "
      "tfp.vi and ambient VI ...")
  rss = PeakRSS().start()
  timer = ExecutionTimer(spe, comparisons, rss)
  try:
    posterior.fit(num_steps=executions * spe, batch_size=batch_size, init=None, verbose=0,
                  steps_per_execution=spe, callbacks=[timer], seed=2)
  finally:
    rss.stop()
  out["fit_rss_before_mb"] = rss.before / 2**20
  out["fit_peak_rss_mb"] = timer.rss_peaks[0] / 2**20
  out["fit_peak_rss_increase_mb"] = (timer.rss_peaks[0] - rss.before) / 2**20
  out["fit_peak_rss_all_executions_mb"] = max(timer.rss_peaks) / 2**20
  # The first execution traces; the comparisons are recorded from the second one on.
  fit_s, fit_c = np.asarray(timer.fit_seconds[1:]), np.asarray(timer.fit_cpu_seconds[1:])
  raw_s, raw_c = (np.asarray(timer.comparison_seconds["raw"]),
                  np.asarray(timer.comparison_cpu_seconds["raw"]))
  vig_s, vig_c = (np.asarray(timer.comparison_seconds["tfp_vi_graph"]),
                  np.asarray(timer.comparison_cpu_seconds["tfp_vi_graph"]))
  out["fit_step_seconds"] = _median(fit_s) / spe
  out["raw_step_seconds"] = _median(raw_s) / spe
  out["tfp_vi_graph_step_seconds"] = _median(vig_s) / spe
  out["fit_step_cpu_seconds"] = _median(fit_c) / spe
  out["fit_over_raw"] = _median(fit_s / raw_s)
  out["fit_over_raw_cpu"] = _median(fit_c / raw_c)
  over_s = np.asarray(timer.comparison_seconds["raw_overlapped"])
  out["raw_overlapped_step_seconds"] = _median(over_s) / spe
  out["fit_over_raw_overlapped"] = _median(fit_s / over_s)
  out["fit_over_tfp_vi_graph"] = _median(fit_s / vig_s)
  out["fit_over_tfp_vi_graph_cpu"] = _median(fit_c / vig_c)
  amb_s, amb_c = (np.asarray(timer.comparison_seconds["ambient_vi"]),
                  np.asarray(timer.comparison_cpu_seconds["ambient_vi"]))
  out["ambient_vi_step_seconds"] = _median(amb_s) / spe
  out["fit_over_ambient_vi"] = _median(fit_s / amb_s)
  out["fit_over_ambient_vi_cpu"] = _median(fit_c / amb_c)
  out["fit_over_raw_range"] = [float(np.min(fit_s / raw_s)), float(np.max(fit_s / raw_s))]
  out["timed_executions"] = int(len(fit_s))
  out["fit_first_execution_seconds"] = timer.fit_seconds[0]  # Tracing included.
  out["execution_seconds"] = {"fit": fit_s.tolist(), "raw": raw_s.tolist(),
                              "tfp_vi_graph": vig_s.tolist(), "ambient_vi": amb_s.tolist()}

  # tfp.vi as users call it (an eager loop of compiled steps): not paired with fit's steps.
  log(f"[{problem['name']}] tfp.vi.fit_surrogate_posterior, eager ...")
  vi_wall, vi_cpu = tfp_vi_eager_step_seconds(posterior, samples, num_steps=spe * 2 + 2)
  out["tfp_vi_step_seconds"] = _median(vi_wall)
  out["fit_over_tfp_vi"] = out["fit_step_seconds"] / out["tfp_vi_step_seconds"]
  out["fit_over_tfp_vi_cpu"] = out["fit_step_cpu_seconds"] / _median(vi_cpu)

  log(f"[{problem['name']}] sample + log_prob throughput ...")
  out.update(measure_throughputs(posterior, prior, throughput_batch, repeats))
  out["throughput_batch"] = throughput_batch

  if profile:
    # Each part runs for `spe` steps between two executions of another fit: paired timings.
    log(f"[{problem['name']}] parts of the step, paired with fit ...")
    runs = {name: compiled_loop(body, posterior.dtype)
            for name, body in step_part_bodies(posterior, samples).items()}
    part_timer = ExecutionTimer(spe, runs)
    posterior.fit(num_steps=max(4, executions // 2) * spe, batch_size=batch_size, init=None,
                  verbose=0, steps_per_execution=spe, callbacks=[part_timer], seed=3)
    part_fit = np.asarray(part_timer.fit_seconds[1:])
    out["step_parts_seconds"] = {name: _median(v) / spe
                                 for name, v in part_timer.comparison_seconds.items()}
    out["step_parts_seconds"]["fit_step"] = _median(part_fit) / spe
    out["step_parts_over_fit"] = {name: _median(np.asarray(v) / part_fit)
                                  for name, v in part_timer.comparison_seconds.items()}
    log(f"[{problem['name']}] fit with jit_compile=True, paired with raw ...")
    xla_timer = ExecutionTimer(spe, {"raw": runs["raw_forward_backward"]})
    try:
      posterior.fit(num_steps=max(4, executions // 2) * spe, batch_size=batch_size, init=None,
                    verbose=0, steps_per_execution=spe, callbacks=[xla_timer], seed=4,
                    jit_compile=True)
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as e:
      out["fit_xla_error"] = str(e).splitlines()[0][:300]
    else:
      xla_fit = np.asarray(xla_timer.fit_seconds[1:])
      out["fit_xla_first_execution_seconds"] = xla_timer.fit_seconds[0]
      out["step_parts_seconds"]["fit_step_xla"] = _median(xla_fit) / spe
      out["fit_xla_over_raw"] = _median(xla_fit / np.asarray(xla_timer.comparison_seconds["raw"]))

  if train_steps and "prior_parameters" in problem and hasattr(prior, "prior_config"):
    log(f"[{problem['name']}] prior training throughput ...")
    out.update(prior_training_throughput(prior.prior_config, batch_size=64,
                                         repeats=max(2, repeats // 2), steps=train_steps))
  out["process_maxrss_mb"] = _maxrss_mb()
  return out


def _met(key, value):
  if key not in TARGETS or value is None or not math.isfinite(value):
    return ""
  op, bound = TARGETS[key]
  return "yes" if (value <= bound if op == "<=" else value >= bound) else "no"


ROWS = [
    ("fit step / raw f∘g fwd+bwd", "fit_over_raw", "{:.2f}"),
    ("  same, CPU time", "fit_over_raw_cpu", "{:.2f}"),
    ("fit step / raw pass with overlapping iterations", "fit_over_raw_overlapped", "{:.2f}"),
    ("fit step / tfp.vi step (eager, as called)", "fit_over_tfp_vi", "{:.2f}"),
    ("  same, CPU time", "fit_over_tfp_vi_cpu", "{:.2f}"),
    ("fit step / tfp.vi step (one tf.function)", "fit_over_tfp_vi_graph", "{:.2f}"),
    ("  same, CPU time", "fit_over_tfp_vi_graph_cpu", "{:.2f}"),
    ("fit step / ambient-VI step (same batch, paired)", "fit_over_ambient_vi", "{:.2f}"),
    ("  same, CPU time", "fit_over_ambient_vi_cpu", "{:.2f}"),
    ("posterior / prior sample+log_prob throughput", "posterior_over_prior_throughput",
     "{:.2f}"),
    ("  same, CPU time", "posterior_over_prior_throughput_cpu", "{:.2f}"),
    ("peak RSS of a fit (psutil, first execution), MB", "fit_peak_rss_mb", "{:.0f}"),
    ("  increase over RSS before the fit, MB", "fit_peak_rss_increase_mb", "{:.0f}"),
    ("process maxrss (getrusage), MB", "process_maxrss_mb", "{:.0f}"),
    ("fit step, ms", "fit_step_seconds", "ms"),
    ("raw f∘g fwd+bwd, ms", "raw_step_seconds", "ms"),
    ("  same, overlapping iterations, ms", "raw_overlapped_step_seconds", "ms"),
    ("tfp.vi step (eager), ms", "tfp_vi_step_seconds", "ms"),
    ("tfp.vi step (one tf.function), ms", "tfp_vi_graph_step_seconds", "ms"),
    ("ambient-VI step, ms", "ambient_vi_step_seconds", "ms"),
    ("trainable parameters: composed posterior (g and base)", "posterior_parameters", "{:,}"),
    ("trainable parameters: ambient-VI flow", "ambient_vi_parameters", "{:,}"),
    ("posterior sample+log_prob, samples/s", "posterior_samples_per_second", "{:.0f}"),
    ("prior sample+log_prob, samples/s", "prior_samples_per_second", "{:.0f}"),
    ("latent part (base + g) sample+log_prob, samples/s", "latent_samples_per_second",
     "{:.0f}"),
    ("posterior's base alone sample+log_prob, samples/s", "base_samples_per_second", "{:.0f}"),
    ("prior training, images/s (batch 64)", "prior_train_images_per_second", "{:.1f}"),
]

PART_ROWS = [
    ("g forward", "g_forward"),
    ("g forward + g log-det (separate calls)", "g_forward_and_log_det"),
    ("f forward", "f_forward"),
    ("raw: grad of sum f(g(eps))", "raw_forward_backward"),
    ("raw + g log-det: grad", "raw_plus_g_log_det"),
    ("posterior.loss, forward only", "loss_forward"),
    ("posterior.loss + gradient", "loss_gradient"),
    ("  same, without the path gradient (where fit uses it)", "loss_gradient_plain"),
    ("posterior.loss + gradient + tf_keras Adam", "loss_gradient_adam"),
    ("posterior.loss + gradient + fit's Adam (`training.FusedAdam`)",
     "loss_gradient_fused_adam"),
    ("fit step (loss + grad + Adam + bookkeeping)", "fit_step"),
    ("fit step, jit_compile=True", "fit_step_xla"),
]


def _fmt(value, fmt):
  if value is None:
    return "-"
  if fmt == "ms":
    return f"{1e3 * value:.2f}"
  return fmt.format(value)


def format_table(results, problems):
  """Markdown table: quantity | one column per problem | target | met?."""
  names = {"2d": "2-D", "image": "image"}
  header = ["quantity"] + [names.get(p, p) for p in problems] + ["target", "met?"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for label, key, fmt in ROWS:
    values = [results[p].get(key) for p in problems]
    if all(v is None for v in values):
      continue
    target = " ".join(str(t) for t in TARGETS[key]) if key in TARGETS else ""
    met = "/".join(_met(key, v) or "-" for v in values) if key in TARGETS else ""
    lines.append("| " + " | ".join([label] + [_fmt(v, fmt) for v in values] + [target, met])
                 + " |")
  return "\n".join(lines)


def format_parts(results, problems):
  """Markdown table of the step's parts: ms per step (and, paired, the part's time / fit's)."""
  names = {"2d": "2-D", "image": "image"}
  header = ["part of the step: ms/step (part / fit step, paired)"]
  header += [names.get(p, p) for p in problems]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for label, key in PART_ROWS:
    cells = []
    for p in problems:
      value = results[p].get("step_parts_seconds", {}).get(key)
      ratio = results[p].get("step_parts_over_fit", {}).get(key)
      if key == "fit_step_xla":
        ratio = results[p].get("fit_xla_over_raw")
        ratio = None if ratio is None else f"{ratio:.2f} x raw"
        if "fit_xla_error" in results[p]:
          op = re.search(r"XLA_\w+_JIT: (\w+)", results[p]["fit_xla_error"])
          cells.append(f"fails: no XLA kernel for {op.group(1)}" if op else "fails")
          continue
      elif ratio is not None:
        ratio = f"{ratio:.2f}"
      cells.append(_fmt(value, "ms") + (f" ({ratio})" if ratio else ""))
    lines.append("| " + " | ".join([label] + cells) + " |")
  return "\n".join(lines)


def _git(*args):
  try:
    return subprocess.run(["git", *args], cwd=os.path.dirname(os.path.abspath(__file__)),
                          capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ""


def resolve_device(device):
  """`device` (e.g. '/GPU:0', 'gpu:0') as the full name of a visible logical device, or None
  for TensorFlow's own placement; a clear error naming the visible devices otherwise."""
  if device is None or device == "":
    return None
  visible = [d.name for d in tf.config.list_logical_devices()]
  wanted = device.strip().upper().lstrip("/")
  for name in visible:
    if name.upper().endswith("DEVICE:" + wanted):
      return name
  raise ValueError(f"`--device` must be one of the visible devices {visible} (or unset), got "
                   f"{device!r}.")


def machine_info():
  load = os.getloadavg()
  return {"cpu_count": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in load],
          "logical_devices": [d.name for d in tf.config.list_logical_devices()],
          "python": platform.python_version(), "tensorflow": tf.__version__,
          "tensorflow_probability": tfp.__version__, "git_commit": _git("rev-parse", "HEAD"),
          "library_changes_not_committed": _git("status", "--porcelain", "--", "tfp_composed")}


OPTIONS = dict(steps=400, image_steps=50, batch_size_2d=64, image_batch_size=16,
               steps_per_execution=20, image_steps_per_execution=5, throughput_batch=256,
               image_throughput_batch=64, repeats=7, prior="random", image_hidden_channels=96,
               train_steps=2, profile=False)


def benchmark(problems, log=print, **options):
  """Runs the benchmark on `problems` ('2d', 'image'); returns `{problem: figures}`.

  `options` override `OPTIONS` (the flags' defaults).
  """
  unknown = set(options) - set(OPTIONS)
  if unknown:
    raise ValueError(f"Unknown options {sorted(unknown)}; expected some of {sorted(OPTIONS)}.")
  o = dict(OPTIONS, **options)
  results = {}
  for name in problems:
    start = time.perf_counter()
    if name == "2d":
      figures = run_problem(two_d_problem(), o["steps"], o["batch_size_2d"],
                            o["steps_per_execution"], o["repeats"], o["throughput_batch"],
                            o["profile"], 0, log)
    elif name == "image":
      figures = run_problem(image_problem(o["prior"], o["image_hidden_channels"]),
                            o["image_steps"], o["image_batch_size"],
                            o["image_steps_per_execution"], o["repeats"],
                            o["image_throughput_batch"], o["profile"], o["train_steps"], log)
    else:
      raise ValueError(f"Unknown problem {name!r}; expected '2d' or 'image'.")
    figures["wall_seconds"] = time.perf_counter() - start
    results[name] = figures
  return results


def report(results, problems, command, info):
  """The JSON payload: command, machine, targets, figures and which targets were met."""
  return {"command": command, "machine": info,
          "targets": {k: list(v) for k, v in TARGETS.items()}, "results": results,
          "met": {p: {k: _met(k, results[p].get(k)) for k in TARGETS} for p in problems}}


def _log_with_time(start):
  def log(message):
    print(f"{time.perf_counter() - start:6.1f}s {message}", flush=True)
  return log


def main(argv):
  del argv
  tf.get_logger().setLevel("ERROR")
  problems = [p.strip() for p in FLAGS.problems]
  command = "python -m experiments.benchmark " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  device = resolve_device(FLAGS.device)
  start = time.perf_counter()
  info = machine_info()
  info["device"] = device or "default placement"
  with tf.device(device) if device else contextlib.nullcontext():
    results = benchmark(problems, log=_log_with_time(start),
                        **{name: FLAGS[name].value for name in OPTIONS})
  info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
  info["total_seconds"] = time.perf_counter() - start
  print()
  print(format_table(results, problems))
  if FLAGS.profile:
    print()
    print(format_parts(results, problems))
  print()
  for p in problems:
    print(f"{p}: {results[p]['description']}; fit batch {results[p]['fit_batch_size']}, "
          f"throughput batch {results[p]['throughput_batch']}")
  print(f"device: {info['device']}; visible: {', '.join(info['logical_devices'])}")
  print(f"load average (1, 5, 15 min) at start {info['load_average_1_5_15']}, at end "
        f"{info['load_average_end']} on {info['cpu_count']} CPUs; {info['total_seconds']:.0f} s")
  if FLAGS.output_json:
    payload = report(results, problems, command, info)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output_json)), exist_ok=True)
    with open(FLAGS.output_json, "w") as f:
      json.dump(payload, f, indent=2, sort_keys=True)
      f.write("\n")
    print(f"wrote {FLAGS.output_json}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
