r"""`fit()`'s large-latent defaults vs other starts on the shipped MNIST prior: time, ELBO, PSNR.

Inpainting as in `experiments/inpaint.py` (lower half missing, noise 0.05) on test images.
Each setting fits a fresh `ComposedPosterior` and is scored by one common estimator:

    ELBO = -mean_s posterior.loss(batch_size=256, seed=s),   s in 4 fixed seeds (1024 draws),

and the PSNR of the posterior mean (256 draws, clipped to [0, 1]) on the missing pixels.
Times are wall seconds and process CPU seconds (TensorFlow uses both cores, so CPU / 2
approximates the wall time of an otherwise idle 2-core machine).

    python -m experiments.image_defaults --settings=defaults,prior_3000 --indices=0,1

Each finished row is appended to `--output` (JSON lines); the Markdown table of all rows
is rewritten next to it (`results/image_defaults.md`).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

import tfp_composed as tfc

# name: (description, init: "map" | "map_100" | "map_scaled" | "map_shift" | "laplace" | None,
#        fit kwargs beyond the defaults[, latent shape -> ComposedPosterior kwargs])
SETTINGS = {
    "defaults": ("fit() defaults (MAP + low-rank Laplace start)", "map", {}),
    "map_laplace_scaled": ("MAP + low-rank Laplace, variances rescaled by ELBO",
                           "map_scaled", {}),
    "scaled_lr2e-3": ("MAP + rescaled low-rank Laplace, learning_rate=2e-3", "map_scaled",
                      {"learning_rate": 2e-3}),
    "prior_3000": ("prior start, 3000 steps of 16 (former main job)", None,
                   {"num_steps": 3000, "batch_size": 16}),
    "prior_default_steps": ("prior start, default steps and batch", None, {}),
    "map_only": ("MAP shift, unit scale, default steps", "map_shift", {}),
    "laplace_dense": ("multi-start dense Laplace start (initialize), default steps",
                      "laplace", {}),
    "lr5e-4": ("fit() defaults, learning_rate=5e-4", "map", {"learning_rate": 5e-4}),
    "lr3e-3": ("fit() defaults, learning_rate=3e-3", "map", {"learning_rate": 3e-3}),
    "batch8": ("fit() defaults' start, 2560 steps of 8", "map",
               {"num_steps": 2560, "batch_size": 8}),
    "prior_1540": ("prior start, 1540 steps of 16 (the defaults' CPU budget without a start)",
                   None, {"num_steps": 1540, "batch_size": 16}),
    "steps1410": ("fit() defaults, 1410 steps", "map", {"num_steps": 1410}),
    "map_iterations100": ("fit() defaults, 100 L-BFGS iterations", "map_100", {}),
    "path_gradient": ("fit() defaults with path_gradient=True (sticking the landing)", "map",
                      {"path_gradient": True}),
    "steps1800": ("fit() defaults, 1800 steps", "map", {"num_steps": 1800}),
    "path_gradient_steps1800": ("fit() defaults with path_gradient=True, 1800 steps", "map",
                                {"path_gradient": True, "num_steps": 1800}),
    "conv": ("fit() defaults with the conv pre-generator (4 checkerboard couplings, 32 "
             "filters, full-rank affine stage)", "map", {},
             lambda shape: {"pregenerator": tfc.pregenerators.conv(shape)}),
    "mlp128": ("fit() defaults with the default RealNVP at 128 hidden units (256 by default)",
               "map", {}, lambda shape: {"pregenerator": tfc.pregenerators.real_nvp(
                   shape, hidden_units=(128, 128))}),
}

_SETTINGS = flags.DEFINE_list("settings", ["defaults", "prior_3000"],
                              f"Settings to run, of {sorted(SETTINGS)}.")
_INDICES = flags.DEFINE_list("indices", ["0", "1"], "Test image indices.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the fits.")
_OUTPUT = flags.DEFINE_string("output", "results/image_defaults.jsonl",
                              "JSON-lines file the rows are appended to.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory.")
_NOTE = flags.DEFINE_string("note", None, "Footnote of the rows of this run in the table.")

_ELBO_SEEDS = (101, 102, 103, 104)


def make_problem(index, prior_name="mnist", noise=0.05, seed=0, data_dir=None):
  """`(prior, likelihood, y, truth, observed)`: `inpaint.py`'s problem, lower half missing."""
  prior = tfc.priors.load(prior_name)
  config = tfc.priors.load_config(prior_name)
  shape = prior.event_shape.as_list()
  images, _ = tfc.data.load_numpy(config["dataset"], "test", data_dir=data_dir)
  truth = ((images[index].astype(np.float32) + 0.5) / int(config["levels"])).reshape(shape)
  observed = np.ones(shape, bool)
  observed[shape[0] // 2:] = False
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Mask(observed), scale=noise)
  y = likelihood.sample(truth[None], seed=[seed, 1])[0]
  return prior, likelihood, y, truth, observed


def score(posterior, truth, observed, seeds=_ELBO_SEEDS):
  """`(ELBO, its standard error over the seeds, PSNR of the mean on the missing pixels)`."""
  loss = tf.function(lambda s: posterior.loss(batch_size=256, seed=s))
  values = np.array([-float(loss(tf.constant([s, 0]))) for s in seeds])
  samples = posterior.sample(256, seed=[5, 2]).numpy()
  finite = np.all(np.isfinite(samples), axis=tuple(range(1, samples.ndim)))
  mean = np.clip(samples[finite], 0., 1.).mean(0)
  missing = ~observed
  psnr = -10. * np.log10(np.mean((mean[missing] - truth[missing])**2))
  return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(seeds))), float(psnr)


def _clock():
  return time.time(), time.process_time()


def run_setting(name, index, seed=0, data_dir=None):
  """Fits one setting on test image `index`; returns its row (a dict)."""
  description, init, kwargs, *posterior_options = SETTINGS[name]
  prior, likelihood, y, truth, observed = make_problem(index, seed=seed, data_dir=data_dir)
  options = (posterior_options[0](prior.bijector.inverse_event_shape(prior.event_shape))
             if posterior_options else {})
  posterior = tfc.ComposedPosterior(prior, likelihood, y, **options)
  w0, c0 = _clock()
  if init == "map":
    posterior.initialize_map(seed=seed)
  elif init == "map_100":
    posterior.initialize_map(seed=seed, max_iterations=100)
  elif init == "map_scaled":
    posterior.initialize_map(seed=seed, fit_scales=True)
  elif init == "map_shift":
    locs, _ = tfc.initialization.find_map(posterior.target, num_starts=2, seed=seed,
                                          max_iterations=50)
    stage = tfc.pregenerators.find_affine_stage(posterior.pregenerator)
    stage.shift.assign(tf.cast(locs[0], stage.dtype))
    posterior.initialized.assign(True)
  elif init == "laplace":
    posterior.initialize(seed=seed)
  w1, c1 = _clock()
  history = posterior.fit(seed=seed, verbose=0, init="auto" if init else None, **kwargs)
  w2, c2 = _clock()
  elbo, elbo_se, psnr = score(posterior, truth, observed)
  return {
      "setting": name, "description": description, "index": int(index),
      "trainable_parameters": int(sum(np.prod(v.shape) for v in posterior.trainable_variables)),
      "num_steps": len(history.history["loss"]),
      "init_wall": w1 - w0, "init_cpu": c1 - c0, "train_wall": w2 - w1, "train_cpu": c2 - c1,
      "total_cpu_over_2": 0.5 * (c2 - c0), "elbo": elbo, "elbo_se": elbo_se, "psnr": psnr,
      "final_train_loss": float(np.mean(history.history["loss"][-50:]))}


def write_table(rows, path):
  """Writes the Markdown table of `rows` to `path`."""
  lines = [
      "# `fit()` at image scale: MNIST inpainting (lower half missing, noise 0.05)",
      "",
      "`python -m experiments.image_defaults --settings=... --indices=0,1`. ELBO: "
      "`-posterior.loss(batch_size=256)` averaged over 4 fixed seeds (1024 draws, +- its "
      "standard error); PSNR (dB) of the posterior mean on the missing pixels. Seconds: wall "
      "and process CPU on a shared, loaded 2-core machine; CPU / 2 approximates an idle "
      "2-core machine's wall time.",
      "",
      "| setting | image | steps | init s (wall / CPU) | train s (wall / CPU) | "
      "(init + train) CPU / 2 | ELBO | PSNR |",
      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  notes = []
  for r in rows:
    mark = ""
    if r.get("note"):
      if r["note"] not in notes:  # Rows of one run share their footnote.
        notes.append(r["note"])
      mark = f" [{notes.index(r['note']) + 1}]"
    lines.append(
        f"| {r['setting']}{mark} | {r['index']} | {r['num_steps']} | "
        f"{r['init_wall']:.0f} / {r['init_cpu']:.0f} | {r['train_wall']:.0f} / "
        f"{r['train_cpu']:.0f} | {r['total_cpu_over_2']:.0f} | "
        f"{r['elbo']:.1f} +- {r['elbo_se']:.1f} | {r['psnr']:.2f} |")
  lines += [""] + [f"[{i + 1}]: {note}" for i, note in enumerate(notes)]
  lines += ["", "Settings:", ""]
  lines += [f"- `{k}`: {v[0]}" for k, v in SETTINGS.items()]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def main(argv):
  del argv
  unknown = [s for s in _SETTINGS.value if s not in SETTINGS]
  if unknown:
    raise ValueError(f"`--settings` must be among {sorted(SETTINGS)}, got {unknown}.")
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  for index in _INDICES.value:
    for name in _SETTINGS.value:
      row = run_setting(name, int(index), seed=_SEED.value, data_dir=_DATA_DIR.value)
      if _NOTE.value:
        row["note"] = _NOTE.value
      print(json.dumps(row), flush=True)
      with open(_OUTPUT.value, "a") as f:
        f.write(json.dumps(row) + "\n")
      with open(_OUTPUT.value) as f:
        rows = [json.loads(line) for line in f if line.strip()]
      write_table(rows, os.path.splitext(_OUTPUT.value)[0] + ".md")


if __name__ == "__main__":
  app.run(main)
