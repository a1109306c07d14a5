"""tfp_composed: posterior inference with pretrained normalizing-flow priors.

A frozen flow prior `p(x) = TransformedDistribution(base, f)` and an observation model
`p(y | x)` define the posterior `p(x | y)`. A trainable pre-generator bijector `g` in the
flow's latent space is fitted by variational inference, and the composed posterior
`q = TransformedDistribution(base_q, Chain([f, g]))` is an ordinary TFP distribution
(Whang, Lindgren & Dimakis, ICML 2021).
"""

import importlib

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("operators", "likelihoods", "pregenerators", "posterior", "training",
                    "baselines", "export", "data", "priors", "problems")


def __getattr__(name):
  if name in _LAZY_SUBMODULES:
    return importlib.import_module(f"tfp_composed.{name}")
  if name in ("ComposedPosterior", "condition"):
    posterior = importlib.import_module("tfp_composed.posterior")
    return getattr(posterior, name)
  raise AttributeError(f"module 'tfp_composed' has no attribute {name!r}")
