"""The grain input pipeline: host-local numpy batches for training and eval.

Each JAX process reads only its own share of a source and yields numpy
batches of its per-process batch size; turning them into global device arrays
belongs to the training loop. In training, the processes share one global
stream of examples (one order, one set of flips) and process p takes rows
[p*b, (p+1)*b) of every global batch of P*b: the global batches, and so the
training run, do not depend on the number of processes. Worker processes decode, resize and flip;
the calling process normalises whole batches. Batches are dicts:

  'image'  float32 (B, S, S, 3), ImageNet-normalised (see `transforms`)
  'label'  int32 (B,) for expressions, (B, 40) of 0/1 for attributes
  'mask'   bool (B,), eval only: False on padding
  'index'  int32 (B,), eval only: the example's index in the source, -1 on
           padding

The training iterator is a grain `DatasetIterator`: save `get_state()` with
the model (grain's Orbax handler does this) and `set_state()` on a fresh
iterator built with the same arguments resumes with exactly the batches an
uninterrupted run would have seen. Every random choice (order, flips, balanced
draws) is a pure function of (seed, shard, position in the stream), which is
what makes that exact and independent of thread timing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from faer_jax.data import errors
from faer_jax.data import transforms

Batch = dict[str, np.ndarray]

# Key under which a training batch carries the files dropped while it was
# assembled; it travels from the worker processes and is removed before the
# batch reaches the caller.
_SKIPPED_KEY = "_skipped_paths"


def _allow_worker_processes(num_workers: int) -> None:
  """Lets grain start workers in programs that do not parse absl flags.

  grain reads an absl flag when it starts worker processes (once JAX is
  imported); in a program that never parsed flags (argparse CLIs, pytest) the
  read raises UnparsedFlagAccessError. Marking the flags parsed leaves them
  at their defaults, and `absl.app.run` still parses the command line later.
  """
  if num_workers and not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _threads(num_threads: int | None, num_workers: int) -> int:
  if num_threads is not None:
    return num_threads
  return 2 if num_workers else 4


def shard_indices(num_examples: int, shard_index: int,
                  shard_count: int) -> np.ndarray:
  """The source indices process `shard_index` of `shard_count` reads.

  Contiguous blocks (neighbouring files, friendlier to disks and caches) whose
  sizes differ by at most one; together they cover every index exactly once.

  Args:
    num_examples: length of the source.
    shard_index: this process, in [0, shard_count).
    shard_count: number of processes.

  Returns:
    int64 array of indices, ascending.
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must be in [0, {shard_count}), got "
                     f"{shard_index}.")
  start = num_examples * shard_index // shard_count
  stop = num_examples * (shard_index + 1) // shard_count
  return np.arange(start, stop, dtype=np.int64)


# -------------------------------------------------------------------- training
class _EpochOrder:
  """Stream position -> shard position: a fresh order every epoch.

  Each epoch's order is a pure function of (seed, epoch), computed for the
  whole epoch at once with numpy (a few ms for AffectNet's 284k images) and
  cached, so resuming at any position is exact and costs one lookup per
  example. (grain's `shuffle` gives the same guarantees, but its per-element
  index shuffle cost 10% of the per-image time at 64 px.)

  Balanced: each draw picks a class uniformly, then one of its examples
  uniformly, with replacement; PyTorch's ``WeightedRandomSampler`` with
  weights 1 / (count of the example's class) draws the same distribution.
  """

  def __init__(self, num_examples: int, seed: int,
               labels: np.ndarray | None = None):
    self._num_examples = num_examples
    self._seed = seed
    self._members = None
    if labels is not None:
      self._members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    self._orders: dict[int, np.ndarray] = {}

  def _draw(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self._seed, epoch])
    if self._members is None:
      return rng.permutation(self._num_examples)
    sizes = np.array([len(m) for m in self._members])
    classes = rng.integers(len(self._members), size=self._num_examples)
    picks = (rng.random(self._num_examples) * sizes[classes]).astype(np.int64)
    starts = np.cumsum(sizes) - sizes
    return np.concatenate(self._members)[starts[classes] + picks]

  def _epoch(self, epoch: int) -> np.ndarray:
    order = self._orders.get(epoch)
    if order is None:
      order = self._draw(epoch)
      # Reading threads may straddle two epochs; older ones are done. (A
      # race between threads only costs a recomputation of the same order.)
      self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
      self._orders[epoch] = order
    return order

  def __call__(self, position: int, _: Any) -> int:
    epoch, offset = divmod(position, self._num_examples)
    return int(self._epoch(epoch)[offset])


class _ProcessRows(grain.MapDataset):
  """This process's rows of every global batch of the parent stream.

  Local position m reads global position (m // b) * b * P + p * b + m % b,
  for local batch size b, P processes and process index p.
  """

  def __init__(self, parent: grain.MapDataset, local_batch: int, shard_index: int, shard_count: int):
    super().__init__(parent)
    self._b, self._p, self._count = local_batch, shard_index, shard_count
    self._length = len(parent) // (local_batch * shard_count) * local_batch

  def __len__(self) -> int:
    return self._length

  def _global(self, index: int) -> int:
    step, row = divmod(index, self._b)
    return step * self._b * self._count + self._p * self._b + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._global(index)]


class _TrainExample:
  """Source index -> resized (maybe flipped) uint8 image and label."""

  def __init__(self, source, image_size: int,
               aspect: str, random_flip: bool, skip_bad_images: bool):
    self._source = source
    self._image_size = image_size
    self._aspect = aspect
    self._random_flip = random_flip
    self._skip_bad_images = skip_bad_images

  def __call__(self, position: int, rng: np.random.Generator) -> dict:
    # Drawn first and always, so the flip never depends on whether the image
    # decoded.
    flip = self._random_flip and rng.random() < 0.5
    index = int(position)
    try:
      example = self._source[index]
    except errors.ImageReadError as e:
      if not self._skip_bad_images:
        raise
      return {_SKIPPED_KEY: f"{e.path} ({e.reason})"}
    image = transforms.resize(example["image"], self._image_size,
                              self._aspect, flip=flip)
    return {"image": image, "label": example["label"]}


class _DropUnreadable:
  """grain filter that drops unreadable examples and remembers their files.

  Runs after `to_iter_dataset`, i.e. in the single thread that assembles
  batches, so the files it collects are exactly those skipped while the next
  batch was filled; `_CollateTrain` hands them over with that batch.
  """

  def __init__(self):
    self.pending: list[str] = []

  def __call__(self, element: dict) -> bool:
    if _SKIPPED_KEY in element:
      self.pending.append(element[_SKIPPED_KEY])
      return False
    return True


def _stack(arrays: Sequence[np.ndarray], shared: bool) -> np.ndarray:
  """np.stack, into shared memory when grain asked for it (in a worker)."""
  if not shared:
    return np.stack(arrays)
  shape = (len(arrays), *arrays[0].shape)
  out = grain.multiprocessing.SharedMemoryArray(shape, arrays[0].dtype)
  return np.stack(arrays, out=out)


class _CollateTrain:
  """Stacks examples into a batch of uint8 images and int32 labels.

  Images leave the worker processes as uint8 and are normalised in the
  training process (`_FinishIterator`). Each batch crosses in fresh shared
  memory, whose first touch costs about 0.8 ms per MB here; float32 would
  quadruple that, more than normalising costs (0.2 ms per 224px image).
  """

  def __init__(self, dropped: _DropUnreadable | None):
    self._dropped = dropped
    self._shared = False

  def enable_shared_memory_output(self) -> None:
    """Called by grain in worker processes: saves one copy of the batch."""
    self._shared = True

  def __call__(self, examples: Sequence[dict]) -> Batch:
    batch = {
        "image": _stack([e["image"] for e in examples], self._shared),
        "label": np.asarray([e["label"] for e in examples], np.int32),
    }
    if self._dropped is not None:
      batch[_SKIPPED_KEY] = list(self._dropped.pending)
      self._dropped.pending.clear()
    return batch


class _Finish(grain.IterDataset):
  """Last stage, in the training process; see `_FinishIterator`."""

  def __iter__(self) -> _FinishIterator:
    return _FinishIterator(self._parent.__iter__())


class _FinishIterator(grain.DatasetIterator):
  """Normalises each batch; logs and counts the files skipped for it.

  The count is part of the iterator state, so a resumed run keeps counting.
  """

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self.num_skipped = 0

  def __next__(self) -> Batch:
    batch = next(self._parent)
    for path in batch.pop(_SKIPPED_KEY, ()):
      self.num_skipped += 1
      logging.warning("Skipped an unreadable training image (%d so far in "
                      "this process): %s", self.num_skipped, path)
    batch["image"] = transforms.normalize(batch["image"])
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(),
            "num_skipped": self.num_skipped}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self.num_skipped = int(state["num_skipped"])


def num_skipped_images(iterator: grain.DatasetIterator) -> int:
  """Unreadable images a training iterator has dropped in this process.

  Counts since the start of training, across restores (the count is saved in
  the iterator state). Each one was also logged with its path as a warning.

  Args:
    iterator: an iterator from `create_train_iterator`.

  Returns:
    The count; always 0 unless `skip_bad_images` was set.
  """
  return iterator.num_skipped


def create_train_iterator(
    source,
    *,
    batch_size: int,
    image_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    num_workers: int = 0,
    num_threads: int | None = None,
    prefetch_batches: int = 2,
    random_flip: bool = True,
    balanced: bool = False,
    aspect: str = "squash",
    skip_bad_images: bool = False,
    start_epoch: int = 0,
    num_epochs: int | None = None,
) -> grain.DatasetIterator:
  """Builds this process's training iterator.

  Args:
    source: a random-access source (see `faer_jax.data.create_source`).
    batch_size: examples per batch in this process (global / process count).
    image_size: side S of the square model input.
    seed: the same seed (and arguments) gives the same batches.
    shard_index: this process (`jax.process_index()`).
    shard_count: number of processes (`jax.process_count()`); this process
      reads rows [shard_index * batch_size, (shard_index + 1) * batch_size)
      of each global batch of the shared stream.
    num_workers: grain worker processes; 0 reads in this process. The batches
      depend on it (each worker assembles whole batches), so resume with the
      same value.
    num_threads: reading threads in each worker, or here without workers
      (PIL decodes and resizes without holding the GIL). None: 4 without
      workers; 2 with them, which already run in parallel: more threads
      mostly fight over each worker's GIL (0.1 ms more CPU per image).
    prefetch_batches: batches buffered ahead, per worker.
    random_flip: mirror each image with probability 1/2.
    balanced: draw each class with equal probability (with replacement, an
      epoch's worth of draws per epoch) instead of shuffling; the common
      AffectNet protocol. Single-label sources only.
    aspect: how non-square images become square; see `transforms.ASPECTS`.
    skip_bad_images: drop examples whose image does not decode, logging and
      counting each (`num_skipped_images`); otherwise `ImageReadError` stops
      training with the file named.
    start_epoch: begin at this epoch (its order and flips, as if the earlier
      epochs had been read); for restarts without a saved iterator state.
    num_epochs: stop after this many epochs (counted from 0); None repeats
      forever. A batch spanning two epochs is normal: batches are cut from
      the stream of epochs.

  Returns:
    A checkpointable grain iterator of `Batch` dicts with 'image' and 'label'.
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}.")
  num_examples = len(source)
  if num_examples < batch_size * shard_count:
    raise ValueError(f"the source has {num_examples} training examples, fewer than one global batch "
                     f"({batch_size} x {shard_count} processes).")
  # One stream for all processes: the same order and flips everywhere.
  order_seed, flip_seed = (int(s) for s in np.random.SeedSequence([seed]).generate_state(2))
  labels = None
  if balanced:
    labels = np.asarray(source.labels)
    if labels.ndim != 1:
      raise ValueError("balanced sampling needs one class label per example;"
                       f" this source has labels of shape {labels.shape}.")
  ds = grain.MapDataset.range(num_examples).repeat(num_epochs)
  ds = ds.map_with_index(_EpochOrder(num_examples, order_seed, labels))
  # Seeded by (flip_seed, global stream position), before slicing, so the
  # flips of an epoch depend neither on where the run started nor on the
  # number of processes.
  ds = ds.random_map(
      _TrainExample(source, image_size, aspect, random_flip,
                    skip_bad_images), seed=flip_seed)
  ds = ds[start_epoch * num_examples:]
  # Only this process's rows of each global batch are read and decoded here.
  ds = _ProcessRows(ds, batch_size, shard_index, shard_count)
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=_threads(num_threads, num_workers),
      prefetch_buffer_size=prefetch_batches * batch_size))
  dropped = None
  if skip_bad_images:
    dropped = _DropUnreadable()
    ds = ds.filter(dropped)
  ds = ds.batch(batch_size, drop_remainder=True,
                batch_fn=_CollateTrain(dropped))
  _allow_worker_processes(num_workers)
  ds = ds.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=num_workers, per_worker_buffer_size=prefetch_batches))
  return iter(_Finish(ds))


# ------------------------------------------------------------------ evaluation
class _EvalBatch:
  """Batch number -> a full uint8 batch of this shard, padded past its end."""

  def __init__(self, source, indices: np.ndarray, batch_size: int,
               image_size: int, aspect: str):
    self._source = source
    self._indices = indices
    self._batch_size = batch_size
    self._image_size = image_size
    self._aspect = aspect

  def __call__(self, batch_number: int) -> Batch:
    start = batch_number * self._batch_size
    real = self._indices[start:start + self._batch_size]
    size = self._image_size
    label_shape = np.shape(self._source.labels)[1:]
    batch = {
        "image": np.zeros((self._batch_size, size, size, 3), np.uint8),
        "label": np.zeros((self._batch_size, *label_shape), np.int32),
        "mask": np.arange(self._batch_size) < len(real),
        "index": np.full(self._batch_size, -1, np.int32),
    }
    for row, index in enumerate(real):
      example = self._source[int(index)]
      batch["image"][row] = transforms.resize(example["image"], size,
                                              self._aspect)
      batch["label"][row] = example["label"]
      batch["index"][row] = index
    return batch


def _normalize_eval_batch(batch: Batch) -> Batch:
  """In the evaluating process, like `_FinishIterator`; padding stays 0."""
  batch["image"] = transforms.normalize(batch["image"])
  batch["image"][~batch["mask"]] = 0.0
  return batch


def num_eval_batches(num_examples: int, batch_size: int,
                     shard_count: int = 1) -> int:
  """Batches every process yields in evaluation (the same for all)."""
  largest_shard = -(-num_examples // shard_count)
  return max(1, math.ceil(largest_shard / batch_size))


def create_eval_iterator(
    source,
    *,
    batch_size: int,
    image_size: int,
    aspect: str = "squash",
    shard_index: int = 0,
    shard_count: int = 1,
    num_workers: int = 0,
    num_threads: int | None = None,
    prefetch_batches: int = 2,
) -> tuple[Iterator[Batch], int]:
  """Builds this process's evaluation iterator: one pass, in source order.

  Every example is read exactly once across processes. The last batches are
  padded with zero images and 'mask' False, and every process yields the same
  number of batches (one whose shard is shorter pads whole batches), so
  collective operations in a multi-process evaluation never wait forever.

  Args:
    source: a random-access source (see `faer_jax.data.create_source`).
    batch_size: examples per batch in this process.
    image_size: side S of the square model input.
    aspect: how non-square images become square; see `transforms.ASPECTS`.
    shard_index: this process (`jax.process_index()`).
    shard_count: number of processes (`jax.process_count()`).
    num_workers: grain worker processes; 0 reads in this process.
    num_threads: reading threads; see `create_train_iterator`.
    prefetch_batches: batches buffered ahead, per worker.

  Returns:
    (iterator of `Batch` with 'image', 'label', 'mask' and 'index', number of
    batches it yields). Build a new one for each evaluation.
  """
  indices = shard_indices(len(source), shard_index, shard_count)
  num_batches = num_eval_batches(len(source), batch_size, shard_count)
  # Whole batches are the unit of work, so workers (which take every
  # num_workers-th element) never cut a batch short, and grain's round-robin
  # over workers keeps source order.
  ds = grain.MapDataset.range(num_batches).map(
      _EvalBatch(source, indices, batch_size, image_size, aspect))
  # A thread reads a whole batch, so keep at least one batch per thread.
  num_threads = _threads(num_threads, num_workers)
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads,
      prefetch_buffer_size=max(prefetch_batches, num_threads)))
  _allow_worker_processes(num_workers)
  ds = ds.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=num_workers, per_worker_buffer_size=prefetch_batches))
  return iter(ds.map(_normalize_eval_batch)), num_batches
