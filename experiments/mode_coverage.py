r"""Mode coverage and accuracy of `fit()` on the ground-truth suite (`tfc.problems`).

For each problem, builds a `ComposedPosterior` with the given constructor options, runs
`fit(seed=...)` with the given fit options (the library's defaults when none are given),
draws `num_samples` samples with their `log q`, and scores them against the exact posterior:
`KL(q || p)` (Monte Carlo, with its standard error), the energy distance over its
exact-vs-exact floor, the largest mode-mass error, and the wall and process CPU seconds of
the whole fit (start and training).

`--method=old` reproduces the defaults before the mode-coverage work (a Gaussian-mixture
base of 8 components at a multi-start Laplace start, reverse KL from weight 1).

`--start=principal_axes` (issue #9) changes only the start: `fit`'s mode search
(`find_modes(target, 2)`) gives a Gaussian `N(m, S)` (the Laplace of one mode, or the
moments of the modes found), `S = V diag(s) V^T`, and the default pre-generator gets a
fixed rotation last, `z = V (shift + L h(eps))` (`h` its couplings, `L` its triangular
affine stage). One mode: `shift = V^T m`, `L = diag(s)^(1/2)`, no annealing, so `q` starts
at `N(m, S)` as with `fit`'s Laplace start (`L L^T = S`, Cholesky); several modes: `L = I`,
`q` starts at the prior (rotated) and anneals as with `fit`'s start. Apart from the mode
search, the start does not depend on the latent coordinate axes, where Cholesky's does. It is
an experiment, not a fix: it failed on `bimodal_blocks` (results/mode_coverage.md).

Example:

  python -m experiments.mode_coverage
  python -m experiments.mode_coverage --problems=bimodal_blocks --num_blocks=2 --method=old
  python -m experiments.mode_coverage --problems=latent_rotated_bimodal_blocks \
      --start=principal_axes
"""

import json
import time

from absl import app
from absl import flags

import numpy as np
import tensorflow_probability as tfp

import tfp_composed as tfc

tfb = tfp.bijectors

PROBLEMS = ("bimodal_blocks", "nonlinear_blocks", "linear_gaussian_64",
            "rotated_bimodal_blocks", "rotated_nonlinear_blocks",
            "latent_rotated_bimodal_blocks", "latent_rotated_nonlinear_blocks")

# The defaults before the mode-coverage work, as options of the current code.
OLD = dict(posterior=dict(base="mixture", num_components=8),
           fit=dict(init="laplace", anneal_steps=0, forward_weight=0.))
NEW = dict(posterior={}, fit={})
STARTS = ("default", "principal_axes", "cholesky")


def principal_axes_start(problem, seed, mixing="permutation"):
  """The pre-generator and fit options of `--start=principal_axes` (module docstring), with
  `real_nvp`'s `mixing`."""
  target = tfc.targets.LatentTarget(problem.prior, problem.likelihood, problem.observation)
  found = tfc.initialization.find_modes(target, 2, seed=seed)
  one_mode = found.num_modes == 1
  mean, covariance = (found.locs[0], found.covariances[0]) if one_mode else found.moments()
  scales, axes = np.linalg.eigh(covariance)
  size = problem.dim
  hidden = int(min(256, max(64, 4 * size)))  # As the default pre-generator.
  stage = tfc.pregenerators.AffineStage(size)
  couplings = tfc.pregenerators.real_nvp([size], num_layers=4, hidden_units=(hidden, hidden),
                                         affine_stage=False, mixing=mixing)
  pregenerator = tfb.Chain([tfc.problems.Orthogonal(axes), stage, couplings])
  fit_kwargs = {"init": None}  # The start is made here; a new posterior anneals from it.
  if one_mode:
    stage.set_gaussian(axes.T @ mean, np.diag(scales))
    fit_kwargs["anneal_steps"] = 0
  return pregenerator, fit_kwargs


def default_pregenerator(name, num_blocks=None, mixing="permutation"):
  """The default pre-generator of problem `name` (`ComposedPosterior`'s own builder) with
  `tfc.pregenerators.real_nvp`'s `mixing`."""
  kwargs = {} if num_blocks is None or "linear" in name else {"num_blocks": num_blocks}
  problem = tfc.problems.get(name, **kwargs)
  return tfc.posterior._default_pregenerator(  # pylint: disable=protected-access
      problem.prior.distribution.event_shape, problem.prior.dtype, mixing=mixing)


def run(name, method="new", seed=0, num_blocks=None, num_samples=4000, posterior_kwargs=None,
        fit_kwargs=None, start="default", mixing="permutation"):
  """Fits one problem and scores it; returns a dict of Python numbers.

  Args:
    name: a `tfc.problems.PROBLEMS` name.
    method: "new" (the current defaults) or "old" (see the module docstring).
    seed: the fit's seed.
    num_blocks: for block problems, the number of blocks (None: the problem's default).
    num_samples: draws from `q` for the scores.
    posterior_kwargs, fit_kwargs: further options (override the method's).
    start: "default" (`fit`'s), "principal_axes" (see the module docstring; its mode
      search is timed with the fit) or "cholesky" (`fit`'s, but a one-mode start keeps
      the identity axes: `initialize(principal_axes=False)`, timed with the fit).
    mixing: `real_nvp`'s mixing for the principal-axes start's couplings.
  """
  if start not in STARTS:
    raise ValueError(f"`start` must be one of {STARTS}, got {start!r}.")
  config = {"old": OLD, "new": NEW}[method]
  kwargs = {} if num_blocks is None or "linear" in name else {"num_blocks": num_blocks}
  problem = tfc.problems.get(name, **kwargs)
  p_kwargs = dict(config["posterior"], **(posterior_kwargs or {}))
  f_kwargs = dict(config["fit"], **(fit_kwargs or {}))
  wall, cpu = time.time(), time.process_time()
  if start == "principal_axes":
    pregenerator, start_kwargs = principal_axes_start(problem, seed, mixing)
    p_kwargs["pregenerator"] = pregenerator
    f_kwargs = dict(start_kwargs, **f_kwargs)
  posterior = tfc.ComposedPosterior(problem.prior, problem.likelihood, problem.observation,
                                    **p_kwargs)
  if start == "cholesky":  # fit's start with the one-mode stage's axes the identity.
    posterior.initialize(seed=seed, principal_axes=False)
  history = posterior.fit(seed=seed, verbose=0, **f_kwargs)
  wall, cpu = time.time() - wall, time.process_time() - cpu
  x, log_q = posterior.experimental_sample_and_log_prob(num_samples, seed=seed + 1)
  score = problem.score(x.numpy(), log_q.numpy(), seed=seed)
  row = {"problem": problem.name, "dim": problem.dim, "method": method, "start": start,
         "seed": seed,
         "kl": score["kl"], "kl_stderr": score["kl_stderr"],
         "energy_ratio": score["energy_ratio"],
         "energy_ratio_stderr": score.get("energy_ratio_stderr", float("nan")),
         "mode_mass_error": score.get("mode_mass_error", float("nan")),
         "mode_mass_stderr": score.get("mode_mass_stderr", float("nan")),
         "nonfinite_fraction": score["nonfinite_fraction"],
         "wall_seconds": wall, "cpu_seconds": cpu,
         "steps": len(history.history.get("loss", [])), "converged": history.converged}
  diagnosis = getattr(posterior, "diagnosis", None)
  if diagnosis is not None:
    row.update({f"diag_{k}": v for k, v in diagnosis.items() if np.isscalar(v)})
  return row


def format_table(rows):
  """A Markdown table of `run` rows."""
  lines = ["| problem | D | method | start | KL (nats) | energy ratio | max mode-mass error | "
           "wall s | CPU s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    mass = "-" if np.isnan(r["mode_mass_error"]) else f"{r['mode_mass_error']:.3f}"
    lines.append(
        f"| {r['problem']} | {r['dim']} | {r['method']} | {r.get('start', 'default')} | "
        f"{r['kl']:.3f} +- "
        f"{r['kl_stderr']:.3f} | {r['energy_ratio']:.2f} | {mass} | {r['wall_seconds']:.0f} "
        f"| {r['cpu_seconds']:.0f} |")
  return "\n".join(lines)


FLAGS = flags.FLAGS
flags.DEFINE_list("problems", list(PROBLEMS), "Problems of tfc.problems.PROBLEMS.")
flags.DEFINE_list("methods", ["new"], "'new' (current defaults) and/or 'old'.")
flags.DEFINE_enum("start", "default", STARTS, "The start: fit's or 'principal_axes'.")
flags.DEFINE_integer("num_blocks", None, "Blocks of the block problems (default: 8).")
flags.DEFINE_integer("seed", 0, "Seed of the fit.")
flags.DEFINE_string("fit_kwargs", "{}", "JSON dict of further fit() options.")
flags.DEFINE_string("posterior_kwargs", "{}", "JSON dict of further constructor options.")
flags.DEFINE_string("output_json", None, "Where to write the rows.")
flags.DEFINE_enum("mixing", None, ["permutation", "lu"],
                  "The default pre-generator with this `real_nvp` mixing (None: fit's default).")


def main(argv):
  del argv
  rows = []
  for method in FLAGS.methods:
    for name in FLAGS.problems:
      posterior_kwargs = json.loads(FLAGS.posterior_kwargs)
      if FLAGS.mixing is not None:
        posterior_kwargs["pregenerator"] = default_pregenerator(name, FLAGS.num_blocks,
                                                                mixing=FLAGS.mixing)
      row = run(name, method, FLAGS.seed, FLAGS.num_blocks, posterior_kwargs=posterior_kwargs,
                fit_kwargs=json.loads(FLAGS.fit_kwargs), start=FLAGS.start,
                mixing=FLAGS.mixing or "permutation")
      row["mixing"] = FLAGS.mixing or "permutation"
      print(json.dumps(row), flush=True)
      rows.append(row)
  print(format_table(rows))
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
