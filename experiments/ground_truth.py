r"""One latent target, every method: each baseline on each ground-truth problem, equal budgets.

For every problem of `tfc.problems.PROBLEMS` (exact posteriors), every method of
`tfc.baselines.METHODS` that applies, and every wall-clock budget, it runs

    result = tfc.baselines.run(method, problem.prior, problem.likelihood,
                               problem.observation, budget_seconds=budget,
                               num_samples=num_samples, seed=seed)

and scores `result.x` against the exact posterior with `problem.score(x, log_q, seed)`:
`KL(q || p)` where the method has a density (`result.log_prob` is not None), the energy
distance relative to its floor (what exact draws of the same size score) for all, per-block
mode masses where the posterior has modes, and the non-finite fraction. Wall seconds and the
process's CPU seconds (all threads) of each call are recorded: on a shared, loaded machine
wall time overstates the work done, CPU time much less so.

Each finished (problem, method, budget) cell appends one JSON line to
`<output_dir>/runs.jsonl`, at once: a restarted run skips the cells already there, so a killed
run loses nothing. A method that raises is recorded with its error (and scored as failed),
never dropped. A cell whose process died during it (it is in `attempts.jsonl` but not in
`runs.jsonl`) is retried once, then recorded as failed. `pl_mcmc` needs a mask operator
(`tfc.operators.Mask`); on problems with another operator it is listed as not applicable.

Then `--report` gets one Markdown table per problem (rows: methods; per budget: KL +- its
standard error, energy ratio +- se, max mode-mass error, non-finite fraction, wall and CPU
seconds), the best per problem and budget in bold, and a paragraph built from the numbers.

    python -m experiments.ground_truth                       # everything, 15 s and 60 s
    python -m experiments.ground_truth --problems=bimodal_blocks --methods=composed,nuts \
        --budgets=5 --num_blocks=2 --output_dir=/tmp/gt --report=/tmp/gt/ground_truth.md
    python -m experiments.ground_truth --report_only         # the Markdown from runs.jsonl
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import math
import platform
import shlex
import subprocess
import sys
import time
import traceback

from absl import app
from absl import flags
from absl import logging
import numpy as np

import tfp_composed as tfc
from tfp_composed.baselines import pl_mcmc as pl_mcmc_lib


def define_flags():
  """Defines the command-line flags (only when run as a program, so that importing this
  module next to other experiments defines no clashing flags)."""
  global _PROBLEMS, _METHODS, _BUDGETS, _NUM_SAMPLES, _SEED, _NUM_BLOCKS  # pylint: disable=global-statement
  global _METHOD_OPTIONS, _OUTPUT_DIR, _REPORT, _REPORT_ONLY  # pylint: disable=global-statement
  _PROBLEMS = flags.DEFINE_list("problems", list(tfc.problems.PROBLEMS),
                                "Ground-truth problems (tfc.problems.PROBLEMS).")
  _METHODS = flags.DEFINE_list("methods", list(tfc.baselines.METHODS),
                               "Methods (tfc.baselines.METHODS); those that do not apply to a "
                               "problem are listed as such.")
  _BUDGETS = flags.DEFINE_list("budgets", ["15", "60"], "Wall-clock budgets in seconds.")
  _NUM_SAMPLES = flags.DEFINE_integer("num_samples", 2000, "Draws asked of each method.")
  _SEED = flags.DEFINE_integer("seed", 0, "Seed of every method and of the scores.")
  _NUM_BLOCKS = flags.DEFINE_integer("num_blocks", None,
                                     "Blocks of the block problems (default: theirs, 8).")
  _METHOD_OPTIONS = flags.DEFINE_string(
      "method_options", "{}", "JSON: per-method options for tfc.baselines.run, e.g. "
      "'{\"composed\": {\"init\": null}}' (default: every method's defaults).")
  _OUTPUT_DIR = flags.DEFINE_string("output_dir", "results/ground_truth",
                                    "Directory of runs.jsonl (resumed if present).")
  _REPORT = flags.DEFINE_string("report", "results/ground_truth.md", "Markdown report path.")
  _REPORT_ONLY = flags.DEFINE_bool("report_only", False,
                                   "Only write the report from the existing runs.jsonl.")


RUNS_FILE = "runs.jsonl"
ATTEMPTS_FILE = "attempts.jsonl"
SESSIONS_FILE = "sessions.jsonl"
# A cell is retried this many times after its process died during it, then recorded failed.
MAX_ATTEMPTS = 2
# A run is flagged as over its budget past `factor * budget + slack` seconds (the tolerance
# of the baselines' own budget test).
OVERRUN_FACTOR, OVERRUN_SLACK = 1.1, 1.5
# Largest sample size of the energy statistics (`problem.score`'s `num_energy`). For a wrong
# `q` the energy ratio grows like the sample size, so ratios of different sizes do not compare.
NUM_ENERGY = 1000
# Scores copied into each line.
SCORE_KEYS = ("kl", "kl_stderr", "energy", "energy_floor", "energy_ratio",
              "energy_ratio_stderr", "mean_error", "mode_mass_error", "mode_mass_stderr",
              "nonfinite_fraction", "num_samples")


# ---------------------------------------------------------------------------
# Cells: which (problem, method, budget) to run, and whether a method applies.


def problem_label(name, kwargs):
  """`name`, or `name[k=v,...]` for a non-default variant."""
  if not kwargs:
    return name
  return name + "[" + ",".join(f"{k}={v}" for k, v in sorted(kwargs.items())) + "]"


def problem_specs(names, num_blocks=None):
  """`{label: (constructor, kwargs)}` for problems of `tfc.problems.PROBLEMS`."""
  specs = {}
  for name in names:
    if name not in tfc.problems.PROBLEMS:
      raise ValueError(f"`problems` must be names in {sorted(tfc.problems.PROBLEMS)}, got "
                       f"{name!r}.")
    kwargs = {}
    if num_blocks is not None and "blocks" in name:
      kwargs["num_blocks"] = num_blocks
    specs[problem_label(name, kwargs)] = (tfc.problems.PROBLEMS[name], kwargs)
  return specs


def not_applicable(method, problem):
  """Why `method` cannot run on `problem`, or None when it can."""
  if method == "pl_mcmc":
    try:
      pl_mcmc_lib.check_mask_operator(problem.likelihood)
    except TypeError:
      operator = type(problem.likelihood.operator).__name__
      return f"needs a tfc.operators.Mask operator; this problem's operator is {operator}"
  return None


def cell_key(problem, method, budget, seed, num_samples, options):
  return (problem, method, float(budget), int(seed), int(num_samples),
          json.dumps(options or {}, sort_keys=True))


def line_key(line):
  return cell_key(line["problem"], line["method"], line["budget_seconds"], line["seed"],
                  line["num_samples_asked"], line.get("options"))


def read_lines(path):
  """The JSON lines of `path` ([] when missing); a torn last line is ignored."""
  if not os.path.exists(path):
    return []
  lines = []
  with open(path) as f:
    for text in f:
      text = text.strip()
      if not text:
        continue
      try:
        lines.append(json.loads(text))
      except json.JSONDecodeError:
        logging.warning("ignoring a malformed line of %s: %.80s", path, text)
  return lines


def append_line(path, record):
  """Appends one JSON line and flushes it to disk."""
  with open(path, "a") as f:
    f.write(json.dumps(record, sort_keys=True, default=_json_default) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _json_default(value):
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, (np.floating, np.integer, np.bool_)):
    return value.item()
  return str(value)


def _finite_or_none(value):
  value = float(value)
  return value if math.isfinite(value) else None


def _scalar_info(info):
  """The JSON-friendly scalar entries of a `Result.info` (no objects, no arrays)."""
  out = {}
  for k, v in info.items():
    if isinstance(v, (bool, np.bool_)):
      out[k] = bool(v)
    elif isinstance(v, (int, np.integer)):
      out[k] = int(v)
    elif isinstance(v, (float, np.floating)):
      out[k] = _finite_or_none(v)
    elif isinstance(v, str):
      out[k] = v
  return out


# ---------------------------------------------------------------------------
# Running one cell.


def run_cell(problem, label, method, budget, *, seed, num_samples, options=None):
  """Runs and scores one cell; returns its JSON record (status "ok" or "error")."""
  record = {
      "problem": label, "dim": int(problem.dim), "method": method,
      "budget_seconds": float(budget), "seed": int(seed), "num_samples_asked": int(num_samples),
      "options": options or {}, "load_average_1min": os.getloadavg()[0],
      "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
  }
  wall0, cpu0 = time.perf_counter(), time.process_time()
  stage = "run"
  try:
    result = tfc.baselines.run(method, problem.prior, problem.likelihood, problem.observation,
                               budget_seconds=budget, num_samples=num_samples, seed=seed,
                               **(options or {}))
    record["wall_seconds"] = time.perf_counter() - wall0
    record["cpu_seconds"] = time.process_time() - cpu0
    record["result_seconds"] = float(result.seconds)
    record["num_draws"] = int(result.x.shape[0])
    record["has_density"] = result.log_prob is not None
    record["info"] = _scalar_info(result.info)
    stage = "score"
    score0 = time.perf_counter()
    x = np.reshape(result.x, [result.x.shape[0], -1])
    scores = problem.score(x, result.log_prob, seed=seed, num_energy=NUM_ENERGY)
    record["score_seconds"] = time.perf_counter() - score0
    record["scores"] = {k: _finite_or_none(scores[k]) for k in SCORE_KEYS if k in scores}
    if "mode_masses" in scores:
      record["mode_masses"] = np.asarray(scores["mode_masses"])[:, 1].tolist()
      record["exact_mode_masses"] = np.asarray(scores["exact_mode_masses"])[:, 1].tolist()
    record["status"] = "ok"
  except Exception as e:  # pylint: disable=broad-except
    record.setdefault("wall_seconds", time.perf_counter() - wall0)
    record.setdefault("cpu_seconds", time.process_time() - cpu0)
    record["status"] = "error"
    record["error_stage"] = stage
    record["error"] = f"{type(e).__name__}: {e}"[:2000]
    record["traceback"] = traceback.format_exc()[-4000:]
  return record


def _warm_up(problem):
  """TensorFlow's one-time start-up on this problem's target, outside any timed run."""
  target = tfc.targets.LatentTarget(problem.prior, problem.likelihood, problem.observation)
  z = problem.prior.distribution.sample(2, seed=[0, 0])
  target.log_prob(z).numpy()


def run_all(specs, methods, budgets, *, seed, num_samples, output_dir, method_options=None,
            log=print):
  """Runs every missing cell of `specs x methods x budgets`, appending to `runs.jsonl`.

  Args:
    specs: `{label: (constructor, kwargs)}` (see `problem_specs`); a problem is built only
      when one of its cells is missing.
    methods: names in `tfc.baselines.METHODS`.
    budgets: wall-clock budgets in seconds.
    seed, num_samples: passed to every method (the seed also to the scores).
    output_dir: holds `runs.jsonl` (finished cells) and `attempts.jsonl` (started cells).
    method_options: `{method: options}` for `tfc.baselines.run`.
    log: progress printer.

  Returns:
    The number of cells run (or recorded as not applicable) in this call.
  """
  for method in methods:
    if method not in tfc.baselines.METHODS:
      raise ValueError(f"`methods` must be names in {sorted(tfc.baselines.METHODS)}, got "
                       f"{method!r}.")
  budgets = [float(b) for b in budgets]
  if any(not (math.isfinite(b) and b > 0) for b in budgets):
    raise ValueError(f"`budgets` must be positive seconds, got {budgets!r}.")
  method_options = method_options or {}
  os.makedirs(output_dir, exist_ok=True)
  runs_path = os.path.join(output_dir, RUNS_FILE)
  attempts_path = os.path.join(output_dir, ATTEMPTS_FILE)
  done = {line_key(line) for line in read_lines(runs_path)}
  attempts = {}
  for line in read_lines(attempts_path):
    key = line_key(line)
    attempts[key] = attempts.get(key, 0) + 1
  num_run = 0
  total = len(specs) * len(methods) * len(budgets)
  index = 0
  built = {}
  # Budgets outermost: the short sweep over everything finishes first.
  for budget in budgets:
    for label, (constructor, kwargs) in specs.items():
      for method in methods:
        index += 1
        key = cell_key(label, method, budget, seed, num_samples, method_options.get(method))
        if key in done:
          continue
        if label not in built:
          t0 = time.perf_counter()
          built[label] = constructor(**kwargs)
          _warm_up(built[label])
          log(f"built {label} (D = {built[label].dim}) in {time.perf_counter() - t0:.1f} s")
        problem = built[label]
        options = method_options.get(method) or {}
        stub = {"problem": label, "dim": int(problem.dim), "method": method,
                "budget_seconds": budget, "seed": seed, "num_samples_asked": num_samples,
                "options": options}
        reason = not_applicable(method, problem)
        if reason is not None:
          record = dict(stub, status="not_applicable", reason=reason)
        elif attempts.get(key, 0) >= MAX_ATTEMPTS:
          record = dict(stub, status="error", error_stage="run", wall_seconds=None,
                        cpu_seconds=None,
                        error=f"the process ended during this cell in {attempts[key]} "
                              "attempts (killed, out of memory, or a crash in native code)")
        else:
          append_line(attempts_path, dict(stub, started=time.strftime("%Y-%m-%dT%H:%M:%S")))
          log(f"[{index}/{total}] {label} {method} {budget:g} s ...")
          record = run_cell(problem, label, method, budget, seed=seed, num_samples=num_samples,
                            options=options)
        append_line(runs_path, record)
        done.add(key)
        num_run += 1
        log(f"[{index}/{total}] {label} {method} {budget:g} s: {_summary(record)}")
  return num_run


def _summary(record):
  if record["status"] == "not_applicable":
    return f"not applicable: {record['reason']}"
  if record["status"] != "ok":
    return f"ERROR {record['error'][:200]}"
  s = record["scores"]
  parts = [f"wall {record['wall_seconds']:.1f} s", f"cpu {record['cpu_seconds']:.1f} s",
           f"draws {record['num_draws']}"]
  if s.get("kl") is not None:
    parts.append(f"kl {s['kl']:.3g}")
  parts.append(f"energy ratio {s['energy_ratio']:.3g}")
  if s.get("mode_mass_error") is not None:
    parts.append(f"mode err {s['mode_mass_error']:.3f}")
  return ", ".join(parts)


# ---------------------------------------------------------------------------
# The report.


def _fmt(value, digits=3):
  if value is None:
    return "—"
  if value == 0:
    return "0"
  magnitude = abs(value)
  if magnitude >= 1000 or magnitude < 1e-3:
    return f"{value:.2e}"
  return f"{value:.{digits}g}"


def _pm(value, stderr):
  if value is None:
    return "—"
  return _fmt(value) + ("" if stderr is None else f" ± {_fmt(stderr, 2)}")


def _bold(text, on):
  return f"**{text}**" if on else text


def _ok(record):
  return record is not None and record["status"] == "ok"


def _energy_size(record):
  """The sample size `m` of a record's energy statistics."""
  s = record["scores"]
  return min(NUM_ENERGY, int(round(s["num_samples"] * (1. - s["nonfinite_fraction"]))))


def unranked_reason(record):
  """Why a finished record is left out of the ranking (None: it is ranked).

  A record is ranked when its energy ratio was computed at the common sample size
  `min(num_samples, NUM_ENERGY)` and its draws are not just the chains' warm-up states.
  """
  if not _ok(record):
    return None
  if record.get("info", {}).get("num_sampling_steps") == 0:
    return "no sampling steps: the draws are the warm-up's last states"
  wanted = min(record["num_samples_asked"], NUM_ENERGY)
  if _energy_size(record) < wanted:
    return (f"energy ratio from {_energy_size(record)} draws, not {wanted}: it does not "
            "compare with the others")
  return None


def _ranked(record):
  return _ok(record) and unranked_reason(record) is None


def _score(record, key):
  return record["scores"].get(key) if _ranked(record) else None


def _overran(record):
  wall = record.get("wall_seconds")
  return wall is not None and wall > OVERRUN_FACTOR * record["budget_seconds"] + OVERRUN_SLACK


def _ordered(names, order):
  rank = {n: i for i, n in enumerate(order)}
  return sorted(names, key=lambda n: (rank.get(n.split("[")[0], len(rank)), n))


def _best(records, key):
  """The method with the lowest finite `scores[key]` among `records` ({method: record})."""
  values = {m: _score(r, key) for m, r in records.items()}
  values = {m: v for m, v in values.items() if v is not None}
  if not values:
    return None
  return min(values, key=values.get)


def _separation(a, b, key):
  """How many combined standard errors separate two records' `key` scores."""
  se = [r["scores"].get(key + "_stderr") or 0. for r in (a, b)]
  spread = math.hypot(*se)
  diff = abs(a["scores"][key] - b["scores"][key])
  return math.inf if spread == 0 else diff / spread


def _paragraph(label, by_budget, methods):
  """What the table says, built from the numbers."""
  sentences = []
  for budget, records in by_budget.items():
    ok = {m: r for m, r in records.items() if _ranked(r)}
    unranked = [m for m, r in records.items() if _ok(r) and not _ranked(r)]
    if not records:
      sentences.append(f"At {budget:g} s nothing has run yet.")
      continue
    if not ok:
      sentences.append(f"At {budget:g} s no method finished with comparable draws" + (
          f" (not ranked: {', '.join(unranked)})." if unranked else "."))
      continue
    ranking = sorted(ok, key=lambda m: ok[m]["scores"]["energy_ratio"])
    best = ranking[0]
    rb = ok[best]["scores"]
    text = (f"At {budget:g} s the lowest energy ratio is {best}'s "
            f"({_pm(rb['energy_ratio'], rb.get('energy_ratio_stderr'))}")
    if len(ranking) > 1:
      second = ranking[1]
      sep = _separation(ok[best], ok[second], "energy_ratio")
      text += (f"; next {second}, {_fmt(ok[second]['scores']['energy_ratio'])}, "
               + ("a clear gap" if sep > 2 else "within two standard errors")
               + f" ({sep:.1f} se)")
    text += ")."
    if "composed" in ok and best != "composed":
      rc = ok["composed"]["scores"]
      rank = ranking.index("composed") + 1
      text += (f" The composed posterior is {_ordinal(rank)} of {len(ranking)}: energy ratio "
               f"{_fmt(rc['energy_ratio'])}, {rc['energy_ratio'] / rb['energy_ratio']:.1f} "
               f"times the best.")
    elif best == "composed":
      text += " The composed posterior is best here."
    elif "composed" in records:
      text += " The composed posterior is not ranked here."
    with_kl = {m: r for m, r in ok.items() if r["scores"].get("kl") is not None}
    if with_kl:
      kl_best = min(with_kl, key=lambda m: with_kl[m]["scores"]["kl"])
      text += f" Lowest KL(q || p): {kl_best}, " + _pm(
          with_kl[kl_best]["scores"]["kl"], with_kl[kl_best]["scores"].get("kl_stderr"))
      others = [f"{m} {_fmt(r['scores']['kl'])}" for m, r in with_kl.items() if m != kl_best]
      text += (" (" + ", ".join(others) + ")." if others else ".")
    with_modes = {m: r for m, r in ok.items() if r["scores"].get("mode_mass_error") is not None}
    if with_modes:
      mode_best = min(with_modes, key=lambda m: with_modes[m]["scores"]["mode_mass_error"])
      floor = with_modes[mode_best]["scores"].get("mode_mass_stderr")
      text += (f" Mode masses: {mode_best} is closest (max error "
               f"{_fmt(with_modes[mode_best]['scores']['mode_mass_error'])}; exact draws of the "
               f"same size would err by about {_fmt(floor)} per block)")
      if "composed" in with_modes and mode_best != "composed":
        text += f", composed {_fmt(with_modes['composed']['scores']['mode_mass_error'])}"
      text += "."
    if unranked:
      text += " Not ranked (see the notes): " + ", ".join(unranked) + "."
    failed = [m for m, r in records.items() if not _ok(r)]
    if failed:
      text += " Failed: " + ", ".join(failed) + "."
    over = [f"{m} ({r['wall_seconds']:.0f} s)" for m, r in records.items() if _overran(r)]
    if over:
      text += " Over the budget: " + ", ".join(over) + "."
    sentences.append(text)
  return " ".join(sentences)


def _ordinal(n):
  return {1: "first", 2: "second", 3: "third"}.get(n, f"{n}th")


def problem_table(label, records, methods, budgets):
  """Markdown for one problem: the table, its notes and the paragraph."""
  by_budget = {b: {m: records[(m, b)] for m in methods if (m, b) in records} for b in budgets}
  header = ["method"]
  for b in budgets:
    header += [f"{b:g} s: KL ± se", "energy ratio ± se", "mode err", "non-finite", "draws",
               "wall s", "CPU s"]
  rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  best_energy = {b: _best(by_budget[b], "energy_ratio") for b in budgets}
  best_kl = {b: _best(by_budget[b], "kl") for b in budgets}
  best_mode = {b: _best(by_budget[b], "mode_mass_error") for b in budgets}
  notes = []
  for m in methods:
    if not any((m, b) in records for b in budgets):
      continue
    cells = [m]
    for b in budgets:
      r = records.get((m, b))
      if r is None:
        cells += ["not run"] + [""] * 6
        continue
      if not _ok(r):
        cells += ["failed", "failed", "—", "—", "—", _fmt(r.get("wall_seconds")),
                  _fmt(r.get("cpu_seconds"))]
        notes.append(f"{m} at {b:g} s failed ({r.get('error_stage')}): "
                     f"`{r['error'].splitlines()[0][:300]}`")
        continue
      s = r["scores"]
      wall = _fmt(r["wall_seconds"]) + (" †" if _overran(r) else "")
      reason = unranked_reason(r)
      energy = _pm(s["energy_ratio"], s.get("energy_ratio_stderr")) + (" ‡" if reason else "")
      cells += [
          _bold(_pm(s.get("kl"), s.get("kl_stderr")), best_kl[b] == m),
          _bold(energy, best_energy[b] == m),
          _bold(_fmt(s.get("mode_mass_error")), best_mode[b] == m),
          _fmt(s["nonfinite_fraction"]), str(r["num_draws"]), wall, _fmt(r["cpu_seconds"])]
      if reason:
        notes.append(f"‡ {m} at {b:g} s is not ranked: {reason} ({r['num_draws']} of "
                     f"{r['num_samples_asked']} draws returned).")
      elif r["num_draws"] < r["num_samples_asked"]:
        notes.append(f"{m} at {b:g} s returned {r['num_draws']} of {r['num_samples_asked']} "
                     "draws.")
    rows.append("| " + " | ".join(cells) + " |")
  dims = {r["dim"] for r in records.values() if r.get("dim") is not None}
  title = f"### {label}" + (f" (D = {dims.pop()})" if len(dims) == 1 else "")
  parts = [title, "", "\n".join(rows), ""]
  if notes:
    parts += ["\n".join(f"- {n}" for n in notes), ""]
  parts += ["What it says: " + _paragraph(label, by_budget, methods), ""]
  return "\n".join(parts)


def _overall(tables):
  """Counts of (problem, budget) cells each method wins on energy ratio, and composed's rank."""
  wins, composed_ranks = {}, []
  for label, by_budget in tables.items():
    for budget, records in by_budget.items():
      ok = {m: r for m, r in records.items() if _ranked(r)}
      if not ok:
        continue
      ranking = sorted(ok, key=lambda m: ok[m]["scores"]["energy_ratio"])
      wins[ranking[0]] = wins.get(ranking[0], 0) + 1
      if "composed" in ok:
        composed_ranks.append((label, budget, ranking.index("composed") + 1, len(ranking)))
  if not wins:
    return "No cell has finished yet."
  finished = [r for by_budget in tables.values() for records in by_budget.values()
              for r in records.values()]
  total = sum(wins.values())
  text = "Lowest energy ratio, over the " + f"{total} (problem, budget) pairs: " + ", ".join(
      f"{m} {n}" for m, n in sorted(wins.items(), key=lambda kv: -kv[1])) + "."
  if composed_ranks:
    text += " The composed posterior's rank: " + "; ".join(
        f"{label} {budget:g} s: {rank} of {n}" for label, budget, rank, n in composed_ranks) + "."
  for name, flagged in (("Not ranked", [r for r in finished if _ok(r) and not _ranked(r)]),
                        ("Over the budget", [r for r in finished if _overran(r)]),
                        ("Failed", [r for r in finished if not _ok(r)])):
    if flagged:
      counts = {}
      for r in flagged:
        counts[r["method"]] = counts.get(r["method"], 0) + 1
      text += (f" {name}: {len(flagged)} of {len(finished)} cells ("
               + ", ".join(f"{m} {n}" for m, n in counts.items()) + ").")
  return text


# Methods that sample from or correct the composed fit; every other method is a baseline.
FROM_THE_FIT = ("composed_sir", "neutra_hmc")


def _cell(record, key):
  """`value ± se` of a ranked record's score, or an empty cell."""
  if record is None or _score(record, key) is None:
    return ""
  return _pm(record["scores"][key], record["scores"].get(key + "_stderr"))


def comparison_table(by_problem):
  """Markdown: per problem and budget, the composed posterior's KL and energy ratio next to
  the best baseline's (lowest energy ratio; the lowest KL of the baselines with a density
  beside it) and the best method drawing on the composed fit (`FROM_THE_FIT`)."""
  rows = ["| problem | budget | composed: KL | energy ratio | best baseline | its energy ratio "
          "| lowest baseline KL | best from the fit | its energy ratio |",
          "|---|---|---|---|---|---|---|---|---|"]
  for label, by_budget in by_problem.items():
    for budget, records in by_budget.items():
      composed = records.get("composed")
      baselines = {m: r for m, r in records.items()
                   if m != "composed" and m.split("[")[0] not in FROM_THE_FIT}
      refined = {m: r for m, r in records.items() if m.split("[")[0] in FROM_THE_FIT}
      best = _best(baselines, "energy_ratio")
      best_kl = _best(baselines, "kl")
      best_refined = _best(refined, "energy_ratio")
      if composed is None and best is None:
        continue
      rows.append("| " + " | ".join([
          label, f"{budget:g} s", _cell(composed, "kl"), _cell(composed, "energy_ratio"),
          best or "", _cell(baselines.get(best), "energy_ratio"),
          f"{best_kl}: {_cell(baselines[best_kl], 'kl')}" if best_kl else "",
          best_refined or "", _cell(refined.get(best_refined), "energy_ratio")]) + " |")
  return "\n".join(rows)


def write_report(output_dir, report_path, *, seed, num_samples, command=None):
  """Writes the Markdown report from `<output_dir>/runs.jsonl`; returns its text."""
  all_lines = [l for l in read_lines(os.path.join(output_dir, RUNS_FILE))
               if l["seed"] == seed and l["num_samples_asked"] == num_samples]
  lines = [l for l in all_lines if l["status"] != "not_applicable"]
  records = {}
  for line in lines:  # The last line of a cell wins.
    records.setdefault(line["problem"], {})[(line["method"], line["budget_seconds"])] = line
  methods = _ordered({l["method"] for l in lines}, list(tfc.baselines.METHODS))
  budgets = sorted({l["budget_seconds"] for l in lines})
  sessions = read_lines(os.path.join(output_dir, SESSIONS_FILE))
  out = ["# Ground truth: every method on problems with exact posteriors", ""]
  out.append("Generated by `experiments/ground_truth.py` from "
             f"`{os.path.join(output_dir, RUNS_FILE)}` ({len(lines)} cells, seed {seed}, "
             f"{num_samples} draws asked of each method).")
  out.append("")
  if command:
    out += ["Report written by:", "", "```", command, "```", ""]
  if sessions:
    out.append("Sessions (a resumed run adds one):")
    out.append("")
    for s in sessions:
      out.append(f"- {s['started']}: `{s['command']}` on {s['nproc']} CPUs "
                 f"({s['platform']}), load average at start {s['load_average']}, "
                 f"commit {s.get('commit', '?')}, TF {s.get('tensorflow', '?')}, "
                 f"TFP {s.get('tfp', '?')}.")
    out.append("")
  loads = [l["load_average_1min"] for l in lines if l.get("load_average_1min") is not None]
  if loads:
    out.append(f"1-minute load average when the cells started: median {np.median(loads):.1f}, "
               f"range {min(loads):.1f} to {max(loads):.1f}, on "
               f"{sessions[-1]['nproc'] if sessions else os.cpu_count()} CPUs shared with "
               "other work: wall seconds are inflated by the load; CPU seconds are the "
               "process's own (all threads) during the call.")
    out.append("")
  out += [
      "Columns, per budget: `KL ± se` is `KL(q || p) = E_q[log q - log p(x | y)]` and its Monte "
      "Carlo standard error (methods with a density only); `energy ratio` is the energy "
      "distance to exact draws divided by its floor (exact against exact at the same sample "
      "size; 1 is perfect; `problem.score`); `mode err` is the largest error of a block's mode "
      "mass; `non-finite` the fraction of draws dropped as NaN/Inf; `wall s` and `CPU s` the "
      f"call's wall and process CPU seconds († over {OVERRUN_FACTOR:g} x budget + "
      f"{OVERRUN_SLACK:g} s). Bold: the lowest value of the column at that budget; the best "
      "method of a problem and budget is the one with the lowest energy ratio, the one score "
      "every method has, among the ranked rows: ‡ marks a row left out of the ranking (its "
      f"energy ratio comes from fewer than min(draws asked, {NUM_ENERGY}) draws — for a wrong q the "
      "ratio grows with the sample size, so it flatters small samples — or an MCMC run made "
      "no sampling step and returned its warm-up states).", ""]
  by_problem = {}
  for label in _ordered(records, list(tfc.problems.PROBLEMS)):
    recs = records[label]
    by_problem[label] = {b: {m: recs[(m, b)] for m in methods if (m, b) in recs}
                         for b in budgets}
  pending = sum(1 for label, by_budget in by_problem.items() for budget in budgets
                for m in methods if (m, budget) not in records[label]
                and any((m, b) in records[label] for b in budgets))
  summary = _overall(by_problem)
  if pending:
    summary += (f" Not run yet: {pending} cells of this grid (the session's command resumes "
                "the run).")
  out += ["## Summary", "", summary, ""]
  out += ["The composed posterior next to the best baseline (lowest energy ratio among the "
          f"methods that do not use the composed fit) and the best of {', '.join(FROM_THE_FIT)} "
          "(which refine that fit); ranked cells only:", "", comparison_table(by_problem), ""]
  not_applicable_methods = {}
  for l in all_lines:
    if l["status"] == "not_applicable":
      not_applicable_methods.setdefault(l["method"], set()).add(l["problem"])
  for m, labels in not_applicable_methods.items():
    reason = next(l["reason"] for l in all_lines if l["method"] == m
                  and l["status"] == "not_applicable")
    out += [f"Not run: {m} on " + ", ".join(_ordered(labels, list(tfc.problems.PROBLEMS)))
            + f" ({reason.split(';')[0]}).", ""]
  out += ["## Tables", ""]
  for label in by_problem:
    out.append(problem_table(label, records[label], methods, budgets))
  text = "\n".join(out)
  os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
  tmp = report_path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, report_path)
  return text


def machine_info():
  info = {"nproc": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()],
          "platform": platform.platform(), "python": platform.python_version()}
  try:
    import tensorflow as tf
    import tensorflow_probability as tfp
    info["tensorflow"], info["tfp"] = tf.__version__, tfp.__version__
  except ImportError:
    pass
  try:
    info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, check=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    pass
  return info


def main(argv):
  del argv
  command = "python -m experiments.ground_truth " + " ".join(
      shlex.quote(a) for a in sys.argv[1:])
  output_dir, seed, num_samples = _OUTPUT_DIR.value, _SEED.value, _NUM_SAMPLES.value
  specs = problem_specs(_PROBLEMS.value, _NUM_BLOCKS.value)
  if not _REPORT_ONLY.value:
    os.makedirs(output_dir, exist_ok=True)
    session = dict(machine_info(), command=command, started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    append_line(os.path.join(output_dir, SESSIONS_FILE), session)
    logging.info("session: %s", session)
    t0 = time.perf_counter()
    num_run = run_all(
        specs, _METHODS.value, [float(b) for b in _BUDGETS.value], seed=seed,
        num_samples=num_samples, output_dir=output_dir,
        method_options=json.loads(_METHOD_OPTIONS.value),
        log=lambda message: print(message, flush=True))
    print(f"{num_run} cells run in {time.perf_counter() - t0:.0f} s", flush=True)
  write_report(output_dir, _REPORT.value, seed=seed, num_samples=num_samples,
               command=command)
  print(f"wrote {_REPORT.value}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
