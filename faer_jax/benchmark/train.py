"""`python -m faer_jax.benchmark train`: training step and eval forward, JAX next to PyTorch.

  python -m faer_jax.benchmark train --variant tiny --batch-size 16 --image-size 224 \
      --steps 3 --framework both --threads 2

Both frameworks run the same work on the same shapes: forward, cross-entropy on
random labels, backward and one AdamW update (lr 1e-3, weight decay 0.01 on
every parameter, PyTorch's defaults) per training step; the model in eval mode
without gradients for the eval forward. Measurements alternate between the two
frameworks, JAX train, torch train, JAX eval, torch eval, round after round, so
that a slow spell of a shared machine lands on both; each figure is the median
of `--steps` rounds after `--warmup` untimed ones.

PyTorch runs where JAX does (`--torch-device auto`): on the GPU when JAX runs
on one and torch sees a CUDA device, else on the CPU. On a GPU it runs with
`cudnn.benchmark` (XLA autotunes its convolutions too) and, in float32, with
TF32 off, as the Flax model's float32 products are (faer_jax.models.layers);
with both frameworks on one GPU, JAX allocates on demand rather than taking
most of the memory up front.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Sequence

import numpy as np

from faer_jax import cpu_memory
from faer_jax.benchmark import add_shape_args, at_least, threads

LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-8, 0.01
# Between the two frameworks' measurements: lets the other one's worker threads
# (OpenMP's and Eigen's spin briefly after each parallel region) go to sleep.
_SETTLE_S = 0.05


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m faer_jax.benchmark train",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_shape_args(p)
  p.add_argument("--steps", type=at_least(1), default=3, help="Timed rounds; the median is reported.")
  p.add_argument("--warmup", type=at_least(0), default=2,
                 help="Untimed rounds after compilation (the allocators settle over the first rounds).")
  p.add_argument("--framework", choices=("jax", "torch", "both"), default="jax")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="Compute dtype (parameters stay float32; torch uses autocast).")
  p.add_argument("--torch-device", choices=("auto", "cpu", "cuda"), default="auto",
                 help="Where PyTorch runs; auto: the GPU when JAX runs on one (and torch sees CUDA), else the CPU.")
  p.add_argument("--torch-model", metavar="FILE.py:NAME",
                 help="Time your copy of the original PyTorch code instead of this repository's reference: "
                      "FILE.py:NAME or package.module:NAME, NAME(**kwargs) returning the model "
                      "(faer_jax.interop.external); it must have the --variant's parameter count.")
  p.add_argument("--torch-model-kwargs", metavar="JSON", help='Its arguments, e.g. \'{"num_classes": 7}\'.')
  p.add_argument("--threads", type=at_least(1), default=None, help="CPU threads for both (default: all allowed).")
  p.add_argument("--conv-impl", default="auto",
                 help="auto | xla | shift | kernel: the Flax model's conv implementations "
                      "(faer_jax.models.create_model).")
  p.add_argument("--compiler-option", action="append", default=[], metavar="KEY=VALUE",
                 help="An XLA option for the JAX programs, e.g. xla_cpu_use_xnnpack=false (repeatable).")
  p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                 help="'cpu' times with the process's CPU time: with --threads 1 on a machine shared with "
                      "other jobs, it counts this process's work and not its waits.")
  p.add_argument("--malloc", choices=("keep", "system"), default="keep",
                 help="'keep': glibc keeps freed memory for reuse (faer_jax.cpu_memory; both frameworks, "
                      "one process); 'system': glibc's defaults, every step faults in fresh pages.")
  p.add_argument("--skip-eval", action="store_true", help="Time the training step only.")
  p.add_argument("--skip-train", action="store_true", help="Time the eval forward only.")
  p.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")
  return p


def _timed(fn: Callable[[], object], clock: Callable[[], float]) -> float:
  start = clock()
  fn()
  return clock() - start


def _compiler_options(pairs: Sequence[str]) -> dict[str, str]:
  options = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep:
      raise ValueError(f"--compiler-option {pair!r}: expected KEY=VALUE.")
    options[key] = value
  return options


def _steps(model, tx):
  """The training step (loss, gradients, AdamW update) and the eval forward of `model`."""
  import jax
  import jax.numpy as jnp
  import optax

  def train_step(state, images, labels):
    params, opt_state = state

    def loss_fn(params):
      _, logits = model.apply({"params": params}, images, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  def eval_forward(params, images):
    return model.apply({"params": params}, images, train=False)[1]

  return train_step, eval_forward


class _JaxBench:
  """The compiled Flax train step and eval forward on one device, with their FLOP counts.

  `phases` picks which of the two to compile; `count_flops=False` skips the count
  (`benchmark profile` needs neither the other phase nor the count).
  """

  def __init__(self, args: argparse.Namespace, phases: Sequence[str] = ("train", "eval"),
               count_flops: bool = True):
    import jax
    import jax.numpy as jnp
    import optax

    from faer_jax.models import create_model

    self._jax = jax
    # One device, even when tests simulate several: the figure is per chip.
    self.device = jax.devices()[0]
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    model = create_model(args.variant, args.num_classes, dtype=dtype, conv_impl=args.conv_impl)
    images, labels = _batch(args)
    self.images = jax.device_put(images.transpose(0, 2, 3, 1), self.device)  # NHWC
    self.labels = jax.device_put(labels, self.device)
    params = jax.jit(model.init)(jax.random.key(0), self.images[:1])["params"]
    tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY)
    train_step, eval_forward = _steps(model, tx)
    self.state = (params, jax.jit(tx.init)(params))  # one program, not one per leaf and shape
    # Compiled ahead of time. The FLOPs are counted in the very program timed, as
    # written, before XLA's rewrites: the model's own FLOPs, the same on every
    # backend (a compiled program counts what its backend made of it: XLA:CPU's
    # training step of the 'test' variant with --conv-impl xla, 1.7x as many)...
    options = _compiler_options(args.compiler_option)
    counted_train = counted_eval = None
    if "train" in phases:
      counted_train = jax.jit(train_step, donate_argnums=0).lower(self.state, self.images, self.labels)
      self.train_step = counted_train.compile(compiler_options=options)
    if "eval" in phases:
      counted_eval = jax.jit(eval_forward).lower(params, self.images)
      self.eval_forward = counted_eval.compile(compiler_options=options)
    self.train_flops = self.eval_flops = None
    self.flops_counted_in = None
    if count_flops:
      self._count_flops(args, dtype, model, tx, params, counted_train, counted_eval)

  def _count_flops(self, args, dtype, model, tx, params, counted_train, counted_eval) -> None:
    import jax

    from faer_jax.benchmark.flops import xla_flops
    from faer_jax.models import create_model
    if jax.default_backend() == "cpu" and args.conv_impl in ("auto", "kernel"):
      # ...except where it runs the C++ kernels, whose calls XLA counts as zero
      # FLOPs: then the same step built from the pure-XLA layers ('shift': the
      # depthwise conv as its 49 multiply-adds, the grouped conv as dense ones
      # per group, the MLP as matmuls), lowered, which computes the same function.
      reference_train, reference_eval = _steps(create_model(args.variant, args.num_classes, dtype=dtype,
                                                            conv_impl="shift"), tx)
      if counted_train is not None:
        counted_train = jax.jit(reference_train).lower(self.state, self.images, self.labels)
      if counted_eval is not None:
        counted_eval = jax.jit(reference_eval).lower(params, self.images)
    count = lambda program: None if program is None else xla_flops(program)
    self.train_flops, self.eval_flops = count(counted_train), count(counted_eval)
    self.flops_counted_in = "lowered program"
    if self.train_flops is None and self.eval_flops is None:
      # A backend whose cost analysis needs a compiled program: what it compiled, then.
      self.train_flops = count(getattr(self, "train_step", None))
      self.eval_flops = count(getattr(self, "eval_forward", None))
      self.flops_counted_in = "compiled program"

  def train(self) -> None:
    self.state, loss = self.train_step(self.state, self.images, self.labels)
    self._jax.block_until_ready(loss)
    self._jax.block_until_ready(self.state)

  def eval(self) -> None:
    self._jax.block_until_ready(self.eval_forward(self.state[0], self.images))


class UsageError(ValueError):
  """An option this machine cannot honour; `main` prints it and exits 2."""


def _torch_device(requested: str, jax_platform: str | None) -> str:
  """'cpu' or 'cuda' for `--torch-device requested`, JAX running on `jax_platform` (None: not at all)."""
  import torch
  has_cuda = torch.cuda.is_available()
  if requested == "cuda" and not has_cuda:
    raise UsageError("--torch-device cuda: this torch sees no CUDA device "
                     f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}).")
  if requested == "auto":
    return "cuda" if has_cuda and jax_platform in (None, "gpu") else "cpu"
  return requested


class _TorchBench:
  """The PyTorch model doing the same work on `device`.

  The reference (faer_jax.interop.torch_reference), or with --torch-model the
  user's copy of the original code, checked to have the variant's size.
  """

  def __init__(self, args: argparse.Namespace, num_threads: int, device: str):
    import torch
    import torch.nn.functional as F

    from faer_jax.interop import external
    from faer_jax.interop.torch_reference import create_torch_model
    from faer_jax.models import get_variant

    torch.set_num_threads(num_threads)
    torch.manual_seed(0)
    self._torch, self._F, self.device = torch, F, device
    if device == "cuda":
      torch.backends.cudnn.benchmark = True
      tf32 = args.dtype != "float32"
      torch.backends.cuda.matmul.allow_tf32 = tf32
      torch.backends.cudnn.allow_tf32 = tf32
    if args.torch_model:
      try:
        model = external.load_torch_model(args.torch_model, external.parse_kwargs(args.torch_model_kwargs))
        external.check_sizes(model, args.variant, args.num_classes)
      except external.ExternalModelError as e:
        raise UsageError(str(e)) from None
      model = external.adapted(model, args.num_classes, get_variant(args.variant).dims[-1])
    else:
      model = create_torch_model(args.variant, args.num_classes)
    self.name = args.torch_model or "faer_jax.interop.torch_reference"
    self.model = model.to(device)
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=BETAS, eps=EPS,
                                       weight_decay=WEIGHT_DECAY)
    images, labels = _batch(args)
    self.images = torch.from_numpy(images).to(device)
    self.labels = torch.from_numpy(labels).long().to(device)
    self.autocast = args.dtype == "bfloat16"

  def _forward(self):
    with self._torch.autocast(self.device, dtype=self._torch.bfloat16, enabled=self.autocast):
      return self.model(self.images)[1]

  def _sync(self) -> None:
    if self.device == "cuda":  # kernels are queued: wait for them, as JAX's block_until_ready does
      self._torch.cuda.synchronize()

  def train(self) -> None:
    self.model.train()
    self.optimizer.zero_grad(set_to_none=True)
    loss = self._F.cross_entropy(self._forward().float(), self.labels)
    loss.backward()
    self.optimizer.step()
    self._sync()

  def eval(self) -> None:
    self.model.eval()
    with self._torch.no_grad():
      self._forward()
    self._sync()


def _batch(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
  """The same random images (NCHW, float32) and labels for both frameworks."""
  rng = np.random.default_rng(0)
  images = rng.standard_normal((args.batch_size, 3, args.image_size, args.image_size), np.float32)
  return images, rng.integers(0, args.num_classes, args.batch_size).astype(np.int32)


def _interleaved(benches: dict[str, object], phases: Sequence[str], warmup: int, steps: int,
                 clock: Callable[[], float]) -> dict[str, list[float]]:
  """Seconds per call of bench.<phase>(), alternating frameworks call by call."""
  times = {f"{name}_{phase}": [] for phase in phases for name in benches}
  for round_ in range(warmup + steps):
    for phase in phases:
      for name, bench in benches.items():
        time.sleep(_SETTLE_S)
        seconds = _timed(getattr(bench, phase), clock)
        if round_ >= warmup:
          times[f"{name}_{phase}"].append(seconds)
  return times


def run(args: argparse.Namespace) -> dict:
  """Runs the benchmark and returns the figures (the keys of the --json output)."""
  applied = threads.limit_threads(args.threads)  # before jax and torch load
  from faer_jax.benchmark.flops import cpu_peak_flops, peak_flops

  keeps_memory = args.malloc == "keep" and cpu_memory.keep_freed_memory()
  phases = [p for p, skip in (("train", args.skip_train), ("eval", args.skip_eval)) if not skip]
  torch_device = None
  if args.framework in ("torch", "both"):
    jax_platform = None
    if args.framework == "both":
      # Should both run on one GPU, JAX must not take most of its memory when it starts.
      os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
      import jax
      jax_platform = jax.default_backend()
    torch_device = _torch_device(args.torch_device, jax_platform)
  # PyTorch's model first: a --torch-model that cannot be built fails before minutes of compiling.
  torch_bench = _TorchBench(args, applied["threads"], torch_device) if torch_device else None
  benches = {}
  if args.framework in ("jax", "both"):
    benches["jax"] = _JaxBench(args)
  if torch_bench is not None:
    benches["torch"] = torch_bench
  clock = time.process_time if args.clock == "cpu" else time.perf_counter
  load_before = os.getloadavg()[0]
  times = _interleaved(benches, phases, args.warmup, args.steps, clock)

  result = {
      "variant": args.variant, "batch_size": args.batch_size, "image_size": args.image_size,
      "dtype": args.dtype, "steps": args.steps, **applied, "clock": args.clock, "cpu": _cpu_name(),
      "malloc_keeps_freed_memory": keeps_memory,
      # Other jobs on the machine: the 1-minute load average before and after the timed rounds.
      "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
  }
  if "torch" in benches:
    import torch
    result.update(torch_version=torch.__version__, torch_model=torch_bench.name, torch_device=torch_bench.device,
                  torch_device_name=(torch.cuda.get_device_name() if torch_bench.device == "cuda" else None))
  jax_bench = benches.get("jax")
  if jax_bench is not None:
    import jax
    from faer_jax import kernels
    uses_kernels = jax_bench.device.platform == "cpu" and args.conv_impl in ("auto", "kernel")
    result.update(jax_version=jax.__version__, device=jax_bench.device.device_kind,
                  platform=jax_bench.device.platform, conv_impl=args.conv_impl,
                  # Which build of the C++ kernels ran (avx512, avx2), or None.
                  cpu_kernels=kernels.load() if uses_kernels and kernels.available() else None,
                  compiler_options=_compiler_options(args.compiler_option),
                  flops_counted_in=jax_bench.flops_counted_in)
    peak = peak_flops(jax_bench.device.device_kind, args.dtype)
    source = "datasheet" if peak else None
    if peak is None and jax_bench.device.platform == "cpu" and args.dtype == "float32":
      peak = cpu_peak_flops()  # after the timed rounds: it keeps every core busy for a moment
      source = "measured: FMA chains on every thread (faer_jax/kernels/peak.cc)" if peak else None
    result["peak_flops_per_sec"] = peak
    result["peak_flops_source"] = source
  for key, seconds in times.items():
    median = statistics.median(seconds)
    result[f"{key}_seconds"] = median
    result[f"{key}_images_per_sec"] = args.batch_size / median
  for phase in phases:
    if jax_bench is not None:
      flops = getattr(jax_bench, f"{phase}_flops")
      rate = flops / result[f"jax_{phase}_seconds"] if flops else None
      result[f"jax_{phase}_flops"] = flops
      result[f"jax_{phase}_flops_per_sec"] = rate
      result[f"jax_{phase}_mfu"] = rate / peak if rate and peak else None
    if len(benches) == 2:
      result[f"{phase}_speedup"] = result[f"jax_{phase}_images_per_sec"] / result[f"torch_{phase}_images_per_sec"]
  return result


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _fmt_flops(value: float | None, unit: str = "FLOP/s") -> str:
  if value is None:
    return "n/a"
  for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
    if value >= scale:
      return f"{value / scale:.1f} {prefix}{unit}"
  return f"{value:.0f} {unit}"


def _print_table(r: dict) -> None:
  print(f"FAER-{r['variant']}  batch {r['batch_size']}  {r['image_size']} px  {r['dtype']}  "
        f"threads {r['threads']}  clock {r['clock']}  ({r['cpu']}, load average {r['load_average']})")
  if "device" in r:
    kernels = f", CPU kernels: {r['cpu_kernels']}" if r.get("cpu_kernels") else ""
    print(f"jax {r['jax_version']} on {r['platform']} ({r['device']}), conv_impl={r['conv_impl']}{kernels}")
  if "torch_device" in r:
    print(f"torch {r['torch_version']} on {r['torch_device']}"
          + (f" ({r['torch_device_name']})" if r["torch_device_name"] else "") + f": {r['torch_model']}")
  phases = [p for p in ("train", "eval") if any(k.endswith(f"_{p}_seconds") for k in r)]
  print(f"{'':8s}" + "".join(f"{p + ' img/s':>14s}{p + ' s':>10s}" for p in phases))
  for fw in ("jax", "torch"):
    if any(k.startswith(fw + "_") and k.endswith("_seconds") for k in r):
      print(f"{fw:8s}" + "".join(f"{r[f'{fw}_{p}_images_per_sec']:14.2f}{r[f'{fw}_{p}_seconds']:10.3f}"
                                 for p in phases))
  if any(f"{p}_speedup" in r for p in phases):
    print(f"{'jax/torch':8s}" + "".join(f"{r[f'{p}_speedup']:13.2f}x{'':10s}" for p in phases))
  for p in phases:
    if f"jax_{p}_flops" in r:
      flops, mfu = r[f"jax_{p}_flops"], r[f"jax_{p}_mfu"]
      print(f"XLA cost analysis, {p}: {_fmt_flops(flops, 'FLOP')} per call, achieved "
            f"{_fmt_flops(r[f'jax_{p}_flops_per_sec'])}, MFU "
            + ("n/a (peak unknown for this device)" if mfu is None else
               f"{100 * mfu:.1f} % of {_fmt_flops(r['peak_flops_per_sec'])} ({r['peak_flops_source']})"))


def main(argv: Sequence[str]) -> int:
  args = _parser().parse_args(argv)
  if args.skip_train and args.skip_eval:
    print("--skip-train and --skip-eval leave nothing to time.", file=sys.stderr)
    return 2
  try:
    result = run(args)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(result))
  else:
    _print_table(result)
  return 0
