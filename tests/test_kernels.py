"""The C++ depthwise-conv kernels (faer_jax.kernels): same function as XLA's convolution, sharded or not."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from faer_jax import kernels
from faer_jax.interop import init_variables
from faer_jax.kernels import depthwise, grouped, modules
from faer_jax.models import create_model, layers
from faer_jax.models.convnext import Block
from faer_jax.testing import assert_close, custom_calls


def _reference(x, kernel):
  return lax.conv_general_dilated(x, kernel[:, :, None, :], (1, 1), ((3, 3), (3, 3)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def _value_and_grads(conv, x, kernel, cotangent):
  y, vjp = jax.vjp(conv, x, kernel)
  return (y, *vjp(cotangent))


# Every test here needs the kernels built and registered (or skips: tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_kernels")


# Channels that are and are not multiples of the 16-wide (AVX2: 8-wide) vectors; maps smaller
# than the kernel (every tap a border case) and wide enough for interior tiles;
# rows of 37 pixels take three register tiles with AVX-512 (16, 16 and 5 pixels), five with AVX2.
@pytest.mark.parametrize("shape", [(2, 9, 11, 40), (3, 5, 4, 16), (1, 1, 1, 5), (2, 2, 3, 33), (1, 14, 13, 96),
                                   (1, 4, 37, 32)])
def test_kernel_equals_grouped_convolution_value_and_gradients(shape):
  ks = jax.random.split(jax.random.key(sum(shape)), 3)
  x, kernel = jax.random.normal(ks[0], shape), jax.random.normal(ks[1], (7, 7, shape[-1]))
  cotangent = jax.random.normal(ks[2], shape)
  got = jax.jit(lambda *a: _value_and_grads(depthwise.depthwise_conv7x7, *a))(x, kernel, cotangent)
  want = _value_and_grads(_reference, x, kernel, cotangent)
  for g, w, what in zip(got, want, ("value", "input gradient", "kernel gradient")):
    assert_close(g, w, what=what)


def _conv_then_norm(x, kernel, bias, scale, shift, eps=1e-6):
  """The reference: XLA's depthwise conv, then torch's LayerNorm formula."""
  y = _reference(x, kernel) + bias
  mean = jnp.mean(y, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(y - mean), axis=-1, keepdims=True)
  return (y - mean) / jnp.sqrt(var + eps) * scale + shift


@pytest.mark.parametrize("shape", [(2, 9, 11, 40), (1, 1, 1, 5), (3, 7, 7, 96)])
def test_fused_conv_norm_kernel_equals_conv_then_layer_norm(shape):
  ks = jax.random.split(jax.random.key(len(shape) + shape[-1]), 6)
  c = shape[-1]
  args = (jax.random.normal(ks[0], shape), jax.random.normal(ks[1], (7, 7, c)),
          jax.random.normal(ks[2], (c,)), 1 + 0.1 * jax.random.normal(ks[3], (c,)), jax.random.normal(ks[4], (c,)))
  cotangent = jax.random.normal(ks[5], shape)
  fused = lambda *a: depthwise.depthwise_conv7x7_norm(*a, 1e-6)
  got_y, got_vjp = jax.vjp(jax.jit(fused), *args)
  want_y, want_vjp = jax.vjp(_conv_then_norm, *args)
  assert_close(got_y, want_y, what="value")
  for i, (g, w) in enumerate(zip(got_vjp(cotangent), want_vjp(cotangent))):
    assert_close(g, w, what=f"gradient of argument {i}")


def test_fused_block_has_the_blocks_parameters_and_function():
  """FusedBlock runs the ConvNeXt block's conv + norm as one kernel call, with Block's parameters, initialised
  to the same values."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 32))
  variables = modules.FusedBlock(32).init(jax.random.key(1), x)
  jax.tree.map(np.testing.assert_array_equal, variables, Block(32).init(jax.random.key(1), x))
  assert set(variables["params"]) == {"dwconv", "norm", "pwconv1", "pwconv2", "gamma"}
  hlo = jax.jit(modules.FusedBlock(32).apply).lower(variables, x).as_text()
  assert "faer_dw7_norm_forward" in hlo and "faer_dw7_forward" not in hlo
  variables = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), variables)
  assert_close(jax.jit(modules.FusedBlock(32).apply)(variables, x), Block(32).apply(variables, x))


def test_kernel_result_does_not_depend_on_other_examples():
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 32))
  kernel = jax.random.normal(jax.random.key(1), (7, 7, 32))
  whole = jax.jit(depthwise.depthwise_conv7x7)(x, kernel)
  one = jax.jit(depthwise.depthwise_conv7x7)(x[2:3], kernel)
  np.testing.assert_array_equal(whole[2:3], one)  # bit-identical: the sums' order is per pixel


def test_depthwise_modules_match_the_plain_one():
  x = jax.random.normal(jax.random.key(1), (2, 9, 11, 24))
  variables = layers.DepthwiseConv(24).init(jax.random.key(0), x)
  variables = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(3), p.shape), variables)
  apply = lambda module: jax.jit(lambda v, x: module(24).apply(v, x))
  assert "faer_dw7_forward" in apply(modules.KernelDepthwiseConv).lower(variables, x).as_text()
  for module in (modules.KernelDepthwiseConv, modules.ShiftDepthwiseConv):
    assert_close(apply(module)(variables, x), apply(layers.DepthwiseConv)(variables, x))


def test_bfloat16_runs_the_pure_xla_cpu_forms_and_explicit_kernel_refuses():
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  model = create_model("test", 7, dtype=jnp.bfloat16)
  assert model.block is modules.ShiftBlock
  program = jax.jit(model.apply).lower(jax.eval_shape(model.init, jax.random.key(0), images), images).as_text()
  assert "faer_" not in program
  with pytest.raises(ValueError, match="'kernel' needs float32"):
    create_model("test", 7, dtype=jnp.bfloat16, conv_impl="kernel")


def test_sharded_batch_stays_local():
  """Under a data x fsdp mesh, each device convolves its own examples: no activation is gathered."""
  devices = np.array(jax.devices()[:8]).reshape(4, 2)
  mesh = Mesh(devices, ("data", "fsdp"))
  x = jax.random.normal(jax.random.key(0), (8, 9, 11, 40))
  kernel = jax.random.normal(jax.random.key(1), (7, 7, 40))
  loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k)))
  step = jax.jit(jax.value_and_grad(loss(depthwise.depthwise_conv7x7), argnums=(0, 1)))
  xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
  ks = jax.device_put(kernel, NamedSharding(mesh, P(None, None, "fsdp")))
  hlo = step.lower(xs, ks).compile().as_text()
  calls = custom_calls(hlo, "faer_dw7")
  assert len(calls) == 3 and all("f32[1,9,11,40]" in line for line in calls), calls
  got = step(xs, ks)
  want = jax.jit(jax.value_and_grad(loss(_reference), argnums=(0, 1)))(x, kernel)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert_close(g, w)

  # The fused conv + norm: its per-row partial sums are reduced across devices by XLA.
  norm_params = (jnp.zeros(40), jnp.ones(40), jnp.zeros(40))
  fused = lambda x, k, *p: depthwise.depthwise_conv7x7_norm(x, k, *p, 1e-6)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  step = jax.jit(jax.value_and_grad(loss(fused), argnums=(0, 1, 2, 3, 4)))
  hlo = step.lower(xs, ks, *norm_params).compile().as_text()
  calls = custom_calls(hlo, "faer_dw7")
  assert len(calls) == 4 and all("f32[1,9,11,40]" in line for line in calls), calls
  got = step(xs, ks, *norm_params)
  want = jax.jit(jax.value_and_grad(loss(_conv_then_norm), argnums=(0, 1, 2, 3, 4)))(x, kernel, *norm_params)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert_close(g, w)


def test_model_gradients_match_xla_impl():
  model = lambda impl: create_model("test", 7, conv_impl=impl)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  params = init_variables(model("xla"), seed=1)["params"]

  def loss(impl):
    return jax.jit(jax.value_and_grad(lambda p: jnp.sum(model(impl).apply({"params": p}, images)[1] ** 2)))

  (lk, gk), (lx, gx) = loss("kernel")(params), loss("xla")(params)
  assert_close(lk, lx, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gk), jax.tree.leaves(gx)):
    assert_close(a, b, rtol=1e-4, what=jax.tree_util.keystr(path))


@pytest.mark.parametrize("impl", ["xla", "shift"])
def test_pure_xla_impls_reach_every_layer(impl):
  """conv_impl 'xla' and 'shift' run no C++ kernel anywhere, CC Attention's conv included."""
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)

  def program(impl):
    model = create_model("test", 7, conv_impl=impl)
    return jax.jit(model.apply).lower(jax.eval_shape(model.init, jax.random.key(0), images), images).as_text()

  assert "faer_gconv7" in program("kernel")
  assert "faer_" not in program(impl)


# --- CC Attention's grouped conv ------------------------------------------------------

def _grouped_reference(x, kernel, groups):
  return lax.conv_general_dilated(x, kernel, (1, 1), ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=groups)


# CC Attention's 7x7 map and smaller ones (the demo's 2x2), odd batches and shapes,
# 16- and 32-wide output blocks, one group; 112 input channels a group: the kernel
# gradient's two blocks of 48 channels and a block of 16.
@pytest.mark.parametrize("shape,groups,out", [((2, 7, 7, 64), 4, 64), ((5, 5, 4, 32), 2, 96),
                                              ((1, 1, 1, 16), 1, 16), ((3, 9, 6, 128), 4, 128),
                                              ((2, 2, 2, 64), 4, 64), ((2, 5, 6, 224), 2, 96)])
def test_grouped_kernel_equals_grouped_convolution(shape, groups, out):
  ks = jax.random.split(jax.random.key(shape[0] * out), 3)
  x = jax.random.normal(ks[0], shape)
  kernel = jax.random.normal(ks[1], (7, 7, shape[-1] // groups, out))
  cotangent = jax.random.normal(ks[2], shape[:3] + (out,))
  got = jax.jit(lambda *a: _value_and_grads(lambda x, k: grouped.grouped_conv7x7(x, k, groups), *a))(
      x, kernel, cotangent)
  want = _value_and_grads(lambda x, k: _grouped_reference(x, k, groups), x, kernel, cotangent)
  for g, w, what in zip(got, want, ("value", "input gradient", "kernel gradient")):
    assert_close(g, w, what=what)


def test_grouped_conv_modules_pick_the_kernel_where_it_applies():
  x = jax.random.normal(jax.random.key(0), (2, 7, 7, 64))
  variables = layers.GroupedConv(64, 7, groups=4).init(jax.random.key(1), x)
  lowered = lambda m, v: jax.jit(m.apply).lower(v, x).as_text()
  kernel, split = modules.KernelGroupedConv(64, 7, groups=4), modules.SplitGroupedConv(64, 7, groups=4)
  assert "faer_gconv7_forward" in lowered(kernel, variables)
  for module in (kernel, split):
    assert_close(jax.jit(module.apply)(variables, x), layers.GroupedConv(64, 7, groups=4).apply(variables, x))
  # 8 output channels per group is not a multiple of 16: four dense convs instead.
  narrow = modules.KernelGroupedConv(32, 7, groups=4)
  assert "faer_gconv7" not in lowered(narrow, narrow.init(jax.random.key(1), x))


def test_grouped_kernel_gradient_is_summed_across_devices():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
  x = jax.random.normal(jax.random.key(0), (8, 7, 7, 64))
  kernel = jax.random.normal(jax.random.key(1), (7, 7, 16, 64))
  loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k, 4)))
  step = jax.jit(jax.value_and_grad(loss(grouped.grouped_conv7x7), argnums=(0, 1)))
  xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
  ks = jax.device_put(kernel, NamedSharding(mesh, P(None, None, None, "fsdp")))
  hlo = step.lower(xs, ks).compile().as_text()
  calls = custom_calls(hlo, "faer_gconv7")
  assert len(calls) == 3 and all("f32[1,7,7,64]" in line for line in calls), calls
  got = step(xs, ks)
  want = jax.jit(jax.value_and_grad(loss(_grouped_reference), argnums=(0, 1)))(x, kernel)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert_close(g, w)


def _python(code: str, **env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                        env={**os.environ, **env}, timeout=300, check=False)


def test_without_the_kernels_the_model_uses_shifts(tmp_path):
  code = """
      import jax, jax.numpy as jnp
      from faer_jax import kernels
      from faer_jax.models import create_model
      x = jnp.ones((1, 32, 32, 3))
      m = create_model("test", 7)
      v = jax.eval_shape(m.init, jax.random.key(0), x)
      print(kernels.available(), "faer_" in jax.jit(m.apply).lower(v, x).as_text(), m.block.__name__)
  """
  disabled = _python(code, FAER_JAX_CPU_KERNELS="0")
  assert disabled.returncode == 0, disabled.stderr
  assert disabled.stdout.split() == ["False", "False", "ShiftBlock"]
  assert "FAER_JAX_CPU_KERNELS=0" in disabled.stderr
  # A compiler that fails: the error names the source and the command, and nothing is cached.
  broken = _python(code, CXX="false", FAER_JAX_KERNEL_CACHE=str(tmp_path))
  assert broken.returncode == 0, broken.stderr
  assert broken.stdout.split() == ["False", "False", "ShiftBlock"]
  assert "depthwise_conv.cc, grouped_conv.cc, mlp.cc, patch_conv.cc, peak.cc failed" in broken.stderr
  assert [p.suffix for p in tmp_path.iterdir()] == [".lock"]  # no library, no objects left behind


def test_the_build_follows_the_cpu_and_the_switch(monkeypatch):
  # The CPU's flags come from /proc/cpuinfo's flags line (or the platform's name elsewhere).
  cpu = lambda line: monkeypatch.setattr(kernels, "_cpu_flags", lambda: line)
  monkeypatch.delenv("FAER_JAX_CPU_KERNELS", raising=False)
  cpu("flags\t\t: fpu avx2 fma avx512f avx512bw")
  assert kernels.cpu_isa() == "avx512" and kernels._choice() == ("avx512", ())
  monkeypatch.setenv("FAER_JAX_CPU_KERNELS", "avx2")
  assert kernels._choice() == ("avx2", ("-mno-avx512f",))
  cpu("flags\t\t: fpu sse2 avx avx2 fma")
  assert kernels.cpu_isa() == "avx2" and kernels._choice() == ("avx2", ())
  monkeypatch.setenv("FAER_JAX_CPU_KERNELS", "wide")  # 16-float vectors without AVX-512
  assert kernels._choice() == ("wide", ("-mno-avx512f", "-DFAER_JAX_WIDE_VECTORS"))
  monkeypatch.setenv("FAER_JAX_CPU_KERNELS", "1")
  assert kernels._choice() == ("avx2", ())
  for other in ("flags\t\t: fpu sse2 avx avx2", "aarch64"):  # AVX2 without FMA; not x86
    cpu(other)
    assert kernels.cpu_isa() is None
    with pytest.raises(kernels.KernelUnavailable, match="neither AVX-512F nor AVX2 with FMA.*=force"):
      kernels.load.__wrapped__()
  monkeypatch.setenv("FAER_JAX_CPU_KERNELS", "force")
  assert kernels._choice() == ("native", ())
  # Forced, the ISA is not checked: the next reason to refuse (here, the compiler) comes through.
  monkeypatch.setattr(kernels, "_compiler", lambda: (_ for _ in ()).throw(kernels.KernelUnavailable("no compiler")))
  with pytest.raises(kernels.KernelUnavailable, match="no compiler"):
    kernels.load.__wrapped__()
  monkeypatch.setenv("FAER_JAX_CPU_KERNELS", "yes")
  with pytest.raises(ValueError, match="FAER_JAX_CPU_KERNELS='yes': expected one of 1, 0, avx2, wide, force"):
    kernels.load.__wrapped__()


def test_loaded_build_is_the_one_asked_for():
  asked = os.environ.get("FAER_JAX_CPU_KERNELS", "1")
  assert kernels.load() == {"avx2": "avx2", "wide": "wide", "force": "native"}.get(asked, kernels.cpu_isa())


_OTHER_WIDTH = {"avx512": "avx2", "avx2": "wide"}.get(kernels.cpu_isa())


@pytest.mark.slow
@pytest.mark.skipif(_OTHER_WIDTH is None, reason="no kernel build for this CPU")
def test_the_other_vector_width_computes_the_same_functions():
  """The kernels' value and gradient tests, again with the other vector width's code.

  On an AVX-512 CPU: the AVX2 build (8-float vectors, 6 x 16 tiles). On an AVX2 CPU: the
  AVX-512 build's 16-float vectors and 12 x 32 tiles, each vector op run as two
  (FAER_JAX_CPU_KERNELS=wide). That one costs ~3 minutes of the suite on two Zen 1 (AVX2) cores
  (its mlp.cc alone compiles for 73 s), so it runs only with FAER_JAX_TEST_WIDE=1: set it to test a
  change to the kernels' tiles on a machine without AVX-512.
  """
  if _OTHER_WIDTH == "wide" and os.environ.get("FAER_JAX_TEST_WIDE") != "1":
    pytest.skip("the 16-float build on this AVX2 CPU takes minutes: FAER_JAX_TEST_WIDE=1 runs it")
  tests = [os.path.join(os.path.dirname(__file__), f) for f in
           ("test_kernels.py", "test_mlp_kernel.py", "test_patch_kernel.py")]
  selection = "equal or equals or match or thread_count or asked_for"
  result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           *tests, "-k", selection], capture_output=True, text=True, timeout=900, check=False,
                          env={**os.environ, "FAER_JAX_CPU_KERNELS": _OTHER_WIDTH})
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
  summary = result.stdout.strip().splitlines()[-1]
  assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
  assert int(summary.split(" passed")[0].split()[-1]) >= 20, summary


@pytest.mark.slow
def test_build_is_cached_and_keyed(tmp_path):
  """Two processes that start at once build the library once; a third loads it without compiling."""
  log = tmp_path / "compiler.log"
  cxx = tmp_path / "cxx"  # the real compiler, every call logged
  cxx.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {kernels._compiler()} "$@"\n')
  cxx.chmod(0o755)
  cache = tmp_path / "cache"
  code = """
      from faer_jax import kernels
      kernels.load()
      print(*sorted(p.name for p in kernels.cache_dir().iterdir()))
  """
  env = {**os.environ, "FAER_JAX_KERNEL_CACHE": str(cache), "CXX": str(cxx)}
  both = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
  outs = [p.communicate(timeout=300) for p in both]
  assert [p.returncode for p in both] == [0, 0], [err[-2000:] for _, err in outs]
  libraries = sorted(p.name for p in cache.glob("*.so"))
  assert len(libraries) == 1 and libraries[0].startswith("faer_kernels_")
  assert sorted(p.name for p in cache.iterdir()) == [libraries[0][:-3] + ".lock", libraries[0]]
  assert outs[0][0].split() == outs[1][0].split()
  compiles = [line for line in log.read_text().splitlines() if " -c " in line]
  assert sorted(line.split(" -c ")[1].split()[0].rsplit("/", 1)[-1] for line in compiles) == [
      f.name for f in sorted(kernels._SOURCES)]  # each source compiled once
  mtime = (cache / libraries[0]).stat().st_mtime_ns
  third = _python(code, FAER_JAX_KERNEL_CACHE=str(cache), CXX=str(cxx))
  assert third.returncode == 0, third.stderr
  assert (cache / libraries[0]).stat().st_mtime_ns == mtime  # loaded, not rebuilt
  assert len([line for line in log.read_text().splitlines() if " -c " in line]) == len(compiles)


def test_unwritable_cache_falls_back(tmp_path):
  blocked = tmp_path / "file"
  blocked.write_text("not a directory")
  code = """
      from faer_jax import kernels
      print(kernels.available())
  """
  result = _python(code, FAER_JAX_KERNEL_CACHE=str(blocked / "kernels"))
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["False"]
  assert "cache:" in result.stderr


def test_model_under_vmap_matches_xla():
  """vmap over batches, per-example gradients and an ensemble of parameters all map through the kernels."""
  # Both sides compiled (the XLA reference run op by op would take 2.4x as long).
  kernel_model, xla_model = create_model("test", 7, conv_impl="kernel"), create_model("test", 7, conv_impl="xla")
  x = jax.random.normal(jax.random.key(1), (3, 2, 32, 32, 3))
  params = init_variables(kernel_model)["params"]
  apply = lambda m, p, x: m.apply({"params": p}, x)[1]

  batches = lambda m: jax.vmap(lambda x: apply(m, params, x))(x)
  assert_close(jax.jit(lambda: batches(kernel_model))(), jax.jit(lambda: batches(xla_model))(), rtol=1e-5)

  per_example = lambda m: jax.vmap(jax.grad(lambda p, xi: apply(m, p, xi[None]).sum()), in_axes=(None, 0))(
      params, x[0])
  got, want = jax.jit(lambda: per_example(kernel_model))(), jax.jit(lambda: per_example(xla_model))()
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    assert_close(a, b, rtol=1e-4, what=jax.tree_util.keystr(path))

  ensemble = jax.tree.map(lambda p: jnp.stack([p, 1.1 * p]), params)
  members = lambda m: jax.vmap(lambda p: apply(m, p, x[0]))(ensemble)
  assert_close(jax.jit(lambda: members(kernel_model))(), jax.jit(lambda: members(xla_model))(), rtol=1e-5)
