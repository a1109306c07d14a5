"""Tests of experiments/compare.py: runs.jsonl, resume, the report, and a real end-to-end run."""

import json
import os
import types

from absl import flags
from absl.testing import flagsaver
import numpy as np

from experiments import compare
import tfp_composed as tfc


def _record(image, method, psnr, **extra):
  record = {"prior": "digits8x8", "task": "inpaint_lower_half", "image": image, "label": 0,
            "method": method, "budget_seconds": 5.0, "seed": 0, "psnr_mean": psnr,
            "coverage_25": 0.3, "coverage_90": 0.85, "seconds": 1.0}
  record.update(extra)
  return record


def test_append_and_read_survive_a_line_cut_by_a_kill(tmp_path):
  path = str(tmp_path / "runs.jsonl")
  assert compare.read_runs(path) == []
  compare.append_run(path, _record(0, "a", 10.))
  with open(path, "a") as f:
    f.write('{"prior": "digits8x8", "task": "inp')  # A run killed while writing.
  assert [r["method"] for r in compare.read_runs(path)] == ["a"]
  compare.append_run(path, _record(1, "b", 12.))
  records = compare.read_runs(path)
  assert [(r["image"], r["method"]) for r in records] == [(0, "a"), (1, "b")]
  assert compare.run_key(records[1]) == ("digits8x8", "inpaint_lower_half", 1, "b", 5.0, 0)


def test_report_tables_are_means_and_standard_deviations(tmp_path):
  output_dir = str(tmp_path / "out")
  os.makedirs(output_dir)
  path = os.path.join(output_dir, "runs.jsonl")
  compare.append_run(path, _record(0, "composed", 10., log_q_rank=0.25))
  compare.append_run(path, _record(1, "composed", 12., log_q_rank=0.75))
  compare.append_run(path, _record(0, "map", 11.))
  compare.append_run(path, _record(1, "map", None, error="ValueError: no luck"))
  results_md = str(tmp_path / "RESULTS.md")
  text = compare.write_report(output_dir, results_md)
  assert open(results_md).read() == text
  rows = {}  # The first table's row of each method (the second table has one too).
  for line in text.splitlines():
    if line.startswith("| composed") or line.startswith("| map"):
      rows.setdefault(line.split(" | ")[0].strip("| "), line)
  # composed: PSNR (10, 12) -> 11.00 +- sqrt(2) (sample std); ranks (0.25, 0.75) -> 0.50 +- 0.35.
  assert "| 11.00 ± 1.41 |" in rows["composed"] and "| 0.50 ± 0.35 |" in rows["composed"]
  assert rows["map"].startswith("| map | 5 | 1 | 11.00 |")  # The failed image is left out...
  assert "map, 5 s, image 1: ValueError: no luck" in text   # ...and listed.
  assert os.path.exists(os.path.join(output_dir, "figures", "digits8x8__calibration.png"))
  assert tfc.tasks.get("inpaint_lower_half", image_shape=[8, 8, 1]).description in text


def _stand_in_baselines(calls):
  """A `tfc.baselines` stand-in: prior draws for 'draws', an error for 'fails'."""

  class Result:

    def __init__(self, x):
      self.x, self.log_prob, self.seconds, self.info = x, None, 0.01, {"acceptance": 0.5,
                                                                       "losses": [3., 2.]}

  def run(method, prior, likelihood, observation, *, budget_seconds=None, num_steps=None,
          seed=0, **options):
    del likelihood, observation, num_steps, options
    calls.append((method, budget_seconds))
    if method == "fails":
      raise ValueError("needs a mask")
    return Result(prior.sample(8, seed=[seed, 1]).numpy())

  return types.SimpleNamespace(METHODS=("draws", "fails"), run=run)


def test_run_all_resumes_and_records_errors(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setitem(vars(tfc), "baselines", _stand_in_baselines(calls))
  output_dir = str(tmp_path / "out")
  kwargs = dict(prior_name="digits8x8", task_names=["denoise"], methods=["draws", "fails"],
                num_images=2, budgets=[1.0], output_dir=output_dir, seed=0, options={},
                log=lambda message: None)
  assert compare.run_all(**kwargs) == 4
  records = compare.read_runs(os.path.join(output_dir, "runs.jsonl"))
  assert len(calls) == 4 and len(records) == 4
  draws = [r for r in records if r["method"] == "draws"]
  assert all(r["num_samples"] == 8 and np.isfinite(r["psnr_mean"]) for r in draws)
  assert draws[0]["info"] == {"acceptance": 0.5, "losses_last": 2.}
  assert draws[0]["log_q_rank"] is None and draws[0]["has_density"] is False
  assert all(r["error"] == "ValueError: needs a mask" for r in records if r["method"] == "fails")
  assert compare.run_all(**kwargs) == 0 and len(calls) == 4  # Resumed: nothing rerun.
  assert compare.run_all(**dict(kwargs, retry_errors=True)) == 2 and len(calls) == 6


def test_run_all_puts_every_image_0_first(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setitem(vars(tfc), "baselines", _stand_in_baselines(calls))
  output_dir = str(tmp_path / "out")
  assert compare.run_all("digits8x8", ["denoise", "inpaint_lower_half"], ["draws"], 2, [1.0, 2.0],
                         output_dir, 0, {}, log=lambda message: None) == 8
  order = [(r["image"], r["task"], r["budget_seconds"])
           for r in compare.read_runs(os.path.join(output_dir, "runs.jsonl"))]
  assert order == [(i, t, b) for i in (0, 1) for t in ("denoise", "inpaint_lower_half")
                   for b in (1.0, 2.0)]


def test_end_to_end_run_then_resume(tmp_path):
  output_dir = str(tmp_path / "compare")
  results_md = str(tmp_path / "RESULTS.md")
  # The composed fit starts from the prior (`init: null`): the Laplace start is not bounded by
  # the budget.
  argv = ["compare", "--prior=digits8x8", "--tasks=inpaint_lower_half", "--num_images=1",
          "--methods=composed,ula", "--budgets=3", f"--output_dir={output_dir}",
          f"--results_md={results_md}", "--seed=0",
          '--method_options={"composed": {"init": null}}']
  runs = os.path.join(output_dir, "runs.jsonl")
  with flagsaver.flagsaver():
    flags.FLAGS(argv)
    compare.main(["compare"])
  with open(runs) as f:
    first = f.read()
  records = [json.loads(line) for line in first.splitlines()]
  assert sorted(r["method"] for r in records) == ["composed", "ula"]
  for r in records:
    assert "error" not in r, r
    assert r["num_samples"] - r["num_nonfinite"] >= 2 and np.isfinite(r["psnr_mean"])
  composed = next(r for r in records if r["method"] == "composed")
  assert composed["has_density"] and composed["log_q_rank"] is not None
  # Importance weights of the samples (a density) and the cost of every run.
  assert composed["elbo"] <= composed["iw_bound"] and 0. < composed["ess_fraction"] <= 1.
  assert np.isfinite(composed["k_hat"]) and composed["info"]["num_parameters"] > 0
  ula = next(r for r in records if r["method"] == "ula")
  assert ula["elbo"] is None and ula["k_hat"] is None
  for r in records:
    assert r["peak_rss_mb"] > 100. and 0. <= r["rss_increase_mb"] < r["peak_rss_mb"]
  text = open(results_md).read()
  assert "### `inpaint_lower_half`" in text and "| composed | 3 | 1 |" in text
  assert "| IW bound on log p(y) |" in text
  assert os.path.exists(os.path.join(output_dir, "figures",
                                     "digits8x8__inpaint_lower_half__samples.png"))
  with flagsaver.flagsaver():  # Resumed: no new line, the file unchanged.
    flags.FLAGS(argv)
    compare.main(["compare"])
  with open(runs) as f:
    assert f.read() == first
  os.remove(results_md)
  with flagsaver.flagsaver():
    flags.FLAGS(argv + ["--report_only"])
    compare.main(["compare"])
  assert open(results_md).read() == text


def test_summary_compares_on_common_images_and_names_what_fails():
  records = [
      _record(0, "composed", 20., psnr_best_of_16=19., coverage_90=0.92),
      _record(1, "composed", 10., psnr_best_of_16=9., coverage_90=0.80),
      _record(0, "mala", 18., psnr_best_of_16=19.5, coverage_90=0.9),
      _record(1, "mala", None, error="FloatingPointError"),  # Image 1: composed vs map only...
      _record(0, "map", 17., psnr_best_of_16=18.),
      _record(1, "map", 30., psnr_best_of_16=30.),           # ...so it is left out.
  ]
  lines = compare.summary_table(records, ["inpaint_lower_half"], ["composed", "mala", "map"],
                                [5.0])
  assert lines[2] == ("| `inpaint_lower_half` | 5 | 1 | composed 20.00 | mala 19.50 | "
                      "20.00 / 19.00 / 0.920 | no: best of 16 below mala, below mala | – |")
  good = [dict(r, psnr_best_of_16=25.) if r["method"] == "composed" else r for r in records]
  assert compare.summary_table(good, ["inpaint_lower_half"], ["composed", "mala", "map"],
                               [5.0])[2].endswith("| yes | – |")


def test_summary_checks_the_recommended_refinements_on_their_own_images():
  # NeuTra HMC ran on image 0 only: the other columns still use images 0 and 1 of the core
  # methods; its goal is checked on image 0 against them, and a composed method does not
  # count against the composed posterior's own goal.
  records = [
      _record(0, "composed", 20., psnr_best_of_16=19., coverage_90=0.92),
      _record(1, "composed", 22., psnr_best_of_16=21., coverage_90=0.88),
      _record(0, "mala", 18., psnr_best_of_16=19.5, coverage_90=0.9),
      _record(1, "mala", 18., psnr_best_of_16=18., coverage_90=0.9),
      _record(0, "neutra_hmc", 21., psnr_best_of_16=20., coverage_90=0.91),
      _record(0, "composed_sir", 19., psnr_best_of_16=19.2, coverage_90=0.7),
      _record(1, "composed_sir", 19., psnr_best_of_16=10., coverage_90=0.7),
  ]
  methods = ["composed", "composed_sir", "mala", "neutra_hmc"]
  line = compare.summary_table(records, ["inpaint_lower_half"], methods, [5.0])[2]
  assert line == ("| `inpaint_lower_half` | 5 | 2 | composed 21.00 | composed 20.00 | "
                  "21.00 / 20.00 / 0.900 | yes | composed_sir no: best of 16 below mala, "
                  "coverage, below mala; neutra_hmc yes (1 image) |")
