r"""Inpainting a held-out test digit with a shipped flow prior.

Observes a test image through a mask (default: the lower half missing) with Gaussian noise,
fits the composed posterior over the whole image, and writes one figure:
observation | truth | posterior samples | posterior mean | per-pixel posterior std.

    python -m experiments.inpaint --prior=mnist --index=0 --mask=lower_half \
        --output=outputs/inpainting.png
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import time

from absl import app
from absl import flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf

import tfp_composed as tfc

_PRIOR = flags.DEFINE_string(
    "prior", None, "Shipped prior name or saved prior directory (default: 'mnist' if shipped, "
    "else 'digits8x8').")
_INDEX = flags.DEFINE_integer("index", 0, "Index of the held-out test image.")
_MASK = flags.DEFINE_enum("mask", "lower_half",
                          ["lower_half", "upper_half", "left_half", "right_half", "center",
                           "random_90"], "Which pixels are missing.")
_NOISE = flags.DEFINE_float("noise", 0.05, "Observation noise scale (images in [0, 1]).")
_NUM_STEPS = flags.DEFINE_integer(
    "num_steps", 3000, "Fit steps (0: fit()'s default, 1280 for MNIST's 784-dim latent).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16,
                                   "Samples per fit step (0: fit()'s default, 16 for images).")
_INIT = flags.DEFINE_enum("init", "none", ["auto", "map", "laplace", "none"],
                          "fit()'s init: 'auto' (above 256 latent dims the L-BFGS MAP + "
                          "low-rank Laplace start 'map'), the dense multi-start 'laplace', or "
                          "'none' (from the prior). `--num_steps=0 --batch_size=0 --init=auto` "
                          "is fit()'s defaults: about 2 minutes on MNIST, 15 nats of ELBO below "
                          "these flags' 3000 steps from the prior (results/image_defaults.md).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the fit.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory.")
_OUTPUT = flags.DEFINE_string("output", "outputs/inpainting.png", "Path of the PNG figure.")


def make_mask(kind, shape, seed=0):
  """Boolean mask of observed pixels for an image of `shape` [H, W, C]."""
  h, w, _ = shape
  observed = np.ones(shape, bool)
  if kind == "lower_half":
    observed[h // 2:] = False
  elif kind == "upper_half":
    observed[:h // 2] = False
  elif kind == "left_half":
    observed[:, :w // 2] = False
  elif kind == "right_half":
    observed[:, w // 2:] = False
  elif kind == "center":
    observed[h // 4:h - h // 4, w // 4:w - w // 4] = False
  elif kind == "random_90":
    observed = np.random.RandomState(seed).uniform(size=shape) > 0.9
  else:
    raise ValueError(f"`mask` must be one of lower_half, upper_half, left_half, right_half, "
                     f"center, random_90; got {kind!r}.")
  return observed


def main(argv):
  del argv
  name = _PRIOR.value or ("mnist" if "mnist" in tfc.priors.available() else "digits8x8")
  prior = tfc.priors.load(name)
  config = tfc.priors.load_config(name)
  shape = prior.event_shape.as_list()
  images, labels = tfc.data.load_numpy(config["dataset"], "test", data_dir=_DATA_DIR.value)
  levels = int(config["levels"])
  truth = ((images[_INDEX.value].astype(np.float32) + 0.5) / levels).reshape(shape)

  observed = make_mask(_MASK.value, shape, seed=_SEED.value)
  operator = tfc.operators.Mask(observed)
  likelihood = tfc.likelihoods.Gaussian(operator, scale=_NOISE.value)
  y = likelihood.sample(truth[None], seed=[_SEED.value, 1])[0]

  posterior = tfc.ComposedPosterior(prior, likelihood, y)
  t0, c0 = time.time(), time.process_time()
  history = posterior.fit(num_steps=_NUM_STEPS.value or None,
                          batch_size=_BATCH_SIZE.value or None,
                          seed=_SEED.value, verbose=1,
                          init=None if _INIT.value == "none" else _INIT.value)
  seconds, cpu_seconds = time.time() - t0, time.process_time() - c0
  samples = posterior.sample(256, seed=[_SEED.value, 2]).numpy()
  # A flow prior can overflow far from its training data (see tfp_composed/priors/README.md);
  # such draws are counted and left out of the summaries.
  finite = np.all(np.isfinite(samples), axis=tuple(range(1, samples.ndim)))
  samples = np.clip(samples[finite], 0., 1.)
  mean, std = samples.mean(0), samples.std(0)
  missing = ~observed
  mse_mean = float(np.mean((mean[missing] - truth[missing])**2))
  elbo = -float(np.mean([posterior.loss(batch_size=256, seed=[s, 0]) for s in range(101, 105)]))
  psnr = float(tf.image.psnr(mean, truth, max_val=1.))
  ssim = float(tf.image.ssim(mean, truth, max_val=1., filter_size=min(11, shape[0] // 2 + 1)))

  observation = np.full(shape, np.nan, np.float32)
  observation[observed] = y.numpy()
  panels = [("observation", observation), ("truth", truth)]
  panels += [(f"sample {i + 1}", samples[i]) for i in range(6)]
  panels += [("posterior mean", mean), ("posterior std", std)]
  fig, axes = plt.subplots(1, len(panels), figsize=(1.6 * len(panels), 2.1))
  cmap = matplotlib.colormaps["gray"].copy()
  cmap.set_bad("tab:blue")
  for ax, (title, image) in zip(axes, panels):
    ax.imshow(image[..., 0], cmap=cmap if title != "posterior std" else "magma",
              vmin=0., vmax=1. if title != "posterior std" else None)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
  fig.suptitle(f"{name} prior, test image {_INDEX.value} (label {labels[_INDEX.value]}), "
               f"mask {_MASK.value}, noise {_NOISE.value}; blue: missing", fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  fig.savefig(_OUTPUT.value, dpi=120)
  print(json.dumps({
      "prior": name, "index": _INDEX.value, "label": int(labels[_INDEX.value]),
      "mask": _MASK.value, "noise": _NOISE.value, "fit_seconds": round(seconds, 1),
      "fit_cpu_seconds": round(cpu_seconds, 1), "num_steps": len(history.history["loss"]),
      "init": _INIT.value, "final_loss": float(np.mean(history.history["loss"][-50:])),
      "elbo": round(elbo, 1), "missing_pixels_mse_of_mean": round(mse_mean, 5),
      "missing_pixels_psnr_of_mean": round(-10. * np.log10(mse_mean), 2),
      "psnr_of_mean": round(psnr, 2),
      "ssim_of_mean": round(ssim, 3), "posterior_samples": int(finite.size),
      "non_finite_samples_left_out": int(np.sum(~finite)), "figure": _OUTPUT.value}, indent=2))


if __name__ == "__main__":
  app.run(main)
