"""Contextual Channel Attention (CC Attention), the block FAER adds after ConvNeXt.

On the last stage's map X (B, H, W, C):

  V = Dense(C)(X)
  K = Dense(C)(GELU(Dense(C//8)(X))) * mean_{H,W}(X)     # pooled context, broadcast
  Q = LayerNorm_{eps=1e-5}(GELU(Conv7x7_{groups=4}(X)))
  R = softmax_{H*W}(Q + K)                               # per example and channel
  out = R * V + X

Submodule names are the original's state-dict names (`attention.mlp.0`,
`attention.mlp.2`, `attention.value`, `attention.depthwise`, `attention.norm`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from faer_jax.models import layers
from faer_jax.models.layers import ModuleDef

Dtype = Any


class CCAttention(nn.Module):
  """CC Attention over the last stage's map; `grouped_conv` and `norm_layer` build its conv and its norm."""

  dim: int
  dtype: Dtype = jnp.float32
  grouped_conv: ModuleDef = layers.GroupedConv
  norm_layer: ModuleDef = layers.LayerNorm

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    value = layers.dense(self.dim, self.dtype, "value")(x)

    key = layers.dense(self.dim // 8, self.dtype, "mlp_0")(x)
    key = layers.dense(self.dim, self.dtype, "mlp_2")(layers.gelu(key))
    key = key * jnp.mean(x, axis=(1, 2), keepdims=True)

    # Named 'depthwise' in the original, but it has 4 groups, not C: its torch
    # weight is (C, C/4, 7, 7).
    query = self.grouped_conv(self.dim, 7, groups=4, dtype=self.dtype, name="depthwise")(x)
    # torch.nn.LayerNorm's default eps (1e-5), unlike the backbone's 1e-6.
    query = self.norm_layer(1e-5, dtype=self.dtype, name="norm")(layers.gelu(query))

    # Softmax over the H*W positions, separately per example and channel. In
    # float32 at least whatever the compute dtype, as torch autocast does for softmax.
    logits = (query + key).reshape(b, h * w, c).astype(jnp.promote_types(self.dtype, jnp.float32))
    attention = jax.nn.softmax(logits, axis=1).reshape(b, h, w, c).astype(self.dtype)
    return attention * value + x
