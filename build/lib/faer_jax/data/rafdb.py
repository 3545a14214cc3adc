"""RAF-DB basic (seven expressions), as the owners ship it or re-packaged per class.

Owners' layout (the root may also be `basic/` itself or the folder above):

  basic/EmoLabel/list_patition_label.txt    `train_00001.jpg 5`, labels 1-7
  basic/Image/aligned/train_00001_aligned.jpg
  basic/Image/original/train_00001.jpg

Class-per-folder re-packaging: `{train,test}/{1..7}/*.jpg`, same label numbers.
"""

import os

import numpy as np

from faer_jax.data.errors import DataError, dataset_not_found, malformed_line
from faer_jax.data.images import IMAGE_EXTENSIONS, ImageFileSource, Size, check_split, locate

# Label k in the owners' files is CLASS_NAMES[k - 1]; published models use k - 1.
CLASS_NAMES = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")
SPLITS = ("train", "test")

# Sic: the owners' file name has this misspelling.
LABEL_FILE = os.path.join("EmoLabel", "list_patition_label.txt")
_OWNER_MARKERS = (os.path.join("basic", LABEL_FILE), LABEL_FILE)
_FOLDER_MARKERS = tuple(os.path.join(s, str(k)) for s in SPLITS for k in range(1, 8))


def read_label_file(path: str) -> list[tuple[str, int]]:
  """Parses the owners' label file.

  Tolerates CRLF line ends, trailing spaces, blank lines and the missing final
  newline of the owners' file.

  Args:
    path: `list_patition_label.txt`.

  Returns:
    (image file name, label 0-6) per line, in file order.

  Raises:
    DataError: a malformed line; the message gives file, line number and text.
  """
  with open(path, encoding="utf-8-sig") as f:
    lines = f.read().splitlines()
  entries = []
  seen = set()
  for number, line in enumerate(lines, start=1):
    fields = line.split()
    if not fields:
      continue
    if len(fields) != 2:
      raise malformed_line(path, number, line, "expected `<image name> <label 1-7>`")
    name, label = fields
    if not label.isdigit() or not 1 <= int(label) <= 7:
      raise malformed_line(path, number, line, "the label must be an integer from 1 to 7")
    if name in seen:
      raise malformed_line(path, number, line, f"{name} is listed twice")
    if _split_of(name) is None:
      raise malformed_line(path, number, line, "the image name must start with train_ or test_")
    seen.add(name)
    entries.append((name, int(label) - 1))
  return entries


def _split_of(name: str) -> str | None:
  return next((s for s in SPLITS if name.startswith(s + "_")), None)


def rafdb_source(
    root: str,
    split: str,
    *,
    aligned: bool = True,
    skip_bad_images: bool = False,
    min_size: Size | None = None,
) -> ImageFileSource:
  """Opens one split of RAF-DB basic, detecting the layout.

  Args:
    root: the RAF-DB folder (the one holding `basic/`), `basic/` itself, the
      folder above, or the root of the class-per-folder re-packaging.
    split: 'train' or 'test'.
    aligned: read `Image/aligned/*_aligned.jpg` (the 100x100 aligned faces);
      False reads `Image/original/`. Owners' layout only.
    skip_bad_images: drop listed images that are missing, counting them in
      `source.skipped`, instead of failing when one is read.
    min_size: see `decode_image`.

  Returns:
    The source; labels 0-6 index `CLASS_NAMES`.

  Raises:
    DataError: the dataset is not found or a label line is malformed.
  """
  split = check_split(split, SPLITS)
  found = locate(root, _OWNER_MARKERS + _FOLDER_MARKERS) if os.path.isdir(root) else None
  if found is None:
    expected = [os.path.join(root, m) for m in _OWNER_MARKERS]
    expected += [os.path.join(root, split, "1 ... 7", "*.jpg")]
    raise dataset_not_found(
        "RAF-DB", f"RAF-DB not found under {root!r}.", expected,
        "Tried the owners' layout (basic/EmoLabel, basic/Image) and the "
        "class-per-folder re-packaging ({train,test}/{1..7}/), in this folder, "
        "its parent and its sub-folders.",
    )
  base, marker = found
  options = dict(split=split, skip_bad_images=skip_bad_images, min_size=min_size)
  if marker in _OWNER_MARKERS:
    return _owners_source(os.path.dirname(os.path.join(base, marker)), aligned=aligned, **options)
  if not aligned:
    raise DataError(
        f"{base} holds RAF-DB re-packaged in class folders, which has no original "
        "(unaligned) images; aligned=False needs the owners' layout"
    )
  return _class_folder_source(base, **options)


def _owners_source(label_dir: str, *, split: str, aligned: bool, **options) -> ImageFileSource:
  basic = os.path.dirname(label_dir)
  entries = [(n, k) for n, k in read_label_file(os.path.join(label_dir, "list_patition_label.txt"))
             if _split_of(n) == split]
  image_dir = os.path.join(basic, "Image", "aligned" if aligned else "original")
  if not os.path.isdir(image_dir):
    raise dataset_not_found(
        "RAF-DB", f"RAF-DB's labels are in {label_dir} but its images are missing.", [image_dir],
        f"Unpack the owners' Image/{os.path.basename(image_dir)}.zip there.",
    )
  if aligned:
    # train_00001.jpg -> train_00001_aligned.jpg
    files = [f"{stem}_aligned{ext}" for stem, ext in (os.path.splitext(n) for n, _ in entries)]
  else:
    files = [n for n, _ in entries]
  return ImageFileSource(
      image_dir=image_dir, files=files, labels=np.array([k for _, k in entries], np.int32),
      class_names=CLASS_NAMES, task="fer", split=split, layout="rafdb-owners",
      root=basic, **options,
  )


def _class_folder_source(base: str, *, split: str, **options) -> ImageFileSource:
  split_dir = os.path.join(base, split)
  if not os.path.isdir(split_dir):
    raise dataset_not_found(
        "RAF-DB", f"RAF-DB's class folders are in {base} but the {split!r} split is missing.",
        [os.path.join(split_dir, "1 ... 7", "*.jpg")],
    )
  with os.scandir(split_dir) as entries:
    folders = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
  unexpected = [f for f in folders if f not in {str(k) for k in range(1, 8)}]
  if unexpected:
    # A 0-6 or alphabetical re-packaging would silently shift every class.
    raise DataError(
        f"unexpected class folder(s) {unexpected} in {split_dir}: RAF-DB class "
        f"folders are named 1-7 ({', '.join(f'{k + 1} {n}' for k, n in enumerate(CLASS_NAMES))})"
    )
  files, labels = [], []
  for folder in folders:
    names = sorted(
        n for n in os.listdir(os.path.join(split_dir, folder))
        if n.lower().endswith(IMAGE_EXTENSIONS)
    )
    files += [os.path.join(split, folder, n) for n in names]
    labels += [int(folder) - 1] * len(names)
  return ImageFileSource(
      image_dir=base, files=files, labels=np.array(labels, np.int32), class_names=CLASS_NAMES,
      task="fer", split=split, layout="rafdb-class-folders", root=base, **options,
  )
