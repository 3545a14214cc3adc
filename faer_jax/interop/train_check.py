"""Training, side by side: N steps of a config's recipe in PyTorch and in JAX, from the same weights and batches.

`python -m faer_jax.interop check-train --config configs/rafdb.py` answers
the question a port has to answer: does the JAX training reproduce the
PyTorch training, step after step? Both frameworks start from the same
weights, read the same N batches and run the config's whole recipe:

  objective  cross-entropy (label smoothing) + λ · center loss, the centers
             moved by Wen et al.'s rule (FER); focal, BCE or asymmetric (FAE)
  optimizer  AdamW with two parameter groups: the backbone at
             lr × backbone_lr_multiplier, the new layers at lr; weight decay on
             every parameter, or only on the ≥ 2-D ones (decay_all_params)
  schedule   ExponentialLR stepped once per epoch (epochs of --steps-per-epoch
             steps, so the staircase is crossed within N steps), warm-up
  clipping   the global gradient norm, when the config sets one

The JAX side is `faer_jax.train`'s own compiled step (`train.build_programs`).
The PyTorch side is a plain PyTorch training loop, written as the original
training script writes one (`torch.optim.AdamW` parameter groups,
`lr_scheduler.ExponentialLR` stepped per epoch, `clip_grad_norm_`), on
`faer_jax.interop.torch_reference` or on your copy of the original model
(`--torch-model`). It reads the config, not the JAX code.

Drop path is off on both sides: its masks are random draws that the two
frameworks would make differently. Everything is float32.

After every step it compares the loss, each parameter tensor and the centers:
the relative distance ||θ_jax − θ_torch|| / ||θ_torch|| per tensor. Two
tensors of CC Attention are reported but not held to the tolerance: the
query norm's bias and the key MLP's last bias each add one value to every
position of a channel before the softmax over positions, so their gradient is
zero in exact arithmetic and rounding noise in both frameworks, which AdamW
turns into steps of ±lr in directions of its own (see SHIFT_INVARIANT).
"""

import dataclasses
import os
import tempfile

import jax
import ml_collections
import numpy as np

from faer_jax import steps as steps_lib
from faer_jax.interop import external, mapping
from faer_jax.interop.convert import load_state_dict, to_torch_state_dict
from faer_jax.models import get_variant

# The largest per-tensor relative parameter distance a faithful float32 run reaches in 20 steps, with margin
# (measured, README "Training, side by side").
TOLERANCE = 1e-4
LOSS_TOLERANCE = 2e-5

# Parameters whose gradient is zero in exact arithmetic: each shifts every position of one channel of CC
# Attention's logits by the same amount, and the softmax runs over positions.
SHIFT_INVARIANT = ("attention.norm.bias", "attention.mlp.2.bias")


class TrainCheckError(ValueError):
  """A config, model or dataset check-train cannot run; the message names it."""


@dataclasses.dataclass
class Step:
  """One step's comparison (the losses are those of the batch before the update)."""

  step: int
  epoch: int
  learning_rate: float
  loss_jax: float
  loss_torch: float
  loss_rel_diff: float
  grad_norm_jax: float
  grad_norm_torch: float
  param_rel_diff: float  # max over the compared tensors of ||Δ|| / ||θ_torch||, after the update
  worst_tensor: str
  centers_rel_diff: float | None
  shift_invariant_rel_diff: float | None


def _config_for_check(config: ml_collections.ConfigDict, batch_size: int | None,
                      image_size: int | None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())  # a copy, unlocked
  if batch_size:
    config.batch_size = batch_size
  if image_size:
    config.image_size = image_size
  config.model.drop_path_rate = 0.0
  config.model.dtype = "float32"
  config.model.pretrained = ""
  config.fsdp = 1
  return config


# --- The PyTorch side: the recipe as a PyTorch training script writes it. ---


def _torch_objective(config, features, logits, labels, centers):
  import torch
  import torch.nn.functional as F
  if config.task == "fer":
    loss = F.cross_entropy(logits, labels, label_smoothing=config.loss.label_smoothing)
    if centers is not None:
      loss = loss + config.loss.center_loss_weight * 0.5 * (features - centers[labels]).pow(2).sum(dim=1).mean()
    return loss
  labels = labels.float()
  name = config.loss.name
  if name == "bce":
    return F.binary_cross_entropy_with_logits(logits, labels)
  if name == "focal":
    p = torch.sigmoid(logits)
    p_t = p * labels + (1 - p) * (1 - labels)
    loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * (1 - p_t) ** config.loss.focal_gamma
    if config.loss.focal_alpha is not None:
      loss = loss * (config.loss.focal_alpha * labels + (1 - config.loss.focal_alpha) * (1 - labels))
    return loss.mean()
  if name == "asymmetric":  # Ridnik et al.'s AsymmetricLoss (defaults), averaged instead of summed
    gamma_neg, gamma_pos, clip, eps = 4.0, 1.0, 0.05, 1e-8
    xs_pos = torch.sigmoid(logits)
    xs_neg = (1 - xs_pos + clip).clamp(max=1)
    loss = labels * torch.log(xs_pos.clamp(min=eps)) + (1 - labels) * torch.log(xs_neg.clamp(min=eps))
    pt = xs_pos * labels + xs_neg * (1 - labels)
    loss = loss * torch.pow(1 - pt, gamma_pos * labels + gamma_neg * (1 - labels))
    return -loss.mean()
  raise TrainCheckError(f"check-train: loss.name={name!r} has no PyTorch form here")


def _flax_top_level(torch_key: str, table: dict) -> str | None:
  entry = table.get(torch_key)
  return entry.flax_path[0] if entry else None


def _torch_optimizer(config, model, table: dict, steps_per_epoch: int):
  """AdamW with the backbone and new-layer groups, and its scheduler: (optimizer, step_scheduler(step))."""
  import torch
  opt = config.optimizer
  timm = mapping.is_timm_layout(n for n, _ in model.named_parameters())
  groups: dict[tuple[bool, bool], list] = {}
  for name, p in model.named_parameters():
    top = _flax_top_level(mapping.normalize_key(name, timm), table)
    backbone = top in tuple(opt.backbone_keys)
    decay = opt.decay_all_params or p.ndim > 1
    groups.setdefault((backbone, decay), []).append(p)
  param_groups = [{"params": params, "lr": opt.lr * (opt.backbone_lr_multiplier if backbone else 1.0),
                   "weight_decay": opt.weight_decay if decay else 0.0}
                  for (backbone, decay), params in sorted(groups.items())]
  optimizer = torch.optim.AdamW(param_groups, lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps,
                                weight_decay=opt.weight_decay)
  warmup = opt.warmup_steps or round(opt.warmup_epochs * steps_per_epoch)
  if opt.schedule == "exponential" and not warmup:
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=opt.decay_rate)

    def after_step(step: int) -> None:  # step: updates done
      if step % steps_per_epoch == 0:
        scheduler.step()
  else:
    gamma = opt.decay_rate if opt.schedule == "exponential" else 1.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: gamma ** (s // steps_per_epoch) * (min(s / warmup, 1.0) if warmup else 1.0))

    def after_step(step: int) -> None:
      scheduler.step()
  return optimizer, after_step


def _torch_update_centers(centers, features, labels, alpha: float) -> None:
  """Wen et al.'s rule in place: c_j -= α Σ_{y_i = j} (c_j − x_i) / (1 + n_j)."""
  import torch
  with torch.no_grad():
    delta = torch.zeros_like(centers).index_add_(0, labels, centers[labels] - features)
    counts = torch.bincount(labels, minlength=centers.shape[0]).to(centers.dtype)
    centers -= alpha * delta / (1 + counts)[:, None]


# --- Data: N batches, drawn once, fed to both. ---


_SYNTHETIC_MAKERS = {"rafdb": ("make_synthetic_rafdb", dict(num_test=8)),
                     "affectnet": ("make_synthetic_affectnet", dict(num_val=8)),
                     "celeba": ("make_synthetic_celeba", dict(num_val=0, num_test=8, size=(64, 78)))}


def draw_batches(config: ml_collections.ConfigDict, num_steps: int, synthetic: bool) -> tuple[list[dict], str]:
  """`num_steps` training batches of the config's dataset (or of a synthetic set in its layout, written to a
  temporary folder), as the train pipeline yields them, and where they came from."""
  from faer_jax import train
  from faer_jax.data import DataError, pipeline, synth
  with tempfile.TemporaryDirectory() as tmp:
    if synthetic:
      dataset = config.data.dataset
      if dataset not in _SYNTHETIC_MAKERS:
        raise TrainCheckError(f"--synthetic: no synthetic {dataset!r} set (rafdb, affectnet, celeba); "
                              "pass --data-root")
      maker, options = _SYNTHETIC_MAKERS[dataset]
      if dataset == "affectnet" and config.num_classes != 7:
        config.data.affectnet_num_classes = config.num_classes
      num_train = min(max(config.batch_size * num_steps, 64), 512)
      getattr(synth, maker)(tmp, num_train=num_train, seed=config.seed, workers=1, **options)
      config.data.root, config.data.synthetic = tmp, False
    try:
      source = train.create_data_source(config, "train")
      iterator = pipeline.create_train_iterator(
          source, batch_size=config.batch_size, image_size=config.image_size, seed=config.seed,
          random_flip=config.data.random_flip, balanced=config.data.balanced, aspect=config.data.aspect,
          skip_bad_images=config.data.skip_bad_images)
      # Copies: the pipeline reuses its batch buffers.
      batches = [{k: np.array(v) for k, v in next(iterator).items()} for _ in range(num_steps)]
    except (DataError, ValueError) as e:
      raise TrainCheckError(f"{'synthetic data' if synthetic else config.data.root}: {e}") from e
  origin = f"synthetic {config.data.dataset}" if synthetic else config.data.root
  return batches, origin


# --- Both sides, step by step. ---


def _rel(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-30))


def check_train(config: ml_collections.ConfigDict, *, num_steps: int = 20, steps_per_epoch: int = 5,
                batch_size: int | None = None, image_size: int | None = None, data_root: str | None = None,
                torch_model: str | None = None, torch_model_kwargs: dict | None = None,
                torch_checkpoint: str | None = None, seed: int = 0, tolerance: float = TOLERANCE,
                loss_tolerance: float = LOSS_TOLERANCE) -> dict:
  """Runs `num_steps` of `config`'s recipe in both frameworks; returns the per-step comparison.

  Args:
    config: an experiment config (configs/*.py); drop path is turned off, the
      model computes in float32, nothing is pretrained.
    num_steps: training steps on each side.
    steps_per_epoch: the epoch of the schedule (ExponentialLR steps after it).
    batch_size, image_size: replace the config's (None keeps them).
    data_root: the config's dataset, in its owners' layout; None: a synthetic
      set in that layout.
    torch_model: 'FILE.py:NAME' or 'package.module:NAME' (your copy of the
      original code), built as NAME(**torch_model_kwargs); None: the
      reference in faer_jax.interop.torch_reference.
    torch_checkpoint: weights for both sides; None: the PyTorch model's own
      initialisation moved by N(0, 0.05) noise (with layer scale 1e-6 every
      block would be near the identity and agreement would prove little).
    seed: the initialisation and the noise.
    tolerance: the largest per-tensor relative parameter distance allowed.
    loss_tolerance: the largest relative difference of the losses allowed.

  Returns:
    A dict: the setting, `steps` (a list of `Step` dicts), `max_param_rel_diff`
    and where, `first_failure` (step, tensor, value) or None, and `passed`.
  """
  import torch
  from faer_jax import config_lib, sharding, train

  if num_steps < 1 or steps_per_epoch < 1:
    raise TrainCheckError(f"--steps {num_steps} and --steps-per-epoch {steps_per_epoch} must be >= 1")
  config = _config_for_check(config, batch_size, image_size)
  if data_root is not None:
    if not os.path.isdir(data_root):
      raise TrainCheckError(f"--data-root {data_root}: not a folder")
    config.data.root = data_root
  try:
    config_lib.validate(_with_root(config))
  except ValueError as e:
    raise TrainCheckError(str(e)) from None
  batches, data_origin = draw_batches(config, num_steps, synthetic=data_root is None)
  inner, weights = _torch_model(config, torch_model, torch_model_kwargs, torch_checkpoint, seed)
  # Copies: a CPU jax.Array may share a numpy array's memory, which torch's optimizer overwrites.
  state_dict = {k: v.detach().numpy().copy() for k, v in inner.state_dict().items()}

  # The JAX side: train's own programs on one device.
  mesh = sharding.create_mesh(1, devices=jax.devices()[:1])
  programs = train.build_programs(config, mesh, steps_per_epoch)
  variables, _ = load_state_dict(state_dict, {"params": programs.abstract_state["params"]}, strict=True)
  state = steps_lib.create_train_state(jax.random.key(config.seed), programs.model, programs.tx, config,
                                       params=variables["params"])
  state = jax.device_put(state, programs.state_sharding)
  table = mapping.build_table(variables["params"])

  # The PyTorch side: the optimizer, the centers, the tensors to compare under the Flax side's names.
  optimizer, after_step = _torch_optimizer(config, inner, table, steps_per_epoch)
  feature_dim = get_variant(config.model.variant).dims[-1]
  center_loss = steps_lib.uses_center_loss(config)
  centers = torch.zeros(config.num_classes, feature_dim) if center_loss else None
  timm = mapping.is_timm_layout(n for n, _ in inner.named_parameters())
  compared = [(k, p) for k, p in ((mapping.normalize_key(n, timm), p) for n, p in inner.named_parameters())
              if k in table]
  if len(compared) != len(table):
    missing = sorted(set(table) - {k for k, _ in compared})
    raise TrainCheckError(f"the PyTorch model lacks {len(missing)} of the Flax model's tensors, e.g. "
                          f"{', '.join(missing[:3])}")

  records: list[Step] = []
  first_failure = None
  for i, batch in enumerate(batches):
    # PyTorch: a step as a training script takes it.
    images = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
    labels = torch.from_numpy(np.asarray(batch["label"], np.int64))
    lr = max(group["lr"] for group in optimizer.param_groups)  # the new layers'; the backbone's × multiplier
    optimizer.zero_grad(set_to_none=True)
    features, logits = external.features_and_logits(inner(images), len(labels), config.num_classes, feature_dim)
    if center_loss and features is None:
      raise TrainCheckError("the --torch-model returns no pooled features, which the center loss needs")
    loss = _torch_objective(config, features, logits, labels, centers)
    loss.backward()
    grad_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in inner.parameters() if p.grad is not None))
    if config.optimizer.grad_clip_norm is not None:
      torch.nn.utils.clip_grad_norm_(inner.parameters(), config.optimizer.grad_clip_norm)
    optimizer.step()
    if center_loss:
      _torch_update_centers(centers, features.detach(), labels, config.loss.center_alpha)
    after_step(i + 1)
    # JAX: train's step.
    state, metrics = programs.train_step(state, sharding.make_global_batch(batch, mesh))
    metrics = jax.device_get(metrics)
    # Both, compared.
    ours = to_torch_state_dict({"params": jax.device_get(state["params"])})
    diffs = {k: _rel(ours[k], p.detach().numpy()) for k, p in compared}
    held = {k: d for k, d in diffs.items() if k not in SHIFT_INVARIANT}
    tensor = max(held, key=held.get)
    shift = [d for k, d in diffs.items() if k in SHIFT_INVARIANT]
    record = Step(step=i + 1, epoch=i // steps_per_epoch, learning_rate=float(lr),
                  loss_jax=float(metrics["loss"]), loss_torch=loss.item(),
                  loss_rel_diff=abs(float(metrics["loss"]) - loss.item()) / max(abs(loss.item()), 1e-30),
                  grad_norm_jax=float(metrics["grad_norm"]), grad_norm_torch=grad_norm.item(),
                  param_rel_diff=held[tensor], worst_tensor=tensor,
                  centers_rel_diff=_rel(np.asarray(state["centers"]), centers.numpy()) if center_loss else None,
                  shift_invariant_rel_diff=max(shift) if shift else None)
    records.append(record)
    first_failure = first_failure or _failure(record, tolerance, loss_tolerance)
  max_param = max(records, key=lambda r: r.param_rel_diff)
  return {"config": {"task": config.task, "variant": config.model.variant, "num_classes": config.num_classes,
                     "cc_attention": config.model.cc_attention, "loss": config.loss.name,
                     "center_loss_weight": config.loss.center_loss_weight if center_loss else 0.0,
                     "batch_size": config.batch_size, "image_size": config.image_size,
                     "steps_per_epoch": steps_per_epoch,
                     **{f"optimizer.{k}": v for k, v in config.optimizer.to_dict().items()}},
          "torch_model": torch_model or "faer_jax.interop.torch_reference", "weights": weights,
          "data": data_origin, "drop_path": "off on both sides", "dtype": "float32",
          "conv_impl": config.model.conv_impl, "backend": jax.default_backend(),
          "tolerance": tolerance, "loss_tolerance": loss_tolerance,
          "shift_invariant": [k for k in SHIFT_INVARIANT if k in table],
          "steps": [dataclasses.asdict(r) for r in records],
          "max_param_rel_diff": max_param.param_rel_diff, "max_param_rel_diff_tensor": max_param.worst_tensor,
          "max_param_rel_diff_step": max_param.step,
          "max_centers_rel_diff": max(r.centers_rel_diff for r in records) if center_loss else None,
          "max_loss_rel_diff": max(r.loss_rel_diff for r in records),
          "first_failure": first_failure, "passed": first_failure is None}


def _torch_model(config, torch_model, torch_model_kwargs, torch_checkpoint, seed):
  """(the PyTorch model in train mode, with the weights both sides start from; how they were made)."""
  import torch
  from faer_jax.interop.torch_io import read_state_dict
  from faer_jax.interop.torch_reference import create_torch_model
  torch.manual_seed(seed)
  variant, num_classes, cc_attention = config.model.variant, config.num_classes, config.model.cc_attention
  if torch_model:
    inner = external.load_torch_model(torch_model, torch_model_kwargs)
    external.check_sizes(inner, variant, num_classes, cc_attention)
  else:
    inner = create_torch_model(variant, num_classes, cc_attention=cc_attention,
                               layer_scale_init_value=config.model.layer_scale_init_value,
                               head_init_scale=config.model.head_init_scale)
  inner = inner.float()
  if torch_checkpoint:
    state_dict, _ = read_state_dict(torch_checkpoint)
    external.load_weights(inner, state_dict, torch_checkpoint, require_all=True)
    weights = torch_checkpoint
  else:
    external.perturb(inner, seed)
    weights = "the PyTorch model's initialisation + N(0, 0.05) noise"
  return inner.train(), weights


def _failure(record: Step, tolerance: float, loss_tolerance: float) -> dict | None:
  """The step's first breach of a tolerance (the loss, then the worst tensor, then the centers), or None."""
  for what, value, limit in (("loss", record.loss_rel_diff, loss_tolerance),
                             (record.worst_tensor, record.param_rel_diff, tolerance),
                             ("centers", record.centers_rel_diff, tolerance)):
    if value is not None and value > limit:
      return {"step": record.step, "tensor": what, "rel_diff": value}
  return None


def _with_root(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config, with a placeholder root where the data will be synthetic (`validate` asks for one)."""
  if config.data.root:
    return config
  checked = ml_collections.ConfigDict(config.to_dict())
  checked.data.root = "synthetic"
  return checked


def format_table(result: dict) -> str:
  """The per-step table and the verdict, as the CLI prints them."""
  c = result["config"]
  lines = [f"{c['variant']} {c['task'].upper()} ({c['loss']}"
           + (f" + {c['center_loss_weight']:g}·center" if c["center_loss_weight"] else "")
           + f"), batch {c['batch_size']}, {c['image_size']} px, {len(result['steps'])} steps, "
           f"epoch = {c['steps_per_epoch']} steps; torch: {result['torch_model']}; data: {result['data']}; "
           f"drop path {result['drop_path']}",
           f"{'step':>4} {'epoch':>5} {'lr':>9} {'loss (jax)':>12} {'loss (torch)':>12} {'loss rel':>9} "
           f"{'params rel':>10} {'centers rel':>11}  worst tensor"]
  for s in result["steps"]:
    centers = "-" if s["centers_rel_diff"] is None else f"{s['centers_rel_diff']:.2e}"
    lines.append(f"{s['step']:>4} {s['epoch']:>5} {s['learning_rate']:>9.3e} {s['loss_jax']:>12.6f} "
                 f"{s['loss_torch']:>12.6f} {s['loss_rel_diff']:>9.2e} {s['param_rel_diff']:>10.2e} "
                 f"{centers:>11}  {s['worst_tensor']}")
  lines.append(f"largest parameter distance: {result['max_param_rel_diff']:.2e} "
               f"({result['max_param_rel_diff_tensor']}, step {result['max_param_rel_diff_step']}); "
               f"tolerance {result['tolerance']:g}")
  if result["shift_invariant"]:
    shift = max(s["shift_invariant_rel_diff"] for s in result["steps"])
    lines.append(f"not held to it (zero gradient in exact arithmetic): {', '.join(result['shift_invariant'])}, "
                 f"up to {shift:.2e}")
  f = result["first_failure"]
  lines.append("passed" if f is None else
               f"FAILED at step {f['step']}: {f['tensor']} differs by {f['rel_diff']:.2e} (relative)")
  return "\n".join(lines)

