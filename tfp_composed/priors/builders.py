"""Flow prior builders: multi-scale RealNVP and Glow over images, RealNVP over vectors.

Each builder returns a `tfd.TransformedDistribution` whose base is `N(0, I)` with the event
shape of the data and whose bijector maps latents to data, so it can be used directly as the
`prior` of a composed posterior. Image priors end in the inverse logit preprocessing:

    p(x) = TransformedDistribution(N(0, I), Chain([logit_bijector(alpha), f]))

so the event space is the image in `[0, 1]` (strictly, the open interval
`(-alpha / (1 - 2 alpha), (1 - alpha) / (1 - 2 alpha))`, which contains `[0, 1]`), `log_prob` is
the density of a dequantized image `x = (k + u) / L` including the logit log-det, and samples
are images (clip to `[0, 1]` for display).

The architecture is described by a JSON-serializable config `{'architecture': name, 'kwargs':
{...}}`; `build(config)` rebuilds the same prior, which is how `tfc.priors.load` works.

#### References

[1]: Laurent Dinh, Jascha Sohl-Dickstein and Samy Bengio. Density estimation using Real NVP.
     In _ICLR_, 2017. https://arxiv.org/abs/1605.08803
[2]: Diederik P. Kingma and Prafulla Dhariwal. Glow: Generative flow with invertible 1x1
     convolutions. In _NeurIPS_, 2018. https://arxiv.org/abs/1807.03039
"""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_composed import data as data_lib
from tfp_composed import posterior as posterior_lib
from tfp_composed.priors import layers

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = [
    "ARCHITECTURES",
    "build",
    "data_init",
    "flow_module",
    "glow",
    "grow_from",
    "realnvp",
    "realnvp_dense",
    "tempered",
]


def _check_event_shape(event_shape, num_squeezes):
  shape = [int(d) for d in event_shape]
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"`event_shape` must be [height, width, channels]. Got: {event_shape!r}.")
  factor = 2 ** num_squeezes
  if shape[0] % factor or shape[1] % factor:
    raise ValueError(
        f"`event_shape` {shape} cannot be squeezed {num_squeezes} times: height and width must "
        f"be divisible by {factor}.")
  return shape


def _check_positive_int(name, value, minimum=1):
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"`{name}` must be an integer >= {minimum}. Got: {value!r} of type "
                     f"{type(value).__name__}.")
  return int(value)


def set_config(prior, config):
  """Attaches a plain-dict `prior_config` to `prior` (bypassing `tf.Module` attribute tracking)."""
  object.__setattr__(prior, "prior_config", dict(config))


def _image_prior(flow, event_shape, alpha, config, name):
  base = tfd.Sample(tfd.Normal(0.0, 1.0), sample_shape=event_shape, name="base")
  bijector = tfb.Chain([data_lib.logit_bijector(alpha),
                        layers.MultiScaleFlowBijector(flow)], name=f"{name}_bijector")
  prior = tfd.TransformedDistribution(base, bijector, name=name)
  set_config(prior, config)
  return prior


def realnvp(event_shape, num_scales=2, hidden_channels=64, num_blocks=1, num_checkerboard=3,
            num_channelwise=3, num_final=4, actnorm=True, alpha=0.05, trainable=True, seed=0,
            name="realnvp_prior"):
  """Multi-scale RealNVP prior over images in `[0, 1]` (Dinh et al., 2017).

  Each of the `num_scales` scales runs `num_checkerboard` checkerboard couplings, squeezes
  `[H, W, C] -> [H/2, W/2, 4C]`, runs `num_channelwise` channel couplings and factors out half
  of the channels; the last scale runs `num_final` checkerboard couplings. Every coupling is
  `z_b = (x_b + t(x_a)) * s(x_a)` with a small convolutional ResNet and is preceded by an
  actnorm (instead of RealNVP's batch normalization) if `actnorm`.

  Args:
    event_shape: `[H, W, C]`; `H` and `W` divisible by `2 ** num_scales`.
    num_scales: number of squeeze-and-split scales.
    hidden_channels: width of the coupling networks.
    num_blocks: residual blocks per coupling network.
    num_checkerboard, num_channelwise, num_final: couplings per stage, as above.
    actnorm: insert an `ActNorm` before each coupling.
    alpha: logit preprocessing constant (see `tfc.data.logit_bijector`).
    trainable: create the variables trainable (`False` for a frozen prior).
    seed: unused by RealNVP (kept for a uniform builder signature); weights use TF's global RNG.
    name: distribution name.

  Returns:
    A `tfd.TransformedDistribution` over `event_shape`, with a `prior_config` attribute.

  #### Examples

  ```python
  prior = tfc.priors.realnvp([28, 28, 1], num_scales=2, hidden_channels=32)
  x = prior.sample(4)           # images, about [0, 1]
  lp = prior.log_prob(x)        # shape [4]
  ```
  """
  del seed
  num_scales = _check_positive_int("num_scales", num_scales, 0)
  shape = _check_event_shape(event_shape, num_scales)
  hidden_channels = _check_positive_int("hidden_channels", hidden_channels)
  num_blocks = _check_positive_int("num_blocks", num_blocks, 0)
  kwargs = dict(event_shape=shape, num_scales=num_scales, hidden_channels=hidden_channels,
                num_blocks=num_blocks, num_checkerboard=int(num_checkerboard),
                num_channelwise=int(num_channelwise), num_final=int(num_final),
                actnorm=bool(actnorm), alpha=float(alpha))
  data_lib.logit_bijector(alpha)  # Validates alpha.

  def coupling_steps(kind, count, h, w, c):
    steps = []
    for i in range(count):
      if actnorm:
        steps.append(layers.ActNorm(c, trainable=trainable))
      if kind == "checkerboard":
        steps.append(layers.CheckerboardCoupling(h, w, c, hidden_channels, num_blocks,
                                                 parity=i % 2, trainable=trainable))
      else:
        steps.append(layers.ChannelCoupling(c, hidden_channels, num_blocks, parity=i % 2,
                                            trainable=trainable))
    return steps

  def make_level(scale, h, w, c):
    if scale == num_scales:
      return layers.MultiScaleFlow(pre_steps=coupling_steps("checkerboard", num_final, h, w, c),
                                   squeeze=False, name="final_scale")
    pre = coupling_steps("checkerboard", num_checkerboard, h, w, c)
    post = coupling_steps("channel", num_channelwise, h // 2, w // 2, 4 * c)
    nxt = make_level(scale + 1, h // 2, w // 2, 2 * c)
    return layers.MultiScaleFlow(pre_steps=pre, post_steps=post, squeeze=True, next_level=nxt,
                                 name=f"scale_{scale}")

  flow = make_level(0, *shape)
  return _image_prior(flow, shape, alpha, {"architecture": "realnvp", "kwargs": kwargs}, name)


def glow(event_shape, num_levels=2, num_steps=8, hidden_channels=64, num_blocks=0, alpha=0.05,
         learned_prior=False, trainable=True, seed=0, name="glow_prior"):
  """Multi-scale Glow prior over images in `[0, 1]` (Kingma & Dhariwal, 2018).

  Each of the `num_levels` levels squeezes `[H, W, C] -> [H/2, W/2, 4C]`, runs `num_steps` flow
  steps `actnorm -> invertible 1x1 conv -> affine channel coupling`, and (except the last)
  factors out half of the channels. Built from this package's own blocks rather than
  `tfb.Glow`, so any batch shape (also unknown at trace time) works.

  Args:
    event_shape: `[H, W, C]`; `H` and `W` divisible by `2 ** num_levels`.
    num_levels: number of squeeze levels (>= 1).
    num_steps: flow steps per level.
    hidden_channels: width of the coupling networks.
    num_blocks: residual blocks per coupling network (0 gives Glow's 3-layer net).
    alpha: logit preprocessing constant (see `tfc.data.logit_bijector`).
    learned_prior: if `True`, the channels factored out at each level are conditionally
      Gaussian given the kept channels (`layers.SplitPrior`, Glow's learned prior) instead of
      independent standard normals; it starts as the identity, so `grow_from` can add it.
    trainable: create the variables trainable (`False` for a frozen prior).
    seed: seed of the random rotations initializing the 1x1 convolutions.
    name: distribution name.

  Returns:
    A `tfd.TransformedDistribution` over `event_shape`, with a `prior_config` attribute.

  #### Examples

  ```python
  prior = tfc.priors.glow([8, 8, 1], num_levels=2, num_steps=4, hidden_channels=32)
  lp = prior.log_prob(tf.random.uniform([3, 8, 8, 1]))  # shape [3]
  ```
  """
  num_levels = _check_positive_int("num_levels", num_levels)
  shape = _check_event_shape(event_shape, num_levels)
  num_steps = _check_positive_int("num_steps", num_steps)
  hidden_channels = _check_positive_int("hidden_channels", hidden_channels)
  num_blocks = _check_positive_int("num_blocks", num_blocks, 0)
  if not isinstance(learned_prior, (bool, np.bool_)):
    raise ValueError(f"`learned_prior` must be a bool. Got: {learned_prior!r}.")
  kwargs = dict(event_shape=shape, num_levels=num_levels, num_steps=num_steps,
                hidden_channels=hidden_channels, num_blocks=num_blocks, alpha=float(alpha),
                seed=int(seed))
  if learned_prior:  # Only recorded when set, so older configs keep loading unchanged.
    kwargs["learned_prior"] = True
  data_lib.logit_bijector(alpha)  # Validates alpha.

  def make_level(level, c):
    c = 4 * c
    steps = []
    for i in range(num_steps):
      steps += [layers.ActNorm(c, trainable=trainable),
                layers.InvertibleConv1x1(c, trainable=trainable, seed=seed * 1000 + level * 100 + i),
                layers.ChannelCoupling(c, hidden_channels, num_blocks, trainable=trainable)]
    nxt = make_level(level + 1, c // 2) if level + 1 < num_levels else None
    split = None
    if learned_prior and nxt is not None:
      split = layers.SplitPrior(c - c // 2, c // 2, hidden_channels, trainable=trainable)
    return layers.MultiScaleFlow(post_steps=steps, squeeze=True, next_level=nxt,
                                 split_prior=split, name=f"level_{level}")

  flow = make_level(0, shape[2])
  return _image_prior(flow, shape, alpha, {"architecture": "glow", "kwargs": kwargs}, name)


class _DenseNet(tf.Module):
  """MLP `x_a -> (shift, log_scale)` for `tfb.RealNVP`, zero-initialized output layer."""

  def __init__(self, in_dims, out_dims, hidden_units, num_hidden, trainable=True, name=None):
    super().__init__(name=name)
    sizes = [in_dims] + [hidden_units] * num_hidden
    self.kernels = [tf.Variable(tf.random.normal([a, b], stddev=float(np.sqrt(1.0 / a))),
                                trainable=trainable) for a, b in zip(sizes[:-1], sizes[1:])]
    self.biases = [tf.Variable(tf.zeros([b]), trainable=trainable) for b in sizes[1:]]
    self.out_kernel = tf.Variable(tf.zeros([sizes[-1], 2 * out_dims]), trainable=trainable)
    self.out_bias = tf.Variable(tf.zeros([2 * out_dims]), trainable=trainable)

  def __call__(self, x, output_units, **kwargs):
    del output_units, kwargs
    h = x
    for k, b in zip(self.kernels, self.biases):
      h = tf.nn.relu(tf.matmul(h, k) + b)
    shift, raw = tf.split(tf.matmul(h, self.out_kernel) + self.out_bias, 2, axis=-1)
    return shift, tf.tanh(raw)


def realnvp_dense(event_size=2, num_layers=6, hidden_units=64, num_hidden=2, trainable=True,
                  seed=0, name="realnvp_dense_prior"):
  """RealNVP prior over vectors `R^D` (e.g. the 2-D toy densities): `tfb.RealNVP` layers with
  MLP coupling networks, alternating halves via reversal permutations. No preprocessing.

  Args:
    event_size: `D >= 2`.
    num_layers: number of coupling layers.
    hidden_units, num_hidden: MLP width and depth.
    trainable: create the variables trainable.
    seed: unused (kept for a uniform builder signature).
    name: distribution name.

  Returns:
    A `tfd.TransformedDistribution` over `[event_size]` with a `prior_config` attribute.

  #### Examples

  ```python
  prior = tfc.priors.realnvp_dense(2, num_layers=4)
  prior.log_prob(tfc.data.toy_2d('moons', 5))  # shape [5]
  ```
  """
  del seed
  event_size = _check_positive_int("event_size", event_size, 2)
  num_layers = _check_positive_int("num_layers", num_layers)
  hidden_units = _check_positive_int("hidden_units", hidden_units)
  num_hidden = _check_positive_int("num_hidden", num_hidden)
  kwargs = dict(event_size=event_size, num_layers=num_layers, hidden_units=hidden_units,
                num_hidden=num_hidden)
  num_masked = event_size // 2
  bijectors, nets = [], []
  for i in range(num_layers):
    net = _DenseNet(num_masked, event_size - num_masked, hidden_units, num_hidden,
                    trainable=trainable, name=f"coupling_net_{i}")
    nets.append(net)
    bijectors.append(tfb.RealNVP(num_masked=num_masked, shift_and_log_scale_fn=net))
    if i + 1 < num_layers:
      bijectors.append(tfb.Permute(list(range(event_size))[::-1]))
  base = tfd.Sample(tfd.Normal(0.0, 1.0), sample_shape=[event_size], name="base")
  prior = tfd.TransformedDistribution(base, tfb.Chain(bijectors[::-1]), name=name)
  set_config(prior, {"architecture": "realnvp_dense", "kwargs": kwargs})
  prior.prior_modules = nets
  return prior


ARCHITECTURES = {"realnvp": realnvp, "glow": glow, "realnvp_dense": realnvp_dense}


def build(config, trainable=True):
  """Builds a prior from a config `{'architecture': name, 'kwargs': {...}}` (extra keys ignored).

  #### Examples

  ```python
  prior = build({'architecture': 'glow', 'kwargs': {'event_shape': [8, 8, 1]}})
  ```
  """
  if not isinstance(config, dict) or config.get("architecture") not in ARCHITECTURES:
    raise ValueError(f"`config` must be a dict with 'architecture' in {sorted(ARCHITECTURES)}. "
                     f"Got: {config!r}.")
  return ARCHITECTURES[config["architecture"]](**dict(config.get("kwargs", {})),
                                               trainable=trainable)


def flow_module(prior):
  """The `tf.Module` holding all variables of a prior built here (for checkpoints)."""
  modules = getattr(prior, "prior_modules", None)
  if modules is not None:
    return _ModuleList(list(modules))
  for b in getattr(prior.bijector, "bijectors", [prior.bijector]):
    if isinstance(b, layers.MultiScaleFlowBijector):
      return b.flow
  raise ValueError(f"{prior!r} was not built by tfc.priors (no flow module found).")


class _ModuleList(tf.Module):

  def __init__(self, modules):
    super().__init__(name="modules")
    self.modules = modules


def data_init(prior, x):
  """Data-dependent initialization of all actnorm layers of `prior` from a batch `x` (eager).

  Runs the data -> latent pass once with each actnorm setting its shift and scale so its
  output has zero mean and unit variance per channel on `x` (Kingma & Dhariwal, 2018).

  #### Examples

  ```python
  prior = glow([8, 8, 1]); data_init(prior, tf.random.uniform([64, 8, 8, 1]))
  ```
  """
  if not tf.executing_eagerly():
    raise RuntimeError("`data_init` assigns variables from batch statistics; call it eagerly.")
  bijectors = getattr(prior.bijector, "bijectors", [])
  flows = [b for b in bijectors if isinstance(b, layers.MultiScaleFlowBijector)]
  if not flows:
    return prior
  y = tf.convert_to_tensor(x, tf.float32)
  if y.shape.rank is None or y.shape[0] == 0 or not bool(tf.reduce_all(tf.math.is_finite(y))):
    raise ValueError(f"`x` must be a non-empty batch of finite images. Got shape {y.shape} "
                     "with non-finite values or no examples.")
  for b in bijectors:  # Chain order: last applied forward first; inverse goes front to back.
    if isinstance(b, layers.MultiScaleFlowBijector):
      b.flow.inverse(y, init=True)
      break
    y = b.inverse(y)
  return prior


def tempered(prior, temperature):
  """The flow prior with its latent scaled by `temperature`: `x = f(T z)`, `z ~ N(0, I)`.

  Reduced-temperature sampling (Kingma & Dhariwal, 2018) trades diversity for typicality:
  `T < 1` draws from the core of the latent Gaussian, where a flow trained on images gives
  its cleanest samples. The result is again a `tfd.TransformedDistribution` with exact
  `log_prob` (of the tempered model, `N(0, T^2 I)` pushed through `f`); `T = 1` is the prior.

  Args:
    prior: a `tfd.TransformedDistribution` over a standard normal latent (e.g. `load('mnist')`).
    temperature: positive float.

  Returns:
    A `tfd.TransformedDistribution` with the same bijector and event shape.

  #### Examples

  ```python
  samples = tempered(load('mnist'), 0.7).sample(16, seed=[1, 2])
  ```
  """
  posterior_lib.validate_prior(prior)
  if (isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating))
      or not np.isfinite(temperature) or temperature <= 0):
    raise ValueError(f"`temperature` must be a positive finite float. Got: {temperature!r}.")
  return tfd.TransformedDistribution(
      prior.distribution, tfb.Chain([prior.bijector, tfb.Scale(float(temperature))]),
      name=f"{prior.name}_tempered")


def _variables_by_path(module):
  """`{'level_0/post_steps/3/net/conv_in/w': variable, ...}` for a flow module."""
  return {"/".join(str(k) for k in path): v
          for path, v in module._flatten(  # pylint: disable=protected-access
              predicate=lambda v: isinstance(v, tf.Variable), with_path=True)}


def grow_from(prior, source):
  """Copies a narrower prior of the same layout into `prior`, keeping its density exactly.

  Function-preserving widening (Chen et al., 2016, "Net2Net"): `prior` and `source` have the
  same architecture except wider coupling networks in `prior`. Every variable of the same shape
  is copied. A wider convolution kernel `[k, k, in, out]` gets the source kernel in its leading
  block, zeros where a new input channel would feed an old output channel, and keeps its own
  random initialization for the new output channels (biases: zeros). New hidden units therefore
  start out ignored by the old ones and by the zero-initialized output layer, so
  `prior.log_prob == source.log_prob`, while they all receive gradients. Learned split priors
  (`glow(..., learned_prior=True)`) missing from `source` are added as they start: identity.

  Args:
    prior: a trainable prior built by this package (the wider one).
    source: a prior built by this package with the same architecture and at most the widths of
      `prior` (e.g. `tfc.priors.load(...)`), with or without its learned split priors.

  Raises:
    ValueError: if the two priors do not have the same variable layout.
  """
  new_vars = _variables_by_path(flow_module(prior))
  old_vars = _variables_by_path(flow_module(source))
  missing = [p for p in old_vars if p not in new_vars]
  added = [p for p in new_vars if p not in old_vars]
  if missing or any("split_prior" not in p for p in added):
    raise ValueError(f"`source` and `prior` must have the same architecture up to the "
                     f"coupling-network width and added learned priors. Variables only in "
                     f"`source`: {missing[:3]}; only in `prior`: {added[:3]}.")
  for path, old in old_vars.items():
    new = new_vars[path]
    if new.shape.rank != old.shape.rank or any(
        n < o for n, o in zip(new.shape.as_list(), old.shape.as_list())):
      raise ValueError(f"Cannot grow variable {path} of shape {old.shape} into shape "
                       f"{new.shape}.")
    if new.shape == old.shape:
      new.assign(old)
      continue
    value = new.numpy()
    o = old.numpy()
    if value.ndim == 1:  # Bias.
      value[:] = 0.0
      value[:o.shape[0]] = o
    elif value.ndim == 4:  # Conv kernel [k, k, in, out].
      if value.shape[:2] != o.shape[:2]:
        raise ValueError(f"Kernel sizes differ for {path}: {old.shape} vs {new.shape}.")
      n_in, n_out = o.shape[2], o.shape[3]
      value[:, :, n_in:, :n_out] = 0.0
      value[:, :, :n_in, :n_out] = o
    else:
      raise ValueError(f"Cannot grow variable {path} of shape {old.shape} to {new.shape}.")
    new.assign(value)
