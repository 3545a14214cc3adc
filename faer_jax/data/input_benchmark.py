"""Input throughput: the grain training pipeline next to a PyTorch DataLoader.

  python -m faer_jax.benchmark input --dataset rafdb --root PATH \
      [--batch-size 64] [--image-size 224] [--num-workers 2] [--batches 40] \
      [--rounds 3] [--decoders] [--json]

Both loaders read the same files of the training split with the same number
of worker processes and do the same work per image: decode, resize to S x S
(PIL bilinear), random horizontal flip, ImageNet normalisation, batching. The
PyTorch side is what the original's torchvision pipeline does, written with
PIL + numpy + torch (``ToTensor`` then ``Normalize``, channels first), because
torchvision is not a dependency. The two are timed in alternating rounds, each
loader alone on the machine and past its warm-up, so that drift in the
machine's load hits both; the medians and their ratio are reported, with the
CPU time per image of each loader's processes, which a busy machine blurs
less than the wall clock.

``--decoders`` also times JPEG decoding of the split's files with each
decoder installed (Pillow, Pillow in draft mode, simplejpeg, OpenCV), alone
and followed by the resize, on one core.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import random
import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np
import psutil
from PIL import Image

from faer_jax.data import create_source
from faer_jax.data import pipeline
from faer_jax.data import transforms


class TorchFaces:
  """Map-style PyTorch dataset doing the original's per-image transforms.

  Equivalent to torchvision's ``Compose([Resize((S, S)),
  RandomHorizontalFlip(), ToTensor(), Normalize(mean, std)])`` on PIL images.
  """

  def __init__(self, paths: list[str], labels: np.ndarray, image_size: int):
    self._paths = paths
    self._labels = labels
    self._size = image_size

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int):
    import torch

    with Image.open(self._paths[index]) as image:
      image = image.convert("RGB").resize((self._size, self._size),
                                          Image.BILINEAR)
    if random.random() < 0.5:
      image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # ToTensor: HWC uint8 -> contiguous CHW float in [0, 1].
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    tensor = tensor.float().div(255)
    # Normalize (not in place: it clones, then subtracts and divides).
    mean = torch.tensor(transforms.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(transforms.IMAGENET_STD).view(3, 1, 1)
    return tensor.sub(mean).div_(std), int(self._labels[index])


def _torch_batches(source, args) -> Iterator:
  import torch

  # What DataLoader sets in its workers; with num_workers=0 the per-image
  # ops run here, where two intra-op threads on tiny tensors take 15 ms per
  # image instead of 0.2 (two cores of an AMD EPYC).
  torch.set_num_threads(1)
  dataset = TorchFaces([source.path(i) for i in range(len(source))],
                       np.asarray(source.labels), args.image_size)
  loader = torch.utils.data.DataLoader(
      dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
      num_workers=args.num_workers,
      persistent_workers=args.num_workers > 0,
      generator=torch.Generator().manual_seed(0))
  return itertools.chain.from_iterable(itertools.repeat(loader))


def _grain_batches(source, args) -> Iterator:
  return pipeline.create_train_iterator(
      source, batch_size=args.batch_size, image_size=args.image_size, seed=0,
      num_workers=args.num_workers, num_threads=args.num_threads)


def _cpu_seconds() -> float:
  """CPU time (user + system) of this process and its live descendants."""
  total = 0.0
  me = psutil.Process()
  for process in [me, *me.children(recursive=True)]:
    try:
      times = process.cpu_times()
    except psutil.NoSuchProcess:
      continue
    total += times.user + times.system
  return total


def _measure(make: Callable[[], Iterator], args) -> tuple[float, float]:
  """(images/s, CPU ms per image) of a fresh loader after its warm-up.

  CPU time counts every process of the loader, so it shows the cost of the
  work even when other jobs on the machine blur the wall-clock rate.
  """
  batches = make()
  try:
    for _ in range(args.warmup):
      next(batches)
    cpu, start = _cpu_seconds(), time.perf_counter()
    for _ in range(args.batches):
      next(batches)
    seconds = time.perf_counter() - start
    images = args.batches * args.batch_size
    return images / seconds, (_cpu_seconds() - cpu) / images * 1000
  finally:
    # Stops the worker processes, so the next round has the machine alone.
    close = getattr(batches, "close", None)
    if close is not None:
      close()
    del batches


# ------------------------------------------------------------------ decoders
def _decoders(image_size: int) -> dict[str, Callable[[bytes], np.ndarray]]:
  """The JPEG decoders installed here: encoded bytes -> uint8 RGB array."""

  def pil(data):
    with Image.open(io.BytesIO(data)) as image:
      return np.asarray(image.convert("RGB"))

  def pil_draft(data):
    # JPEG DCT scaling by 1/2, 1/4 or 1/8 while both sides stay >= the target.
    with Image.open(io.BytesIO(data)) as image:
      image.draft("RGB", (image_size, image_size))
      return np.asarray(image.convert("RGB"))

  decoders = {"pillow": pil, "pillow_draft": pil_draft}
  try:
    import simplejpeg
    decoders["simplejpeg"] = lambda data: simplejpeg.decode_jpeg(
        data, colorspace="RGB")
    decoders["simplejpeg_scaled"] = lambda data: simplejpeg.decode_jpeg(
        data, colorspace="RGB", min_height=image_size, min_width=image_size)
  except ImportError:
    pass
  try:
    import cv2
    cv2.setNumThreads(1)
    decoders["opencv"] = lambda data: cv2.cvtColor(
        cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
        cv2.COLOR_BGR2RGB)
  except ImportError:
    pass
  return decoders


def time_decoders(paths: list[str], image_size: int) -> dict[str, dict]:
  """Images/s of each decoder on `paths`, alone and with the resize.

  Args:
    paths: JPEG files (read into memory first, so disk speed stays out).
    image_size: the resize target and the draft/scaled decoders' minimum.

  Returns:
    {decoder: {'decode': images/s, 'decode_resize': images/s}}.
  """
  blobs = [open(path, "rb").read() for path in paths]
  results = {}
  for name, decode in _decoders(image_size).items():
    timings = {}
    for mode in ("decode", "decode_resize"):
      start = time.perf_counter()
      for blob in blobs:
        image = decode(blob)
        if mode == "decode_resize":
          transforms.resize(image, image_size)
      timings[mode] = round(len(blobs) / (time.perf_counter() - start), 1)
    results[name] = timings
  return results


def main(argv: list[str]) -> int:
  """``python -m faer_jax.benchmark input ...``; returns the exit status."""
  parser = argparse.ArgumentParser(
      prog="python -m faer_jax.benchmark input",
      description="Images/s of the grain pipeline and of a PyTorch "
      "DataLoader on the same files.")
  parser.add_argument("--dataset", default="rafdb",
                      choices=("rafdb", "affectnet", "celeba"))
  parser.add_argument("--root", required=True)
  parser.add_argument("--split", default="train")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--num-workers", type=int, default=2)
  parser.add_argument("--num-threads", type=int, default=None,
                      help="grain's reading threads per worker (default: "
                      "the pipeline's)")
  parser.add_argument("--batches", type=int, default=40,
                      help="timed batches per round")
  parser.add_argument("--warmup", type=int, default=5,
                      help="untimed batches per round (workers start)")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--decoders", action="store_true",
                      help="also time each installed JPEG decoder")
  parser.add_argument("--json", action="store_true",
                      help="print one JSON object")
  args = parser.parse_args(argv)

  source = create_source(args.dataset, args.root, args.split)
  loaders = {"grain": _grain_batches, "torch": _torch_batches}
  rates = {name: [] for name in loaders}
  cpu = {name: [] for name in loaders}
  for _ in range(args.rounds):
    for name, make in loaders.items():
      rate, cpu_ms = _measure(lambda: make(source, args), args)
      rates[name].append(rate)
      cpu[name].append(cpu_ms)
  grain_rate = statistics.median(rates["grain"])
  torch_rate = statistics.median(rates["torch"])
  grain_cpu = statistics.median(cpu["grain"])
  torch_cpu = statistics.median(cpu["torch"])
  report = {
      "dataset": args.dataset, "root": args.root, "split": args.split,
      "num_examples": len(source), "batch_size": args.batch_size,
      "image_size": args.image_size, "num_workers": args.num_workers,
      "batches": args.batches, "rounds": args.rounds,
      "grain_images_per_s": round(grain_rate, 1),
      "torch_images_per_s": round(torch_rate, 1),
      "ratio": round(grain_rate / torch_rate, 3),
      "grain_cpu_ms_per_image": round(grain_cpu, 3),
      "torch_cpu_ms_per_image": round(torch_cpu, 3),
      # None when a run is too short for the clock's 10 ms resolution.
      "cpu_ratio": round(torch_cpu / grain_cpu, 3) if grain_cpu else None,
      "grain_rounds": [round(r, 1) for r in rates["grain"]],
      "torch_rounds": [round(r, 1) for r in rates["torch"]],
  }
  if args.decoders:
    paths = [source.path(i) for i in range(min(len(source), 500))]
    report["decoders"] = time_decoders(paths, args.image_size)
  if args.json:
    print(json.dumps(report))
    return 0
  print(f"{args.dataset} {args.split}: {len(source)} images, batch "
        f"{args.batch_size}, {args.image_size}px, {args.num_workers} workers")
  print(f"  grain pipeline   {grain_rate:8.1f} images/s, {grain_cpu:.3f} CPU "
        f"ms/image  (rounds {report['grain_rounds']})")
  print(f"  torch DataLoader {torch_rate:8.1f} images/s, {torch_cpu:.3f} CPU "
        f"ms/image  (rounds {report['torch_rounds']})")
  print(f"  grain/torch: {report['ratio']:.2f}x the images/s, "
        f"{report['cpu_ratio']}x less CPU per image")
  for name, timings in report.get("decoders", {}).items():
    print(f"  decoder {name:18s} decode {timings['decode']:8.1f}/s   "
          f"decode+resize {timings['decode_resize']:8.1f}/s")
  return 0
