"""Face detectors compared on real photographs: `python -m faer_jax.faces.compare`.

The photographs are those scikit-image ships:

  - astronaut and camera (one face each; the cameraman in three-quarter view),
    coffee, chelsea (a cat), rocket, page, coins (no face), and compositions
    of them (two to three faces, smaller and turned);
  - the LFW subset: 100 faces and 100 non-face patches of 25×25 px, enlarged
    to 100×100 and tiled five to a row on a grey background, ten tiles per
    picture.

A detection is a true positive when its center lies in a face's box and its
side is 0.4 to 1.6 times the box's (detectors draw boxes differently); every
other detection is a false positive, every face left unmatched a miss.

Detectors: MTCNN (faer_jax.faces), OpenCV's Haar frontal-face cascade (OpenCV
4.x: `cv2.CascadeClassifier`, gone in OpenCV 5) and scikit-image's LBP
frontal-face cascade, each with its library's usual settings. Times are of a
second pass over the images (the first compiles MTCNN's programs for each
image size, as a video's first frame does for all the others).
"""

import argparse
import time

import numpy as np
from PIL import Image

GREY = 128
Box = tuple[float, float, float, float]


def _rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = np.round(image * 255).astype(np.uint8)
  return np.stack([image] * 3, axis=-1) if image.ndim == 2 else image[..., :3]


def photographs() -> list[tuple[str, np.ndarray, list[Box]]]:
  """(name, uint8 RGB image, face boxes x0, y0, x1, y1 marked by hand)."""
  from skimage import data
  astronaut, camera = data.astronaut(), _rgb(data.camera())
  astronaut_face, camera_face = (175, 50, 272, 182), (192, 108, 258, 200)
  out = [("astronaut", astronaut, [astronaut_face]), ("camera", camera, [camera_face])]
  out += [(name, _rgb(getattr(data, name)()), []) for name in ("coffee", "chelsea", "rocket", "page", "coins")]
  pair = np.concatenate([astronaut, astronaut[:, ::-1]], axis=1)
  mirrored = (1023 - astronaut_face[2], astronaut_face[1], 1023 - astronaut_face[0], astronaut_face[3])
  out.append(("astronaut, mirrored beside", pair, [astronaut_face, mirrored]))
  group = np.full((600, 1400, 3), GREY, np.uint8)
  group[40:552, 0:512] = astronaut
  group[150:406, 560:816] = np.asarray(Image.fromarray(camera).resize((256, 256)))
  half = np.asarray(Image.fromarray(astronaut).resize((256, 256)))
  group[150:406, 900:1156] = half
  shrink = lambda b, dx, dy, s: (b[0] * s + dx, b[1] * s + dy, b[2] * s + dx, b[3] * s + dy)
  out.append(("three sizes", group, [shrink(astronaut_face, 0, 40, 1), shrink(camera_face, 560, 150, 0.5),
                                     shrink(astronaut_face, 900, 150, 0.5)]))
  return out


def lfw_mosaics(tile: int = 100, per_row: int = 5, gap: int = 20) -> list[tuple[str, np.ndarray, list[Box]]]:
  """The LFW subset's 100 faces and 100 non-faces as mosaics of ten tiles (faces: one box per tile)."""
  from skimage import data
  patches = data.lfw_subset()
  out = []
  for kind, start in (("faces", 0), ("non-faces", 100)):
    for m in range(10):
      canvas = np.full((2 * tile + 3 * gap, per_row * tile + (per_row + 1) * gap, 3), GREY, np.uint8)
      boxes = []
      for k in range(10):
        y, x = gap + (k // per_row) * (tile + gap), gap + (k % per_row) * (tile + gap)
        patch = Image.fromarray(_rgb(patches[start + 10 * m + k])).resize((tile, tile), Image.Resampling.BILINEAR)
        canvas[y:y + tile, x:x + tile] = np.asarray(patch)
        if kind == "faces":
          boxes.append((x, y, x + tile, y + tile))
      out.append((f"LFW {kind} {m}", canvas, boxes))
  return out


def match(detections: list[Box], faces: list[Box]) -> tuple[int, int, int]:
  """(true positives, false positives, misses); each face matches at most one detection."""
  free = list(faces)
  tp = 0
  for x0, y0, x1, y1 in detections:
    cx, cy, side = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0)
    for face in free:
      fx0, fy0, fx1, fy1 = face
      if fx0 <= cx <= fx1 and fy0 <= cy <= fy1 and 0.4 <= side / max(fx1 - fx0, fy1 - fy0) <= 1.6:
        free.remove(face)
        tp += 1
        break
  return tp, len(detections) - tp, len(free)


def detectors() -> dict:
  """name -> image -> boxes, for the detectors installed here."""
  from faer_jax.faces import detect
  found = {"MTCNN (faer_jax.faces)": lambda image: [f.box for f in detect.detect_faces(image)]}
  try:
    import cv2
    haar = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")

    def opencv(image):
      gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
      return [(x, y, x + w, y + h) for x, y, w, h in haar.detectMultiScale(gray, 1.1, 5, minSize=(20, 20))]

    found[f"OpenCV {cv2.__version__} Haar cascade"] = opencv
  except (ImportError, AttributeError):  # no OpenCV, or OpenCV 5 (no CascadeClassifier)
    pass
  try:
    from skimage import data, feature
    lbp = feature.Cascade(data.lbp_frontal_face_cascade_filename())

    def skimage_lbp(image):
      side = min(image.shape[:2])
      hits = lbp.detect_multi_scale(image, scale_factor=1.2, step_ratio=1, min_size=(20, 20), max_size=(side, side))
      return [(d["c"], d["r"], d["c"] + d["width"], d["r"] + d["height"]) for d in hits]

    found["scikit-image LBP cascade"] = skimage_lbp
  except ImportError:
    pass
  return found


def evaluate(detect, images) -> dict:
  """Precision, recall, counts and mean seconds per image of `detect` over (name, image, faces) triples."""
  for _, image, _ in images:  # a first pass compiles (MTCNN: per image size) and loads, outside the timing
    detect(image)
  tp = fp = fn = 0
  seconds = 0.0
  for _, image, faces in images:
    start = time.perf_counter()
    boxes = detect(image)
    seconds += time.perf_counter() - start
    t, f, n = match(boxes, faces)
    tp, fp, fn = tp + t, fp + f, fn + n
  return {"true_positives": tp, "false_positives": fp, "misses": fn, "precision": tp / max(tp + fp, 1),
          "recall": tp / max(tp + fn, 1), "seconds_per_image": seconds / len(images)}


def main(argv=None) -> int:
  argparse.ArgumentParser(prog="python -m faer_jax.faces.compare", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
  sets = {"photographs": photographs(), "LFW mosaics": lfw_mosaics()}
  print("| detector | set | faces found | false detections | precision | recall | ms per image |")
  print("|---|---|---:|---:|---:|---:|---:|")
  for name, detect in detectors().items():
    for set_name, images in sets.items():
      r = evaluate(detect, images)
      faces = r["true_positives"] + r["misses"]
      print(f"| {name} | {set_name} ({len(images)} images, {faces} faces) | {r['true_positives']} | "
            f"{r['false_positives']} | {r['precision']:.3f} | {r['recall']:.3f} | "
            f"{1000 * r['seconds_per_image']:.0f} |")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
