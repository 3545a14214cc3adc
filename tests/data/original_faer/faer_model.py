"""Stands in for a user's copy of the original FAER code, for `--torch-model` (tests/test_interop.py,
tests/test_benchmark.py): a file of its own outside the package, importing a sibling, built from keyword
arguments, returning (logits, features) (the other order from the reference's), and variants with the
numerics bugs a port can make while accuracy looks fine."""

import torch
from faer_sizes import TEST
from faer_jax.interop.torch_reference import FAER


class Original(FAER):

  def forward(self, x):
    features, logits = super().forward(x)
    return logits, features


class LogitsOnly(FAER):

  def forward(self, x):
    return {"out": super().forward(x)[1]}


class TanhGelu(Original):

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    for module in self.modules():
      for name, child in module.named_children():
        if isinstance(child, torch.nn.GELU):
          setattr(module, name, torch.nn.GELU(approximate="tanh"))


class BlockNormEps(Original):

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    for module in self.modules():
      if type(module).__name__ == "LayerNorm" and hasattr(module, "data_format"):
        module.eps = 1e-5  # torch's default, not ConvNeXt's 1e-6


class HeadNormEps(Original):

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.norm.eps = 1e-5


def build(num_classes=7):
  return Original(TEST["depths"], TEST["dims"], num_classes)


def not_a_model():
  return "a string"
