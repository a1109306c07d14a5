"""What every baseline shares: the `Result`, the wall clock of a budget, seeds, a problem.

A budget is wall time from the call of `run` to its return, tracing included. Methods spend
it in compiled chunks and look at the clock between chunks; `Clock.split` hands a share of
the remaining time to one phase (a warm-up, a variational fit before SIR or NeuTra HMC).
"""

import dataclasses
import math
import numbers
import time
from typing import Any, Optional

import numpy as np
import tensorflow as tf
import tf_keras

from tfp_composed import checks

__all__ = ["Clock", "Problem", "Result", "StopAtDeadline", "num_parameters", "stateless_seed",
           "unit_interval"]


@dataclasses.dataclass
class Result:
  """What a method returns.

  Attributes:
    method: the method's name in `METHODS`.
    x: samples (or, for `map`, one optimum per restart), NumPy, `[n] + event_shape`.
    log_prob: `log q(x)` per sample, `[n]`, where the method has a density; else None.
    seconds: wall time of the whole call, tracing included.
    info: method-specific: step size, acceptance, ESS, R-hat, losses, number of trainable
      parameters, and for the composed methods the fitted posterior under `"posterior"`.
  """
  method: str
  x: np.ndarray
  log_prob: Optional[np.ndarray]
  seconds: float
  info: dict = dataclasses.field(default_factory=dict)

  @property
  def num_samples(self):
    return int(self.x.shape[0])


@dataclasses.dataclass
class Problem:
  """The inputs of a method: prior, likelihood, observation and their latent target."""
  prior: Any
  likelihood: Any
  observation: tf.Tensor
  target: Any

  @property
  def dtype(self):
    return self.prior.dtype

  @property
  def latent_shape(self):
    return self.target.latent_event_shape

  @property
  def event_shape(self):
    return self.prior.event_shape


class Clock:
  """Wall clock with an optional deadline (`budget_seconds` from construction)."""

  def __init__(self, budget_seconds=None, start=None, deadline=None):
    self.start = time.perf_counter() if start is None else start
    if deadline is not None:
      self.deadline = deadline
    else:
      self.deadline = math.inf if budget_seconds is None else self.start + budget_seconds

  @property
  def has_budget(self):
    return math.isfinite(self.deadline)

  def now(self):
    return time.perf_counter()

  def elapsed(self):
    return time.perf_counter() - self.start

  def remaining(self):
    return self.deadline - time.perf_counter()

  def expired(self, reserve=0.):
    """Whether less than `reserve` seconds are left."""
    return time.perf_counter() + reserve >= self.deadline

  def split(self, fraction):
    """A clock whose deadline is `fraction` of the time remaining on this one."""
    if not self.has_budget:
      return Clock(start=self.now())
    now = time.perf_counter()
    return Clock(start=now, deadline=now + fraction * max(0., self.deadline - now))

  def until(self, reserve):
    """A clock ending `reserve` seconds before this one."""
    return Clock(start=self.now(), deadline=self.deadline - reserve)


class StopAtDeadline(tf_keras.callbacks.Callback):
  """Stops `training.fit` when its next chunk of steps would end past the clock's deadline.

  The loop checks `model.stop_training` after every `steps_per_execution` steps; the
  duration of the last chunk (the first includes tracing and is not used) predicts the next.
  """

  def __init__(self, clock):
    super().__init__()
    self._clock = clock
    self._began = None
    self._last = 0.
    self.stopped = False

  def on_epoch_begin(self, epoch, logs=None):
    self._began = time.perf_counter()

  def on_epoch_end(self, epoch, logs=None):
    if self._began is not None and epoch > 0:
      self._last = time.perf_counter() - self._began
    if self._clock.expired(reserve=self._last):
      self.model.stop_training = True
      self.stopped = True


stateless_seed = checks.stateless_seed


def unit_interval(value, name):
  """Returns `value` as a float in the open interval (0, 1)."""
  if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)
      or not 0 < value < 1):
    raise ValueError(f"`{name}` must be a number in (0, 1), got {value!r}.")
  return float(value)


def num_parameters(variables):
  """Total number of scalars in `variables`."""
  return int(sum(np.prod(v.shape.as_list()) for v in variables))
