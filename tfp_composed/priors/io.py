"""Saving and loading flow priors: a JSON architecture config plus a `tf.train.Checkpoint`.

A prior directory holds

    config.json            {'architecture': ..., 'kwargs': {...}, ...metadata}
    variables.index        tf.train.Checkpoint of the flow's variables
    variables.data-*

No pickle is involved: `load` rebuilds the architecture from the config with frozen
(non-trainable) variables and restores their values. Metadata recorded by
`experiments/train_prior.py` includes `dataset`, `levels`, `test_bits_per_dim`,
`training_time_seconds` and `train_command`.
"""

import json
import os

import tensorflow as tf

from tfp_composed.priors import builders

__all__ = ["PRETRAINED_DIR", "available", "load", "load_config", "save"]

PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
_CONFIG = "config.json"
_VARIABLES = "variables"


def available():
  """Names of the priors shipped in `tfp_composed/priors/pretrained/`."""
  if not os.path.isdir(PRETRAINED_DIR):
    return []
  return sorted(d for d in os.listdir(PRETRAINED_DIR)
                if os.path.exists(os.path.join(PRETRAINED_DIR, d, _CONFIG)))


def _resolve(name_or_dir):
  if not isinstance(name_or_dir, (str, os.PathLike)):
    raise TypeError(f"`name_or_dir` must be a prior name or a directory. Got: {name_or_dir!r}.")
  path = os.fspath(name_or_dir)
  if os.path.exists(os.path.join(path, _CONFIG)):
    return path
  shipped = os.path.join(PRETRAINED_DIR, path)
  if os.sep not in path and os.path.exists(os.path.join(shipped, _CONFIG)):
    return shipped
  raise ValueError(f"No prior at {path!r}: neither a directory with {_CONFIG} nor a shipped "
                   f"prior name; shipped: {available()}.")


def save(prior, directory, config=None):
  """Writes `prior` to `directory` as `config.json` and a checkpoint of its variables.

  Args:
    prior: a distribution built by `tfc.priors` (`realnvp`, `glow`, `realnvp_dense`, `build`).
    directory: output directory (created if missing; existing files are overwritten).
    config: optional dict merged over `prior.prior_config` (e.g. metrics, the training command);
      must be JSON-serializable.

  Returns:
    `directory`.

  #### Examples

  ```python
  prior = tfc.priors.glow([8, 8, 1], num_steps=2, hidden_channels=16)
  tfc.priors.save(prior, '/tmp/my_prior', {'note': 'untrained'})
  same = tfc.priors.load('/tmp/my_prior')
  ```
  """
  base_config = getattr(prior, "prior_config", None)
  if base_config is None:
    raise ValueError(f"{prior!r} has no `prior_config`: build it with tfc.priors.")
  full = json.loads(json.dumps(dict(base_config)))
  if config:
    extra = json.loads(json.dumps(dict(config)))
    if "kwargs" in extra and extra["kwargs"] != full.get("kwargs"):
      raise ValueError(f"`config['kwargs']` {extra['kwargs']} disagrees with the prior's "
                       f"architecture {full.get('kwargs')}.")
    full.update(extra)
  os.makedirs(directory, exist_ok=True)
  tf.train.Checkpoint(flow=builders.flow_module(prior)).write(os.path.join(directory, _VARIABLES))
  with open(os.path.join(directory, _CONFIG), "w") as f:
    json.dump(full, f, indent=2, sort_keys=True)
    f.write("\n")
  return directory


def _config_path(path):
  return os.path.join(path, _CONFIG)


def _read_config(path):
  """The config dict in `path/config.json`; a clear `ValueError` naming the file otherwise."""
  config_path = _config_path(path)
  try:
    with open(config_path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise ValueError(f"{config_path!r} is not a UTF-8 JSON file (byte {e.start} cannot be "
                     "decoded); the prior directory is corrupt.") from None
  try:
    config = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(
        f"{config_path!r} is not valid JSON ({e.msg}: line {e.lineno}, column {e.colno}, "
        f"of {len(text)} characters); the file may be truncated or corrupt.") from None
  if not isinstance(config, dict) or "architecture" not in config:
    raise ValueError(
        f"{config_path!r} must hold a JSON object with an 'architecture' and its 'kwargs', "
        f"got {_short(config)}.")
  return config


def _short(value, limit=120):
  text = " ".join(repr(value).split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def load_config(name_or_dir):
  """The config dict (architecture and recorded metadata) of a saved or shipped prior.

  Raises:
    ValueError: if there is no such prior, or its `config.json` is not a JSON object
      (truncated, corrupt), naming the file.
  """
  return _read_config(_resolve(name_or_dir))


def load(name_or_dir, trainable=False):
  """Restores a prior written by `save`, frozen by default.

  Args:
    name_or_dir: a directory written by `save`, or the name of a shipped prior (`'mnist'`,
      `'digits8x8'`; see `available()`).
    trainable: if `False` (default) the variables are created non-trainable, so the prior
      exposes no `trainable_variables`.

  Returns:
    A `tfd.TransformedDistribution` with `prior_config` holding the full saved config.

  Raises:
    ValueError: if there is no such prior; if `config.json` is truncated, corrupt or does
      not describe an architecture; if the checkpoint is missing, corrupt, or does not
      match the architecture (every variable must get a value and every value a variable).
      The message names the file. Nothing in the directory is changed.

  #### Examples

  ```python
  prior = tfc.priors.load('mnist')            # images [28, 28, 1] in [0, 1]
  x = tf.clip_by_value(prior.sample(16), 0., 1.)
  ```
  """
  path = _resolve(name_or_dir)
  config_path = _config_path(path)
  config = _read_config(path)
  try:
    prior = builders.build(config, trainable=trainable)
  except (TypeError, ValueError) as e:
    raise ValueError(
        f"{config_path!r} does not describe a prior that tfc.priors can build "
        f"(architecture {config.get('architecture')!r}, kwargs "
        f"{_short(config.get('kwargs'))}): {_first_line(e)}") from e
  prefix = os.path.join(path, _VARIABLES)
  if not tf.io.gfile.exists(prefix + ".index"):
    raise ValueError(f"{path!r} has a {_CONFIG} but no checkpoint {prefix + '.index'!r}: "
                     "save the prior with tfc.priors.save.")
  mismatch = (f"The checkpoint {prefix!r} does not match the architecture in {config_path!r} "
              f"({config.get('architecture')!r} with kwargs {_short(config.get('kwargs'))}); "
              f"was {_CONFIG} edited or copied from another prior?")
  checkpoint = tf.train.Checkpoint(flow=builders.flow_module(prior))
  try:
    status = checkpoint.read(prefix)
  except ValueError as e:  # A variable of another shape.
    raise ValueError(f"{mismatch} {_first_line(e)}") from e
  except (tf.errors.OpError, IndexError) as e:  # An unreadable index or data file.
    raise ValueError(f"The checkpoint {prefix!r} is corrupt or unreadable: "
                     f"{_first_line(e)}") from e
  try:
    status.assert_consumed()
  except AssertionError as e:
    status.expect_partial()  # The error says it; no second report at garbage collection.
    raise ValueError(f"{mismatch} {_unmatched(e)}") from e
  builders.set_config(prior, config)
  return prior


def _first_line(error):
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _unmatched(error):
  """The count sentence of a checkpoint `AssertionError`, without the variables' values."""
  text = str(error).strip()
  first = text.split(". ")[0] if text else ""
  return first[:300] + "." if first else ""
