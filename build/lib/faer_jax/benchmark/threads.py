"""One thread count for both frameworks, set before either starts its pools.

XLA:CPU runs a compiled program's thunks (and Eigen's contractions and
convolutions) on one intra-op thread pool that the CPU client sizes, when the
backend starts, to the number of CPUs in the process's affinity mask; there is
no JAX option for its size (jax-ml/jax#1539, #743). So `limit_threads(n)`
narrows the affinity mask to n CPUs before jax is imported, which sizes XLA's
pool to n and keeps its threads on those cores; with n == 1 it also sets
`--xla_cpu_multi_thread_eigen=false`, so Eigen runs on the calling thread.
PyTorch gets the same n through `torch.set_num_threads` (its OpenMP pool), and
inherits the same affinity mask.
"""

import os
import sys


def limit_threads(n: int | None) -> dict:
  """Confines this process to `n` CPUs (None: all it may use). Returns what was applied.

  Call before jax and torch are imported; if jax already is (a test calling
  `main` in-process), its pool keeps the size it started with, and the returned
  `xla_threads_applied` says so.
  """
  cpus = sorted(os.sched_getaffinity(0))
  requested = n is not None
  if n is None:
    n = len(cpus)
  if not 1 <= n <= len(cpus):
    raise ValueError(f"--threads {n}: this process may use {len(cpus)} CPUs.")
  applied = "jax" not in sys.modules
  if applied:
    if n < len(cpus):
      os.sched_setaffinity(0, cpus[:n])
    if n == 1:
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
  elif requested:
    print(f"warning: jax is already imported; XLA's thread pool keeps its size, --threads {n} "
          "only reaches PyTorch.", file=sys.stderr)
  # Read by MKL and OpenMP when torch loads them; torch.set_num_threads also sets it.
  os.environ.setdefault("OMP_NUM_THREADS", str(n))
  return {"threads": n, "xla_threads_applied": applied}
