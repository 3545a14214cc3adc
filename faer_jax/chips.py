"""Accelerators FAER trains on: dense peak FLOP/s, memory and memory bandwidth per chip, from public sources.

Used for MFU (faer_jax.benchmark) and for the roofline estimates of
faer_jax.plan. float32 is what the float32 model asks for: every product at
float32 precision (faer_jax.models.layers.precision), which GPUs run on their
CUDA cores (no TensorFloat-32) and TPUs as six bfloat16 passes (the
jax.lax.Precision.HIGHEST docstring), i.e. a sixth of the bfloat16 peak.
"""

import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip."""

  name: str
  kinds: tuple[str, ...]      # lower-case substrings of `jax.Device.device_kind` that name it
  bf16_flops: float           # dense peak FLOP/s in bfloat16 (no sparsity)
  f32_flops: float            # dense peak FLOP/s of float32 products at float32 precision
  memory_bytes: int           # memory per chip (HBM)
  bandwidth: float            # memory bandwidth per chip, bytes/s
  topology_prefix: str | None = None  # the TPU topology names' prefix, e.g. 'v5e' in 'v5e:2x2'

  def peak_flops(self, dtype: str) -> float:
    return self.bf16_flops if dtype == "bfloat16" else self.f32_flops


CHIPS: tuple[Chip, ...] = (
    # cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2, 1,200 GB/s.
    Chip("TPU v4", ("tpu v4",), 275e12, 275e12 / 6, 32 * GiB, 1200e9, "v4"),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GiB HBM2, 819 GB/s.
    Chip("TPU v5e", ("tpu v5 lite", "tpu v5e"), 197e12, 197e12 / 6, 16 * GiB, 819e9, "v5e"),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM2e, 2,765 GB/s.
    Chip("TPU v5p", ("tpu v5p", "tpu v5"), 459e12, 459e12 / 6, 95 * GiB, 2765e9, "v5p"),
    # cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GiB HBM, 1,640 GB/s.
    Chip("TPU v6e", ("tpu v6 lite", "tpu v6e"), 918e12, 918e12 / 6, 32 * GiB, 1640e9, "v6e"),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): 989 TFLOP/s bf16 dense, 67 TFLOP/s fp32, 141 GB HBM3e,
    # 4.8 TB/s.
    Chip("NVIDIA H200", ("h200",), 989e12, 67e12, 141 * 10**9, 4.8e12),
    # NVIDIA H100 Tensor Core GPU datasheet: PCIe 756 / 51 TFLOP/s, 80 GB HBM2e, 2.0 TB/s; SXM 989 / 67
    # TFLOP/s, 80 GB HBM3, 3.35 TB/s.
    Chip("NVIDIA H100 PCIe", ("h100 pcie",), 756e12, 51e12, 80 * 10**9, 2.0e12),
    Chip("NVIDIA H100", ("h100",), 989e12, 67e12, 80 * 10**9, 3.35e12),
    # NVIDIA A100 Tensor Core GPU datasheet (80 GB SXM): 312 TFLOP/s bf16, 19.5 TFLOP/s fp32, 2,039 GB/s.
    Chip("NVIDIA A100", ("a100",), 312e12, 19.5e12, 80 * 10**9, 2039e9),
)


def from_device_kind(device_kind: str) -> Chip | None:
  """The chip a `jax.Device.device_kind` names ('TPU v5 lite', 'NVIDIA H100 80GB HBM3'), or None (CPUs)."""
  kind = device_kind.lower()
  for chip in CHIPS:
    if any(key in kind for key in chip.kinds):
      return chip
  return None


def by_name(name: str) -> Chip:
  """A chip by its table name, case-insensitive ('a100', 'NVIDIA H100'); ValueError naming the known ones."""
  wanted = name.lower().replace("nvidia ", "")
  for chip in CHIPS:
    if chip.name.lower().replace("nvidia ", "") == wanted:
      return chip
  raise ValueError(f"unknown chip {name!r}; known: {', '.join(c.name for c in CHIPS)}")
