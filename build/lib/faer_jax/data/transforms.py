"""Image preprocessing shared by training, evaluation and prediction.

One definition, so a model is always fed exactly what it was trained on. It
follows the PyTorch original, whose torchvision pipeline runs on PIL images:
``transforms.Resize((S, S))`` on a PIL image calls ``Image.resize((S, S),
Image.BILINEAR)`` (PIL's bilinear filter widens its support when shrinking,
which is torchvision's "antialias"), then ``ToTensor`` divides by 255 and
``Normalize`` applies the ImageNet mean and std. Doing the same PIL call here
gives the same pixels, not merely similar ones.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# How a non-square image (CelebA is 178 wide x 218 high) becomes S x S:
#   squash:      resize both sides to S, distorting the aspect ratio; what
#                Resize((S, S)) does, and what the FAER original trains on.
#   center_crop: resize the short side to S, then crop the centre; what
#                Resize(S) + CenterCrop(S) does.
#   pad:         resize the long side to S, then pad the short one with the
#                ImageNet mean colour (zero after normalisation).
ASPECTS = ("squash", "center_crop", "pad")

_MEAN_255 = np.array(IMAGENET_MEAN, np.float32) * 255
_INV_STD_255 = 1.0 / (np.array(IMAGENET_STD, np.float32) * 255)
_MEAN_COLOUR = tuple(int(round(m)) for m in _MEAN_255)


def resize(image: np.ndarray, image_size: int, aspect: str = "squash",
           flip: bool = False) -> np.ndarray:
  """Resizes a uint8 HWC RGB image to (image_size, image_size, 3).

  Args:
    image: uint8 array of shape (H, W, 3).
    image_size: side S of the output.
    aspect: one of `ASPECTS`.
    flip: also mirror it left to right (the training augmentation). Done by
      PIL on its own pixels: flipping the numpy array instead copies pixel by
      pixel, 10x slower, when the batch is stacked.

  Returns:
    uint8 array of shape (S, S, 3).
  """
  if aspect not in ASPECTS:
    raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}.")
  height, width = image.shape[:2]
  if height == width == image_size and not flip:
    return image
  pil = _resized(Image.fromarray(image), image_size, aspect)
  if flip:
    pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(pil)


def _resized(pil: Image.Image, size: int, aspect: str) -> Image.Image:
  width, height = pil.size
  if width == height == size:
    return pil
  if aspect == "squash" or height == width:
    return pil.resize((size, size), Image.BILINEAR)
  if aspect == "center_crop":
    # torchvision's Resize(S): the long side is truncated, not rounded; its
    # CenterCrop rounds the offset.
    if width < height:
      new_w, new_h = size, int(size * height / width)
    else:
      new_w, new_h = int(size * width / height), size
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    resized = pil.resize((new_w, new_h), Image.BILINEAR)
    return resized.crop((left, top, left + size, top + size))
  scale = size / max(height, width)
  new_w, new_h = round(width * scale), round(height * scale)
  canvas = Image.new("RGB", (size, size), _MEAN_COLOUR)
  canvas.paste(pil.resize((new_w, new_h), Image.BILINEAR),
               ((size - new_w) // 2, (size - new_h) // 2))
  return canvas


def normalize(images: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
  """Maps uint8 RGB to float32 ``(x / 255 - mean) / std``, any leading shape.

  Args:
    images: uint8 array of shape (..., W, 3).
    out: optional float32 array of the same shape to write into (e.g. shared
      memory, saving a copy).

  Returns:
    float32 array of the same shape (`out` when given).
  """
  images = np.ascontiguousarray(images)
  if out is None:
    out = np.empty(images.shape, np.float32)
  # Computed on rows of whole pixels against a scale row of length W * 3:
  # broadcasting a (3,) vector makes numpy's inner loop 3 elements long,
  # which is 4x slower on a batch.
  row = images.shape[-2] * 3
  pixels = row // 3
  rows = out.reshape(-1, row)
  np.multiply(images.reshape(-1, row), np.tile(_INV_STD_255, pixels), out=rows)
  rows -= np.tile(_MEAN_255 * _INV_STD_255, pixels)
  return out


def preprocess(image: np.ndarray, image_size: int,
               aspect: str = "squash") -> np.ndarray:
  """Resize then normalise: what evaluation and prediction feed the model.

  Args:
    image: uint8 array of shape (H, W, 3), RGB.
    image_size: side S of the output.
    aspect: one of `ASPECTS`.

  Returns:
    float32 array of shape (S, S, 3).
  """
  return normalize(resize(image, image_size, aspect))
