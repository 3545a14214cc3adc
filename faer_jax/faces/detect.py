"""Face detection: MTCNN's cascade over an image pyramid, in numpy around the three Flax networks.

  faces = detect_faces(image)        # uint8 (H, W, 3) RGB -> [Face(box, score, landmarks)], best first

The cascade is the original's (Zhang et al., 2016):

1. P-Net slides over a pyramid of the image (scales 12 / min_face_size × 0.709^k
   while the short side stays ≥ 12 px); windows above thresholds[0] become
   boxes, merged by non-maximum suppression (IoU 0.5 per scale, 0.7 over all),
   moved by their offsets and made square.
2. R-Net rescores 24×24 crops of them (thresholds[1], NMS 0.7, offsets, square).
3. O-Net rescores 48×48 crops (thresholds[2]), gives the five landmarks, moves
   the boxes; a last NMS drops boxes inside a better one (overlap over the
   smaller box, 0.7).

Crops are taken with zeros outside the image and resampled by area averaging.
To compile each network for few shapes, pyramid levels are padded up to a
multiple of 32 px (windows that reach into the padding are dropped) and crop
batches up to a power of two.
"""

import dataclasses

import numpy as np

from faer_jax.faces import mtcnn

MIN_FACE_SIZE = 20
THRESHOLDS = (0.6, 0.7, 0.7)
PYRAMID_FACTOR = 0.709
_STRIDE, _CELL = 2, 12


@dataclasses.dataclass(frozen=True)
class Face:
  """One detected face, in pixels of the image it was found in.

  Attributes:
    box: (x0, y0, x1, y1).
    score: O-Net's face probability.
    landmarks: (5, 2) array of (x, y): left eye, right eye, nose tip, left and
      right mouth corners ("left" as seen in the image).
  """

  box: tuple[float, float, float, float]
  score: float
  landmarks: np.ndarray


def _area_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) weights of area resampling: each output pixel averages the input span it covers."""
  scale = size_in / size_out
  starts = np.arange(size_out)[:, None] * scale
  lo = np.maximum(starts, np.arange(size_in)[None, :])
  hi = np.minimum(starts + scale, np.arange(size_in)[None, :] + 1)
  return (np.maximum(hi - lo, 0) / scale).astype(np.float32)


def area_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """(H, W, C) float -> (height, width, C) by area averaging (for enlargements: the nearest pixel, blended)."""
  rows = _area_matrix(image.shape[0], height)
  cols = _area_matrix(image.shape[1], width)
  return np.einsum("oh,hwc,pw->opc", rows, image.astype(np.float32), cols, optimize=True)


def _normalize(pixels: np.ndarray) -> np.ndarray:
  return (pixels - 127.5) / 128.0


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, overlap: str = "union") -> np.ndarray:
  """Indices kept by greedy non-maximum suppression, best score first (boxes as x0, y0, x1, y1, inclusive)."""
  areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
  order = np.argsort(-scores, kind="stable")
  keep = []
  while order.size:
    i, rest = order[0], order[1:]
    keep.append(i)
    w = np.maximum(0.0, np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]) + 1)
    h = np.maximum(0.0, np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]) + 1)
    inter = w * h
    if overlap == "min":
      ratio = inter / np.minimum(areas[i], areas[rest])
    else:
      ratio = inter / (areas[i] + areas[rest] - inter)
    order = rest[ratio <= threshold]
  return np.asarray(keep, np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
  """Boxes grown to squares about their centers (side: the longer one)."""
  out = boxes.copy()
  w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  side = np.maximum(w, h)
  out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
  out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
  out[:, 2:4] = out[:, 0:2] + side[:, None]
  return out


def _apply_offsets(boxes: np.ndarray, offsets: np.ndarray, inclusive: bool = True) -> np.ndarray:
  extra = 1.0 if inclusive else 0.0
  w = boxes[:, 2] - boxes[:, 0] + extra
  h = boxes[:, 3] - boxes[:, 1] + extra
  return boxes[:, :4] + offsets * np.stack([w, h, w, h], axis=1)


def _crops(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
  """(N, size, size, 3) normalized crops of `boxes` (integer pixel boxes, zeros outside the image)."""
  height, width = image.shape[:2]
  out = np.empty((len(boxes), size, size, 3), np.float32)
  for k, (x0, y0, x1, y1) in enumerate(np.trunc(boxes[:, :4]).astype(np.int64)):
    h, w = max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1)
    canvas = np.zeros((h, w, 3), np.float32)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1 + 1, height), max(x0, 0), min(x1 + 1, width)
    if sy1 > sy0 and sx1 > sx0:
      canvas[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
    out[k] = area_resize(canvas, size, size)
  return _normalize(out)


def _run_padded(network, crops: np.ndarray):
  """The network on `crops`, the batch padded to a power of two (few shapes to compile)."""
  n = len(crops)
  size = max(16, 1 << (n - 1).bit_length())
  padded = np.zeros((size, *crops.shape[1:]), np.float32)
  padded[:n] = crops
  return [np.asarray(o)[:n] for o in network(padded)]


def _scales(height: int, width: int, min_face_size: int) -> list[float]:
  scale = _CELL / min_face_size
  side = min(height, width) * scale
  scales = []
  while side >= _CELL:
    scales.append(scale)
    scale *= PYRAMID_FACTOR
    side *= PYRAMID_FACTOR
  return scales


def _proposals(image: np.ndarray, min_face_size: int, threshold: float) -> np.ndarray:
  """Stage 1: (N, 9) boxes x0, y0, x1, y1, score, offsets from P-Net over the pyramid."""
  pnet = mtcnn.networks()["pnet"]
  height, width = image.shape[:2]
  found = []
  for scale in _scales(height, width, min_face_size):
    h, w = int(height * scale + 1), int(width * scale + 1)
    level = np.zeros((1, _round_up(h, 32), _round_up(w, 32), 3), np.float32)
    level[0, :h, :w] = _normalize(area_resize(image, h, w))
    offsets, probs = (np.asarray(o)[0] for o in pnet(level))
    # A window covers [2y, 2y + 12) × [2x, 2x + 12) of the level: keep those inside the image.
    valid = np.zeros(probs.shape, bool)
    valid[:(h - _CELL) // _STRIDE + 1, :(w - _CELL) // _STRIDE + 1] = True
    ys, xs = np.nonzero((probs >= threshold) & valid)
    if not len(ys):
      continue
    corner = np.stack([xs, ys], axis=1).astype(np.float64) * _STRIDE
    boxes = np.concatenate([np.floor((corner + 1) / scale), np.floor((corner + _CELL) / scale),
                            probs[ys, xs, None], offsets[ys, xs]], axis=1)
    found.append(boxes[_nms(boxes[:, :4], boxes[:, 4], 0.5)])
  if not found:
    return np.zeros((0, 9))
  boxes = np.concatenate(found)
  boxes = boxes[_nms(boxes[:, :4], boxes[:, 4], 0.7)]
  moved = _apply_offsets(boxes[:, :4], boxes[:, 5:9], inclusive=False)
  return _square(np.concatenate([moved, boxes[:, 4:5]], axis=1))


def detect_faces(image: np.ndarray, *, min_face_size: int = MIN_FACE_SIZE,
                 thresholds: tuple[float, float, float] = THRESHOLDS) -> list[Face]:
  """Every face in a uint8 (H, W, 3) RGB image, the most probable first.

  Args:
    image: the photograph.
    min_face_size: the smallest face searched for, in pixels (smaller: more
      pyramid levels, slower).
    thresholds: P-Net's, R-Net's and O-Net's face probabilities to pass.

  Returns:
    The faces (an empty list when there is none).
  """
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"detect_faces expects an (H, W, 3) RGB image, got shape {image.shape}")
  nets = mtcnn.networks()
  boxes = _proposals(image, min_face_size, thresholds[0])
  if len(boxes):  # Stage 2: R-Net.
    offsets, probs = _run_padded(nets["rnet"], _crops(image, boxes, 24))
    keep = probs > thresholds[1]
    boxes, offsets = np.concatenate([boxes[keep, :4], probs[keep, None]], axis=1), offsets[keep]
    pick = _nms(boxes[:, :4], boxes[:, 4], 0.7)
    boxes = _square(np.concatenate([_apply_offsets(boxes[pick], offsets[pick]), boxes[pick, 4:5]], axis=1))
  if not len(boxes):
    return []
  # Stage 3: O-Net.
  offsets, points, probs = _run_padded(nets["onet"], _crops(image, boxes, 48))
  keep = probs > thresholds[2]
  boxes, offsets, points, probs = boxes[keep], offsets[keep], points[keep], probs[keep]
  w = boxes[:, 2:3] - boxes[:, 0:1] + 1
  h = boxes[:, 3:4] - boxes[:, 1:2] + 1
  landmarks = np.stack([w * points[:, :5] + boxes[:, 0:1] - 1, h * points[:, 5:] + boxes[:, 1:2] - 1], axis=-1)
  moved = _apply_offsets(boxes, offsets)
  pick = _nms(moved, probs, 0.7, overlap="min")
  return [Face(box=tuple(float(v) for v in moved[i]), score=float(probs[i]), landmarks=landmarks[i])
          for i in pick]
