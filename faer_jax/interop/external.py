"""Your copy of the original PyTorch code in place of the reference, and the weights the checks load into it.

`python -m faer_jax.interop check` and `python -m faer_jax.benchmark train` run
`faer_jax.interop.torch_reference` by default: the original's module tree,
written here. With `--torch-model SPEC` they run the code you have instead:

  --torch-model ~/FAER/models/faer.py:FAER --torch-model-kwargs '{"num_classes": 7}'
  --torch-model models.faer:build_faer          # a module on PYTHONPATH

SPEC is `FILE.py:NAME` or `package.module:NAME`; `NAME(**kwargs)` must return a
`torch.nn.Module` taking NCHW images. A file is imported as `python FILE.py`
would see its imports (its folder first on `sys.path`); for a file inside a
package that imports its siblings relatively, use the module form with the
package's parent on PYTHONPATH. Its forward may return the logits alone or a
tuple, list or dict holding them (and the pooled features, which `check` then
compares too): they are told apart by shape, (batch, num_classes) and (batch,
width of the last stage).
"""

import importlib
import importlib.util
import json
import os
import sys
from typing import Any

import numpy as np

from faer_jax.interop.torch_io import CheckpointError


class ExternalModelError(ValueError):
  """A --torch-model that cannot be imported, built or read; the message names it."""


def parse_kwargs(text: str | None) -> dict[str, Any]:
  """The keyword arguments of `--torch-model-kwargs`: a JSON object, or {} for None."""
  if not text:
    return {}
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise ExternalModelError(f"--torch-model-kwargs {text!r}: not JSON ({e}).") from None
  if not isinstance(value, dict):
    raise ExternalModelError(f"--torch-model-kwargs {text!r}: expected a JSON object, e.g. "
                             '\'{"num_classes": 7}\'.')
  return value


def _import(spec: str):
  target, sep, name = spec.rpartition(":")
  if not sep or not target or not name:
    raise ExternalModelError(f"--torch-model {spec!r}: expected FILE.py:NAME or package.module:NAME.")
  if target.endswith(".py") or os.sep in target:
    path = os.path.abspath(os.path.expanduser(target))
    if not os.path.isfile(path):
      raise ExternalModelError(f"--torch-model {spec!r}: {path} is not a file.")
    folder = os.path.dirname(path)
    if folder not in sys.path:
      sys.path.insert(0, folder)  # its own imports resolve as under `python FILE.py`
    module_name = "_faer_jax_torch_model_" + os.path.splitext(os.path.basename(path))[0]
    where = path
    try:
      module_spec = importlib.util.spec_from_file_location(module_name, path)
      module = importlib.util.module_from_spec(module_spec)
      sys.modules[module_name] = module  # dataclasses and pickling look their module up
      module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001
      sys.modules.pop(module_name, None)
      raise ExternalModelError(f"--torch-model {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
  else:
    where = target
    try:
      module = importlib.import_module(target)
    except Exception as e:  # noqa: BLE001
      raise ExternalModelError(f"--torch-model {spec!r}: importing {target} failed: {type(e).__name__}: {e}") from e
  obj = module
  for part in name.split("."):
    if not hasattr(obj, part):
      raise ExternalModelError(f"--torch-model {spec!r}: {where} has no {name!r}.")
    obj = getattr(obj, part)
  if not callable(obj):
    raise ExternalModelError(f"--torch-model {spec!r}: {name} is not a class or function.")
  return obj


def load_torch_model(spec: str, kwargs: dict[str, Any] | None = None):
  """`NAME(**kwargs)` from SPEC (see the module docstring), checked to be a torch.nn.Module."""
  import torch
  factory = _import(spec)
  kwargs = kwargs or {}
  try:
    model = factory(**kwargs)
  except Exception as e:  # noqa: BLE001
    raise ExternalModelError(f"--torch-model {spec!r}: {spec.rpartition(':')[2]}(**{kwargs!r}) failed: "
                             f"{type(e).__name__}: {e} (arguments go in --torch-model-kwargs).") from e
  if not isinstance(model, torch.nn.Module):
    raise ExternalModelError(f"--torch-model {spec!r}: returned a {type(model).__name__}, not a torch.nn.Module.")
  return model


def _tensors(outputs) -> list:
  import torch
  if isinstance(outputs, torch.Tensor):
    return [outputs]
  if isinstance(outputs, dict):
    outputs = list(outputs.values())
  if isinstance(outputs, (tuple, list)):
    return [t for t in outputs if isinstance(t, torch.Tensor)]
  return []


def features_and_logits(outputs, batch_size: int, num_classes: int, feature_dim: int):
  """(features or None, logits) among what a forward returned, told apart by shape."""
  tensors = _tensors(outputs)
  logits = [t for t in tensors if tuple(t.shape) == (batch_size, num_classes)]
  features = [t for t in tensors if tuple(t.shape) == (batch_size, feature_dim)]
  if len(logits) != 1 or len(features) > 1:
    shapes = [tuple(t.shape) for t in tensors] if tensors else type(outputs).__name__
    raise ExternalModelError(
        f"the --torch-model's forward returned {shapes}: expected exactly one ({batch_size}, {num_classes}) "
        f"tensor of logits, and at most one ({batch_size}, {feature_dim}) of features (check --variant and "
        "--num-classes against the model's own).")
  return (features[0] if features else None), logits[0]


def adapted(model, num_classes: int, feature_dim: int):
  """`model` wrapped so that its forward returns (features or None, logits), as the reference's does."""
  import torch

  class _Adapted(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.inner = model

    def forward(self, x):
      return features_and_logits(self.inner(x), x.shape[0], num_classes, feature_dim)

  return _Adapted()


def parameter_count(model) -> int:
  return sum(p.numel() for p in model.parameters())


def check_sizes(model, variant: str, num_classes: int, cc_attention: bool = True) -> None:
  """Raises ExternalModelError unless `model` has as many parameters as the reference of `variant`."""
  from faer_jax.interop.torch_reference import create_torch_model
  expected = parameter_count(create_torch_model(variant, num_classes, cc_attention=cc_attention))
  found = parameter_count(model)
  if found != expected:
    name = "FAER" if cc_attention else "the Baseline"
    raise ExternalModelError(
        f"the --torch-model has {found:,} parameters; {name} {variant!r} with {num_classes} classes has "
        f"{expected:,}: pass the model's --variant and --num-classes (or build it to match with "
        "--torch-model-kwargs).")


def perturb(model, seed: int):
  """`model` in eval mode with every parameter moved by N(0, 0.05) noise drawn from `seed`."""
  import torch
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      # gamma 1e-6 -> ~0.05; weights ~2.5x their init std.
      p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.05)
  return model.eval()


def load_weights(torch_model, state_dict: dict, checkpoint: str, require_all: bool) -> None:
  """Loads a checkpoint's tensors into the PyTorch model by its own names.

  The keys are tried as stored (wrappers like `module.` stripped) and renamed
  to the original's (from timm's layout); whichever fills more of the model
  is loaded, so that the PyTorch side reads the file on its own path (torch's
  load_state_dict, not the Flax side's table) and a mapping error shows.
  """
  import torch
  from faer_jax.interop import mapping
  own = torch_model.state_dict()
  timm = mapping.is_timm_layout(mapping.strip_wrappers(k) for k in state_dict)
  candidates = []
  for rename in (mapping.strip_wrappers, lambda k: mapping.normalize_key(k, timm)):
    renamed = ((rename(k), v) for k, v in state_dict.items())
    candidates.append({n: v for n, v in renamed if n in own and tuple(own[n].shape) == tuple(np.shape(v))})
  chosen = {n: torch.from_numpy(np.array(v)) for n, v in max(candidates, key=len).items()}  # one copy
  missing = sorted(set(own) - set(chosen))
  if require_all and missing:
    raise CheckpointError(f"{checkpoint}: {len(missing)} of the --torch-model's {len(own)} tensors are not in it "
                          f"(by name and shape), e.g. {', '.join(missing[:5])}.")
  torch_model.load_state_dict(chosen, strict=False)
