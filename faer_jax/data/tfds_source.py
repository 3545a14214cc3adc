"""Any dataset prepared by tensorflow-datasets in ArrayRecord format.

`tfds.data_source` gives random access without TensorFlow. This wraps it to
the same contract as the file-based sources: 'fer' datasets have a `label`
ClassLabel (our `rafdb` and `affectnet` builders), 'fae' datasets an
`attributes` dict of booleans (TFDS's `celeb_a`).

tensorflow_datasets is imported only when a source is opened, so that
`faer_jax.data` stays light for users of the file-based sources.
"""

import functools
import os

import numpy as np

from faer_jax.data import celeba
from faer_jax.data.errors import DataError
from faer_jax.data.images import Size, checked_index, decode_image

_HOW_TO_PREPARE = (
    "Prepare it in ArrayRecord format first, e.g. for our builders "
    "`faer_jax.data.tfds_builders.build('rafdb', manual_dir=..., data_dir=...)`, or for "
    "TFDS's own `tfds.builder(name, data_dir=..., file_format='array_record')"
    ".download_and_prepare()`."
)

# What tfds raises for a dataset, version, split or format that is not there.
_TFDS_ERRORS = (ValueError, NotImplementedError, AssertionError, FileNotFoundError)


def _check_prepared(root: str, name: str) -> None:
  dataset_dir = os.path.join(root, name.split("/")[0].split(":")[0])
  if not os.path.isdir(dataset_dir):
    raise DataError(f"no TFDS dataset {name!r} under {root}: expected {dataset_dir}. {_HOW_TO_PREPARE}")


def _open_error(root: str, name: str, split: str | None, error: Exception) -> DataError:
  # tfds's messages can list every registered dataset; the first line suffices.
  reason = str(error).splitlines()[0] if str(error) else type(error).__name__
  where = f"{name!r}" + (f" split {split!r}" if split else "")
  return DataError(f"cannot open TFDS dataset {where} from {root}: {reason} {_HOW_TO_PREPARE}")


def tfds_splits(root: str, name: str) -> tuple[str, ...]:
  """The split names of a prepared TFDS dataset.

  Raises:
    DataError: the dataset is not prepared under `root`.
  """
  import tensorflow_datasets as tfds

  _check_prepared(root, name)
  try:
    splits = tuple(tfds.builder(name, data_dir=root).info.splits)
  except _TFDS_ERRORS as e:
    raise _open_error(root, name, None, e) from None
  if not splits:
    raise DataError(f"TFDS dataset {name!r} under {root} has no prepared splits. {_HOW_TO_PREPARE}")
  return splits


class TfdsSource:
  """One split of a TFDS dataset, read by index; a grain data source.

  Pickles as (name, split, data_dir) plus the labels: the TFDS reader is
  reopened in each worker process rather than copied.

  Attributes:
    class_names: from the `label` ClassLabel, or the attribute names (in
      CelebA's file order when they are CelebA's 40 attributes).
    task: 'fer' or 'fae'.
    split: the split name.
    layout: 'tfds'.
    root: the TFDS data_dir.
    name: the TFDS name, e.g. 'celeb_a' or 'affectnet/seven'.
    excluded_counts: always empty (exclusions happen when preparing).
    skipped: always empty (records cannot be missing).
  """

  def __init__(self, root: str, split: str, *, name: str, skip_bad_images: bool = False,
               min_size: Size | None = None):
    """Opens the split.

    Args:
      root: the TFDS data_dir.
      split: a split of the prepared dataset.
      name: the TFDS name, with optional config and version
        ('affectnet/eight:1.0.0').
      skip_bad_images: accepted for a uniform interface; records cannot be
        missing, and bad encodings are the pipeline's to skip.
      min_size: see `decode_image`.

    Raises:
      DataError: the dataset or split is not prepared there, or its features
        are neither a `label` ClassLabel nor an `attributes` dict.
    """
    del skip_bad_images
    self.name = name
    self.split = split
    self.root = root
    self.layout = "tfds"
    self.excluded_counts = {}
    self.skipped = []
    self._min_size = min_size
    self._reader = None
    features = self._data_source().dataset_info.features
    if "image" not in features:
      raise DataError(f"TFDS dataset {name!r} has no 'image' feature: {sorted(features)}")
    if "attributes" in features:
      self.task = "fae"
      keys = tuple(features["attributes"].keys())
      # CelebA's names in the file's order; TFDS stores them sorted.
      known = set(keys) == set(celeba.ATTRIBUTE_NAMES)
      self.class_names = celeba.ATTRIBUTE_NAMES if known else keys
    elif "label" in features and hasattr(features["label"], "names"):
      self.task = "fer"
      self.class_names = tuple(features["label"].names)
    else:
      raise DataError(
          f"TFDS dataset {name!r} has neither a 'label' ClassLabel nor an 'attributes' "
          f"dict: {sorted(features)}"
      )

  def _data_source(self):
    if self._reader is None:
      import tensorflow_datasets as tfds

      _check_prepared(self.root, self.name)
      try:
        self._reader = tfds.data_source(
            self.name, split=self.split, data_dir=self.root, download=False,
            # We decode ourselves, to get RGB from greyscale files too.
            decoders={"image": tfds.decode.SkipDecoding()},
        )
      except _TFDS_ERRORS as e:
        raise _open_error(self.root, self.name, self.split, e) from None
    return self._reader

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_reader"] = None
    return state

  def __len__(self) -> int:
    return len(self._data_source())

  def _label(self, record):
    if self.task == "fer":
      return int(record["label"])
    return np.array([record["attributes"][n] for n in self.class_names], np.int32)

  def _describe(self, index: int, record) -> str:
    description = f"tfds:{self.name}/{self.split}[{index}]"
    if "file_name" in record:
      file_name = record["file_name"]
      file_name = file_name.decode() if isinstance(file_name, bytes) else str(file_name)
      description += f" ({file_name})"
    return description

  def path(self, index: int) -> str:
    """A descriptive id of example `index`, with its file name when stored."""
    i = checked_index(index, len(self))
    return self._describe(i, self._data_source()[i])

  def __getitem__(self, index: int) -> dict:
    """Decodes example `index` to {'image': uint8 HWC RGB, 'label': ...}."""
    i = checked_index(index, len(self))
    record = self._data_source()[i]
    image = decode_image(record["image"], name=self._describe(i, record), min_size=self._min_size)
    return {"image": image, "label": self._label(record)}

  @functools.cached_property
  def labels(self) -> np.ndarray:
    """All labels, int32, (N,) or (N, 40); reads every record once, on first use."""
    reader = self._data_source()
    labels = [self._label(record) for record in reader]
    shape = (len(labels),) if self.task == "fer" else (len(labels), len(self.class_names))
    return np.array(labels, np.int32).reshape(shape)

  def __repr__(self) -> str:
    return f"TfdsSource(name={self.name!r}, split={self.split!r}, root={self.root!r})"
