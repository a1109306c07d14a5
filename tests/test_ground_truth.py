"""experiments/ground_truth.py, short: tiny problems, a few methods, a budget of seconds.

Checks that every (problem, method, budget) cell gets one line with finite scores, that the
Markdown report holds one table per problem, that a second run resumes without new work
(no problem is even built), that a method that raises and a cell whose process died are
recorded as failures, and that the report's bold marks and sentences follow the numbers.
"""

import json
import math
import time

from experiments import ground_truth
import tfp_composed as tfc


class _Counted:
  """A problem constructor that counts its calls."""

  def __init__(self, constructor):
    self.constructor = constructor
    self.calls = 0

  def __call__(self, **kwargs):
    self.calls += 1
    return self.constructor(**kwargs)


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_quick_run_scores_every_cell_writes_the_report_and_resumes(tmp_path):
  constructors = {"bimodal_blocks[num_blocks=2]": _Counted(tfc.problems.bimodal_blocks),
                  "linear_gaussian_4": _Counted(tfc.problems.linear_gaussian)}
  specs = {"bimodal_blocks[num_blocks=2]": (constructors["bimodal_blocks[num_blocks=2]"],
                                            {"num_blocks": 2}),
           "linear_gaussian_4": (constructors["linear_gaussian_4"], {"dim": 4})}
  methods = ["composed", "mala", "pl_mcmc"]
  budgets = [2.]
  # The Laplace start is not bounded by the budget; without it the test stays short.
  kwargs = dict(seed=0, num_samples=400, output_dir=str(tmp_path),
                method_options={"composed": {"init": None}}, log=lambda message: None)
  num_run = ground_truth.run_all(specs, methods, budgets, **kwargs)
  runs = tmp_path / ground_truth.RUNS_FILE
  lines = _lines(runs)
  assert num_run == len(lines) == len(specs) * len(methods) * len(budgets)
  cells = {(l["problem"], l["method"], l["budget_seconds"]) for l in lines}
  assert len(cells) == len(lines)
  for line in lines:
    if line["method"] == "pl_mcmc":  # Neither operator is a mask.
      assert line["status"] == "not_applicable" and "Mask" in line["reason"], line
      continue
    assert line["status"] == "ok", line.get("traceback")
    scores = line["scores"]
    assert math.isfinite(scores["energy_ratio"]) and scores["energy_ratio"] > 0, line
    assert math.isfinite(scores["energy_ratio_stderr"]), line
    assert 0 <= scores["nonfinite_fraction"] < 1, line
    assert line["wall_seconds"] > 0 and line["cpu_seconds"] > 0, line
    assert (scores.get("kl") is not None) == (line["method"] == "composed"), line
    if line["method"] == "composed":
      assert math.isfinite(scores["kl"]) and math.isfinite(scores["kl_stderr"]), line
    has_modes = line["problem"].startswith("bimodal")
    assert (scores.get("mode_mass_error") is not None) == has_modes, line
    if has_modes:
      assert 0 <= scores["mode_mass_error"] <= 1 and len(line["mode_masses"]) == 2, line

  report = tmp_path / "ground_truth.md"
  text = ground_truth.write_report(str(tmp_path), str(report), seed=0, num_samples=400,
                                   command="python -m experiments.ground_truth --quick")
  assert report.read_text() == text
  for label in specs:
    assert f"### {label}" in text
  assert text.count("| method | 2 s: KL ± se | energy ratio ± se | mode err |") == 2
  rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
  assert rows.count("composed") == 2 and rows.count("mala") == 2  # A row per problem table.
  assert text.count("What it says: At 2 s the lowest energy ratio is") == 2
  assert "Not run: pl_mcmc" in text and "--quick" in text

  # A second run finds every cell done: no new line, no problem built, quick.
  t0 = time.perf_counter()
  assert ground_truth.run_all(specs, methods, budgets, **kwargs) == 0
  assert time.perf_counter() - t0 < 5.
  assert len(_lines(runs)) == len(lines)
  assert [c.calls for c in constructors.values()] == [1, 1]


def test_a_method_that_raises_and_a_dead_cell_are_recorded_as_failures(tmp_path):
  specs = {"linear_gaussian_4": (tfc.problems.linear_gaussian, {"dim": 4})}
  common = dict(seed=0, num_samples=100, output_dir=str(tmp_path), log=lambda message: None)
  # Two earlier processes died inside the hmc cell (an attempt line, no result line).
  key = {"problem": "linear_gaussian_4", "method": "hmc", "budget_seconds": 1., "seed": 0,
         "num_samples_asked": 100, "options": {}}
  for _ in range(ground_truth.MAX_ATTEMPTS):
    ground_truth.append_line(str(tmp_path / ground_truth.ATTEMPTS_FILE), key)
  ground_truth.run_all(specs, ["mala", "hmc"], [1.],
                       method_options={"mala": {"step_size": -1.}}, **common)
  lines = {l["method"]: l for l in _lines(tmp_path / ground_truth.RUNS_FILE)}
  assert lines["mala"]["status"] == "error"
  assert lines["mala"]["error"].startswith("ValueError") and "step_size" in lines["mala"]["error"]
  assert lines["hmc"]["status"] == "error" and "process ended" in lines["hmc"]["error"]
  text = ground_truth.write_report(str(tmp_path), str(tmp_path / "r.md"), seed=0,
                                   num_samples=100)
  assert "| mala | failed | failed |" in text and "| hmc | failed | failed |" in text
  assert "no method finished" in text


def _record(method, energy, kl=None, mode=None, wall=2., budget=2., draws=10, info=None):
  scores = {"energy_ratio": energy, "energy_ratio_stderr": 0.1, "nonfinite_fraction": 0.,
            "num_samples": draws}
  if kl is not None:
    scores.update(kl=kl, kl_stderr=0.01)
  if mode is not None:
    scores.update(mode_mass_error=mode, mode_mass_stderr=0.01)
  return {"problem": "p", "dim": 4, "method": method, "budget_seconds": budget, "seed": 0,
          "num_samples_asked": 10, "options": {}, "status": "ok", "wall_seconds": wall,
          "cpu_seconds": 1., "num_draws": draws, "scores": scores, "info": info or {}}


def test_report_bold_and_sentences_follow_the_numbers(tmp_path):
  records = [_record("composed", 4.2, kl=0.5, mode=0.3, wall=9.),
             _record("ambient_vi", 8.4, kl=0.2, mode=0.05),
             _record("nuts", 1.4, mode=0.1),
             # Lower ratios, but not comparable: warm-up states only, and fewer draws.
             _record("hmc", 1.1, mode=0.01, info={"num_sampling_steps": 0}),
             _record("ula", 1.2, mode=0.02, draws=5)]
  for r in records:
    ground_truth.append_line(str(tmp_path / ground_truth.RUNS_FILE), r)
  text = ground_truth.write_report(str(tmp_path), str(tmp_path / "r.md"), seed=0,
                                   num_samples=10)
  rows = {line.split("|")[1].strip(): line for line in text.splitlines()
          if line.startswith("| ") and not line.startswith("| method")}
  assert "**1.4 ± 0.1**" in rows["nuts"]       # Lowest energy ratio.
  assert "**0.2 ± 0.01**" in rows["ambient_vi"] and "**0.05**" in rows["ambient_vi"]
  assert "**" not in rows["composed"]
  assert "**" not in rows["hmc"] and "1.1 ± 0.1 ‡" in rows["hmc"]
  assert "**" not in rows["ula"] and "1.2 ± 0.1 ‡" in rows["ula"]
  assert "hmc at 2 s is not ranked: no sampling steps" in text
  assert "ula at 2 s is not ranked: energy ratio from 5 draws, not 10" in text
  assert "Not ranked (see the notes): ula, hmc." in text
  assert "9 †" in rows["composed"]              # Over 1.1 x 2 s + 1.5 s.
  assert "the lowest energy ratio is nuts's (1.4 ± 0.1" in text
  assert "The composed posterior is second of 3: energy ratio 4.2, 3.0 times the best." in text
  assert "Lowest KL(q || p): ambient_vi, 0.2 ± 0.01 (composed 0.5)." in text
  assert "Over the budget: composed (9 s)." in text
  assert "Lowest energy ratio, over the 1 (problem, budget) pairs: nuts 1." in text


def test_comparison_table_puts_the_composed_posterior_next_to_the_best_baseline(tmp_path):
  # The best baseline is the lowest ranked energy ratio outside the composed family (hmc's
  # lower ratio is unranked, composed_sir's draws on the composed fit); its KL column is the
  # lowest KL among the baselines with a density.
  records = [_record("composed", 4.2, kl=0.5), _record("ambient_vi", 8.4, kl=0.2),
             _record("nuts", 1.4), _record("hmc", 1.1, info={"num_sampling_steps": 0}),
             _record("composed_sir", 0.9), _record("neutra_hmc", 1.3)]
  for r in records:
    ground_truth.append_line(str(tmp_path / ground_truth.RUNS_FILE), r)
  text = ground_truth.write_report(str(tmp_path), str(tmp_path / "r.md"), seed=0,
                                   num_samples=10)
  assert ("| p | 2 s | 0.5 ± 0.01 | 4.2 ± 0.1 | nuts | 1.4 ± 0.1 | ambient_vi: 0.2 ± 0.01 "
          "| composed_sir | 0.9 ± 0.1 |") in text
