"""python -m faer_jax.benchmark {train,profile,layers,gemm,input}: how fast FAER runs, in JAX and next to PyTorch.

  train  --variant tiny --batch-size 16 --image-size 224 [--steps 3] [--framework jax|torch|both]
         [--dtype float32|bfloat16] [--threads 2] [--conv-impl auto]
         [--torch-device auto|cpu|cuda] [--torch-model FILE.py:NAME] [--json]
         Times the compiled training step (forward, cross-entropy on random
         labels, gradients, AdamW update, state donated) and the eval forward of
         the Flax FAER; with `torch`/`both` also the PyTorch reference (or your
         copy of the original code: --torch-model) on the same shapes,
         interleaved with the JAX measurements so that machine noise hits
         both; PyTorch on the device JAX runs on (auto). Prints images/s, the
         JAX/PyTorch ratio, XLA's FLOP count and the achieved FLOP/s (and MFU
         where the chip's peak is known).
  layers --variant tiny --batch-size 16 [--threads 1 --clock cpu]
         Each implementation of the model's grouped convolutions (the
         depthwise 7x7s, CC Attention's 7x7 with 4 groups), forward and
         forward + backward, next to torch.nn.Conv2d.
  gemm   --variant tiny --batch-size 16 [--phase eval|train] [--threads 2]
         The matrix products of the compiled step, each timed alone in JAX
         and in torch: the floor under the step's time in either framework.
  profile --variant tiny --batch-size 16 [--phase train|eval] [--by-shape]
         Where the compiled step's time goes (jax.profiler): per C++ kernel
         and per kind of XLA operation, per call.
  input  ...   The input pipeline's throughput (faer_jax.data.input_benchmark).

This module imports neither jax nor torch: `--threads` has to act before either
starts its thread pools (see `threads.limit_threads`).
"""

import argparse
import sys
from typing import Callable, Sequence


def at_least(minimum: int) -> Callable[[str], int]:
  """An argparse `type=`: an int >= `minimum`; else argparse's error, naming the option."""

  def parse(text: str) -> int:
    value = int(text)  # a ValueError: argparse says "invalid int value"
    if value < minimum:
      raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value

  parse.__name__ = "int"
  return parse


def add_shape_args(p: argparse.ArgumentParser, num_classes: bool = True) -> None:
  """The options every subcommand shares: which model, on which batch."""
  p.add_argument("--variant", default="tiny", help="ConvNeXt variant: test, atto, ..., tiny, base.")
  p.add_argument("--batch-size", type=at_least(1), default=16)
  p.add_argument("--image-size", type=at_least(32), default=224)
  if num_classes:
    p.add_argument("--num-classes", type=at_least(1), default=7)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == "input":
    # Owned by the data pipeline; imported lazily so `train` never pays for grain.
    from faer_jax.data import input_benchmark
    return input_benchmark.main(argv[1:])
  if argv and argv[0] == "train":
    from faer_jax.benchmark import train
    return train.main(argv[1:])
  if argv and argv[0] == "gemm":
    from faer_jax.benchmark import gemm
    return gemm.main(argv[1:])
  if argv and argv[0] == "profile":
    from faer_jax.benchmark import profile
    return profile.main(argv[1:])
  if argv and argv[0] == "layers":
    from faer_jax.benchmark import layers
    return layers.main(argv[1:])
  print(__doc__, file=sys.stderr)
  return 0 if argv and argv[0] in ("-h", "--help") else 2
