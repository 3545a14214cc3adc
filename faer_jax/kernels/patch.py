"""ConvNeXt's patchify convolutions (stride = kernel size, no padding) through the C++ kernels.

`patch_conv(x, kernel, bias)` computes what
`lax.conv_general_dilated(x, kernel, (p, p), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + bias`
does for a (p, p, C, O) kernel, in float32 on the CPU, up to float summation
order, as a matrix product over patches (patch_conv.cc), with a hand-written
gradient: the input gradient as the product with the kernel's transpose,
scattered back into the patches, and the kernel gradient as patches^T dy,
summed over each device's examples and then across devices. Call
`faer_jax.kernels.load()` first; `supported` says which shapes the kernels take.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from faer_jax.kernels.partition import batch_parallel


def supported(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...]) -> bool:
  """Square p x p kernels (p, p, C, O) with O % 16 == 0 over maps whose height and width p divides."""
  if len(x_shape) != 4 or len(kernel_shape) != 4:
    return False
  p, q, c, o = kernel_shape
  return p == q and c == x_shape[-1] and o % 16 == 0 and x_shape[1] % p == 0 and x_shape[2] % p == 0


def _out_shape(x_shape, kernel_shape):
  p = kernel_shape[0]
  return (x_shape[0], x_shape[1] // p, x_shape[2] // p, kernel_shape[-1])


@functools.partial(batch_parallel, rule="n h w c, i j c o, o -> n a b o")
def _forward(x, kernel, bias):
  out = jax.ShapeDtypeStruct(_out_shape(x.shape, kernel.shape), jnp.float32)
  return jax.ffi.ffi_call("faer_patch_forward", out)(x, kernel, bias)


def _input_grad(dy, kernel, x_shape):
  p, _, c, _ = kernel.shape
  if (p * c) % 16:  # the stem (C = 3): XLA's transposed convolution
    zeros = jnp.zeros(x_shape, jnp.float32)
    _, vjp = jax.vjp(lambda x: lax.conv_general_dilated(x, kernel, (p, p), "VALID",
                                                         dimension_numbers=("NHWC", "HWIO", "NHWC")), zeros)
    return vjp(dy)[0]
  return _input_grad_kernel(dy, kernel, x_shape[1], x_shape[2])


@functools.partial(batch_parallel, rule="n a b o, i j c o -> n h w c", num_static=2)
def _input_grad_kernel(dy, kernel, height, width):
  out = jax.ShapeDtypeStruct((dy.shape[0], height, width, kernel.shape[2]), jnp.float32)
  return jax.ffi.ffi_call("faer_patch_input_grad", out)(dy, kernel)


@functools.partial(batch_parallel, rule="n h w c, n a b o -> i j c o", batch_sum=True, num_static=1)
def _kernel_grad(x, dy, patch):
  out = jax.ShapeDtypeStruct((patch, patch, x.shape[-1], dy.shape[-1]), jnp.float32)
  return jax.ffi.ffi_call("faer_patch_kernel_grad", out)(x, dy)


@jax.custom_vjp
def patch_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """The p x p, stride-p convolution of x (N, H, W, C) float32 with kernel (p, p, C, O), plus bias (O,)."""
  return _forward(x, kernel, bias)


def _fwd(x, kernel, bias):
  return _forward(x, kernel, bias), (x, kernel)


def _bwd(residuals, dy):
  x, kernel = residuals
  return _input_grad(dy, kernel, x.shape), _kernel_grad(x, dy, kernel.shape[0]), jnp.sum(dy, axis=(0, 1, 2))


patch_conv.defvjp(_fwd, _bwd)
