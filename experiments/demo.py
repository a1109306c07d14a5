r"""Conditioning a 2-D flow prior on one observed coordinate.

Trains a small RealNVP prior on a toy density (maximum likelihood, under a minute), observes
`y = x1 + N(0, noise^2)`, fits the composed posterior with
more steps than `fit()`'s defaults (the thin moons make a thin, curved latent posterior) and
writes one figure: prior samples, posterior samples over the exact posterior
density, and the posterior's `x2` marginal against the exact one (normalized on a grid).

    python -m experiments.demo --density=moons --output=outputs/demo.png
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import time

from absl import app
from absl import flags
from absl import logging
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import tfp_composed as tfc

_DENSITY = flags.DEFINE_string("density", "moons", "Toy density of the prior (tfc.data.toy_2d).")
_PRIOR_STEPS = flags.DEFINE_integer("prior_steps", 2000, "Maximum-likelihood steps of the prior.")
_OBSERVED = flags.DEFINE_float("observed", 0.5, "Observed value of x1.")
_NOISE = flags.DEFINE_float("noise", 0.05, "Observation noise scale.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of prior training and of the fit.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 4000, "Fit steps.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 3e-3, "Peak fit learning rate.")
_OUTPUT = flags.DEFINE_string("output", "outputs/demo.png", "Path of the PNG figure.")


def grid_posterior(prior, likelihood, y, lo, hi, n=400):
  """Exact posterior density on an `n x n` grid over `[lo, hi]^2` (normalized there)."""
  xs = np.linspace(lo[0], hi[0], n)
  ys = np.linspace(lo[1], hi[1], n)
  grid = np.stack(np.meshgrid(xs, ys, indexing="ij"), -1).reshape(-1, 2).astype(np.float32)
  log_unnorm = (prior.log_prob(grid) + likelihood.log_prob(y, grid)).numpy().astype(np.float64)
  cell = (xs[1] - xs[0]) * (ys[1] - ys[0])
  m = log_unnorm.max()
  log_z = m + np.log(np.exp(log_unnorm - m).sum() * cell)
  return xs, ys, np.exp(log_unnorm - log_z).reshape(n, n), log_z


def main(argv):
  del argv
  t0 = time.time()
  prior = tfc.priors.toy_prior(_DENSITY.value, num_steps=_PRIOR_STEPS.value, seed=_SEED.value)
  prior_seconds = time.time() - t0
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Mask([True, False]), scale=_NOISE.value)
  y = np.array([_OBSERVED.value], np.float32)

  posterior = tfc.ComposedPosterior(prior, likelihood, y)
  t1 = time.time()
  history = posterior.fit(num_steps=_NUM_STEPS.value, learning_rate=_LEARNING_RATE.value,
                          seed=_SEED.value, verbose=1)
  fit_seconds = time.time() - t1

  prior_x = prior.sample(4000, seed=1).numpy()
  post_x, post_lq = posterior.experimental_sample_and_log_prob(20000, seed=2)
  post_x = post_x.numpy()
  lo = np.minimum(prior_x.min(0), post_x.min(0)) - 0.5
  hi = np.maximum(prior_x.max(0), post_x.max(0)) + 0.5
  xs, ys, density, log_z = grid_posterior(prior, likelihood, y, lo, hi)
  exact_lp = (prior.log_prob(post_x) + likelihood.log_prob(y, post_x)).numpy() - log_z
  kl = float(np.mean(post_lq.numpy() - exact_lp))
  cell_x = xs[1] - xs[0]
  marginal_x2 = density.sum(0) * cell_x

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
  axes[0].scatter(prior_x[:, 0], prior_x[:, 1], s=2, alpha=0.4)
  axes[0].axvline(_OBSERVED.value, color="k", lw=0.8, ls="--")
  axes[0].set_title(f"prior samples ({_DENSITY.value}); dashed: observed x1")
  axes[1].contourf(xs, ys, density.T, levels=20, cmap="Blues")
  axes[1].scatter(post_x[:2000, 0], post_x[:2000, 1], s=2, color="C3", alpha=0.5)
  axes[1].set_xlim(_OBSERVED.value - 8 * _NOISE.value, _OBSERVED.value + 8 * _NOISE.value)
  axes[1].set_title("posterior samples (red) over exact posterior density")
  axes[2].hist(post_x[:, 1], bins=120, density=True, alpha=0.5, color="C3",
               label="composed posterior")
  axes[2].plot(ys, marginal_x2, color="k", label="exact p(x2 | y)")
  axes[2].set_title(f"x2 marginal; KL(q || p) = {kl:.3f} nats")
  axes[2].legend()
  for ax in axes:
    ax.set_xlabel("x1" if ax is not axes[2] else "x2")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  fig.savefig(_OUTPUT.value, dpi=110)
  summary = {
      "density": _DENSITY.value, "observed_x1": _OBSERVED.value, "noise": _NOISE.value,
      "prior_training_seconds": round(prior_seconds, 1), "fit_seconds": round(fit_seconds, 1),
      "modes_found": getattr(posterior, "modes_found", 1),
      "final_loss": float(np.mean(history.history["loss"][-100:])),
      "kl_q_to_exact_nats": round(kl, 4), "figure": _OUTPUT.value,
  }
  print(json.dumps(summary, indent=2))
  logging.info("wrote %s", _OUTPUT.value)


if __name__ == "__main__":
  app.run(main)
