"""The one table between Flax parameter paths and the original FAER state-dict keys.

Both directions (PyTorch -> Flax and Flax -> PyTorch) read this table, so they
cannot drift apart. Layout conversions, in one place:

  conv    torch (O, I/groups, kH, kW)  <->  flax kernel (kH, kW, I/groups, O)
  linear  torch (O, I)                 <->  flax kernel (I, O)
          (timm's conv_mlp checkpoints store linears as 1x1 convs (O, I, 1, 1))
  norm    torch weight, bias           <->  flax scale, bias
  gamma   torch (C,)                   <->  flax (C,)
"""

import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np

Params = Mapping[str, Any]

# (flax leaf name, torch leaf name, torch -> flax, flax -> torch) per kind.
_LEAVES: dict[str, list[tuple[str, str, Callable, Callable]]] = {
    "conv": [("kernel", "weight", lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)),
             ("bias", "bias", lambda b: b, lambda b: b)],
    "linear": [("kernel", "weight", lambda w: _squeeze_1x1(w).T, lambda k: k.T),
               ("bias", "bias", lambda b: b, lambda b: b)],
    "norm": [("scale", "weight", lambda w: w, lambda s: s), ("bias", "bias", lambda b: b, lambda b: b)],
}


def _squeeze_1x1(w: np.ndarray) -> np.ndarray:
  return w[:, :, 0, 0] if w.ndim == 4 and w.shape[2:] == (1, 1) else w


class Entry:
  """One tensor: its Flax path, its torch key and the conversions between them."""

  __slots__ = ("flax_path", "torch_key", "to_flax", "to_torch")

  def __init__(self, flax_path: tuple[str, ...], torch_key: str, to_flax: Callable, to_torch: Callable):
    self.flax_path, self.torch_key, self.to_flax, self.to_torch = flax_path, torch_key, to_flax, to_torch


def _modules(params: Params) -> Iterable[tuple[tuple[str, ...], str, str]]:
  """(flax module path, torch module name, kind) for every module present in `params`."""
  if "backbone" in params:
    backbone, root = params["backbone"], ("backbone",)
  else:  # A bare ConvNeXt from create_backbone.
    backbone, root = params, ()
  for i in range(4):
    ds = root + (f"downsample_layers_{i}",)
    if ds[-1] not in backbone:
      continue
    conv_index, norm_index = (0, 1) if i == 0 else (1, 0)  # stem: conv, LN; later: LN, conv
    yield ds + ("conv",), f"downsample_layers.{i}.{conv_index}", "conv"
    yield ds + ("norm",), f"downsample_layers.{i}.{norm_index}", "norm"
    stage = backbone.get(f"stages_{i}", {})
    for j in range(len(stage)):
      block = root + (f"stages_{i}", f"blocks_{j}")
      yield block + ("dwconv",), f"stages.{i}.{j}.dwconv", "conv"
      yield block + ("norm",), f"stages.{i}.{j}.norm", "norm"
      yield block + ("pwconv1",), f"stages.{i}.{j}.pwconv1", "linear"
      yield block + ("pwconv2",), f"stages.{i}.{j}.pwconv2", "linear"
      if "gamma" in stage[f"blocks_{j}"]:
        yield block + ("gamma",), f"stages.{i}.{j}.gamma", "param"
  if "cc_attention" in params:
    for flax_name, torch_name, kind in [("mlp_0", "mlp.0", "linear"), ("mlp_2", "mlp.2", "linear"),
                                        ("value", "value", "linear"), ("depthwise", "depthwise", "conv"),
                                        ("norm", "norm", "norm")]:
      yield ("cc_attention", flax_name), f"attention.{torch_name}", kind
  if "norm" in params:
    yield ("norm",), "norm", "norm"
  if "head" in params:
    yield ("head",), "head", "linear"


def build_table(params: Params) -> dict[str, Entry]:
  """torch key -> Entry, for every parameter of `params` (FAER or bare ConvNeXt)."""
  table = {}
  for path, torch_name, kind in _modules(params):
    if kind == "param":
      table[torch_name] = Entry(path, torch_name, lambda x: x, lambda x: x)
      continue
    for flax_leaf, torch_leaf, to_flax, to_torch in _LEAVES[kind]:
      key = f"{torch_name}.{torch_leaf}"
      table[key] = Entry(path + (flax_leaf,), key, to_flax, to_torch)
  return table


# --- Key names of the layouts we read, normalised to the original FAER's. ---

# Wrappers people save models in: DataParallel ('module.'), torch.compile
# ('_orig_mod.'), the original repository's face-pretrained backbone ('net.').
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "net.", "model.", "backbone.")

# timm's ConvNeXt names -> the original ConvNeXt names (which FAER keeps).
_TIMM_RULES = [
    (re.compile(r"^stem\.([01])\."), r"downsample_layers.0.\1."),
    (re.compile(r"^stages\.(\d+)\.downsample\.([01])\."), r"downsample_layers.\1.\2."),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\."), r"stages.\1.\2.dwconv."),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\."), r"stages.\1.\2.pwconv1."),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\."), r"stages.\1.\2.pwconv2."),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(norm\.|gamma$)"), r"stages.\1.\2.\3"),
    (re.compile(r"^head\.norm\."), r"norm."),
    (re.compile(r"^head\.fc\."), r"head."),
]


def strip_wrappers(key: str) -> str:
  changed = True
  while changed:
    changed = False
    for prefix in WRAPPER_PREFIXES:
      if key.startswith(prefix):
        key, changed = key[len(prefix):], True
  return key


def is_timm_layout(keys: Iterable[str]) -> bool:
  return any(k.startswith("stem.") or ".blocks." in k for k in keys)


def normalize_key(key: str, timm: bool) -> str:
  """A checkpoint key in the original FAER naming (wrappers stripped, timm renamed)."""
  key = strip_wrappers(key)
  if timm:
    for pattern, replacement in _TIMM_RULES:
      new, n = pattern.subn(replacement, key)
      if n:
        return new
  return key
