r"""Run a trained or imported FAER on image files.

  python -m faer_jax.predict --workdir runs/demo face.jpg faces/ [--checkpoint best] [--json|--csv] [--top-k 3]
  python -m faer_jax.predict --workdir runs/demo --detect photo.jpg [--json|--csv] [--align rafdb|celeba]
  python -m faer_jax.predict --workdir runs/demo --video in.mp4 --out out.mp4 [--every N]

Images get exactly the evaluation preprocessing (faer_jax.data.transforms) and
go through the model in batches compiled once. Expressions: the predicted class
and every class's probability; attributes: each attribute's probability and
the set above 0.5 (logit > 0, the paper's threshold). A file that cannot be
read is named on stderr and the exit status is 1, after the other files'
predictions are printed; with --skip-bad it is listed under "skipped" instead.

Without --detect each file is taken to be an aligned face crop, like the
datasets' images. With --detect each file is a photograph: every face in it is
found (MTCNN, faer_jax.faces), aligned to the training data's geometry (RAF-DB's
five-landmark 100×100 crops for expressions, CelebA's eye-aligned 178×218 for
attributes; --align chooses) and predicted; a photo without a face has an empty
list of faces. With --video, the same for the frames of a video, written as an
annotated video and a CSV (faer_jax.faces.video).
--workdir may also be a directory written by `python -m faer_jax.interop import`.

As a library: `load_model(workdir)` gives a trained (or imported) model ready to
run on image files (gradcam uses it too), `predict_files` its predictions.
"""

import argparse
import csv
import dataclasses
import json
import os
import sys
from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax
import numpy as np

from faer_jax import compile_cache
from faer_jax.data import images as image_io
from faer_jax.data import transforms
from faer_jax.data.affectnet import CLASS_NAMES as AFFECTNET_NAMES
from faer_jax.data.celeba import ATTRIBUTE_NAMES
from faer_jax.data.errors import ImageReadError
from faer_jax.data.rafdb import CLASS_NAMES as RAFDB_NAMES

ALIGN_LAYOUTS = ("rafdb", "celeba")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# Names for a model that came without them (an imported PyTorch checkpoint):
# the original FAER's datasets, by head size. --class-names overrides.
_DEFAULT_NAMES = {7: ("fer", RAFDB_NAMES), 8: ("fer", AFFECTNET_NAMES), 40: ("fae", ATTRIBUTE_NAMES)}


@dataclasses.dataclass
class LoadedModel:
  model: nn.Module
  params: Any
  task: str                 # 'fer' (softmax over classes) or 'fae' (sigmoid per attribute)
  class_names: tuple[str, ...]
  image_size: int
  aspect: str
  step: int | None          # the checkpoint's step, None for an imported model


def load_model(workdir: str, checkpoint: str = "latest", class_names: Sequence[str] | None = None,
               image_size: int | None = None) -> LoadedModel:
  """The model of a training run's workdir, or of a directory written by `python -m faer_jax.interop import`."""
  workdir = os.path.abspath(workdir)
  if os.path.exists(os.path.join(workdir, "config.json")):
    loaded = _from_training_run(workdir, checkpoint)
  elif os.path.exists(os.path.join(workdir, "model.json")):
    loaded = _from_import(workdir)
  else:
    raise FileNotFoundError(f"{workdir} holds neither a training run (config.json) nor an imported model "
                            "(model.json from `python -m faer_jax.interop import`).")
  if class_names:
    if len(class_names) != len(loaded.class_names):
      raise ValueError(f"--class-names gives {len(class_names)} names; "
                       f"the model has {len(loaded.class_names)} outputs.")
    loaded.class_names = tuple(class_names)
  if image_size:
    loaded.image_size = image_size
  return loaded


def _from_training_run(workdir: str, checkpoint: str) -> LoadedModel:
  from faer_jax import config_lib, evaluate, sharding
  config = config_lib.load(os.path.join(workdir, "config.json"))
  mesh = sharding.create_mesh(1)
  step, variables, programs = evaluate.restore_eval_variables(config, workdir, checkpoint, mesh)
  classes_path = os.path.join(workdir, "classes.json")
  if os.path.exists(classes_path):
    with open(classes_path) as f:
      names = tuple(json.load(f)["class_names"])
  else:
    names = _default_names(config.num_classes)[1]
  return LoadedModel(programs.model, variables["params"], config.task, names, config.image_size, config.data.aspect,
                     step)


def _from_import(workdir: str) -> LoadedModel:
  from faer_jax.interop.cli import load_imported
  from faer_jax.models import create_model
  variables, variant, num_classes, cc_attention = load_imported(workdir)
  task, names = _default_names(num_classes)
  return LoadedModel(create_model(variant, num_classes, cc_attention=cc_attention), variables["params"], task, names,
                     224, "squash", None)


def _default_names(num_classes: int) -> tuple[str, tuple[str, ...]]:
  return _DEFAULT_NAMES.get(num_classes, ("fer", tuple(f"class_{i}" for i in range(num_classes))))


def expand_inputs(inputs: Iterable[str]) -> list[str]:
  """Files as given, and the image files inside given folders (recursively, sorted)."""
  files = []
  for item in inputs:
    if os.path.isdir(item):
      found = sorted(os.path.join(d, f) for d, _, names in os.walk(item) for f in names
                     if f.lower().endswith(IMAGE_EXTENSIONS))
      files += found
    else:
      files.append(item)  # missing or not an image: reported when read, with its name
  return files


def read_image(path: str, image_size: int, aspect: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 resized image for display, float32 model input): the evaluation preprocessing."""
  image = image_io.decode_image(path)
  resized = transforms.resize(image, image_size, aspect)
  return resized, transforms.normalize(resized)


def read_images(paths: Sequence[str], image_size: int, aspect: str):
  """Yields (path, resized uint8, model input) or (path, None, ImageReadError) for each path."""
  for path in paths:
    try:
      resized, inputs = read_image(path, image_size, aspect)
    except ImageReadError as e:
      yield path, None, e
      continue
    yield path, resized, inputs


def batched_logits(loaded: LoadedModel, batch_size: int):
  """A function (N, S, S, 3) float32 -> (N, K) logits, compiled once for `batch_size` (the last batch is padded)."""
  apply = jax.jit(lambda params, x: loaded.model.apply({"params": params}, x, train=False)[1])

  def run(inputs: np.ndarray) -> np.ndarray:
    out = []
    for start in range(0, len(inputs), batch_size):
      chunk = inputs[start:start + batch_size]
      padded = np.zeros((batch_size, *chunk.shape[1:]), np.float32)
      padded[:len(chunk)] = chunk
      out.append(np.asarray(apply(loaded.params, padded))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, len(loaded.class_names)), np.float32)

  return run


def probabilities(task: str, logits: np.ndarray) -> np.ndarray:
  """Softmax over classes (FER) or a sigmoid per attribute (FAE), in float64 for printing."""
  logits = np.asarray(logits, np.float64)
  if task == "fer":
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
  return 1.0 / (1.0 + np.exp(-logits))



def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m faer_jax.predict", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_FOLDER")
  p.add_argument("--workdir", required=True, help="A training run's workdir, or an imported model's directory.")
  p.add_argument("--checkpoint", default="latest", help="latest, best or a step (training runs).")
  fmt = p.add_mutually_exclusive_group()
  fmt.add_argument("--json", action="store_true", help="One JSON object on stdout.")
  fmt.add_argument("--csv", action="store_true", help="CSV on stdout: path, prediction, one column per class.")
  p.add_argument("--top-k", type=int, default=3, help="Classes listed per image (expressions).")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--skip-bad", action="store_true", help="List unreadable files as skipped instead of failing.")
  p.add_argument("--class-names", help="Comma-separated names, for an imported model without them.")
  p.add_argument("--detect", action="store_true",
                 help="The inputs are photographs: find, align and predict every face (faer_jax.faces).")
  p.add_argument("--align", choices=ALIGN_LAYOUTS,
                 help="With --detect: the aligned geometry (default: rafdb for expressions, celeba for attributes).")
  p.add_argument("--min-face-size", type=int, default=20, help="With --detect: the smallest face, in pixels.")
  p.add_argument("--annotate", metavar="OUT_DIR",
                 help="With --detect: write each photo to OUT_DIR/NAME.png with its faces' boxes, landmarks and "
                      "predictions drawn on it.")
  p.add_argument("--video", metavar="IN", help="A video: write --out with its faces drawn, and --out's .csv.")
  p.add_argument("--out", metavar="OUT.mp4", help="With --video: the annotated video.")
  p.add_argument("--every", type=int, default=1, help="With --video: analyse every N-th frame.")
  return p


def predict_files(loaded: LoadedModel, paths, batch_size: int = 32, top_k: int = 3):
  """(predictions, unreadable) for `paths`; each prediction a dict with path, probabilities and the decision."""
  run = batched_logits(loaded, batch_size)
  predictions, unreadable = [], []
  pending_paths, pending_inputs = [], []

  def flush():
    if not pending_inputs:
      return
    probs = probabilities(loaded.task, run(np.stack(pending_inputs)))
    for path, p in zip(pending_paths, probs):
      predictions.append(_describe(loaded, path, p, top_k))
    pending_paths.clear()
    pending_inputs.clear()

  for path, _, inputs in read_images(paths, loaded.image_size, loaded.aspect):
    if isinstance(inputs, Exception):
      unreadable.append({"path": path, "reason": inputs.reason})
      continue
    pending_paths.append(path)
    pending_inputs.append(inputs)
    if len(pending_inputs) == batch_size:
      flush()
  flush()
  return predictions, unreadable


def describe_faces(loaded: LoadedModel, images: Sequence[np.ndarray], run, layout: str | None = None,
                   min_face_size: int = 20, top_k: int = 3) -> list[list[dict]]:
  """The faces of each uint8 RGB image: box, score, landmarks and the prediction of the aligned crop (the keys
  `predict_files` gives a file), all crops through `run` (a `batched_logits` function) together."""
  from faer_jax.faces import align, detect
  layout = layout or ("rafdb" if loaded.task == "fer" else "celeba")
  out, crops, faces = [], [], []
  for image in images:
    out.append([])
    for face in detect.detect_faces(image, min_face_size=min_face_size):
      out[-1].append({"box": [round(v, 2) for v in face.box], "score": face.score,
                      "landmarks": np.round(face.landmarks, 2).tolist()})
      aligned = align.align_face(image, face.landmarks, layout)
      crops.append(transforms.normalize(transforms.resize(aligned, loaded.image_size, loaded.aspect)))
      faces.append(out[-1][-1])
  if crops:
    for face, probs in zip(faces, probabilities(loaded.task, run(np.stack(crops)))):
      face.update(_describe(loaded, None, probs, top_k))
      del face["path"]
  return out


def predict_faces(loaded: LoadedModel, paths, batch_size: int = 32, top_k: int = 3, layout: str | None = None,
                  min_face_size: int = 20, annotate_dir: str | None = None):
  """(records, unreadable) for photographs: per image its `path` and `faces` (see `describe_faces`), in
  pixels of the photo as displayed (its EXIF orientation applied). With `annotate_dir`, each photo is also
  written there as NAME.png with its faces drawn on it (NAME_1.png, ... for photos named alike)."""
  from faer_jax.faces.annotate import annotate
  run = batched_logits(loaded, batch_size)
  records, unreadable, pending, used_names = [], [], [], set()
  if annotate_dir:
    os.makedirs(annotate_dir, exist_ok=True)

  def flush():
    for (path, image), faces in zip(pending, describe_faces(loaded, [image for _, image in pending], run, layout,
                                                            min_face_size, top_k)):
      records.append({"path": path, "faces": faces})
      if annotate_dir:
        stem = os.path.splitext(os.path.basename(path))[0]
        name, k = f"{stem}.png", 1
        while name in used_names:
          name, k = f"{stem}_{k}.png", k + 1
        used_names.add(name)
        annotate(image, faces, loaded.task).save(os.path.join(annotate_dir, name))
    pending.clear()

  for path in paths:
    try:
      pending.append((path, image_io.decode_image(path, exif_orientation=True)))
    except ImageReadError as e:
      unreadable.append({"path": path, "reason": e.reason})
    if len(pending) == batch_size:
      flush()
  flush()
  return records, unreadable


def _describe(loaded, path: str | None, probs: np.ndarray, top_k: int) -> dict:
  names = loaded.class_names
  out = {"path": path, "probabilities": {n: float(p) for n, p in zip(names, probs)}}
  if loaded.task == "fer":
    order = np.argsort(-probs)
    out["predicted"] = names[order[0]]
    out["top_k"] = [[names[i], float(probs[i])] for i in order[:top_k]]
  else:
    out["attributes"] = [n for n, p in zip(names, probs) if p > 0.5]
  return out


def _flag_error(args) -> str | None:
  """What is wrong with the flags taken together, checked before the model loads."""
  if args.annotate and not args.detect:
    return "--annotate draws the faces --detect finds: add --detect"
  if args.video and (not args.out or args.inputs):
    return "--video IN takes --out OUT.mp4 and no image arguments"
  if not args.video and not args.inputs:
    return "no images given (or --video IN --out OUT.mp4)"
  if args.every < 1 or args.min_face_size < 1:
    return f"--every {args.every} and --min-face-size {args.min_face_size} must be >= 1"
  return None


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  problem = _flag_error(args)
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    return 2
  compile_cache.enable()
  try:
    loaded = load_model(args.workdir, args.checkpoint,
                                  args.class_names.split(",") if args.class_names else None)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.video:
    return _video(args, loaded)
  paths = expand_inputs(args.inputs)
  if not paths:
    print(f"error: no image files in {args.inputs}", file=sys.stderr)
    return 2
  if args.detect:
    try:
      predictions, unreadable = predict_faces(loaded, paths, args.batch_size, args.top_k, args.align,
                                              args.min_face_size, args.annotate)
    except FileNotFoundError as e:  # the detector's weights are not installed
      print(f"error: {e}", file=sys.stderr)
      return 2
  else:
    predictions, unreadable = predict_files(loaded, paths, args.batch_size, args.top_k)
  if args.json:
    print(json.dumps({"workdir": args.workdir, "step": loaded.step, "task": loaded.task,
                      "class_names": list(loaded.class_names), "predictions": predictions,
                      "skipped" if args.skip_bad else "unreadable": unreadable}))
  elif args.csv:
    _write_csv(loaded, predictions, args.detect)
  else:
    for p in predictions:
      if not args.detect:
        print(f"{p['path']}: {_decision(loaded, p)}")
        continue
      print(f"{p['path']}: {len(p['faces'])} face{'' if len(p['faces']) == 1 else 's'}")
      for i, face in enumerate(p["faces"]):
        print(f"  {i}: [{', '.join(f'{v:.0f}' for v in face['box'])}] {_decision(loaded, face)}")
  for bad in unreadable:
    print(f"{'skipped' if args.skip_bad else 'error'}: cannot read {bad['path']}: {bad['reason']}", file=sys.stderr)
  return 1 if unreadable and not args.skip_bad else 0


def _video(args, loaded: LoadedModel) -> int:
  from faer_jax.faces.video import VideoError, annotate_video
  try:
    import cv2  # noqa: F401
  except ImportError:
    print("error: --video reads and writes videos with OpenCV: pip install 'faer-jax[faces]'", file=sys.stderr)
    return 2
  try:
    done = annotate_video(loaded, args.video, args.out, every=args.every, batch_size=args.batch_size,
                          layout=args.align, min_face_size=args.min_face_size, top_k=args.top_k)
  except (VideoError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(done) if args.json else
        f"{done['frames']} frames, {done['analysed']} analysed, {done['faces']} faces: wrote {done['video']} "
        f"and {done['csv']}")
  return 0


def _decision(loaded, p: dict) -> str:
  if loaded.task == "fer":
    return f"{p['predicted']}  (" + ", ".join(f"{n} {100 * q:.1f}%" for n, q in p["top_k"]) + ")"
  return ", ".join(p["attributes"]) or "(none)"


def _write_csv(loaded, predictions, faces: bool) -> None:
  """One row per file, or with --detect per face (index and box after the path)."""
  writer = csv.writer(sys.stdout)
  writer.writerow(["path", *(("face", "x0", "y0", "x1", "y1") if faces else ()), "prediction", *loaded.class_names])
  rows = ([(p["path"], i, *f["box"], f) for p in predictions for i, f in enumerate(p["faces"])] if faces
          else [(p["path"], p) for p in predictions])
  for *head, p in rows:
    decision = p.get("predicted") or ";".join(p["attributes"])
    writer.writerow([*head, decision, *(f"{p['probabilities'][n]:.6f}" for n in loaded.class_names)])


if __name__ == "__main__":
  sys.exit(main())
