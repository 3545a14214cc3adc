"""Mesh and shardings on 8 simulated devices, and a real two-process run over loopback."""

import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import faer_jax
from faer_jax import sharding


def test_create_mesh_shapes():
  assert jax.device_count() == 8, "conftest.py should simulate 8 CPU devices"
  assert dict(sharding.create_mesh().shape) == {"data": 8, "fsdp": 1}
  assert dict(sharding.create_mesh(fsdp=2).shape) == {"data": 4, "fsdp": 2}
  with pytest.raises(ValueError, match="fsdp=3"):
    sharding.create_mesh(fsdp=3)


def test_make_global_batch_splits_the_batch_over_both_axes():
  mesh = sharding.create_mesh(fsdp=2)
  local = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "label": np.arange(16)}
  batch = sharding.make_global_batch(local, mesh)
  assert batch["image"].shape == (16, 3)
  assert batch["image"].sharding.spec == P(("data", "fsdp"))
  assert {s.data.shape for s in batch["image"].addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(batch["label"], local["label"])
  assert sharding.local_batch_size(16, mesh) == 16
  with pytest.raises(ValueError, match="multiple"):
    sharding.local_batch_size(12, mesh)


def _abstract_state():
  f32 = jnp.float32
  return {
      "params": {
          "kernel": jax.ShapeDtypeStruct((3, 3, 64, 512), f32),  # largest dim 512 splits
          "dense": jax.ShapeDtypeStruct((1024, 130), f32),
          "odd": jax.ShapeDtypeStruct((257, 129), f32),  # large, but no dimension divides by 4
          "bias": jax.ShapeDtypeStruct((512,), f32),  # small: replicated
      },
      "step": jax.ShapeDtypeStruct((), jnp.int32),
  }


def test_state_shardings_replicated_and_fsdp():
  mesh = sharding.create_mesh(fsdp=4)
  abstract = _abstract_state()
  replicated = sharding.state_shardings(abstract, mesh, fsdp=False)
  assert all(s.spec == P() for s in jax.tree.leaves(replicated))

  fsdp = sharding.state_shardings(abstract, mesh, fsdp=True)
  assert fsdp["params"]["kernel"].spec == P(None, None, None, "fsdp")
  assert fsdp["params"]["dense"].spec == P("fsdp", None)
  assert fsdp["params"]["odd"].spec == P()
  assert fsdp["params"]["bias"].spec == P()
  assert fsdp["step"].spec == P()

  # The shardings build the state directly in place and a jitted step runs with them.
  init = jax.jit(lambda: jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), abstract), out_shardings=fsdp)
  state = init()
  shard_shapes = {s.data.shape for s in state["params"]["kernel"].addressable_shards}
  assert shard_shapes == {(3, 3, 64, 128)}
  total = jax.jit(lambda s: sum(jnp.sum(x) for x in jax.tree.leaves(s["params"])))(state)
  assert total == 3 * 3 * 64 * 512 + 1024 * 130 + 257 * 129 + 512


def test_maybe_initialize_distributed_does_nothing_on_a_plain_machine(monkeypatch):
  for var in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
              "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(sharding, "_detected_cluster", lambda: None)
  assert sharding.maybe_initialize_distributed() is False
  with pytest.raises(ValueError, match="all of"):
    sharding.maybe_initialize_distributed(coordinator_address="127.0.0.1:1234")


def test_detected_cluster_reads_launcher_environments(monkeypatch):
  monkeypatch.setattr(faer_jax, "has_tpu_hardware", lambda: False)
  for var in list(os.environ):
    if var.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_")):
      monkeypatch.delenv(var)
  assert sharding._detected_cluster() is None
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
           "SLURM_LOCALID": "0"}
  for k, v in slurm.items():
    monkeypatch.setenv(k, v)
  assert sharding._detected_cluster() is None  # one task: nothing to coordinate
  monkeypatch.setenv("SLURM_NTASKS", "2")
  assert sharding._detected_cluster() == "Slurm"


# Each process: 2 CPU devices, its half of a 16-row batch, the same jitted reductions.
_WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from faer_jax import sharding
    port, pid = sys.argv[1], int(sys.argv[2])
    assert sharding.maybe_initialize_distributed(f"127.0.0.1:{port}", 2, pid)
    import numpy as np, jax.numpy as jnp
    mesh = sharding.create_mesh(fsdp=2)
    full = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    rows = sharding.local_batch_size(16, mesh)
    batch = sharding.make_global_batch({"x": full[pid * rows:(pid + 1) * rows]}, mesh)
    out = jax.jit(lambda b: {"sum": jnp.sum(b["x"]), "weighted": jnp.sum(jnp.arange(16.0) @ b["x"])},
                  out_shardings=sharding.replicated(mesh))(batch)
    print(json.dumps({"devices": jax.device_count(), "shape": list(batch["x"].shape),
                      **{k: float(v) for k, v in out.items()}}))
""")


def test_two_processes_assemble_the_same_global_batch_as_one(run_two_processes):
  results = [json.loads(out.strip().splitlines()[-1]) for out in run_two_processes(_WORKER)]

  # The same computation in this single process on 8 devices.
  mesh = sharding.create_mesh()
  full = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  batch = sharding.make_global_batch({"x": full}, mesh)
  one = {"sum": float(jnp.sum(batch["x"])), "weighted": float(jnp.sum(jnp.arange(16.0) @ batch["x"]))}
  assert one == {"sum": float(full.sum()), "weighted": float((np.arange(16.0) @ full).sum())}
  for result in results:
    assert result["devices"] == 4 and result["shape"] == [16, 3]
    assert result["sum"] == one["sum"]
    assert result["weighted"] == one["weighted"]  # rows arrive in process order
