"""The command-line tools' persistent compilation cache (faer_jax.compile_cache), in fresh processes."""

import json
import os
import subprocess
import sys

import pytest

# Each test starts fresh Python processes that compile: `make test-fast` leaves them out.
pytestmark = pytest.mark.slow

_PROGRAM = """
import json
from faer_jax import compile_cache
where = compile_cache.enable()
import jax, jax.numpy as jnp
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name.rsplit("/", 1)[-1]))
jax.jit(lambda x: jnp.sin(x) @ x.T).lower(jax.ShapeDtypeStruct((8, 8), jnp.float32)).compile()
print(json.dumps({"where": where, "max_size": jax.config.jax_compilation_cache_max_size,
                  "hits": events.count("cache_hits"), "misses": events.count("cache_misses")}))
"""


def _run(tmp_path, program=_PROGRAM, **env_vars):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "FAER_JAX_COMPILATION"))}
  # Every program is written, however quickly it compiled; HOME: where the default folder lands.
  env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", HOME=str(tmp_path / "home"), **env_vars)
  out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.splitlines()[-1])


def _entries(folder):
  return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_default_folder_under_home_capped(tmp_path):
  folder = str(tmp_path / "home" / ".cache" / "faer_jax" / "compiled")
  assert _run(tmp_path) == {"where": folder, "max_size": 2 << 30, "hits": 0, "misses": 1}
  assert any(name.startswith("jit_") for name in _entries(folder)), _entries(folder)
  # The same program in the next process: read back.
  assert _run(tmp_path) == {"where": folder, "max_size": 2 << 30, "hits": 1, "misses": 0}


def test_folder_from_the_environment_and_off(tmp_path):
  mine = str(tmp_path / "mine")
  assert _run(tmp_path, FAER_JAX_COMPILATION_CACHE=mine)["where"] == mine
  assert any(name.startswith("jit_") for name in _entries(mine))
  for off in ("0", ""):
    result = _run(tmp_path, FAER_JAX_COMPILATION_CACHE=off)
    assert result["where"] is None and result["hits"] == result["misses"] == 0
  assert not os.path.exists(tmp_path / "home" / ".cache")


def test_jax_own_setting_wins(tmp_path):
  theirs = str(tmp_path / "theirs")
  result = _run(tmp_path, JAX_COMPILATION_CACHE_DIR=theirs, FAER_JAX_COMPILATION_CACHE=str(tmp_path / "mine"),
                JAX_COMPILATION_CACHE_MAX_SIZE="-1")
  assert result == {"where": theirs, "max_size": -1, "hits": 0, "misses": 1}
  assert any(name.startswith("jit_") for name in _entries(theirs))
  assert not os.path.exists(tmp_path / "mine")


def test_a_folder_an_uncapped_cache_wrote_stays_uncapped_and_writable(tmp_path):
  """JAX's eviction reads every entry's access-time file: capped, every write to such a folder would fail."""
  shared = tmp_path / "shared"
  env = {"JAX_COMPILATION_CACHE_DIR": str(shared)}
  assert _run(tmp_path, **env)["misses"] == 1  # JAX's own, uncapped: entries without access times
  shared_entries = _entries(shared)
  assert shared_entries and not any(n.endswith("-atime") for n in shared_entries)
  other = _PROGRAM.replace("jnp.sin(x) @ x.T", "jnp.cos(x) @ x.T")
  for program, expected in ((other, {"hits": 0, "misses": 1}), (other, {"hits": 1, "misses": 0}),
                            (_PROGRAM, {"hits": 1, "misses": 0})):
    result = _run(tmp_path, program=program, FAER_JAX_COMPILATION_CACHE=str(shared))
    assert result == {"where": str(shared), "max_size": -1, **expected}


_SHARDED_KERNEL_PROGRAM = """
import json
import numpy as np
from faer_jax import compile_cache, kernels
compile_cache.enable()
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from faer_jax.kernels import mlp
kernels.load()
keep = KEEP
rng = np.random.default_rng(0)
c = 16
x, w1, b1, w2, b2, gamma = (rng.standard_normal(s, np.float32)
                            for s in ((4, 3, 3, c), (c, 4 * c), (4 * c,), (4 * c, c), (c,), (c,)))
mask = np.array([1, 0, 1, 1], np.float32)
mesh = Mesh(np.array(jax.devices()), ("data",))
sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
call = jax.jit(lambda x: mlp.mlp_residual(x, w1, b1, w2, b2, gamma, x, jnp.asarray(mask), keep=keep))
lowered = call.lower(sharded)
assert "CustomSPMDPartitioning" in lowered.as_text()  # partitioned by the kernels' callbacks
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name.rsplit("/", 1)[-1]))
compiled = lowered.compile()
counts = {"hits": events.count("cache_hits"), "misses": events.count("cache_misses")}
got = np.asarray(compiled(sharded))
hidden = jax.nn.gelu(x @ w1 + b1, approximate=False)
want = x + (gamma * (np.asarray(hidden) @ w2 + b2)) * mask[:, None, None, None] / keep
print(json.dumps({**counts, "max_error": float(np.max(np.abs(got - want)))}))
"""


def test_programs_with_kernels_on_several_devices_are_read_back(tmp_path, cpu_kernels):
  """The kernels' custom_partitioning callbacks put a per-process address in the program: left out of
  the key, with what the callbacks build (here the drop-path `keep`) carried in the program instead."""
  folder = str(tmp_path / "cache")
  run = lambda keep: _run(tmp_path, _SHARDED_KERNEL_PROGRAM.replace("KEEP", keep),
                          FAER_JAX_COMPILATION_CACHE=folder, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  first = run("0.75")
  assert (first["hits"], first["misses"]) == (0, 1) and first["max_error"] < 1e-4, first
  again = run("0.75")  # a new process: the callbacks have other addresses
  assert (again["hits"], again["misses"]) == (1, 0) and again["max_error"] < 1e-4, again
  other = run("0.5")  # the same program but for a static argument of the kernel: its own entry
  assert (other["hits"], other["misses"]) == (0, 1) and other["max_error"] < 1e-4, other
