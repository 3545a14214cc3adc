"""Which implementation of each part of FAER a program is built with: the one place the CPU fast path is chosen.

The model files hold the plain layers, what GPUs and TPUs run. For a program
built for the CPU, faer_jax.kernels has drop-in modules with the same
parameters (C++ kernels through jax.ffi, and pure-XLA forms that XLA:CPU runs
faster); `choose` picks them by the model's `conv_impl` (config key
`model.conv_impl`) and the platform the program is compiled for:

  'auto'    CPU: the C++ kernels in float32 where they build, else the pure-XLA
            CPU forms; any other platform: the plain layers
  'xla'     the plain layers everywhere
  'shift'   the pure-XLA CPU forms (on any platform)
  'kernel'  the C++ kernels; an error where they cannot run (not float32, not a
            CPU program, not built here)

Without the faer_jax.kernels package, 'auto' gives the plain layers.

The platform is the one the program is compiled for, not the one this process
runs on: a train step compiled on a CPU host for a TPU topology, or exported
for CUDA, gets the plain layers. The kernels have reverse-mode gradients only:
forward-mode autodiff (jax.jvp) of a CPU program needs 'xla'.
"""

import jax
import jax.numpy as jnp

from faer_jax.models import layers
from faer_jax.models.convnext import Block

CONV_IMPLS = ("auto", "xla", "shift", "kernel")
PLAIN = {"block": Block, "patch_conv": layers.PatchConv, "grouped_conv": layers.GroupedConv,
         "norm_layer": layers.LayerNorm}


def choose(conv_impl: str = "auto", platform: str | None = None, dtype=jnp.float32) -> dict[str, layers.ModuleDef]:
  """The modules FAER's parts are built with (keyword arguments of `FAER` and `ConvNeXt`).

  Args:
    conv_impl: 'auto', 'xla', 'shift' or 'kernel' (see the module docstring).
    platform: the platform the program is compiled for ('cpu', 'gpu', 'cuda',
      'rocm', 'tpu'); None: this process's default backend.
    dtype: the computation dtype.

  Returns:
    {'block', 'patch_conv', 'grouped_conv', 'norm_layer'} -> module class.

  Raises:
    ValueError: an unknown conv_impl, or one that cannot run for this platform and dtype.
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"Unknown conv_impl {conv_impl!r}; expected one of {CONV_IMPLS}.")
  platform = platform or jax.default_backend()
  if conv_impl == "xla" or (conv_impl == "auto" and platform != "cpu"):
    return dict(PLAIN)
  if conv_impl == "kernel" and platform != "cpu":
    raise ValueError(f"conv_impl 'kernel' runs C++ kernels for the CPU; this program is built for {platform!r}.")
  try:
    from faer_jax.kernels import modules
  except ModuleNotFoundError as e:
    if not (e.name or "").startswith("faer_jax.kernels"):
      raise
    if conv_impl != "auto":
      raise ValueError(f"conv_impl {conv_impl!r} needs the faer_jax.kernels package, which is not here.") from e
    return dict(PLAIN)
  return modules.cpu_parts(conv_impl, dtype)
