"""The benchmark CLI, and the CPU implementations of the model's layers against XLA's and flax's own.

Each pure-XLA CPU form in faer_jax.kernels (shifts, split groups, the CPU
LayerNorm) must compute the same function as the plain layer of
faer_jax.models.layers it replaces, value and gradients, up to float
summation order.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax import lax

from faer_jax import benchmark, kernels
from faer_jax.benchmark import flops
from faer_jax.kernels import modules
from faer_jax.kernels.shifts import depthwise_conv_shifts
from faer_jax.models import layers
from faer_jax.testing import assert_close


def _assert_same_function(f, g, args, seed=0):
  """f and g agree in value and in the gradient of <f(args), random cotangent> w.r.t. every arg."""
  out_f, vjp_f = jax.vjp(f, *args)
  out_g, vjp_g = jax.vjp(g, *args)
  assert_close(out_f, out_g, what="value")
  cotangent = jax.random.normal(jax.random.key(seed), out_g.shape, out_g.dtype)
  for i, (a, b) in enumerate(zip(vjp_f(cotangent), vjp_g(cotangent))):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, leaf_a), leaf_b in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
      assert_close(leaf_a, leaf_b, what=f"gradient of argument {i}{jax.tree_util.keystr(path)}")


def _normal(seed, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.key(seed), shape)


# --- Depthwise 7x7 -------------------------------------------------------------

def _grouped_conv(x, kernel, groups):
  return lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


# Odd sizes, a 3x3 kernel, and a map smaller than the kernel (CC Attention sees 7x7 at 224 px).
@pytest.mark.parametrize("shape,k", [((2, 9, 11, 24), 7), ((2, 5, 6, 8), 3), ((1, 3, 3, 4), 7)])
def test_depthwise_shifts_equal_grouped_conv(shape, k):
  x, kernel = _normal(1, shape), _normal(2, (k, k, shape[-1]), 0.1)
  _assert_same_function(jax.jit(depthwise_conv_shifts),
                        lambda x, w: _grouped_conv(x, w[:, :, None, :], shape[-1]), (x, kernel))


def test_depthwise_shift_module_equals_the_plain_one_with_gradients():
  x = _normal(1, (2, 9, 11, 24))
  variables = layers.DepthwiseConv(24).init(jax.random.key(0), x)
  variables = jax.tree_util.tree_map(lambda p: p + _normal(3, p.shape, 0.1), variables)
  _assert_same_function(jax.jit(modules.ShiftDepthwiseConv(24).apply), layers.DepthwiseConv(24).apply,
                        (variables, x))


def test_depthwise_bfloat16_kernel_gradient_accumulates_in_float32():
  x, kernel = _normal(1, (4, 28, 28, 16)), _normal(2, (7, 7, 16), 0.1)
  grad = lambda x, w: jax.grad(lambda w: jnp.sum(depthwise_conv_shifts(x, w)))(w)
  got = grad(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  assert got.dtype == jnp.bfloat16
  assert_close(got.astype(jnp.float32), grad(x, kernel), rtol=2e-2)


# --- CC Attention's grouped conv ---------------------------------------------------

def test_grouped_conv_split_equals_grouped_conv():
  plain, split = layers.GroupedConv(32, 7, groups=4), modules.SplitGroupedConv(32, 7, groups=4)
  x = _normal(1, (2, 7, 7, 32))
  variables = plain.init(jax.random.key(0), x)
  assert variables["params"]["kernel"].shape == (7, 7, 8, 32)  # nn.Conv's layout
  variables = jax.tree_util.tree_map(lambda p: p + _normal(3, p.shape, 0.05), variables)
  _assert_same_function(jax.jit(split.apply), plain.apply, (variables, x))


def test_grouped_conv_has_nn_conv_parameters():
  x = jnp.zeros((1, 7, 7, 32))
  ours = layers.GroupedConv(32, 7, groups=4).init(jax.random.key(0), x)
  theirs = nn.Conv(32, (7, 7), feature_group_count=4).init(jax.random.key(0), x)
  assert jax.tree_util.tree_map(jnp.shape, ours) == jax.tree_util.tree_map(jnp.shape, theirs)


# --- LayerNorm and GELU ---------------------------------------------------------

@pytest.mark.parametrize("norm", [layers.LayerNorm, modules.CpuLayerNorm])
@pytest.mark.parametrize("shape", [(2, 5, 7, 48), (3, 768)])
def test_layer_norm_equals_flax(shape, norm):
  x = _normal(1, shape, 3.0) + 5.0  # a mean large against the spread
  ours, theirs = norm(epsilon=1e-6), nn.LayerNorm(epsilon=1e-6, use_fast_variance=False)
  variables = theirs.init(jax.random.key(0), x)
  assert jax.tree_util.tree_map(jnp.shape, ours.init(jax.random.key(0), x)) == \
      jax.tree_util.tree_map(jnp.shape, variables)
  variables = jax.tree_util.tree_map(lambda p: p + _normal(2, p.shape, 0.1), variables)
  _assert_same_function(jax.jit(ours.apply), theirs.apply, (variables, x))


def test_gelu_equals_exact_gelu():
  x = jnp.linspace(-8.0, 8.0, 4001)
  _assert_same_function(jax.jit(layers.gelu), lambda x: nn.gelu(x, approximate=False), (x,))


# --- The CLI ---------------------------------------------------------------------

@pytest.mark.slow
def test_train_cli_runs_both_frameworks(capsys, torch):
  assert benchmark.main(["train", "--variant", "test", "--batch-size", "2", "--image-size", "32",
                         "--framework", "both", "--steps", "1", "--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  for key in ("jax_train_images_per_sec", "jax_eval_images_per_sec", "torch_train_images_per_sec",
              "torch_eval_images_per_sec", "train_speedup", "eval_speedup", "jax_train_flops",
              "jax_eval_flops", "jax_train_flops_per_sec"):
    assert result[key] > 0, key
  # CPU: no datasheet peak; the FMA throughput of XLA's threads is measured instead (by a C++
  # kernel: without the kernels, no peak and no MFU).
  if kernels.available():
    assert result["peak_flops_per_sec"] > 1e9 and result["peak_flops_source"].startswith("measured")
    assert 0 < result["jax_train_mfu"] < 1.5 and 0 < result["jax_eval_mfu"] < 1.5
  else:
    assert result["peak_flops_per_sec"] is None and result["jax_train_mfu"] is None
  # Which build of the C++ kernels ran (None where they are off).
  assert result["cpu_kernels"] == (kernels.load() if kernels.available() else None)
  # JAX ran on the CPU, so PyTorch did too (--torch-device auto), and the result says so.
  assert result["torch_device"] == "cpu" and result["torch_device_name"] is None
  assert result["torch_version"] == torch.__version__


def test_torch_runs_where_jax_runs(monkeypatch, torch):
  """--torch-device auto: the GPU only when JAX runs on one (or alone) and torch sees CUDA."""
  from faer_jax.benchmark import train
  for has_cuda, jax_platform, expected in [(True, "gpu", "cuda"), (True, "cpu", "cpu"), (True, "tpu", "cpu"),
                                           (True, None, "cuda"), (False, "gpu", "cpu"), (False, None, "cpu")]:
    monkeypatch.setattr(torch.cuda, "is_available", lambda has_cuda=has_cuda: has_cuda)
    assert train._torch_device("auto", jax_platform) == expected, (has_cuda, jax_platform)
    assert train._torch_device("cpu", jax_platform) == "cpu"
  monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
  assert train._torch_device("cuda", "cpu") == "cuda"  # asked for: a GPU torch beside a CPU JAX


def test_train_cli_refuses_a_missing_cuda_before_compiling(capsys, monkeypatch, torch):
  monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
  assert benchmark.main(["train", "--variant", "test", "--batch-size", "2", "--image-size", "32",
                         "--framework", "torch", "--torch-device", "cuda", "--steps", "1"]) == 2
  captured = capsys.readouterr()
  assert "error: --torch-device cuda: this torch sees no CUDA device" in captured.err
  assert captured.out == ""


@pytest.mark.slow
def test_train_flops_count_the_kernels_work(capsys):
  """XLA counts a C++ kernel call as zero FLOPs: the reported FLOPs must still hold every block's MLP. And the
  count comes from the program as written: XLA's native convs ('xla', as on GPUs) count as the kernels'
  pure-XLA stand-in does (XLA:CPU's compiled 'xla' training step counts 1.6x as many)."""
  from faer_jax.models import get_variant
  results = {}
  for impl in ("auto", "xla"):
    assert benchmark.main(["train", "--variant", "test", "--batch-size", "2", "--image-size", "64", "--steps", "1",
                           "--warmup", "0", "--conv-impl", impl, "--json"]) == 0
    results[impl] = json.loads(capsys.readouterr().out)
    assert results[impl]["flops_counted_in"] == "lowered program"
  result = results["auto"]
  spec = get_variant("test")
  # Two products of M x C x 4C per block (M = batch x map), 2 FLOPs per multiply-add.
  mlp = sum(depth * 2 * 2 * (2 * (64 // (4 * 2 ** i)) ** 2) * dim * 4 * dim
            for i, (depth, dim) in enumerate(zip(spec.depths, spec.dims)))
  assert mlp < result["jax_eval_flops"] < 3 * mlp
  assert 3 * mlp < result["jax_train_flops"] < 3 * 3 * mlp  # forward + two products per product backward
  for phase in ("train", "eval"):
    assert results["xla"][f"jax_{phase}_flops"] == pytest.approx(result[f"jax_{phase}_flops"], rel=0.1)


@pytest.mark.slow
def test_flops_fall_back_to_the_compiled_program(capsys, monkeypatch):
  """A backend that cannot analyse a lowered program still gets a FLOP count, and the result says whence."""
  count = flops.xla_flops
  monkeypatch.setattr(flops, "xla_flops", lambda stage: None if isinstance(stage, jax.stages.Lowered) else count(stage))
  assert benchmark.main(["train", "--variant", "test", "--batch-size", "2", "--image-size", "32", "--steps", "1",
                         "--warmup", "0", "--conv-impl", "xla", "--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["flops_counted_in"] == "compiled program"
  assert result["jax_train_flops"] > 0 and result["jax_eval_flops"] > 0


@pytest.mark.slow
def test_layers_cli_times_the_block_mlp_in_every_implementation(capsys, torch):
  assert benchmark.main(["layers", "--variant", "test", "--batch-size", "2", "--image-size", "64",
                         "--steps", "1", "--only", "mlp", "--json"]) == 0
  rows = json.loads(capsys.readouterr().out)
  seen = {(r["layer"], r["impl"], r["phase"]) for r in rows if r["seconds"] > 0}
  for stage, dim in enumerate((16, 32, 48, 64)):
    for impl in ("xla", "kernel", "torch") if kernels.available() else ("xla", "torch"):
      for phase in ("forward", "forward+backward"):
        assert (f"stage {stage} block MLP", impl, phase) in seen
  assert {tuple(r["shape"]) for r in rows} == {(2, 16, 16, 16), (2, 8, 8, 32), (2, 4, 4, 48), (2, 2, 2, 64)}


def test_input_subcommand_is_dispatched(monkeypatch):
  from faer_jax.data import input_benchmark
  seen = []
  monkeypatch.setattr(input_benchmark, "main", lambda argv: seen.append(argv) or 0)
  assert benchmark.main(["input", "--batch-size", "8"]) == 0
  assert seen == [["--batch-size", "8"]]


def test_peak_table():
  assert flops.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert flops.peak_flops("NVIDIA H200", "float32") == 67e12
  assert flops.peak_flops("TPU v5 lite", "bfloat16") == 197e12
  assert flops.peak_flops("TPU v4", "float32") == 275e12 / 6  # float32 at HIGHEST: six bfloat16 passes
  assert flops.peak_flops("TPU v5", "bfloat16") == 459e12 and flops.peak_flops("TPU v6 lite", "bfloat16") == 918e12
  assert flops.peak_flops("cpu", "float32") is None


def test_gemm_lists_the_matrix_products_of_a_compiled_program():
  from faer_jax.benchmark import gemm

  def fn(x, w, a, b):
    y = x @ w  # (12, 5) @ (5, 3)
    return y, jnp.einsum("bij,bjk->bik", a, b)  # 4 x (6, 2) @ (2, 7): counted as (24, 2) @ (2, 7)

  args = (jnp.ones((12, 5)), jnp.ones((5, 3)), jnp.ones((4, 6, 2)), jnp.ones((4, 2, 7)))
  gemms, conv_flops = gemm.products(jax.jit(fn).lower(*args).compile().as_text())
  assert gemms == {(12, 5, 3): 1, (24, 2, 7): 1}
  assert conv_flops == 0
  conv = lambda x, k: lax.conv_general_dilated(x, k, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  _, conv_flops = gemm.products(jax.jit(conv).lower(jnp.ones((2, 8, 8, 3)), jnp.ones((2, 2, 3, 5))).compile().as_text())
  assert conv_flops == 2 * (2 * 4 * 4 * 5) * (2 * 2 * 3)


@pytest.mark.parametrize("command,option,value,message", [
    ("train", "--batch-size", "0", "must be at least 1, got 0"),
    ("train", "--image-size", "16", "must be at least 32, got 16"),
    ("train", "--steps", "x", "invalid int value: 'x'"),
    ("layers", "--threads", "0", "must be at least 1, got 0"),
    ("gemm", "--image-size", "8", "must be at least 32, got 8"),
])
def test_cli_rejects_bad_sizes_naming_the_option(capsys, command, option, value, message):
  with pytest.raises(SystemExit) as exit_info:
    benchmark.main([command, "--variant", "test", option, value])
  assert exit_info.value.code == 2
  assert f"argument {option}: {message}" in capsys.readouterr().err


@pytest.mark.slow
def test_gemm_cli_times_both_frameworks(capsys, torch):
  assert benchmark.main(["gemm", "--variant", "test", "--batch-size", "2", "--image-size", "32", "--steps", "1",
                         "--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["gemm_flops"] > 0 and result["jax_gemm_seconds"] > 0 and result["torch_gemm_seconds"] > 0
  assert sum(g["count"] for g in result["gemms"]) >= 2 * 4  # at least the blocks' two pointwise convs


@pytest.mark.slow
def test_train_cli_times_your_copy_of_the_original(capsys, monkeypatch, torch):
  """--torch-model: the user's copy of the original code in place of the reference, checked to be the
  variant's size before anything compiles."""
  import os
  from faer_jax.benchmark import train
  original = os.path.join(os.path.dirname(__file__), "data", "original_faer", "faer_model.py")
  common = ["train", "--variant", "test", "--batch-size", "2", "--image-size", "32", "--steps", "1",
            "--warmup", "0", "--json"]
  assert benchmark.main([*common, "--framework", "torch", "--torch-model", f"{original}:build"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["torch_model"] == f"{original}:build"
  assert result["torch_train_images_per_sec"] > 0 and result["torch_eval_images_per_sec"] > 0
  # Another variant's size: refused, naming both counts, before the JAX step would compile.
  monkeypatch.setattr(train, "_JaxBench", lambda args: pytest.fail("compiled before checking --torch-model"))
  assert benchmark.main([*common, "--framework", "both", "--variant", "atto", "--torch-model",
                         f"{original}:build"]) == 2
  captured = capsys.readouterr()
  assert captured.err.startswith("error: the --torch-model has 169,775 parameters; FAER 'atto'") and not captured.out


def test_profile_groups_instructions_by_kernel_and_fusion_kind():
  from faer_jax.benchmark import profile
  hlo = """
  %ynn_fusion.7 = f32[784,3072]{1,0} fusion(%a, %b), kind=kCustom, calls=%c, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
  %multiply_add_fusion.2 = f32[16,7,7,768]{3,2,1,0} fusion(%x, %y), kind=kLoop, calls=%d
  %ffi_call.3 = (f32[16,56,56,96]{3,2,1,0}, f32[96]{0}) custom-call(%x, %w), custom_call_target="faer_mlp_backward"
  ROOT %dot.29 = f32[16,1]{1,0} dot(%p, %q), lhs_contracting_dims={1}, rhs_contracting_dims={0}
"""  # noqa: E501  (compiled HLO, as XLA prints it)
  assert profile.instruction_groups(hlo) == {
      "ynn_fusion.7": ("ynn_fusion", "f32[784,3072]"),
      "multiply_add_fusion.2": ("multiply_add_fusion", "f32[16,7,7,768]"),
      "ffi_call.3": ("faer_mlp_backward", "f32[16,56,56,96]"),
      "dot.29": ("dot", "f32[16,1]"),
  }


@pytest.mark.slow
def test_profile_cli_accounts_for_the_step(capsys):
  assert benchmark.main(["profile", "--variant", "test", "--batch-size", "2", "--image-size", "32", "--steps", "1",
                         "--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  groups = {row["group"] for row in result["rows"]}
  assert result["rows"] and all(row["seconds"] > 0 and row["calls"] >= 1 for row in result["rows"])
  # The operations ran within the call (the rest: dispatch and waits), and the kernels are among them.
  assert 0 < result["operations_seconds"] <= result["seconds_per_call"] * 1.05
  if kernels.available():
    assert {"faer_dw7_norm_forward", "faer_dw7_norm_backward", "faer_patch_forward"} <= groups, groups
