"""faer_jax: FAER (ConvNeXt + Contextual Channel Attention) in JAX."""

import glob
import os

__version__ = "0.1.0"


def has_tpu_hardware() -> bool:
  """Whether this machine has TPU chips: a Google PCI device (vendor 0x1ae0) or TPU device files."""
  for vendor_file in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor_file) as f:
        if f.read().strip() == "0x1ae0":
          return True
    except OSError:
      continue
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


# libtpu (the [tpu] extra, which `python -m faer_jax.plan --topology` uses) starts with JAX's first
# computation and, on a machine without TPUs, asks for a TPU VM's metadata and prints errors before JAX
# falls back to the CPU. Where there are no TPU chips, tell it what it would ask (a TPU VM is left alone).
if not has_tpu_hardware():
  for _key, _value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                       ("TPU_ACCELERATOR_TYPE", "v5litepod-1")):
    os.environ.setdefault(_key, _value)
