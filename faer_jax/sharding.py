"""Mesh, shardings and global batches: the same code on one CPU, eight devices or a pod.

The mesh has two axes, ('data', 'fsdp'). The batch is split over both (every
device holds different examples). Parameters and optimizer state are
replicated, or, with FSDP, their large arrays are split along 'fsdp' and
gathered by XLA where a computation needs them whole.

Each process loads only its share of every batch (host-local numpy from
grain); `make_global_batch` stitches the shares into global arrays.
"""

import math
import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

import faer_jax

PyTree = Any

MESH_AXES = ("data", "fsdp")
# Arrays smaller than this stay replicated under FSDP: splitting a bias or a
# norm scale saves nothing and adds a collective per use.
MIN_SIZE_TO_SHARD = 2**14


def _detected_cluster() -> str | None:
  """Names the multi-process launcher that `jax.distributed.initialize()` can read, if any.

  Mirrors the environments JAX auto-detects (jax/_src/clusters), restricted
  to launches of more than one process, so that a plain `python -m ...` on a
  workstation (or a one-task Slurm job) never waits for a coordinator.
  """
  env = os.environ
  slurm_vars = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(v in env for v in slurm_vars) and int(env["SLURM_NTASKS"]) > 1:
    return "Slurm"
  if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "Open MPI"
  tpu_hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if "," in tpu_hosts or "MEGASCALE_COORDINATOR_ADDRESS" in env:
    return "TPU pod (GKE or multislice)"
  # A Cloud TPU VM: JAX asks the metadata server for the pod's workers, and a
  # single-host slice initializes as one process.
  if faer_jax.has_tpu_hardware():
    return "Cloud TPU VM"
  return None


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """Starts `jax.distributed` when this is one process of several; must run before any JAX computation.

  Args:
    coordinator_address: 'host:port' of process 0, from --coordinator_address.
    num_processes: number of processes, from --num_processes.
    process_id: this process's index, from --process_id.

  Returns:
    True if the distributed system is (now) initialized, False on a single
    machine without a cluster launcher, where nothing is done.

  Raises:
    ValueError: if only some of the three flags are given.
  """
  if jax.distributed.is_initialized():
    return True
  flags = (coordinator_address, num_processes, process_id)
  if any(f is not None for f in flags):
    if any(f is None for f in flags):
      raise ValueError("Give all of --coordinator_address, --num_processes and --process_id, or none "
                       f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r}).")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  cluster = _detected_cluster()
  if cluster is None:
    return False
  logging.info("Running under %s: initializing jax.distributed from the environment.", cluster)
  jax.distributed.initialize()
  return True


def create_mesh(fsdp: int = 1, devices=None) -> Mesh:
  """A ('data', 'fsdp') mesh over every device of every process (or over `devices`).

  'fsdp' is the inner axis, so an FSDP group is made of neighbouring devices
  (the same host, the fastest links).

  Args:
    fsdp: size of the 'fsdp' axis; 1 gives pure data parallelism.
    devices: the devices to lay out, e.g. a TPU topology's from
      `jax.experimental.topologies` to compile for hardware this machine does
      not have; None: jax.devices().

  Returns:
    The mesh, of shape (number of devices // fsdp, fsdp).
  """
  n = len(devices) if devices is not None else jax.device_count()
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"fsdp={fsdp} must divide the number of devices ({n}).")
  # Auto axes: shardings are given at jit boundaries and XLA propagates them
  # inside. jax.make_mesh now defaults to Explicit axes, which would require
  # sharding annotations in the model code.
  return jax.make_mesh((n // fsdp, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over all devices; other dimensions whole."""
  return NamedSharding(mesh, P(MESH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device."""
  return NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
  """Splits the largest dimension divisible by the 'fsdp' size, if the array is large enough."""
  if math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_state: PyTree, mesh: Mesh, fsdp: bool,
                    min_size: int = MIN_SIZE_TO_SHARD) -> PyTree:
  """Shardings for a train state (parameters, optimizer state, centers, rng, step).

  Args:
    abstract_state: the state's pytree of arrays or `jax.ShapeDtypeStruct`s
      (e.g. from `jax.eval_shape`).
    mesh: a mesh from `create_mesh`.
    fsdp: False replicates everything. True splits each array of at least
      `min_size` elements along 'fsdp', on its largest dimension divisible by
      the axis size (arrays with none stay replicated). Adam's moments have
      their parameter's shape, so they get the same split.
    min_size: the smallest array that FSDP splits.

  Returns:
    A pytree of `NamedSharding` with the structure of `abstract_state`, fit for
    `jax.jit(..., out_shardings=...)` and for restoring a checkpoint.
  """
  fsdp_size = mesh.shape["fsdp"]

  def sharding(leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    if not fsdp or fsdp_size == 1:
      return replicated(mesh)
    return NamedSharding(mesh, _fsdp_spec(shape, fsdp_size, min_size))

  return jax.tree.map(sharding, abstract_state)


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """This process's share of a global batch, which must split evenly over all devices."""
  if global_batch_size % mesh.size:
    raise ValueError(f"batch_size={global_batch_size} must be a multiple of the number of devices ({mesh.size}).")
  return global_batch_size // jax.process_count()


def make_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the processes' host-local batches into global arrays split over the mesh.

  Every process calls this with its own rows, in the same step; the global
  batch is the processes' rows in process order.

  Args:
    local_batch: name -> numpy array whose leading dimension is this process's
      share of the batch (a multiple of its local device count).
    mesh: a mesh from `create_mesh`.

  Returns:
    name -> `jax.Array` of leading dimension local size × process count,
    sharded with `batch_sharding(mesh)`.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
