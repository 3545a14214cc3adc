r"""Run a trained or imported FAER on image files.

  python -m faer_jax.predict --workdir runs/demo face.jpg faces/ [--checkpoint best] [--json|--csv] [--top-k 3]

Images get exactly the evaluation preprocessing (faer_jax.data.transforms) and
go through the model in batches compiled once. Expressions: the predicted class
and every class's probability; attributes: each attribute's probability and
the set above 0.5 (logit > 0, the paper's threshold). A file that cannot be
read is named on stderr and the exit status is 1, after the other files'
predictions are printed; with --skip-bad it is listed under "skipped" instead.
--workdir may also be a directory written by `python -m faer_jax.interop import`.
"""

import argparse
import csv
import json
import sys

import numpy as np

from faer_jax import compile_cache, inference


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m faer_jax.predict", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
  p.add_argument("--workdir", required=True, help="A training run's workdir, or an imported model's directory.")
  p.add_argument("--checkpoint", default="latest", help="latest, best or a step (training runs).")
  fmt = p.add_mutually_exclusive_group()
  fmt.add_argument("--json", action="store_true", help="One JSON object on stdout.")
  fmt.add_argument("--csv", action="store_true", help="CSV on stdout: path, prediction, one column per class.")
  p.add_argument("--top-k", type=int, default=3, help="Classes listed per image (expressions).")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--skip-bad", action="store_true", help="List unreadable files as skipped instead of failing.")
  p.add_argument("--class-names", help="Comma-separated names, for an imported model without them.")
  return p


def predict_files(loaded: inference.LoadedModel, paths, batch_size: int = 32, top_k: int = 3):
  """(predictions, unreadable) for `paths`; each prediction a dict with path, probabilities and the decision."""
  run = inference.batched_logits(loaded, batch_size)
  predictions, unreadable = [], []
  pending_paths, pending_inputs = [], []

  def flush():
    if not pending_inputs:
      return
    probs = inference.probabilities(loaded.task, run(np.stack(pending_inputs)))
    for path, p in zip(pending_paths, probs):
      predictions.append(_describe(loaded, path, p, top_k))
    pending_paths.clear()
    pending_inputs.clear()

  for path, _, inputs in inference.read_images(paths, loaded.image_size, loaded.aspect):
    if isinstance(inputs, Exception):
      unreadable.append({"path": path, "reason": inputs.reason})
      continue
    pending_paths.append(path)
    pending_inputs.append(inputs)
    if len(pending_inputs) == batch_size:
      flush()
  flush()
  return predictions, unreadable


def _describe(loaded, path: str, probs: np.ndarray, top_k: int) -> dict:
  names = loaded.class_names
  out = {"path": path, "probabilities": {n: float(p) for n, p in zip(names, probs)}}
  if loaded.task == "fer":
    order = np.argsort(-probs)
    out["predicted"] = names[order[0]]
    out["top_k"] = [[names[i], float(probs[i])] for i in order[:top_k]]
  else:
    out["attributes"] = [n for n, p in zip(names, probs) if p > 0.5]
  return out


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  compile_cache.enable()
  try:
    loaded = inference.load_model(args.workdir, args.checkpoint,
                                  args.class_names.split(",") if args.class_names else None)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  paths = inference.expand_inputs(args.inputs)
  if not paths:
    print(f"error: no image files in {args.inputs}", file=sys.stderr)
    return 2
  predictions, unreadable = predict_files(loaded, paths, args.batch_size, args.top_k)
  if args.json:
    print(json.dumps({"workdir": args.workdir, "step": loaded.step, "task": loaded.task,
                      "class_names": list(loaded.class_names), "predictions": predictions,
                      "skipped" if args.skip_bad else "unreadable": unreadable}))
  elif args.csv:
    writer = csv.writer(sys.stdout)
    writer.writerow(["path", "prediction", *loaded.class_names])
    for p in predictions:
      decision = p.get("predicted") or ";".join(p["attributes"])
      writer.writerow([p["path"], decision, *(f"{p['probabilities'][n]:.6f}" for n in loaded.class_names)])
  else:
    for p in predictions:
      if loaded.task == "fer":
        ranked = ", ".join(f"{n} {100 * q:.1f}%" for n, q in p["top_k"])
        print(f"{p['path']}: {p['predicted']}  ({ranked})")
      else:
        print(f"{p['path']}: {', '.join(p['attributes']) or '(none)'}")
  for bad in unreadable:
    print(f"{'skipped' if args.skip_bad else 'error'}: cannot read {bad['path']}: {bad['reason']}", file=sys.stderr)
  return 1 if unreadable and not args.skip_bad else 0


if __name__ == "__main__":
  sys.exit(main())
