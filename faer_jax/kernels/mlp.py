"""The pointwise half of a ConvNeXt block as one C++ kernel (mlp.cc), with its gradient.

  mlp_residual(x, w1, b1, w2, b2, gamma, shortcut)
      = shortcut + gamma * (gelu(x @ w1 + b1) @ w2 + b2)

in float32 on the CPU, up to float summation order, GELU the exact erf form
(torch.nn.GELU()). With `mask` (one 0/1 value per example) and `keep`, the
branch is drop-path'd as timm does: multiplied by the example's mask and
divided by keep. Call `faer_jax.kernels.load()` first.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from faer_jax.kernels.partition import batch_parallel

_F32 = jnp.float32


def supported(channels: int, hidden: int) -> bool:
  return channels % 16 == 0 and hidden % 16 == 0


@functools.partial(batch_parallel, rule="n h w c, c f, f, f c, c, c, n h w c, n -> n h w c", num_static=1)
def _forward(x, w1, b1, w2, b2, gamma, shortcut, mask, keep):
  return jax.ffi.ffi_call("faer_mlp_forward", jax.ShapeDtypeStruct(x.shape, _F32))(
      x, w1, b1, w2, b2, gamma, shortcut, mask, keep=np.float32(keep))


@functools.partial(batch_parallel, rule="n h w c, c f, f, f c, c, c, n h w c, n -> n h w c, n h w f, n h w c",
                   num_static=1)
def _forward_train(x, w1, b1, w2, b2, gamma, shortcut, mask, keep):
  out = (jax.ShapeDtypeStruct(x.shape, _F32), jax.ShapeDtypeStruct(x.shape[:-1] + w1.shape[-1:], _F32),
         jax.ShapeDtypeStruct(x.shape, _F32))
  return jax.ffi.ffi_call("faer_mlp_forward_train", out)(x, w1, b1, w2, b2, gamma, shortcut, mask,
                                                         keep=np.float32(keep))



@functools.partial(batch_parallel, rule="n h w c, c f, f c, c, n h w f, n h w c, n h w c, n -> "
                   "n h w c, c f, f, f c, c, c", num_static=1, batch_sum=True)
def _backward(x, w1, w2, gamma, pre, z, dy, mask, keep):
  c, f = w1.shape
  out = (jax.ShapeDtypeStruct(x.shape, _F32), jax.ShapeDtypeStruct((c, f), _F32), jax.ShapeDtypeStruct((f,), _F32),
         jax.ShapeDtypeStruct((f, c), _F32), jax.ShapeDtypeStruct((c,), _F32), jax.ShapeDtypeStruct((c,), _F32))
  return jax.ffi.ffi_call("faer_mlp_backward", out)(x, w1, w2, gamma, pre, z, dy, mask, keep=np.float32(keep))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _mlp(x, w1, b1, w2, b2, gamma, shortcut, mask, keep):
  return _forward(x, w1, b1, w2, b2, gamma, shortcut, mask, keep)


def _mlp_fwd(x, w1, b1, w2, b2, gamma, shortcut, mask, keep):
  y, pre, z = _forward_train(x, w1, b1, w2, b2, gamma, shortcut, mask, keep)
  return y, (x, w1, w2, gamma, pre, z, mask)


def _mlp_bwd(keep, residuals, dy):
  x, w1, w2, gamma, pre, z, mask = residuals
  dx, dw1, db1, dw2, db2, dgamma = _backward(x, w1, w2, gamma, pre, z, dy, mask, keep)
  return dx, dw1, db1, dw2, db2, dgamma, dy, jnp.zeros_like(mask)


_mlp.defvjp(_mlp_fwd, _mlp_bwd)


def mlp_residual(x: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array, gamma: jax.Array,
                 shortcut: jax.Array, mask: jax.Array | None = None, keep: float = 1.0) -> jax.Array:
  """shortcut + drop_path(gamma * (gelu(x @ w1 + b1) @ w2 + b2)); x, shortcut (N, H, W, C), mask (N,)."""
  if mask is None:
    mask = jnp.ones(x.shape[:1], _F32)
  return _mlp(x, w1, b1, w2, b2, gamma, shortcut, mask.astype(_F32), float(keep))
