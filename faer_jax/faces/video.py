"""The faces of a video: an annotated copy and a CSV of every analysed frame's faces and predictions.

  python -m faer_jax.predict --workdir W --video IN.mp4 --out OUT.mp4 [--every N]

Frames are read and written with OpenCV (the `opencv-python-headless` wheel
carries FFmpeg), in chunks: the faces of every N-th frame are found, aligned
and predicted in one batched pass per chunk; every frame is written, those in
between with the last analysed frame's faces drawn. OUT.csv holds one row per
face of each analysed frame (a frame without a face: one row with the face
fields empty).
"""

import csv
import os

import numpy as np

_CHUNK = 16  # frames decoded, analysed and written together


class VideoError(ValueError):
  """A video that cannot be read or written; the message names the file."""


def _open_capture(path: str):
  os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg's own messages: the error says it in one line
  import cv2
  if not os.path.isfile(path):
    raise VideoError(f"{path}: no such file")
  capture = cv2.VideoCapture(path)
  if not capture.isOpened():
    raise VideoError(f"{path}: not a video OpenCV can open")
  return capture


def annotate_video(loaded, in_path: str, out_path: str, *, every: int = 1, batch_size: int = 32,
                   layout: str | None = None, min_face_size: int = 20, top_k: int = 3,
                   progress: bool = True) -> dict:
  """Writes OUT_PATH (the video with its faces drawn) and OUT_PATH's .csv; returns what it did.

  Args:
    loaded: a `predict.load_model` model.
    in_path, out_path: the videos (OUT_PATH's extension picks the container; .mp4 is written as MPEG-4 part 2).
    every: analyse every `every`-th frame (1: all).
    batch_size, layout, min_face_size, top_k: as for `predict --detect`.
    progress: a progress bar on stderr.

  Returns:
    {'frames', 'analysed', 'faces', 'fps', 'size', 'video', 'csv'}.
  """
  import cv2
  from tqdm import tqdm
  from faer_jax import predict
  from faer_jax.faces.annotate import annotate
  if every < 1:
    raise VideoError(f"--every {every}: must be >= 1")
  capture = _open_capture(in_path)
  ok, frame = capture.read()
  if not ok:
    raise VideoError(f"{in_path}: no frame could be decoded (an empty video, or a codec this OpenCV cannot read)")
  fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
  height, width = frame.shape[:2]
  total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  writer = cv2.VideoWriter(out_path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
  if not writer.isOpened():
    raise VideoError(f"{out_path}: cannot be written as a video (use a .mp4 name)")
  csv_path = os.path.splitext(out_path)[0] + ".csv"
  run = predict.batched_logits(loaded, batch_size)
  names = list(loaded.class_names)
  counts = {"frames": 0, "analysed": 0, "faces": 0}
  last: list[dict] = []
  bar = tqdm(total=total, unit="frame", disable=not progress, desc=os.path.basename(in_path))
  with open(csv_path, "w", newline="") as f:
    rows = csv.writer(f)
    rows.writerow(["frame", "time", "face", "x0", "y0", "x1", "y1", "score", "prediction", *names])
    chunk = []
    while ok:
      chunk.append((counts["frames"], frame[..., ::-1]))  # OpenCV's BGR -> RGB
      counts["frames"] += 1
      ok, frame = capture.read()
      if len(chunk) < _CHUNK and ok:
        continue
      analysed = [(i, image) for i, image in chunk if i % every == 0]
      found = dict(zip([i for i, _ in analysed], predict.describe_faces(
          loaded, [image for _, image in analysed], run, layout, min_face_size, top_k)))
      for i, image in chunk:
        if i in found:
          last = found[i]
          counts["analysed"] += 1
          counts["faces"] += len(last)
          for k, face in enumerate(last):
            decision = face.get("predicted") or ";".join(face["attributes"])
            rows.writerow([i, f"{i / fps:.3f}", k, *face["box"], f"{face['score']:.4f}", decision,
                           *(f"{face['probabilities'][n]:.6f}" for n in names)])
          if not last:
            rows.writerow([i, f"{i / fps:.3f}", *[""] * (7 + len(names))])
        writer.write(np.ascontiguousarray(np.asarray(annotate(image, last, loaded.task))[..., ::-1]))
      bar.update(len(chunk))
      chunk = []
  bar.close()
  capture.release()
  writer.release()
  return {**counts, "fps": fps, "size": [width, height], "video": out_path, "csv": csv_path}
