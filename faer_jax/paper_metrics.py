"""The paper's metrics (accuracy, per-class accuracy of Table 5, per-attribute accuracy of Fig. 4) over a split.

`evaluate` runs the jitted eval step over every example of a split and adds up
its sums; `summarize` turns the sums into the metrics.
"""

from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from faer_jax import sharding
from faer_jax.data import pipeline


def evaluate(eval_fn: Callable, variables, source, config: ml_collections.ConfigDict, mesh) -> dict:
  """Metrics of the model on every example of `source` (each exactly once, over all processes).

  Args:
    eval_fn: the jitted `steps.eval_step` (variables, global batch) -> sums.
    variables: `steps.eval_variables` of the train state.
    source: the evaluation split.
    config: the experiment config.
    mesh: the device mesh; every process calls this together.
  """
  local_batch = sharding.local_batch_size(config.eval_batch_size, mesh)
  iterator, _ = pipeline.create_eval_iterator(
      source, batch_size=local_batch, image_size=config.image_size, aspect=config.data.aspect,
      shard_index=jax.process_index(), shard_count=jax.process_count(), num_workers=config.data.num_workers)
  totals = None
  for batch in iterator:
    batch = sharding.make_global_batch({k: batch[k] for k in ("image", "label", "mask")}, mesh)
    sums = eval_fn(variables, batch)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  return summarize(jax.device_get(totals), config, source.class_names)


def summarize(sums: dict[str, Any], config: ml_collections.ConfigDict, class_names) -> dict:
  """The paper's metrics from summed eval outputs (plain Python numbers and lists)."""
  count = float(sums["count"])
  out: dict[str, Any] = {"num_examples": int(round(count)), "loss": float(sums["loss_sum"]) / max(count, 1.0)}
  if config.task == "fer":
    confusion = np.asarray(sums["confusion"], np.float64)
    per_class = np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1.0)
    out.update(
        accuracy=float(sums["correct"]) / max(count, 1.0),
        mean_class_accuracy=float(np.mean(per_class)),
        per_class_accuracy=[float(a) for a in per_class],
        class_names=list(class_names),
        confusion_matrix=np.rint(confusion).astype(int).tolist(),
    )
  else:
    per_attribute = np.asarray(sums["attribute_correct"], np.float64) / max(count, 1.0)
    out.update(
        accuracy=float(np.mean(per_attribute)),  # the paper's CelebA metric: mean over attributes
        per_attribute_accuracy=[float(a) for a in per_attribute],
        attribute_names=list(class_names),
    )
  return out


def scalar_metrics(metrics: dict) -> dict[str, float]:
  """The scalar entries of `summarize`'s output, for logs and checkpoint ranking."""
  return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
