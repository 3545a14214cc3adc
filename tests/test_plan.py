"""The accelerator path, checked on a CPU: train steps compiled for a TPU topology (libtpu) and lowered for CUDA,
with the plain layers and no CPU kernel; `python -m faer_jax.plan`, its figures and its errors."""

import json
import re
import subprocess
import sys

import jax
import pytest

from faer_jax import chips, plan, sharding, steps, train

from conftest import REPO, load_config

# Each compiles for a TPU or lowers a whole train step: `make test-fast` leaves them out.
pytestmark = pytest.mark.slow

SMALL = {"model.variant": "test", "image_size": 64, "batch_size": 16, "eval_batch_size": 16, "data.root": "/unused"}
CPU_KERNEL = re.compile(r"^(faer_|CustomSPMDPartitioning)")


def cpu_kernels_in(program_text: str) -> list[str]:
  return [t for t in plan.custom_call_targets(program_text) if CPU_KERNEL.match(t)]


def _plan_cli(*args, env=None):
  """`python -m faer_jax.plan ARGS` in a fresh process."""
  return subprocess.run([sys.executable, "-m", "faer_jax.plan", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=600, env=env)


@pytest.fixture(scope="module")
def v5e_2x2():
  pytest.importorskip("libtpu", reason="the test extra installs libtpu (jax[tpu])")
  return plan.topology_devices("v5e:2x2")


def test_plan_compiles_the_expression_steps_for_a_tpu_topology_with_the_plain_layers(v5e_2x2):
  result = _plan_cli("--config", f"{REPO}/configs/rafdb.py:test", "--topology", "v5e:2x2", "--batch-size", "16",
                     "--image-size", "64", "--json")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout)
  assert {"topology", "chip", "num_chips", "fsdp", "global_batch_size", "dtype", "per_chip_bytes",
          "chip_memory_bytes", "fits", "flops_per_step_per_chip", "collectives", "estimated_step_seconds",
          "estimated_images_per_sec", "estimated_epoch_seconds", "compile_seconds"} <= report.keys()
  assert (report["topology"], report["chip"], report["num_chips"], report["platform"]) == ("v5e:2x2", "TPU v5e", 4,
                                                                                          "tpu")
  assert not any(CPU_KERNEL.match(name) for name in report["custom_calls"]), report["custom_calls"]
  assert report["fits"] is True and report["chip_memory_bytes"] == 16 * 2**30
  # The data-parallel gradient is summed across chips: all-reduces at least the size of the parameters.
  config = load_config("rafdb.py", **SMALL)
  params = steps.eval_variables(train.build_programs(config, sharding.create_mesh(1, v5e_2x2), 1).abstract_state)
  assert report["collective_bytes"]["all-reduce"] >= sum(a.size * 4 for a in jax.tree.leaves(params["params"]))
  b = report["per_chip_bytes"]
  assert b["parameters_and_optimizer"] < b["arguments"] and b["total"] <= b["arguments"] + b["outputs"] + \
      b["temporaries"]
  chip = chips.by_name("TPU v5e")
  step = max(report["flops_per_step_per_chip"] / chip.f32_flops,
             report["bytes_accessed_per_step_per_chip"] / chip.bandwidth)
  assert report["estimated_step_seconds"] == pytest.approx(step)
  assert report["estimated_images_per_sec"] == pytest.approx(16 / step)
  assert report["estimated_epoch_seconds"] == pytest.approx(12_271 / report["estimated_images_per_sec"])


def test_attribute_objective_compiles_for_a_tpu_topology(v5e_2x2):
  """The focal-loss step of CelebA (40 sigmoid outputs, no centers) compiles too."""
  config = load_config("celeba.py", **SMALL)
  mesh = sharding.create_mesh(1, v5e_2x2)
  programs = train.build_programs(config, mesh, 10)
  assert "centers" not in programs.abstract_state
  compiled = plan.compile_program(programs.train_step, programs.abstract_state,
                                  train.abstract_batch(config, mesh, 16))
  assert compiled.flops > 0 and not [t for t in compiled.custom_calls if CPU_KERNEL.match(t)]


def test_fsdp_over_four_chips_cuts_the_state_per_chip_by_three(v5e_2x2):
  """FAER-atto's parameters and AdamW moments, replicated or split over 4 chips (arrays under 16,384 values stay
  whole: biases and norms)."""
  per_chip = {}
  for fsdp in (1, 4):
    config = load_config("rafdb.py", **{**SMALL, "model.variant": "atto", "fsdp": fsdp})
    per_chip[fsdp] = plan.state_bytes_per_device(
        train.build_programs(config, sharding.create_mesh(fsdp, v5e_2x2), 1).abstract_state)
  assert per_chip[1] >= 3 * per_chip[4], per_chip


@pytest.mark.parametrize("topology,chips_", [("v4:2x2x2", 8), ("v5p:2x2x1", 4), ("v6e:2x2", 4), ("v5e:4x4", 16)])
def test_every_generation_gives_one_device_per_chip_and_a_mesh(v5e_2x2, topology, chips_):
  """As on a Cloud TPU VM (a v4 chip's two cores are one device): JAX builds its meshes only so."""
  devices = plan.topology_devices(topology)
  assert len(devices) == chips_ and {d.platform for d in devices} == {"tpu"}
  config = load_config("rafdb.py", **{**SMALL, "fsdp": 2})
  programs = train.build_programs(config, sharding.create_mesh(2, devices), 1)
  assert programs.model.block.__name__ == "Block"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_train_step_lowers_for_cuda_with_the_plain_layers(dtype):
  config = load_config("rafdb.py", **{**SMALL, "batch_size": 8, "model.dtype": dtype})
  mesh = sharding.create_mesh(1, jax.devices()[:2])
  programs = train.build_programs(config, mesh, 10, platform="cuda")
  exported = jax.export.export(programs.train_step, platforms=("cuda",))(
      programs.abstract_state, train.abstract_batch(config, mesh, 8))
  text = exported.mlir_module()
  assert exported.platforms == ("cuda",) and "stablehlo.convolution" in text
  assert not cpu_kernels_in(text)
  # The same step built for this CPU does run the kernels (in float32): the choice followed the target.
  cpu = train.build_programs(config, mesh, 10)
  cpu_text = cpu.train_step.lower(cpu.abstract_state, train.abstract_batch(config, mesh, 8)).as_text()
  assert bool(cpu_kernels_in(cpu_text)) == (dtype == "float32" and cpu.model.block.__name__ == "FusedBlock")


def test_a_step_that_does_not_fit_exits_1_after_its_figures(monkeypatch, capsys):
  """On this host's devices, with a chip too small for the step: --fsdp auto tries 1 and 2 devices, reports the
  last, and the exit status is 1."""
  tiny = chips.Chip("tiny", ("cpu",), 1e12, 1e12, 2**20, 1e11)
  monkeypatch.setattr(plan, "chip_of", lambda devices, topology: tiny)
  monkeypatch.setattr(jax, "devices", lambda *a: jax.local_devices()[:2])
  config = load_config("rafdb.py", **{**SMALL, "model.conv_impl": "xla"})  # the plain layers compile faster
  assert plan.run(config, None, "auto", as_json=True) == 1
  out, err = capsys.readouterr()
  report = json.loads(out)
  assert report["fits"] is False and report["fsdp"] == 2 and report["chip"] == "tiny"
  assert report["platform"] == "cpu" and report["per_chip_bytes"]["total"] > 2**20
  assert err.strip().splitlines()[-1].startswith("error: the step needs ") and "Try --fsdp auto" in err


@pytest.mark.parametrize("args,message", [
    (["--topology", "v9x:2x2"], "unknown topology 'v9x:2x2'; known generations and examples: v4:2x2x1"),
    (["--topology", "v5e:2x2", "--batch-size", "6"], "batch size 6 does not divide over the 4 devices of v5e:2x2"),
    (["--fsdp", "three"], "--fsdp 'three': expected a number of devices or 'auto'"),
])
def test_plan_cli_bad_input_is_one_line(args, message):
  result = _plan_cli("--config", f"{REPO}/configs/rafdb.py:test", *args)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == f"error: {message}" or message in result.stderr, result.stderr
  assert "Traceback" not in result.stderr and not result.stdout


def test_plan_cli_names_the_extra_that_installs_libtpu(tmp_path):
  (tmp_path / "libtpu").mkdir()
  (tmp_path / "libtpu" / "__init__.py").write_text("raise ModuleNotFoundError('No module named libtpu', "
                                                   "name='libtpu')\n")
  env = dict(__import__("os").environ, PYTHONPATH=str(tmp_path))
  result = _plan_cli("--config", f"{REPO}/configs/rafdb.py:test", "--topology", "v5e:2x2", env=env)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == ("error: --topology needs libtpu: pip install -e '.[tpu]' "
                                                    "(or pip install 'jax[tpu]')")
