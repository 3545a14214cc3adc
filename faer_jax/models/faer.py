"""FAER: ConvNeXt backbone -> CC Attention -> global average pool -> LayerNorm -> head.

Without CC Attention it is the paper's Baseline: the official ConvNeXt classifier.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from faer_jax.models import layers
from faer_jax.models.cc_attention import CCAttention
from faer_jax.models.convnext import Block, ConvNeXt
from faer_jax.models.layers import ModuleDef

Dtype = Any


class FAER(nn.Module):
  """The full model. `apply(variables, images, train=...)` returns (features, logits).

  `features` is the spatial mean of the CC Attention output, before the final
  LayerNorm: the vector the center loss pulls towards its class center.
  Images are NHWC, normalised with the ImageNet mean and std.

  The forward pass is also available in its three parts, for Grad-CAM and
  feature extraction (`apply(..., method=FAER.extract)` etc.):
  extract (images -> last stage map), attend (map -> CC Attention map) and
  classify (CC Attention map -> (features, logits)).

  `use_cc_attention=False` leaves CC Attention out: the paper's Baseline (ConvNeXt
  -> pool -> LayerNorm -> head), whose `attend` is the identity.

  `block`, `patch_conv`, `grouped_conv` and `norm_layer` build the parts (the plain
  layers by default): faer_jax.models.create_model chooses them for the
  platform the program is built for.
  """

  num_classes: int
  depths: Sequence[int]
  dims: Sequence[int]
  drop_path_rate: float = 0.0
  layer_scale_init_value: float = 1e-6
  head_init_scale: float = 1.0
  dtype: Dtype = jnp.float32
  use_cc_attention: bool = True
  block: ModuleDef = Block
  patch_conv: ModuleDef = layers.PatchConv
  grouped_conv: ModuleDef = layers.GroupedConv
  norm_layer: ModuleDef = layers.LayerNorm

  def setup(self):
    self.backbone = ConvNeXt(self.depths, self.dims, self.drop_path_rate, self.layer_scale_init_value,
                             self.dtype, self.block, self.patch_conv, self.norm_layer)
    if self.use_cc_attention:
      self.cc_attention = CCAttention(self.dims[-1], self.dtype, self.grouped_conv, self.norm_layer)
    self.norm = self.norm_layer(1e-6, dtype=self.dtype)
    # The original multiplies the head's initial weight and bias by head_init_scale.
    scaled = lambda init: (lambda *a: init(*a) * self.head_init_scale)
    self.head = nn.Dense(self.num_classes, dtype=self.dtype, precision=layers.precision(self.dtype),
                         kernel_init=scaled(layers.kernel_init),
                         bias_init=scaled(layers.bias_init))

  def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    return self.classify(self.attend(self.extract(images, train)))

  def extract(self, images: jax.Array, train: bool = False) -> jax.Array:
    """The backbone's last stage map (B, H/32, W/32, C)."""
    return self.backbone(images, train)

  def attend(self, x: jax.Array) -> jax.Array:
    """CC Attention on the last stage map (the Baseline: the map itself); same shape."""
    return self.cc_attention(x) if self.use_cc_attention else x

  def classify(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(pre-norm pooled features, logits) from the CC Attention map."""
    features = jnp.mean(x, axis=(1, 2))
    return features, self.head(self.norm(features))
