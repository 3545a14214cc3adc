"""Building blocks shared by the ConvNeXt backbone and CC Attention.

Every choice here that changes numbers follows the PyTorch original and says so:
the initialiser, the LayerNorm variance, the exact GELU, the drop-path scaling.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any

# timm's `trunc_normal_(w, std=.02)`, which ConvNeXt and FAER call on every conv
# and linear weight, truncates at the *absolute* bounds [-2, 2], i.e. at ±100
# standard deviations: in effect a plain normal. JAX's truncated_normal takes
# its bounds in standard deviations, so the same distribution needs ±100 here
# (its default ±2σ would give a visibly narrower init).
kernel_init = nn.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)
bias_init = nn.initializers.zeros


def gelu(x: jax.Array) -> jax.Array:
  """torch.nn.GELU(): the exact erf form, not the tanh approximation."""
  return nn.gelu(x, approximate=False)


def layer_norm(eps: float, dtype: Dtype, name: str | None) -> nn.LayerNorm:
  """A LayerNorm over the channel (last) axis, computed as torch computes it.

  `use_fast_variance=False` computes the variance as mean((x - mean)^2), as
  torch does, instead of mean(x^2) - mean^2, which loses digits when the mean
  is large against the spread.
  """
  return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=kernel_init, bias_init=bias_init, name=name)


class DepthwiseConv7x7(nn.Module):
  """7x7 depthwise convolution, stride 1, padding 3, with bias (NHWC).

  The kernel is stored as (7, 7, 1, C), the layout `nn.Conv(C, (7, 7),
  feature_group_count=C)` uses, so checkpoints do not depend on `impl`:

  * 'xla': lax.conv_general_dilated with feature_group_count=C.
  * 'shift': the sum of 49 shifted, channel-scaled copies of the input, which
    XLA fuses into a few loops. XLA:CPU's grouped convolution is an order of
    magnitude slower than this (see issue 5), while GPUs and TPUs have fast
    native depthwise kernels.
  * 'auto': 'shift' on CPU, 'xla' elsewhere.

  Both compute the same sum; they differ only in float summation order.
  """

  features: int
  impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", kernel_init, (7, 7, 1, self.features), jnp.float32)
    bias = self.param("bias", bias_init, (self.features,), jnp.float32)
    x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
    impl = self.impl
    if impl == "auto":
      impl = "shift" if jax.default_backend() == "cpu" else "xla"
    if impl == "xla":
      y = lax.conv_general_dilated(
          x, kernel, window_strides=(1, 1), padding=((3, 3), (3, 3)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.features)
    elif impl == "shift":
      y = _depthwise_by_shifts(x, kernel[:, :, 0, :])
    else:
      raise ValueError(f"Unknown depthwise conv impl {self.impl!r}; expected 'auto', 'xla' or 'shift'.")
    return y + bias


def _depthwise_by_shifts(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """sum_{i,j} pad(x)[:, i:i+H, j:j+W, :] * kernel[i, j, :] (cross-correlation)."""
  kh, kw, _ = kernel.shape
  h, w = x.shape[1], x.shape[2]
  xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  y = None
  for i in range(kh):
    for j in range(kw):
      term = xp[:, i:i + h, j:j + w, :] * kernel[i, j]
      y = term if y is None else y + term
  return y


class DropPath(nn.Module):
  """Stochastic depth per example, as timm's `drop_path` (scaled by 1/keep).

  Active only when `deterministic` is False; draws from the 'dropout' RNG
  stream, so `apply(..., train=True, rngs={'dropout': key})` drives it.
  """

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    if keep == 0.0:  # timm leaves the mask unscaled here; every path is dropped.
      return jnp.zeros_like(x)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return x * mask.astype(x.dtype) / jnp.asarray(keep, x.dtype)
