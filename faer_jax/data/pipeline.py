"""The grain input pipeline: host-local numpy batches for training and eval.

Each JAX process reads only its own contiguous share of a source and yields
numpy batches of its per-process batch size; turning them into global device
arrays belongs to the training loop. Batches are dicts:

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


def _allow_worker_processes() -> None:
  """Lets grain start workers in programs that do not parse absl flags.

  grain reads an absl flag when it starts worker processes (once JAX is
  imported); in a program that never parsed flags (argparse CLIs, pytest) the
  read raises UnparsedFlagAccessError. Marking the flags parsed leaves them
  at their defaults, and `absl.app.run` still parses the command line later.
  """
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


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
class _BalancedDraw:
  """Stream position -> shard position, each class equally likely.

  Equivalent to PyTorch's ``WeightedRandomSampler`` with weights 1 / (count
  of the example's class), with replacement: pick a class uniformly, then an
  example of it uniformly. Each draw uses its own generator seeded by (seed,
  position), so draws need no state and resuming anywhere is exact.
  """

  def __init__(self, labels: np.ndarray, seed: int):
    self._seed = seed
    self._members = [np.flatnonzero(labels == c) for c in np.unique(labels)]

  def __call__(self, position: int, _: Any) -> int:
    rng = np.random.default_rng([self._seed, position])
    members = self._members[rng.integers(len(self._members))]
    return int(members[rng.integers(len(members))])


class _TrainExample:
  """Shard position -> resized (maybe flipped) uint8 image and label."""

  def __init__(self, source, indices: np.ndarray, image_size: int,
               aspect: str, random_flip: bool, skip_bad_images: bool):
    self._source = source
    self._indices = indices
    self._image_size = image_size
    self._aspect = aspect
    self._random_flip = random_flip
    self._skip_bad_images = skip_bad_images

  def __call__(self, position: int, rng: np.random.Generator) -> dict:
    # Drawn first and always, so the flip never depends on whether the image
    # decoded.
    flip = self._random_flip and rng.random() < 0.5
    index = int(self._indices[position])
    try:
      example = self._source[index]
    except errors.ImageReadError as e:
      if not self._skip_bad_images:
        raise
      return {_SKIPPED_KEY: f"{e.path} ({e.reason})"}
    image = transforms.resize(example["image"], self._image_size,
                              self._aspect)
    if flip:
      image = transforms.hflip(image)
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

  Images cross from the worker processes as uint8 and are normalised in the
  training process (`_FinishIterator`): a quarter of the bytes through shared
  memory, whose fresh pages cost about as much as the normalisation itself.
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
    num_threads: int = 4,
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
    shard_count: number of processes (`jax.process_count()`).
    num_workers: grain worker processes; 0 reads in this process. The batches
      depend on it (each worker assembles whole batches), so resume with the
      same value.
    num_threads: reading threads per worker (PIL decodes without the GIL).
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
  indices = shard_indices(len(source), shard_index, shard_count)
  if not len(indices):
    raise ValueError(f"process {shard_index} of {shard_count} has no "
                     f"training examples ({len(source)} in the source).")
  # Different streams for order and flips, and for each process.
  order_seed, flip_seed = (int(s) for s in np.random.SeedSequence(
      [seed, shard_index]).generate_state(2))
  if balanced:
    labels = np.asarray(source.labels)[indices]
    if labels.ndim != 1:
      raise ValueError("balanced sampling needs one class label per example;"
                       f" this source has labels of shape {labels.shape}.")
    ds = grain.MapDataset.range(len(indices)).repeat(num_epochs)
    ds = ds.map_with_index(_BalancedDraw(labels, order_seed))
  else:
    # grain folds the epoch into the shuffle seed: a new order every epoch.
    ds = grain.MapDataset.range(len(indices)).shuffle(seed=order_seed)
    ds = ds.repeat(num_epochs)
  # Seeded by (flip_seed, stream position), before slicing, so the flips of
  # an epoch do not depend on where the run started.
  ds = ds.random_map(
      _TrainExample(source, indices, image_size, aspect, random_flip,
                    skip_bad_images), seed=flip_seed)
  ds = ds[start_epoch * len(indices):]
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads,
      prefetch_buffer_size=prefetch_batches * batch_size))
  dropped = None
  if skip_bad_images:
    dropped = _DropUnreadable()
    ds = ds.filter(dropped)
  ds = ds.batch(batch_size, drop_remainder=True,
                batch_fn=_CollateTrain(dropped))
  _allow_worker_processes()
  ds = ds.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=num_workers, per_worker_buffer_size=prefetch_batches))
  return iter(_Finish(ds))


# ------------------------------------------------------------------ evaluation
class _EvalBatch:
  """Batch number -> a full batch of this shard, padded past its end."""

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
    images, labels = [], []
    for index in real:
      example = self._source[int(index)]
      images.append(transforms.resize(example["image"], self._image_size,
                                      self._aspect))
      labels.append(example["label"])
    num_pad = self._batch_size - len(real)
    size = self._image_size
    image = np.zeros((self._batch_size, size, size, 3), np.float32)
    if len(real):
      image[:len(real)] = transforms.normalize(np.stack(images))
    label_shape = np.shape(labels[0]) if labels else np.shape(
        self._source.labels[0])
    label = np.zeros((self._batch_size, *label_shape), np.int32)
    label[:len(real)] = np.asarray(labels, np.int32).reshape(
        len(real), *label_shape)
    return {
        "image": image,
        "label": label,
        "mask": np.arange(self._batch_size) < len(real),
        "index": np.concatenate(
            [real, np.full(num_pad, -1)]).astype(np.int32),
    }


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
    num_threads: int = 4,
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
    num_threads: reading threads per worker.
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
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads,
      prefetch_buffer_size=max(prefetch_batches, num_threads)))
  _allow_worker_processes()
  ds = ds.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=num_workers, per_worker_buffer_size=prefetch_batches))
  return iter(ds), num_batches
