"""CC Attention's 7x7 grouped convolution through the C++ kernels (grouped_conv.cc), with its gradient.

`grouped_conv7x7(x, kernel, groups)` computes what
`lax.conv_general_dilated(x, kernel, (1, 1), ((3, 3), (3, 3)),
dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)` does,
in float32 on the CPU, up to float summation order, for kernels that
`supported` accepts. Call `faer_jax.kernels.load()` first. The input gradient
is the same kernel run on the output gradient with the kernel flipped and its
channels transposed; the kernel gradient sums over each device's examples and
then across devices.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from faer_jax.kernels.partition import batch_parallel


def supported(kernel_shape: tuple[int, ...], groups: int) -> bool:
  """7x7 kernels (7, 7, I, G*O) whose per-group input and output widths are multiples of 16."""
  kh, kw, per_group_in, out = kernel_shape
  return (kh, kw) == (7, 7) and out % groups == 0 and (out // groups) % 16 == 0 and per_group_in % 16 == 0


@functools.partial(batch_parallel, rule="n h w c, i j k o -> n h w o", num_static=1)
def _forward(x, kernel, groups):
  out = jax.ShapeDtypeStruct(x.shape[:3] + (kernel.shape[-1],), jnp.float32)
  return jax.ffi.ffi_call("faer_gconv7_forward", out)(x, kernel, groups=np.int64(groups))


@functools.partial(batch_parallel, rule="n h w c, n h w o -> i j k o", num_static=1, batch_sum=True)
def _kernel_grad(x, dy, groups):
  out = jax.ShapeDtypeStruct((7, 7, x.shape[-1] // groups, dy.shape[-1]), jnp.float32)
  return jax.ffi.ffi_call("faer_gconv7_kernel_grad", out)(x, dy, groups=np.int64(groups))


def _transposed(kernel: jax.Array, groups: int) -> jax.Array:
  """The kernel of the input gradient: flipped in space, each group's (I, O) swapped to (O, I)."""
  kh, kw, per_in, out = kernel.shape
  k = kernel.reshape(kh, kw, per_in, groups, out // groups)[::-1, ::-1]
  return k.transpose(0, 1, 4, 3, 2).reshape(kh, kw, out // groups, groups * per_in)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def grouped_conv7x7(x: jax.Array, kernel: jax.Array, groups: int) -> jax.Array:
  """'Same' 7x7 convolution of x (N, H, W, G*I) float32 with kernel (7, 7, I, G*O), `groups` groups."""
  return _forward(x, kernel, groups)


def _fwd(x, kernel, groups):
  return _forward(x, kernel, groups), (x, kernel)


def _bwd(groups, residuals, dy):
  x, kernel = residuals
  return _forward(dy, _transposed(kernel, groups), groups), _kernel_grad(x, dy, groups)


grouped_conv7x7.defvjp(_fwd, _bwd)
