"""Tests for the synthetic face sets: the owners' layouts, determinism, and
that the real loaders read them."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from faer_jax.data import create_source
from faer_jax.data import synth

OFFICIAL_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs "
    "Big_Lips Big_Nose Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows "
    "Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
    "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns "
    "Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()


def tree_bytes(root):
  """{relative path: bytes} of every file under root."""
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      out[os.path.relpath(path, root)] = open(path, "rb").read()
  return out


@pytest.fixture(scope="module")
def rafdb(tmp_path_factory):
  return synth.make_synthetic_rafdb(tmp_path_factory.mktemp("rafdb"),
                                    num_train=23, num_test=9, seed=5, workers=1)


@pytest.fixture(scope="module")
def celeba(tmp_path_factory):
  return synth.make_synthetic_celeba(tmp_path_factory.mktemp("celeba"),
                                     num_train=40, num_val=5, num_test=6,
                                     seed=5, workers=1)


def test_rafdb_label_file_is_in_the_owners_format(rafdb):
  text = (rafdb / "basic/EmoLabel/list_patition_label.txt").read_text()
  assert not text.endswith("\n")
  lines = text.split("\n")
  names = [line.split(" ")[0] for line in lines]
  assert names == ([f"train_{i:05d}.jpg" for i in range(1, 24)] +
                   [f"test_{i:04d}.jpg" for i in range(1, 10)])
  labels = np.array([int(line.split(" ")[1]) for line in lines])
  assert all(len(line.split(" ")) == 2 for line in lines)
  # Balanced: 23 train images over 7 classes is 3 or 4 of each.
  assert set(np.bincount(labels[:23], minlength=8)[1:]) == {3, 4}
  assert set(np.bincount(labels[23:], minlength=8)[1:]) == {1, 2}


def test_rafdb_images_are_100px_aligned_jpegs(rafdb):
  image_dir = rafdb / "basic/Image/aligned"
  assert len(os.listdir(image_dir)) == 32
  with Image.open(image_dir / "train_00001_aligned.jpg") as image:
    assert image.format == "JPEG" and image.size == (100, 100)
  with Image.open(image_dir / "test_0009_aligned.jpg") as image:
    assert image.mode == "RGB"


def test_rafdb_is_read_by_the_real_loader(rafdb):
  train = create_source("rafdb", str(rafdb), "train")
  test = create_source("rafdb", str(rafdb), "test")
  assert (len(train), len(test)) == (23, 9)
  assert train.class_names == synth.EXPRESSIONS
  assert train[0]["image"].shape == (100, 100, 3)


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
  kwargs = dict(num_train=70, num_test=7, seed=11)
  a = synth.make_synthetic_rafdb(tmp_path / "a", workers=1, **kwargs)
  b = synth.make_synthetic_rafdb(tmp_path / "b", workers=2, **kwargs)
  assert tree_bytes(a) == tree_bytes(b)
  c = synth.make_synthetic_rafdb(tmp_path / "c", num_train=7, num_test=7,
                                 seed=12, workers=1)
  assert (tree_bytes(c)["basic/Image/aligned/train_00001_aligned.jpg"] !=
          tree_bytes(a)["basic/Image/aligned/train_00001_aligned.jpg"])


def test_rafdb_names_limit_the_counts(tmp_path):
  with pytest.raises(ValueError, match="9999 test"):
    synth.make_synthetic_rafdb(tmp_path, num_train=1, num_test=10_000)


def test_celeba_files_are_in_the_owners_format(celeba):
  lines = (celeba / "Anno/list_attr_celeba.txt").read_text().splitlines()
  assert lines[0] == "51"
  assert lines[1].split() == OFFICIAL_ATTRIBUTES
  rows = [line.split() for line in lines[2:]]
  assert [r[0] for r in rows] == [f"{i:06d}.jpg" for i in range(1, 52)]
  assert all(len(r) == 41 and set(r[1:]) <= {"1", "-1"} for r in rows)
  assert "  1" in lines[2] or "  1" in lines[3]  # The owners' padding.
  partition = (celeba / "Eval/list_eval_partition.txt").read_text().split()
  assert partition[::2] == [r[0] for r in rows]
  assert partition[1::2] == ["0"] * 40 + ["1"] * 5 + ["2"] * 6
  with Image.open(celeba / "Img/img_align_celeba/000051.jpg") as image:
    assert image.size == (178, 218)


def test_celeba_is_read_by_the_real_loader(celeba):
  source = create_source("celeba", str(celeba), "validation")
  assert len(source) == 5 and source.labels.shape == (5, 40)
  assert source.class_names == tuple(OFFICIAL_ATTRIBUTES)


def test_sampled_attributes_are_consistent():
  index = {name: k for k, name in enumerate(synth.ATTRIBUTES)}
  rows = np.array([[synth.sample_attributes(np.random.default_rng(i))[name]
                    for name in synth.ATTRIBUTES] for i in range(400)])
  column = lambda name: rows[:, index[name]]
  hair = rows[:, [index[n] for n in ("Black_Hair", "Blond_Hair", "Brown_Hair",
                                     "Gray_Hair")]]
  assert (hair.sum(axis=1) <= 1).all()
  assert not (column("Bald") & hair.any(axis=1)).any()
  assert not (column("Goatee") & column("No_Beard")).any()
  assert not (column("Straight_Hair") & column("Wavy_Hair")).any()
  assert not ((column("Mustache") | column("Goatee")) & ~column("Male")).any()
  # Every attribute occurs, and none is always on.
  assert (rows.mean(axis=0) > 0).all() and (rows.mean(axis=0) < 1).all()


def test_expressions_are_learnable_from_pixels(tmp_path):
  """A linear classifier on 24x24 grey pixels must beat chance by far."""
  root = synth.make_synthetic_rafdb(tmp_path, num_train=700, num_test=280,
                                    seed=0)
  pixels, labels = {}, {}
  for split in ("train", "test"):
    source = create_source("rafdb", str(root), split)
    pixels[split] = np.stack([
        np.asarray(Image.open(source.path(i)).convert("L").resize((24, 24)),
                   np.float32).ravel() / 255 for i in range(len(source))])
    labels[split] = source.labels
  mean, std = pixels["train"].mean(0), pixels["train"].std(0) + 1e-3
  x = {k: (v - mean) / std for k, v in pixels.items()}
  weights = np.zeros((x["train"].shape[1], 7))
  targets = np.eye(7)[labels["train"]]
  for _ in range(300):  # Full-batch softmax regression.
    logits = x["train"] @ weights
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    weights -= 0.5 * (x["train"].T @ (probs - targets) / len(targets) +
                      1e-3 * weights)
  accuracy = ((x["test"] @ weights).argmax(1) == labels["test"]).mean()
  assert accuracy > 0.3  # Chance is 1/7; this seed gives 0.39.


def test_ensure_creates_once_and_never_leaves_half_a_tree(tmp_path,
                                                          monkeypatch):
  def interrupted(out_dir, *args):
    (out_dir / "basic").mkdir()
    raise KeyboardInterrupt

  with monkeypatch.context() as patch:
    patch.setattr(synth, "make_synthetic_rafdb", interrupted)
    with pytest.raises(KeyboardInterrupt):
      synth.ensure_synthetic_rafdb(tmp_path, num_train=7, num_test=7)
  assert os.listdir(tmp_path) == []
  root = synth.ensure_synthetic_rafdb(tmp_path, num_train=7, num_test=7)
  before = tree_bytes(root)
  stamp = os.stat(root / "basic/EmoLabel/list_patition_label.txt").st_mtime_ns
  assert synth.ensure_synthetic_rafdb(tmp_path, num_train=7,
                                      num_test=7) == root
  assert tree_bytes(root) == before
  assert os.stat(root / "basic/EmoLabel/list_patition_label.txt"
                 ).st_mtime_ns == stamp
  assert os.listdir(tmp_path) == [root.name]
  assert len(create_source("rafdb", str(root), "train")) == 7


def test_command_line_writes_both_layouts(tmp_path):
  assert synth.main(["--layout", "celeba", "--out", str(tmp_path / "c"),
                     "--num-train", "3", "--num-val", "1", "--num-test", "1",
                     "--size", "89"]) == 0
  with Image.open(tmp_path / "c/Img/img_align_celeba/000005.jpg") as image:
    assert image.size == (89, 109)
  result = subprocess.run(
      [sys.executable, "-m", "faer_jax.data", "synth", "--layout", "rafdb",
       "--out", str(tmp_path / "r"), "--num-train", "7", "--num-test", "7",
       "--size", "64"], capture_output=True, text=True, check=True)
  assert "rafdb" in result.stdout
  with Image.open(tmp_path / "r/basic/Image/aligned/test_0007_aligned.jpg"
                  ) as image:
    assert image.size == (64, 64)


def test_affectnet_csv_release_is_read_by_the_real_loader(tmp_path):
  assert synth.main(["--layout", "affectnet", "--out", str(tmp_path), "--num-train", "400", "--num-val", "120",
                     "--size", "48", "--workers", "1"]) == 0
  with open(tmp_path / "Manually_Annotated_file_lists/training.csv") as f:
    header, *rows = [line.rstrip("\n").split(",") for line in f]
  assert tuple(header) == synth.CSV_HEADER and len(rows) == 400
  assert all(len(r) == 9 and len(r[5].split(";")) == 136 for r in rows)
  codes = np.array([int(r[6]) for r in rows])
  excluded = codes >= 8
  assert 0 < excluded.sum() < 40 and set(np.bincount(codes[~excluded], minlength=8)) <= {45, 46, 47, 48, 49, 50}
  assert {os.path.splitext(r[0])[1] for r in rows} == {".jpg", ".JPG", ".png"}
  for num_classes in (7, 8):
    source = create_source("affectnet", str(tmp_path), "train", num_classes=num_classes)
    assert len(source) == int(np.sum(codes < num_classes))
    assert sum(source.excluded_counts.values()) == int(np.sum(codes >= num_classes))
  validation = create_source("affectnet", str(tmp_path), "test", num_classes=8, crop_face=True)
  assert validation.split == "validation" and validation[0]["image"].shape == (38, 38, 3)  # the central 80 %
  # Contempt (7), the expression RAF-DB lacks, is drawn too.
  contempt = [i for i in range(len(validation)) if validation.labels[i] == 7]
  assert contempt and validation[contempt[0]]["image"].std() > 10
