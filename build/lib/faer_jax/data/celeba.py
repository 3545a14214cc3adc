"""CelebA (40 binary attributes), as the owners ship it, flattened, or as CSV.

Owners' layout:

  Anno/list_attr_celeba.txt       count; the 40 names; `000001.jpg -1  1 ...`
  Eval/list_eval_partition.txt    `000001.jpg 0` (0 train, 1 validation, 2 test)
  Img/img_align_celeba/000001.jpg

The same two text files may sit side by side in one folder ("flat"), and the
CSV re-packaging has `list_attr_celeba.csv` (header `image_id,<40 names>`) and
`list_eval_partition.csv` (header `image_id,partition`). Images may be in
`img_align_celeba/`, a doubled `img_align_celeba/img_align_celeba/`, or the
folder itself. Attribute values 1/-1 become labels 1/0.
"""

import csv
import os
import warnings

import numpy as np

from faer_jax.data.errors import DataError, dataset_not_found, malformed_line
from faer_jax.data.images import ImageFileSource, Size, check_split, locate

# The file's order, which is also the order of the paper's figures.
ATTRIBUTE_NAMES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes",
    "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)
SPLITS = ("train", "validation", "test")  # partition codes 0, 1, 2

_ATTR_MARKERS = {
    os.path.join("Anno", "list_attr_celeba.txt"): "celeba-owners",
    "list_attr_celeba.txt": "celeba-flat",
    "list_attr_celeba.csv": "celeba-csv",
}
_IMAGE_DIRS = (
    os.path.join("Img", "img_align_celeba"),
    os.path.join("img_align_celeba", "img_align_celeba"),
    "img_align_celeba",
    "",  # the folder itself
)


def read_attribute_file(path: str) -> tuple[tuple[str, ...], list[str], np.ndarray]:
  """Parses `list_attr_celeba.txt` or `list_attr_celeba.csv`.

  Args:
    path: the attribute file; `.csv` selects the CSV re-packaging's format.

  Returns:
    (attribute names in file order, image names, int32 (N, 40) 0/1 labels).

  Raises:
    DataError: the count line disagrees with the rows, a row does not have 40
      values or a value is not 1 or -1; names file, line number and text.
  """
  with open(path, encoding="utf-8-sig", newline="") as f:
    if path.endswith(".csv"):
      records = [(n, r) for n, r in enumerate(csv.reader(f), start=1) if r]
      header_number = records[0][0] if records else 1
      names = [h.strip() for h in records[0][1][1:]] if records else []
      # (line number, image name, the values as text)
      rows = [(n, r[0].strip(), " ".join(r[1:])) for n, r in records[1:]]
      count = None
    else:
      lines = [(n, line) for n, line in enumerate(f.read().splitlines(), start=1) if line.strip()]
      header_number = lines[1][0] if len(lines) > 1 else 2
      names = lines[1][1].split() if len(lines) > 1 else []
      rows = [(n, *line.strip().split(None, 1)) for n, line in lines[2:]]
      rows = [row if len(row) == 3 else (*row, "") for row in rows]
      count_line = lines[0] if lines else (1, "")
      count = _parse_count(path, *count_line)
  if len(names) != len(ATTRIBUTE_NAMES):
    raise malformed_line(path, header_number, " ".join(names),
                         f"expected the {len(ATTRIBUTE_NAMES)} attribute names, found {len(names)}")
  if count is not None and count != len(rows):
    raise malformed_line(path, count_line[0], count_line[1],
                         f"the count line says {count} images but {len(rows)} rows follow")
  values = _parse_values(path, rows, len(names))
  files = [name for _, name, _ in rows]
  _check_unique(path, files, [n for n, _, _ in rows])
  return tuple(names), files, values


def _parse_count(path: str, number: int, text: str) -> int:
  try:
    return int(text.strip())
  except ValueError:
    raise malformed_line(path, number, text, "the first line must be the number of images") from None


def _parse_int_tokens(text: str) -> np.ndarray | None:
  """All whitespace-separated integers of `text`, or None if one is not."""
  with warnings.catch_warnings():
    # numpy < 2.3 warns and returns a partial array instead of raising.
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
      return np.fromstring(text, dtype=np.int32, sep=" ")
    except ValueError:
      return None


def _parse_values(path: str, rows, width: int) -> np.ndarray:
  """Maps the rows' 1/-1 values to an (N, width) 0/1 array.

  The owners' file holds 8 million values, so the work is vectorised; only
  when something is wrong are the rows re-read one by one to name the line.
  """
  if not rows:
    return np.zeros((0, width), np.int32)
  text = "\n".join(values for _, _, values in rows)
  chars = np.frombuffer(text.encode(), np.uint8)
  is_token = chars > ord(" ")  # space, tab, CR and LF are all below
  token_starts = np.flatnonzero(is_token & ~np.concatenate([[False], is_token[:-1]]))
  row_ends = np.append(np.flatnonzero(chars == ord("\n")), len(chars))
  tokens_per_row = np.diff(np.searchsorted(token_starts, row_ends), prepend=0)
  values = _parse_int_tokens(text)
  ok = (
      (tokens_per_row == width).all()
      and values is not None
      and values.size == len(rows) * width
      and (np.abs(values) == 1).all()
  )
  if not ok:
    for number, name, row_text in rows:
      tokens = row_text.split()
      if len(tokens) != width:
        raise malformed_line(path, number, f"{name} {row_text}",
                             f"expected an image name and {width} values, got {len(tokens)} values")
      if any(t not in ("1", "-1") for t in tokens):
        raise malformed_line(path, number, f"{name} {row_text}", "attribute values must be 1 or -1")
  return (values.reshape(len(rows), width) > 0).astype(np.int32)


def _check_unique(path: str, names: list[str], line_numbers: list[int]) -> None:
  if len(set(names)) != len(names):
    seen = set()
    for name, number in zip(names, line_numbers):
      if name in seen:
        raise malformed_line(path, number, name, f"{name} is listed twice")
      seen.add(name)


def read_partition_file(path: str) -> dict[str, int]:
  """Parses `list_eval_partition.txt` or `.csv` to {image name: 0, 1 or 2}.

  Raises:
    DataError: a malformed line; names file, line number and text.
  """
  with open(path, encoding="utf-8-sig", newline="") as f:
    if path.endswith(".csv"):
      rows = [(n, [v.strip() for v in r]) for n, r in enumerate(csv.reader(f), start=1) if r]
      rows = rows[1:] if rows and rows[0][1][:1] == ["image_id"] else rows
    else:
      rows = [(n, line.split()) for n, line in enumerate(f.read().splitlines(), start=1)]
  partition = {}
  for number, fields in rows:
    if not fields:
      continue
    if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
      raise malformed_line(path, number, " ".join(fields),
                           "expected `<image name> <partition 0, 1 or 2>`")
    if fields[0] in partition:
      raise malformed_line(path, number, " ".join(fields), f"{fields[0]} is listed twice")
    partition[fields[0]] = int(fields[1])
  return partition


def celeba_source(
    root: str,
    split: str,
    *,
    skip_bad_images: bool = False,
    min_size: Size | None = None,
) -> ImageFileSource:
  """Opens one split of CelebA, detecting the layout.

  Args:
    root: the CelebA folder, the folder above or one below it.
    split: 'train', 'validation' or 'test'.
    skip_bad_images: drop listed images that are missing, counting them in
      `source.skipped`, instead of failing when one is read.
    min_size: see `decode_image`.

  Returns:
    The source ('fae': labels are (N, 40) 0/1 in `class_names` order).

  Raises:
    DataError: the dataset is not found or a label file is malformed.
  """
  split = check_split(split, SPLITS)
  found = locate(root, tuple(_ATTR_MARKERS)) if os.path.isdir(root) else None
  if found is None:
    raise dataset_not_found(
        "CelebA", f"CelebA not found under {root!r}.", [os.path.join(root, m) for m in _ATTR_MARKERS],
        "Tried the owners' layout (Anno/, Eval/, Img/img_align_celeba/), the same "
        "files in one folder, and the CSV re-packaging, in this folder, its parent "
        "and its sub-folders.",
    )
  base, marker = found
  attr_path = os.path.join(base, marker)
  partition_path = _partition_file(base, attr_path)
  names, files, labels = read_attribute_file(attr_path)
  partition = read_partition_file(partition_path)
  missing = [f for f in files if f not in partition]
  if missing or len(partition) != len(files):
    raise DataError(
        f"{attr_path} and {partition_path} list different images "
        f"({len(files)} and {len(partition)}; e.g. "
        f"{(missing or sorted(set(partition) - set(files)))[:3]} is in only one of them)"
    )
  keep = np.array([partition[f] == SPLITS.index(split) for f in files], dtype=bool)
  return ImageFileSource(
      image_dir=_image_dir(base, files[0] if files else None),
      files=[f for f, k in zip(files, keep) if k], labels=labels[keep], class_names=names,
      task="fae", split=split, layout=_ATTR_MARKERS[marker], root=base,
      skip_bad_images=skip_bad_images, min_size=min_size,
  )


def _partition_file(base: str, attr_path: str) -> str:
  if attr_path.endswith(".csv"):
    candidates = [os.path.join(base, "list_eval_partition.csv")]
  else:
    candidates = list(dict.fromkeys([
        os.path.join(base, "Eval", "list_eval_partition.txt"),
        os.path.join(base, "list_eval_partition.txt"),
        os.path.join(os.path.dirname(attr_path), "list_eval_partition.txt"),
    ]))
  found = next((c for c in candidates if os.path.isfile(c)), None)
  if found is None:
    raise dataset_not_found(
        "CelebA", f"CelebA's attributes are in {attr_path} but its partition file is missing.",
        candidates,
    )
  return found


def _image_dir(base: str, first_image: str | None) -> str:
  """The first candidate folder holding the first listed image."""
  candidates = [os.path.join(base, d) for d in _IMAGE_DIRS]
  for folder in candidates:
    if first_image is None or os.path.isfile(os.path.join(folder, first_image)):
      return folder
  # Some images are missing; use the folder that exists so reads name them.
  existing = [c for c in candidates[:-1] if os.path.isdir(c)]
  if existing:
    return existing[0]
  zips = [os.path.join(base, "Img", "img_align_celeba.zip"), os.path.join(base, "img_align_celeba.zip")]
  hint = next((f"Extract {z} first." for z in zips if os.path.isfile(z)), "")
  raise dataset_not_found(
      "CelebA", f"CelebA's label files are in {base} but no folder holds {first_image}.",
      [os.path.join(c, first_image) for c in candidates], hint,
  )
