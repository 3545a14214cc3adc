r"""Evaluate a checkpoint: `python -m faer_jax.evaluate --config CONFIG --workdir DIR [--checkpoint best] [--json]`.

FER: accuracy, per-class accuracy (the paper's Table 5), mean class accuracy and
the confusion matrix; FAE: the mean of the 40 attribute accuracies and each one
(Fig. 4). Writes the confusion matrix or the per-attribute chart as PNG and the
metrics as JSON into the workdir; `--json` prints one JSON object on stdout.
Without --config, the run's saved config (workdir/config.json) is used.
"""

import json
import os
import sys

from absl import app, flags
import jax

from faer_jax import checkpoint, config_lib, paper_metrics, plots, sharding, steps, train
from faer_jax.data import DataError

FLAGS = flags.FLAGS


def load_run_config(workdir: str, config=None):
  """The given config, or the one the run in `workdir` saved."""
  if config is not None:
    return config
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: pass --config, or point --workdir at a training run.")
  return config_lib.load(path)


def restore_eval_variables(config, workdir: str, which: str, mesh):
  """Checkpoint `which` ('latest', 'best' or a step) of the run in `workdir`, as evaluation needs it.

  Returns:
    (step, variables, programs): `variables` is `steps.eval_variables` of the
    saved state (params, and centers where the run has them), read without the
    optimizer state; `programs` are the config's on `mesh` (`train.build_programs`).
  """
  # The schedule (steps per epoch) plays no part in what is restored.
  programs = train.build_programs(config, mesh, steps_per_epoch=1)
  target = steps.eval_variables(programs.abstract_state)
  manager = checkpoint.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"))
  try:
    restored = manager.restore(which, target, partial=True)
  finally:
    manager.close()
  return restored.step, restored.state, programs


def evaluate_checkpoint(config, workdir: str, which: str = "latest") -> dict:
  """Metrics of one checkpoint on the config's evaluation split; also writes its PNG and JSON."""
  config_lib.validate(config)
  mesh = sharding.create_mesh(config.fsdp)
  step, variables, programs = restore_eval_variables(config, workdir, which, mesh)
  source = train.create_data_source(config, config.data.eval_split)
  metrics = {"step": step, "split": config.data.eval_split,
             **paper_metrics.evaluate(programs.eval_step, variables, source, config, mesh)}
  if jax.process_index() == 0:
    title = f"{config.data.dataset} {config.data.eval_split}, step {step}: accuracy {100 * metrics['accuracy']:.2f} %"
    if config.task == "fer":
      metrics["figure"] = os.path.join(workdir, f"confusion_matrix_step{step}.png")
      plots.confusion_matrix_figure(metrics["confusion_matrix"], metrics["class_names"], metrics["figure"], title)
    else:
      metrics["figure"] = os.path.join(workdir, f"attribute_accuracy_step{step}.png")
      plots.attribute_accuracy_figure(metrics["per_attribute_accuracy"], metrics["attribute_names"],
                                      metrics["figure"], title)
    with open(os.path.join(workdir, f"eval_step{step}.json"), "w") as f:
      json.dump(metrics, f, indent=1)
  return metrics


def format_table(metrics: dict) -> str:
  lines = [f"step {metrics['step']} on {metrics['split']} ({metrics['num_examples']} examples)",
           f"  accuracy             {100 * metrics['accuracy']:6.2f} %",
           f"  loss                 {metrics['loss']:.4f}"]
  if "per_class_accuracy" in metrics:
    lines.append(f"  mean class accuracy  {100 * metrics['mean_class_accuracy']:6.2f} %")
    pairs = zip(metrics["class_names"], metrics["per_class_accuracy"])
  else:
    pairs = zip(metrics["attribute_names"], metrics["per_attribute_accuracy"])
  lines += [f"    {name:<22} {100 * acc:6.2f} %" for name, acc in pairs]
  lines.append(f"  figure: {metrics['figure']}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  train.start_processes()
  try:
    config = load_run_config(FLAGS.workdir, FLAGS.config)
    metrics = evaluate_checkpoint(config, FLAGS.workdir, FLAGS.checkpoint)
  except DataError as e:
    sys.exit(str(e))
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  if jax.process_index() == 0:
    print(json.dumps(metrics) if FLAGS.json else format_table(metrics))


if __name__ == "__main__":
  train.define_flags("Experiment config (default: WORKDIR/config.json).", "The training run's directory.")
  flags.DEFINE_string("checkpoint", "latest", "latest, best, or a step number.")
  flags.DEFINE_bool("json", False, "Print one JSON object with the metrics on stdout.")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
