"""Tests for `tfp_composed.export`: SavedModel round trip in a fresh process, argument checks."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

import tfp_composed as tfc
from tfp_composed import export

tfb = tfp.bijectors
tfd = tfp.distributions

BATCH = 8
SEED = [3, 4]
X = np.array([[0.1, 0.2], [1.0, -1.0], [-0.5, 0.4], [2.0, 0.3], [0.0, 0.0]], np.float32)


class _CouplingNet(tf.Module):
  """`shift_and_log_scale_fn` of the prior's RealNVP layer: a small tf_keras MLP."""

  def __init__(self):
    super().__init__()
    self.hidden = tf_keras.layers.Dense(8, activation="tanh",
                                        kernel_initializer=tf_keras.initializers.GlorotNormal(1))
    self.out = tf_keras.layers.Dense(2, kernel_initializer=tf_keras.initializers.GlorotNormal(2))
    self.out(self.hidden(tf.zeros([1, 1])))

  def __call__(self, x, output_units, **unused):
    shift, raw = tf.split(self.out(self.hidden(x)), 2, axis=-1)
    return shift, 0.5 * tf.tanh(raw)


def _prior():
  """A 2-D non-Gaussian flow prior with variables in a bijector and in a network."""
  return tfd.TransformedDistribution(
      tfd.Sample(tfd.Normal(0., 1.), [2]),
      tfb.Chain([tfb.Shift(tf.Variable([0.3, 0.], name="prior_shift")),
                 tfb.SinhArcsinh(skewness=tf.Variable([0.3, 0.], name="prior_skew")),
                 tfb.RealNVP(num_masked=1, shift_and_log_scale_fn=_CouplingNet())]))


def _posterior(prior=None, num_components=2, neural=True):
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Mask([True, False]), scale=0.3)
  pregenerator = (tfc.pregenerators.real_nvp([2], num_layers=1, hidden_units=(16,)) if neural
                  else tfc.pregenerators.affine([2]))
  return tfc.ComposedPosterior(prior or _prior(), likelihood, observation=[0.5],
                               pregenerator=pregenerator, num_components=num_components)


@pytest.fixture(scope="module")
def fitted():
  posterior = _posterior()
  posterior.fit(num_steps=40, batch_size=32, learning_rate=1e-2, seed=0, init=None, verbose=0)
  return posterior


@pytest.fixture(scope="module")
def saved(fitted, tmp_path_factory):
  """`fitted` exported with all functions; the path."""
  path = str(tmp_path_factory.mktemp("export") / "posterior")
  assert export.save(fitted, path, batch_size=BATCH) == path
  return path


_LOADER = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import tensorflow as tf

    path, x, seed = sys.argv[1], np.array(json.loads(sys.argv[2]), np.float32), sys.argv[3]
    seed = tf.constant(json.loads(seed), tf.int32)
    loaded = tf.saved_model.load(path)
    samples = loaded.sample(seed)
    pair_x, pair_lp = loaded.sample_and_log_prob(seed)
    signature = loaded.signatures["sample_and_log_prob"](seed=seed)
    print(json.dumps({
        "log_prob": loaded.log_prob(x).numpy().tolist(),
        "signature_log_prob": loaded.signatures["log_prob"](x=x)["log_prob"].numpy().tolist(),
        "sample": samples.numpy().tolist(),
        "pair_x": pair_x.numpy().tolist(),
        "pair_log_prob": pair_lp.numpy().tolist(),
        "log_prob_of_pair_x": loaded.log_prob(pair_x).numpy().tolist(),
        "signature_pair_x": signature["x"].numpy().tolist(),
        "event_shape": loaded.event_shape.numpy().tolist(),
        "batch_size": int(loaded.batch_size.numpy()),
        "log_prob_batch_size": int(loaded.log_prob_batch_size.numpy()),
        "modules": sorted(m for m in sys.modules
                          if m.split(".")[0] in ("tfp_composed", "tensorflow_probability")),
    }))
""")


def _load_in_fresh_process(path, x, seed):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  result = subprocess.run(
      [sys.executable, "-c", _LOADER, str(path), json.dumps(x.tolist()), json.dumps(seed)],
      cwd=os.path.dirname(path), env=env, capture_output=True, text=True, timeout=120,
      check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_round_trip_in_a_process_without_tfp_composed(fitted, saved):
  out = _load_in_fresh_process(saved, X, SEED)

  assert out["modules"] == []  # Neither tfp_composed nor tensorflow_probability was imported.
  expected = fitted.log_prob(X).numpy()
  np.testing.assert_allclose(out["log_prob"], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["signature_log_prob"], expected, rtol=1e-5, atol=1e-6)
  assert out["event_shape"] == [2]
  assert out["batch_size"] == BATCH
  assert out["log_prob_batch_size"] == -1  # Any batch size: X has 5 rows, samples 8.

  samples = np.array(out["sample"])
  assert samples.shape == (BATCH, 2) and np.all(np.isfinite(samples))
  # Stateless sampling: the exported graph draws what the posterior draws with the same seed.
  np.testing.assert_allclose(samples, fitted.sample(BATCH, seed=SEED).numpy(), rtol=1e-5,
                             atol=1e-5)
  # Forward log q of the exported pair equals the exported inverse-pass log_prob.
  assert np.array(out["pair_x"]).shape == (BATCH, 2)
  np.testing.assert_allclose(out["pair_log_prob"], out["log_prob_of_pair_x"], rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(out["signature_pair_x"], out["pair_x"], rtol=1e-6)


def test_load_in_process_and_variables_are_saved(fitted, saved):
  loaded = export.load(saved)
  np.testing.assert_allclose(loaded.log_prob(X).numpy(), fitted.log_prob(X).numpy(),
                             rtol=1e-5, atol=1e-6)
  assert set(loaded.signatures) == set(export.SIGNATURES)
  saved_values = {v.numpy().tobytes() for v in loaded.posterior_variables}
  for v in list(fitted.trainable_variables) + list(fitted.prior.trainable_variables):
    assert v.numpy().tobytes() in saved_values, v.name


def test_existing_path_is_never_replaced_silently(fitted, tmp_path):
  path = tmp_path / "out"
  path.mkdir()
  (path / "notes.txt").write_text("keep me")
  with pytest.raises(ValueError, match=r"`path` .*out.* exists and is not empty.*overwrite=True"):
    export.save(fitted, path)
  # `overwrite=True` replaces a SavedModel only, never other content.
  with pytest.raises(ValueError, match=r"`path` .*holds no SavedModel.*nothing was written"):
    export.save(fitted, path, overwrite=True)
  assert sorted(os.listdir(path)) == ["notes.txt"]
  assert (path / "notes.txt").read_text() == "keep me"
  assert sorted(os.listdir(tmp_path)) == ["out"]  # No temporary directories left behind.

  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(ValueError, match=r"`path` .*file.* is a file"):
    export.save(fitted, a_file, overwrite=True)
  assert a_file.read_text() == "x"


def test_overwrite_replaces_a_saved_model_and_an_empty_directory_is_used(tmp_path):
  posterior = _posterior(num_components=1, neural=False)
  path = tmp_path / "model"
  path.mkdir()  # Empty: fine without `overwrite`.
  export.save(posterior, path, batch_size=2, signatures=["sample"])
  with pytest.raises(ValueError, match="exists and is not empty"):
    export.save(posterior, path, batch_size=3, signatures=["sample"])
  loaded = export.load(path)
  assert loaded.sample(tf.constant([0, 1])).shape == [2, 2]
  assert not hasattr(loaded, "log_prob") and set(loaded.signatures) == {"sample"}
  export.save(posterior, path, batch_size=3, signatures=["sample"], overwrite=True)
  assert export.load(path).sample(tf.constant([0, 1])).shape == [3, 2]
  assert sorted(os.listdir(tmp_path)) == ["model"]


def _tree(root):
  return sorted(os.path.relpath(os.path.join(d, n), root)
                for d, dirs, files in os.walk(root) for n in dirs + files)


@pytest.fixture
def small():
  return _posterior(num_components=1, neural=False)


@pytest.mark.parametrize("path", ["", "   "])
def test_empty_path_writes_nothing_in_the_working_directory(small, tmp_path, monkeypatch, path):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "keep.txt").write_text("x")
  before = _tree(tmp_path)
  with pytest.raises(ValueError, match=rf"`path` must name a directory to create, got "
                                       rf"'{path}'; nothing was written"):
    export.save(small, path, batch_size=2, signatures=["sample"])
  assert _tree(tmp_path) == before


@pytest.mark.parametrize("under", ["file/model", "file/deeper/model"])
def test_path_under_a_file(small, tmp_path, under):
  (tmp_path / "file").write_text("x")
  before = _tree(tmp_path)
  with pytest.raises(ValueError, match=r"`path` .* is under '.*file', which is a file, not a "
                                       r"directory; nothing was written"):
    export.save(small, tmp_path / under, batch_size=2, signatures=["sample"])
  assert _tree(tmp_path) == before and (tmp_path / "file").read_text() == "x"


def test_missing_parents_are_created_and_removed_again_on_failure(small, tmp_path,
                                                                   monkeypatch):
  export.save(small, tmp_path / "a" / "b" / "model", batch_size=2, signatures=["sample"])
  assert _tree(tmp_path) == ["a", "a/b", "a/b/model"] + [
      os.path.join("a/b/model", n) for n in _tree(tmp_path / "a" / "b" / "model")]

  def fail(*args, **kwargs):
    os.makedirs(args[1])  # Fail after writing into the temporary directory.
    raise RuntimeError("disk full")

  monkeypatch.setattr(tf.saved_model, "save", fail)
  before = _tree(tmp_path)
  with pytest.raises(RuntimeError, match="disk full"):
    export.save(small, tmp_path / "c" / "d" / "model", batch_size=2, signatures=["sample"])
  assert _tree(tmp_path) == before


def test_a_failed_replacement_keeps_the_previous_model(small, tmp_path, monkeypatch):
  path = tmp_path / "model"
  export.save(small, path, batch_size=2, signatures=["sample"])
  before = _tree(tmp_path)
  real_rename = tf.io.gfile.rename

  def rename(src, dst, overwrite=False):
    if ".export-" in src:
      raise OSError("rename failed")
    return real_rename(src, dst, overwrite)

  monkeypatch.setattr(tf.io.gfile, "rename", rename)
  with pytest.raises(OSError, match="rename failed"):
    export.save(small, path, batch_size=3, signatures=["sample"], overwrite=True)
  monkeypatch.undo()
  assert _tree(tmp_path) == before
  assert export.load(path).sample(tf.constant([0, 1])).shape == [2, 2]


@pytest.mark.parametrize("bad", [tfd.Normal(0., 1.), "posterior", None])
def test_not_a_posterior_is_a_type_error(bad, tmp_path):
  with pytest.raises(TypeError, match=r"`posterior` must be a tfp_composed.ComposedPosterior"):
    export.save(bad, tmp_path / "m")


def test_the_prior_itself_is_not_a_posterior(tmp_path):
  with pytest.raises(TypeError, match=r"`posterior` .* got _?TransformedDistribution"):
    export.save(_prior(), tmp_path / "m")


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), r"`batch_size` must be a positive integer, got 0"),
    (dict(batch_size=2.5), r"`batch_size` must be a positive integer, got 2.5"),
    (dict(batch_size=True), r"`batch_size` must be a positive integer, got True"),
    (dict(signatures=("sample", "mean")), r"`signatures` .* got \('sample', 'mean'\)"),
    (dict(signatures=()), r"`signatures` must be a non-empty"),
    (dict(dynamic_batch="yes"), r"`dynamic_batch` must be None, True or False, got 'yes'"),
])
def test_bad_arguments(fitted, tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    export.save(fitted, tmp_path / "m", **kwargs)
  assert not os.path.exists(tmp_path / "m")


def test_glow_prior_falls_back_to_a_static_log_prob_batch(tmp_path):
  glow = tfb.Glow(output_shape=(4, 4, 1), num_glow_blocks=1, num_steps_per_block=1,
                  coupling_bijector_fn=tfb.GlowDefaultNetwork,
                  exit_bijector_fn=tfb.GlowDefaultExitNetwork)
  prior = tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0., 1.), [16]), glow)
  likelihood = tfc.likelihoods.Gaussian(tfc.operators.Downsample(2), scale=0.1)
  posterior = tfc.ComposedPosterior(prior, likelihood, observation=np.zeros([2, 2, 1]),
                                    pregenerator=tfc.pregenerators.affine([16]),
                                    num_components=1)
  x = posterior.sample(2, seed=[0, 1])  # Runs Glow's data-dependent actnorm initialization.
  with pytest.raises(ValueError, match=r"`dynamic_batch=True` .* unknown batch dimension"):
    export.save(posterior, tmp_path / "dynamic", batch_size=2, signatures=["log_prob"],
                dynamic_batch=True)
  assert not os.listdir(tmp_path)
  export.save(posterior, tmp_path / "static", batch_size=2, signatures=["log_prob"])
  loaded = export.load(tmp_path / "static")
  assert int(loaded.log_prob_batch_size.numpy()) == 2
  x = tf.identity(x)  # A new tensor: log_prob inverts the flow instead of using its cache.
  np.testing.assert_allclose(loaded.log_prob(x).numpy(), posterior.log_prob(x).numpy(),
                             rtol=1e-4, atol=1e-4)


def test_untracked_prior_variable_is_a_clear_error(tmp_path):
  hidden = tf.Variable([[0.5]], name="untracked")  # Only a closure holds it.

  def coupling(x, output_units, **unused):
    return tf.matmul(x, hidden), tf.zeros_like(x)

  prior = tfd.TransformedDistribution(
      tfd.Sample(tfd.Normal(0., 1.), [2]),
      tfb.RealNVP(num_masked=1, shift_and_log_scale_fn=coupling))
  posterior = _posterior(prior, num_components=1, neural=False)
  with pytest.raises(ValueError, match=r"variable that neither the posterior nor its prior "
                                       r"tracks"):
    export.save(posterior, tmp_path / "m", signatures=["log_prob"])
  assert not os.listdir(tmp_path)
