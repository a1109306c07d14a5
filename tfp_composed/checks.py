"""Argument checks shared by the library: one definition of each, with messages that name the
argument, the expected value and the received one.

NumPy scalars are accepted wherever Python numbers are (`np.float32(1e-3)`, `np.int64(5)`).
"""

import math
import numbers

import numpy as np
import tensorflow as tf

__all__ = ["boolean", "integer", "non_negative_integer", "positive_integer", "positive_number",
           "seed", "stateless_seed"]


def boolean(value, name):
  """Returns `value` as a Python bool; rejects anything but `True`, `False` and NumPy bools."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"`{name}` must be True or False, got {value!r}.")
  return bool(value)


def integer(value, name, minimum=None):
  """Returns `value` as a Python int; rejects bools, non-integers and values below `minimum`."""
  what = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}.get(
      minimum, f"an integer >= {minimum}")
  if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral)
      or (minimum is not None and value < minimum)):
    raise ValueError(f"`{name}` must be {what}, got {value!r}.")
  return int(value)


def positive_integer(value, name):
  """Returns `value` as a Python int >= 1."""
  return integer(value, name, minimum=1)


def non_negative_integer(value, name):
  """Returns `value` as a Python int >= 0."""
  return integer(value, name, minimum=0)


def positive_number(value, name):
  """Returns `value` as a positive finite Python float (NumPy scalars accepted)."""
  if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)
      or not (math.isfinite(value) and value > 0)):
    raise ValueError(f"`{name}` must be a positive finite number, got {value!r}.")
  return float(value)


def non_negative_number(value, name):
  """Returns `value` as a finite Python float >= 0 (NumPy scalars accepted)."""
  if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)
      or not (math.isfinite(value) and value >= 0)):
    raise ValueError(f"`{name}` must be a non-negative finite number, got {value!r}.")
  return float(value)


def seed(value, name="seed"):
  """Returns an int seed (NumPy integers accepted)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
    raise TypeError(f"`{name}` must be an int, got {value!r}.")
  return int(value)


def stateless_seed(seed, *salt):
  """A shape-[2] int32 stateless seed from an int seed and integer salts (one per purpose).

  The same arguments give the same seed in any process and at any call, unlike
  `tfp.random.sanitize_seed(int)`, which draws it from a stateful op (a different seed at
  each call in a process).
  """
  value = tf.constant([seed % 2**31, (seed // 2**31) % 2**31], tf.int32)
  for s in salt:
    value = tf.random.experimental.stateless_fold_in(value, s)
  return value
