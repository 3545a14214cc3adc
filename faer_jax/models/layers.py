"""The layers ConvNeXt and CC Attention are built from, in their plain form (what GPUs and TPUs run).

Every choice here that changes numbers follows the PyTorch original and says so:
the initialiser, the LayerNorm variance, the exact GELU, the drop-path scaling.

Each layer keeps its parameters as the matching flax.linen module does, and
computes in one overridable method, so that another implementation of the same
function (faer_jax.models.implementations chooses) is a subclass that changes
how it computes, not what it stores.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
ModuleDef = Callable[..., nn.Module]

# timm's `trunc_normal_(w, std=.02)`, which ConvNeXt and FAER call on every conv
# and linear weight, truncates at the *absolute* bounds [-2, 2], i.e. at ±100
# standard deviations: in effect a plain normal. JAX's truncated_normal takes
# its bounds in standard deviations, so the same distribution needs ±100 here
# (its default ±2σ would give a visibly narrower init).
kernel_init = nn.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)
bias_init = nn.initializers.zeros


def gelu(x: jax.Array) -> jax.Array:
  """torch.nn.GELU(): the exact erf form 0.5 x (1 + erf(x / sqrt 2)), not the tanh approximation.

  Written out rather than `nn.gelu(approximate=False)`, which JAX computes
  through erfc: XLA expands erfc with an exp and a select on every element, erf
  as a plain rational polynomial (the activation is 4C wide: a few percent of
  a training step). The erf form is also the one torch uses.
  """
  return 0.5 * x * (1.0 + lax.erf(x * jnp.asarray(2 ** -0.5, x.dtype)))


def precision(dtype: Dtype) -> lax.Precision | None:
  """The precision of the model's matrix products and convolutions in compute dtype `dtype`.

  float32 ones run at float32 precision whatever the chip, as the PyTorch
  original computes them: left to their defaults, XLA computes float32
  products in TensorFloat-32 on recent NVIDIA GPUs (10-bit mantissas) and in
  one bfloat16 pass on TPUs. In bfloat16, XLA's default: the inputs have no
  more digits to keep.
  """
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
  """nn.Linear of the original: a Dense with timm's initialisation, float32 products in float32."""
  return nn.Dense(features, dtype=dtype, precision=precision(dtype), kernel_init=kernel_init, bias_init=bias_init,
                  name=name)


class LayerNorm(nn.Module):
  """LayerNorm over the last (channel) axis; the parameters of nn.LayerNorm ('scale', 'bias').

  The variance is mean((x - mean)^2), as torch computes it, not mean(x^2) -
  mean^2, which loses digits when the mean is large against the spread.
  Statistics are computed in float32 (at least), as flax does.
  """

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = self.row_mean(x)
    centered = x - mean[..., None]
    mul = lax.rsqrt(self.row_mean(centered * centered) + self.epsilon)[..., None] * scale
    return (centered * mul + bias).astype(self.dtype)

  def row_mean(self, x: jax.Array) -> jax.Array:
    """The mean over the last axis."""
    return jnp.mean(x, axis=-1)


def _conv(x: jax.Array, kernel: jax.Array, strides: int, padding, groups: int) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, window_strides=(strides, strides), padding=padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
                                  precision=precision(x.dtype))


class DepthwiseConv(nn.Module):
  """A k x k depthwise convolution, stride 1, 'same' padding (k // 2), with bias (NHWC): ConvNeXt's dwconv.

  Parameters: kernel (k, k, 1, C) and bias (C,), as
  `nn.Conv(C, (k, k), feature_group_count=C)` stores them.
  """

  features: int
  kernel_size: int = 7
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param("kernel", kernel_init, (k, k, 1, self.features), jnp.float32)
    bias = self.param("bias", bias_init, (self.features,), jnp.float32)
    x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
    return self.convolve(x, kernel) + bias

  def convolve(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    pad = self.kernel_size // 2
    return _conv(x, kernel, 1, ((pad, pad), (pad, pad)), self.features)


class PatchConv(nn.Module):
  """A p x p convolution with stride p, no padding, and bias (NHWC): ConvNeXt's stem and downsampling.

  Parameters: kernel (p, p, C, features) and bias (features,), as
  `nn.Conv(features, (p, p), strides=(p, p), padding='VALID')` stores them.
  """

  features: int
  patch: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch
    kernel = self.param("kernel", kernel_init, (p, p, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", bias_init, (self.features,), jnp.float32)
    x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
    return self.convolve(x, kernel, bias)

  def convolve(self, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    return _conv(x, kernel, self.patch, "VALID", 1) + bias


class GroupedConv(nn.Module):
  """A k x k 'same' convolution with `groups` groups and bias (NHWC): CC Attention's conv.

  Parameters: kernel (k, k, C_in / groups, features) and bias (features,), as
  `nn.Conv(features, (k, k), feature_group_count=groups)` stores them.
  """

  features: int
  kernel_size: int
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param("kernel", kernel_init, (k, k, x.shape[-1] // self.groups, self.features), jnp.float32)
    bias = self.param("bias", bias_init, (self.features,), jnp.float32)
    x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
    return self.convolve(x, kernel) + bias

  def convolve(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    pad = self.kernel_size // 2
    return _conv(x, kernel, 1, ((pad, pad), (pad, pad)), self.groups)


class DropPath(nn.Module):
  """Stochastic depth per example, as timm's `drop_path` (scaled by 1/keep).

  Active only when `deterministic` is False; draws from the 'dropout' RNG
  stream, so `apply(..., train=True, rngs={'dropout': key})` drives it.
  """

  rate: float

  def active(self, deterministic: bool) -> bool:
    return not deterministic and self.rate != 0.0

  def mask(self, x: jax.Array) -> jax.Array:
    """The 0/1 mask __call__ multiplies x by, one per example (the leading axis), shaped to broadcast."""
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.rate, shape).astype(x.dtype)

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if not self.active(deterministic):
      return x
    keep = 1.0 - self.rate
    if keep == 0.0:  # timm leaves the mask unscaled here; every path is dropped.
      return jnp.zeros_like(x)
    return x * self.mask(x) / jnp.asarray(keep, x.dtype)
