"""Checkpoints: train state, data iterator and metadata together, in one Orbax step.

A step directory `<workdir>/checkpoints/<step>/` holds three items:

  state/          the train state pytree (parameters, optimizer state, centers,
                  rng key, step), as sharded arrays
  data_iterator/  the grain iterator's position, one JSON file per process
  meta/           JSON: {'metrics': {...} or None, plus the caller's metadata}

Saving them in one step is what makes resumption exact: the iterator state is
the one that produced the saved parameters. Orbax writes each step into a
temporary directory and renames it when every item is complete, so a process
killed mid-save leaves the previous steps intact and an `*.orbax-checkpoint-tmp*`
directory that is ignored (and deleted when a manager next opens the folder).

Retention: the latest `max_to_keep` steps, plus the best step by
`metrics[best_metric]`. A step saved without metrics is never judged worst;
it goes only when `max_to_keep` newer steps exist.
"""

import dataclasses
import logging
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

try:  # Where typed PRNG keys' metadata is kept; Orbax's own array handler has one.
  from orbax.checkpoint._src.metadata import array_metadata_store as _array_metadata_store
except ImportError:  # moved in another Orbax version: keep Orbax's default handler
  _array_metadata_store = None

PyTree = Any
# A grain iterator: DatasetIterator (from `IterDataset`) or DataLoaderIterator.
DataIterator = Any


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `CheckpointManager.restore` returns.

  Attributes:
    step: the restored step.
    state: the train state, with the target shardings.
    metadata: the saved JSON: 'metrics' (None if saved without) and whatever
      `metadata` was given to `save` (e.g. 'epoch').
  """

  step: int
  state: PyTree
  metadata: dict[str, Any]


class _WithoutMetricsIsIntended(logging.Filter):
  """Drops Orbax's warning for a step saved without metrics: between evaluations that is how steps are saved."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_WithoutMetricsIsIntended())


def _to_json(value: Any) -> Any:
  """Scalars (Python, numpy or jax) to floats and ints, arrays to lists."""
  return np.asarray(value).tolist()


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """The train state's handler: Orbax's own, but in one process each array is written whole.

  Orbax's default on CPU and TPU is 'replica-parallel' saving: every
  replicated array is cut into one slice per replica and each replica writes
  its slice. Across hosts that spreads the writing; in one process it only
  adds work, and a lot of it at the first save: each slice is its own small
  XLA computation, compiled per shape and device (FAER-tiny's train state,
  replicated on 8 CPU devices: first save 17.9 s with it, 1.9 s without;
  later saves 4.7 s and 1.8 s). Orbax itself turns it off on GPU.
  Multi-process jobs keep Orbax's choice. The files are the same either way.
  """
  if jax.process_count() > 1 or _array_metadata_store is None:
    return ocp.PyTreeCheckpointHandler()
  arrays = ocp.type_handlers.ArrayHandler(use_replica_parallel=False,
                                          array_metadata_store=_array_metadata_store.Store())
  registry = ocp.type_handlers.create_type_handler_registry(
      *[(ty, ocp.type_handlers.get_type_handler(ty)) for ty in ocp.type_handlers.supported_types()
        if ty is not jax.Array], (jax.Array, arrays))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
  """A restore target for one leaf: it must say where the restored array goes."""
  if isinstance(leaf, jax.ShapeDtypeStruct):
    target = leaf
  else:
    target = ocp.utils.to_shape_dtype_struct(leaf)
  if getattr(target, "sharding", None) is None:
    raise ValueError(f"Restore target {target} has no sharding; build the abstract state with "
                     "jax.ShapeDtypeStruct(shape, dtype, sharding=...) (see sharding.state_shardings).")
  return target


class CheckpointManager:
  """Saves and restores (state, data iterator, metadata) steps in one directory.

  All processes of a multi-process job call every method, in the same order.
  """

  def __init__(self, directory: str | epath.PathLike, *, max_to_keep: int | None = 3,
               best_metric: str = "accuracy", best_mode: str = "max", keep_best: bool = True,
               save_interval_steps: int = 1, async_save: bool = True):
    """Opens (creating if needed) the checkpoint directory.

    Args:
      directory: where steps are written, e.g. `<workdir>/checkpoints`.
      max_to_keep: how many of the latest steps to keep; None keeps all.
      best_metric: the validation metric that ranks steps (a key of the
        `metrics` given to `save`).
      best_mode: 'max' if a larger `best_metric` is better, else 'min'.
      keep_best: also keep the best step when it is older than the latest
        `max_to_keep`.
      save_interval_steps: `save` writes only at multiples of this, unless
        forced (or at a JAX-detected preemption sync point).
      async_save: write in a background thread; `save` returns once the arrays
        are copied off the devices, and the next `save`, `wait_until_finished`
        or `close` waits for the write.
    """
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}.")
    self.best_metric = best_metric
    best_fn = lambda metrics: metrics[best_metric]  # noqa: E731
    preserve = [policies.LatestN(n=max_to_keep)]
    if keep_best:
      # keep_checkpoints_without_metrics=False: BestN keeps only the best of the
      # steps with metrics; LatestN above protects the recent steps without.
      preserve.append(policies.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
                                     keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        # Orbax's default policy also saves the first step of a fresh run
        # whatever the interval; a fixed interval is easier to reason about.
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_interval_steps),
            policies.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=policies.AnyPreservationPolicy(preserve),
        best_fn=best_fn,  # ranks steps for best_step(); retention is `preserve`
        best_mode=best_mode,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    registry = ocp.DefaultCheckpointHandlerRegistry()
    state_handler = _state_handler()
    registry.add("state", ocp.args.PyTreeSave, state_handler)
    registry.add("state", ocp.args.PyTreeRestore, state_handler)
    self._manager = ocp.CheckpointManager(epath.Path(directory), options=options, handler_registry=registry)

  @property
  def directory(self) -> epath.Path:
    return self._manager.directory

  def save(self, step: int, state: PyTree, data_iterator: DataIterator | None = None, *,
           metrics: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None,
           force: bool = False) -> bool:
    """Saves one step, if the interval (or `force`) says so.

    Call it before the iterator yields the next batch: the iterator's state is
    read now, synchronously, even when the arrays are written asynchronously.

    Args:
      step: the step number, usually the number of updates done.
      state: the train state pytree of jax arrays.
      data_iterator: the grain iterator feeding training, or None.
      metrics: validation metrics of this step (must contain `best_metric`),
        or None when the step was not evaluated.
      metadata: other JSON-serialisable facts to keep, e.g. {'epoch': 3}.
      force: save even off the interval.

    Returns:
      True if a save was started; False if skipped by the interval or because
      this step is already saved (the loop may reach a step twice, e.g. a
      periodic save followed by the final one).
    """
    if step in self._manager.all_steps():
      return False
    if metrics is not None:
      if self.best_metric not in metrics:
        raise ValueError(f"metrics must contain best_metric {self.best_metric!r}; got {sorted(metrics)}.")
      metrics = {name: _to_json(value) for name, value in metrics.items()}
    metadata = {name: _to_json(value) for name, value in (metadata or {}).items()}
    if "metrics" in metadata:
      raise ValueError("Pass metrics as `metrics=`, not inside `metadata`.")
    items = {"state": ocp.args.PyTreeSave(state), "meta": ocp.args.JsonSave({**metadata, "metrics": metrics})}
    if data_iterator is not None:
      items["data_iterator"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

  def restore(self, step: int | str, abstract_state: PyTree,
              data_iterator: DataIterator | None = None, *, partial: bool = False) -> Restored:
    """Restores a step onto the shardings of `abstract_state`.

    The target shardings may differ from the ones the step was saved with (a
    different device count, process count or FSDP split): each process reads
    the parts of the arrays its devices hold.

    Args:
      step: a step number, 'latest' or 'best'.
      abstract_state: the state's structure as `jax.ShapeDtypeStruct`s carrying
        `sharding=` (or arrays, whose shardings are used).
      data_iterator: a fresh grain iterator over the same pipeline, moved in
        place to the saved position; None skips it (evaluation, or a different
        process count: grain's iterator state is per process).
      partial: read only the entries of the saved state that `abstract_state`
        names (evaluation reads the parameters, not the optimizer state);
        otherwise the two trees must match.

    Returns:
      The step, the restored state and the saved metadata.

    Raises:
      FileNotFoundError: if there is no such step.
    """
    if step == "latest":
      resolved = self.latest_step()
    elif step == "best":
      resolved = self.best_step()
    else:
      resolved = int(step)  # also accepts '1200' from a command line
    if resolved is None or resolved not in self._manager.all_steps():
      raise FileNotFoundError(f"No checkpoint {step!r} in {self.directory} (steps: {self.all_steps()}).")
    target = jax.tree.map(_abstract, abstract_state)
    items = {"state": ocp.args.PyTreeRestore(target, ocp.checkpoint_utils.construct_restore_args(target),
                                             partial_restore=partial),
             "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
      items["data_iterator"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(resolved, args=ocp.args.Composite(**items))
    return Restored(step=resolved, state=restored["state"], metadata=restored["meta"])

  def all_steps(self) -> list[int]:
    """The saved steps (including one still being written), ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest step, or None if there is none."""
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the best `best_metric`, or None if no step has metrics."""
    return self._manager.best_step()

  def wait_until_finished(self) -> None:
    """Blocks until an asynchronous save has been written and committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending writes and releases the manager's threads."""
    self._manager.close()
