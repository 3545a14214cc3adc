"""`python -m faer_jax.benchmark profile`: where a compiled step's time goes, per kind of operation.

  python -m faer_jax.benchmark profile --variant tiny --batch-size 16 --image-size 224 \
      [--phase train|eval] [--steps 2] [--threads 2] [--by-shape] [--top 25] [--json]

Runs the training step (or the eval forward) of `benchmark train` under
`jax.profiler` after two untimed calls, reads the Perfetto trace it writes, and
sums the time of each operation XLA ran (its thunks on the CPU), per step,
grouped by what it is: a C++ kernel's FFI target (`faer_mlp_backward`, ...), or
the kind of XLA fusion (`ynn_fusion`: YNNPACK's matrix products, `loop_fusion`
... as XLA names them). `--by-shape` splits each group by the shape of its
first output, which tells the blocks of one stage from another's. The sum of
the groups is the time the operations ran, a little less than the step's
wall time (dispatch, waits).

Written for the CPU, where each thunk is one event; on a GPU the trace also
holds the kernels' own events, listed under their CUDA names.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from typing import Sequence

from faer_jax.benchmark import add_shape_args, at_least, threads


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m faer_jax.benchmark profile", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_shape_args(p)
  p.add_argument("--phase", choices=("train", "eval"), default="train")
  p.add_argument("--steps", type=at_least(1), default=2, help="Profiled calls; the figures are per call.")
  p.add_argument("--threads", type=at_least(1), default=None)
  p.add_argument("--conv-impl", default="auto")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--by-shape", action="store_true", help="Split each group by its output's shape.")
  p.add_argument("--top", type=at_least(1), default=25, help="Rows of the table.")
  p.add_argument("--trace-dir", help="Keep the trace here (default: a temporary folder, removed).")
  p.add_argument("--json", action="store_true")
  return p


# name = shape opcode(...): the shape one array's, or a tuple's "(f32[..]{..}, f32[..]{..})".
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\([^()]*\)|\S+) ([\w\-]+)\(")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def instruction_groups(hlo: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (group, output shape) for the instructions of `hlo` (a compiled module's text).

  Custom calls are grouped by target; fusions by the backend's fusion kind where the
  config names one (`__ynn_fusion` -> 'ynn_fusion'), else by the name XLA gave them
  without its number ('multiply_add_fusion'); everything else by opcode.
  """
  groups = {}
  for line in hlo.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, shape, opcode = m.groups()
    target = _TARGET.search(line)
    if target:
      group = target.group(1)
    elif opcode == "fusion":
      kind = re.search(r'"fusion_config":\{"kind":"(\w+)"', line)
      group = kind.group(1).strip("_") if kind else re.sub(r"\.\d+$", "", name)
    else:
      group = opcode
    first = shape[1:].split(", ")[0] if shape.startswith("(") else shape  # a tuple's first element
    groups[name] = (group, first.split("{")[0])
  return groups


def thunk_times(trace_path: str, steps: int) -> dict[str, list[float]]:
  """Event name -> its durations in seconds, per call (each profiled call's events / `steps`)."""
  with gzip.open(trace_path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  times: dict[str, list[float]] = collections.defaultdict(list)
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    name = e.get("name", "")
    if name.startswith("$") or name.startswith("ThunkExecutor") or name.startswith("end: "):
      continue  # Python frames, the executor's own spans, markers
    times[name].append(e["dur"] / 1e6 / steps)
  return times


def summarise(times: dict[str, list[float]], groups: dict[str, tuple[str, str]],
              by_shape: bool) -> list[dict]:
  """Rows {group, shape, seconds, calls} for the thunks that are instructions of the program, largest first."""
  rows: dict[tuple[str, str], dict] = {}
  for name, durations in times.items():
    if name not in groups:
      continue  # runtime spans (argument handling, the thread pool's waits)
    group, shape = groups[name]
    key = (group, shape if by_shape else "")
    row = rows.setdefault(key, {"group": group, "shape": key[1], "seconds": 0.0, "calls": 0})
    row["seconds"] += sum(durations)
    row["calls"] += len(durations)
  return sorted(rows.values(), key=lambda r: -r["seconds"])


def run(args: argparse.Namespace) -> dict:
  applied = threads.limit_threads(args.threads)  # before jax loads
  from faer_jax import cpu_memory
  cpu_memory.keep_freed_memory()
  import jax

  from faer_jax.benchmark.train import _JaxBench
  bench_args = argparse.Namespace(variant=args.variant, batch_size=args.batch_size, image_size=args.image_size,
                                  num_classes=args.num_classes, dtype=args.dtype, conv_impl=args.conv_impl,
                                  compiler_option=[])
  bench = _JaxBench(bench_args, phases=(args.phase,), count_flops=False)
  call = bench.train if args.phase == "train" else bench.eval
  compiled = bench.train_step if args.phase == "train" else bench.eval_forward
  for _ in range(2):
    call()  # compiled already; the allocators settle
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="faer_jax_profile_")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    start = time.perf_counter()
    for _ in range(args.steps):
      call()
    wall = (time.perf_counter() - start) / args.steps
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise RuntimeError(f"jax.profiler wrote no perfetto_trace.json.gz under {trace_dir}.")
  rows = summarise(thunk_times(paths[-1], args.steps), instruction_groups(compiled.as_text()), args.by_shape)
  if not args.trace_dir:
    import shutil
    shutil.rmtree(trace_dir, ignore_errors=True)
  for row in rows:
    row["calls"] //= args.steps
  return {"variant": args.variant, "batch_size": args.batch_size, "image_size": args.image_size,
          "phase": args.phase, "dtype": args.dtype, "steps": args.steps, **applied,
          "platform": bench.device.platform, "seconds_per_call": wall,
          "operations_seconds": sum(r["seconds"] for r in rows), "rows": rows}


def main(argv: Sequence[str]) -> int:
  args = _parser().parse_args(argv)
  result = run(args)
  if args.json:
    print(json.dumps(result))
    return 0
  print(f"FAER-{result['variant']} {result['phase']}, batch {result['batch_size']}, {result['image_size']} px, "
        f"{result['dtype']}, threads {result['threads']}, on {result['platform']}: "
        f"{result['seconds_per_call']:.3f} s a call, {result['operations_seconds']:.3f} s in its operations")
  width = max([len(r["group"]) + len(r["shape"]) + 1 for r in result["rows"][:args.top]] + [10])
  for r in result["rows"][:args.top]:
    label = f"{r['group']} {r['shape']}".strip()
    share = 100 * r["seconds"] / result["operations_seconds"] if result["operations_seconds"] else 0.0
    print(f"  {label:<{width}s} {1e3 * r['seconds']:10.1f} ms {share:5.1f} %  {r['calls']:5d} calls")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
