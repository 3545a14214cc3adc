"""TFDS builder `rafdb`: RAF-DB basic, seven expressions, from the owners' files.

Labels and file names come from `faer_jax.data.rafdb`, the same parser the
file source uses; see `faer_jax.data.tfds_builders` for how to build.
"""

import os

import tensorflow_datasets as tfds

from faer_jax.data import rafdb
from faer_jax.data.errors import DATASET_HOMES
from faer_jax.data.tfds_builders import examples_of


class Rafdb(tfds.core.GeneratorBasedBuilder):
  """RAF-DB basic: aligned 100x100 faces; 12,271 train and 3,068 test."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Aligned images of RAF-DB basic."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  RAF-DB is distributed by request to its owners: {DATASET_HOMES["RAF-DB"]}.
  Place the unpacked folder in the manual directory as it comes, with
  basic/EmoLabel/list_patition_label.txt and basic/Image/aligned/ (or point
  the manual directory at that folder, or at `basic/` itself). The
  class-per-folder re-packaging {{train,test}}/{{1..7}}/ is accepted too.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Real-world Affective Faces (basic): seven basic expressions.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=rafdb.CLASS_NAMES),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="http://www.whdeng.cn/raf/model1.html",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = os.fspath(dl_manager.manual_dir)
    return {split: self._generate_examples(root, split) for split in rafdb.SPLITS}

  def _generate_examples(self, root: str, split: str):
    return examples_of(rafdb.rafdb_source(root, split))
