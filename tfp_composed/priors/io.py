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


def load_config(name_or_dir):
  """The config dict (architecture and recorded metadata) of a saved or shipped prior."""
  with open(os.path.join(_resolve(name_or_dir), _CONFIG)) as f:
    return json.load(f)


def load(name_or_dir, trainable=False):
  """Restores a prior written by `save`, frozen by default.

  Args:
    name_or_dir: a directory written by `save`, or the name of a shipped prior (`'mnist'`,
      `'digits8x8'`; see `available()`).
    trainable: if `False` (default) the variables are created non-trainable, so the prior
      exposes no `trainable_variables`.

  Returns:
    A `tfd.TransformedDistribution` with `prior_config` holding the full saved config.

  #### Examples

  ```python
  prior = tfc.priors.load('mnist')            # images [28, 28, 1] in [0, 1]
  x = tf.clip_by_value(prior.sample(16), 0., 1.)
  ```
  """
  path = _resolve(name_or_dir)
  config = load_config(path)
  prior = builders.build(config, trainable=trainable)
  status = tf.train.Checkpoint(flow=builders.flow_module(prior)).read(
      os.path.join(path, _VARIABLES))
  status.assert_existing_objects_matched()
  builders.set_config(prior, config)
  return prior
