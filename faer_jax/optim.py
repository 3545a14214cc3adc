"""The optimizer of the paper, from the config: AdamW with a per-epoch exponential schedule.

The `optimizer` block of an experiment config (see `default_config` for the
fields and their defaults) becomes one optax chain:

  clip_by_global_norm (optional) -> AdamW(schedule) -> × backbone_lr_multiplier on the backbone

The chain updates only the model parameters. The center-loss centers live
outside them and move by `losses.update_centers`, so they get no weight decay
and no Adam moments.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from ml_collections import config_dict

Params = Any


def default_config() -> ml_collections.ConfigDict:
  """The `optimizer` block of a config, with the paper's choices as defaults.

  Fields:
    name: 'adamw' (the only optimizer the paper uses).
    lr: peak learning rate of the new layers (the paper: 2.5e-4 for
      expressions, 1e-3 for CelebA).
    weight_decay: AdamW's decoupled decay (0.05, the ConvNeXt fine-tuning
      value; PyTorch's AdamW default, which the original code keeps, is 0.01).
    decay_all_params: True decays every parameter, as PyTorch's AdamW does
      when given all parameters (the original). False exempts the 1-D ones:
      biases, LayerNorm scales and the layer-scale gammas, as ConvNeXt and
      most ViT recipes do.
    b1, b2, eps: Adam's moments and epsilon (PyTorch's defaults).
    schedule: 'exponential' (lr · decay_rate ** epoch, stepped once per epoch
      like torch's ExponentialLR) or 'constant'.
    decay_rate: γ of the exponential schedule (the paper: 0.95).
    warmup_steps, warmup_epochs: linear warm-up from 0; set at most one.
    grad_clip_norm: clip gradients to this global norm; None turns it off.
    backbone_lr_multiplier: factor on the learning rate (and so on the weight
      decay, as with a PyTorch parameter group) of the pretrained backbone.
      The original CelebA script uses lr / 100 for its base parameters.
    backbone_keys: top-level parameter names that hold the pretrained backbone;
      every other top-level entry (CC Attention, norm, head) gets the full rate.
  """
  return ml_collections.ConfigDict({
      "name": "adamw",
      "lr": 2.5e-4,
      "weight_decay": 0.05,
      "decay_all_params": True,
      "b1": 0.9,
      "b2": 0.999,
      "eps": 1e-8,
      "schedule": "exponential",
      "decay_rate": 0.95,
      "warmup_steps": 0,
      "warmup_epochs": 0.0,
      # A typed placeholder so `--config.optimizer.grad_clip_norm=1.0` parses.
      "grad_clip_norm": config_dict.placeholder(float),
      "backbone_lr_multiplier": 0.1,
      "backbone_keys": ("backbone",),
  })


def _epoch_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  if config.schedule == "exponential":
    return optax.exponential_decay(config.lr, transition_steps=steps_per_epoch,
                                   decay_rate=config.decay_rate, staircase=True)
  if config.schedule == "constant":
    return optax.constant_schedule(config.lr)
  raise ValueError(f"Unknown optimizer.schedule {config.schedule!r}; use 'exponential' or 'constant'.")


def create_learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """The learning rate of the new layers as a function of the update count.

  Warm-up multiplies the epoch schedule instead of delaying it (like torch's
  LinearLR chained with ExponentialLR), so epoch e runs at lr · γ^e whether or
  not there was a warm-up.

  Args:
    config: the `optimizer` config block.
    steps_per_epoch: optimizer steps in one epoch.

  Returns:
    step -> learning rate. The backbone's is this times backbone_lr_multiplier.
  """
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}.")
  if config.warmup_steps > 0 and config.warmup_epochs > 0:
    raise ValueError("Set optimizer.warmup_steps or optimizer.warmup_epochs, not both.")
  warmup_steps = config.warmup_steps or round(config.warmup_epochs * steps_per_epoch)
  schedule = _epoch_schedule(config, steps_per_epoch)
  if warmup_steps == 0:
    return schedule

  def warmed_up(step):
    return schedule(step) * jnp.minimum(step / warmup_steps, 1.0)

  return warmed_up


def _decay_mask(params: Params) -> Params:
  """True where weight decay applies: kernels, not biases, norm scales or gammas."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _param_groups(backbone_keys: tuple[str, ...], params: Params) -> Params:
  """Labels every parameter 'backbone' or 'new' by its top-level name."""
  missing = set(backbone_keys) - set(params.keys())
  if missing:
    raise ValueError(f"optimizer.backbone_keys {sorted(missing)} are not top-level parameter names; "
                     f"the parameters have {sorted(params.keys())}.")
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "backbone" if path[0].key in backbone_keys else "new", params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """torch.nn.utils.clip_grad_norm_ on the raw gradients: g · min(1, max_norm / (‖g‖ + 1e-6)).

  (optax.clip_by_global_norm divides by ‖g‖ itself, without torch's 1e-6.)
  """

  def clip(updates, params=None):
    del params
    scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates)

  return optax.stateless(clip)


def create_optimizer(config: ml_collections.ConfigDict,
                     steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optax chain of the `optimizer` config block.

  Args:
    config: the `optimizer` config block (fields in `default_config`).
    steps_per_epoch: optimizer steps in one epoch, for the per-epoch schedule.

  Returns:
    (tx, schedule): the transformation, to use on a dict of parameters keyed
    by top-level module name, and its learning-rate schedule for logging,
    `schedule(step)` being the rate of the update that produces step + 1.
  """
  if config.name != "adamw":
    raise ValueError(f"Unknown optimizer.name {config.name!r}; only 'adamw' is implemented.")
  schedule = create_learning_rate_schedule(config, steps_per_epoch)
  chain = []
  if config.grad_clip_norm is not None:
    chain.append(clip_by_global_norm(config.grad_clip_norm))
  chain.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay,
                           mask=None if config.decay_all_params else _decay_mask))
  # Scaling AdamW's final update scales its weight decay too: the same as a
  # PyTorch parameter group with lr × multiplier.
  chain.append(optax.multi_transform(
      {"backbone": optax.scale(config.backbone_lr_multiplier), "new": optax.identity()},
      lambda params: _param_groups(tuple(config.backbone_keys), params)))
  return optax.chain(*chain), schedule
