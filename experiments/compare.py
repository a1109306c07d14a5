r"""The paper's inverse problems on held-out test digits, every method side by side.

For each test image x task x method x time budget (images outermost, so a run stopped early
has image 0 of every cell first), observes the image through the task (`tfc.tasks`), runs the
method (`tfc.baselines.run`), scores its samples (`tfc.metrics.summarize`) and appends one JSON
line to `<output_dir>/runs.jsonl`. A restarted
run skips every (prior, task, image, method, budget, seed) already there, so a killed run
loses at most the run in progress. Then it writes the report (`--results_md`): per task, a
table of means and standard deviations across images, a sample grid (rows: methods; columns:
truth, observation, samples, mean, std) and a calibration plot (nominal against empirical
coverage of central intervals), all from `runs.jsonl` and the saved samples of the first image.

Test image `i` is `x = (k + 1/2) / L` for the grey levels `k` of the `i`-th test image (`L`
levels); its observation is `task.observe(x, seed=[seed, i])`, the same for every method, and
every method runs with `seed`.

    python -m experiments.compare --prior=mnist --tasks=inpaint_lower_half,super_resolution_4x \
        --methods=composed,ula,map --num_images=20 --budgets=60,300
    python -m experiments.compare --report_only          # rebuild RESULTS.md from runs.jsonl

`composed` runs `fit(time_limit=budget)` with its defaults: the start (mode search, or for
large latents L-BFGS MAP + low-rank Laplace) may take 40 % of the budget, training the rest;
`--method_options='{"composed": {"init": null}}'` starts the fit from the prior instead.
Methods with a density also get the importance weights `p(x, y) / q(x)` of their samples
scored (ELBO, importance-weighted bound, ESS, k-hat); every run records its peak RSS.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# pylint: disable=g-import-not-at-top,wrong-import-position
import collections
import json
import math
import shlex
import sys
import time

from absl import app
from absl import flags
from absl import logging
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from experiments import benchmark
import tfp_composed as tfc

_TASKS = flags.DEFINE_list("tasks", ["all"], "Task names (tfc.tasks.TASKS), or 'all'.")
_METHODS = flags.DEFINE_list("methods", ["all"],
                             "Method names (tfc.baselines.METHODS), or 'all'.")
_PRIOR = flags.DEFINE_enum("prior", "mnist", ["mnist", "digits8x8"], "Shipped prior.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 20, "Test images 0 .. num_images - 1.")
_BUDGETS = flags.DEFINE_list("budgets", ["60", "300"],
                             "Wall-time budgets in seconds (passed as budget_seconds).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "results/compare",
                                  "Directory of runs.jsonl, saved samples and figures.")
_RESULTS_MD = flags.DEFINE_string("results_md", "results/RESULTS.md", "Path of the report.")
# `seed` and `data_dir` mean the same in experiments/train_prior.py; the test suite imports
# both, so they may share one definition.
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the tasks, observations and methods.",
                             allow_override=True)
_REPORT_ONLY = flags.DEFINE_bool("report_only", False,
                                 "Only rebuild the report from runs.jsonl.")
_RETRY_ERRORS = flags.DEFINE_bool("retry_errors", False,
                                  "Rerun (task, image, method, budget) whose line is an error.")
_METHOD_OPTIONS = flags.DEFINE_string(
    "method_options", "{}", "JSON object: method name -> dict of extra options for "
    "tfc.baselines.run, e.g. '{\"ula\": {\"step_size\": 0.01}}'.")
_NUM_SHOWN = flags.DEFINE_integer("num_shown", 4, "Samples shown per method in a sample grid.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory (tfc.data.load).",
                                 allow_override=True)

# Methods defined for mask (inpainting) operators only; not run on the other tasks.
MASK_ONLY_METHODS = ("pl_mcmc",)
RUNS_FILE = "runs.jsonl"
COMMANDS_FILE = "commands.txt"
# Columns of the tables: (key in a runs.jsonl line, header, decimals).
COLUMNS = [
    ("psnr_mean", "PSNR of mean", 2),
    ("ssim_mean", "SSIM of mean", 3),
    ("psnr_best_of_16", "PSNR best of 16", 2),
    ("ssim_best_of_16", "SSIM best of 16", 3),
    ("coverage_90", "90% coverage", 3),
    ("log_q_rank", "log q rank", 2),
    ("residual_median", "residual", 2),
    ("std_unobserved", "std (unobs.)", 3),
    ("diversity", "diversity", 2),
    ("seconds", "seconds", 1),
    ("num_nonfinite", "non-finite", 1),
]
# The second table of a task: importance weights of the methods with a density, and cost.
# A key `info.<name>` is read from the run's `info`.
DENSITY_COST_COLUMNS = [
    ("elbo", "ELBO", 1),
    ("iw_bound", "IW bound on log p(y)", 1),
    ("ess_fraction", "ESS / n", 3),
    ("k_hat", "k-hat", 2),
    ("info.num_parameters", "trainable parameters", 0),
    ("peak_rss_mb", "peak RSS (MB)", 0),
    ("rss_increase_mb", "RSS increase (MB)", 0),
]


def _value(record, key):
  if key.startswith("info."):
    return (record.get("info") or {}).get(key[len("info."):])
  return record.get(key)


# ---------------------------------------------------------------------------
# runs.jsonl


def run_key(record):
  """The identity of one line: (prior, task, image, method, budget, seed)."""
  return (record["prior"], record["task"], int(record["image"]), record["method"],
          float(record["budget_seconds"]), int(record["seed"]))


def read_runs(path):
  """The parsed lines of `path` (a missing file: none; an unparsable last line is dropped)."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        logging.warning("%s:%d is not JSON (a run killed while writing?); ignored.", path,
                        number)
  return records


def append_run(path, record):
  """Appends one JSON line and flushes it to disk."""
  needs_newline = False
  if os.path.exists(path) and os.path.getsize(path):
    with open(path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      needs_newline = f.read(1) != b"\n"
  with open(path, "a") as f:
    f.write(("\n" if needs_newline else "") + json.dumps(record, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _json_value(value):
  """A JSON-safe copy of a number, string or bool (non-finite floats become None), else None."""
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, str):
    return value
  return None


def _info_summary(info):
  """The scalar entries of `result.info`, and the last value of each numeric sequence."""
  out = {}
  for key, value in (info or {}).items():
    if hasattr(value, "numpy"):
      try:
        value = value.numpy()
      except Exception:  # pylint: disable=broad-except  # Not a tensor after all.
        continue
    if isinstance(value, (list, tuple, np.ndarray)):
      arr = np.asarray(value)
      if arr.ndim == 0:
        value = arr.item()
      elif arr.ndim == 1 and arr.size and np.issubdtype(arr.dtype, np.number):
        out[f"{key}_last"] = _json_value(arr[-1].item())
        continue
      else:
        continue
    converted = _json_value(value)
    if converted is not None:
      out[key] = converted
  return out


# ---------------------------------------------------------------------------
# Running one (task, image, method, budget).


def _numpy(value):
  if value is None:
    return None
  return np.asarray(value.numpy() if hasattr(value, "numpy") else value)


def _log_q_true(result, truth):
  """`log q(x_true)` from the method's `q`: `result.info['posterior']` (the composed
  posterior) or `result.info['distribution']` (ambient VI); None without one."""
  info = result.info or {}
  posterior = info.get("posterior", info.get("distribution"))
  if posterior is None or not hasattr(posterior, "log_prob"):
    return None
  try:
    value = float(np.asarray(_numpy(posterior.log_prob(truth[None].astype(np.float32)))).ravel()[0])
  except Exception as e:  # pylint: disable=broad-except  # e.g. an inverse that overflows.
    logging.warning("log q(x_true) failed: %s", e)
    return None
  return value if math.isfinite(value) else None


def sample_file(output_dir, prior, task, method, budget, image):
  return os.path.join(output_dir, "samples",
                      f"{prior}__{task}__{method}__{budget:g}s__image{image}.npz")


def log_joint(prior, likelihood, observation, samples, batch_size=250):
  """`log p(x) + log p(y | x)` at each sample (`-inf` where a sample is not finite)."""
  finite = tfc.metrics.finite_rows(samples)
  out = np.full(len(samples), -np.inf)
  x = samples[finite]
  values = [np.asarray(prior.log_prob(chunk)) + np.asarray(likelihood.log_prob(observation, chunk))
            for chunk in (x[i:i + batch_size] for i in range(0, len(x), batch_size))]
  if values:
    out[finite] = np.concatenate(values)
  return out


def run_one(prior, task, truth, observation, method, budget, seed, options):
  """Runs `method` on one problem; returns (metrics and info dict, samples or None).

  The method's peak resident memory (`peak_rss_mb`: the process's RSS, sampled every 20 ms
  while it runs, and `rss_increase_mb` over the RSS before it) is recorded; for methods with
  a density the importance weights `p(x, y) / q(x)` of its samples (`tfc.metrics`) are scored
  after the budget.
  """
  start = time.time()
  rss = benchmark.PeakRSS(interval=0.02).start()
  try:
    result = tfc.baselines.run(method, prior, task.likelihood, observation,
                               budget_seconds=budget, seed=seed, **options)
  finally:
    peak = rss.window_peak()
    rss.stop()
  samples = _numpy(result.x).astype(np.float32)
  samples = samples.reshape((-1,) + task.image_shape)
  log_q = _numpy(result.log_prob)
  log_q_true = _log_q_true(result, truth) if log_q is not None else None
  joint = (log_joint(prior, task.likelihood, observation, samples) if log_q is not None
           else None)
  row = tfc.metrics.summarize(samples, truth, task, log_q=log_q, log_q_true=log_q_true,
                              observation=observation, log_joint=joint)
  row["seconds"] = float(getattr(result, "seconds", time.time() - start))
  row["has_density"] = log_q is not None
  row["peak_rss_mb"] = peak / 2**20
  row["rss_increase_mb"] = (peak - rss.before) / 2**20
  row["info"] = _info_summary(result.info)
  return row, samples


def _load_images(dataset, levels, num_images, data_dir):
  images, labels = tfc.data.load_numpy(dataset, "test", data_dir=data_dir)
  if num_images > len(images):
    raise ValueError(f"`num_images` must be at most {len(images)} ({dataset} test images), got "
                     f"{num_images}.")
  truths = (images[:num_images].astype(np.float32) + 0.5) / levels
  return truths, labels[:num_images]


def run_all(prior_name, task_names, methods, num_images, budgets, output_dir, seed, options,
            num_shown=4, retry_errors=False, data_dir=None, log=print):
  """Runs every missing (image, task, method, budget), in that loop order; returns the number
  of new lines."""
  os.makedirs(os.path.join(output_dir, "samples"), exist_ok=True)
  runs_path = os.path.join(output_dir, RUNS_FILE)
  done = {run_key(r) for r in read_runs(runs_path) if retry_errors is False or "error" not in r}
  prior = tfc.priors.load(prior_name)
  config = tfc.priors.load_config(prior_name)
  shape = tuple(prior.event_shape.as_list())
  truths, labels = _load_images(config["dataset"], int(config["levels"]), num_images, data_dir)
  tasks = {name: tfc.tasks.get(name, image_shape=shape, seed=seed) for name in task_names}
  written = 0
  # Images outermost: a run stopped early has image 0 of every (task, method, budget) first.
  for image in range(num_images):
    truth = truths[image]
    for task_name, task in tasks.items():
      observation = task.observe(truth, seed=[seed, image])
      for method in methods:
        if method in MASK_ONLY_METHODS and not isinstance(task.operator, tfc.operators.Mask):
          continue
        for budget in budgets:
          record = {"prior": prior_name, "task": task_name, "image": image,
                    "label": int(labels[image]), "method": method, "budget_seconds": budget,
                    "seed": seed}
          if run_key(record) in done:
            continue
          try:
            row, samples = run_one(prior, task, truth, observation, method, budget, seed,
                                   options.get(method, {}))
          except Exception as e:  # pylint: disable=broad-except  # Recorded, not fatal.
            logging.exception("%s on %s image %d failed", method, task_name, image)
            record["error"] = f"{type(e).__name__}: {e}"[:500]
            row, samples = {}, None
          if samples is not None and image == 0:
            finite = samples[tfc.metrics.finite_rows(samples)]
            clipped = np.clip(finite, 0., 1.)
            np.savez_compressed(
                sample_file(output_dir, prior_name, task_name, method, budget, image),
                truth=truth, observation=task.observation_image(observation),
                samples=clipped[:num_shown],
                mean=clipped.mean(0) if len(clipped) else np.full(shape, np.nan),
                std=clipped.std(0) if len(clipped) else np.full(shape, np.nan))
          record.update({k: (_json_value(v) if k != "info" else v) for k, v in row.items()})
          append_run(runs_path, record)
          written += 1
          log(f"{task_name} image {image} {method} {budget:g}s: " + (
              record.get("error") or
              f"PSNR {record.get('psnr_mean')}, coverage_90 {record.get('coverage_90')}, "
              f"{record.get('seconds', float('nan')):.1f} s"))
  return written


# ---------------------------------------------------------------------------
# The report.


def _table(records, methods, budgets, columns):
  """Markdown lines of one table: a row per (method, budget) with finished runs."""
  header = ["method", "budget (s)", "images"] + [h for _, h, _ in columns]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for method in methods:
    for budget in budgets:
      good = [r for r in records if r["method"] == method and
              float(r["budget_seconds"]) == budget and "error" not in r]
      if not good:
        continue
      cells = [method, f"{budget:g}", str(len(good))]
      for key, _, decimals in columns:
        cells.append(_format(*_mean_spread([_value(r, key) for r in good])[:2], decimals))
      lines.append("| " + " | ".join(cells) + " |")
  return lines + [""]


def _mean_spread(values):
  """(mean, sample std or None, n) of the non-None values."""
  values = [v for v in values if v is not None]
  if not values:
    return None, None, 0
  arr = np.asarray(values, np.float64)
  return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None), int(arr.size)


def _format(mean, spread, decimals):
  if mean is None:
    return "–"
  text = f"{mean:.{decimals}f}"
  return text + (f" ± {spread:.{decimals}f}" if spread is not None else "")


def _coverage_levels(records):
  levels = set()
  for record in records:
    levels.update(int(k.split("_")[1]) for k in record if k.startswith("coverage_"))
  return sorted(levels)


MCMC_METHODS = ("ula", "mala", "pl_mcmc")
# The composed posterior and the refinements its fit recommends when q is not accurate enough.
COMPOSED_METHODS = ("composed", "composed_sir", "neutra_hmc")
GOAL_COVERAGE = (0.9, 0.05)  # The target 90 % coverage and its tolerance.


def _goal_failures(means, candidate):
  """What keeps `candidate` (a method of the composed family) from the issue's goal in one
  cell: the best PSNR best of 16 among it and the methods outside the family, 90 % coverage
  within 0.05 of 0.9, and neither PSNR below Langevin's or PL-MCMC's. [] when it is met."""
  c = means[candidate]
  rivals = {m: v for m, v in means.items() if m == candidate or m not in COMPOSED_METHODS}
  scored = {m: v["psnr_best_of_16"] for m, v in rivals.items()
            if v["psnr_best_of_16"] is not None}
  failures = []
  if not scored:
    failures.append("no best of 16")
  elif max(scored, key=scored.get) != candidate:
    failures.append(f"best of 16 below {max(scored, key=scored.get)}")
  if c["coverage_90"] is None or abs(c["coverage_90"] - GOAL_COVERAGE[0]) > GOAL_COVERAGE[1]:
    failures.append("coverage")
  for m in (m for m in MCMC_METHODS if m in means):
    if any(means[m][k] is not None and c[k] is not None and means[m][k] > c[k]
           for k in ("psnr_mean", "psnr_best_of_16")):
      failures.append(f"below {m}")
  return failures


def _cell_means(cell, methods):
  """`(images, {method: {key: mean}})` over the images that every one of `methods` finished."""
  images = set.intersection(*({r["image"] for r in cell if r["method"] == m} for m in methods))
  means = {m: {key: _mean_spread([r.get(key) for r in cell if r["method"] == m and
                                  r["image"] in images])[0]
               for key in ("psnr_mean", "psnr_best_of_16", "coverage_90")}
           for m in methods}
  return images, means


def summary_table(records, task_names, methods, budgets):
  """Markdown lines: per (task, budget), the best methods and the composed posterior's place.

  Methods are compared on the images every one of them finished in that cell. `goal`: the
  composed posterior has the highest PSNR best of 16 (among itself and the methods outside
  the composed family), a 90 % coverage within 0.05 of 0.9, and neither PSNR below
  Langevin's or PL-MCMC's; otherwise what fails. `refinements: goal`: the same check for the
  refinements that `fit`'s warning recommends (`composed_sir`, `neutra_hmc`) where they ran,
  on the images they share with the other methods (the other columns leave them out).
  """
  header = ["task", "budget (s)", "images", "best PSNR of mean", "best PSNR best of 16",
            "composed: mean / best of 16 / 90% coverage", "goal", "refinements: goal"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for task_name in task_names:
    for budget in budgets:
      cell = [r for r in records if r["task"] == task_name and "error" not in r and
              float(r["budget_seconds"]) == budget and r.get("psnr_mean") is not None]
      present = [m for m in methods if any(r["method"] == m for r in cell)]
      core = [m for m in present if m not in COMPOSED_METHODS[1:]]
      if "composed" not in core or len(core) < 2:
        continue
      images, means = _cell_means(cell, core)
      best = {}
      for key in ("psnr_mean", "psnr_best_of_16"):
        scored = {m: v[key] for m, v in means.items() if v[key] is not None}
        best[key] = max(scored, key=scored.get) if scored else None
      c = means["composed"]
      cells = [f"`{task_name}`", f"{budget:g}", str(len(images))]
      cells += [f"{best[k]} {means[best[k]][k]:.2f}" if best[k] else "–"
                for k in ("psnr_mean", "psnr_best_of_16")]
      cells.append(" / ".join(_format(c[k], None, d) for k, d in
                              (("psnr_mean", 2), ("psnr_best_of_16", 2), ("coverage_90", 3))))
      failures = _goal_failures(means, "composed")
      cells.append("yes" if not failures else "no: " + ", ".join(failures))
      refined = []
      for m in (m for m in COMPOSED_METHODS[1:] if m in present):
        shared, with_m = _cell_means(cell, core + [m])
        failures = _goal_failures(with_m, m)
        refined.append(f"{m} " + ("yes" if not failures else "no: " + ", ".join(failures))
                       + ("" if shared == images else
                          f" ({len(shared)} image{'' if len(shared) == 1 else 's'})"))
      cells.append("; ".join(refined) or "–")
      lines.append("| " + " | ".join(cells) + " |")
  return lines + [""]


def _order(values, preferred):
  return sorted(set(values), key=lambda v: (preferred.index(v) if v in preferred else len(preferred), v))


def sample_grid(path, prior, task_name, methods, budget, output_dir):
  """Writes the sample grid of one task (first image); returns its path or None."""
  rows = []
  for method in methods:
    file = sample_file(output_dir, prior, task_name, method, budget, 0)
    if os.path.exists(file):
      rows.append((method, dict(np.load(file))))
  if not rows:
    return None
  num_shown = max(len(data["samples"]) for _, data in rows)
  columns = 2 + num_shown + 2
  fig, axes = plt.subplots(len(rows), columns, figsize=(1.3 * columns, 1.4 * len(rows) + 0.4),
                           squeeze=False)
  cmap = matplotlib.colormaps["gray"].copy()
  cmap.set_bad("tab:blue")
  std_max = max(float(np.nanmax(data["std"])) for _, data in rows) or 1.
  for r, (method, data) in enumerate(rows):
    panels = [("truth", data["truth"]), ("observation", data["observation"])]
    panels += [(f"sample {i + 1}", data["samples"][i]) if i < len(data["samples"]) else
               (f"sample {i + 1}", None) for i in range(num_shown)]
    panels += [("mean", data["mean"]), ("std", data["std"])]
    for c, (title, image) in enumerate(panels):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      if image is not None:
        if title == "std":
          ax.imshow(image[..., 0], cmap="magma", vmin=0., vmax=std_max)
        elif title == "observation":
          low, high = np.nanmin(image), np.nanmax(image)
          vmin, vmax = (0., 1.) if low >= -0.05 and high <= 1.05 else (low, high)
          ax.imshow(np.ma.masked_invalid(image[..., 0]), cmap=cmap, vmin=vmin, vmax=vmax)
        else:
          ax.imshow(image[..., 0], cmap=cmap, vmin=0., vmax=1.)
      else:
        ax.axis("off")
      if r == 0:
        ax.set_title(title, fontsize=8)
      if c == 0:
        ax.set_ylabel(method, fontsize=8)
  fig.suptitle(f"{prior}: {task_name}, test image 0, budget {budget:g} s (std scale 0 to "
               f"{std_max:.2f}; blue: not observed)", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def calibration_plot(path, prior, records, task_names, methods, budget):
  """Nominal against empirical coverage (mean over images) per task and method."""
  levels = _coverage_levels(records)
  if not levels:
    return None
  columns = min(len(task_names), 4)
  num_rows = int(math.ceil(len(task_names) / columns))
  fig, axes = plt.subplots(num_rows, columns, figsize=(2.6 * columns, 2.5 * num_rows + 0.4),
                           squeeze=False)
  nominal = np.asarray(levels) / 100.
  for ax, task_name in zip(axes.ravel(), task_names):
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
    for method in methods:
      chosen = [r for r in records if r["task"] == task_name and r["method"] == method and
                r["budget_seconds"] == budget and "error" not in r]
      empirical = [_mean_spread([r.get(f"coverage_{l}") for r in chosen])[0] for l in levels]
      if all(e is None for e in empirical):
        continue
      ax.plot(nominal, [np.nan if e is None else e for e in empirical], marker="o", ms=3,
              lw=1, label=method)
    ax.set_title(task_name, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("nominal", fontsize=7)
    ax.set_ylabel("empirical (unobserved pixels)", fontsize=7)
  for ax in axes.ravel()[len(task_names):]:
    ax.axis("off")
  handles, labels = axes.ravel()[0].get_legend_handles_labels()
  if handles:
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=7)
  fig.suptitle(f"{prior}: coverage of per-pixel central intervals, budget {budget:g} s, "
               "mean over images", fontsize=8)
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_report(output_dir, results_md):
  """Writes `results_md` (tables and figures) from `<output_dir>/runs.jsonl`; returns its text."""
  records = read_runs(os.path.join(output_dir, RUNS_FILE))
  figures_dir = os.path.join(output_dir, "figures")
  os.makedirs(figures_dir, exist_ok=True)
  report_dir = os.path.dirname(os.path.abspath(results_md))
  os.makedirs(report_dir, exist_ok=True)
  rel = lambda p: os.path.relpath(os.path.abspath(p), report_dir)
  task_order = list(tfc.tasks.TASKS)
  method_order = ["composed", "composed_sir", "ambient_vi", "ula", "mala", "hmc", "nuts",
                  "pl_mcmc", "map", "neutra_hmc"]
  lines = ["# Inverse problems: every method side by side", "",
           f"Generated by `experiments/compare.py` from `{rel(os.path.join(output_dir, RUNS_FILE))}` "
           f"({len(records)} runs). Regenerate with "
           f"`python -m experiments.compare --report_only --output_dir={output_dir} "
           f"--results_md={results_md}`.", ""]
  commands_path = os.path.join(output_dir, COMMANDS_FILE)
  if os.path.exists(commands_path):
    with open(commands_path) as f:
      commands = list(dict.fromkeys(c.strip() for c in f if c.strip()))
    lines += ["Commands that wrote the runs:", "", "```"] + commands + ["```", ""]
  lines += [
      "Each cell is the mean ± standard deviation across test images (the column `images` "
      "counts them). PSNR and SSIM (max value 1) of the posterior mean and of the best of the "
      "first 16 samples; `90% coverage`: fraction of the unobserved pixels inside per-pixel "
      "central 90% intervals of the samples (target 0.90); `log q rank`: rank of log q(x_true) "
      "among the samples' log q, for methods with a density (uniform on [0, 1] when calibrated: "
      "mean 0.50 ± 0.29); `residual`: median over samples of "
      "sqrt(mean_i ((y_i - E[y_i | x]) / sd[y_i | x])^2), = ||y - A(x)|| / (sigma sqrt(m)) for "
      "Gaussian noise, about 1 when consistent (the truth's value is given per task); "
      "`std (unobs.)`: mean per-pixel posterior std over the unobserved pixels; `diversity`: mean "
      "pairwise L2 distance of samples; `seconds`: wall time including tracing; `non-finite`: "
      "samples with NaN/Inf, left out of every metric. "
      f"{', '.join(f'`{m}`' for m in MASK_ONLY_METHODS)}: run on the inpainting (mask) tasks "
      "only.", ""]
  for prior in _order([r["prior"] for r in records], ["mnist", "digits8x8"]):
    prior_records = [r for r in records if r["prior"] == prior]
    task_names = _order([r["task"] for r in prior_records], task_order)
    methods = _order([r["method"] for r in prior_records], method_order)
    budgets = sorted({float(r["budget_seconds"]) for r in prior_records})
    shape = tuple(tfc.priors.load_config(prior)["kwargs"]["event_shape"])
    lines += [f"## Prior `{prior}`", "",
              "Summary (means over the images that every method of the cell finished; the "
              "issue's goal: composed best in PSNR best of 16, 90 % coverage within 0.05, never "
              "below Langevin or PL-MCMC; the last column checks the same for the refinements "
              "that `fit` recommends when q is not accurate enough, SIR and NeuTra HMC):", ""]
    lines += summary_table(prior_records, task_names, methods, budgets)
    for task_name in task_names:
      task = tfc.tasks.get(task_name, image_shape=shape,
                           seed=int(prior_records[0]["seed"]))
      task_records = [r for r in prior_records if r["task"] == task_name]
      residual_true = _mean_spread([r.get("residual_true") for r in task_records
                                    if "error" not in r])
      lines += [f"### `{task_name}`", "", task.description + (
          f" Residual of the truth: {_format(*residual_true[:2], 2)}." if residual_true[0]
          is not None else ""), ""]
      errors = [f"{r['method']}, {float(r['budget_seconds']):g} s, image {r['image']}: "
                f"{r['error']}" for method in methods for budget in budgets
                for r in task_records if r["method"] == method and
                float(r["budget_seconds"]) == budget and "error" in r]
      lines += _table(task_records, methods, budgets, COLUMNS)
      lines += ["Importance weights `p(x, y) / q(x)` of the samples of methods with a density "
                "(ELBO, the importance-weighted bound on log p(y), ESS / n, PSIS k-hat), and "
                "cost (trainable parameters, the process's peak RSS during the run and its "
                "increase over the RSS before it); `–`: not applicable or not recorded (runs "
                "before these columns existed).", ""]
      lines += _table(task_records, methods, budgets, DENSITY_COST_COLUMNS)
      if errors:
        lines += ["Failed runs:", ""] + [f"- {e}" for e in errors[:20]]
        if len(errors) > 20:
          lines.append(f"- ... and {len(errors) - 20} more")
        lines.append("")
      grid = sample_grid(os.path.join(figures_dir, f"{prior}__{task_name}__samples.png"), prior,
                         task_name, methods, budgets[-1], output_dir)
      if grid:
        lines += [f"![{task_name} samples]({rel(grid)})", ""]
    calibration = calibration_plot(os.path.join(figures_dir, f"{prior}__calibration.png"), prior,
                                   prior_records, task_names, methods, budgets[-1])
    if calibration:
      lines += [f"### Calibration, `{prior}`", "",
                "Empirical coverage of per-pixel central intervals over the unobserved pixels "
                f"(mean over images) against the nominal level, budget {budgets[-1]:g} s.", "",
                f"![calibration]({rel(calibration)})", ""]
  text = "\n".join(lines)
  tmp = results_md + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, results_md)
  return text


# ---------------------------------------------------------------------------


def _parse_budgets(values):
  budgets = []
  for value in values:
    try:
      budget = float(value)
    except ValueError:
      budget = float("nan")
    if not (math.isfinite(budget) and budget > 0):
      raise app.UsageError(f"`--budgets` must be positive numbers of seconds, got {value!r}.")
    budgets.append(budget)
  return budgets


def _resolve(names, known, flag):
  if names == ["all"]:
    return list(known)
  unknown = [n for n in names if n not in known]
  if unknown:
    raise app.UsageError(f"`--{flag}` has unknown names {unknown}; known: {sorted(known)}.")
  return list(names)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
  output_dir = _OUTPUT_DIR.value
  if not _REPORT_ONLY.value:
    tasks = _resolve(_TASKS.value, tfc.tasks.TASKS, "tasks")
    methods = _resolve(_METHODS.value, tfc.baselines.METHODS, "methods")
    budgets = _parse_budgets(_BUDGETS.value)
    if _NUM_IMAGES.value < 1:
      raise app.UsageError(f"`--num_images` must be a positive integer, got {_NUM_IMAGES.value}.")
    try:
      options = json.loads(_METHOD_OPTIONS.value)
    except json.JSONDecodeError as e:
      raise app.UsageError(f"`--method_options` must be a JSON object, got "
                           f"{_METHOD_OPTIONS.value!r}: {e}") from None
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
      raise app.UsageError(f"`--method_options` must map method names to objects, got "
                           f"{_METHOD_OPTIONS.value!r}.")
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, COMMANDS_FILE), "a") as f:
      f.write("python -m experiments.compare " + " ".join(shlex.quote(a) for a in sys.argv[1:])
              + "\n")
    written = run_all(_PRIOR.value, tasks, methods, _NUM_IMAGES.value, budgets, output_dir,
                      _SEED.value, options, num_shown=_NUM_SHOWN.value,
                      retry_errors=_RETRY_ERRORS.value, data_dir=_DATA_DIR.value)
    print(f"{written} new runs in {os.path.join(output_dir, RUNS_FILE)}")
  write_report(output_dir, _RESULTS_MD.value)
  print(f"wrote {_RESULTS_MD.value}")


if __name__ == "__main__":
  app.run(main)
