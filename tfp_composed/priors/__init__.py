"""Pretrained normalizing-flow priors: builders, save/load, shipped MNIST and 8x8-digits priors.

    prior = tfc.priors.load('mnist')     # frozen tfd.TransformedDistribution over [28, 28, 1]

Image priors are densities over images in `[0, 1]` (logit preprocessing included in the
bijector); see `tfp_composed/priors/README.md` for the shipped priors' test bits/dim and the
commands that trained them.
"""

from tfp_composed.priors.builders import ARCHITECTURES
from tfp_composed.priors.builders import build
from tfp_composed.priors.builders import data_init
from tfp_composed.priors.builders import flow_module
from tfp_composed.priors.builders import glow
from tfp_composed.priors.builders import grow_from
from tfp_composed.priors.builders import realnvp
from tfp_composed.priors.builders import realnvp_dense
from tfp_composed.priors.builders import tempered
from tfp_composed.priors.io import PRETRAINED_DIR
from tfp_composed.priors.io import available
from tfp_composed.priors.io import load
from tfp_composed.priors.io import load_config
from tfp_composed.priors.io import save
from tfp_composed.priors.layers import MultiScaleFlowBijector
from tfp_composed.priors.layers import SplitPrior
from tfp_composed.priors.toy import fit_maximum_likelihood
from tfp_composed.priors.toy import toy_prior

__all__ = [
    "ARCHITECTURES",
    "MultiScaleFlowBijector",
    "PRETRAINED_DIR",
    "SplitPrior",
    "available",
    "build",
    "data_init",
    "fit_maximum_likelihood",
    "flow_module",
    "glow",
    "grow_from",
    "load",
    "load_config",
    "realnvp",
    "realnvp_dense",
    "save",
    "tempered",
    "toy_prior",
]
