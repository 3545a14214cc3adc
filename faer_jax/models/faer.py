"""FAER: ConvNeXt backbone -> CC Attention -> global average pool -> LayerNorm -> head."""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from faer_jax.models import layers
from faer_jax.models.cc_attention import CCAttention
from faer_jax.models.convnext import ConvNeXt

Dtype = Any


class FAER(nn.Module):
  """The full model. `apply(variables, images, train=...)` returns (features, logits).

  `features` is the spatial mean of the CC Attention output, before the final
  LayerNorm: the vector the center loss pulls towards its class center.
  Images are NHWC, normalised with the ImageNet mean and std.
  """

  num_classes: int
  depths: Sequence[int]
  dims: Sequence[int]
  drop_path_rate: float = 0.0
  layer_scale_init_value: float = 1e-6
  head_init_scale: float = 1.0
  dtype: Dtype = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    x = ConvNeXt(self.depths, self.dims, self.drop_path_rate, self.layer_scale_init_value, self.dtype,
                 self.conv_impl, name="backbone")(images, train)
    x = CCAttention(self.dims[-1], self.dtype, name="cc_attention")(x)
    features = jnp.mean(x, axis=(1, 2))
    x = layers.layer_norm(1e-6, self.dtype, "norm")(features)
    # The original multiplies the head's initial weight and bias by head_init_scale.
    scaled = lambda init: (lambda *a: init(*a) * self.head_init_scale)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=scaled(layers.kernel_init),
                      bias_init=scaled(layers.bias_init), name="head")(x)
    return features, logits
