"""C++ kernels for XLA:CPU, registered with jax.ffi and built from source at first use.

  depthwise_conv.cc  ConvNeXt's 7x7 depthwise conv, alone and fused with the LayerNorm after it
  grouped_conv.cc    CC Attention's 7x7 conv with 4 groups
  mlp.cc             a block's Dense-GELU-Dense-gamma-drop path-residual, one kernel each way
  peak.cc            the CPU's FMA throughput, for the benchmark's MFU

Only the CPU backend uses them (GPUs and TPUs have fast native convolutions
and matmul fusions), and only where they measurably beat what XLA:CPU makes of
the same op (docs/cpu_kernels.md). The source ships with the package; the first process
that needs a kernel compiles it with the machine's C++ compiler (`$CXX`, else
`c++`/`g++`) against the XLA FFI headers jaxlib ships, for this CPU
(`-march=native`), into a cache directory:

  $FAER_JAX_KERNEL_CACHE, else $XDG_CACHE_HOME/faer_jax/kernels, else ~/.cache/faer_jax/kernels

keyed by the source, the compiler, jaxlib and the CPU's feature flags, so a
shared home directory over different machines is safe. Building takes 10-20 s,
once (the sources compile side by side, one per core; processes that need the
same build at the same time wait for one of them to make it). Where no
compiler is found, or FAER_JAX_CPU_KERNELS=0, the model uses its pure-XLA
implementation (same function, slower) and logs why.

Two builds of the same source, by what the CPU has: AVX-512F (16-float vectors,
a 12 x 32 register tile of 24 accumulators in 32 registers) or AVX2 with FMA
(8-float vectors, 6 x 16 tiles in 16 registers); the vector width and the
tiles follow from the compiler's target (common.h). Same function either way;
sums over channels run in lanes of the vector width, so the two builds' results
differ in the last bits. On other CPUs the kernels are not used. The switch
FAER_JAX_CPU_KERNELS:

  1 (or unset)  the build this CPU supports, if any
  0             off: the pure-XLA layers
  avx2          the AVX2 build even on an AVX-512 CPU (tests, comparisons)
  wide          the AVX-512 build's 16-float vectors and tiles on any AVX2 CPU, each vector op
                run as two (FAER_JAX_WIDE_VECTORS in common.h): slow; it lets a machine without
                AVX-512 run that build's code (tests)
  force         whatever `-march=native` gives, on any CPU
"""

import concurrent.futures
import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax

_HERE = pathlib.Path(__file__).parent
_SOURCES = (_HERE / "depthwise_conv.cc", _HERE / "grouped_conv.cc", _HERE / "mlp.cc", _HERE / "patch_conv.cc",
            _HERE / "peak.cc")
_HEADERS = (_HERE / "common.h", _HERE / "gemm.h")
_TARGETS = {"faer_dw7_forward": "FaerDw7Forward", "faer_dw7_kernel_grad": "FaerDw7KernelGrad",
            "faer_dw7_norm_forward": "FaerDw7NormForward", "faer_dw7_norm_backward": "FaerDw7NormBackward",
            "faer_gconv7_forward": "FaerGconv7Forward", "faer_gconv7_kernel_grad": "FaerGconv7KernelGrad",
            "faer_mlp_forward": "FaerMlpForward", "faer_mlp_forward_train": "FaerMlpForwardTrain",
            "faer_mlp_backward": "FaerMlpBackward", "faer_patch_forward": "FaerPatchForward",
            "faer_patch_input_grad": "FaerPatchInputGrad", "faer_patch_kernel_grad": "FaerPatchKernelGrad",
            "faer_peak_flops": "FaerPeakFlops"}


class KernelUnavailable(RuntimeError):
  """The C++ kernels cannot be used here (disabled, no compiler, or the build failed)."""


def cache_dir() -> pathlib.Path:
  if os.environ.get("FAER_JAX_KERNEL_CACHE"):
    return pathlib.Path(os.environ["FAER_JAX_KERNEL_CACHE"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "faer_jax" / "kernels"


def _compiler() -> str:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  raise KernelUnavailable("no C++ compiler found ($CXX, c++, g++, clang++)")


def _cpu_flags() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(("flags", "Features")):
        return line
  except OSError:
    pass
  return platform.processor() or platform.machine()


_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def _build(cxx: str, extra_flags: tuple[str, ...] = ()) -> pathlib.Path:
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
  flags = (*_FLAGS, *extra_flags)
  parts = (*(f.read_text() for f in _SOURCES + _HEADERS), version, " ".join(flags), jax.ffi.include_dir(),
           jax.__version__, _cpu_flags())
  key = hashlib.sha256(b"\0".join(p.encode() for p in parts)).hexdigest()[:16]
  target = cache_dir() / f"faer_kernels_{key}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  # One process builds; others asking for the same library at once (pytest
  # workers, the processes of a multi-process run) wait for it and load it.
  with open(target.with_suffix(".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not target.exists():
      _compile(cxx, flags, target)
  return target


def _compile(cxx: str, flags: tuple[str, ...], target: pathlib.Path) -> None:
  """Compiles the sources side by side (one compiler per core) and links them into `target`."""
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    objects = [pathlib.Path(tmp) / f"{source.stem}.o" for source in _SOURCES]
    compile_flags = [f for f in flags if f != "-shared"]
    # Largest first (mlp.cc takes ~12 of the ~30 s all five take one after another on two Zen 1 cores).
    commands = [[cxx, *compile_flags, "-I", jax.ffi.include_dir(), "-c", str(source), "-o", str(obj)]
                for source, obj in sorted(zip(_SOURCES, objects), key=lambda so: -so[0].stat().st_size)]
    width = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    run = functools.partial(subprocess.run, capture_output=True, text=True, check=False)
    with concurrent.futures.ThreadPoolExecutor(max(1, width)) as pool:
      results = list(pool.map(run, commands))
    failures = [f"{' '.join(cmd)}:\n{r.stderr[-2000:]}" for cmd, r in zip(commands, results) if r.returncode]
    partial = pathlib.Path(tmp) / target.name
    if not failures:
      cmd = [cxx, *flags, *map(str, objects), "-o", str(partial)]
      result = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if result.returncode != 0:
        failures.append(f"{' '.join(cmd)}:\n{result.stderr[-2000:]}")
    if failures:
      raise KernelUnavailable(f"building {', '.join(f.name for f in _SOURCES)} failed:\n" + "\n".join(failures))
    # Renamed into place: a process that does not take the lock never sees half a file.
    os.replace(partial, target)
  logging.info("Built the CPU kernels into %s", target)


_SETTINGS = ("1", "0", "avx2", "wide", "force")


def cpu_isa() -> str | None:
  """The kernels' instruction set on this CPU: 'avx512', 'avx2' (with FMA) or None."""
  flags = _cpu_flags().split()
  if "avx512f" in flags:
    return "avx512"
  if "avx2" in flags and "fma" in flags:
    return "avx2"
  return None


def _choice() -> tuple[str, tuple[str, ...]]:
  """(the build, its extra compiler flags) that FAER_JAX_CPU_KERNELS and the CPU ask for."""
  setting = os.environ.get("FAER_JAX_CPU_KERNELS", "1")
  if setting not in _SETTINGS:
    raise ValueError(f"FAER_JAX_CPU_KERNELS={setting!r}: expected one of {', '.join(_SETTINGS)}.")
  if setting == "0":
    raise KernelUnavailable("disabled by FAER_JAX_CPU_KERNELS=0")
  if setting == "force":
    return "native", ()
  isa = cpu_isa()
  if isa is None:
    raise KernelUnavailable("this CPU has neither AVX-512F nor AVX2 with FMA, which the kernels are written for; "
                            "FAER_JAX_CPU_KERNELS=force builds them anyway")
  if setting == "avx2" and isa == "avx512":
    return "avx2", ("-mno-avx512f",)
  if setting == "wide":
    return "wide", ("-mno-avx512f", "-DFAER_JAX_WIDE_VECTORS")
  return isa, ()


@functools.cache
def load() -> str:
  """Builds (once per machine and build) and registers the kernels; returns which build
  ('avx512', 'avx2', 'wide' or 'native' under FAER_JAX_CPU_KERNELS=force). Raises KernelUnavailable."""
  isa, flags = _choice()
  try:
    library = ctypes.cdll.LoadLibrary(str(_build(_compiler(), flags)))
  except OSError as e:  # an unwritable cache directory, a library that does not load
    raise KernelUnavailable(f"{e} (cache: {cache_dir()})") from e
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  return isa


@functools.cache
def available() -> bool:
  """Whether the kernels can be used in this process; logs the reason once when not."""
  try:
    load()
  except KernelUnavailable as e:
    logging.warning("faer_jax CPU kernels unavailable, using the pure-XLA convolutions: %s", e)
    return False
  return True
