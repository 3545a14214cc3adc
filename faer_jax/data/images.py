"""Image files on disk: decoding them, and the source that serves a list of them.

Once its label file is parsed, each file-based dataset (RAF-DB, AffectNet,
CelebA) is just a list of image files with labels; `ImageFileSource` serves
that list to grain. The helpers at the end find a dataset's folder when the
user points one level above or below it.
"""

import io
import logging
import operator
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from faer_jax.data.errors import DataError, ImageReadError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# A size as (height, width), or one int for both sides.
Size = int | tuple[int, int]


def decode_image(path_or_bytes, *, name: str | None = None, min_size: Size | None = None,
                 exif_orientation: bool = False) -> np.ndarray:
  """Decodes an image to a uint8 (height, width, 3) RGB array.

  Greyscale, palette, CMYK and alpha images are converted to RGB. EXIF
  orientation is ignored by default: the datasets are aligned face crops whose
  pixels are already upright, and rotating would undo the alignment.
  Photographs (a camera's or phone's) are turned as their EXIF says with
  `exif_orientation=True`, so that pixels are those of the photo as displayed.

  Args:
    path_or_bytes: a file path, or the encoded bytes.
    name: names the image in errors when bytes are given.
    min_size: when given, a JPEG may be decoded at a reduced scale (1/2, 1/4,
      1/8; much faster for large files) as long as neither side falls below
      this size. Other formats ignore it.
    exif_orientation: apply the EXIF orientation tag (photographs).

  Returns:
    The decoded image; a fresh, writable array.

  Raises:
    ImageReadError: the file is missing or does not decode; names the file.
  """
  if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
    label = name or "<bytes>"
    file = io.BytesIO(path_or_bytes)
  else:
    label = name or os.fspath(path_or_bytes)
    file = os.fspath(path_or_bytes)
  try:
    with Image.open(file) as image:
      if min_size is not None:
        height, width = (min_size, min_size) if isinstance(min_size, int) else min_size
        # Picks the largest scale-down that keeps both sides >= the request.
        image.draft("RGB", (width, height))
      if exif_orientation:
        image = ImageOps.exif_transpose(image)
      return _to_rgb_array(image)
  except FileNotFoundError:
    raise ImageReadError(label, "file not found") from None
  # Pillow signals a bad file with any of these (truncated data is an OSError).
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ImageReadError(label, f"{type(e).__name__}: {e}") from e


def _to_rgb_array(image: Image.Image) -> np.ndarray:
  if image.mode.startswith("I;16"):
    # 16-bit greyscale PNG: keep the high byte; convert("RGB") would clip
    # every value above 255 to white.
    grey = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  if image.mode != "RGB":
    image = image.convert("RGB")
  return np.array(image, dtype=np.uint8)


def find_extension_variant(path: str, listings: dict[str, dict[str, str]] | None = None) -> str | None:
  """Finds the file that `path` names when only the extension differs.

  Dataset copies disagree on the case of extensions (`.jpg`, `.JPG`) and
  sometimes on the format (`.png`), while label files list one spelling.

  Args:
    path: the listed path, which does not exist.
    listings: optional cache of folder listings, shared across calls when many
      paths are resolved in one scan.

  Returns:
    The existing path with the same folder and stem, preferring a case variant
    of the same extension, or None.
  """
  folder, base = os.path.split(path)
  if listings is None:
    listings = {}
  if folder not in listings:
    try:
      listings[folder] = {name.lower(): name for name in os.listdir(folder or ".")}
    except OSError:
      listings[folder] = {}
  listing = listings[folder]
  if base.lower() in listing:
    return os.path.join(folder, listing[base.lower()])
  stem = os.path.splitext(base)[0].lower()
  for extension in IMAGE_EXTENSIONS:
    if stem + extension in listing:
      return os.path.join(folder, listing[stem + extension])
  return None


def checked_index(index, length: int) -> int:
  """Returns `index` as an int, or raises IndexError unless 0 <= index < length."""
  i = operator.index(index)
  if not 0 <= i < length:
    # Negative indices are refused: a sampler producing one has a bug.
    raise IndexError(f"index {index} out of range for a source of {length} examples")
  return i


class ImageFileSource:
  """A labelled list of image files, read by index; a grain data source.

  Holds only plain lists and arrays, so it pickles cheaply into grain workers.

  Attributes:
    class_names: expression names in label order ('fer'), or the attribute
      names in label-column order ('fae').
    task: 'fer' (one int label per image) or 'fae' (a 0/1 vector).
    split: the canonical split name.
    labels: int32 array of all labels, (N,) for 'fer', (N, A) for 'fae'.
    layout: which on-disk layout was found, e.g. 'rafdb-owners'.
    root: the folder where the layout was found.
    excluded_counts: label codes listed in the label file but outside the
      protocol, mapped to how many examples carried them (dropped, counted).
    skipped: (path, reason) for each listed image left out by
      `skip_bad_images`.
  """

  def __init__(
      self,
      *,
      image_dir: str,
      files: Sequence[str],
      labels: np.ndarray,
      class_names: Sequence[str],
      task: str,
      split: str,
      layout: str,
      root: str,
      boxes: np.ndarray | None = None,
      excluded_counts: dict[int, int] | None = None,
      skip_bad_images: bool = False,
      min_size: Size | None = None,
  ):
    """Initialises the source.

    Args:
      image_dir: folder the file names are relative to.
      files: image file names relative to `image_dir`, one per example.
      labels: see the class attribute.
      class_names: see the class attribute.
      task: see the class attribute.
      split: see the class attribute.
      layout: see the class attribute.
      root: see the class attribute.
      boxes: optional int (N, 4) x, y, width, height crop per image.
      excluded_counts: see the class attribute.
      skip_bad_images: check at once that every file exists and drop the
        missing ones (recorded in `skipped`, and logged) instead of failing
        when one is read.
      min_size: passed to `decode_image`; ignored when cropping to boxes,
        whose coordinates refer to the full-size image.
    """
    labels = np.asarray(labels, dtype=np.int32)
    if len(files) != len(labels) or (boxes is not None and len(boxes) != len(files)):
      raise ValueError("files, labels and boxes must have the same length")
    self.class_names = tuple(class_names)
    self.task = task
    self.split = split
    self.layout = layout
    self.root = root
    self.excluded_counts = dict(excluded_counts or {})
    self.skipped: list[tuple[str, str]] = []
    self._image_dir = image_dir
    self._files = list(files)
    self._boxes = None if boxes is None else np.asarray(boxes, dtype=np.int32)
    self._min_size = min_size
    if skip_bad_images:
      keep = self._drop_missing_files()
      labels = labels[keep]
      if self._boxes is not None:
        self._boxes = self._boxes[keep]
    self.labels = labels

  def _drop_missing_files(self) -> np.ndarray:
    """Resolves every file name once; returns the indices of those found."""
    listings = {}
    keep = []
    files = []
    for i, name in enumerate(self._files):
      path = os.path.join(self._image_dir, name)
      if not os.path.exists(path):
        path = find_extension_variant(path, listings)
      if path is None:
        self.skipped.append((os.path.join(self._image_dir, name), "file not found"))
        continue
      keep.append(i)
      files.append(os.path.relpath(path, self._image_dir))
    self._files = files
    if self.skipped:
      logging.warning(
          "Skipping %d of %d listed images of split %r that are missing under %s (first: %s).",
          len(self.skipped), len(self.skipped) + len(files), self.split,
          self._image_dir, self.skipped[0][0],
      )
    return np.asarray(keep, dtype=np.int64)

  def __len__(self) -> int:
    return len(self._files)

  def path(self, index: int) -> str:
    """The image file of example `index` (resolving extension variants)."""
    path = os.path.join(self._image_dir, self._files[checked_index(index, len(self))])
    if not os.path.exists(path):
      path = find_extension_variant(path) or path
    return path

  def __getitem__(self, index: int) -> dict:
    """Decodes example `index` to {'image': uint8 HWC RGB, 'label': ...}.

    Raises:
      IndexError: `index` is negative or not below `len(self)`.
      ImageReadError: the image is missing or does not decode.
    """
    i = checked_index(index, len(self))
    path = self.path(i)
    if self._boxes is None:
      image = decode_image(path, min_size=self._min_size)
    else:
      image = _crop(decode_image(path), self._boxes[i], path)
    label = int(self.labels[i]) if self.task == "fer" else self.labels[i].copy()
    return {"image": image, "label": label}

  def __repr__(self) -> str:
    return (
        f"ImageFileSource(layout={self.layout!r}, split={self.split!r}, "
        f"examples={len(self)}, root={self.root!r})"
    )


def _crop(image: np.ndarray, box: np.ndarray, path: str) -> np.ndarray:
  """Crops to an x, y, width, height box clipped to the image."""
  x, y, width, height = (int(v) for v in box)
  top, left = max(y, 0), max(x, 0)
  bottom, right = min(y + height, image.shape[0]), min(x + width, image.shape[1])
  if bottom <= top or right <= left:
    raise ImageReadError(
        path, f"face box x={x} y={y} w={width} h={height} lies outside the "
        f"{image.shape[1]}x{image.shape[0]} image"
    )
  return image[top:bottom, left:right]


def check_split(split: str, splits: Sequence[str], aliases: dict[str, str] | None = None) -> str:
  """Returns the canonical split name, or raises ValueError naming the valid ones."""
  split = (aliases or {}).get(split, split)
  if split not in splits:
    valid = list(splits) + list(aliases or {})
    raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(valid)}")
  return split


def locate(root: str, markers: Sequence[str]) -> tuple[str, str] | None:
  """Finds the folder at which one of `markers` (relative paths) exists.

  Users point at the dataset's folder, at the folder above it or at one of
  its sub-folders; we look in `root` and its parent, then in its sub-folders.

  Args:
    root: the folder the user gave; must exist.
    markers: relative paths that identify a layout, in order of preference.

  Returns:
    (folder, marker) for the first match, or None.

  Raises:
    DataError: several sub-folders of `root` match, so the choice is unclear.
  """
  root = os.path.abspath(root)
  # Marker first: `Anno/` of CelebA's owners' layout holds the flat layout's
  # marker, but the parent's owners' layout is the right reading.
  for marker in markers:
    for base in (root, os.path.dirname(root)):
      if os.path.exists(os.path.join(base, marker)):
        return base, marker
  matches = []
  with os.scandir(root) as entries:
    children = sorted(e.path for e in entries if e.is_dir() and not e.name.startswith("."))
  for child in children:
    marker = next((m for m in markers if os.path.exists(os.path.join(child, m))), None)
    if marker is not None:
      matches.append((child, marker))
  if len(matches) > 1:
    raise DataError(
        f"several folders under {root} hold a dataset ({', '.join(m[0] for m in matches)}); "
        "pass the one you mean as the root"
    )
  return matches[0] if matches else None
