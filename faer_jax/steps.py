"""The pure, jittable steps: state creation, one training update, one evaluation batch.

The train state is a plain dict, so Orbax saves it and sharding rules map over it:

  step       int32 scalar: updates done
  params     the FAER parameters (float32)
  opt_state  the optax state
  centers    [num_classes, dim] center-loss centers, moved by Wen et al.'s rule,
             not by the optimizer; present only when the objective has a center
             loss (FER with loss.center_loss_weight > 0)
  rng        the run's base key; the step's dropout key is fold_in(rng, step), so
             a resumed run draws exactly the masks an uninterrupted one would

Evaluation reads only `eval_variables(state)`: the parameters, and the centers
where there are any (the evaluation loss includes the center loss).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from faer_jax import losses

State = dict[str, Any]
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def uses_center_loss(config: ml_collections.ConfigDict) -> bool:
  return config.task == "fer" and config.loss.center_loss_weight > 0


def create_train_state(rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation,
                       config: ml_collections.ConfigDict, params=None) -> State:
  """A fresh state (from `params` where given); jit it with out_shardings to create it where it lives."""
  init_rng, run_rng = jax.random.split(rng)
  if params is None:
    # Parameter shapes do not depend on the image size: initialise on a small one.
    params = model.init(init_rng, jnp.zeros((1, 32, 32, 3), jnp.float32))["params"]
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params), "rng": run_rng}
  if uses_center_loss(config):
    state["centers"] = jnp.zeros((config.num_classes, model.dims[-1]), jnp.float32)
  return state


def eval_variables(state: State) -> State:
  """What evaluation reads of a train state (or of its shardings, or its abstract shapes): params and centers."""
  return {key: state[key] for key in ("params", "centers") if key in state}


def _objective(config: ml_collections.ConfigDict, features, logits, labels, centers=None, mask=None):
  """(loss to minimise, dict of its parts). Losses are computed in float32."""
  if config.task == "fer":
    ce = losses.softmax_cross_entropy(logits, labels, label_smoothing=config.loss.label_smoothing, mask=mask)
    parts = {"cross_entropy": ce}
    loss = ce
    if uses_center_loss(config):
      parts["center_loss"] = losses.center_loss(features, labels, centers, mask=mask)
      loss = ce + config.loss.center_loss_weight * parts["center_loss"]
    return loss, parts
  options = {}
  if config.loss.name == "focal":
    options = {"gamma": config.loss.focal_gamma, "alpha": config.loss.focal_alpha}
  return losses.LOSSES[config.loss.name](logits, labels, mask=mask, **options), {}


def _correct(config: ml_collections.ConfigDict, logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per example: 1/0 for FER (argmax); per (example, attribute): 1/0 for FAE (logit > 0)."""
  if config.task == "fer":
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return ((logits > 0) == (labels > 0)).astype(jnp.float32)


def train_step(state: State, batch: Batch, *, model: nn.Module, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict, schedule: optax.Schedule) -> tuple[State, Metrics]:
  """One AdamW update on a global batch; returns the new state and the batch's metrics."""
  dropout_rng = jax.random.fold_in(state["rng"], state["step"])

  def loss_fn(params):
    features, logits = model.apply({"params": params}, batch["image"], train=True,
                                   rngs={"dropout": dropout_rng})
    loss, parts = _objective(config, features, logits, batch["label"], state.get("centers"))
    return loss, (features, logits, parts)

  (loss, (features, logits, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  new_state = dict(state, step=state["step"] + 1, params=optax.apply_updates(state["params"], updates),
                   opt_state=opt_state)
  if uses_center_loss(config):
    new_state["centers"] = losses.update_centers(state["centers"], features, batch["label"],
                                                 alpha=config.loss.center_alpha)
  metrics = {"loss": loss, "accuracy": jnp.mean(_correct(config, logits, batch["label"])),
             "learning_rate": schedule(state["step"]), "grad_norm": optax.tree.norm(grads), **parts}
  return new_state, metrics


def eval_step(variables: State, batch: Batch, *, model: nn.Module, config: ml_collections.ConfigDict) -> Metrics:
  """Sums over the real (mask=True) examples of one batch, to be added up over batches.

  Args:
    variables: `eval_variables(state)`.
    batch: a global batch with 'image', 'label' and 'mask' (False on padding).
    model: the FAER module.
    config: the experiment config.

  Returns:
    FER: count, loss_sum, correct, confusion[true, predicted].
    FAE: count, loss_sum, attribute_correct[num_attributes].
  """
  features, logits = model.apply({"params": variables["params"]}, batch["image"], train=False)
  mask = batch["mask"].astype(jnp.float32)
  count = jnp.sum(mask)
  loss, _ = _objective(config, features, logits, batch["label"], variables.get("centers"), mask=mask)
  correct = _correct(config, logits, batch["label"])
  out = {"count": count, "loss_sum": loss * count}
  if config.task == "fer":
    predicted = jax.nn.one_hot(jnp.argmax(logits, -1), config.num_classes)
    truth = jax.nn.one_hot(batch["label"], config.num_classes) * mask[:, None]
    out["confusion"] = truth.T @ predicted
    out["correct"] = jnp.sum(correct * mask)
  else:
    out["attribute_correct"] = jnp.sum(correct * mask[:, None], axis=0)
  return out
