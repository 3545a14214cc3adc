"""C++ kernels for XLA:CPU, registered with jax.ffi and built from source at first use.

  depthwise_conv.cc  ConvNeXt's 7x7 depthwise conv, alone and fused with the LayerNorm after it
  grouped_conv.cc    CC Attention's 7x7 conv with 4 groups
  mlp.cc             a block's Dense-GELU-Dense-gamma-drop path-residual, one kernel each way
  peak.cc            the CPU's FMA throughput, for the benchmark's MFU

Only the CPU backend uses them (GPUs and TPUs have fast native convolutions
and matmul fusions), and only where they measurably beat what XLA:CPU makes of
the same op (benchmarks/README.md). The source ships with the package; the first process
that needs a kernel compiles it with the machine's C++ compiler (`$CXX`, else
`c++`/`g++`) against the XLA FFI headers jaxlib ships, for this CPU
(`-march=native`), into a cache directory:

  $FAER_JAX_KERNEL_CACHE, else $XDG_CACHE_HOME/faer_jax/kernels, else ~/.cache/faer_jax/kernels

keyed by the source, the compiler, jaxlib and the CPU's feature flags, so a
shared home directory over different machines is safe. Building takes a few
seconds, once. Where no compiler is found, or FAER_JAX_CPU_KERNELS=0, the
model uses its pure-XLA implementation (same function, slower) and logs why.

They are written for AVX-512 (16-float vectors, a 12 x 32 register tile of 24
accumulators): built for AVX2 the MLP kernel's forward ran ~40x slower than on
AVX-512 on the same machine (C++ harness, 760 against 17.6 ms at C = 128), so
on a CPU without AVX-512F they are not used unless FAER_JAX_CPU_KERNELS=force.
"""

import ctypes
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


def _build(cxx: str) -> pathlib.Path:
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
  parts = (*(f.read_text() for f in _SOURCES + _HEADERS), version, " ".join(_FLAGS), jax.ffi.include_dir(),
           jax.__version__, _cpu_flags())
  key = hashlib.sha256(b"\0".join(p.encode() for p in parts)).hexdigest()[:16]
  target = cache_dir() / f"faer_kernels_{key}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  # Build beside the target and rename: processes building at once never see half a file.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
  os.close(fd)
  cmd = [cxx, *_FLAGS, "-I", jax.ffi.include_dir(), *map(str, _SOURCES), "-o", tmp]
  result = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    os.unlink(tmp)
    raise KernelUnavailable(f"building {', '.join(f.name for f in _SOURCES)} failed ({' '.join(cmd)}):\n"
                            f"{result.stderr[-2000:]}")
  os.replace(tmp, target)
  logging.info("Built the CPU kernels into %s", target)
  return target


def has_avx512() -> bool:
  """Whether this CPU reports AVX-512F (the instruction set the kernels are written for)."""
  return "avx512f" in _cpu_flags().split()


@functools.cache
def load() -> None:
  """Builds (once per machine) and registers the kernels; raises KernelUnavailable."""
  setting = os.environ.get("FAER_JAX_CPU_KERNELS", "1")
  if setting == "0":
    raise KernelUnavailable("disabled by FAER_JAX_CPU_KERNELS=0")
  if setting != "force" and not has_avx512():
    raise KernelUnavailable("this CPU has no AVX-512F, which the kernels are written for (built for AVX2 their "
                            "matrix products ran ~40x slower); FAER_JAX_CPU_KERNELS=force uses them anyway")
  try:
    library = ctypes.cdll.LoadLibrary(str(_build(_compiler())))
  except OSError as e:  # an unwritable cache directory, a library that does not load
    raise KernelUnavailable(f"{e} (cache: {cache_dir()})") from e
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")


@functools.cache
def available() -> bool:
  """Whether the kernels can be used in this process; logs the reason once when not."""
  try:
    load()
  except KernelUnavailable as e:
    logging.warning("faer_jax CPU kernels unavailable, using the pure-XLA convolutions: %s", e)
    return False
  return True
