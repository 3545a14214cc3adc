"""The FAER network and its ConvNeXt backbone.

  model = create_model('base', num_classes=7)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  features, logits = model.apply(variables, images, train=False)
"""

from typing import Any

import jax.numpy as jnp

from faer_jax.models.cc_attention import CCAttention
from faer_jax.models.convnext import VARIANTS, ConvNeXt, get_variant
from faer_jax.models.faer import FAER
from faer_jax.models.implementations import CONV_IMPLS, choose

__all__ = ["CCAttention", "CONV_IMPLS", "ConvNeXt", "FAER", "VARIANTS", "create_backbone", "create_model",
           "get_variant"]


def create_model(variant: str, num_classes: int, *, drop_path_rate: float = 0.0,
                 layer_scale_init_value: float = 1e-6, head_init_scale: float = 1.0,
                 dtype: Any = jnp.float32, conv_impl: str = "auto", platform: str | None = None,
                 cc_attention: bool = True) -> FAER:
  """The FAER module for a ConvNeXt variant ('test', 'atto', ..., 'base', ..., 'xlarge').

  Args:
    variant: a key of `VARIANTS`; the paper uses 'base'.
    num_classes: 7 for expressions, 40 for CelebA attributes, ...
    drop_path_rate: stochastic depth of the last block (0 for the first).
    layer_scale_init_value: initial gamma of every block (0 disables layer scale).
    head_init_scale: multiplies the head's initial weights.
    dtype: computation dtype (parameters are always float32), e.g. jnp.bfloat16.
    conv_impl: 'auto' | 'xla' | 'shift' | 'kernel': which implementation of the layers
      (faer_jax.models.implementations): 'auto' the C++ kernels in CPU programs, the plain
      layers elsewhere; 'xla' the plain layers everywhere. The kernels have reverse-mode
      gradients only: forward-mode autodiff (jax.jvp) of a CPU program needs 'xla'.
    platform: the platform the program is compiled for; None: this process's default backend.
    cc_attention: False gives the paper's Baseline, the official ConvNeXt classifier.
  """
  spec = get_variant(variant)
  return FAER(num_classes=num_classes, depths=spec.depths, dims=spec.dims, drop_path_rate=drop_path_rate,
              layer_scale_init_value=layer_scale_init_value, head_init_scale=head_init_scale,
              dtype=dtype, use_cc_attention=cc_attention, **choose(conv_impl, platform, dtype))


def create_backbone(variant: str, *, drop_path_rate: float = 0.0, layer_scale_init_value: float = 1e-6,
                    dtype: Any = jnp.float32, conv_impl: str = "auto", platform: str | None = None) -> ConvNeXt:
  """A ConvNeXt whose `apply(variables, images, train=False)` returns the last stage's map (B,H,W,C)."""
  spec = get_variant(variant)
  parts = choose(conv_impl, platform, dtype)
  del parts["grouped_conv"]
  return ConvNeXt(spec.depths, spec.dims, drop_path_rate, layer_scale_init_value, dtype, **parts)
