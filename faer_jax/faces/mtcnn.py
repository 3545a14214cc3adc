"""MTCNN's three networks (Zhang et al., 2016, "Joint Face Detection and Alignment using Multi-task Cascaded
Convolutional Networks") in Flax, with the trained weights the `mtcnn` package ships.

  P-Net  12×12 windows, fully convolutional: face probability and box offsets per 2-pixel stride
  R-Net  24×24 crops: refined probability and box offsets
  O-Net  48×48 crops: probability, box offsets and five landmarks (eyes, nose tip, mouth corners)

Inputs are NHWC RGB images scaled as (x − 127.5) / 128. The weights are the
original Caffe models as the `mtcnn` wheel (MIT licence) stores them: Keras
layer weights (HWIO kernels, PReLU slopes per channel) in
`mtcnn/assets/weights/{pnet,rnet,onet}.lz4`, read with joblib. The package is
located, never imported (its import pulls in TensorFlow).
"""

import functools
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class PReLU(nn.Module):
  """max(x, 0) + a · min(x, 0), one slope a per channel."""

  @nn.compact
  def __call__(self, x):
    slope = self.param("slope", nn.initializers.constant(0.25), (x.shape[-1],))
    return jnp.where(x >= 0, x, slope * x)


def _conv(features: int, size: int, name: str):
  return nn.Conv(features, (size, size), padding="VALID", name=name, precision=jax.lax.Precision.HIGHEST)


def _dense(features: int, name: str):
  return nn.Dense(features, name=name, precision=jax.lax.Precision.HIGHEST)


def _flatten_transposed(x):
  """(N, H, W, C) -> (N, W·H·C): the dense layers were trained on images stored width-major."""
  return x.transpose(0, 2, 1, 3).reshape(x.shape[0], -1)


class PNet(nn.Module):
  """(N, H, W, 3) -> box offsets (N, H', W', 4), face probability (N, H', W'), H' = ⌈(H − 2) / 2⌉ − 4."""

  @nn.compact
  def __call__(self, x):
    x = PReLU(name="prelu1")(_conv(10, 3, "conv1")(x))
    x = nn.max_pool(x, (2, 2), (2, 2), padding="SAME")
    x = PReLU(name="prelu2")(_conv(16, 3, "conv2")(x))
    x = PReLU(name="prelu3")(_conv(32, 3, "conv3")(x))
    offsets = _conv(4, 1, "conv4_1")(x)
    probs = jax.nn.softmax(_conv(2, 1, "conv4_2")(x), axis=-1)
    return offsets, probs[..., 1]


class RNet(nn.Module):
  """(N, 24, 24, 3) -> box offsets (N, 4), face probability (N,)."""

  @nn.compact
  def __call__(self, x):
    x = PReLU(name="prelu1")(_conv(28, 3, "conv1")(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    x = PReLU(name="prelu2")(_conv(48, 3, "conv2")(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding="VALID")
    x = PReLU(name="prelu3")(_conv(64, 2, "conv3")(x))
    x = PReLU(name="prelu4")(_dense(128, "fc4")(_flatten_transposed(x)))
    probs = jax.nn.softmax(_dense(2, "fc5_2")(x), axis=-1)
    return _dense(4, "fc5_1")(x), probs[:, 1]


class ONet(nn.Module):
  """(N, 48, 48, 3) -> box offsets (N, 4), landmarks (N, 10): x1..x5, y1..y5 in [0, 1] of the box, probability (N,)."""

  @nn.compact
  def __call__(self, x):
    x = PReLU(name="prelu1")(_conv(32, 3, "conv1")(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    x = PReLU(name="prelu2")(_conv(64, 3, "conv2")(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding="VALID")
    x = PReLU(name="prelu3")(_conv(64, 3, "conv3")(x))
    x = nn.max_pool(x, (2, 2), (2, 2), padding="SAME")
    x = PReLU(name="prelu4")(_conv(128, 2, "conv4")(x))
    x = PReLU(name="prelu5")(_dense(256, "fc5")(_flatten_transposed(x)))
    probs = jax.nn.softmax(_dense(2, "fc6_3")(x), axis=-1)
    return _dense(4, "fc6_1")(x), _dense(10, "fc6_2")(x), probs[:, 1]


# The order of each network's arrays in the package's files: (layer, [parameter names]).
_LAYOUT = {
    "pnet": ["conv1", "prelu1", "conv2", "prelu2", "conv3", "prelu3", "conv4_1", "conv4_2"],
    "rnet": ["conv1", "prelu1", "conv2", "prelu2", "conv3", "prelu3", "fc4", "prelu4", "fc5_1", "fc5_2"],
    "onet": ["conv1", "prelu1", "conv2", "prelu2", "conv3", "prelu3", "conv4", "prelu4", "fc5", "prelu5",
             "fc6_1", "fc6_2", "fc6_3"],
}


class WeightsNotFound(FileNotFoundError):
  """The `mtcnn` package (its weight files) is not installed; the message says how to install it."""


def weights_dir() -> str:
  spec = importlib.util.find_spec("mtcnn")
  folder = os.path.join(spec.submodule_search_locations[0], "assets", "weights") if spec else None
  if folder is None or not os.path.isfile(os.path.join(folder, "pnet.lz4")):
    raise WeightsNotFound("face detection needs MTCNN's weights from the `mtcnn` package: "
                          "pip install 'faer-jax[faces]' (or pip install mtcnn==1.0.0)")
  return folder


@functools.cache
def load_params(network: str) -> dict:
  """The trained parameters of 'pnet', 'rnet' or 'onet' as a Flax params dict."""
  import joblib
  arrays = list(joblib.load(os.path.join(weights_dir(), f"{network}.lz4")))
  params = {}
  for layer in _LAYOUT[network]:
    if layer.startswith("prelu"):
      params[layer] = {"slope": np.asarray(arrays.pop(0), np.float32).reshape(-1)}
    else:
      kernel, bias = arrays.pop(0), arrays.pop(0)
      params[layer] = {"kernel": np.asarray(kernel, np.float32), "bias": np.asarray(bias, np.float32)}
  if arrays:
    raise ValueError(f"{network}.lz4 holds {len(arrays)} arrays more than {network} has")
  return params


@functools.cache
def networks():
  """{'pnet', 'rnet', 'onet'} -> a jitted function of a batch, with the trained weights."""
  out = {}
  for name, module in (("pnet", PNet()), ("rnet", RNet()), ("onet", ONet())):
    params = jax.tree.map(jnp.asarray, load_params(name))
    out[name] = jax.jit(functools.partial(lambda m, p, x: m.apply({"params": p}, x), module, params))
  return out
