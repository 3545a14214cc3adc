"""JAX's persistent compilation cache for the command-line tools.

A run that starts again (a resume after preemption, an evaluation of the run
just trained, the next demo) compiles the same programs as the last one: the
parameter initialisation alone takes ~12 s to compile on two CPU cores, the
training step tens of seconds to minutes on an accelerator. With the cache the
compiled programs are read back from disk instead.

  FAER_JAX_COMPILATION_CACHE   unset: ~/.cache/faer_jax/compiled; a folder; 0
                               (or empty): no cache.
  JAX_COMPILATION_CACHE_DIR    set: JAX's own setting wins, as do all of JAX's
                               cache options (jax.config, JAX_* variables).

The folder is capped at 2 GiB, least recently used entries going first
(`jax_compilation_cache_max_size`; JAX_COMPILATION_CACHE_MAX_SIZE overrides).
JAX's eviction needs the access-time file it writes beside each entry when
capped; in a folder that an uncapped cache wrote to (the test suite's
~/.cache/faer_jax/jax, say) every write would fail on the entries without one,
so there the cap is left off.
Programs that call the CPU kernels on several devices of one process hit too:
custom_partitioning's per-process callback address is left out of their keys
(`jax_remove_custom_partitioning_ptr_from_cache_key`), which is safe for
faer_jax's programs because each kernel call carries what its callbacks build
into the program (faer_jax.kernels.partition). (In a multi-process run only
process 0 gains: JAX writes entries from process 0 alone, and on the CPU each
process's programs have keys of their own.) Call `enable()` before the first
compilation, in a process that runs faer_jax's programs.
"""

import importlib.util
import os

import jax

ENV = "FAER_JAX_COMPILATION_CACHE"
DEFAULT_DIR = os.path.join("~", ".cache", "faer_jax", "compiled")
DEFAULT_MAX_BYTES = 2 << 30


def enable() -> str | None:
  """Turns the cache on as the environment says; returns its folder, or None when it is off."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _keys_without_callback_addresses()
    return os.environ["JAX_COMPILATION_CACHE_DIR"]  # JAX reads it, and its other options, itself
  path = os.environ.get(ENV, DEFAULT_DIR)
  if path in ("", "0"):
    return None
  _keys_without_callback_addresses()
  path = os.path.expanduser(path)
  if ("JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ and importlib.util.find_spec("filelock")  # evictions lock
      and not _has_uncapped_entries(path)):
    jax.config.update("jax_compilation_cache_max_size", DEFAULT_MAX_BYTES)
  jax.config.update("jax_compilation_cache_dir", path)
  return path


def _keys_without_callback_addresses() -> None:
  """Leaves custom_partitioning's callback address out of cache keys (see the module docstring)."""
  jax.config.update("jax_remove_custom_partitioning_ptr_from_cache_key", True)


def _has_uncapped_entries(path: str) -> bool:
  """Whether `path` holds an entry ('KEY-cache') without the 'KEY-atime' file a capped cache writes."""
  try:
    names = set(os.listdir(path))
  except OSError:
    return False
  return any(n.endswith("-cache") and n[:-len("-cache")] + "-atime" not in names for n in names)
