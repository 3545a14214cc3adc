"""ConvNeXt (Liu et al., 2022) in Flax linen, NHWC, as the original FAER uses it.

Parameter names mirror the PyTorch original's state-dict keys so the mapping
in `faer_jax.interop` reads one-to-one:

  downsample_layers_0/{conv, norm}     <- downsample_layers.0.{0, 1}  (stem)
  downsample_layers_i/{norm, conv}     <- downsample_layers.i.{0, 1}  (i = 1..3)
  stages_i/blocks_j/{dwconv, norm, pwconv1, pwconv2, gamma}
                                       <- stages.i.j.{...}
"""

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from faer_jax.models import layers
from faer_jax.models.layers import ModuleDef

Dtype = Any


@dataclasses.dataclass(frozen=True)
class VariantSpec:
  depths: tuple[int, int, int, int]
  dims: tuple[int, int, int, int]


# The standard table (ConvNeXt paper and timm). 'test' is ours: small enough
# for unit tests, with every structural feature of the real ones (four stages,
# several blocks in a stage, widths divisible by 8 for CC Attention's C//8).
VARIANTS: dict[str, VariantSpec] = {
    "test": VariantSpec((1, 1, 2, 1), (16, 32, 48, 64)),
    "atto": VariantSpec((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": VariantSpec((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": VariantSpec((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": VariantSpec((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": VariantSpec((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": VariantSpec((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": VariantSpec((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": VariantSpec((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xlarge": VariantSpec((3, 3, 27, 3), (256, 512, 1024, 2048)),
}


def get_variant(name: str) -> VariantSpec:
  try:
    return VARIANTS[name]
  except KeyError:
    raise ValueError(f"Unknown ConvNeXt variant {name!r}; choose one of {sorted(VARIANTS)}.") from None


class Block(nn.Module):
  """dwconv 7x7 -> LayerNorm (eps 1e-6) -> Dense 4C -> GELU (erf) -> Dense C -> gamma -> drop path -> + x.

  `depthwise_conv` and `norm_layer` build the conv and the norm: the plain
  layers by default, or others with the same parameters (see
  faer_jax.models.implementations).
  """

  dim: int
  drop_path: float = 0.0
  layer_scale_init_value: float = 1e-6
  dtype: Dtype = jnp.float32
  depthwise_conv: ModuleDef = layers.DepthwiseConv
  norm_layer: ModuleDef = layers.LayerNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    shortcut = x
    x = self.depthwise_conv(self.dim, 7, dtype=self.dtype, name="dwconv")(x)
    x = self.norm_layer(1e-6, dtype=self.dtype, name="norm")(x)
    x = layers.dense(4 * self.dim, self.dtype, "pwconv1")(x)
    x = layers.dense(self.dim, self.dtype, "pwconv2")(layers.gelu(x))
    if self.layer_scale_init_value > 0:
      x = x * self.param("gamma", nn.initializers.constant(self.layer_scale_init_value), (self.dim,),
                         jnp.float32).astype(self.dtype)
    x = layers.DropPath(self.drop_path, name="drop_path")(x, deterministic=not train)
    return shortcut + x


class Downsample(nn.Module):
  """The stem (4x4 stride-4 conv, then LayerNorm) or a stage's downsampling (LayerNorm, then 2x2 stride-2 conv)."""

  dim: int
  stem: bool
  dtype: Dtype = jnp.float32
  patch_conv: ModuleDef = layers.PatchConv
  norm_layer: ModuleDef = layers.LayerNorm

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = self.patch_conv(self.dim, 4 if self.stem else 2, dtype=self.dtype, name="conv")
    norm = self.norm_layer(1e-6, dtype=self.dtype, name="norm")
    return norm(conv(x)) if self.stem else conv(norm(x))


class Stage(nn.Module):
  """`depth` blocks of width `dim`, named blocks_0 ... blocks_{depth-1}."""

  dim: int
  drop_path_rates: Sequence[float]
  layer_scale_init_value: float = 1e-6
  dtype: Dtype = jnp.float32
  block: ModuleDef = Block

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for j, rate in enumerate(self.drop_path_rates):
      x = self.block(self.dim, drop_path=rate, layer_scale_init_value=self.layer_scale_init_value,
                     dtype=self.dtype, name=f"blocks_{j}")(x, train)
    return x


class ConvNeXt(nn.Module):
  """The ConvNeXt feature extractor: returns the last stage's map (B, H/32, W/32, C).

  The global pooling, final norm and head belong to the model that uses the
  backbone (FAER puts CC Attention between the last stage and the pooling).
  `block`, `patch_conv` and `norm_layer` build its parts (see Block).
  """

  depths: Sequence[int]
  dims: Sequence[int]
  drop_path_rate: float = 0.0
  layer_scale_init_value: float = 1e-6
  dtype: Dtype = jnp.float32
  block: ModuleDef = Block
  patch_conv: ModuleDef = layers.PatchConv
  norm_layer: ModuleDef = layers.LayerNorm

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    # Stochastic depth rates rise linearly from 0 to drop_path_rate over all
    # blocks, as `torch.linspace(0, drop_path_rate, sum(depths))` does.
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
    x = images.astype(self.dtype)
    start = 0
    for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
      x = Downsample(dim, stem=(i == 0), dtype=self.dtype, patch_conv=self.patch_conv, norm_layer=self.norm_layer,
                     name=f"downsample_layers_{i}")(x)
      x = Stage(dim, tuple(rates[start:start + depth]), self.layer_scale_init_value, self.dtype, self.block,
                name=f"stages_{i}")(x, train)
      start += depth
    return x
