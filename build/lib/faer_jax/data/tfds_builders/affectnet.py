"""TFDS builder `affectnet`: AffectNet's manually annotated faces, 7 or 8 classes.

Configs `seven` (codes 0-6) and `eight` (codes 0-7); the other codes are left
out, as in training. Labels and file names come from `faer_jax.data.affectnet`,
the same parser the file source uses; see `faer_jax.data.tfds_builders` for how
to build. Images are stored whole (not cropped to the face box).
"""

import dataclasses
import os

import tensorflow_datasets as tfds

from faer_jax.data import affectnet
from faer_jax.data.errors import DATASET_HOMES
from faer_jax.data.tfds_builders import examples_of


@dataclasses.dataclass
class AffectnetConfig(tfds.core.BuilderConfig):
  """Which protocol: `num_classes` 7 or 8."""

  num_classes: int = 7


class Affectnet(tfds.core.GeneratorBasedBuilder):
  """AffectNet, manually annotated part; validation is the protocol's test set."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Manually annotated images, 7- and 8-class protocols."}
  BUILDER_CONFIGS = [
      AffectnetConfig(name="seven", num_classes=7, description="Codes 0-6 (no Contempt)."),
      AffectnetConfig(name="eight", num_classes=8, description="Codes 0-7."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  AffectNet is distributed by request to its owners: {DATASET_HOMES["AffectNet"]}.
  Place the unpacked folder in the manual directory as it comes: either
  Manually_Annotated_file_lists/{{training,validation}}.csv with
  Manually_Annotated_Images/ (possibly both under Manually_Annotated/), or the
  newer release's train_set/ and val_set/ folders.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="AffectNet: facial expressions in the wild, manually annotated.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(
                names=affectnet.CLASS_NAMES[: self.builder_config.num_classes]
            ),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="http://mohammadmahoor.com/affectnet/",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = os.fspath(dl_manager.manual_dir)
    return {split: self._generate_examples(root, split) for split in affectnet.SPLITS}

  def _generate_examples(self, root: str, split: str):
    source = affectnet.affectnet_source(root, split, num_classes=self.builder_config.num_classes)
    return examples_of(source)
