"""FLOP counts from XLA's cost analysis, and the peak FLOP/s of known chips (for MFU)."""

from typing import Any

# Dense peak FLOP/s per chip from the vendors' data sheets: (bfloat16, float32).
# GPUs' float32 is the non-tensor-core rate: in float32 the model asks for
# float32 precision (faer_jax.models.layers.precision), not XLA's default
# TF32. TPUs have no separate f32 matmul peak (f32 runs as several bf16
# passes), so theirs is left unknown. Keys are
# matched, in order, against `device.device_kind` (lower case), e.g.
# 'NVIDIA H100 80GB HBM3', 'TPU v5 lite'. CPUs: unknown, no MFU.
PEAK_FLOPS: tuple[tuple[str, float, float | None], ...] = (
    ("h200", 989e12, 67e12),      # H200 SXM: same SMs and clocks as H100 SXM.
    ("h100 pcie", 756e12, 51e12),
    ("h100", 989e12, 67e12),      # H100 SXM.
    ("a100", 312e12, 19.5e12),
    ("tpu v5 lite", 197e12, None),  # v5e
    ("tpu v5e", 197e12, None),
    ("tpu v5p", 459e12, None),
    ("tpu v5", 459e12, None),     # v5p reports itself as 'TPU v5'.
    ("tpu v4", 275e12, None),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """The chip's dense peak FLOP/s for 'bfloat16' or 'float32', or None if unknown."""
  kind = device_kind.lower()
  for key, bf16, fp32 in PEAK_FLOPS:
    if key in kind:
      return bf16 if dtype == "bfloat16" else fp32
  return None


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
