"""Tests for `tfp_composed.priors`: bijectivity, log-dets against autodiff, save/load, shipped priors.

Each property test is parametrized over `BUILDERS` (tiny shapes, two coupling layers per stage),
so a new architecture is tested by adding one line.
"""

import json
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_composed import data
from tfp_composed import priors

BUILDERS = {
    "realnvp": lambda **kw: priors.realnvp([4, 4, 1], num_scales=1, hidden_channels=8,
                                           num_checkerboard=2, num_channelwise=2, num_final=2,
                                           **kw),
    "glow": lambda **kw: priors.glow([4, 4, 2], num_levels=2, num_steps=2, hidden_channels=8,
                                     num_blocks=1, **kw),
    "glow_learned_prior": lambda **kw: priors.glow([4, 4, 2], num_levels=2, num_steps=2,
                                                   hidden_channels=8, learned_prior=True, **kw),
}

_DATA = os.path.join(os.path.dirname(__file__), "data")


def _perturbed(name, seed=0):
  """A tiny prior whose variables are moved off their (near-identity) initial values."""
  tf.random.set_seed(seed)
  prior = BUILDERS[name]()
  rng = np.random.default_rng(seed)
  for v in priors.flow_module(prior).trainable_variables:
    v.assign(v + 0.1 * rng.normal(size=v.shape).astype(np.float32))
  return prior


def _images(prior, batch=3, seed=1):
  shape = [batch] + prior.event_shape.as_list()
  return tf.constant(np.random.default_rng(seed).uniform(0.02, 0.98, shape).astype(np.float32))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_bijective_and_finite(name):
  prior = _perturbed(name)
  x = _images(prior)
  z = prior.bijector.inverse(x)
  x_again = prior.bijector.forward(tf.identity(z))
  np.testing.assert_allclose(x_again.numpy(), x.numpy(), atol=1e-4)
  # Latent -> logits -> latent on the flow alone (the sigmoid saturates in float32 for far
  # latents of a randomly perturbed flow).
  flow = prior.bijector.bijectors[-1]
  assert isinstance(flow, priors.MultiScaleFlowBijector)
  z2 = 0.5 * tf.random.normal(z.shape, seed=2)
  z2_again = flow.inverse(tf.identity(flow.forward(z2)))
  np.testing.assert_allclose(z2_again.numpy(), z2.numpy(), atol=1e-3)
  assert np.all(np.isfinite(prior.log_prob(x).numpy()))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_log_det_matches_autodiff_jacobian(name):
  prior = _perturbed(name)
  x = _images(prior, batch=2)
  shape = x.shape
  x_flat = tf.reshape(x, [shape[0], -1])
  with tf.GradientTape() as tape:
    tape.watch(x_flat)
    z_flat = tf.reshape(prior.bijector.inverse(tf.reshape(x_flat, shape)), [shape[0], -1])
  jacobian = tape.batch_jacobian(z_flat, x_flat)
  _, expected = tf.linalg.slogdet(tf.cast(jacobian, tf.float64))
  ildj = prior.bijector.inverse_log_det_jacobian(tf.identity(x), event_ndims=3)
  np.testing.assert_allclose(ildj.numpy(), expected.numpy(), rtol=1e-4, atol=1e-3)
  z = prior.bijector.inverse(tf.identity(x))
  fldj = prior.bijector.forward_log_det_jacobian(tf.identity(z), event_ndims=3)
  np.testing.assert_allclose(fldj.numpy(), -ildj.numpy(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_shapes_and_unknown_batch_dimension(name):
  prior = _perturbed(name)
  event = prior.event_shape.as_list()
  assert prior.sample([2, 3], seed=3).shape == [2, 3] + event
  images = tf.reshape(_images(prior, batch=6), [2, 3] + event)
  lp = prior.log_prob(images)
  assert lp.shape == [2, 3]
  flat = prior.log_prob(tf.reshape(images, [6] + event))
  np.testing.assert_allclose(tf.reshape(lp, [6]).numpy(), flat.numpy(), rtol=1e-5, atol=1e-4)
  # Unknown batch dimension under a traced signature (a known failure of tfb.Glow's Expand).
  fn = tf.function(prior.log_prob, input_signature=[tf.TensorSpec([None] + event, tf.float32)])
  x = _images(prior)
  np.testing.assert_allclose(fn(x).numpy(), prior.log_prob(x).numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_variable_receives_a_gradient(name):
  prior = _perturbed(name)
  variables = priors.flow_module(prior).trainable_variables
  with tf.GradientTape() as tape:
    loss = -tf.reduce_mean(prior.log_prob(_images(prior)))
  grads = tape.gradient(loss, variables)
  assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)
  assert all(float(tf.reduce_max(tf.abs(g))) > 0 for g in grads)


# ---------------------------------------------------------------------------
# A damaged prior directory is a clear error naming the file; nothing in it is changed.


@pytest.fixture(scope="module")
def saved_prior(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("prior") / "realnvp")
  priors.save(BUILDERS["realnvp"](), directory)
  return directory


def _damaged(saved_prior, tmp_path, damage):
  directory = str(tmp_path / "damaged")
  shutil.copytree(saved_prior, directory)
  damage(directory)
  files = {n: open(os.path.join(directory, n), "rb").read() for n in os.listdir(directory)}
  return directory, files


def _write_config(directory, text=None, **kwargs):
  path = os.path.join(directory, "config.json")
  if text is None:
    with open(path) as f:
      config = json.load(f)
    config["kwargs"].update(kwargs)
    text = json.dumps(config)
  with open(path, "w" if isinstance(text, str) else "wb") as f:
    f.write(text)


@pytest.mark.parametrize("damage, match", [
    (lambda d: _write_config(d, '{"architecture": "realnvp", "kwar'),
     r"config.json' is not valid JSON \(Unterminated string .*: line 1, column 29, of 33 "
     r"characters\); the file may be truncated"),
    (lambda d: _write_config(d, ""), r"config.json' is not valid JSON \(Expecting value"),
    (lambda d: _write_config(d, b"\xc1\x00garbage"), r"config.json' is not a UTF-8 JSON file"),
    (lambda d: _write_config(d, "[1, 2]"),
     r"config.json' must hold a JSON object with an 'architecture' .*got \[1, 2\]"),
    (lambda d: _write_config(d, foo=1), r"config.json' does not describe a prior that tfc.priors "
                                        r"can build .*unexpected keyword argument 'foo'"),
    (lambda d: _write_config(d, hidden_channels=16),
     r"The checkpoint '.*damaged/variables' does not match the architecture in '.*config.json' "
     r"\('realnvp' with kwargs .*'hidden_channels': 16.*incompatible tensor with shape \(8,\)"),
    (lambda d: _write_config(d, num_final=3), r"does not match the architecture .*Found 12 "
                                              r"Python objects that were not bound"),
    (lambda d: _write_config(d, num_final=1), r"does not match the architecture .*Unresolved "
                                              r"object in checkpoint"),
    (lambda d: os.remove(os.path.join(d, "variables.index")),
     r"has a config.json but no checkpoint '.*variables.index'"),
    (lambda d: open(os.path.join(d, "variables.index"), "wb").write(b"\x00" * 64),
     r"The checkpoint '.*variables' is corrupt or unreadable"),
], ids=["truncated", "empty", "binary", "not_an_object", "unknown_kwarg", "wider_layers",
        "more_layers", "fewer_layers", "no_checkpoint", "corrupt_index"])
def test_damaged_prior_directory(saved_prior, tmp_path, damage, match):
  directory, files = _damaged(saved_prior, tmp_path, damage)
  with pytest.raises(ValueError, match=match):
    priors.load(directory)
  assert {n: open(os.path.join(directory, n), "rb").read()
          for n in os.listdir(directory)} == files


def test_load_config_names_a_truncated_file(saved_prior, tmp_path):
  directory, _ = _damaged(saved_prior, tmp_path, lambda d: _write_config(d, '{"a": '))
  with pytest.raises(ValueError, match=r"damaged/config.json' is not valid JSON"):
    priors.load_config(directory)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_save_load_round_trip_is_frozen_and_equal(name, tmp_path):
  prior = _perturbed(name)
  x = _images(prior)
  priors.save(prior, str(tmp_path), {"note": "perturbed"})
  loaded = priors.load(str(tmp_path))
  np.testing.assert_array_equal(loaded.log_prob(x).numpy(), prior.log_prob(x).numpy())
  assert loaded.trainable_variables == () and len(loaded.variables) == len(prior.variables)
  assert loaded.prior_config["note"] == "perturbed"
  assert loaded.prior_config == dict(prior.prior_config, note="perturbed")
  assert len(priors.load(str(tmp_path), trainable=True).trainable_variables) > 0


GROWABLE = {
    "realnvp": lambda width: priors.realnvp([4, 4, 1], num_scales=1, hidden_channels=width,
                                            num_checkerboard=2, num_channelwise=2, num_final=2),
    "glow": lambda width: priors.glow([4, 4, 2], num_levels=2, num_steps=2,
                                      hidden_channels=width, num_blocks=1),
}


@pytest.mark.parametrize("name", sorted(GROWABLE))
def test_grow_from_keeps_the_density_and_trains_every_new_unit(name):
  tf.random.set_seed(0)
  small = GROWABLE[name](8)
  rng = np.random.default_rng(0)
  for v in priors.flow_module(small).trainable_variables:
    v.assign(v + 0.1 * rng.normal(size=v.shape).astype(np.float32))
  wide = GROWABLE[name](13)
  x = _images(small)
  assert np.max(np.abs(wide.log_prob(x).numpy() - small.log_prob(x).numpy())) > 1e-2
  priors.grow_from(wide, small)
  np.testing.assert_allclose(wide.log_prob(x).numpy(), small.log_prob(x).numpy(), rtol=1e-5,
                             atol=1e-3)
  variables = priors.flow_module(wide).trainable_variables

  def gradients():
    with tf.GradientTape() as tape:
      loss = -tf.reduce_mean(wide.log_prob(x))
    return tape.gradient(loss, variables)

  # At first only the zeroed new -> old weights see a gradient (new units are ignored);
  # after one step every new unit does.
  for v, g in zip(variables, gradients()):
    v.assign_sub(1e-3 * g)
  for v, g in zip(variables, gradients()):
    if v.shape.rank == 4 and v.shape[-1] == 13:  # A new hidden unit's incoming weights.
      assert float(tf.reduce_max(tf.abs(g[..., 8:]))) > 0, v.name
    assert float(tf.reduce_max(tf.abs(g))) > 0, v.name


def test_grow_from_adds_learned_split_priors_as_the_identity():
  small = _perturbed("glow")
  wide = priors.glow([4, 4, 2], num_levels=2, num_steps=2, hidden_channels=13, num_blocks=1,
                     learned_prior=True)
  priors.grow_from(wide, small)
  x = _images(small)
  np.testing.assert_allclose(wide.log_prob(x).numpy(), small.log_prob(x).numpy(), rtol=1e-5,
                             atol=1e-3)
  split = priors.flow_module(wide).split_prior
  assert isinstance(split, priors.SplitPrior)
  with tf.GradientTape() as tape:
    loss = -tf.reduce_mean(wide.log_prob(x))
  grads = tape.gradient(loss, split.trainable_variables)
  assert float(tf.reduce_max(tf.abs(grads[-2]))) > 0  # The zero-initialized output kernel.
  assert wide.prior_config["kwargs"]["learned_prior"]
  assert "learned_prior" not in small.prior_config["kwargs"]  # Older configs stay loadable.
  with pytest.raises(ValueError, match="same architecture"):  # A learned prior cannot be dropped.
    priors.grow_from(_perturbed("glow"), wide)


def test_grow_from_rejects_a_different_layout():
  small = priors.glow([4, 4, 2], num_levels=2, num_steps=2, hidden_channels=8, num_blocks=0)
  with pytest.raises(ValueError, match="same architecture"):
    priors.grow_from(priors.glow([4, 4, 2], num_levels=2, num_steps=3, hidden_channels=8,
                                 num_blocks=0), small)
  with pytest.raises(ValueError, match="Cannot grow"):
    priors.grow_from(priors.glow([4, 4, 2], num_levels=2, num_steps=2, hidden_channels=4,
                                 num_blocks=0), small)


def test_data_init_sets_actnorm_statistics():
  prior = priors.glow([4, 4, 1], num_levels=1, num_steps=1, hidden_channels=4)
  x = _images(prior, batch=64)
  priors.data_init(prior, x)
  first_actnorm = priors.flow_module(prior).post_steps[0]
  y = data.logit_bijector(0.05).inverse(x)
  y = tf.nn.space_to_depth(y, 2)
  out, _ = first_actnorm.inverse(y)
  np.testing.assert_allclose(tf.reduce_mean(out, [0, 1, 2]).numpy(), 0.0, atol=1e-4)
  np.testing.assert_allclose(tf.math.reduce_std(out, [0, 1, 2]).numpy(), 1.0, atol=1e-3)
  before = [v.numpy() for v in priors.flow_module(prior).variables]
  with pytest.raises(ValueError, match="finite images"):
    priors.data_init(prior, tf.where(x > 0.5, np.nan, x))
  for b, v in zip(before, priors.flow_module(prior).variables):  # Nothing was overwritten.
    np.testing.assert_array_equal(b, v.numpy())


def test_realnvp_dense_prior_round_trip(tmp_path):
  prior = priors.realnvp_dense(2, num_layers=4, hidden_units=16)
  for v in priors.flow_module(prior).trainable_variables:
    v.assign(v + 0.2 * tf.random.normal(v.shape, seed=5))
  x = data.toy_2d("moons", 8)
  z = prior.bijector.inverse(x)
  np.testing.assert_allclose(prior.bijector.forward(tf.identity(z)).numpy(), x, atol=1e-4)
  priors.save(prior, str(tmp_path))
  loaded = priors.load(str(tmp_path))
  np.testing.assert_allclose(loaded.log_prob(x).numpy(), prior.log_prob(x).numpy(), rtol=1e-6)
  assert loaded.trainable_variables == ()


def test_tempered_prior_scales_the_latent_and_keeps_an_exact_density():
  prior = _perturbed("glow")
  cold = priors.tempered(prior, 0.5)
  x = _images(prior)
  z = prior.bijector.inverse(x)
  # Change of variables: log p_T(x) = log N(z; 0, T^2) + log|dz/dx| with the prior's own z.
  expected = (tf.reduce_sum(tfp.distributions.Normal(0., 0.5).log_prob(z), axis=[1, 2, 3])
              + prior.bijector.inverse_log_det_jacobian(tf.identity(x), event_ndims=3))
  np.testing.assert_allclose(cold.log_prob(x).numpy(), expected.numpy(), rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(priors.tempered(prior, 1.0).log_prob(x).numpy(),
                             prior.log_prob(x).numpy(), rtol=1e-6, atol=1e-4)
  latents = prior.bijector.inverse(cold.sample(400, seed=[3, 4]))
  np.testing.assert_allclose(float(tf.math.reduce_std(latents)), 0.5, atol=0.02)
  with pytest.raises(ValueError, match=re.escape("positive finite float. Got: 0")):
    priors.tempered(prior, 0)
  with pytest.raises(TypeError, match="must be a flow"):
    priors.tempered(tfp.distributions.Normal(0., 1.), 0.8)


def test_argument_checks_echo_the_bad_value():
  with pytest.raises(ValueError, match=re.escape("cannot be squeezed 1 times")):
    priors.glow([7, 7, 1], num_levels=1)
  with pytest.raises(ValueError, match=re.escape("Got: 2.5 of type float")):
    priors.realnvp([8, 8, 1], hidden_channels=2.5)
  with pytest.raises(ValueError, match=re.escape("Got: [28, 28]")):
    priors.glow([28, 28])
  with pytest.raises(ValueError, match="neither a directory"):
    priors.load("no_such_prior")
  with pytest.raises(ValueError, match="'architecture'"):
    priors.build({"architecture": "maf"})


# ---------------------------------------------------------------------------
# Shipped priors: the recorded test bits/dim is reproduced on the checked-in slice.

_SLICES = {"mnist": "mnist_test_500.npz", "digits8x8": "digits8x8_test.npz"}


@pytest.mark.parametrize("name", sorted(_SLICES))
def test_shipped_prior_reproduces_recorded_bits_per_dim(name):
  if name not in priors.available():
    pytest.skip(f"prior {name!r} not shipped")
  prior = priors.load(name)
  config = prior.prior_config
  assert prior.trainable_variables == ()
  images = np.load(os.path.join(_DATA, _SLICES[name]))["images"][:config["test_slice_examples"]]
  assert len(images) == config["test_slice_examples"]
  levels = config["levels"]
  x = data.dequantize(images, levels, seed=config["test_dequantization_seed"])
  lp = tf.concat([prior.log_prob(x[i:i + 250]) for i in range(0, len(images), 250)], 0)
  bpd = float(tf.reduce_mean(data.bits_per_dim(lp, int(np.prod(images.shape[1:])), levels)))
  # Same images and noise as the export: equal up to float32 summation order.
  assert abs(bpd - config["test_slice_bits_per_dim"]) < 2e-3, (bpd, config)
  # The slice is representative of the whole test split (stated tolerance: 0.1 bits/dim).
  assert abs(bpd - config["test_bits_per_dim"]) < 0.1, (bpd, config)
  samples = prior.sample(200, seed=[7, 7])
  assert samples.shape == [200] + list(images.shape[1:])
  # Far latents can overflow a coupling (about 0.25 % of the shipped MNIST Glow's samples at
  # temperature 1, none of 2000 at 0.8).
  assert np.mean(np.all(np.isfinite(samples.numpy()), axis=(1, 2, 3))) > 0.95
  cold = priors.tempered(prior, 0.8).sample(200, seed=[7, 7])
  assert np.all(np.isfinite(cold.numpy()))


def test_fit_maximum_likelihood_learns_a_toy_density():
  tf.random.set_seed(0)
  prior = priors.realnvp_dense(2, num_layers=2, hidden_units=16)
  losses = priors.fit_maximum_likelihood(prior, data.toy_2d("rings", 2000), num_steps=150,
                                         batch_size=128, learning_rate=3e-3)
  assert losses.shape == (150,) and np.all(np.isfinite(losses))
  assert losses[-20:].mean() < losses[:10].mean() - 0.2
  with pytest.raises(ValueError, match=re.escape("Got: [5, 3]")):
    priors.fit_maximum_likelihood(prior, np.zeros([5, 3], np.float32))
