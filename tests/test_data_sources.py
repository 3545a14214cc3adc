"""Tests for the dataset sources: every layout, every bad input.

The tree builders here write tiny datasets in the owners' layouts; the check
CLI and TFDS builder tests import them. Each image is a flat colour that
encodes its label, so a test can tell that image and label belong together.
"""

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from faer_jax.data import (
    DataError, ImageReadError, affectnet, celeba, create_source, decode_image, rafdb,
)

# --- Tree builders -------------------------------------------------------------------------


def write_image(path, value=128, size=(12, 10), mode="RGB", fmt=None):
  """Writes a flat image of `value` (width, height = size)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  colour = {"RGB": (value,) * 3, "L": value, "RGBA": (value,) * 3 + (255,), "CMYK": (0, 0, 0, 255 - value)}
  Image.new(mode, size, colour[mode]).save(path, format=fmt)


def label_value(label: int) -> int:
  """The grey level that encodes a label in the test images."""
  return 20 + 30 * label


# (file name, owners' label 1-7)
RAFDB_ENTRIES = [
    ("train_00001.jpg", 5), ("train_00002.jpg", 1), ("train_00003.jpg", 7),
    ("train_00004.jpg", 5), ("test_0001.jpg", 4), ("test_0002.jpg", 2),
]


def make_rafdb(root, entries=RAFDB_ENTRIES, label_text=None):
  """RAF-DB basic in the owners' layout; the label file has no final newline."""
  basic = os.path.join(root, "basic")
  os.makedirs(os.path.join(basic, "EmoLabel"))
  if label_text is None:
    label_text = "\n".join(f"{name} {label}" for name, label in entries)
  with open(os.path.join(basic, "EmoLabel", "list_patition_label.txt"), "w", newline="") as f:
    f.write(label_text)
  for name, label in entries:
    stem = os.path.splitext(name)[0]
    write_image(os.path.join(basic, "Image", "aligned", f"{stem}_aligned.jpg"), label_value(label - 1))
    write_image(os.path.join(basic, "Image", "original", name), label_value(label - 1), size=(30, 20))
  return str(root)


def make_rafdb_folders(root, entries=RAFDB_ENTRIES):
  """RAF-DB re-packaged as {train,test}/{1..7}/."""
  for name, label in entries:
    split = name.split("_")[0]
    write_image(os.path.join(root, split, str(label), name), label_value(label - 1))
  return str(root)


# (subDirectory_filePath as listed, file name on disk, expression code, split)
AFFECTNET_ROWS = [(f"{c % 3}/img{c}.jpg", f"img{c}.jpg", c, "train") for c in range(11)]
AFFECTNET_ROWS[1] = ("1/img1.jpg", "img1.JPG", 1, "train")  # extension case differs on disk
AFFECTNET_ROWS[2] = ("2/img2.JPG", "img2.jpg", 2, "train")
AFFECTNET_ROWS[3] = ("0/img3.png", "img3.png", 3, "train")
AFFECTNET_ROWS += [(f"v/val{c}.jpg", f"val{c}.jpg", c, "validation") for c in (0, 6, 7, 9)]
AFFECTNET_IMAGE_SIZE = (40, 30)  # width, height
AFFECTNET_BOX = (5, 4, 20, 16)  # x, y, width, height


def make_affectnet(root, rows=AFFECTNET_ROWS, nested=False, extra_lines=()):
  """AffectNet's CSV release (optionally under Manually_Annotated/)."""
  base = os.path.join(root, "Manually_Annotated") if nested else str(root)
  lists = os.path.join(base, "Manually_Annotated_file_lists")
  os.makedirs(lists)
  landmarks = ";".join(f"{v:.2f}" for v in np.linspace(1, 99, 136))
  lines = {"train": [",".join(affectnet.CSV_HEADER)], "validation": [",".join(affectnet.CSV_HEADER)]}
  for listed, on_disk, code, split in rows:
    valence = "-2" if code in (9, 10) else "0.25"
    lines[split].append(f"{listed},{','.join(map(str, AFFECTNET_BOX))},{landmarks},{code},{valence},{valence}")
    folder = os.path.join(base, "Manually_Annotated_Images", os.path.dirname(listed))
    fmt = "PNG" if on_disk.endswith(".png") else "JPEG"
    write_image(os.path.join(folder, on_disk), label_value(min(code, 7)), AFFECTNET_IMAGE_SIZE, fmt=fmt)
  lines["train"] += list(extra_lines)
  for split, file_name in (("train", "training.csv"), ("validation", "validation.csv")):
    with open(os.path.join(lists, file_name), "w") as f:
      f.write("\n".join(lines[split]) + "\n")
  return str(root)


def make_affectnet_npy(root, codes=None):
  """AffectNet's newer release; codes per split, stored as 0-d string arrays."""
  codes = codes or {"train_set": [0, 1, 2, 3, 4, 5, 6, 7, 7, 1, 0], "val_set": [7, 3, 5]}
  for split_dir, split_codes in codes.items():
    for n, code in enumerate(split_codes):
      write_image(os.path.join(root, split_dir, "images", f"{n}.jpg"), label_value(code), (16, 16))
      os.makedirs(os.path.join(root, split_dir, "annotations"), exist_ok=True)
      np.save(os.path.join(root, split_dir, "annotations", f"{n}_exp.npy"), np.array(str(code)))
  return str(root)


CELEBA_FILES = [f"{i:06d}.jpg" for i in range(1, 8)]
CELEBA_PARTITION = [0, 0, 0, 1, 1, 2, 2]


def celeba_values(i):
  """The ±1 attribute row of image i (0-based)."""
  return [1 if (i + a) % 3 == 0 else -1 for a in range(40)]


def make_celeba(root, layout="owners", attr_text=None):
  """CelebA in the owners', the flat or the CSV layout."""
  root = str(root)
  names = celeba.ATTRIBUTE_NAMES
  if layout == "csv":
    attr_path, partition_path = "list_attr_celeba.csv", "list_eval_partition.csv"
    image_dir = os.path.join("img_align_celeba", "img_align_celeba")
    attr_lines = ["image_id," + ",".join(names)]
    attr_lines += [",".join([f] + [str(v) for v in celeba_values(i)]) for i, f in enumerate(CELEBA_FILES)]
    partition_lines = ["image_id,partition"] + [f"{f},{p}" for f, p in zip(CELEBA_FILES, CELEBA_PARTITION)]
  else:
    owners = layout == "owners"
    attr_path = os.path.join("Anno", "list_attr_celeba.txt") if owners else "list_attr_celeba.txt"
    partition_path = os.path.join("Eval", "list_eval_partition.txt") if owners else "list_eval_partition.txt"
    image_dir = os.path.join("Img", "img_align_celeba") if owners else "img_align_celeba"
    # As in the owners' file: padded with a variable number of spaces.
    attr_lines = [str(len(CELEBA_FILES)), " ".join(names) + " "]
    attr_lines += [f + " " + " ".join(f"{v:2d}" for v in celeba_values(i)) for i, f in enumerate(CELEBA_FILES)]
    partition_lines = [f"{f} {p}" for f, p in zip(CELEBA_FILES, CELEBA_PARTITION)]
  for path, lines in ((attr_path, attr_lines), (partition_path, partition_lines)):
    os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
    with open(os.path.join(root, path), "w") as f:
      f.write(attr_text if attr_text is not None and path == attr_path else "\n".join(lines) + "\n")
  for i, f in enumerate(CELEBA_FILES):
    write_image(os.path.join(root, image_dir, f), 10 * i, (18, 22))
  return root


def mean_value(image):
  return float(image.mean())


# --- RAF-DB ------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["root", "basic", "above"])
def test_rafdb_owners_layout_at_any_level(tmp_path, level):
  root = make_rafdb(tmp_path / "RAF-DB")
  given = {"root": root, "basic": os.path.join(root, "basic"), "above": str(tmp_path)}[level]
  train = create_source("rafdb", given, "train")
  test = create_source("rafdb", given, "test")
  assert (len(train), len(test)) == (4, 2)
  assert train.layout == "rafdb-owners"
  assert train.class_names == rafdb.CLASS_NAMES
  assert train.class_names[0] == "Surprise" and train.class_names[6] == "Neutral"
  assert train.task == "fer" and train.split == "train"
  np.testing.assert_array_equal(train.labels, [4, 0, 6, 4])
  assert train.labels.dtype == np.int32
  example = train[2]
  assert example["label"] == 6 and isinstance(example["label"], int)
  assert example["image"].dtype == np.uint8 and example["image"].shape == (10, 12, 3)
  assert abs(mean_value(example["image"]) - label_value(6)) < 3
  assert train.path(0).endswith(os.path.join("Image", "aligned", "train_00001_aligned.jpg"))


def test_rafdb_label_file_with_crlf_blanks_and_trailing_spaces(tmp_path):
  text = "train_00001.jpg 5  \r\n\r\ntrain_00002.jpg 1\r\ntest_0001.jpg 4 \r\n"
  root = make_rafdb(tmp_path, RAFDB_ENTRIES, label_text=text)
  np.testing.assert_array_equal(create_source("rafdb", root, "train").labels, [4, 0])
  np.testing.assert_array_equal(create_source("rafdb", root, "test").labels, [3])


def test_rafdb_original_images(tmp_path):
  source = create_source("rafdb", make_rafdb(tmp_path), "test", aligned=False)
  assert source.path(0).endswith(os.path.join("Image", "original", "test_0001.jpg"))
  assert source[0]["image"].shape == (20, 30, 3)


def test_rafdb_class_folders(tmp_path):
  root = make_rafdb_folders(tmp_path / "DATASET")
  train = create_source("rafdb", root, "train")
  assert train.layout == "rafdb-class-folders"
  assert len(train) == 4
  # Folders in label order, files sorted within each.
  np.testing.assert_array_equal(train.labels, [0, 4, 4, 6])
  for i in range(len(train)):
    assert abs(mean_value(train[i]["image"]) - label_value(int(train.labels[i]))) < 3
  assert len(create_source("rafdb", os.path.join(root, "test"), "test")) == 2


def test_rafdb_class_folders_refuse_zero_based_names(tmp_path):
  root = make_rafdb_folders(tmp_path)
  write_image(os.path.join(root, "train", "0", "x.jpg"))
  with pytest.raises(DataError, match="named 1-7"):
    create_source("rafdb", root, "train")


# --- AffectNet ---------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True])
def test_affectnet_csv_seven_classes(tmp_path, nested):
  root = make_affectnet(tmp_path, nested=nested)
  train = create_source("affectnet", root, "train")
  assert train.layout == "affectnet-csv"
  assert train.class_names == affectnet.CLASS_NAMES[:7]
  np.testing.assert_array_equal(train.labels, range(7))
  assert train.excluded_counts == {7: 1, 8: 1, 9: 1, 10: 1}
  for i in range(len(train)):  # includes the .JPG, .JPG-listed and .png files
    image = train[i]["image"]
    assert image.shape == (30, 40, 3)
    assert abs(mean_value(image) - label_value(i)) < 3
  validation = create_source("affectnet", root, "validation")
  np.testing.assert_array_equal(validation.labels, [0, 6])
  assert validation.excluded_counts == {7: 1, 9: 1}


def test_affectnet_csv_eight_classes_and_test_alias(tmp_path):
  root = make_affectnet(tmp_path)
  train = create_source("affectnet", root, "train", num_classes=8)
  assert train.class_names[-1] == "Contempt"
  np.testing.assert_array_equal(train.labels, range(8))
  assert train.excluded_counts == {8: 1, 9: 1, 10: 1}
  test = create_source("affectnet", root, "test", num_classes=8)
  assert test.split == "validation"
  np.testing.assert_array_equal(test.labels, [0, 6, 7])


def test_affectnet_crop_face_clips_to_image(tmp_path):
  x, y, w, h = 30, 20, 20, 16  # reaches past the 40x30 image
  row = ("0/a.jpg", "a.jpg", 3, "train")
  root = make_affectnet(tmp_path, rows=[row])
  path = os.path.join(root, "Manually_Annotated_file_lists", "training.csv")
  with open(path) as f:
    text = f.read().replace(",".join(map(str, AFFECTNET_BOX)), f"{x},{y},{w},{h}")
  with open(path, "w") as f:
    f.write(text)
  assert create_source("affectnet", root, "train", crop_face=True)[0]["image"].shape == (10, 10, 3)
  assert create_source("affectnet", root, "train")[0]["image"].shape == (30, 40, 3)


def test_affectnet_npy_release(tmp_path):
  root = make_affectnet_npy(tmp_path / "AffectNet")
  eight = create_source("affectnet", root, "train", num_classes=8)
  assert eight.layout == "affectnet-npy"
  np.testing.assert_array_equal(eight.labels, [0, 1, 2, 3, 4, 5, 6, 7, 7, 1, 0])
  assert eight.path(10).endswith("10.jpg")  # numeric order: 10 follows 9
  assert abs(mean_value(eight[7]["image"]) - label_value(7)) < 3
  seven = create_source("affectnet", os.path.join(root, "train_set"), "train")
  np.testing.assert_array_equal(seven.labels, [0, 1, 2, 3, 4, 5, 6, 1, 0])
  assert seven.excluded_counts == {7: 2}
  validation = create_source("affectnet", root, "test")
  np.testing.assert_array_equal(validation.labels, [3, 5])


# --- CelebA ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["owners", "flat", "csv"])
def test_celeba_layouts(tmp_path, layout):
  root = make_celeba(tmp_path / "CelebA", layout)
  expected_values = (np.array([celeba_values(i) for i in range(len(CELEBA_FILES))]) + 1) // 2
  for split, code in (("train", 0), ("validation", 1), ("test", 2)):
    source = create_source("celeba", root, split)
    rows = [i for i, p in enumerate(CELEBA_PARTITION) if p == code]
    assert source.layout == f"celeba-{layout}"
    assert source.task == "fae" and source.class_names == celeba.ATTRIBUTE_NAMES
    assert source.labels.shape == (len(rows), 40) and source.labels.dtype == np.int32
    np.testing.assert_array_equal(source.labels, expected_values[rows])
    example = source[len(rows) - 1]
    np.testing.assert_array_equal(example["label"], expected_values[rows[-1]])
    assert example["image"].shape == (22, 18, 3)
    assert abs(mean_value(example["image"]) - 10 * rows[-1]) < 3


def test_celeba_root_below_the_files(tmp_path):
  root = make_celeba(tmp_path)
  assert len(create_source("celeba", os.path.join(root, "Anno"), "train")) == 3


# --- Images ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK"])
def test_decode_converts_to_rgb(tmp_path, mode):
  path = str(tmp_path / f"x.{'jpg' if mode != 'RGBA' else 'png'}")
  write_image(path, 100, mode=mode)
  image = decode_image(path)
  assert image.shape == (10, 12, 3) and image.dtype == np.uint8


def test_decode_palette_and_16_bit(tmp_path):
  Image.new("RGB", (5, 4), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
  np.testing.assert_array_equal(decode_image(str(tmp_path / "p.png"))[0, 0], (10, 200, 30))
  Image.fromarray(np.full((4, 5), 40000, np.uint16)).save(tmp_path / "g.png")
  np.testing.assert_array_equal(decode_image(str(tmp_path / "g.png"))[0, 0], (156, 156, 156))


def test_decode_min_size_uses_jpeg_draft(tmp_path):
  path = str(tmp_path / "big.jpg")
  write_image(path, size=(400, 320))
  assert decode_image(path).shape == (320, 400, 3)
  assert decode_image(path, min_size=100).shape == (160, 200, 3)  # 1/2: 1/4 is below 100
  assert decode_image(path, min_size=(40, 50)).shape == (40, 50, 3)  # 1/8
  with open(path, "rb") as f:
    assert decode_image(f.read(), min_size=300).shape == (320, 400, 3)


def test_decode_errors_name_the_file(tmp_path):
  with pytest.raises(ImageReadError, match="missing.jpg: file not found"):
    decode_image(str(tmp_path / "missing.jpg"))
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"not an image")
  with pytest.raises(ImageReadError, match="bad.jpg"):
    decode_image(str(bad))
  with pytest.raises(ImageReadError, match="some-id"):
    decode_image(b"\xff\xd8\xff garbage", name="some-id")


def test_truncated_jpeg_is_an_error(tmp_path):
  path = tmp_path / "t.jpg"
  write_image(str(path), size=(64, 64))
  path.write_bytes(path.read_bytes()[:200])
  with pytest.raises(ImageReadError, match="t.jpg"):
    decode_image(str(path))


# --- Bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dataset, homepage, expected",
    [
        ("rafdb", "whdeng.cn", "list_patition_label.txt"),
        ("affectnet", "mohammadmahoor.com", "training.csv"),
        ("celeba", "mmlab.ie.cuhk.edu.hk", "list_attr_celeba.txt"),
    ],
)
def test_missing_root_names_paths_origin_and_synth(tmp_path, dataset, homepage, expected):
  root = str(tmp_path / "nowhere")
  with pytest.raises(DataError) as info:
    create_source(dataset, root, "train")
  message = str(info.value)
  assert os.path.join(root, "") in message and expected in message
  assert homepage in message
  assert "python -m faer_jax.data synth --layout" in message


def test_missing_label_file(tmp_path):
  root = make_rafdb(tmp_path)
  os.remove(os.path.join(root, "basic", "EmoLabel", "list_patition_label.txt"))
  with pytest.raises(DataError, match=r"basic/EmoLabel/list_patition_label\.txt"):
    create_source("rafdb", root, "train")
  root = make_affectnet(tmp_path / "a")
  os.remove(os.path.join(root, "Manually_Annotated_file_lists", "validation.csv"))
  with pytest.raises(DataError, match="validation.csv"):
    create_source("affectnet", root, "validation")
  root = make_celeba(tmp_path / "c")
  os.remove(os.path.join(root, "Eval", "list_eval_partition.txt"))
  with pytest.raises(DataError, match="list_eval_partition.txt"):
    create_source("celeba", root, "train")


@pytest.mark.parametrize(
    "text, line, problem",
    [
        ("train_00001.jpg 5\ntrain_00002.jpg 8", 2, "1 to 7"),
        ("train_00001.jpg 5\n\ntrain_00002.jpg 0", 3, "1 to 7"),
        ("train_00001.jpg 5 3", 1, "expected"),
        ("train_00001.jpg five", 1, "1 to 7"),
        ("train_00001.jpg 5\ntrain_00001.jpg 4", 2, "listed twice"),
        ("other_00001.jpg 5", 1, "train_ or test_"),
    ],
)
def test_rafdb_malformed_line(tmp_path, text, line, problem):
  root = make_rafdb(tmp_path, label_text=text)
  with pytest.raises(DataError, match=rf"list_patition_label\.txt:{line}: .*{problem}") as info:
    create_source("rafdb", root, "train")
  assert text.splitlines()[line - 1].strip() in str(info.value)


@pytest.mark.parametrize(
    "line, problem",
    [("9/x.jpg,1,2,3,4,5;6,11,0,0", "code 0-10"), ("9/y.jpg,1,2,3,4,5;6,happy,0,0", "code 0-10"),
     ("9/z.jpg,1,2,3", "expected 9 fields"), ("0/img0.jpg,1,2,3,4,5;6,1,0,0", "listed twice")],
)
def test_affectnet_malformed_row(tmp_path, line, problem):
  root = make_affectnet(tmp_path, extra_lines=[line])
  line_number = 1 + sum(1 for r in AFFECTNET_ROWS if r[3] == "train") + 1
  with pytest.raises(DataError, match=rf"training\.csv:{line_number}: .*{problem}"):
    create_source("affectnet", root, "train")


def test_missing_image_folders(tmp_path):
  root = make_celeba(tmp_path / "c")
  os.rename(os.path.join(root, "Img", "img_align_celeba"), os.path.join(root, "elsewhere"))
  open(os.path.join(root, "Img", "img_align_celeba.zip"), "w").close()
  with pytest.raises(DataError, match=r"no folder holds 000001\.jpg(.|\n)*Extract .*img_align_celeba\.zip"):
    create_source("celeba", root, "train")
  root = make_affectnet(tmp_path / "a")
  os.rename(os.path.join(root, "Manually_Annotated_Images"), os.path.join(root, "elsewhere"))
  with pytest.raises(DataError, match="images are missing(.|\n)*Manually_Annotated_Images"):
    create_source("affectnet", root, "train")


def test_affectnet_bad_npy_annotation(tmp_path):
  root = make_affectnet_npy(tmp_path)
  np.save(os.path.join(root, "train_set", "annotations", "3_exp.npy"), np.array("sad"))
  with pytest.raises(DataError, match="3_exp.npy"):
    create_source("affectnet", root, "train")
  os.remove(os.path.join(root, "val_set", "annotations", "1_exp.npy"))
  with pytest.raises(DataError, match="1_exp.npy"):
    create_source("affectnet", root, "validation")


def test_celeba_malformed_lines(tmp_path):
  good = open(os.path.join(make_celeba(tmp_path / "good"), "Anno", "list_attr_celeba.txt")).read()
  lines = good.splitlines()
  cases = [
      (["8"] + lines[1:], 1, "count line says 8"),
      (lines[:4] + [lines[4].replace(" 1", " 0", 1)] + lines[5:], 5, "1 or -1"),
      (lines[:3] + [lines[3] + " 1"] + lines[4:], 4, "40 values"),
      (lines[:5] + [lines[3]] + lines[6:], 6, "listed twice"),
  ]
  for n, (case, line, problem) in enumerate(cases):
    root = make_celeba(tmp_path / str(n), attr_text="\n".join(case))
    with pytest.raises(DataError, match=rf"list_attr_celeba\.txt:{line}: .*{problem}"):
      create_source("celeba", root, "train")


def test_missing_and_corrupt_images_raise_naming_the_file(tmp_path):
  root = make_rafdb(tmp_path)
  aligned = os.path.join(root, "basic", "Image", "aligned")
  os.remove(os.path.join(aligned, "train_00002_aligned.jpg"))
  with open(os.path.join(aligned, "train_00003_aligned.jpg"), "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 corrupt")
  source = create_source("rafdb", root, "train")
  assert len(source) == 4
  with pytest.raises(ImageReadError, match="train_00002_aligned.jpg: file not found"):
    source[1]
  with pytest.raises(ImageReadError, match="train_00003_aligned.jpg"):
    source[2]


def test_skip_bad_images_counts_every_missing_file(tmp_path, caplog):
  root = make_affectnet(tmp_path)
  images = os.path.join(root, "Manually_Annotated_Images")
  os.remove(os.path.join(images, "0", "img0.jpg"))
  os.remove(os.path.join(images, "1", "img1.JPG"))
  source = create_source("affectnet", root, "train", skip_bad_images=True)
  np.testing.assert_array_equal(source.labels, [2, 3, 4, 5, 6])
  assert sorted(os.path.basename(p) for p, _ in source.skipped) == ["img0.jpg", "img1.jpg"]
  assert all(reason == "file not found" for _, reason in source.skipped)
  assert "Skipping 2 of 7" in caplog.text
  assert source[0]["image"].shape == (30, 40, 3)  # the listed .JPG resolved to img2.jpg


def test_unknown_dataset_split_and_option(tmp_path):
  root = make_rafdb(tmp_path)
  with pytest.raises(ValueError, match="'imagenet'.*rafdb, affectnet, celeba, tfds"):
    create_source("imagenet", root, "train")
  with pytest.raises(ValueError, match="'validation'.*train, test"):
    create_source("rafdb", root, "validation")
  with pytest.raises(ValueError, match=r"\['num_classes'\].*'aligned'"):
    create_source("rafdb", root, "train", num_classes=7)
  with pytest.raises(ValueError, match="needs the option"):
    create_source("tfds", str(tmp_path), "train")


def test_indices_out_of_range(tmp_path):
  source = create_source("rafdb", make_rafdb(tmp_path), "test")
  for index in (-1, 2):
    with pytest.raises(IndexError):
      source[index]
  assert source[np.int64(1)]["label"] == 1


def test_source_pickles(tmp_path):
  source = create_source("celeba", make_celeba(tmp_path), "train")
  copy = pickle.loads(pickle.dumps(source))
  assert len(copy) == len(source) and copy.class_names == source.class_names
  np.testing.assert_array_equal(copy[1]["image"], source[1]["image"])
  np.testing.assert_array_equal(copy.labels, source.labels)
