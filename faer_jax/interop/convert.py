"""PyTorch state dicts <-> Flax variables, with a report of everything not loaded."""

import dataclasses
import logging
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from faer_jax.interop import mapping
from faer_jax.interop.torch_io import CheckpointError, read_state_dict

Variables = Mapping[str, Any]
logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadReport:
  """What a load did with each tensor. Keys use the original FAER names."""

  loaded: list[str] = dataclasses.field(default_factory=list)
  # Model parameters the checkpoint lacks: left at their fresh initialisation.
  missing: list[str] = dataclasses.field(default_factory=list)
  # (key, reason): present in both, but not loaded (e.g. a 1000-class head).
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  # Checkpoint keys the model has no place for (original key names).
  unexpected: list[str] = dataclasses.field(default_factory=list)
  layout: str = "faer"
  container: str | None = None

  @property
  def clean(self) -> bool:
    return not (self.missing or self.skipped or self.unexpected)

  def summary(self) -> str:
    lines = [f"{len(self.loaded)} tensors loaded ({self.layout} layout"
             + (f", under {self.container!r}" if self.container else "") + ")"]
    if self.missing:
      lines.append(f"{len(self.missing)} model tensors not in the checkpoint, left at initialisation: "
                   + _abbreviate(self.missing))
    if self.skipped:
      lines.append(f"{len(self.skipped)} skipped: " + "; ".join(f"{k} ({r})" for k, r in self.skipped))
    if self.unexpected:
      lines.append(f"{len(self.unexpected)} checkpoint tensors with no place in the model: "
                   + _abbreviate(self.unexpected))
    return "\n".join(lines)


def _abbreviate(keys: list[str], n: int = 8) -> str:
  return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def init_variables(model: flax.linen.Module, seed: int = 0) -> dict:
  """Fresh variables for `model`; parameter shapes do not depend on the image size."""
  return jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 32, 32, 3), jnp.float32))


def load_state_dict(state_dict: Mapping[str, np.ndarray], variables: Variables, *, strict: bool = False,
                    container: str | None = None) -> tuple[dict, LoadReport]:
  """Copies a PyTorch state dict (any supported layout) into a copy of `variables`.

  `variables` may hold jax.ShapeDtypeStruct leaves (from jax.eval_shape): the
  ones the checkpoint does not provide stay abstract in the result.
  """
  timm = mapping.is_timm_layout(mapping.strip_wrappers(k) for k in state_dict)
  report = LoadReport(layout="timm" if timm else "faer", container=container)
  normalized: dict[str, np.ndarray] = {}
  for key, value in state_dict.items():
    name = mapping.normalize_key(key, timm)
    if name in normalized:
      raise CheckpointError(f"Two checkpoint tensors map to {name!r} (one is {key!r}).")
    normalized[name] = np.asarray(value)

  params = flax.core.unfreeze(variables["params"])
  flat = flax.traverse_util.flatten_dict(params)
  table = mapping.build_table(params)
  for name, entry in table.items():
    if name not in normalized:
      report.missing.append(name)
      continue
    value = entry.to_flax(normalized.pop(name))
    target = flat[entry.flax_path]
    if value.shape != target.shape:
      report.skipped.append((name, f"shape {value.shape} in the checkpoint, {target.shape} in the model"))
      continue
    flat[entry.flax_path] = jnp.asarray(value, dtype=target.dtype)
    report.loaded.append(name)
  report.unexpected = sorted(normalized)

  if strict and not report.clean:
    raise CheckpointError("Strict load failed:\n" + report.summary())
  out = dict(variables)
  out["params"] = flax.traverse_util.unflatten_dict(flat)
  return out, report


def load_torch_checkpoint(path: str, model: flax.linen.Module, *, strict: bool = False,
                          variables: Variables | None = None, seed: int = 0,
                          return_report: bool = False):
  """Flax variables for `model` from a PyTorch checkpoint file.

  Reads original FAER checkpoints (DataParallel 'module.' keys under
  'state_dict'), official ConvNeXt releases ({'model': ...}), timm ConvNeXt
  checkpoints (also 'net.'-prefixed, also with 1x1-conv MLPs), as .pth/.pt
  (torch.load with weights_only=True) or .safetensors. Tensors the checkpoint
  lacks (e.g. CC Attention and head for a backbone-only checkpoint) keep their
  initialisation; tensors whose shape differs (a 1000-class head) are skipped.

  Args:
    path: the checkpoint file.
    model: the FAER module (create_model) or a bare ConvNeXt (create_backbone).
    strict: raise CheckpointError unless every tensor on both sides is loaded.
    variables: variables to load into; by default `model` is initialised with `seed`.
    seed: initialisation seed for what the checkpoint does not provide.
    return_report: also return the LoadReport.

  Returns:
    The variables, or (variables, LoadReport) with `return_report`. The report
    is also logged: a warning when anything was missing, skipped or unexpected.
  """
  state_dict, container = read_state_dict(path)
  # Map onto shapes first; initialise (an XLA compile) only if the checkpoint
  # leaves something to initialise.
  target = variables if variables is not None else jax.eval_shape(lambda: init_variables(model, seed))
  loaded, report = load_state_dict(state_dict, target, strict=strict, container=container)
  if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(loaded)):
    fresh = init_variables(model, seed)
    loaded = jax.tree_util.tree_map(lambda x, f: f if isinstance(x, jax.ShapeDtypeStruct) else x, loaded, fresh)
  logger.log(logging.INFO if report.clean else logging.WARNING, "Loaded %s: %s", path, report.summary())
  return (loaded, report) if return_report else loaded


def to_torch_state_dict(variables: Variables, dtype=np.float32) -> dict[str, np.ndarray]:
  """A dict of numpy arrays (float32 by default) under the original FAER key names (no 'module.' prefix).

  `{k: torch.from_numpy(v) for k, v in ...}` loads with `load_state_dict(strict=True)`
  into the original model of the same variant and number of classes.
  """
  params = variables["params"] if "params" in variables else variables
  params = flax.core.unfreeze(params)
  flat = flax.traverse_util.flatten_dict(params)
  table = mapping.build_table(params)
  unmapped = set(flat) - {e.flax_path for e in table.values()}
  if unmapped:
    raise ValueError(f"Parameters with no PyTorch name: {sorted('/'.join(p) for p in unmapped)}")
  # np.array copies: torch.from_numpy wants writable, contiguous arrays.
  return {name: np.array(e.to_torch(np.asarray(flat[e.flax_path], dtype)), order="C")
          for name, e in table.items()}
