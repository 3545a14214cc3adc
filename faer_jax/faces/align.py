"""Face alignment: a detected face warped to the geometry of the aligned images a model was trained on.

  crop = align_face(image, face.landmarks, "rafdb")   # uint8 (100, 100, 3)

A similarity transform (rotation, uniform scale, translation; Umeyama's least
squares) takes the detected landmarks onto a layout's template:

  rafdb   RAF-DB's aligned set: 100×100 faces aligned on five landmarks (eyes,
          nose tip, mouth corners). Template: the common five-point template
          of 112×112 face crops (as in ArcFace), scaled to 100×100.
  celeba  CelebA's img_align_celeba: 178×218 (W×H) images aligned on the eyes.
          Template: the eyes where CelebA's aligned landmark list puts them,
          about (69, 111) and (108, 111).

The model's own preprocessing (resize to its input size) follows, as for the
dataset's files.
"""

import numpy as np
from PIL import Image

# layout -> (width, height), template points (x, y), indices of the five MTCNN landmarks they match.
LAYOUTS = {
    "rafdb": ((100, 100), np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                     [41.5493, 92.3655], [70.7299, 92.2041]]) * (100 / 112), (0, 1, 2, 3, 4)),
    "celeba": ((178, 218), np.array([[69.0, 111.0], [108.0, 111.0]]), (0, 1)),
}


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """The 2×3 matrix M of the similarity (no reflection) that best maps src points onto dst: dst ≈ M @ [src; 1]."""
  src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
  src_mean, dst_mean = src.mean(0), dst.mean(0)
  s, d = src - src_mean, dst - dst_mean
  u, sigma, vt = np.linalg.svd(d.T @ s / len(src))
  sign = np.ones(2)
  if np.linalg.det(u) * np.linalg.det(vt) < 0:
    sign[1] = -1
  rotation = u @ np.diag(sign) @ vt
  scale = (sigma * sign).sum() / s.var(0).sum()
  translation = dst_mean - scale * rotation @ src_mean
  return np.concatenate([scale * rotation, translation[:, None]], axis=1)


def align_face(image: np.ndarray, landmarks: np.ndarray, layout: str) -> np.ndarray:
  """The face at `landmarks` ((5, 2) x, y: MTCNN's order) of a uint8 RGB image, in `layout`'s geometry."""
  (width, height), template, which = LAYOUTS[layout]
  matrix = similarity_transform(np.asarray(landmarks)[list(which)], template)
  # PIL maps each output pixel back into the input: give it the inverse.
  inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
  warped = Image.fromarray(image).transform((width, height), Image.Transform.AFFINE, inverse.ravel().tolist(),
                                            resample=Image.Resampling.BILINEAR)
  return np.asarray(warped)


def eye_angle(landmarks: np.ndarray) -> float:
  """Degrees the line from the left to the right eye turns from the horizontal (image y points down)."""
  (x0, y0), (x1, y1) = np.asarray(landmarks)[:2]
  return float(np.degrees(np.arctan2(y1 - y0, x1 - x0)))
