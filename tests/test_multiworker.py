"""Two local worker processes under MultiWorkerMirroredStrategy: the losses of one process,
and a shared checkpoint directory that the chief writes and both resume from."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import tensorflow as tf

import multiworker_job
from tfp_composed import training

_TIMEOUT_SECONDS = 240
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  try:
    for s in sockets:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def test_two_workers_match_one_process_and_share_a_resumable_checkpoint(tmp_path):
  w = tf.Variable([0., 0.])
  reference = training.fit(multiworker_job.make_loss(w), [w], num_steps=20,
                           **multiworker_job.KWARGS).history["loss"]

  checkpoint_dir = str(tmp_path / "shared")
  workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
  processes = []
  try:
    for index in range(2):
      env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", NO_PROXY="127.0.0.1,localhost",
                 no_proxy="127.0.0.1,localhost",
                 PYTHONPATH=os.pathsep.join([_ROOT, os.environ.get("PYTHONPATH", "")]),
                 TF_CONFIG=json.dumps({"cluster": {"worker": workers},
                                       "task": {"type": "worker", "index": index}}))
      processes.append(subprocess.Popen(
          [sys.executable, os.path.join(_ROOT, "tests", "multiworker_job.py"),
           str(tmp_path / f"worker{index}.json"), checkpoint_dir],
          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [p.communicate(timeout=_TIMEOUT_SECONDS)[0].decode()[-3000:]
               for p in processes]
    for p, output in zip(processes, outputs):
      assert p.returncode == 0, output
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()

  for index in range(2):
    with open(tmp_path / f"worker{index}.json") as f:
      result = json.load(f)
    assert result["replicas"] == 2
    # Same draws, split over two workers and summed: equal up to float summation order.
    np.testing.assert_allclose(result["plain"], reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result["first"], reference[:10], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result["resumed"], reference[10:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result["w"], w.numpy(), rtol=1e-5, atol=1e-6)
  files = sorted(os.listdir(checkpoint_dir))
  assert "ckpt-20.index" in files and "checkpoint" in files, files
  assert not [f for f in files if f.startswith("workertemp")], files  # Removed after saving.
