"""Checkpoints: round trip with the data iterator, best/latest, retention, resharding, killed saves."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from faer_jax import checkpoint, optim, sharding


def _mesh(num_devices: int, fsdp: int) -> Mesh:
  devices = np.array(jax.devices()[:num_devices]).reshape(num_devices // fsdp, fsdp)
  return Mesh(devices, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 2)


def _make_state(mesh: Mesh):
  """A train state like the loop's: params, optimizer state, centers, rng key, step; FSDP-sharded."""
  params = {"backbone": {"kernel": jnp.arange(64 * 256, dtype=jnp.float32).reshape(64, 256) / 1000},
            "head": {"kernel": jnp.ones((256, 7)), "bias": jnp.zeros((7,))}}
  config = optim.default_config()
  config.update(grad_clip_norm=1.0, decay_all_params=False)  # every kind of optax state node
  tx, _ = optim.create_optimizer(config, steps_per_epoch=10)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  _, opt_state = tx.update(grads, opt_state, params)  # non-trivial moments and count
  state = {"params": params, "opt_state": opt_state, "centers": jnp.arange(7 * 256.0).reshape(7, 256),
           "rng": jax.random.key(42), "step": jnp.int32(3)}
  shardings = sharding.state_shardings(state, mesh, fsdp=True, min_size=1024)
  return jax.device_put(state, shardings)


def _abstract(state, mesh: Mesh):
  shardings = sharding.state_shardings(state, mesh, fsdp=True, min_size=1024)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def _assert_state_equal(restored, expected):
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  np.testing.assert_array_equal(jax.random.key_data(restored["rng"]), jax.random.key_data(expected["rng"]))
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    if not jnp.issubdtype(want.dtype, jax.dtypes.prng_key):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _data_iterator():
  return iter(grain.MapDataset.range(100).shuffle(seed=7).batch(4).to_iter_dataset())


def test_round_trip_with_data_iterator(tmp_path):
  mesh = _mesh(8, fsdp=8)
  state = _make_state(mesh)
  data = _data_iterator()
  for _ in range(3):
    next(data)
  manager = checkpoint.CheckpointManager(tmp_path / "checkpoints")
  assert manager.save(3, state, data, metrics={"accuracy": np.float32(0.5)}, metadata={"epoch": 1})
  expected_batches = [next(data) for _ in range(2)]  # advancing after save() must not leak into it
  manager.wait_until_finished()
  manager.close()

  reopened = checkpoint.CheckpointManager(tmp_path / "checkpoints")
  fresh = _data_iterator()
  restored = reopened.restore("latest", _abstract(state, mesh), data_iterator=fresh)
  assert restored.step == 3
  assert restored.metadata == {"epoch": 1, "metrics": {"accuracy": 0.5}}
  _assert_state_equal(restored.state, state)
  kernel = restored.state["params"]["backbone"]["kernel"]
  assert kernel.sharding.spec == state["params"]["backbone"]["kernel"].sharding.spec == P(None, "fsdp")
  for want in expected_batches:
    np.testing.assert_array_equal(next(fresh), want)
  # The same step, restored without the iterator (e.g. for evaluation).
  assert reopened.restore(3, _abstract(state, mesh)).step == 3
  with pytest.raises(FileNotFoundError):
    reopened.restore(4, _abstract(state, mesh))
  reopened.close()


@pytest.mark.parametrize("best_mode,values,best", [("max", [0.5, 0.9, 0.6, 0.7, 0.65], 2),
                                                   ("min", [0.5, 0.1, 0.6, 0.7, 0.65], 2),
                                                   ("max", [0.1, 0.2, 0.3, 0.4, 0.5], 5)])
def test_latest_and_best_are_kept(tmp_path, best_mode, values, best):
  state = {"w": jnp.zeros(3)}
  manager = checkpoint.CheckpointManager(tmp_path, max_to_keep=2, best_metric="loss", best_mode=best_mode)
  for step, value in enumerate(values, start=1):
    manager.save(step, state, metrics={"loss": value, "accuracy": 0.0})
  manager.wait_until_finished()
  assert manager.all_steps() == sorted({best, 4, 5})
  assert manager.latest_step() == 5
  assert manager.best_step() == best
  manager.close()
  reopened = checkpoint.CheckpointManager(tmp_path, best_metric="loss", best_mode=best_mode)
  assert reopened.best_step() == best  # metrics are read back from disk
  restored = reopened.restore("best", jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                                   sharding=x.sharding), state))
  assert restored.step == best and restored.metadata["metrics"]["loss"] == values[best - 1]
  reopened.close()


def test_steps_without_metrics_are_not_deleted_as_worst(tmp_path):
  state = {"w": jnp.zeros(3)}
  manager = checkpoint.CheckpointManager(tmp_path, max_to_keep=2)
  manager.save(1, state, metrics={"accuracy": 0.9})
  for step in (2, 3, 4):
    manager.save(step, state)  # periodic saves, not evaluated
    manager.wait_until_finished()
    assert step in manager.all_steps()
  assert manager.all_steps() == [1, 3, 4]  # 2 aged out of the latest two; 1 is the best
  manager.save(5, state, metrics={"accuracy": 0.1})  # the worst, but the latest
  manager.wait_until_finished()
  assert manager.all_steps() == [1, 4, 5]
  assert manager.best_step() == 1
  manager.close()


def test_keep_best_false_keeps_only_the_latest(tmp_path):
  manager = checkpoint.CheckpointManager(tmp_path, max_to_keep=1, keep_best=False, async_save=False)
  manager.save(1, {"w": jnp.zeros(3)}, metrics={"accuracy": 0.9})
  manager.save(2, {"w": jnp.zeros(3)}, metrics={"accuracy": 0.1})
  assert manager.all_steps() == [2]
  manager.close()


def test_save_interval_force_and_repeated_steps(tmp_path):
  state = {"w": jnp.zeros(3)}
  manager = checkpoint.CheckpointManager(tmp_path, save_interval_steps=2, async_save=False)
  assert not manager.save(1, state)
  assert manager.save(2, state)
  assert manager.save(3, state, force=True)
  assert not manager.save(3, state, force=True)  # already saved: a no-op, not an error
  with pytest.raises(ValueError, match="best_metric"):
    manager.save(4, state, metrics={"loss": 1.0})
  assert manager.all_steps() == [2, 3]
  manager.close()


@pytest.mark.parametrize("num_devices,fsdp", [(1, 1), (2, 2), (2, 1)])
def test_restore_saved_on_8_devices_onto_fewer(tmp_path, num_devices, fsdp):
  state = _make_state(_mesh(8, fsdp=8))
  manager = checkpoint.CheckpointManager(tmp_path)
  manager.save(3, state)
  manager.wait_until_finished()

  target = _mesh(num_devices, fsdp)
  restored = manager.restore(3, _abstract(state, target)).state
  _assert_state_equal(restored, state)
  kernel = restored["params"]["backbone"]["kernel"]
  assert kernel.sharding.mesh.devices.size == num_devices
  assert {s.data.shape for s in kernel.addressable_shards} == {(64, 256 // fsdp)}
  manager.close()


def test_one_process_saves_replicated_arrays_without_compiling(tmp_path):
  """In one process a replicated array is written whole: no per-replica slices, each an XLA program."""
  mesh = _mesh(8, fsdp=2)
  # Shapes no other test saves (a slice program compiled earlier in this worker would not count).
  state = {f"w{i}": jax.device_put(jnp.full((8 * (i + 3), 5), float(i)), NamedSharding(mesh, P()))
           for i in range(4)}
  compiles = []
  listener = lambda event, duration, **kwargs: compiles.append(event) if "backend_compile" in event else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    manager = checkpoint.CheckpointManager(tmp_path)
    manager.save(1, state)
    manager.wait_until_finished()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []
  restored = manager.restore(1, state).state
  for name, array in state.items():
    np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(array))
  manager.close()


def test_restore_target_needs_shardings(tmp_path):
  manager = checkpoint.CheckpointManager(tmp_path, async_save=False)
  manager.save(1, {"w": jnp.zeros(3)})
  with pytest.raises(ValueError, match="sharding"):
    manager.restore(1, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
  manager.close()


def test_unfinished_save_is_ignored_and_cleaned_up(tmp_path):
  state = {"w": jnp.arange(3.0)}
  manager = checkpoint.CheckpointManager(tmp_path)
  manager.save(1, state)
  manager.save(2, {"w": jnp.arange(3.0) + 2})
  manager.close()
  # What a process killed while writing step 3 leaves: Orbax's temporary
  # directory, never renamed, here with an item missing.
  debris = tmp_path / "3.orbax-checkpoint-tmp"
  shutil.copytree(tmp_path / "2", debris)
  shutil.rmtree(debris / "meta")

  reopened = checkpoint.CheckpointManager(tmp_path)
  assert reopened.all_steps() == [1, 2]
  assert reopened.latest_step() == 2
  restored = reopened.restore("latest", {"w": jax.ShapeDtypeStruct((3,), jnp.float32,
                                                                    sharding=state["w"].sharding)})
  np.testing.assert_array_equal(restored.state["w"], [2.0, 3.0, 4.0])
  assert reopened.save(3, state, force=True)  # and training goes on from there
  reopened.close()
  # The debris is deleted in the background, at the latest before the next save.
  assert not debris.exists()
  assert sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit()) == ["1", "2", "3"]


# Saves step 1, starts an asynchronous save of a large step 2, and dies by SIGKILL
# as soon as step 2's temporary directory exists (killing right after save()
# returned could land before Orbax had created it, on a busy machine).
_KILLED_SAVER = textwrap.dedent("""
    import os, pathlib, signal, sys, time
    import jax.numpy as jnp
    from faer_jax import checkpoint
    manager = checkpoint.CheckpointManager(sys.argv[1])
    manager.save(1, {"w": jnp.ones((8, 1024, 1024))})
    manager.wait_until_finished()
    manager.save(2, {"w": jnp.full((8, 1024, 1024), 2.0)})
    tmp, deadline = pathlib.Path(sys.argv[1]) / "2.orbax-checkpoint-tmp", time.monotonic() + 30
    while not tmp.exists() and time.monotonic() < deadline:
      time.sleep(0.0005)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_sigkill_during_save_keeps_the_previous_step(tmp_path):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _KILLED_SAVER, str(tmp_path)], env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert (tmp_path / "2.orbax-checkpoint-tmp").exists(), "the kill should land during the write of step 2"
  manager = checkpoint.CheckpointManager(tmp_path)
  assert manager.all_steps() == [1]
  w = jax.ShapeDtypeStruct((8, 1024, 1024), jnp.float32, sharding=NamedSharding(_mesh(1, 1), P()))
  assert float(jnp.min(manager.restore("latest", {"w": w}).state["w"])) == 1.0
  manager.close()


# Two processes × 2 devices restore a step written by one process on 8 devices
# (FSDP over 4), then write a step together that this process reads back.
_TWO_PROCESS_RESTORE = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from faer_jax import checkpoint, optim, sharding
    port, pid, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sharding.maybe_initialize_distributed(f"127.0.0.1:{port}", 2, pid)
    import jax.numpy as jnp
    mesh = sharding.create_mesh(fsdp=4)
    abstract = {"w": jax.ShapeDtypeStruct((16, 512), jnp.float32), "step": jax.ShapeDtypeStruct((), jnp.int32)}
    shardings = sharding.state_shardings(abstract, mesh, fsdp=True, min_size=1024)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    manager = checkpoint.CheckpointManager(directory)
    state = manager.restore("latest", abstract).state
    total = jax.jit(lambda w: jnp.sum(w * jnp.arange(512.0)), out_shardings=sharding.replicated(mesh))(state["w"])
    new = jax.jit(lambda s: {"w": s["w"] + 1, "step": s["step"] + 1}, out_shardings=shardings)(state)
    manager.save(2, new, metrics={"accuracy": 0.5})
    manager.close()
    print(json.dumps({"spec": str(state["w"].sharding.spec), "total": float(total)}))
""")


def test_restore_across_process_counts(tmp_path, run_two_processes):
  w = jnp.arange(16 * 512, dtype=jnp.float32).reshape(16, 512) / 100
  mesh8 = _mesh(8, fsdp=8)
  manager = checkpoint.CheckpointManager(tmp_path)
  manager.save(1, {"w": jax.device_put(w, NamedSharding(mesh8, P(None, "fsdp"))), "step": jnp.int32(1)})
  manager.close()

  outputs = run_two_processes(_TWO_PROCESS_RESTORE, str(tmp_path))
  expected_total = float(jnp.sum(w * jnp.arange(512.0)))
  for out in outputs:
    result = json.loads(out.strip().splitlines()[-1])
    assert result["spec"] == str(P(None, "fsdp"))
    np.testing.assert_allclose(result["total"], expected_total, rtol=1e-6)

  reopened = checkpoint.CheckpointManager(tmp_path)
  assert reopened.latest_step() == 2 and reopened.best_step() == 2
  one_device = NamedSharding(_mesh(1, 1), P())
  restored = reopened.restore(2, {"w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=one_device),
                                  "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=one_device)}).state
  np.testing.assert_array_equal(restored["w"], w + 1)
  assert int(restored["step"]) == 2
  reopened.close()
