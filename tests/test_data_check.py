"""Tests for `python -m faer_jax.data check` and `verify_images`."""

import json
import os
import subprocess
import sys

import pytest

from faer_jax.data import ImageReadError, create_source
from faer_jax.data.check import main, verify_images
from test_data_sources import make_affectnet, make_celeba, make_rafdb


def test_check_json_in_a_subprocess(tmp_path):
  root = make_rafdb(tmp_path / "RAF-DB")
  result = subprocess.run(
      [sys.executable, "-m", "faer_jax.data", "check", "--dataset", "rafdb", "--root", root, "--json"],
      capture_output=True, text=True, check=False, timeout=120,
  )
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout)  # exactly one JSON object
  assert report["dataset"] == "rafdb" and report["layout"] == "rafdb-owners"
  assert report["class_names"][0] == "Surprise"
  assert report["splits"] == {
      "train": {"num_examples": 4, "class_counts": [1, 0, 0, 0, 2, 0, 1]},
      "test": {"num_examples": 2, "class_counts": [0, 1, 0, 1, 0, 0, 0]},
  }


def test_check_affectnet_reports_exclusions(tmp_path, capsys):
  root = make_affectnet(tmp_path)
  assert main(["--dataset", "affectnet", "--root", root, "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert len(report["class_names"]) == 7
  assert report["splits"]["train"] == {
      "num_examples": 7, "class_counts": [1] * 7,
      "excluded_counts": {"7": 1, "8": 1, "9": 1, "10": 1},
  }
  assert main(["--dataset", "affectnet", "--root", root, "--num-classes", "8", "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["splits"]["validation"]["class_counts"] == [1, 0, 0, 0, 0, 0, 1, 1]
  assert report["splits"]["validation"]["excluded_counts"] == {"9": 1}


def test_check_celeba_attribute_counts(tmp_path, capsys):
  root = make_celeba(tmp_path, layout="csv")
  assert main(["--dataset", "celeba", "--root", root, "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert len(report["attribute_names"]) == 40 and report["attribute_names"][-1] == "Young"
  train = report["splits"]["train"]
  # Rows 0-2 of the tree; attribute a is positive in row i when (i + a) % 3 == 0.
  assert train["num_examples"] == 3 and train["attribute_positive_counts"] == [1] * 40
  assert [s["num_examples"] for s in report["splits"].values()] == [3, 2, 2]


def test_check_verify_images_lists_unreadable_and_fails(tmp_path, capsys):
  root = make_rafdb(tmp_path)
  aligned = os.path.join(root, "basic", "Image", "aligned")
  os.remove(os.path.join(aligned, "test_0002_aligned.jpg"))
  with open(os.path.join(aligned, "train_00004_aligned.jpg"), "wb") as f:
    f.write(b"garbage")
  assert main(["--dataset", "rafdb", "--root", root, "--verify-images", "--json"]) == 1
  splits = json.loads(capsys.readouterr().out)["splits"]
  assert [os.path.basename(u["path"]) for u in splits["train"]["unreadable"]] == ["train_00004_aligned.jpg"]
  assert splits["test"]["unreadable"] == [
      {"path": os.path.join(aligned, "test_0002_aligned.jpg"), "reason": "file not found"}
  ]
  assert main(["--dataset", "rafdb", "--root", root, "--verify-images"]) == 1
  assert "train_00004_aligned.jpg" in capsys.readouterr().out


def test_check_bad_input_exits_2_without_traceback(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "faer_jax.data", "check", "--dataset", "celeba", "--root", str(tmp_path / "none")],
      capture_output=True, text=True, check=False, timeout=120,
  )
  assert result.returncode == 2 and result.stdout == ""
  assert "CelebA not found" in result.stderr and "Traceback" not in result.stderr


def test_check_malformed_line_exits_2(tmp_path, capsys):
  root = make_rafdb(tmp_path, label_text="train_00001.jpg 5\ntrain_00002.jpg 9")
  assert main(["--dataset", "rafdb", "--root", root]) == 2
  assert "list_patition_label.txt:2:" in capsys.readouterr().err


def test_check_flag_errors(tmp_path):
  with pytest.raises(SystemExit):
    main(["--dataset", "rafdb", "--root", str(tmp_path), "--num-classes", "8"])
  with pytest.raises(SystemExit):
    main(["--dataset", "tfds", "--root", str(tmp_path)])


def test_verify_images_raises_unless_skipping(tmp_path):
  root = make_rafdb(tmp_path)
  os.remove(os.path.join(root, "basic", "Image", "aligned", "train_00003_aligned.jpg"))
  source = create_source("rafdb", root, "train")
  with pytest.raises(ImageReadError, match="train_00003_aligned.jpg"):
    verify_images(source, skip=False)
  assert [os.path.basename(p) for p, _ in verify_images(source, skip=True)] == ["train_00003_aligned.jpg"]
