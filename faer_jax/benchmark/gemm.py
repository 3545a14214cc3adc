"""`python -m faer_jax.benchmark gemm`: the matrix products of a compiled step, timed alone in JAX and PyTorch.

  python -m faer_jax.benchmark gemm --variant tiny --batch-size 16 --image-size 224 \
      [--phase eval|train] [--threads 2] [--steps 5] [--json]

Lists every dot of the compiled Flax eval forward (or training step) as a
matrix product (M x K) @ (K x N), times each distinct shape on its own in JAX
(XLA:CPU) and in torch (MKL) in the same process with the same threads,
alternating, and reports GFLOP/s per shape and the sums over the step. ConvNeXt
spends most of its FLOPs in these products, so this says how much of a step
either framework can win or lose in them at all. Timed alone, each call also
pays for allocating (and first touching) its output, so the sums are an
estimate, not a floor. XLA's convolutions (stem, downsampling, CC Attention's
7x7) are counted in FLOPs but not timed.
"""

import argparse
import collections
import json
import math
import re
import statistics
import sys
import time
from typing import Sequence

from faer_jax.benchmark import add_shape_args, at_least, threads

_SHAPE = r"f32\[([\d,]*)\]"


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m faer_jax.benchmark gemm", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_shape_args(p)
  p.add_argument("--phase", choices=("eval", "train"), default="eval")
  p.add_argument("--steps", type=at_least(1), default=5, help="Timed rounds per shape; the median is used.")
  p.add_argument("--threads", type=at_least(1), default=None)
  p.add_argument("--json", action="store_true")
  return p


def _dims(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v]


def products(hlo: str) -> tuple[collections.Counter, float]:
  """((M, K, N) -> count of the dots in `hlo`, FLOPs of its convolutions)."""
  gemms: collections.Counter = collections.Counter()
  conv_flops = 0.0
  for body in re.findall(r"\{\n(.*?)\n\}", hlo, re.S):
    shapes = dict(re.findall(r"%?([\w.\-]+) = " + _SHAPE, body))
    for line in body.splitlines():
      out = re.search(r"= " + _SHAPE + r"\{?[^ ]* (dot|convolution)\(([^)]*)\)", line)
      if not out:
        continue
      names = [a.strip().split()[-1].lstrip("%") for a in out.group(3).split(",")]
      lhs, rhs = (_dims(shapes.get(n, "")) for n in names[:2])
      if out.group(2) == "convolution":
        labels = re.search(r"dim_labels=\w+_(\w+)->", line).group(1)
        conv_flops += 2 * math.prod(_dims(out.group(1))) * math.prod(rhs) / rhs[labels.index("o")]
        continue
      dims = lambda key: [int(i) for i in re.search(key + r"=\{([\d,]*)\}", line).group(1).split(",") if i] \
          if key in line else []
      lc, rc, lb, rb = (dims(k) for k in ("lhs_contracting_dims", "rhs_contracting_dims",
                                           "lhs_batch_dims", "rhs_batch_dims"))
      batch = math.prod(lhs[i] for i in lb)
      k = math.prod(lhs[i] for i in lc)
      m = math.prod(lhs) // (k * batch)
      n = math.prod(rhs) // (math.prod(rhs[i] for i in rc) * math.prod(rhs[i] for i in rb))
      gemms[(batch * m, k, n)] += 1  # a batched dot counted as one taller product
  return gemms, conv_flops


def run(args: argparse.Namespace) -> dict:
  applied = threads.limit_threads(args.threads)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from faer_jax.benchmark import train as train_bench

  torch.set_num_threads(applied["threads"])
  bench_args = train_bench._parser().parse_args([
      "--variant", args.variant, "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
      "--num-classes", str(args.num_classes)])
  bench = train_bench._JaxBench(bench_args)
  compiled = bench.train_step if args.phase == "train" else bench.eval_forward
  gemms, conv_flops = products(compiled.as_text())

  rows, floor = [], {"jax": 0.0, "torch": 0.0}
  matmul = jax.jit(jnp.matmul)
  for (m, k, n), count in sorted(gemms.items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[0][2] * kv[1]):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    fns = {"jax": lambda: matmul(ja, jb).block_until_ready(), "torch": lambda: torch.mm(ta, tb)}
    times = {name: [] for name in fns}
    for round_ in range(args.steps + 1):
      for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        if round_:
          times[name].append(time.perf_counter() - start)
    flops = 2.0 * m * k * n
    row = {"m": m, "k": k, "n": n, "count": count}
    for name, ts in times.items():
      seconds = statistics.median(ts)
      row[f"{name}_gflops_per_sec"] = flops / seconds / 1e9
      floor[name] += count * seconds
    rows.append(row)
  gemm_flops = sum(2.0 * m * k * n * c for (m, k, n), c in gemms.items())
  return {"variant": args.variant, "batch_size": args.batch_size, "image_size": args.image_size,
          "phase": args.phase, "threads": applied["threads"], "gemm_flops": gemm_flops,
          "conv_flops": conv_flops, "jax_gemm_seconds": floor["jax"], "torch_gemm_seconds": floor["torch"],
          "gemms": rows}


def main(argv: Sequence[str]) -> int:
  args = _parser().parse_args(argv)
  r = run(args)
  if args.json:
    print(json.dumps(r))
    return 0
  print(f"{r['variant']} {r['phase']}, batch {r['batch_size']}, {r['image_size']} px, {r['threads']} threads")
  print(f"{'M':>7s} {'K':>6s} {'N':>6s} {'count':>5s} {'jax GF/s':>9s} {'torch GF/s':>10s}")
  for g in r["gemms"]:
    print(f"{g['m']:7d} {g['k']:6d} {g['n']:6d} {g['count']:5d} {g['jax_gflops_per_sec']:9.1f} "
          f"{g['torch_gflops_per_sec']:10.1f}")
  print(f"matrix products: {r['gemm_flops'] / 1e9:.1f} GFLOP, summed alone: jax {r['jax_gemm_seconds']:.3f} s, "
        f"torch {r['torch_gemm_seconds']:.3f} s; XLA convolutions: {r['conv_flops'] / 1e9:.1f} GFLOP (not timed)")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
