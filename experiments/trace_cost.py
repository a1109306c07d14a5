r"""Cost of `fit`'s first call on a ground-truth problem: tracing and compiling its step.

`ComposedPosterior.fit(num_steps=20, init=None, check_weights=False)` on a fresh posterior,
wall seconds of the call (the steps themselves take milliseconds; the rest is building the
step's graph and its first execution). `--autograph` converts the loss with AutoGraph, as
before `NegativeElbo.__call__` was marked `do_not_convert`.

`--part=search` times `fit`'s mode search instead: `tfc.initialization.find_modes(target, 2)`
(the factorized base's search) twice on one latent target in one process. The first call
traces the search's compiled functions and computes; the second reuses the traces (they are
kept per target), so it is the computing alone. Run each setting in its own process:

    python -m experiments.trace_cost --problem=latent_rotated_nonlinear_blocks
    python -m experiments.trace_cost --problem=latent_rotated_nonlinear_blocks --autograph
    python -m experiments.trace_cost --problem=nonlinear_blocks --part=search
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import time

from absl import app
from absl import flags

import tfp_composed as tfc

_PROBLEM = flags.DEFINE_string("problem", "latent_rotated_nonlinear_blocks",
                               "A tfc.problems.PROBLEMS name.")
_AUTOGRAPH = flags.DEFINE_bool("autograph", False, "Convert the loss with AutoGraph.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 20, "Steps of the first call.")
_PART = flags.DEFINE_enum("part", "fit", ["fit", "search"],
                          "Time fit's first call, or the mode search twice.")


def time_search(problem):
  """Seconds of two `find_modes(target, 2, seed=0)` calls on one target, and the modes found."""
  target = tfc.targets.LatentTarget(problem.prior, problem.likelihood, problem.observation)
  seconds = []
  for _ in range(2):
    start = time.perf_counter()
    found = tfc.initialization.find_modes(target, 2, seed=0)
    seconds.append(time.perf_counter() - start)
  return {"problem": problem.name, "part": "search", "first_call_seconds": seconds[0],
          "second_call_seconds": seconds[1], "modes_found": found.num_modes}


def main(argv):
  del argv
  if _AUTOGRAPH.value:  # The undecorated loss: AutoGraph converts it and what it calls.
    tfc.posterior.NegativeElbo.__call__ = tfc.posterior.NegativeElbo.__call__.__wrapped__
  problem = tfc.problems.get(_PROBLEM.value)
  if _PART.value == "search":
    print(json.dumps(time_search(problem)), flush=True)
    return
  posterior = tfc.ComposedPosterior(problem.prior, problem.likelihood, problem.observation)
  start = time.perf_counter()
  posterior.fit(num_steps=_NUM_STEPS.value, seed=0, verbose=0, init=None, check_weights=False)
  print(json.dumps({"problem": problem.name, "autograph": _AUTOGRAPH.value,
                    "num_steps": _NUM_STEPS.value,
                    "first_call_seconds": time.perf_counter() - start}), flush=True)


if __name__ == "__main__":
  app.run(main)
