"""Datasets as their owners ship them, as random-access sources for grain.

    source = create_source("rafdb", "/data/RAF-DB", "train")
    example = source[0]   # {'image': uint8 (H, W, 3) RGB, 'label': int}
    source.class_names    # ('Surprise', 'Fear', ...), in label order

Every source has `__len__`, `__getitem__`, `path(i)`, `class_names`, `task`
('fer' for one expression label, 'fae' for a 0/1 attribute vector), `split`,
`labels` (all labels as int32, without decoding images), `layout`, `root`,
`excluded_counts` and `skipped`. Check a dataset before training with
`python -m faer_jax.data check --dataset rafdb --root PATH`.
"""

import inspect

from faer_jax.data.affectnet import affectnet_source
from faer_jax.data.celeba import celeba_source
from faer_jax.data.errors import DataError, ImageReadError
from faer_jax.data.images import ImageFileSource, decode_image
from faer_jax.data.rafdb import rafdb_source
from faer_jax.data.tfds_source import TfdsSource

# For 'tfds', `root` is the TFDS data_dir and the option `name` the dataset.
_FACTORIES = {
    "rafdb": rafdb_source,
    "affectnet": affectnet_source,
    "celeba": celeba_source,
    "tfds": TfdsSource,
}
DATASETS = tuple(_FACTORIES)


def create_source(dataset: str, root: str, split: str, **options):
  """Opens one split of a dataset, detecting its layout under `root`.

  Args:
    dataset: 'rafdb', 'affectnet', 'celeba' or 'tfds'.
    root: the dataset's folder (for 'tfds', the TFDS data_dir).
    split: rafdb 'train'|'test'; affectnet 'train'|'validation' ('test' is
      an alias); celeba 'train'|'validation'|'test'; tfds any prepared split.
    **options: the dataset's keyword options: `skip_bad_images` and
      `min_size` for all; rafdb `aligned`; affectnet `num_classes`,
      `crop_face`; tfds `name` (required).

  Returns:
    An `ImageFileSource`, or a `TfdsSource` for 'tfds'.

  Raises:
    ValueError: an unknown dataset, split or option, or a missing option.
    DataError: the data on disk is missing or malformed.
  """
  if dataset not in _FACTORIES:
    raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
  factory = _FACTORIES[dataset]
  parameters = inspect.signature(factory).parameters.values()
  keyword_only = [p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
  valid = [p.name for p in keyword_only]
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} for dataset {dataset!r}; valid options: {valid}")
  missing = [p.name for p in keyword_only if p.default is p.empty and p.name not in options]
  if missing:
    raise ValueError(f"dataset {dataset!r} needs the option(s) {missing}")
  return factory(root, split, **options)


__all__ = [
    "DATASETS",
    "DataError",
    "ImageFileSource",
    "ImageReadError",
    "TfdsSource",
    "create_source",
    "decode_image",
]
