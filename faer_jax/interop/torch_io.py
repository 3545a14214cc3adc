"""Reading PyTorch checkpoints (.pth/.pt/.bin and .safetensors) into numpy, safely.

A checkpoint is untrusted input: pickles are read with
`torch.load(weights_only=True)`, which refuses to run code, and torch is
imported only here, only when a pickle has to be read.
"""

import os
import zipfile
from typing import Any, Mapping

import numpy as np

# Where training scripts put the state dict inside a checkpoint, in the order
# we look (the original FAER script uses 'state_dict', the official ConvNeXt
# release 'model').
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "net", "params", "module",
                  "state_dict_ema", "model_ema")


class CheckpointError(ValueError):
  """A file that cannot be read as a model checkpoint; the message names it."""


def read_state_dict(path: str) -> tuple[dict[str, np.ndarray], str | None]:
  """Returns (state dict of float32/int numpy arrays, container key or None)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"Checkpoint not found: {path!r}")
  if _is_safetensors(path):
    return _read_safetensors(path), None
  obj = _torch_load(path)
  state, container = _find_state_dict(obj, path)
  return {k: _to_numpy(v) for k, v in state.items()}, container


def _is_safetensors(path: str) -> bool:
  """safetensors: an 8-byte little-endian header length, then a JSON header."""
  with open(path, "rb") as f:
    head = f.read(9)
  if len(head) < 9:
    return False
  size = int.from_bytes(head[:8], "little")
  return head[8:9] == b"{" and 0 < size < os.path.getsize(path)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open
  try:
    with safe_open(path, framework="numpy") as f:
      return {k: _to_numpy(f.get_tensor(k)) for k in f.keys()}
  except Exception as e:  # bfloat16 has no numpy dtype: read those through torch.
    if "bf16" not in str(e).lower() and "bfloat16" not in str(e).lower():
      raise CheckpointError(f"{path!r} is not a readable safetensors file: {e}") from e
    _import_torch(path)  # the error names the file where torch is missing
    with safe_open(path, framework="pt") as f:
      return {k: _to_numpy(f.get_tensor(k)) for k in f.keys()}


def _import_torch(path: str):
  try:
    import torch
  except ImportError as e:
    raise CheckpointError(
        f"Reading {path!r} needs PyTorch, which is not installed: pip install 'faer-jax[torch]' "
        "(or convert the file to .safetensors).") from e
  return torch


def _torch_load(path: str) -> Any:
  with open(path, "rb") as f:
    magic = f.read(2)
  # torch.save writes a zip archive (since 1.6) or, in the legacy format, a
  # pickle stream that starts with the PROTO opcode 0x80.
  if not (zipfile.is_zipfile(path) or magic[:1] == b"\x80"):
    raise CheckpointError(f"{path!r} is not a PyTorch checkpoint (neither a torch.save archive nor "
                          "a safetensors file).")
  torch = _import_torch(path)
  try:
    with torch.serialization.safe_globals(_safe_numpy_globals()):
      return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle.UnpicklingError, RuntimeError from torch's zip reader, ...
    raise CheckpointError(
        f"Could not read {path!r} as a PyTorch checkpoint with weights_only=True (a checkpoint may "
        f"hold only tensors and plain containers; anything that would run code is refused): {e}") from e


def _safe_numpy_globals() -> list:
  """numpy scalars and dtypes, which training scripts store as e.g. 'best_acc'.

  Rebuilding them only constructs data; no other global is allowed.
  """
  import numpy.core.multiarray as multiarray
  dtypes = [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
  return [multiarray.scalar, np.dtype, *dtypes]


def _is_tensor(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _is_state_dict(obj: Any) -> bool:
  return (isinstance(obj, Mapping) and len(obj) > 0
          and all(isinstance(k, str) and _is_tensor(v) for k, v in obj.items()))


def _find_state_dict(obj: Any, path: str) -> tuple[Mapping[str, Any], str | None]:
  if _is_state_dict(obj):
    return obj, None
  if isinstance(obj, Mapping):
    for key in CONTAINER_KEYS:
      if _is_state_dict(obj.get(key)):
        return obj[key], key
    raise CheckpointError(f"{path!r} holds no state dict: its top-level keys are {sorted(map(str, obj))[:20]}, "
                          f"none of {list(CONTAINER_KEYS)} maps parameter names to tensors.")
  raise CheckpointError(f"{path!r} holds a {type(obj).__name__}, not a state dict.")


def _to_numpy(x: Any) -> np.ndarray:
  if isinstance(x, np.ndarray):
    return x.astype(np.float32) if x.dtype.kind == "f" else x
  # torch.Tensor: half and bfloat16 weights are widened to float32.
  if x.is_floating_point():
    x = x.float()
  return x.detach().cpu().numpy()
