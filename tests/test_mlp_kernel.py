"""The fused ConvNeXt MLP kernel (faer_jax.kernels.mlp): the block's function, its gradients, sharded or not."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import special

from faer_jax.kernels import mlp, modules
from faer_jax.models import create_model, layers
from faer_jax.testing import assert_close, custom_calls


# Every test here needs the kernels built and registered (or skips: tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_kernels")


def _reference(x, w1, b1, w2, b2, gamma, shortcut, mask=None, keep=1.0):
  """The block's pointwise half as the model writes it in XLA (flax Dense, erf GELU, drop path)."""
  hi = lambda a, b: jnp.dot(a, b, precision="highest")
  u = (hi(layers.gelu(hi(x, w1) + b1), w2) + b2) * gamma
  if mask is not None:
    u = u * mask[:, None, None, None] / keep
  return shortcut + u


def _inputs(shape, seed=0):
  n, h, w, c = shape
  ks = jax.random.split(jax.random.key(seed), 8)
  return (jax.random.normal(ks[0], shape), 0.2 * jax.random.normal(ks[1], (c, 4 * c)),
          0.5 * jax.random.normal(ks[2], (4 * c,)), 0.2 * jax.random.normal(ks[3], (4 * c, c)),
          0.5 * jax.random.normal(ks[4], (c,)), jax.random.normal(ks[5], (c,)), jax.random.normal(ks[6], shape))


# Rows (N*H*W) that are not multiples of the 12-row register tile or of the
# 240-row super-tile; widths of one, two and six 16-wide vectors (48: a last
# 32-column panel half full); enough rows for several super-tiles.
@pytest.mark.parametrize("shape", [(1, 1, 1, 16), (3, 5, 7, 48), (2, 13, 11, 32), (4, 14, 14, 96)])
@pytest.mark.parametrize("keep", [1.0, 0.6])
def test_value_and_gradients_equal_xla(shape, keep):
  args = _inputs(shape, seed=sum(shape))
  mask = jnp.asarray(np.arange(shape[0]) % 2 == 0, jnp.float32) if keep != 1.0 else None
  cotangent = jax.random.normal(jax.random.key(9), shape)
  run = lambda fn: jax.vjp(lambda *a: fn(*a, mask, keep) if mask is not None else fn(*a), *args)
  y, vjp = jax.jit(lambda: run(mlp.mlp_residual))()
  want_y, want_vjp = run(_reference)
  assert_close(y, want_y, what="value")
  got, want = jax.jit(vjp)(cotangent), want_vjp(cotangent)
  for name, g, w in zip(("x", "w1", "b1", "w2", "b2", "gamma", "shortcut"), got, want):
    assert_close(g, w, what=name)


def test_gelu_and_its_derivative_match_the_exact_functions():
  """Wired so the kernel's output is GELU of the input: its erf and exp, checked in float64 over [-12, 12].

  Up to the float32 rounding of torch's formula x * 0.5 * (1 + erf(x / sqrt 2)) itself: where erf is near
  -1, 1 + erf keeps only ~1 ulp of 1 (6e-8), times x/2.
  """
  c = 16
  x = jnp.linspace(-12.0, 12.0, 64 * 9 * c, dtype=jnp.float32).reshape(64, 9, 1, c)
  w1 = jnp.zeros((c, 4 * c)).at[jnp.arange(c), jnp.arange(c)].set(1.0)  # hidden j = x_j for j < c
  w2 = jnp.zeros((4 * c, c)).at[jnp.arange(c), jnp.arange(c)].set(1.0)  # y_j = hidden j
  zeros = lambda n: jnp.zeros((n,))
  f = lambda x: mlp.mlp_residual(x, w1, zeros(4 * c), w2, zeros(c), jnp.ones((c,)), jnp.zeros_like(x))
  y, vjp = jax.vjp(f, x)
  (dx,) = vjp(jnp.ones_like(x))
  xd = np.asarray(x, np.float64)
  exact = 0.5 * xd * (1 + special.erf(xd / np.sqrt(2)))
  exact_grad = 0.5 * (1 + special.erf(xd / np.sqrt(2))) + xd * np.exp(-xd * xd / 2) / np.sqrt(2 * np.pi)
  formula = 2.0 ** -23 * np.abs(xd) + 1e-7  # the formula's own rounding, see above
  assert np.all(np.abs(np.asarray(y) - exact) <= 2e-6 * np.abs(exact) + formula)
  assert np.all(np.abs(np.asarray(dx) - exact_grad) <= 2e-6 * np.abs(exact_grad) + 2e-7)


def test_block_runs_the_fused_kernel_with_the_same_drop_path_masks():
  """Training with drop path: the fused block and the XLA block agree, dropped examples included."""
  x = jax.random.normal(jax.random.key(0), (8, 6, 6, 32))
  fused, plain = modules.FusedBlock(32, drop_path=0.5), modules.ShiftBlock(32, drop_path=0.5)
  variables = fused.init(jax.random.key(1), x)
  variables = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(2), p.shape), variables)
  apply = lambda block: lambda v, x: block.apply(v, x, train=True, rngs={"dropout": jax.random.key(3)})
  assert "faer_mlp_forward" in jax.jit(apply(fused)).lower(variables, x).as_text()
  assert "faer_mlp" not in jax.jit(apply(plain)).lower(variables, x).as_text()
  y = jax.jit(apply(fused))(variables, x)
  want = apply(plain)(variables, x)
  assert_close(y, want)
  branch = np.abs(np.asarray(want - x)).reshape(8, -1).max(axis=1)
  assert 0 < np.sum(branch == 0) < 8  # some examples dropped, some kept: the masks were compared
  loss = lambda block: lambda v: jnp.sum(jnp.sin(apply(block)(v, x)))
  got, want = jax.jit(jax.grad(loss(fused)))(variables), jax.grad(loss(plain))(variables)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    assert_close(a, b, what=jax.tree_util.keystr(path))


def test_wide_blocks_keep_xla_matmuls():
  """The MLP kernel runs in blocks up to FUSED_MLP_MAX_WIDTH channels that are multiples of 16, in float32
  CPU programs that use the kernels."""
  lowered = lambda block, width: jax.jit(block.apply).lower(
      jax.eval_shape(block.init, jax.random.key(0), jnp.ones((1, 2, 2, width))), jnp.ones((1, 2, 2, width))).as_text()
  assert "faer_mlp" in lowered(modules.FusedBlock(96), 96)
  assert "faer_mlp" not in lowered(modules.FusedBlock(modules.FUSED_MLP_MAX_WIDTH + 128),
                                   modules.FUSED_MLP_MAX_WIDTH + 128)
  assert "faer_mlp" not in lowered(modules.FusedBlock(40), 40)  # 40 % 16 != 0
  assert create_model("test", 7).block is modules.FusedBlock
  for kwargs in ({"conv_impl": "shift"}, {"dtype": jnp.bfloat16}, {"conv_impl": "xla"}):
    assert create_model("test", 7, **kwargs).block is not modules.FusedBlock, kwargs


def test_sharded_batch_stays_local_and_weight_gradients_are_summed():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
  args = _inputs((8, 5, 6, 32), seed=4)
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))
  step = jax.jit(jax.value_and_grad(loss(mlp.mlp_residual), argnums=tuple(range(7))))
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  sharded = [jax.device_put(a, batch) if a.ndim == 4 else a for a in args]
  hlo = step.lower(*sharded).compile().as_text()
  calls = custom_calls(hlo, "faer_mlp")
  assert len(calls) == 2 and all("f32[1,5,6,32]" in line for line in calls), calls
  got = step(*sharded)
  want = jax.jit(jax.value_and_grad(loss(_reference), argnums=tuple(range(7))))(*args)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert_close(g, w)


def test_gradients_do_not_depend_on_the_thread_count():
  """Bit-identical weight gradients on one core and on two: the sums' order is fixed by the shapes."""
  code = """
      import os, sys
      os.sched_setaffinity(0, set(range(int(sys.argv[1]))))
      import jax, jax.numpy as jnp, numpy as np
      from faer_jax import kernels
      from faer_jax.kernels import mlp
      kernels.load()
      ks = jax.random.split(jax.random.key(0), 7)
      x, s = jax.random.normal(ks[0], (2, 23, 23, 64)), jax.random.normal(ks[1], (2, 23, 23, 64))
      w1, w2 = jax.random.normal(ks[2], (64, 256)), jax.random.normal(ks[3], (256, 64))
      b1, b2, g = jax.random.normal(ks[4], (256,)), jax.random.normal(ks[5], (64,)), jax.random.normal(ks[6], (64,))
      grads = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(mlp.mlp_residual(*a))), argnums=tuple(range(7))))(
          x, w1, b1, w2, b2, g, s)
      np.savez(sys.argv[2], *grads)
  """
  if len(os.sched_getaffinity(0)) < 2:
    pytest.skip("needs two CPUs")
  results = []
  for cpus in (1, 2):
    path = f"{os.environ.get('TMPDIR', '/tmp')}/mlp_grads_{os.getpid()}_{cpus}.npz"
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(cpus), path], capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    with np.load(path) as data:
      results.append([data[k] for k in sorted(data.files)])
    os.unlink(path)
  for a, b in zip(*results):
    np.testing.assert_array_equal(a, b)
