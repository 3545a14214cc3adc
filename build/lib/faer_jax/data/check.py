"""`python -m faer_jax.data check`: what a dataset on disk holds, before training.

    python -m faer_jax.data check --dataset rafdb --root /data/RAF-DB
    python -m faer_jax.data check --dataset affectnet --root /data/AffectNet \\
        --num-classes 8 --verify-images --json

Prints, per split, the number of examples and the count per class (or, for
CelebA, the positives per attribute); AffectNet also the examples excluded by
the protocol. `--verify-images` decodes every image and lists those that are
missing or unreadable; the exit code is then 1 if there are any. Bad input
(a missing folder, a malformed label line) exits with 2 and a message.
"""

import argparse
import concurrent.futures
import json
import os
import sys

import numpy as np

from faer_jax.data import DATASETS, affectnet, celeba, create_source, rafdb
from faer_jax.data.errors import DataError, ImageReadError
from faer_jax.data.tfds_source import tfds_splits

_SPLITS = {"rafdb": rafdb.SPLITS, "affectnet": affectnet.SPLITS, "celeba": celeba.SPLITS}


def verify_images(source, skip: bool, *, workers: int | None = None) -> list[tuple[str, str]]:
  """Decodes every image of `source`.

  Args:
    source: any source of this package.
    skip: list unreadable images and go on; if False, raise on the first.
    workers: decoding threads (Pillow decodes outside the GIL); default: one
      per CPU.

  Returns:
    (path, reason) for each missing or undecodable image, in index order.

  Raises:
    ImageReadError: an image cannot be read and `skip` is False.
  """

  def read(index):
    try:
      source[index]
    except ImageReadError as e:
      if not skip:
        raise
      return e.path, e.reason
    return None

  with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
    return [bad for bad in pool.map(read, range(len(source))) if bad is not None]


def check_dataset(dataset: str, root: str, *, verify: bool = False, **options) -> dict:
  """Builds the report that `check` prints.

  Args:
    dataset: one of `DATASETS`.
    root: the dataset's folder (TFDS: the data_dir).
    verify: decode every image and list the unreadable ones per split.
    **options: source options, as for `create_source`.

  Returns:
    A JSON-ready dict: dataset, root, layout, found_at (the folder where the
    layout was found), class_names (or attribute_names), and splits: per
    split num_examples, class_counts (or attribute_positive_counts), for
    AffectNet excluded_counts ({code: count}), and with `verify` unreadable
    ([{path, reason}]).

  Raises:
    DataError: the dataset is missing or malformed.
  """
  splits = tfds_splits(root, options["name"]) if dataset == "tfds" else _SPLITS[dataset]
  report = {"dataset": dataset, "root": root}
  per_split = {}
  for split in splits:
    source = create_source(dataset, root, split, **options)
    report["layout"] = source.layout
    report["found_at"] = source.root
    if source.task == "fer":
      report["class_names"] = list(source.class_names)
      counts = np.bincount(source.labels, minlength=len(source.class_names))
      entry = {"num_examples": len(source), "class_counts": counts.tolist()}
    else:
      report["attribute_names"] = list(source.class_names)
      positives = source.labels.reshape(-1, len(source.class_names)).sum(axis=0)
      entry = {"num_examples": len(source), "attribute_positive_counts": positives.tolist()}
    if dataset == "affectnet":
      entry["excluded_counts"] = {str(k): v for k, v in source.excluded_counts.items()}
    if verify:
      print(f"verifying {len(source)} images of split {split!r}...", file=sys.stderr)
      entry["unreadable"] = [{"path": p, "reason": r} for p, r in verify_images(source, skip=True)]
    per_split[split] = entry
  report["splits"] = per_split
  return report


def format_report(report: dict) -> str:
  """Renders the report as a readable table."""
  lines = [f"{report['dataset']} at {report['found_at']} (layout {report['layout']})"]
  splits = report["splits"]
  if "class_names" in report:
    names = report["class_names"]
    width = max(len(n) for n in names + ["examples"]) + 2
    lines.append("split".ljust(12) + "".join(n.rjust(width) for n in ["examples"] + names))
    for split, entry in splits.items():
      cells = [entry["num_examples"]] + entry["class_counts"]
      lines.append(split.ljust(12) + "".join(str(c).rjust(width) for c in cells))
  else:
    lines.append("attribute".ljust(22) + "".join(s.rjust(18) for s in splits))
    counts = [str(e["num_examples"]) for e in splits.values()]
    lines.append("(examples)".ljust(22) + "".join(c.rjust(18) for c in counts))
    for a, name in enumerate(report["attribute_names"]):
      cells = []
      for entry in splits.values():
        positives = entry["attribute_positive_counts"][a]
        cells.append(f"{positives} ({positives / max(entry['num_examples'], 1):.1%})")
      lines.append(name.ljust(22) + "".join(c.rjust(18) for c in cells))
  for split, entry in splits.items():
    if entry.get("excluded_counts"):
      excluded = ", ".join(
          f"{affectnet.CODE_NAMES[int(code)]} (code {code}): {count}"
          for code, count in entry["excluded_counts"].items()
      )
      lines.append(f"{split}: excluded by the protocol: {excluded}")
  for split, entry in splits.items():
    if "unreadable" not in entry:
      continue
    bad = entry["unreadable"]
    lines.append(f"{split}: {len(bad)} unreadable image(s)")
    lines += [f"  {b['path']}: {b['reason']}" for b in bad[:20]]
    if len(bad) > 20:
      lines.append(f"  ... and {len(bad) - 20} more (--json lists all)")
  if not any("unreadable" in e for e in splits.values()):
    lines.append("Images were not opened; --verify-images decodes every one.")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  """Runs the `check` command; returns the exit code."""
  parser = argparse.ArgumentParser(
      prog="python -m faer_jax.data check",
      description="What a dataset on disk holds, per split; exit code 2 on bad input, "
      "1 if --verify-images finds unreadable images.",
  )
  parser.add_argument("--dataset", required=True, choices=DATASETS)
  parser.add_argument("--root", required=True, help="the dataset's folder (tfds: the data_dir)")
  parser.add_argument("--num-classes", type=int, choices=(7, 8), help="AffectNet protocol (default 7)")
  parser.add_argument("--name", help="TFDS dataset name, e.g. celeb_a or affectnet/seven")
  parser.add_argument("--verify-images", action="store_true", help="decode every image")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args = parser.parse_args(argv)
  options = {}
  if args.num_classes is not None:
    if args.dataset != "affectnet":
      parser.error("--num-classes applies to --dataset affectnet only")
    options["num_classes"] = args.num_classes
  if (args.name is not None) != (args.dataset == "tfds"):
    parser.error("--name is required with --dataset tfds, and only there")
  if args.name is not None:
    options["name"] = args.name
  try:
    report = check_dataset(args.dataset, args.root, verify=args.verify_images, **options)
  except (DataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(report) if args.json else format_report(report))
  return 1 if any(e.get("unreadable") for e in report["splits"].values()) else 0
