"""The training runs of an experiment: their configs, their state on disk, running them, reading their results.

Run NAME, seed S lives in `WORKDIR/runs/NAME/seedS`, an ordinary training
run of `faer_jax.train` (config.json, checkpoints/, metrics.jsonl): it resumes
where it stopped, and once `final_metrics.json` is there it is finished and
not run again.
"""

import dataclasses
import json
import os
import pathlib
from typing import Any

import ml_collections
import numpy as np

from faer_jax import config_lib, train
from faer_jax.data import synth
from faer_jax.reproduce.experiments import CLASS_ALIASES, DATA_ROOT_FLAGS, DATASET_NAMES, Run

CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"
# The paper's recipe of each dataset: configs/FILE:ARG (ARG gets the variant).
_CONFIG_FILES = {"rafdb": ("rafdb.py", "{variant}"), "affectnet7": ("affectnet.py", "7,{variant}"),
                 "celeba": ("celeba.py", "{variant}")}

# --synthetic: the datasets replaced by synthetic faces in the owners' layouts, and a short recipe.
SYNTHETIC_SETS = {"rafdb": dict(num_train=1400, num_test=350, size=64),
                  "affectnet7": dict(num_train=1400, num_val=350, size=64),
                  "celeba": dict(num_train=1024, num_val=0, num_test=256, size=(64, 78))}
SYNTHETIC_RECIPE = {"image_size": 64, "batch_size": 32, "eval_batch_size": 128, "num_train_steps": 120,
                    "eval_every_steps": 40, "checkpoint_every_steps": 40, "log_every_steps": 40,
                    "optimizer.lr": 2e-3, "optimizer.warmup_steps": 20,
                    # nothing is pretrained: the backbone learns at the head's rate
                    "optimizer.backbone_lr_multiplier": 1.0}
SYNTHETIC_VARIANT = "test"


class ReproduceError(ValueError):
  """Input that cannot give a reproduction; the message names what to change."""


@dataclasses.dataclass(frozen=True)
class Options:
  """What the command line sets for every run.

  Attributes:
    workdir: the experiment folder (runs/, data/ and the reports).
    data_roots: dataset -> folder ('rafdb', 'affectnet7', 'celeba').
    seeds: seeds 0 .. seeds - 1 of every run.
    variant: the ConvNeXt variant (None: the config's, or 'test' with synthetic).
    pretrained: a PyTorch checkpoint every run starts from ('' for none).
    synthetic: synthetic datasets and the short recipe.
    overrides: config key -> value, applied last (the command line's --config.KEY=VALUE).
  """

  workdir: str
  data_roots: dict[str, str] = dataclasses.field(default_factory=dict)
  seeds: int = 1
  variant: str | None = None
  pretrained: str = ""
  synthetic: bool = False
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


def load_recipe(dataset: str, variant: str) -> ml_collections.ConfigDict:
  """The config `configs/<dataset>.py` gives for `variant` (the paper's recipe)."""
  file, arg = _CONFIG_FILES[dataset]
  path = CONFIGS_DIR / file
  if not path.is_file():
    raise ReproduceError(f"{path} not found: faer_jax.reproduce reads the paper's recipes from the repository's "
                         "configs/ folder (install with `pip install -e .` from a clone)")
  arg = arg.format(variant=variant).rstrip(",")
  return config_lib.load_file(f"{path}:{arg}" if arg else str(path))


def run_config(run: Run, seed: int, options: Options) -> ml_collections.ConfigDict:
  """The full config of one run and seed: the dataset's recipe with the run's model and loss."""
  variant = options.variant or (SYNTHETIC_VARIANT if options.synthetic else None)
  config = load_recipe(run.dataset, variant or "")
  config.unlock()
  config.seed = seed
  config.model.cc_attention = run.cc_attention
  config.loss.name = run.loss
  config.loss.center_loss_weight = run.center_loss_weight
  config.model.pretrained = options.pretrained
  if options.synthetic:
    config.update_from_flattened_dict(SYNTHETIC_RECIPE)
    config.data.root = synthetic_root(options.workdir, run.dataset)
  else:
    config.data.root = options.data_roots[run.dataset]
  try:
    config.update_from_flattened_dict(options.overrides)
  except (KeyError, AttributeError) as e:
    raise ReproduceError(f"--config override names no config key: {e}") from None
  config.lock()
  return config


def synthetic_root(workdir: str, dataset: str) -> str:
  return os.path.join(os.path.abspath(workdir), "data", f"{dataset}-synthetic")


def write_synthetic_data(workdir: str, datasets) -> None:
  """The synthetic sets of `datasets` under WORKDIR/data, each written once (atomically)."""
  makers = {"rafdb": synth.make_synthetic_rafdb, "affectnet7": synth.make_synthetic_affectnet,
            "celeba": synth.make_synthetic_celeba}
  for dataset in datasets:
    root = pathlib.Path(synthetic_root(workdir, dataset))
    synth.write_once(root, lambda tmp, d=dataset: makers[d](tmp, **SYNTHETIC_SETS[d]))


def check_data_roots(experiment, options: Options) -> None:
  """Every dataset the experiment needs has a folder, or the error names the flags to set."""
  if options.synthetic:
    return
  missing = [d for d in experiment.datasets if not options.data_roots.get(d)]
  if missing:
    needs = ", ".join(f"{DATASET_NAMES[d]} (--data-root.{DATA_ROOT_FLAGS[d]})" for d in experiment.datasets)
    raise ReproduceError(f"{experiment.name} needs {needs}; missing: "
                         + ", ".join(f"--data-root.{DATA_ROOT_FLAGS[d]}" for d in missing)
                         + " (or --synthetic)")
  for d in experiment.datasets:
    if not os.path.isdir(options.data_roots[d]):
      raise ReproduceError(f"--data-root.{DATA_ROOT_FLAGS[d]}={options.data_roots[d]} is not a folder "
                           f"({DATASET_NAMES[d]}, needed by {experiment.name})")


def run_dir(workdir: str, run: Run, seed: int) -> str:
  return os.path.join(os.path.abspath(workdir), "runs", run.name, f"seed{seed}")


def status(directory: str) -> str:
  """'done', 'step N' (the last checkpoint of an unfinished run) or 'new'."""
  if os.path.exists(os.path.join(directory, train.FINAL_METRICS)):
    return "done"
  checkpoints = os.path.join(directory, "checkpoints")
  saved = [int(d) for d in os.listdir(checkpoints) if d.isdigit()] if os.path.isdir(checkpoints) else []
  return f"step {max(saved)}" if saved else "new"


def check_same_config(directory: str, config: ml_collections.ConfigDict) -> None:
  """A run folder written with another config is refused, naming the keys that differ."""
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = config_lib.flatten(json.load(f))
  wanted = config_lib.flatten(json.loads(config.to_json_best_effort()))
  differing = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
  if differing:
    shown = ", ".join(f"{k} ({saved.get(k)!r} there, {wanted.get(k)!r} here)" for k in differing[:6])
    more = f" and {len(differing) - 6} more" if len(differing) > 6 else ""
    raise ReproduceError(f"{directory} holds a run of another config: {shown}{more}. Use another --workdir, "
                         "or the options that made it.")


@dataclasses.dataclass
class SeedResult:
  """What one finished run reports: the final checkpoint's metrics and the best evaluation's."""

  final: dict
  best: dict
  class_names: list[str]


def read_result(directory: str) -> SeedResult | None:
  """The metrics of a finished run (None if it is not finished).

  `best` is the evaluation with the highest accuracy over the run (the first
  of equals), as the original code reports it; its per-class and
  per-attribute accuracies are from that same evaluation.
  """
  final_path = os.path.join(directory, train.FINAL_METRICS)
  if not os.path.exists(final_path):
    return None
  with open(final_path) as f:
    final = json.load(f)
  evaluations = []
  with open(os.path.join(directory, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if "eval_accuracy" in record:
        evaluations.append({k.removeprefix("eval_"): v for k, v in record.items()})
  best = max(evaluations, key=lambda r: r["accuracy"]) if evaluations else final
  names = final.get("class_names") or final.get("attribute_names") or []
  return SeedResult(final, best, list(names))


def metric_value(metrics: dict, metric: str, class_names: list[str]) -> float:
  """The cell's metric, in %, from one evaluation's metrics."""
  if metric == "accuracy":
    return 100.0 * metrics["accuracy"]
  kind, name = metric.split(":", 1)
  index = next(class_names.index(alias) for alias in CLASS_ALIASES.get(name, (name,)) if alias in class_names)
  key = "per_class_accuracy" if kind == "class" else "per_attribute_accuracy"
  return 100.0 * metrics[key][index]


def summarize(values: list[float]) -> tuple[float, float | None]:
  """Mean and sample standard deviation (None for one value)."""
  array = np.asarray(values, np.float64)
  return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else None)
