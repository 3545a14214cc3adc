"""TFDS builders for RAF-DB and AffectNet, from the owners' files.

Both datasets are distributed on request only, so the builders read a manual
download folder: the owners' folder as unpacked, in any layout the file
sources accept. They prepare ArrayRecord files, which `tfds.data_source` and
`faer_jax.data.TfdsSource` read without TensorFlow:

    from faer_jax.data import tfds_builders
    tfds_builders.build("affectnet/seven", manual_dir="/data/AffectNet",
                        data_dir="/data/tensorflow_datasets")
    source = faer_jax.data.create_source(
        "tfds", "/data/tensorflow_datasets", "train", name="affectnet/seven")

Importing a builder module registers its builder with tensorflow_datasets;
nothing under `faer_jax.data` imports them, so that the file sources never
load TFDS. Run `python -m faer_jax.data check` on the manual folder first.
"""

import importlib
import os

from faer_jax.data.errors import ImageReadError

# Builder name -> module defining it.
_MODULES = {
    "rafdb": "faer_jax.data.tfds_builders.rafdb",
    "affectnet": "faer_jax.data.tfds_builders.affectnet",
}


def examples_of(source):
  """Yields the (key, example) pairs of a file source for `_generate_examples`.

  Images are stored as their files' bytes, not re-encoded. The key and the
  `file_name` feature are the image's path relative to the dataset root.

  Raises:
    ImageReadError: a listed image does not exist.
  """
  for i in range(len(source)):
    path = source.path(i)
    if not os.path.isfile(path):
      raise ImageReadError(path, "file not found")
    key = os.path.relpath(path, source.root)
    yield key, {"image": path, "label": int(source.labels[i]), "file_name": key}


def build(name: str, *, manual_dir: str, data_dir: str) -> str:
  """Prepares a dataset in ArrayRecord format.

  Args:
    name: 'rafdb', 'affectnet/seven' or 'affectnet/eight'.
    manual_dir: the owners' dataset folder.
    data_dir: the TFDS data_dir to write to.

  Returns:
    The folder that now holds the prepared dataset.
  """
  import tensorflow_datasets as tfds

  base_name = name.split("/")[0]
  if base_name not in _MODULES:
    raise ValueError(f"unknown builder {name!r}; valid builders: {', '.join(_MODULES)}")
  importlib.import_module(_MODULES[base_name])  # registers the builder
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return os.fspath(builder.data_dir)
