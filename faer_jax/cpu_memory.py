"""Keep freed memory in the process on CPU: no page faults for every step's fresh buffers.

A training step on XLA:CPU allocates its activations (gigabytes for ConvNeXt at
batch 16, 224 px) anew on every call. glibc's malloc serves allocations above
32 MB with fresh mmaps and unmaps them on free, so every step touches several
GB of new pages and the kernel zeroes each one on its first write: ~1.3
million page faults and 2.5-9 s of system time per ConvNeXt-B step on two
cores of an AMD EPYC (more right after another large allocator, such as
PyTorch's, has run). `keep_freed_memory()` tells glibc to serve large blocks
from its heap and keep what is freed (mallopt: no mmap, no trimming, one
arena), so from the second step on the same pages are reused. Measured on a
ConvNeXt-B training step, batch 16, 2 threads: 12.1 s -> 10.2 s (JAX), 12.9 s
-> 11.3 s (PyTorch), page faults per step 1.3 M -> 0.

The price: the process keeps its peak memory until it exits. That is what a
training or benchmark process wants; a library imported into a long-lived
service may not, so nothing calls this on import. The CLIs (train, evaluate,
benchmark) call it on CPU unless FAER_JAX_KEEP_FREED_MEMORY=0. It only acts on
glibc (Linux); elsewhere it does nothing.
"""

import ctypes
import ctypes.util
import functools
import os

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


@functools.cache
def keep_freed_memory() -> bool:
  """Configures glibc malloc as above, once; returns whether it applied."""
  if os.environ.get("FAER_JAX_KEEP_FREED_MEMORY", "1") == "0":
    return False
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  # -1: never give the top of the heap back (it is reused next step).
  ok = mallopt(_M_TRIM_THRESHOLD, -1) == 1
  ok &= mallopt(_M_MMAP_MAX, 0) == 1  # large blocks from the heap, not from fresh mmaps
  ok &= mallopt(_M_ARENA_MAX, 1) == 1  # one heap, so the blocks XLA's threads free are found again
  return bool(ok)
