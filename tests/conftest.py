"""Test setup shared by the whole suite.

Eight CPU devices are simulated so that sharding code runs with a real mesh on
a laptop. XLA reads the flag once, when the backend starts, so it has to be in
the environment before anything imports jax; pytest imports this file first.
"""

import fcntl
import os
import pathlib
import shutil
import socket
import subprocess
import sys
from typing import Callable

import pytest

# The suite runs on the CPU (and its eight simulated devices) on any machine, one with a GPU or TPU too:
# JAX would otherwise pick the accelerator, where the simulated devices do not exist.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}".strip()

# XLA:CPU compiles dominate the suite's time (a model's init alone compiles for
# seconds, mostly its random initialisers). Share compiled programs between the
# test workers, the subprocesses they start, and later runs.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "faer_jax", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@pytest.fixture(scope="session")
def torch():
  """PyTorch, for the tests that compare with it or run it; they skip where it is not installed."""
  return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def cpu_kernels() -> str:
  """The C++ kernels, built and registered (returns the build: avx512, avx2).

  Skips where they are off by design: FAER_JAX_CPU_KERNELS=0, or a CPU with neither
  AVX-512F nor AVX2 + FMA. Where the CPU has them, a build that fails fails.
  """
  from faer_jax import kernels
  setting = os.environ.get("FAER_JAX_CPU_KERNELS", "1")
  if setting == "0" or (setting != "force" and kernels.cpu_isa() is None):
    pytest.skip(f"the CPU kernels are off here (FAER_JAX_CPU_KERNELS={setting}, CPU: {kernels.cpu_isa()})")
  return kernels.load()


REPO = pathlib.Path(__file__).resolve().parent.parent


def load_config(name: str, arg: str | None = None, **overrides):
  """configs/NAME's `get_config(arg)`, with `overrides` ('optimizer.lr': 1e-3, ...) set."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(f"config_{name.removesuffix('.py')}", REPO / "configs" / name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def shared_dir(tmp_path_factory, name: str, make: Callable[[pathlib.Path], object]) -> pathlib.Path:
  """A directory that `make(path)` fills once per test session, shared by pytest-xdist's workers.

  The first worker to ask makes it under a file lock; the others wait for it and reuse it, so
  its users must only read it (a trained run made by each worker would cost every worker its
  time). A worker whose `make` fails leaves
  no mark: the next one to ask tries again.
  """
  root = tmp_path_factory.getbasetemp()
  if "PYTEST_XDIST_WORKER" in os.environ:
    root = root.parent  # the session's base directory, above each worker's own
  path, done = root / name, root / f"{name}.done"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      shutil.rmtree(path, ignore_errors=True)
      path.mkdir()
      make(path)
      done.touch()
  return path


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two_processes(script: str, *args: str, timeout: float = 120) -> list[str]:
  """Runs `script` as processes 0 and 1 of a loopback jax.distributed job, 2 CPU devices each.

  The script gets argv [port, process_id, *args]; returns the two stdouts.
  """
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, "-c", script, port, str(pid), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
  try:
    results = [proc.communicate(timeout=timeout) for proc in procs]
  finally:
    for proc in procs:
      proc.kill()
  for proc, (_, err) in zip(procs, results):
    assert proc.returncode == 0, err[-3000:]
  return [out for out, _ in results]


@pytest.fixture
def run_two_processes():
  """A function that runs a script as a two-process jax.distributed job (see `_run_two_processes`)."""
  return _run_two_processes
