"""faer_jax.cpu_memory: freed memory is kept and reused, so repeated large buffers stop faulting."""

import os
import subprocess
import sys
import textwrap


def _run(code: str, **env) -> str:
  result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  return result.stdout.split()


_CODE = """
    import ctypes, resource
    from faer_jax import cpu_memory
    applied = cpu_memory.keep_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)
    def buffer():  # 64 MB, allocated, written and freed, as XLA:CPU does with a step's buffers
      p = libc.malloc(64 << 20)
      ctypes.memset(p, 1, 64 << 20)
      libc.free(p)
    buffer()  # the heap grows once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
      buffer()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_large_buffers_are_reused_instead_of_faulted_in():
  applied, faults = _run(_CODE)
  assert applied == "True"
  assert int(faults) < 2000  # 5 x 64 MB in fresh 4 KB pages would be ~80,000 faults
  applied, faults = _run(_CODE, FAER_JAX_KEEP_FREED_MEMORY="0")
  assert applied == "False"
  assert int(faults) > 50_000  # glibc's default: a fresh mmap for every buffer
