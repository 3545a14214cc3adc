"""FLOP counts from XLA's cost analysis, and the peak FLOP/s of known chips (for MFU)."""

from typing import Any

from faer_jax import chips

def peak_flops(device_kind: str, dtype: str) -> float | None:
  """The chip's dense peak FLOP/s for 'bfloat16' or 'float32' (faer_jax.chips), or None if unknown (CPUs)."""
  chip = chips.from_device_kind(device_kind)
  return chip.peak_flops(dtype) if chip else None


def cpu_peak_flops() -> float | None:
  """The CPU's float32 peak FLOP/s, measured: vector FMA chains on every thread of XLA's pool.

  faer_jax/kernels/peak.cc; the best of three runs (another job on the machine
  only lowers a run). None where the C++ kernels are unavailable.
  """
  import jax
  import jax.numpy as jnp

  from faer_jax import kernels
  if jax.default_backend() != "cpu" or not kernels.available():
    return None
  measure = jax.jit(lambda: jax.ffi.ffi_call("faer_peak_flops", jax.ShapeDtypeStruct((), jnp.float32),
                                             has_side_effect=True)())
  return max(float(measure()) for _ in range(3))


def xla_flops(stage: Any) -> float | None:
  """The FLOPs XLA counts for one call of a program, `jit(f).lower(...)` or its `.compile()`.

  XLA counts what it will execute: a rewrite such as the shifted depthwise conv
  is counted as its multiply-adds, and elementwise work (GELU, LayerNorm) counts
  too, so this is the program's FLOPs rather than the textbook model FLOPs.
  Older jax versions return a list with one dict per program.
  """
  try:
    analysis = stage.cost_analysis()
  except Exception:  # noqa: BLE001  # not every backend implements it
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None
