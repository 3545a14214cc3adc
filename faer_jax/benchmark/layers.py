"""`python -m faer_jax.benchmark layers`: the model's convolutions and block MLPs, per implementation, next to PyTorch.

  python -m faer_jax.benchmark layers --variant tiny --batch-size 16 --image-size 224 \
      [--threads 1 --clock cpu] [--steps 3] [--json]

For every grouped convolution FAER runs (the blocks' 7x7 depthwise convs and
CC Attention's 7x7 conv with 4 groups) and for each stage's block MLP (Dense
4C, GELU, Dense C, layer scale, residual add), at the shapes a `--variant`
model sees at `--image-size`, times the forward and the forward + backward
(gradients of the input and the parameters) of each implementation in
faer_jax.models.layers and faer_jax.kernels.modules and of the same torch modules
(Conv2d in NCHW, Linear on channels-last rows, as the original runs them),
round after round, alternating. These are the measurements behind the
choices of `conv_impl='auto'` on CPU (docs/cpu_kernels.md).
"""

import argparse
import json
import statistics
import sys
import time
from typing import Sequence

from faer_jax.benchmark import add_shape_args, at_least, threads

# The implementations of each kind of layer: 'xla' the plain layers, the others faer_jax.kernels.modules.
_IMPLS = {"depthwise": ("xla", "shift", "kernel"), "grouped": ("xla", "split", "kernel"), "mlp": ("xla", "kernel")}


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m faer_jax.benchmark layers", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_shape_args(p, num_classes=False)
  p.add_argument("--steps", type=at_least(1), default=3, help="Rounds; the median is reported.")
  p.add_argument("--threads", type=at_least(1), default=None)
  p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
  p.add_argument("--only", default="", help="Comma-separated subset of: depthwise, grouped, mlp.")
  p.add_argument("--json", action="store_true")
  return p


def _cases(variant: str, batch: int, size: int) -> list[tuple[str, str, tuple[int, ...], dict]]:
  """(kind, label, NHWC input shape, module kwargs) for every grouped conv of the model."""
  from faer_jax.models import get_variant
  dims = get_variant(variant).dims
  cases = []
  for i, dim in enumerate(dims):
    side = size // (4 * 2 ** i)
    cases.append(("depthwise", f"stage {i} 7x7 dw", (batch, side, side, dim), dict(features=dim)))
  side = size // 32
  cases.append(("grouped", "CC Attention 7x7 g4", (batch, side, side, dims[-1]),
                dict(features=dims[-1], kernel_size=7, groups=4)))
  for i, dim in enumerate(dims):
    side = size // (4 * 2 ** i)
    cases.append(("mlp", f"stage {i} block MLP", (batch, side, side, dim), dict(features=dim)))
  return cases


def _mlp_fns(impl: str, shape: tuple[int, ...]):
  """The block's pointwise half, shortcut + gamma * (gelu(x w1 + b1) w2 + b2), as XLA ops or the kernel."""
  import jax
  import jax.numpy as jnp

  from faer_jax.kernels import mlp
  from faer_jax.models import layers
  c = shape[-1]
  ks = jax.random.split(jax.random.key(0), 3)
  x, shortcut = jax.random.normal(ks[0], shape), jax.random.normal(ks[1], shape)
  params = (0.02 * jax.random.normal(ks[2], (c, 4 * c)), jnp.zeros(4 * c), 0.02 * jax.random.normal(ks[2], (4 * c, c)),
            jnp.zeros(c), jnp.full((c,), 1e-6))
  if impl == "kernel":
    fn = lambda p, x, s: mlp.mlp_residual(x, *p, s)
  else:
    fn = lambda p, x, s: s + p[4] * (layers.gelu(x @ p[0] + p[1]) @ p[2] + p[3])
  forward = jax.jit(fn)
  grads = jax.jit(jax.grad(lambda p, x, s: jnp.sum(fn(p, x, s) ** 2), argnums=(0, 1, 2)))
  return (lambda: jax.block_until_ready(forward(params, x, shortcut)),
          lambda: jax.block_until_ready(grads(params, x, shortcut)))


def _jax_fns(kind: str, impl: str, shape: tuple[int, ...], kwargs: dict):
  if kind == "mlp":
    return _mlp_fns(impl, shape)
  import jax
  import jax.numpy as jnp

  from faer_jax.kernels import modules
  from faer_jax.models import layers
  module = {("depthwise", "xla"): layers.DepthwiseConv, ("depthwise", "shift"): modules.ShiftDepthwiseConv,
            ("depthwise", "kernel"): modules.KernelDepthwiseConv, ("grouped", "xla"): layers.GroupedConv,
            ("grouped", "split"): modules.SplitGroupedConv,
            ("grouped", "kernel"): modules.KernelGroupedConv}[kind, impl](**kwargs)
  x = jax.random.normal(jax.random.key(0), shape)
  variables = module.init(jax.random.key(1), x[:1])
  forward = jax.jit(module.apply)
  grads = jax.jit(jax.grad(lambda v, x: jnp.sum(module.apply(v, x) ** 2), argnums=(0, 1)))
  return (lambda: jax.block_until_ready(forward(variables, x)),
          lambda: jax.block_until_ready(grads(variables, x)))


def _torch_mlp_fns(shape: tuple[int, ...]):
  import torch
  c = shape[-1]
  fc1, act, fc2 = torch.nn.Linear(c, 4 * c), torch.nn.GELU(), torch.nn.Linear(4 * c, c)
  gamma = torch.nn.Parameter(torch.full((c,), 1e-6))
  x, shortcut = torch.randn(*shape, requires_grad=True), torch.randn(*shape, requires_grad=True)
  block = lambda: shortcut + gamma * fc2(act(fc1(x)))

  def forward():
    with torch.no_grad():
      block()

  def backward():
    for p in (*fc1.parameters(), *fc2.parameters(), gamma, x, shortcut):
      p.grad = None
    (block() ** 2).sum().backward()

  return forward, backward


def _torch_fns(kind: str, shape: tuple[int, ...], kwargs: dict):
  if kind == "mlp":
    return _torch_mlp_fns(shape)
  import torch
  n, h, w, c = shape
  groups = c if kind == "depthwise" else kwargs["groups"]
  conv = torch.nn.Conv2d(c, kwargs["features"], 7, padding=3, groups=groups)
  x = torch.randn(n, c, h, w, requires_grad=True)

  def forward():
    with torch.no_grad():
      conv(x)

  def backward():
    conv.zero_grad(set_to_none=True)
    x.grad = None
    (conv(x) ** 2).sum().backward()

  return forward, backward


def run(args: argparse.Namespace) -> list[dict]:
  applied = threads.limit_threads(args.threads)
  import torch
  torch.set_num_threads(applied["threads"])
  clock = time.process_time if args.clock == "cpu" else time.perf_counter
  only = set(filter(None, args.only.split(",")))
  rows = []
  for kind, label, shape, kwargs in _cases(args.variant, args.batch_size, args.image_size):
    if only and kind not in only:
      continue
    from faer_jax import kernels
    impls = [i for i in _IMPLS[kind] if i != "kernel" or kernels.available()]
    fns = {impl: _jax_fns(kind, impl, shape, kwargs) for impl in impls}
    fns["torch"] = _torch_fns(kind, shape, kwargs)
    times = {(name, phase): [] for name in fns for phase in ("forward", "forward+backward")}
    for round_ in range(args.steps + 1):  # the first round warms up (and compiles)
      for name, (forward, backward) in fns.items():
        for phase, fn in (("forward", forward), ("forward+backward", backward)):
          start = clock()
          fn()
          if round_:
            times[(name, phase)].append(clock() - start)
    for (name, phase), seconds in times.items():
      rows.append({"layer": label, "shape": list(shape), "impl": name, "phase": phase,
                   "seconds": statistics.median(seconds)})
  return rows


def _print_table(rows: Sequence[dict]) -> None:
  torch_s = {(r["layer"], r["phase"]): r["seconds"] for r in rows if r["impl"] == "torch"}
  # "vs torch": torch's time over this one's, so above 1 is faster than PyTorch.
  print(f"{'layer':22s} {'input NHWC':20s} {'impl':7s} {'forward ms':>11s} {'vs torch':>8s} "
        f"{'fwd+bwd ms':>11s} {'vs torch':>8s}")
  by_key: dict = {}
  for r in rows:
    by_key.setdefault((r["layer"], r["impl"]), {})[r["phase"]] = r
  for (layer, impl), phases in by_key.items():
    cells = []
    for phase in ("forward", "forward+backward"):
      s = phases[phase]["seconds"]
      cells.append(f"{1e3 * s:11.2f} {torch_s[(layer, phase)] / s:7.2f}x")
    shape = "x".join(map(str, phases["forward"]["shape"]))
    print(f"{layer:22s} {shape:20s} {impl:7s} " + " ".join(cells))


def main(argv: Sequence[str]) -> int:
  args = _parser().parse_args(argv)
  rows = run(args)
  if args.json:
    print(json.dumps(rows))
  else:
    _print_table(rows)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
