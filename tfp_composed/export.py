"""SavedModel export of a composed posterior: `sample` and `log_prob` without this package.

`save(posterior, path)` writes a SavedModel whose functions are graphs of core TensorFlow
ops over the posterior's variables (pre-generator, base mixture) and the frozen prior's
variables (the flow `f`). It loads with plain `tf.saved_model.load(path)` in a process
that imports neither `tfp_composed` nor `tensorflow_probability`:

    x = f(g(eps)),  eps ~ q_base                                   (sample)
    log q(x) = log q_base(eps) - log|det dg/deps| - log|det df/dz|,
               eps = g^{-1}(f^{-1}(x))                              (log_prob)

The loaded object has these `tf.function`s (batch size `B` fixed at export, event shape
`E` the posterior's, `seed` a stateless `[2]` int32 seed as in `tf.random.stateless_*`):

| function | input | output |
| --- | --- | --- |
| `sample(seed)` | `[2]` int32 | `x`: `[B] + E` |
| `log_prob(x)` | `[B'] + E` | `[B']` |
| `sample_and_log_prob(seed)` | `[2]` int32 | `(x, log_prob)`: `[B] + E`, `[B]` |

`B'` is any batch size when the flow traces with an unknown batch dimension (checked at
export; `tfb.Glow` does not) and `B` otherwise. The same functions are also serving
signatures, `loaded.signatures[name](**inputs)`, returning dicts with keys `x` and
`log_prob`. The non-trainable variables `event_shape`, `batch_size` and
`log_prob_batch_size` (`-1`: any) describe the exported shapes.
"""

import os
import uuid

import tensorflow as tf

from tfp_composed import checks

__all__ = ["save", "load", "SIGNATURES"]

SIGNATURES = ("sample", "log_prob", "sample_and_log_prob")


def _posterior_class():
  from tfp_composed import posterior as posterior_lib  # pylint: disable=g-import-not-at-top
  return posterior_lib.ComposedPosterior


def _check_signatures(signatures):
  if isinstance(signatures, str):
    signatures = (signatures,)
  try:
    names = tuple(signatures)
  except TypeError:
    raise TypeError(
        f"`signatures` must be a sequence of names from {list(SIGNATURES)}, got "
        f"{signatures!r}.") from None
  unknown = [n for n in names if n not in SIGNATURES]
  if unknown or not names:
    raise ValueError(
        f"`signatures` must be a non-empty sequence of names from {list(SIGNATURES)}, got "
        f"{signatures!r}.")
  return tuple(dict.fromkeys(names))  # Unique, in order.


def _is_saved_model(path):
  return any(tf.io.gfile.exists(os.path.join(path, name))
             for name in ("saved_model.pb", "saved_model.pbtxt"))


def _check_path(path, overwrite):
  """Returns whether `path` exists; refuses to replace anything but a SavedModel."""
  if not tf.io.gfile.exists(path):
    return False
  if not tf.io.gfile.isdir(path):
    raise ValueError(f"`path` {path!r} exists and is a file, not a directory; nothing was "
                     "written. Pass another `path`.")
  if not tf.io.gfile.listdir(path):
    return True
  if not overwrite:
    raise ValueError(
        f"`path` {path!r} exists and is not empty; nothing was written. Pass "
        "`overwrite=True` to replace a SavedModel there, or another `path`.")
  if not _is_saved_model(path):
    raise ValueError(
        f"`path` {path!r} is a non-empty directory that holds no SavedModel; `overwrite=True` "
        "only replaces a SavedModel, so nothing was written or deleted. Pass another `path`.")
  return True


def _missing_parents(path):
  """The ancestors of `path` that do not exist, outermost first; checks the nearest existing
  one is a writable directory."""
  missing = []
  parent = os.path.dirname(path)
  while parent and not tf.io.gfile.exists(parent):
    missing.insert(0, parent)
    up = os.path.dirname(parent)
    if up == parent:
      break
    parent = up
  if not parent:  # A relative path: under the working directory.
    parent = os.getcwd()
  if tf.io.gfile.exists(parent) and not tf.io.gfile.isdir(parent):
    raise ValueError(
        f"`path` {path!r} is under {parent!r}, which is a file, not a directory; nothing was "
        "written. Pass another `path`.")
  if "://" not in parent and os.path.isdir(parent) and not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"`path` {path!r} is under {parent!r}, which is not writable; nothing "
                     "was written.")
  return missing


def _remove(path):
  if tf.io.gfile.exists(path):
    tf.io.gfile.rmtree(path)


def _collect_variables(posterior):
  """The posterior's and the prior's variables, each once, in a stable order."""
  seen = set()
  variables = []
  for v in list(posterior.variables) + list(posterior.prior.variables):
    if v.ref() not in seen:
      seen.add(v.ref())
      variables.append(v)
  return variables


class _ExportModule(tf.Module):
  """What the SavedModel's root object holds: variables and the exported functions."""

  def __init__(self, posterior, batch_size, names, dynamic_batch):
    super().__init__(name="composed_posterior")
    self.posterior_variables = _collect_variables(posterior)
    event_shape = posterior.event_shape.as_list()
    dtype = posterior.dtype
    self.event_shape = tf.Variable(event_shape, dtype=tf.int32, trainable=False,
                                   name="event_shape")
    self.batch_size = tf.Variable(batch_size, dtype=tf.int32, trainable=False,
                                  name="batch_size")
    seed_spec = tf.TensorSpec([2], tf.int32, name="seed")

    def sample(seed):
      return posterior.sample(batch_size, seed=seed)

    def sample_and_log_prob(seed):
      return posterior.experimental_sample_and_log_prob(batch_size, seed=seed)

    def log_prob(x):
      return posterior.log_prob(x)

    if "log_prob" in names:
      self.log_prob = _log_prob_function(log_prob, event_shape, dtype, batch_size,
                                         dynamic_batch)
      self.log_prob_batch_size = tf.Variable(
          self.log_prob.input_signature[0].shape[0] or -1, dtype=tf.int32, trainable=False,
          name="log_prob_batch_size")
    if "sample" in names:
      self.sample = tf.function(sample, input_signature=[seed_spec])
    if "sample_and_log_prob" in names:
      self.sample_and_log_prob = tf.function(sample_and_log_prob, input_signature=[seed_spec])


def _serving_signatures(module, names):
  """The exported functions as serving signatures returning dicts of named tensors."""
  seed_spec = tf.TensorSpec([2], tf.int32, name="seed")
  signatures = {}
  if "sample" in names:
    signatures["sample"] = tf.function(
        lambda seed: {"x": module.sample(seed)}, input_signature=[seed_spec])
  if "log_prob" in names:
    signatures["log_prob"] = tf.function(
        lambda x: {"log_prob": module.log_prob(x)},
        input_signature=module.log_prob.input_signature)
  if "sample_and_log_prob" in names:

    def sample_and_log_prob(seed):
      x, log_prob = module.sample_and_log_prob(seed)
      return {"x": x, "log_prob": log_prob}

    signatures["sample_and_log_prob"] = tf.function(
        sample_and_log_prob, input_signature=[seed_spec])
  return signatures


def _log_prob_function(log_prob, event_shape, dtype, batch_size, dynamic_batch):
  """`log_prob` as a `tf.function` for any batch size if it traces so and that is allowed,
  else for `batch_size` samples."""

  def traced(batch_dim):
    fn = tf.function(log_prob, input_signature=[
        tf.TensorSpec([batch_dim] + event_shape, dtype, name="x")])
    fn.get_concrete_function()
    return fn

  if dynamic_batch is False:
    return traced(batch_size)
  try:
    return traced(None)
  except Exception as e:  # pylint: disable=broad-except
    if dynamic_batch:
      raise ValueError(
          "`dynamic_batch=True` but the posterior's `log_prob` does not trace with an unknown "
          "batch dimension (e.g. `tfb.Glow` does not); pass `dynamic_batch=None` to fall back "
          f"to the static `batch_size`. ({type(e).__name__}: "
          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
  return traced(batch_size)


def save(posterior, path, batch_size=64, signatures=SIGNATURES, dynamic_batch=None,
         overwrite=False):
  """Writes `posterior` as a SavedModel with `sample` and `log_prob` functions.

  The SavedModel holds the posterior's variables and the frozen prior's, and graphs of
  core TensorFlow ops only, so that `tf.saved_model.load(path)` works without
  `tfp_composed` (or TensorFlow Probability) installed:

      x = f(g(eps)), eps ~ q_base;   log q(x) = log q_base(eps) - log|det d(f o g)/deps|

  The variables' current values are saved. A flow with data-dependent initialization (the
  actnorm layers of `tfb.Glow`) must have been called once before `save`, or the loaded
  model initializes them from its first input. The model is written to a new directory
  next to `path` and moved into place only once complete, so a failed export leaves an
  existing `path` as it was; nothing it wrote (the temporary model, missing parent
  directories it created) is left behind.

  Args:
    posterior: a `tfp_composed.ComposedPosterior` (fitted or not).
    path: directory to create. It must not exist, or be empty; with `overwrite=True` it
      may also hold a SavedModel, which is replaced.
    batch_size: positive int, the number of samples `B` per call of `sample` and
      `sample_and_log_prob` (and the batch size of `log_prob` if it cannot be dynamic).
    signatures: names of the functions to export, from
      `("sample", "log_prob", "sample_and_log_prob")`.
    dynamic_batch: `None` exports `log_prob` for any batch size if the flow traces with an
      unknown batch dimension and for `batch_size` otherwise; `True` requires the former
      (`ValueError` if impossible); `False` always uses `batch_size`.
    overwrite: replace a SavedModel already at `path`. Anything else at `path` is never
      deleted.

  Returns:
    `path`, as a string.

  Raises:
    TypeError: if `posterior` is not a `ComposedPosterior`.
    ValueError: if `path` is empty, lies under a file or an unwritable directory, exists
      and is not empty (unless `overwrite=True` and it holds a SavedModel), for a bad
      `batch_size` or `signatures`, or if a function of the posterior uses a variable that
      the posterior and prior do not track. All are raised before anything is written.

  #### Examples

  ```python
  posterior = tfc.ComposedPosterior(prior, likelihood, observation=y)
  posterior.fit(num_steps=500, seed=0)
  tfc.export.save(posterior, "/tmp/posterior", batch_size=16)

  # In another process, without tfp_composed:
  loaded = tf.saved_model.load("/tmp/posterior")
  x = loaded.sample(tf.constant([1, 2]))                     # [16] + event_shape
  log_q = loaded.log_prob(x)                                 # [16]
  x, log_q = loaded.sample_and_log_prob(tf.constant([3, 4]))
  loaded.signatures["log_prob"](x=x)["log_prob"]             # serving signature
  ```
  """
  if not isinstance(posterior, _posterior_class()):
    raise TypeError(
        "`posterior` must be a tfp_composed.ComposedPosterior, got "
        f"{type(posterior).__name__}.")
  batch_size = checks.positive_integer(batch_size, "batch_size")
  names = _check_signatures(signatures)
  if dynamic_batch not in (None, True, False):
    raise ValueError(f"`dynamic_batch` must be None, True or False, got {dynamic_batch!r}.")
  if not isinstance(overwrite, bool):
    raise TypeError(f"`overwrite` must be a bool, got {overwrite!r}.")
  try:
    path = os.fspath(path)
  except TypeError:
    raise TypeError(f"`path` must be a string or path-like, got {path!r}.") from None
  if isinstance(path, bytes) or not path.strip():
    raise ValueError(f"`path` must name a directory to create, got {path!r}; nothing was "
                     "written.")
  path = path.rstrip("/") or path
  exists = _check_path(path, overwrite)
  missing = _missing_parents(path)

  module = _ExportModule(posterior, batch_size, names, dynamic_batch)
  tmp = f"{path}.export-{uuid.uuid4().hex[:8]}.tmp"
  done = False
  try:
    try:
      tf.saved_model.save(module, tmp, signatures=_serving_signatures(module, names))
    except AssertionError as e:
      if "untracked" in str(e):
        raise ValueError(
            "The posterior's functions use a variable that neither the posterior nor its "
            "prior tracks, so it cannot be saved. Hold every variable of the prior's bijector "
            "as an attribute of a `tf.Module` (a bijector, or its `shift_and_log_scale_fn` "
            f"module), not only in a closure. ({str(e).splitlines()[0]})") from e
      raise
    if exists:
      # `_check_path` allowed it: an empty directory or (with `overwrite`) a SavedModel.
      old = f"{path}.replaced-{uuid.uuid4().hex[:8]}.tmp"
      tf.io.gfile.rename(path, old)
      try:
        tf.io.gfile.rename(tmp, path)
      except BaseException:
        tf.io.gfile.rename(old, path)  # Put the previous model back.
        raise
      tf.io.gfile.rmtree(old)
    else:
      tf.io.gfile.rename(tmp, path)
    done = True
  finally:
    if not done:  # Leave nothing behind: the temporary model, directories made for it.
      _remove(tmp)
      if missing:
        _remove(missing[0])
  return path


def load(path, options=None):
  """Loads an exported posterior: `tf.saved_model.load(path, options=options)`.

  Needs neither `tfp_composed` nor TensorFlow Probability; see the module docstring for
  the loaded object's functions.

  #### Examples

  ```python
  loaded = tfc.export.load("/tmp/posterior")
  x, log_q = loaded.sample_and_log_prob(tf.constant([0, 1]))
  ```
  """
  return tf.saved_model.load(os.fspath(path), options=options)
