"""Smoke test of experiments/benchmark.py on tiny problems: figures exist, positive, finite.

No timing assertions: the benchmark's numbers depend on the machine.
"""

import json
import math

import pytest

from experiments import benchmark
from tfp_composed import likelihoods
from tfp_composed import operators
from tfp_composed import pregenerators
from tfp_composed import priors
import tfp_composed as tfc


def _tiny_problem():
  prior = priors.realnvp_dense(2, num_layers=1, hidden_units=8, num_hidden=1, trainable=False)
  likelihood = likelihoods.Gaussian(operators.Mask([True, False]), scale=0.1)
  posterior = tfc.ComposedPosterior(prior, likelihood, observation=[0.5],
                                    pregenerator=pregenerators.affine([2]), num_components=1)
  return {"name": "tiny", "prior": prior, "posterior": posterior, "description": "tiny"}


def _check_positive_finite(figures, keys):
  for key in keys:
    assert key in figures, key
    value = figures[key]
    assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)


def test_run_problem_reports_every_figure():
  figures = benchmark.run_problem(_tiny_problem(), num_steps=6, batch_size=4,
                                  steps_per_execution=2, repeats=1, throughput_batch=8,
                                  profile=False, train_steps=0, log=lambda message: None)
  ratios = [key for key in benchmark.TARGETS]
  seconds = ["fit_step_seconds", "raw_step_seconds", "tfp_vi_step_seconds",
             "tfp_vi_graph_step_seconds", "posterior_samples_per_second",
             "prior_samples_per_second", "latent_samples_per_second", "fit_peak_rss_mb",
             "process_maxrss_mb", "ambient_vi_step_seconds", "fit_over_ambient_vi",
             "fit_over_ambient_vi_cpu", "raw_overlapped_step_seconds",
             "fit_over_raw_overlapped"]
  _check_positive_finite(figures, ratios + seconds)
  # The ambient flow is the baseline's default RealNVP on x-space: parameters of its own.
  assert figures["ambient_vi_parameters"] > figures["posterior_parameters"] > 0
  payload = benchmark.report({"tiny": figures}, ["tiny"], "python -m experiments.benchmark",
                             benchmark.machine_info())
  decoded = json.loads(json.dumps(payload))
  assert set(decoded["met"]["tiny"]) == set(benchmark.TARGETS)
  table = benchmark.format_table({"tiny": figures}, ["tiny"])
  assert "fit step / raw" in table
  assert "fit step / ambient-VI step" in table


def test_prior_training_throughput():
  prior = priors.glow([4, 4, 1], num_levels=1, num_steps=1, hidden_channels=4)
  figures = benchmark.prior_training_throughput(prior.prior_config, batch_size=2, repeats=1,
                                                steps=1)
  _check_positive_finite(figures, ["prior_train_step_seconds", "prior_train_images_per_second"])


def test_device_flag_names_a_visible_device_or_fails_at_the_door():
  assert benchmark.resolve_device(None) is None
  assert benchmark.resolve_device("/CPU:0").endswith("device:CPU:0")
  assert benchmark.resolve_device("cpu:0") == benchmark.resolve_device("/CPU:0")
  with pytest.raises(ValueError, match=r"--device.*CPU:0.*'/TPU:7'"):
    benchmark.resolve_device("/TPU:7")
