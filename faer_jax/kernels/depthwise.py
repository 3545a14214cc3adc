"""ConvNeXt's 7x7 depthwise convolution (and the LayerNorm after it) through the C++ kernels.

  depthwise_conv7x7(x, kernel)
      what `lax.conv_general_dilated(x, kernel[:, :, None], (1, 1), ((3, 3), (3, 3)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=C)` computes;
  depthwise_conv7x7_norm(x, kernel, bias, scale, shift, eps)
      LayerNorm(depthwise_conv7x7(x, kernel) + bias) over channels, in one pass,
      with the norm's variance computed as torch does (mean of squared deviations);

both in float32 on the CPU, up to float summation order, with hand-written
gradients built from the same kernels (depthwise_conv.cc). Call
`faer_jax.kernels.load()` (or check `available()`) first.

Every kernel call is batch-parallel (per-example or per-row partial sums are
returned and summed here), so under jit with batch-sharded inputs it is
partitioned like an elementwise op, through custom_partitioning, instead of
being gathered onto every device.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from faer_jax.kernels.partition import batch_parallel

_F32 = jnp.float32


def _struct(shape):
  return jax.ShapeDtypeStruct(shape, _F32)


@functools.partial(batch_parallel, rule="n h w c, i j c -> n h w c")
def _forward(x, kernel):
  return jax.ffi.ffi_call("faer_dw7_forward", _struct(x.shape))(x, kernel)


@functools.partial(batch_parallel, rule="n h w c, n h w c -> n i j c")
def _kernel_grad(x, g):
  n, _, _, c = x.shape
  return jax.ffi.ffi_call("faer_dw7_kernel_grad", _struct((n, 7, 7, c)))(x, g)


@functools.partial(batch_parallel, rule="n h w c, i j c, c, c, c -> n h w c, n h w, n h w", num_static=1)
def _norm_forward(x, kernel, bias, scale, shift, eps):
  stats = _struct(x.shape[:3])
  return jax.ffi.ffi_call("faer_dw7_norm_forward", (_struct(x.shape), stats, stats))(
      x, kernel, bias, scale, shift, eps=np.float32(eps))


@functools.partial(batch_parallel, rule="n h w c, i j c, c, c, n h w, n h w, n h w c -> n h w c, n h k c")
def _norm_backward(x, kernel, bias, scale, mean, rstd, dz):
  n, h, _, c = x.shape
  return jax.ffi.ffi_call("faer_dw7_norm_backward", (_struct(x.shape), _struct((n, h, 3, c))))(
      x, kernel, bias, scale, mean, rstd, dz)


def _conv_backward(x, kernel, g):
  # The input gradient is the same correlation of g with the kernel flipped.
  return _forward(g, kernel[::-1, ::-1]), jnp.sum(_kernel_grad(x, g), axis=0)


@jax.custom_vjp
def depthwise_conv7x7(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """'Same' 7x7 depthwise cross-correlation of x (N, H, W, C) float32 with kernel (7, 7, C)."""
  return _forward(x, kernel)


def _conv_fwd(x, kernel):
  return _forward(x, kernel), (x, kernel)


def _conv_bwd(residuals, g):
  return _conv_backward(*residuals, g)


depthwise_conv7x7.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def depthwise_conv7x7_norm(x: jax.Array, kernel: jax.Array, bias: jax.Array, scale: jax.Array,
                           shift: jax.Array, eps: float) -> jax.Array:
  """LayerNorm(depthwise_conv7x7(x, kernel) + bias) * scale + shift, normalised over C."""
  return _norm_forward(x, kernel, bias, scale, shift, float(eps))[0]


def _norm_fwd(x, kernel, bias, scale, shift, eps):
  z, mean, rstd = _norm_forward(x, kernel, bias, scale, shift, float(eps))
  return z, (x, kernel, bias, scale, mean, rstd)


def _norm_bwd(eps, residuals, dz):
  del eps
  x, kernel, bias, scale, mean, rstd = residuals
  dy, partials = _norm_backward(x, kernel, bias, scale, mean, rstd, dz)
  dscale, dshift, dbias = jnp.sum(partials, axis=(0, 1))
  dx, dkernel = _conv_backward(x, kernel, dy)
  return dx, dkernel, dbias, dscale, dshift


depthwise_conv7x7_norm.defvjp(_norm_fwd, _norm_bwd)
