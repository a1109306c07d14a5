r"""Inpainting a held-out test digit with a shipped flow prior.

Observes a test image through a mask (default: the lower half missing) with Gaussian noise,
fits the composed posterior over the whole image, runs one baseline (`--baseline`, default
MALA) on the same observation for the same wall-clock time as the fit, and writes one figure
with a row per method: observation | truth | posterior samples | posterior mean | per-pixel
posterior std.

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
    "num_steps", None, "Fit steps (default: fit()'s, 1800 for MNIST's 784-dim latent).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None,
                                   "Samples per fit step (default: fit()'s, 16 for images).")
_INIT = flags.DEFINE_enum("init", "auto", ["auto", "map", "laplace", "none"],
                          "fit()'s init: 'auto' (above 256 latent dims the L-BFGS MAP + "
                          "low-rank Laplace start 'map'), the dense multi-start 'laplace', or "
                          "'none' (from the prior).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the fit.")
_BASELINE = flags.DEFINE_string(
    "baseline", "mala", "A tfc.baselines.METHODS name run for the composed fit's wall time and "
    "shown in a second row, or 'none'.")
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


def summarize(samples, truth, missing):
  """(finite draws clipped to [0, 1], their mean, std, MSE on `missing`, PSNR, SSIM of the mean).

  A flow prior can overflow far from its training data (see tfp_composed/priors/README.md);
  such draws are left out (and counted by the caller).
  """
  finite = tfc.metrics.finite_rows(samples)
  samples = np.clip(samples[finite], 0., 1.)
  mean, std = samples.mean(0), samples.std(0)
  mse = float(np.mean((mean[missing] - truth[missing])**2))
  return (samples, mean, std, mse, float(tfc.metrics.psnr(mean[None], truth)[0]),
          float(tfc.metrics.ssim(mean[None], truth)[0]))


def main(argv):
  del argv
  if _BASELINE.value != "none" and _BASELINE.value not in tfc.baselines.METHODS:
    raise app.UsageError(f"`--baseline` must be 'none' or one of "
                         f"{sorted(tfc.baselines.METHODS)}, got {_BASELINE.value!r}.")
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
  history = posterior.fit(num_steps=_NUM_STEPS.value, batch_size=_BATCH_SIZE.value,
                          seed=_SEED.value, verbose=1,
                          init=None if _INIT.value == "none" else _INIT.value)
  seconds, cpu_seconds = time.time() - t0, time.process_time() - c0
  raw = posterior.sample(256, seed=[_SEED.value, 2]).numpy()
  missing = ~observed
  samples, mean, std, mse_mean, psnr, ssim = summarize(raw, truth, missing)
  elbo = -float(np.mean([posterior.loss(batch_size=256, seed=[s, 0]) for s in range(101, 105)]))
  rows = [(f"composed, {seconds:.0f} s", samples, mean, std)]
  baseline = {}
  if _BASELINE.value != "none":
    result = tfc.baselines.run(_BASELINE.value, prior, likelihood, y, budget_seconds=seconds,
                               seed=_SEED.value, num_samples=256)
    raw_b = np.asarray(result.x, np.float32).reshape((-1,) + tuple(shape))
    samples_b, mean_b, std_b, mse_b, psnr_b, ssim_b = summarize(raw_b, truth, missing)
    rows.append((f"{_BASELINE.value}, {result.seconds:.0f} s", samples_b, mean_b, std_b))
    baseline = {
        "baseline": _BASELINE.value, "baseline_seconds": round(result.seconds, 1),
        "baseline_missing_pixels_mse_of_mean": round(mse_b, 5),
        "baseline_psnr_of_mean": round(psnr_b, 2), "baseline_ssim_of_mean": round(ssim_b, 3),
        "baseline_samples": int(raw_b.shape[0]),
        "baseline_non_finite_samples_left_out": int(raw_b.shape[0] - samples_b.shape[0])}

  observation = np.full(shape, np.nan, np.float32)
  observation[observed] = y.numpy()
  num_shown = 6
  num_columns = 2 + num_shown + 2
  fig, axes = plt.subplots(len(rows), num_columns,
                           figsize=(1.6 * num_columns, 1.9 * len(rows) + 0.3), squeeze=False)
  cmap = matplotlib.colormaps["gray"].copy()
  cmap.set_bad("tab:blue")
  std_max = max(float(row[3].max()) for row in rows) or 1.
  for r, (method, row_samples, row_mean, row_std) in enumerate(rows):
    panels = [("observation", observation), ("truth", truth)]
    panels += [(f"sample {i + 1}", row_samples[i] if i < len(row_samples) else None)
               for i in range(num_shown)]
    panels += [("posterior mean", row_mean), ("posterior std", row_std)]
    for c, (title, image) in enumerate(panels):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      for spine in ax.spines.values():
        spine.set_visible(False)
      if image is not None:
        ax.imshow(image[..., 0], cmap=cmap if title != "posterior std" else "magma",
                  vmin=0., vmax=1. if title != "posterior std" else std_max)
      if r == 0:
        ax.set_title(title, fontsize=8)
      if c == 0:
        ax.set_ylabel(method, fontsize=8)
  fig.suptitle(f"{name} prior, test image {_INDEX.value} (label {labels[_INDEX.value]}), "
               f"mask {_MASK.value}, noise {_NOISE.value}; blue: missing; std scale 0 to "
               f"{std_max:.2f}", fontsize=9)
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
      "ssim_of_mean": round(ssim, 3), "posterior_samples": int(raw.shape[0]),
      "non_finite_samples_left_out": int(raw.shape[0] - samples.shape[0]), **baseline,
      "figure": _OUTPUT.value}, indent=2))


if __name__ == "__main__":
  app.run(main)
