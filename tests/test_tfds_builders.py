"""Tests for the TFDS builders and the TFDS source.

tensorflow-datasets (4.9.10 here) writes and reads ArrayRecord without
TensorFlow, so these build real datasets from tiny trees and read them back.
"""

import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from faer_jax.data import DataError, celeba, create_source, tfds_builders
from faer_jax.data.check import check_dataset
from faer_jax.data.tfds_builders.affectnet import Affectnet
from faer_jax.data.tfds_builders.rafdb import Rafdb
from test_data_sources import label_value, make_affectnet, make_rafdb


def test_imports_stay_free_of_tensorflow():
  code = (
      "import sys, faer_jax.data\n"
      "assert 'tensorflow_datasets' not in sys.modules, 'faer_jax.data imports tfds'\n"
      "import faer_jax.data.tfds_builders.rafdb, faer_jax.data.tfds_builders.affectnet\n"
      "assert 'tensorflow' not in sys.modules, 'a builder imports tensorflow'\n"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr


def test_rafdb_generate_examples_reuses_the_source(tmp_path):
  root = make_rafdb(tmp_path / "manual")
  builder = Rafdb(data_dir=str(tmp_path / "tfds"))
  assert builder.info.features["label"].names == ["Surprise", "Fear", "Disgust", "Happiness",
                                                  "Sadness", "Anger", "Neutral"]
  examples = dict(builder._generate_examples(os.path.join(root, "basic"), "test"))
  key = os.path.join("Image", "aligned", "test_0001_aligned.jpg")
  assert sorted(examples) == [key, os.path.join("Image", "aligned", "test_0002_aligned.jpg")]
  assert examples[key]["label"] == 3 and examples[key]["file_name"] == key
  assert os.path.isfile(examples[key]["image"])


def test_affectnet_generate_examples_per_config(tmp_path):
  root = make_affectnet(tmp_path / "manual")
  seven = Affectnet(config="seven", data_dir=str(tmp_path / "tfds"))
  eight = Affectnet(config="eight", data_dir=str(tmp_path / "tfds"))
  assert seven.info.features["label"].num_classes == 7
  assert eight.info.features["label"].names[-1] == "Contempt"
  labels = lambda builder: sorted(e["label"] for _, e in builder._generate_examples(root, "validation"))
  assert labels(seven) == [0, 6] and labels(eight) == [0, 6, 7]


def test_generate_examples_refuses_a_missing_image(tmp_path):
  root = make_rafdb(tmp_path / "manual")
  os.remove(os.path.join(root, "basic", "Image", "aligned", "test_0002_aligned.jpg"))
  with pytest.raises(DataError, match="test_0002_aligned.jpg"):
    list(Rafdb(data_dir=str(tmp_path / "tfds"))._generate_examples(root, "test"))


def test_build_rafdb_and_read_back(tmp_path):
  manual = make_rafdb(tmp_path / "manual")
  data_dir = str(tmp_path / "tfds")
  tfds_builders.build("rafdb", manual_dir=manual, data_dir=data_dir)
  source = create_source("tfds", data_dir, "train", name="rafdb")
  assert (len(source), source.task, source.layout) == (4, "fer", "tfds")
  assert source.class_names[0] == "Surprise"
  by_file = {}
  for i in range(len(source)):
    example = source[i]
    assert example["image"].dtype == np.uint8 and example["image"].shape == (10, 12, 3)
    assert abs(example["image"].mean() - label_value(example["label"])) < 3
    by_file[os.path.basename(source.path(i).split(" (")[1].rstrip(")"))] = example["label"]
  assert by_file == {"train_00001_aligned.jpg": 4, "train_00002_aligned.jpg": 0,
                     "train_00003_aligned.jpg": 6, "train_00004_aligned.jpg": 4}
  assert sorted(source.labels.tolist()) == [0, 4, 4, 6]
  copy = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(copy[0]["image"], source[0]["image"])
  report = check_dataset("tfds", data_dir, name="rafdb")
  assert report["splits"]["test"] == {"num_examples": 2, "class_counts": [0, 1, 0, 1, 0, 0, 0]}
  with pytest.raises(IndexError):
    source[4]


def test_build_affectnet_eight(tmp_path):
  data_dir = str(tmp_path / "tfds")
  tfds_builders.build("affectnet/eight", manual_dir=make_affectnet(tmp_path / "m"), data_dir=data_dir)
  source = create_source("tfds", data_dir, "validation", name="affectnet/eight")
  assert source.class_names[-1] == "Contempt"
  assert sorted(source.labels.tolist()) == [0, 6, 7]


class CelebAttributesForTest(tfds.core.GeneratorBasedBuilder):
  """A stand-in with the features of TFDS's `celeb_a`: a dict of 40 booleans."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(218, 178, 3)),
        "attributes": {name: np.bool_ for name in celeba.ATTRIBUTE_NAMES},
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(3):
      # Encoded here: TFDS encodes arrays with TensorFlow, but stores bytes as given.
      image = io.BytesIO()
      Image.new("RGB", (178, 218), (50 * i,) * 3).save(image, format="PNG")
      attributes = {name: (a + i) % 2 == 0 for a, name in enumerate(celeba.ATTRIBUTE_NAMES)}
      yield str(i), {"image": image.getvalue(), "attributes": attributes}


def test_tfds_attributes_follow_the_file_order(tmp_path):
  data_dir = str(tmp_path / "tfds")
  CelebAttributesForTest(data_dir=data_dir, file_format="array_record").download_and_prepare()
  source = create_source("tfds", data_dir, "train", name="celeb_attributes_for_test")
  assert source.task == "fae" and source.class_names == celeba.ATTRIBUTE_NAMES
  for i in range(len(source)):
    example = source[i]
    shade = int(round(example["image"].mean() / 50))
    expected = [(a + shade) % 2 == 0 for a in range(40)]
    np.testing.assert_array_equal(example["label"], expected)
    np.testing.assert_array_equal(source.labels[i], expected)
  assert source.labels.shape == (3, 40) and source.labels.dtype == np.int32


def test_tfds_missing_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(DataError, match="tfds_builders.build"):
    create_source("tfds", str(tmp_path), "train", name="rafdb")
  os.makedirs(tmp_path / "rafdb")
  with pytest.raises(DataError, match="cannot open TFDS dataset 'rafdb'"):
    create_source("tfds", str(tmp_path), "train", name="rafdb")
