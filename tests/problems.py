"""Exact problems shared by the tests: re-exported from `tfp_composed.problems`."""

from tfp_composed.problems import GridPosterior  # noqa: F401
from tfp_composed.problems import LinearGaussian  # noqa: F401
from tfp_composed.problems import banana_prior  # noqa: F401
from tfp_composed.problems import mc_kl  # noqa: F401
