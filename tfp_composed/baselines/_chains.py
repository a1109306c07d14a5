"""Many parallel MCMC chains in compiled chunks, under a step or wall-clock budget.

`run_chains(kernel, init_state, ...)` runs a `tfp.mcmc` kernel (wrapped in
`tfp.mcmc.DualAveragingStepSizeAdaptation` when it adapts) in two phases:

1. warm-up: the step size adapts; `warmup_fraction` of the steps (or of the time) go here and
   the draws are discarded;
2. sampling: the step size is frozen at the dual-averaging average
   `exp(log_averaging_step)` (the adaptation kernel's own end-of-adaptation value) and every
   `thin`-th state is recorded.

Step `t` (counted over both phases) uses the stateless seed `fold_in(seed, t)`, so the chain is
the same however its steps are split into chunks: with `num_steps` the output is
deterministic given `seed`. Under a wall-clock deadline, the chunk length is chosen from the
measured time per step so that a chunk takes a small share of the budget, and a chunk that
would end past the deadline is shortened or not run.
"""

import collections
import time

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

__all__ = ["ChainOutput", "StepSizeInResults", "run_chains", "select"]

# Each chunk aims at this share of a phase's time (clamped below) so the clock is read often.
_CHUNK_SHARE = 0.04
_MIN_CHUNK_SECONDS = 0.02
_MAX_CHUNK_SECONDS = 2.
# Default number of recorded draws per chain (more than `num_samples / chains` when that is
# small, so ESS and R-hat have enough draws).
_MIN_RECORDS = 64

StepSizeResults = collections.namedtuple("StepSizeResults", ["inner_results", "step_size"])


class StepSizeInResults(tfp.mcmc.TransitionKernel):
  """Carries `step_size` in the kernel results of a kernel that takes it as an argument.

  `tfp.mcmc.MetropolisAdjustedLangevinAlgorithm`, `UncalibratedLangevin` and
  `RandomWalkMetropolis` keep their step size (or proposal scale) in the constructor, not in
  their results, so `tfp.mcmc.DualAveragingStepSizeAdaptation` cannot set it. This kernel
  rebuilds `make_kernel(step_size)` at every step from the step size in its results, where the
  adaptation's default setter and getter find it. The transition itself is the wrapped
  kernel's.
  """

  def __init__(self, make_kernel, step_size, name="step_size_in_results"):
    self._make_kernel = make_kernel
    self._step_size = step_size
    self._parameters = dict(make_kernel=make_kernel, step_size=step_size, name=name)

  @property
  def parameters(self):
    return self._parameters

  @property
  def is_calibrated(self):
    return self._make_kernel(self._step_size).is_calibrated

  def one_step(self, current_state, previous_kernel_results, seed=None):
    step_size = previous_kernel_results.step_size
    kernel = self._make_kernel(step_size)
    inner = _drift_at(previous_kernel_results.inner_results, step_size)
    state, inner = kernel.one_step(current_state, inner, seed=seed)
    return state, previous_kernel_results._replace(inner_results=inner)

  def bootstrap_results(self, init_state):
    step_size = tf.nest.map_structure(tf.convert_to_tensor, self._step_size)
    return StepSizeResults(self._make_kernel(step_size).bootstrap_results(init_state),
                           step_size)


def _drift_at(results, step_size):
  """Langevin results with the current state's drift recomputed at `step_size`.

  `tfp.mcmc` Langevin kernels cache the drift `0.5 h (v^2 grad log p + grad v^2)` of the
  current state in their results, computed with the step size `h` of the step that reached
  it, and reuse it for the next proposal. When the step size changes between steps, the
  forward proposal would then use the old `h` and the reverse density the new one: the
  acceptance ratio is wrong (as `h` shrinks it falls towards 0 and dual averaging shrinks
  `h` to 0). Other results pass through unchanged.
  """
  accepted = getattr(results, "accepted_results", None)
  if accepted is None or "diffusion_drift" not in getattr(accepted, "_fields", ()):
    return results
  grads = accepted.grads_target_log_prob
  listed = isinstance(grads, (list, tuple))
  parts = zip(*(tf.nest.flatten(v) for v in (accepted.volatility, accepted.grads_volatility,
                                              grads)))
  steps = tf.nest.flatten(step_size)
  steps = steps * len(tf.nest.flatten(grads)) if len(steps) == 1 else steps
  drift = [0.5 * tf.cast(h, g.dtype) * (tf.square(v) * g + gv)
           for h, (v, gv, g) in zip(steps, parts)]
  drift = drift if listed else drift[0]
  return results._replace(accepted_results=accepted._replace(diffusion_drift=drift))


class ChainOutput(collections.namedtuple(
    "ChainOutput", ["records", "step_size", "acceptance", "num_warmup_steps",
                    "num_sampling_steps", "thin", "warmup_seconds"])):
  """`records`: list (one per state part) of NumPy arrays `[R, C] + part_shape`."""


def _find(results, name):
  """The innermost field `name` of nested kernel results, or None."""
  found = None
  stack = [results]
  while stack:
    r = stack.pop()
    if hasattr(r, "_fields"):
      if name in r._fields:
        found = getattr(r, name)
      stack.extend(getattr(r, f) for f in r._fields if hasattr(getattr(r, f), "_fields"))
  return found


def _accept_prob(results, num_chains, dtype):
  log_ratio = _find(results, "log_accept_ratio")
  if log_ratio is None:
    return tf.ones([num_chains], dtype)
  p = tf.exp(tf.minimum(tf.cast(log_ratio, dtype), 0.))
  return tf.where(tf.math.is_finite(p), p, tf.zeros_like(p))


def _make_runner(kernel, num_chains, dtype, jit_compile):
  """A compiled `run(state, results, seed, offset, num_records, thin)`: runs
  `num_records * thin` steps and records the state after every `thin` steps."""

  @tf.function(jit_compile=bool(jit_compile), reduce_retracing=True)
  def run(state, results, seed, offset, num_records, thin):
    arrays = [tf.TensorArray(s.dtype, size=num_records, element_shape=s.shape)
              for s in tf.nest.flatten(state)]

    def record_body(r, state, results, accept, arrays):
      def step_body(i, state, results, accept):
        step_seed = tf.random.experimental.stateless_fold_in(seed, offset + r * thin + i)
        state, results = kernel.one_step(state, results, seed=step_seed)
        return i + 1, state, results, accept + _accept_prob(results, num_chains, dtype)

      _, state, results, accept = tf.while_loop(
          lambda i, *_: i < thin, step_body, (tf.constant(0), state, results, accept))
      arrays = [a.write(r, s) for a, s in zip(arrays, tf.nest.flatten(state))]
      return r + 1, state, results, accept, arrays

    _, state, results, accept, arrays = tf.while_loop(
        lambda r, *_: r < num_records, record_body,
        (tf.constant(0), state, results, tf.zeros([num_chains], dtype), arrays))
    return state, results, accept, [a.stack() for a in arrays]

  return run


class _Timer:
  """Seconds per step, measured on the chunks after the first (which includes tracing)."""

  def __init__(self):
    self.calls = 0
    self.per_step = None

  def timed(self, fn, steps, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, out[2])
    seconds = time.perf_counter() - t0
    if self.calls > 0:
      self.per_step = seconds / steps
    elif self.per_step is None:
      self.per_step = seconds / steps  # An overestimate (tracing), replaced next chunk.
    self.calls += 1
    return out


def _chunk_steps(timer, clock, phase_seconds, planned_left, unit):
  """Steps for the next chunk (a multiple of `unit`), or 0 to stop.

  Without a budget: all planned steps at once. With one, the first two chunks are short (the
  first traces, the second measures the time per step); later ones aim at `_CHUNK_SHARE` of
  the phase and never run past the deadline by the measured time per step.
  """
  if not clock.has_budget:
    steps = planned_left
  elif clock.expired():
    return 0
  elif timer.calls < 2:
    steps = unit * max(1, -(-8 // unit))
  else:
    left = clock.remaining()
    target = min(_MAX_CHUNK_SECONDS, max(_MIN_CHUNK_SECONDS, _CHUNK_SHARE * phase_seconds))
    steps = int(min(target, left) / max(timer.per_step, 1e-7))
    if steps < unit:
      # A chunk shorter than one record: still run one record if it fits before the deadline.
      if left < unit * timer.per_step:
        return 0
      steps = unit
  if planned_left is not None:
    steps = min(steps, planned_left)
  return (steps // unit) * unit


def run_chains(kernel, init_state, *, clock, seed, num_steps=None, num_samples=1000,
               adapt=True, sampling_kernel=None, warmup_fraction=0.5, jit_compile=False,
               num_records=None):
  """Runs `kernel` from `init_state` (a tensor or list of tensors with leading chain axis).

  Args:
    kernel: a `tfp.mcmc` kernel; with `adapt`, a `DualAveragingStepSizeAdaptation`.
    init_state: initial states, `[C] + part_shape` per part.
    clock: a `_core.Clock` (its deadline is the end of sampling).
    seed: shape-[2] stateless seed.
    num_steps: total steps (warm-up + sampling), or None to run to the clock's deadline.
    num_samples: draws wanted in total across chains.
    adapt: whether `kernel` is a dual-averaging adaptation kernel (its step size is frozen
      after warm-up).
    sampling_kernel: `(kernel, set_step_size)` to switch kernels after warm-up (ULA):
      `set_step_size(adapted_step_size)` is called at the switch (the kernel should read its
      step size from a `tf.Variable`), and the kernel is traced before the warm-up starts so
      that its tracing is not charged to the sampling phase.
    warmup_fraction: share of the steps (or the time) spent in warm-up.
    jit_compile: compile chunks with XLA.
    num_records: recorded draws per chain (default `max(ceil(num_samples / C), 64)`).

  Returns:
    A `ChainOutput`.
  """
  state = init_state
  parts = tf.nest.flatten(state)
  num_chains = int(parts[0].shape[0])
  dtype = parts[0].dtype
  records_wanted = num_records or max(-(-num_samples // num_chains), _MIN_RECORDS)
  if num_steps is not None:
    warmup_steps = int(round(num_steps * warmup_fraction))
    sampling_steps = num_steps - warmup_steps
  else:
    warmup_steps = sampling_steps = None

  results = kernel.bootstrap_results(state)
  runner = _make_runner(kernel, num_chains, dtype, jit_compile)
  timer = _Timer()
  if sampling_kernel is not None:
    next_kernel, set_step_size = sampling_kernel
    next_runner = _make_runner(next_kernel, num_chains, dtype, jit_compile)
    next_runner.get_concrete_function(
        state, next_kernel.bootstrap_results(state), seed, tf.constant(0), tf.constant(1),
        tf.constant(1))
  offset = 0
  accept_total = np.zeros([num_chains])

  def run_for(steps, num_rec, thin_steps):
    nonlocal state, results
    state, results, accept, arrays = timer.timed(
        runner, steps, state, results, seed, tf.constant(offset), tf.constant(num_rec),
        tf.constant(thin_steps))
    return accept, arrays

  # Warm-up. Its share of the budget is taken after the first chunk, which traces.
  t_warm = time.perf_counter()
  warm_clock = None
  while True:
    left = None if warmup_steps is None else warmup_steps - offset
    if left is not None and left <= 0:
      break
    if timer.calls == 0:
      steps = _chunk_steps(timer, clock, 0., left, 1)
    else:
      if warm_clock is None:
        warm_clock = clock.split(warmup_fraction)
        warm_seconds = max(0., warm_clock.remaining())
      steps = _chunk_steps(timer, warm_clock, warm_seconds, left, 1)
    if steps <= 0:
      break
    run_for(steps, 1, steps)
    offset += steps
  num_warmup = offset
  warmup_seconds = time.perf_counter() - t_warm

  if adapt:
    # The dual-averaging average, in the structure of the step size the kernel was given.
    step_size = tf.nest.pack_sequence_as(
        results.new_step_size, [tf.exp(s) for s in tf.nest.flatten(results.log_averaging_step)])
    setter = kernel.parameters["step_size_setter_fn"]
    results = results._replace(
        inner_results=setter(results.inner_results, step_size),
        new_step_size=step_size,
        num_adaptation_steps=tf.cast(results.step, results.num_adaptation_steps.dtype))
  else:
    step_size = None

  per_step = timer.per_step
  if sampling_kernel is not None:
    set_step_size(step_size)
    kernel, runner = next_kernel, next_runner
    results = kernel.bootstrap_results(state)
    timer = _Timer()
    timer.calls = 1  # Traced already: the next chunk measures.

  # Sampling: thin so that about `records_wanted` states per chain are recorded; under a
  # budget the thinning comes from the time per step, and doubles (keeping every other
  # record) whenever twice as many records as wanted have been kept.
  thins = []
  if sampling_steps is not None:
    thins.append(sampling_steps // records_wanted)
  if clock.has_budget and per_step is not None:
    thins.append(int(max(0., clock.remaining()) / per_step // records_wanted))
  thin = max(1, min(thins)) if thins else 1
  samp_seconds = max(0., clock.remaining()) if clock.has_budget else 0.
  recorded = [[] for _ in parts]
  num_recorded = 0
  done = 0
  while True:
    if sampling_steps is None:
      left = None
    else:
      left = sampling_steps - done
      left -= left % thin
      if left <= 0:
        break
    steps = _chunk_steps(timer, clock, samp_seconds, left, thin)
    if steps <= 0:
      break
    accept, arrays = run_for(steps, steps // thin, thin)
    for store, a in zip(recorded, arrays):
      store.append(a.numpy())
    num_recorded += steps // thin
    accept_total += accept.numpy()
    offset += steps
    done += steps
    if num_recorded >= 2 * records_wanted and sampling_steps is None:
      recorded = [[np.concatenate(r, axis=0)[1::2]] for r in recorded]
      num_recorded = recorded[0][0].shape[0]
      thin *= 2
  if not recorded[0]:
    # No time was left to sample: the warm-up's final state is the only draw.
    recorded = [[p.numpy()[None]] for p in tf.nest.flatten(state)]
  records = [np.concatenate(r, axis=0) for r in recorded]
  acceptance = accept_total / done if done else np.full([num_chains], np.nan)
  if step_size is None:
    step_size_value = None
  else:
    step_size_value = [float(np.asarray(s).mean()) for s in tf.nest.flatten(step_size)]
    step_size_value = step_size_value[0] if len(step_size_value) == 1 else step_size_value
  return ChainOutput(records=records, step_size=step_size_value, acceptance=acceptance,
                     num_warmup_steps=num_warmup, num_sampling_steps=done, thin=thin,
                     warmup_seconds=warmup_seconds)


def select(records, num_samples):
  """`num_samples` draws from records `[R, C, ...]`: evenly spaced in time, every chain."""
  num_records, num_chains = records.shape[:2]
  per_chain = min(num_records, -(-num_samples // num_chains))
  index = np.unique(np.round(np.linspace(0, num_records - 1, per_chain)).astype(int))
  chosen = records[index].reshape((-1,) + records.shape[2:])
  return chosen[-num_samples:]
