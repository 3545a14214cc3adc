"""The C++ patchify-convolution kernels (ConvNeXt's stem and downsampling): same function as XLA's conv."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from faer_jax.kernels import modules, patch
from faer_jax.models import create_model, layers
from faer_jax.testing import assert_close, custom_calls


# Every test here needs the kernels built and registered (or skips: tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_kernels")


def _reference(x, kernel, bias):
  p = kernel.shape[0]
  y = lax.conv_general_dilated(x, kernel, (p, p), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                               precision=lax.Precision.HIGHEST)
  return y + bias


def _inputs(n, h, w, c, p, o, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(ks[0], (n, h, w, c)), 0.1 * jax.random.normal(ks[1], (p, p, c, o)),
          jax.random.normal(ks[2], (o,)), jax.random.normal(ks[3], (n, h // p, w // p, o)))


# The stem (4x4 over 3 channels: its input gradient goes through XLA), the
# downsampling (2x2), a map that is not square, a batch that is not a power of
# two, and more patches than one task (96) or one kernel-gradient chunk (240).
@pytest.mark.parametrize("n,h,w,c,p,o", [(2, 16, 12, 3, 4, 32), (3, 8, 10, 48, 2, 64), (5, 28, 28, 32, 2, 48)])
def test_kernel_equals_convolution_value_and_gradients(n, h, w, c, p, o):
  x, kernel, bias, dy = _inputs(n, h, w, c, p, o)
  assert patch.supported(x.shape, kernel.shape)
  got_y, vjp = jax.vjp(jax.jit(patch.patch_conv), x, kernel, bias)
  want_y, want_vjp = jax.vjp(_reference, x, kernel, bias)
  assert_close(got_y, want_y, what="y")
  for name, g, w_ in zip(("dx", "dkernel", "dbias"), vjp(dy), want_vjp(dy)):
    assert_close(g, w_, what=name)


def test_unsupported_shapes():
  assert not patch.supported((1, 8, 8, 16), (2, 2, 16, 24))  # outputs not a multiple of 16
  assert not patch.supported((1, 9, 8, 16), (2, 2, 16, 32))  # height not a multiple of p
  assert not patch.supported((1, 8, 8, 16), (2, 3, 16, 32))  # not square


def test_module_uses_the_kernel_where_it_applies_and_keeps_nn_conv_parameters():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 24))
  conv = nn.Conv(32, (2, 2), strides=(2, 2), padding="VALID", kernel_init=layers.kernel_init, name="conv")
  want_params = conv.init(jax.random.key(1), x)
  for module, fused in ((modules.KernelPatchConv(32, 2), True), (layers.PatchConv(32, 2), False)):
    params = module.init(jax.random.key(1), x)
    jax.tree.map(np.testing.assert_array_equal, params, want_params)
    hlo = jax.jit(module.apply).lower(want_params, x).compile().as_text()
    assert bool(custom_calls(hlo, "faer_patch")) == fused, module
    assert_close(module.apply(want_params, x), conv.apply(want_params, x), what=type(module).__name__)
  for conv_impl, fused in (("auto", True), ("kernel", True), ("xla", False), ("shift", False)):
    assert (create_model("test", 7, conv_impl=conv_impl).patch_conv is modules.KernelPatchConv) == fused
  # Where the kernels do not apply (bfloat16, 24 outputs) the module is the plain conv.
  for module, x_ in ((modules.KernelPatchConv(32, 2, dtype=jnp.bfloat16), x), (modules.KernelPatchConv(24, 2), x)):
    params = module.init(jax.random.key(1), x_)
    assert not custom_calls(jax.jit(module.apply).lower(params, x_).compile().as_text(), "faer_patch")


def test_sharded_batch_stays_local_and_kernel_gradient_is_summed():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
  x, kernel, bias, _ = _inputs(8, 8, 8, 32, 2, 64, seed=3)
  loss = lambda conv: lambda *a: jnp.sum(jnp.sin(conv(*a)))
  step = jax.jit(jax.value_and_grad(loss(patch.patch_conv), argnums=(0, 1, 2)))
  xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
  hlo = step.lower(xs, kernel, bias).compile().as_text()
  calls = custom_calls(hlo, "faer_patch")
  assert len(calls) == 3 and all("f32[1,8,8,32]" in line or "f32[1,4,4,64]" in line for line in calls), calls
  got = step(xs, kernel, bias)
  want = jax.jit(jax.value_and_grad(loss(_reference), argnums=(0, 1, 2)))(x, kernel, bias)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert_close(g, w)


def test_under_vmap():
  x, kernel, bias, _ = _inputs(4, 8, 8, 32, 2, 32, seed=5)
  got = jax.vmap(patch.patch_conv, in_axes=(0, None, None))(x[:, None], kernel, bias)
  assert_close(got[:, 0], _reference(x, kernel, bias))
  # A batched kernel (an ensemble): one call per member.
  kernels_ = jnp.stack([kernel, 2 * kernel])
  got = jax.vmap(patch.patch_conv, in_axes=(None, 0, None))(x, kernels_, bias)
  assert_close(got[1], _reference(x, 2 * kernel, bias))
