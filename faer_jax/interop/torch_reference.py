"""A PyTorch FAER with the original's module tree, for cross-framework checks.

Written from the architecture's definition (the original ConvNeXt code's
structure, and CC Attention as described in faer_jax.models.cc_attention), with
state-dict keys identical to the original FAER's:

  downsample_layers.{i}.{0,1}, stages.{i}.{j}.{dwconv,norm,pwconv1,pwconv2,gamma},
  attention.{mlp.0,mlp.2,value,depthwise,norm}, norm, head

Importing this module needs torch; nothing else in faer_jax imports it eagerly.
Tensors are NCHW, as in the original. Eval mode only matters for drop path.
"""

import torch
import torch.nn.functional as F
from torch import nn

from faer_jax.models.convnext import get_variant


class LayerNorm(nn.Module):
  """LayerNorm over channels for NCHW ('channels_first') or NHWC ('channels_last') tensors."""

  def __init__(self, dim: int, eps: float = 1e-6, data_format: str = "channels_last"):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.bias = nn.Parameter(torch.zeros(dim))
    self.eps = eps
    self.data_format = data_format
    self.dim = dim

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.data_format == "channels_last":
      return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + self.eps)
    return self.weight[:, None, None] * x + self.bias[:, None, None]


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
  if rate == 0.0 or not training:
    return x
  keep = 1.0 - rate
  mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
  return x * mask / keep if keep > 0 else x * mask


class Block(nn.Module):

  def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6):
    super().__init__()
    self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
    self.norm = LayerNorm(dim, eps=1e-6)
    self.pwconv1 = nn.Linear(dim, 4 * dim)
    self.act = nn.GELU()
    self.pwconv2 = nn.Linear(4 * dim, dim)
    self.gamma = (nn.Parameter(layer_scale_init_value * torch.ones(dim))
                  if layer_scale_init_value > 0 else None)
    self.drop_path_rate = drop_path

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    shortcut = x
    x = self.dwconv(x).permute(0, 2, 3, 1)
    x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
    if self.gamma is not None:
      x = self.gamma * x
    x = x.permute(0, 3, 1, 2)
    return shortcut + drop_path(x, self.drop_path_rate, self.training)


class CCAttention(nn.Module):

  def __init__(self, dim: int):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(dim, dim // 8), nn.GELU(), nn.Linear(dim // 8, dim))
    self.value = nn.Linear(dim, dim)
    self.depthwise = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=4)
    self.act = nn.GELU()
    self.norm = nn.LayerNorm(dim)  # default eps 1e-5

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    x_last = x.permute(0, 2, 3, 1)
    value = self.value(x_last)
    key = self.mlp(x_last) * x_last.mean(dim=(1, 2), keepdim=True)
    query = self.norm(self.act(self.depthwise(x)).permute(0, 2, 3, 1))
    attention = torch.softmax((query + key).reshape(b, h * w, c), dim=1).reshape(b, h, w, c)
    return (attention * value + x_last).permute(0, 3, 1, 2)


class FAER(nn.Module):
  """forward(images NCHW) -> (features, logits), features being the pre-norm pooled vector.

  With `cc_attention=False`, the paper's Baseline: the official ConvNeXt classifier (its state
  dict: the ConvNeXt release's keys, head included).
  """

  def __init__(self, depths, dims, num_classes: int, drop_path_rate: float = 0.0,
               layer_scale_init_value: float = 1e-6, head_init_scale: float = 1.0, in_chans: int = 3,
               cc_attention: bool = True):
    super().__init__()
    self.downsample_layers = nn.ModuleList()
    self.downsample_layers.append(nn.Sequential(
        nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm(dims[0], 1e-6, "channels_first")))
    for i in range(3):
      self.downsample_layers.append(nn.Sequential(
          LayerNorm(dims[i], 1e-6, "channels_first"), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
    rates = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
    self.stages = nn.ModuleList()
    cur = 0
    for i in range(4):
      self.stages.append(nn.Sequential(*[
          Block(dims[i], rates[cur + j], layer_scale_init_value) for j in range(depths[i])]))
      cur += depths[i]
    self.attention = CCAttention(dims[-1]) if cc_attention else None
    self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
    self.head = nn.Linear(dims[-1], num_classes)
    self.apply(self._init_weights)
    self.head.weight.data.mul_(head_init_scale)
    self.head.bias.data.mul_(head_init_scale)

  @staticmethod
  def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
      nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
      nn.init.constant_(m.bias, 0)

  def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
    for downsample, stage in zip(self.downsample_layers, self.stages):
      x = stage(downsample(x))
    return x

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = self.forward_backbone(x)
    if self.attention is not None:
      x = self.attention(x)
    features = x.mean(dim=(-2, -1))
    return features, self.head(self.norm(features))


def create_torch_model(variant: str, num_classes: int, **kwargs) -> FAER:
  spec = get_variant(variant)
  return FAER(spec.depths, spec.dims, num_classes, **kwargs)
