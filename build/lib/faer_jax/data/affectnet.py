"""AffectNet (manually annotated part), in the owners' two releases.

CSV release (both folders may sit under an extra `Manually_Annotated/`):

  Manually_Annotated_file_lists/{training,validation}.csv
  Manually_Annotated_Images/<subDirectory_filePath>

Newer release: `{train_set,val_set}/images/<N>.jpg` with the expression code in
`{train_set,val_set}/annotations/<N>_exp.npy`.

Expression codes: 0 Neutral ... 6 Anger, 7 Contempt, 8 None, 9 Uncertain,
10 No-Face. The 7-class protocol keeps codes 0-6, the 8-class one 0-7; the
rest never enter training or evaluation, but are counted in
`source.excluded_counts`. The validation split is the protocol's test set.
"""

import collections
import csv
import os

import numpy as np

from faer_jax.data.errors import DataError, dataset_not_found, malformed_line
from faer_jax.data.images import IMAGE_EXTENSIONS, ImageFileSource, Size, check_split, locate

# In code order: code k is CLASS_NAMES[k] (differs from RAF-DB's order).
CLASS_NAMES = ("Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt")
CODE_NAMES = CLASS_NAMES + ("None", "Uncertain", "No-Face")
SPLITS = ("train", "validation")
# The validation set is the test set of both protocols.
SPLIT_ALIASES = {"test": "validation"}

CSV_HEADER = (
    "subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
    "facial_landmarks", "expression", "valence", "arousal",
)
_LISTS = "Manually_Annotated_file_lists"
_IMAGES = "Manually_Annotated_Images"
_CSV_FILES = {"train": "training.csv", "validation": "validation.csv"}
_NPY_DIRS = {"train": "train_set", "validation": "val_set"}

_CSV_MARKERS = (_LISTS, os.path.join("Manually_Annotated", _LISTS))
_NPY_MARKERS = tuple(os.path.join(d, "annotations") for d in _NPY_DIRS.values())


def read_csv(path: str, *, with_boxes: bool = False):
  """Parses a `Manually_Annotated_file_lists` CSV.

  Args:
    path: `training.csv` or `validation.csv`.
    with_boxes: also parse the face boxes.

  Returns:
    (files, codes, boxes): image paths relative to `Manually_Annotated_Images`,
    an int32 array of expression codes 0-10, and an int32 (N, 4) array of
    x, y, width, height (None unless `with_boxes`).

  Raises:
    DataError: a malformed row; the message gives file, line number and text.
  """
  files, codes, boxes = [], [], []
  seen = set()
  # A file without a header has the owners' column order.
  columns = {name: i for i, name in enumerate(CSV_HEADER)}
  width = len(CSV_HEADER)
  # utf-8-sig: a byte-order mark would otherwise hide the header.
  with open(path, encoding="utf-8-sig", newline="") as f:
    reader = csv.reader(f)
    for row in reader:
      line = ",".join(row)
      if not line.strip():
        continue
      if reader.line_num == 1 and row[0].strip() == CSV_HEADER[0]:
        columns = {name.strip(): i for i, name in enumerate(row)}
        required = (CSV_HEADER[0], "expression") + (CSV_HEADER[1:5] if with_boxes else ())
        missing = [c for c in required if c not in columns]
        if missing:
          raise malformed_line(path, 1, line, f"the header lacks column(s) {missing}")
        width = len(row)
        continue
      if len(row) != width:
        raise malformed_line(path, reader.line_num, line, f"expected {width} fields, got {len(row)}")
      name = row[columns["subDirectory_filePath"]].strip()
      code = _parse_int(row[columns["expression"]])
      if code is None or not 0 <= code < len(CODE_NAMES):
        raise malformed_line(path, reader.line_num, line, "expression must be an integer code 0-10")
      if name in seen:
        raise malformed_line(path, reader.line_num, line, f"{name} is listed twice")
      seen.add(name)
      files.append(name)
      codes.append(code)
      if with_boxes:
        box = [_parse_int(row[columns[c]]) for c in CSV_HEADER[1:5]]
        if None in box or box[2] <= 0 or box[3] <= 0:
          raise malformed_line(
              path, reader.line_num, line, "face_x, face_y, face_width and face_height must be "
              "integers, with a positive width and height")
        boxes.append(box)
  boxes = np.array(boxes, np.int32).reshape(-1, 4) if with_boxes else None
  return files, np.array(codes, np.int32), boxes


def _parse_int(text: str) -> int | None:
  try:
    return int(text.strip())
  except ValueError:
    return None


def read_npy_label(path: str) -> int:
  """Reads an `<N>_exp.npy` annotation, `int(np.load(path))` as the owners do.

  The owners store the code as a 0-d string array; numbers are accepted too.

  Args:
    path: the annotation file.

  Returns:
    The expression code, 0-10.

  Raises:
    DataError: the file is missing or does not hold one code 0-10.
  """
  try:
    value = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise DataError(f"cannot read AffectNet annotation {path}: {e}") from None
  code = _parse_int(str(value.reshape(-1)[0])) if value.size == 1 else None
  if code is None and value.size == 1 and np.issubdtype(value.dtype, np.number):
    number = value.reshape(-1)[0]
    code = int(number) if number == int(number) else None
  if code is None or not 0 <= code < len(CODE_NAMES):
    raise DataError(f"AffectNet annotation {path} does not hold an integer code 0-10: {value!r}")
  return code


def affectnet_source(
    root: str,
    split: str,
    *,
    num_classes: int = 7,
    crop_face: bool = False,
    skip_bad_images: bool = False,
    min_size: Size | None = None,
) -> ImageFileSource:
  """Opens one split of AffectNet, detecting the release.

  Args:
    root: the AffectNet folder (holding `Manually_Annotated_file_lists/`, or
      `train_set/` and `val_set/`), the folder above or one below.
    split: 'train' or 'validation' ('test' is accepted for 'validation').
    num_classes: 7 (codes 0-6) or 8 (codes 0-7, adding Contempt).
    crop_face: crop each image to its annotated face box, clipped to the image
      (CSV release only; the newer release is already cropped).
    skip_bad_images: drop listed images that are missing, counting them in
      `source.skipped`, instead of failing when one is read.
    min_size: see `decode_image`.

  Returns:
    The source; labels index `CLASS_NAMES[:num_classes]`.

  Raises:
    ValueError: a bad option.
    DataError: the dataset is not found or a label file is malformed.
  """
  split = check_split(split, SPLITS, SPLIT_ALIASES)
  if num_classes not in (7, 8):
    raise ValueError(f"num_classes must be 7 or 8, not {num_classes!r}")
  found = locate(root, _CSV_MARKERS + _NPY_MARKERS) if os.path.isdir(root) else None
  if found is None:
    expected = [os.path.join(root, m, _CSV_FILES[split]) for m in _CSV_MARKERS]
    expected += [os.path.join(root, _NPY_DIRS[split], d) for d in ("images", "annotations")]
    raise dataset_not_found(
        "AffectNet", f"AffectNet not found under {root!r}.", expected,
        "Tried the owners' CSV release (Manually_Annotated_file_lists/ with "
        "Manually_Annotated_Images/) and the newer release (train_set/, val_set/), "
        "in this folder, its parent and its sub-folders.",
    )
  base, marker = found
  if marker in _CSV_MARKERS:
    layout = "affectnet-csv"
    image_dir, files, codes, boxes = _csv_release(os.path.join(base, marker), split, crop_face)
  else:
    if crop_face:
      raise DataError(f"{base} holds the newer AffectNet release, whose images are already "
                      "cropped faces and come without boxes; crop_face needs the CSV release")
    layout = "affectnet-npy"
    image_dir, files, codes = _npy_release(base, split)
    boxes = None
  keep = codes < num_classes
  excluded = collections.Counter(codes[~keep].tolist())
  return ImageFileSource(
      image_dir=image_dir, files=[f for f, k in zip(files, keep) if k], labels=codes[keep],
      boxes=None if boxes is None else boxes[keep], class_names=CLASS_NAMES[:num_classes],
      task="fer", split=split, layout=layout, root=base,
      excluded_counts=dict(sorted(excluded.items())), skip_bad_images=skip_bad_images,
      min_size=min_size,
  )


def _csv_release(lists_dir: str, split: str, crop_face: bool):
  csv_path = os.path.join(lists_dir, _CSV_FILES[split])
  if not os.path.isfile(csv_path):
    raise dataset_not_found(
        "AffectNet", f"AffectNet's label file for split {split!r} is missing.", [csv_path]
    )
  parent = os.path.dirname(lists_dir)
  candidates = [os.path.join(parent, _IMAGES), os.path.join(parent, "Manually_Annotated", _IMAGES)]
  image_dir = next((d for d in candidates if os.path.isdir(d)), None)
  if image_dir is None:
    raise dataset_not_found(
        "AffectNet", f"AffectNet's label files are in {lists_dir} but its images are missing.",
        candidates,
    )
  files, codes, boxes = read_csv(csv_path, with_boxes=crop_face)
  return image_dir, files, codes, boxes


def _npy_release(base: str, split: str):
  split_dir = os.path.join(base, _NPY_DIRS[split])
  image_dir = os.path.join(split_dir, "images")
  if not os.path.isdir(image_dir):
    raise dataset_not_found(
        "AffectNet", f"AffectNet's {_NPY_DIRS[split]} images are missing.", [image_dir]
    )
  names = [n for n in os.listdir(image_dir) if n.lower().endswith(IMAGE_EXTENSIONS)]
  # Numeric stems in numeric order, so that 10.jpg follows 9.jpg.
  names.sort(key=lambda n: (0, int(n.split(".")[0]), n) if n.split(".")[0].isdigit() else (1, 0, n))
  codes = [
      read_npy_label(os.path.join(split_dir, "annotations", f"{os.path.splitext(n)[0]}_exp.npy"))
      for n in names
  ]
  return image_dir, names, np.array(codes, np.int32)
