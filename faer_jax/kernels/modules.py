"""Drop-in modules for programs built for the CPU: the model's parameters, its function, computed faster.

faer_jax.models.implementations.choose puts them in place of the plain layers
(`cpu_parts`), by the model's `conv_impl`:

  the plain layer     'shift' (pure XLA, any CPU)           'kernel' (C++, float32; 'auto' where they build)
  Block               ShiftBlock: ShiftDepthwiseConv,       FusedBlock: conv + norm as one kernel, then the
                      CpuLayerNorm                          MLP, layer scale, drop path and residual as one
  PatchConv           PatchConv                             KernelPatchConv
  GroupedConv         SplitGroupedConv                      KernelGroupedConv
  LayerNorm           CpuLayerNorm                          CpuLayerNorm

Each keeps the parameter tree of the module it replaces, so checkpoints do
not depend on the choice; the results differ from the plain layers' only in
float summation order. docs/cpu_kernels.md has the measurements behind each.
"""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from faer_jax import kernels
from faer_jax.kernels import depthwise as kernel_depthwise
from faer_jax.kernels import grouped as kernel_grouped
from faer_jax.kernels import mlp as kernel_mlp
from faer_jax.kernels import patch as kernel_patch
from faer_jax.kernels.shifts import depthwise_conv_shifts
from faer_jax.models import layers
from faer_jax.models.convnext import Block

# The fused MLP kernel against XLA's two matmuls and elementwise passes, forward
# + backward of one block, batch 16, 2 cores: 1.5-1.6x as fast at C = 96, 1.35x
# at 128, 1.1-1.15x at 192 and 256, 1.03-1.08x at 384 and 512, 0.85-0.96x at 768
# and 1024. Wider blocks keep XLA's.
FUSED_MLP_MAX_WIDTH = 512


class CpuLayerNorm(layers.LayerNorm):
  """LayerNorm whose two row sums are matrix-vector products with a ones vector instead of reductions.

  The same sums in another order. It keeps XLA:CPU's library fusion of
  reductions (YNNPACK) from pulling the norm, the depthwise conv before it and
  the matmul after it into one call whose inputs XLA then materialises (about
  1.5x on the forward of a first-stage ConvNeXt block, 16x56x56x96, one core).
  (A TPU would run the float32 product at bfloat16 precision by default: CPU only.)
  """

  def row_mean(self, x: jax.Array) -> jax.Array:
    ones = jnp.ones((x.shape[-1],), x.dtype)
    return jnp.matmul(x, ones, precision=layers.precision(x.dtype)) / x.shape[-1]


class ShiftDepthwiseConv(layers.DepthwiseConv):
  """The depthwise conv as shifted multiply-adds (kernels.shifts): 2-6x slower than the kernel, 10-100x faster
  than XLA:CPU's grouped convolution."""

  def convolve(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    return depthwise_conv_shifts(x, kernel[:, :, 0, :])


class KernelDepthwiseConv(layers.DepthwiseConv):
  """The 7x7 depthwise conv through the C++ kernel (float32; other cases as ShiftDepthwiseConv)."""

  def convolve(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    if x.dtype == jnp.float32 and self.kernel_size == 7:
      return kernel_depthwise.depthwise_conv7x7(x, kernel[:, :, 0, :])
    return depthwise_conv_shifts(x, kernel[:, :, 0, :])


class SplitGroupedConv(layers.GroupedConv):
  """One dense convolution per group, concatenated: XLA:CPU runs a grouped convolution about 5x slower than the
  same work as dense ones, and its gradient 6-9x slower (CC Attention's conv at 16x7x7x768)."""

  def convolve(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    pairs = zip(jnp.split(x, self.groups, axis=-1), jnp.split(kernel, self.groups, axis=-1))
    return jnp.concatenate([_dense_conv(xi, ki, self.kernel_size) for xi, ki in pairs], axis=-1)


def _dense_conv(x: jax.Array, kernel: jax.Array, k: int) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding=((k // 2, k // 2),) * 2,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=layers.precision(x.dtype))


class KernelGroupedConv(SplitGroupedConv):
  """The 7x7 grouped conv through the C++ kernels, which skip the taps that fall on the padding (float32, per-group
  widths multiples of 16; otherwise SplitGroupedConv): at 16x7x7x768 about 2x faster than the split form."""

  def convolve(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    if x.dtype == jnp.float32 and kernel_grouped.supported(kernel.shape, self.groups):
      return kernel_grouped.grouped_conv7x7(x, kernel, self.groups)
    return super().convolve(x, kernel)


class KernelPatchConv(layers.PatchConv):
  """The patchify conv as the C++ kernels' matrix product over patches (float32, outputs a multiple of 16, maps
  the patch divides; otherwise the plain conv). XLA:CPU runs the forward as fast, but the kernel gradient as a
  convolution at 30-40 % of the CPU's peak and the input gradient through transposed copies."""

  def convolve(self, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    if x.dtype == jnp.float32 and kernel_patch.supported(x.shape, kernel.shape):
      return kernel_patch.patch_conv(x, kernel, bias)
    return super().convolve(x, kernel, bias)


class ShiftBlock(Block):
  """The ConvNeXt block with the depthwise conv as shifts and the CPU form of its LayerNorm."""

  depthwise_conv: layers.ModuleDef = ShiftDepthwiseConv
  norm_layer: layers.ModuleDef = CpuLayerNorm


class _Weights(nn.Module):
  """Declares one layer's parameters, under the layer's name, and returns them for a kernel to compute with."""

  specs: tuple[tuple[str, tuple[int, ...], Callable], ...]

  @nn.compact
  def __call__(self) -> tuple[jax.Array, ...]:
    return tuple(self.param(name, init, shape, jnp.float32) for name, shape, init in self.specs)


def _dense(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """What nn.Dense computes, at float32 precision."""
  y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST)
  return y + bias


class FusedBlock(Block):
  """The ConvNeXt block (float32) through the C++ kernels, with Block's parameters.

  The depthwise conv and the LayerNorm after it run as one kernel; in blocks up
  to FUSED_MLP_MAX_WIDTH channels everything after it (Dense, GELU, Dense,
  gamma, drop path with the same masks, residual add) runs as another.
  """

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c = self.dim
    dw_kernel, dw_bias = _Weights((("kernel", (7, 7, 1, c), layers.kernel_init),
                                   ("bias", (c,), layers.bias_init)), name="dwconv")()
    scale, shift = _Weights((("scale", (c,), nn.initializers.ones), ("bias", (c,), nn.initializers.zeros)),
                            name="norm")()
    w1, b1 = _Weights((("kernel", (c, 4 * c), layers.kernel_init), ("bias", (4 * c,), layers.bias_init)),
                      name="pwconv1")()
    w2, b2 = _Weights((("kernel", (4 * c, c), layers.kernel_init), ("bias", (c,), layers.bias_init)),
                      name="pwconv2")()
    if self.layer_scale_init_value > 0:
      gamma = self.param("gamma", nn.initializers.constant(self.layer_scale_init_value), (c,), jnp.float32)
    else:
      gamma = jnp.ones((c,), jnp.float32)
    drop_path = layers.DropPath(self.drop_path, name="drop_path")
    dropping = drop_path.active(deterministic=not train)

    y = kernel_depthwise.depthwise_conv7x7_norm(x, dw_kernel[:, :, 0, :], dw_bias, scale, shift, 1e-6)
    if c <= FUSED_MLP_MAX_WIDTH and kernel_mlp.supported(c, 4 * c) and self.drop_path < 1.0:
      mask = drop_path.mask(y).reshape(-1) if dropping else None
      return kernel_mlp.mlp_residual(y, w1, b1, w2, b2, gamma, x, mask, 1.0 - self.drop_path if dropping else 1.0)
    y = _dense(layers.gelu(_dense(y, w1, b1)), w2, b2) * gamma
    return x + drop_path(y, deterministic=not train)


def cpu_parts(conv_impl: str, dtype) -> dict[str, layers.ModuleDef]:
  """The modules of a CPU program for conv_impl 'auto', 'shift' or 'kernel' (see faer_jax.models.implementations).

  Raises:
    ValueError: 'kernel' where the kernels cannot run (not float32, or not built here).
  """
  float32 = jnp.dtype(dtype) == jnp.float32
  if conv_impl == "kernel" and not float32:
    raise ValueError(f"conv_impl 'kernel' needs float32 computation (got {jnp.dtype(dtype).name}).")
  if conv_impl == "kernel" and not kernels.available():
    raise ValueError("conv_impl 'kernel': the CPU kernels are not available here (the log says why).")
  if conv_impl in ("auto", "kernel") and float32 and kernels.available():
    return {"block": FusedBlock, "patch_conv": KernelPatchConv, "grouped_conv": KernelGroupedConv,
            "norm_layer": CpuLayerNorm}
  return {"block": ShiftBlock, "patch_conv": layers.PatchConv, "grouped_conv": SplitGroupedConv,
          "norm_layer": CpuLayerNorm}
