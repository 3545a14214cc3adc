r"""Plan a run before renting the hardware: the train and eval steps compiled for a TPU topology (or this host).

  python -m faer_jax.plan --config configs/rafdb.py --topology v5e:2x2 [--fsdp N|auto] \
      [--batch-size 256] [--dtype bfloat16|float32] [--image-size 224] [--json] [--config.KEY=VALUE ...]

Compiles the very steps `python -m faer_jax.train` runs (train.build_programs:
the same functions, state and batch shardings) for the devices of a TPU
topology, through libtpu, on a machine without a TPU (`pip install -e '.[tpu]'`);
without --topology, for this host's devices. Reports per chip: the parameter and
optimizer bytes, the compiled programs' arguments, temporaries and outputs
against the chip's memory; the FLOPs and collectives of a step; a roofline
estimate of the step time (the larger of FLOPs / peak FLOP/s and bytes accessed /
memory bandwidth) with the images/s and epoch time it implies for the config's
dataset; and the compile time. `--fsdp auto` takes the smallest FSDP size whose
training step fits. Exit status 1 when it does not fit, 2 on bad input.

The estimate is a bound: real steps also wait on collectives and input, and
XLA keeps some memory for itself.
"""

import dataclasses
import json
import math
import os
import re
import sys
import time

from absl import app, flags
import jax
from jax.experimental.compilation_cache import compilation_cache as persistent_cache
from ml_collections import config_flags

from faer_jax import chips, config_lib, sharding, steps, train

FLAGS = flags.FLAGS

# Training images of each dataset (the paper's splits).
DATASET_SIZES = {"rafdb": 12_271, "affectnet7": 283_901, "affectnet8": 287_651, "celeba": 162_770}
# TPU generations libtpu compiles for, and topologies of each (any shape the generation has works).
TOPOLOGY_EXAMPLES = ("v4:2x2x1", "v4:2x2x2", "v4:4x4x4", "v5e:1x1", "v5e:2x2", "v5e:2x4", "v5e:4x4",
                     "v5e:16x16", "v5p:2x2x1", "v5p:4x4x4", "v6e:1x1", "v6e:2x2", "v6e:4x4", "v6e:16x16")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


class PlanError(ValueError):
  """Bad input to the plan: its message is the one line printed."""


def topology_devices(name: str):
  """The devices of a TPU topology ('v5e:2x2'), from libtpu, on a machine without a TPU."""
  generation = name.split(":")[0]
  if generation not in {e.split(":")[0] for e in TOPOLOGY_EXAMPLES} or ":" not in name:
    raise PlanError(f"unknown topology {name!r}; known generations and examples: {', '.join(TOPOLOGY_EXAMPLES)}")
  try:
    import libtpu  # noqa: F401  (only whether it is there)
  except ImportError:
    raise PlanError("--topology needs libtpu: pip install -e '.[tpu]' (or pip install 'jax[tpu]')") from None
  # libtpu lets one process at a time load it, which a process that only compiles need not claim.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  # A v4 chip's two TensorCores run as one device ("megacore"), as on a Cloud TPU VM; JAX's meshes need that.
  options = {"chip_config_name": "megacore"} if generation == "v4" else {}
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=name, **options).devices
  except Exception as e:  # noqa: BLE001  # libtpu's own error types
    raise PlanError(f"libtpu cannot make topology {name!r} ({str(e).splitlines()[0][:200]}); "
                    f"examples: {', '.join(TOPOLOGY_EXAMPLES)}") from None


def chip_of(devices, topology: str | None) -> chips.Chip | None:
  if topology:
    prefix = topology.split(":")[0]
    return next((c for c in chips.CHIPS if c.topology_prefix == prefix), None)
  return chips.from_device_kind(devices[0].device_kind)


def dataset_size(config) -> int | None:
  if config.data.dataset == "affectnet":
    return DATASET_SIZES[f"affectnet{config.data.affectnet_num_classes}"]
  return DATASET_SIZES.get(config.data.dataset)


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """kind -> {'count', 'bytes'} of a compiled program's collectives; bytes: the size of their results.

  Asynchronous pairs (`all-gather-start` / `-done`) count once, by their start.
  """
  out = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
  pattern = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
  for line in hlo_text.splitlines():
    match = pattern.search(line)
    if not match or not line.lstrip().startswith(("%", "ROOT")):
      continue
    result_type, kind, start = match.groups()
    shapes = re.findall(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]", result_type)
    if start:  # the start's result holds the operands and then the results
      shapes = shapes[len(shapes) // 2:]
    out[kind]["count"] += 1
    out[kind]["bytes"] += sum(_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in shapes)
  return {kind: value for kind, value in out.items() if value["count"]}


def custom_call_targets(program_text: str) -> list[str]:
  """The custom-call targets of a program's text: compiled HLO (`custom_call_target="..."`) or StableHLO
  (`stablehlo.custom_call @...`). A CPU kernel (faer_*, or CustomSPMDPartitioning around one) has no place in a
  GPU or TPU program."""
  return sorted(set(re.findall(r'custom_call_target="([^"]+)"', program_text))
                | set(re.findall(r"custom_call @([\w.]+)", program_text)))


@dataclasses.dataclass
class Compiled:
  seconds: float
  memory: object
  flops: float
  bytes_accessed: float
  collectives: dict
  custom_calls: list[str]  # the program's custom-call targets (no CPU kernel has a place on an accelerator)


def compile_program(jitted, *args) -> Compiled:
  """Compiles a jitted step for its arguments' devices: time, memory, FLOPs, bytes, collectives, custom calls."""
  lowered = jitted.lower(*args)
  # A program for a topology this process has no client for cannot be read back from JAX's persistent
  # compilation cache (and would only fill it): compile it without the cache. JAX decides once per
  # process whether to use the cache, so the decision is reset around the compile.
  enabled = jax.config.jax_enable_compilation_cache
  foreign = jax.tree.leaves(args)[0].sharding.device_set.pop().platform != jax.default_backend()
  started = time.perf_counter()
  try:
    if foreign:
      jax.config.update("jax_enable_compilation_cache", False)
      persistent_cache.reset_cache()
    compiled = lowered.compile()
  finally:
    if foreign:
      jax.config.update("jax_enable_compilation_cache", enabled)
      persistent_cache.reset_cache()
  seconds = time.perf_counter() - started
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  text = compiled.as_text()
  return Compiled(seconds, compiled.memory_analysis(), float(analysis.get("flops", 0.0)),
                  float(analysis.get("bytes accessed", 0.0)), collectives(text),
                  custom_call_targets(text))


def state_bytes_per_device(abstract) -> int:
  """Bytes of the arrays' shards on one device (the first of each sharding)."""
  total = 0
  for leaf in jax.tree.leaves(abstract):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


def plan(config, devices, topology: str | None = None, fsdp: int | str = 1) -> dict:
  """Compiles the config's train and eval steps for `devices`; returns the report (see the module docstring)."""
  num_devices = len(devices)
  if config.batch_size % num_devices:
    raise PlanError(f"batch size {config.batch_size} does not divide over the {num_devices} devices"
                    f"{' of ' + topology if topology else ''}; use a multiple of {num_devices}")
  if config.eval_batch_size % num_devices:
    config.eval_batch_size = config.batch_size
  chip = chip_of(devices, topology)  # one device per chip (topology_devices), so per device is per chip
  memory = chip.memory_bytes if chip else None
  candidates = [fsdp] if fsdp != "auto" else [n for n in range(1, num_devices + 1) if num_devices % n == 0]
  for size in candidates:
    if num_devices % size:
      raise PlanError(f"--fsdp {size} does not divide the {num_devices} devices")
    config.fsdp = size
    mesh = sharding.create_mesh(size, devices)
    programs = train.build_programs(config, mesh, steps_per_epoch=max(1, (dataset_size(config) or 1)
                                                                      // config.batch_size))
    state_bytes = state_bytes_per_device(programs.abstract_state)
    train_step = compile_program(programs.train_step, programs.abstract_state,
                                 train.abstract_batch(config, mesh, config.batch_size))
    m = train_step.memory
    train_total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    fits = None if memory is None else train_total <= memory
    if fits or fsdp != "auto" or size == candidates[-1]:
      break
  eval_variables = steps.eval_variables(programs.abstract_state)
  eval_step = compile_program(programs.eval_step, eval_variables,
                              train.abstract_batch(config, mesh, config.eval_batch_size, train=False))
  e = eval_step.memory
  # While evaluating, the whole train state stays resident beside the eval program's own buffers.
  eval_total = (state_bytes + e.argument_size_in_bytes - state_bytes_per_device(eval_variables) + e.output_size_in_bytes
                + e.temp_size_in_bytes)
  if memory is not None:
    fits = max(train_total, eval_total) <= memory

  peak = chip.peak_flops(config.model.dtype) if chip else None
  # The roofline: the step takes at least its FLOPs at the peak and its bytes at the bandwidth.
  step_seconds = max(train_step.flops / peak, train_step.bytes_accessed / chip.bandwidth) if chip else None
  images_per_sec = config.batch_size / step_seconds if step_seconds else None
  size = dataset_size(config)
  return {
      "config": config.data.dataset, "variant": config.model.variant, "topology": topology or "host",
      "platform": devices[0].platform, "device_kind": devices[0].device_kind,
      "chip": chip.name if chip else None, "num_chips": num_devices, "fsdp": config.fsdp,
      "global_batch_size": config.batch_size,
      "eval_batch_size": config.eval_batch_size, "image_size": config.image_size, "dtype": config.model.dtype,
      "per_chip_bytes": {"parameters_and_optimizer": state_bytes, "arguments": m.argument_size_in_bytes,
                         "temporaries": m.temp_size_in_bytes, "outputs": m.output_size_in_bytes,
                         "total": train_total, "eval_total": eval_total},
      "chip_memory_bytes": chip.memory_bytes if chip else None, "fits": fits,
      "flops_per_step_per_chip": train_step.flops, "bytes_accessed_per_step_per_chip": train_step.bytes_accessed,
      "collectives": {kind: v["count"] for kind, v in train_step.collectives.items()},
      "collective_bytes": {kind: v["bytes"] for kind, v in train_step.collectives.items()},
      "peak_flops_per_chip": peak, "memory_bandwidth_per_chip": chip.bandwidth if chip else None,
      "estimated_step_seconds": step_seconds, "estimated_images_per_sec": images_per_sec,
      "dataset_train_images": size,
      "estimated_epoch_seconds": size / images_per_sec if size and images_per_sec else None,
      "compile_seconds": {"train_step": round(train_step.seconds, 1), "eval_step": round(eval_step.seconds, 1)},
      "custom_calls": sorted(set(train_step.custom_calls) | set(eval_step.custom_calls)),
  }


def _gib(n) -> str:
  if n is None:
    return "n/a"
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_report(r: dict) -> str:
  b = r["per_chip_bytes"]
  lines = [
      f"{r['variant']} on {r['config']}, {r['topology']}: {r['num_chips']} x {r['chip'] or r['device_kind']}, "
      f"fsdp {r['fsdp']}, global batch {r['global_batch_size']}, {r['image_size']} px, {r['dtype']}",
      f"  per chip: parameters + optimizer {_gib(b['parameters_and_optimizer'])}, arguments {_gib(b['arguments'])}, "
      f"temporaries {_gib(b['temporaries'])}, outputs {_gib(b['outputs'])}",
      f"  total {_gib(b['total'])} training, {_gib(b['eval_total'])} evaluating, of {_gib(r['chip_memory_bytes'])}: "
      + {True: "fits", False: "DOES NOT FIT", None: "unknown chip memory"}[r["fits"]],
      f"  FLOPs per step per chip {r['flops_per_step_per_chip']:.3g}; collectives: "
      + (", ".join(f"{k} {n} ({r['collective_bytes'][k] / 2**20:.1f} MiB)" for k, n in r["collectives"].items())
         or "none"),
  ]
  if r["estimated_step_seconds"]:
    epoch = r["estimated_epoch_seconds"]
    lines.append(f"  roofline: {r['estimated_step_seconds'] * 1e3:.1f} ms a step, "
                 f"{r['estimated_images_per_sec']:,.0f} images/s"
                 + (f", {epoch / 60:.1f} min an epoch of {r['dataset_train_images']:,} images" if epoch else ""))
  lines.append(f"  compiled in {r['compile_seconds']['train_step']} s (train) + {r['compile_seconds']['eval_step']} s "
               "(eval)")
  return "\n".join(lines)


def run(config, topology: str | None, fsdp: str, as_json: bool) -> int:
  """Plans `config` and prints the report; returns the exit status (0, 1: does not fit, 2: bad input)."""
  try:
    config_lib.validate(config)
    if fsdp != "auto" and not fsdp.isdigit():
      raise PlanError(f"--fsdp {fsdp!r}: expected a number of devices or 'auto'")
    devices = topology_devices(topology) if topology else jax.devices()
    report = plan(config, devices, topology, fsdp if fsdp == "auto" else int(fsdp))
  except (PlanError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(report) if as_json else format_report(report))
  if report["fits"] is False:
    needs = max(report["per_chip_bytes"]["total"], report["per_chip_bytes"]["eval_total"])
    print(f"error: the step needs {_gib(needs)} per chip; the chip has {_gib(report['chip_memory_bytes'])}. "
          "Try --fsdp auto or a smaller --batch-size.", file=sys.stderr)
    return 1
  return 0


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  train.quiet_logs()
  if FLAGS.topology and "JAX_PLATFORMS" not in os.environ:
    jax.config.update("jax_platforms", "cpu")  # compiling for the topology needs no TPU here
  config = FLAGS.config
  config.unlock()
  for key, value in (("batch_size", FLAGS["batch-size"].value), ("image_size", FLAGS["image-size"].value)):
    if value is not None:
      config[key] = value
  if FLAGS.dtype:
    config.model.dtype = FLAGS.dtype
  if not config.data.root:
    config.data.root = "(not read by the plan)"
  sys.exit(run(config, FLAGS.topology, FLAGS.fsdp, FLAGS.json))


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Experiment config, e.g. configs/rafdb.py (or rafdb.py:tiny).",
                                  lock_config=True)
  flags.DEFINE_string("topology", None, "A TPU topology, e.g. v5e:2x2 or v4:2x2x2; default: this host's devices.")
  flags.DEFINE_string("fsdp", "1", "FSDP size, or 'auto': the smallest whose training step fits.")
  flags.DEFINE_integer("batch-size", None, "Global batch size (default: the config's).")
  flags.DEFINE_enum("dtype", None, list(config_lib.DTYPES), "Computation dtype (default: the config's).")
  flags.DEFINE_integer("image-size", None, "Image side (default: the config's).")
  flags.DEFINE_bool("json", False, "Print one JSON object.")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  define_flags()
  app.run(main)
