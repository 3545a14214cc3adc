r"""Training and evaluation: `python -m faer_jax.train --config configs/rafdb.py --workdir DIR`.

`train_and_evaluate` reads top to bottom: mesh -> data -> model and state ->
compiled steps -> checkpoint restore -> loop. Running the same command on the
same workdir resumes from the latest checkpoint, and ends with exactly the
parameters and metrics of a run that was never stopped.

Multi-host: pass --coordinator_address, --num_processes and --process_id to
every process (or nothing, on clusters JAX detects by itself).
"""

import dataclasses
import functools
import json
import os
import signal
import sys
import time
from typing import Any, Callable

from absl import app, flags, logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from ml_collections import config_flags

from faer_jax import checkpoint, compile_cache, config_lib, cpu_memory, optim, paper_metrics, sharding, steps
from faer_jax.data import DataError, create_source, pipeline
from faer_jax.data.synth import ensure_synthetic_rafdb
from faer_jax.interop import load_torch_checkpoint
from faer_jax.metric_writer import MetricWriter, TrainWindow
from faer_jax.models import create_model

FLAGS = flags.FLAGS


def define_flags(config_help: str, workdir_help: str) -> None:
  """The command-line flags of train and evaluate; defined only by the module run as __main__."""
  config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
  flags.DEFINE_string("workdir", None, workdir_help)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")


def start_processes() -> None:
  """Quiet logs, the compilation cache, jax.distributed from the flags (or the cluster's environment); on CPU,
  keep freed memory."""
  quiet_logs()
  compile_cache.enable()
  sharding.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if jax.default_backend() == "cpu":
    # Each step's buffers are then reused instead of faulted in afresh (see cpu_memory).
    cpu_memory.keep_freed_memory()


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN or infinite loss; the message names the step."""


class Preempted(Exception):
  """SIGTERM stopped the run at a step boundary, after saving it; the same call resumes it."""


FINAL_METRICS = "final_metrics.json"  # in a finished run's workdir: the last evaluation, with its step


def create_train_model(config: ml_collections.ConfigDict, platform: str | None = None):
  """The config's model, with the layers for `platform` (None: this process's default backend)."""
  return create_model(config.model.variant, config.num_classes, drop_path_rate=config.model.drop_path_rate,
                      layer_scale_init_value=config.model.layer_scale_init_value,
                      head_init_scale=config.model.head_init_scale, dtype=jnp.dtype(config.model.dtype),
                      conv_impl=config.model.conv_impl, platform=platform,
                      cc_attention=config.model.cc_attention)


def create_data_source(config: ml_collections.ConfigDict, split: str):
  """One split of the configured dataset (the synthetic set is generated on first use)."""
  root = config.data.root
  if config.data.synthetic:
    root = str(ensure_synthetic_rafdb(root, config.data.synthetic_num_train, config.data.synthetic_num_test,
                                      seed=0))
  options: dict[str, Any] = {"skip_bad_images": config.data.skip_bad_images}
  if config.data.dataset == "affectnet":
    options.update(num_classes=config.data.affectnet_num_classes, crop_face=config.data.affectnet_crop_face)
  if config.data.dataset == "tfds":
    options["name"] = config.data.tfds_name
  source = create_source(config.data.dataset, root, split, **options)
  if len(source.class_names) != config.num_classes:
    raise ValueError(f"Bad config: num_classes={config.num_classes}, but the {config.data.dataset} {split} "
                     f"split has {len(source.class_names)} classes: {list(source.class_names)}")
  return source


@dataclasses.dataclass(frozen=True)
class Programs:
  """A config's model, optimizer and step functions on one mesh: what `train` runs, `evaluate` restores into.

  The steps are jitted with their shardings but not compiled: the first call
  compiles them, or `.lower(...)` with `abstract_batch` does it ahead of time.

  Attributes:
    model: the FAER module.
    tx: the optax optimizer; schedule: its learning rate by step.
    abstract_state: the train state's `jax.ShapeDtypeStruct`s, with shardings.
    init: rng -> a fresh train state, created where its shardings say.
    train_step: (state, batch) -> (state, metrics), the state donated.
    eval_step: (steps.eval_variables(state), batch) -> sums to add up over batches.
  """

  model: nn.Module
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: Any
  init: Callable
  train_step: Callable
  eval_step: Callable

  @property
  def state_sharding(self):
    return jax.tree.map(lambda a: a.sharding, self.abstract_state)


def build_programs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, steps_per_epoch: int,
                   platform: str | None = None) -> Programs:
  """The model, the state's shapes and shardings, and the jitted steps of `config` over `mesh`.

  The model's layers are chosen for `platform`, by default that of the mesh's
  devices: a mesh over a TPU topology or GPUs gives the programs those devices
  run. (`platform='cuda'` with a CPU mesh: the programs to export for CUDA.)
  """
  model = create_train_model(config, platform or mesh.devices.flat[0].platform)
  tx, schedule = optim.create_optimizer(config.optimizer, steps_per_epoch)
  init = functools.partial(steps.create_train_state, model=model, tx=tx, config=config)
  shapes = jax.eval_shape(init, jax.random.key(config.seed))
  state_sharding = sharding.state_shardings(shapes, mesh, fsdp=config.fsdp > 1)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                                state_sharding)
  batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  train_step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, config=config, schedule=schedule),
                       in_shardings=(state_sharding, batch), out_shardings=(state_sharding, replicated),
                       donate_argnums=0)
  eval_step = jax.jit(functools.partial(steps.eval_step, model=model, config=config),
                      in_shardings=(steps.eval_variables(state_sharding), batch), out_shardings=replicated)
  return Programs(model, tx, schedule, abstract_state, jax.jit(init, out_shardings=state_sharding), train_step,
                  eval_step)


def abstract_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, batch_size: int,
                   train: bool = True) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes of a global batch as the pipeline yields it (`train=False` adds the eval mask)."""
  sharded = sharding.batch_sharding(mesh)
  label_shape = (batch_size,) if config.task == "fer" else (batch_size, config.num_classes)
  batch = {"image": jax.ShapeDtypeStruct((batch_size, config.image_size, config.image_size, 3), jnp.float32,
                                         sharding=sharded),
           "label": jax.ShapeDtypeStruct(label_shape, jnp.int32, sharding=sharded)}
  if not train:
    batch["mask"] = jax.ShapeDtypeStruct((batch_size,), jnp.bool_, sharding=sharded)
  return batch


def _load_pretrained(path: str, model, params, params_sharding):
  """params with the tensors of a PyTorch checkpoint; the rest (CC Attention, head) as initialised."""
  host = jax.experimental.multihost_utils.process_allgather(params, tiled=True)
  loaded = load_torch_checkpoint(path, model, variables={"params": host})["params"]
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: np.asarray(x)[idx]),
                      loaded, params_sharding)


class _Preemption:
  """SIGTERM (pre-emption) -> save and exit cleanly at the next step boundary."""

  def __init__(self):
    self._requested = False
    # Multi-process jobs use JAX's coordination service, which catches SIGTERM
    # itself and lets all processes agree on the step to stop at.
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    self._requested = True

  def requested(self, step: int) -> bool:
    if jax.process_count() > 1:
      return jax.experimental.multihost_utils.reached_preemption_sync_point(step)
    return self._requested


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) in `workdir`; returns the final evaluation metrics.

  A finished run's metrics are also in `workdir/final_metrics.json`; called on
  a finished run, it trains nothing and returns them.

  Raises:
    Preempted: SIGTERM arrived; the run saved its state and stopped early.
  """
  config_lib.validate(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    config_lib.save(config, os.path.join(workdir, "config.json"))

  # Mesh.
  mesh = sharding.create_mesh(config.fsdp)
  local_batch_size = sharding.local_batch_size(config.batch_size, mesh)

  # Data: host-local numpy from grain, this process's share only.
  train_source = create_data_source(config, config.data.train_split)
  eval_source = create_data_source(config, config.data.eval_split)
  if is_main:  # what predict and gradcam name the outputs with
    with open(os.path.join(workdir, "classes.json"), "w") as f:
      json.dump({"task": config.task, "class_names": list(train_source.class_names)}, f)
  steps_per_epoch = len(train_source) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"Bad config: batch_size={config.batch_size} exceeds the {len(train_source)} training examples.")
  num_steps = config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * steps_per_epoch
  eval_every = config.eval_every_steps or steps_per_epoch
  checkpoint_every = config.checkpoint_every_steps or steps_per_epoch
  train_iter = pipeline.create_train_iterator(
      train_source, batch_size=local_batch_size, image_size=config.image_size, seed=config.seed,
      shard_index=jax.process_index(), shard_count=jax.process_count(), num_workers=config.data.num_workers,
      random_flip=config.data.random_flip, balanced=config.data.balanced, aspect=config.data.aspect,
      skip_bad_images=config.data.skip_bad_images)

  # Model, state shapes and shardings, and the steps: one train step over the
  # mesh with the state donated.
  programs = build_programs(config, mesh, steps_per_epoch)

  # Restore, or start afresh.
  ckpt = checkpoint.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                      max_to_keep=config.max_checkpoints_to_keep, best_metric="accuracy",
                                      save_interval_steps=1)
  window = TrainWindow()
  if ckpt.latest_step() is not None:
    restored = ckpt.restore("latest", programs.abstract_state, data_iterator=train_iter)
    state = restored.state
    window = TrainWindow.from_json(restored.metadata.get("train_window"))
    logging.warning("Resumed from step %d in %s", restored.step, ckpt.directory)
  else:
    state = programs.init(jax.random.key(config.seed))
    if config.model.pretrained:
      state["params"] = _load_pretrained(config.model.pretrained, programs.model, state["params"],
                                         programs.state_sharding["params"])
  step = int(state["step"])
  writer = MetricWriter(workdir, enabled=is_main, truncate_after=step)
  if step == 0:
    writer.write_text("config", config.to_json_best_effort(indent=2))

  # The loop. Metrics come back one step late, so the host never waits for
  # the device before dispatching the next step.
  preemption = _Preemption()
  eval_metrics: dict = {}
  pending = None
  progress = writer.progress(total=num_steps, initial=step)
  # img_s counts training only: the first call (it compiles), evaluations and
  # checkpoint saves are left out of the window they fall in.
  last_time, last_step, excluded = time.perf_counter(), step, 0.0
  start_step = step

  def finish(pending_step_metrics):
    done_step, metrics = pending_step_metrics
    metrics = jax.device_get(metrics)
    if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
      ckpt.wait_until_finished()
      raise NonFiniteLossError(
          f"Non-finite loss ({metrics['loss']}) or gradient norm ({metrics['grad_norm']}) at step {done_step}. "
          f"Stopped before saving it; the last good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}.")
    window.add(metrics)

  while step < num_steps:
    batch = sharding.make_global_batch(next(train_iter), mesh)
    started = time.perf_counter()
    state, metrics = programs.train_step(state, batch)
    step += 1
    if step == start_step + 1:  # the window starts once the first step, compilation included, is done
      jax.block_until_ready(metrics)
      last_time, last_step = time.perf_counter(), step
      if is_main:
        progress.write(f"first training step (compilation included) in {last_time - started:.1f} s")
    if pending is not None:
      finish(pending)
    pending = (step, metrics)

    preempted = preemption.requested(step)
    is_last = step == num_steps
    do_log = step % config.log_every_steps == 0 or is_last
    do_eval = step % eval_every == 0 or is_last
    do_save = step % checkpoint_every == 0 or do_eval or preempted
    if do_log or do_eval or do_save:
      finish(pending)
      pending = None
    if do_log:
      now = time.perf_counter()
      speed = {}
      if step > last_step:  # not a window holding only the first step
        throughput = (step - last_step) * config.batch_size / max(now - last_time - excluded, 1e-9)
        writer.write_throughput(step, throughput)
        speed = {"img_s": f"{throughput:.1f}"}
      last_time, last_step, excluded = now, step, 0.0
      averages = window.pop()
      writer.write_scalars(step, {f"train_{k}": v for k, v in averages.items()})
      progress.set_postfix(loss=f"{averages['loss']:.4f}", acc=f"{averages['accuracy']:.3f}", **speed)
      skipped = pipeline.num_skipped_images(train_iter)
      if skipped:
        writer.write_scalars(step, {"skipped_images": skipped})
    paused = time.perf_counter()
    if do_eval:
      eval_metrics = paper_metrics.evaluate(programs.eval_step, steps.eval_variables(state), eval_source, config,
                                            mesh)
      writer.write_scalars(step, {f"eval_{k}": v for k, v in eval_metrics.items()
                                  if k not in ("class_names", "attribute_names", "confusion_matrix")})
      if is_main:
        progress.write(f"step {step}: eval accuracy {eval_metrics['accuracy']:.4f}, loss {eval_metrics['loss']:.4f}")
    if do_save:
      ckpt.save(step, state, train_iter,
                metrics=paper_metrics.scalar_metrics(eval_metrics) if do_eval else None,
                metadata={"epoch": step / steps_per_epoch, "train_window": window.to_json()}, force=True)
    excluded += time.perf_counter() - paused
    progress.update(1)
    if preempted and not is_last:
      logging.warning("Pre-empted: saved step %d to %s; run the same command to resume.", step, ckpt.directory)
      break

  if pending is not None:
    finish(pending)
  progress.close()
  final_path = os.path.join(workdir, FINAL_METRICS)
  if step == num_steps and not eval_metrics:  # finished before this call
    eval_metrics = _read_json(final_path) or paper_metrics.evaluate(
        programs.eval_step, steps.eval_variables(state), eval_source, config, mesh)
  ckpt.wait_until_finished()
  ckpt.close()
  writer.close()
  if step < num_steps:
    raise Preempted(f"Pre-empted at step {step}, saved in {ckpt.directory}; run the same command to resume.")
  eval_metrics = {**eval_metrics, "step": step}
  if is_main:
    with open(final_path, "w") as f:
      json.dump(eval_metrics, f)
  return eval_metrics


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def quiet_logs() -> None:
  """Orbax and grain log every save and read at INFO; show warnings unless -v was given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  start_processes()
  try:
    metrics = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except Preempted:
    return  # logged; the scheduler runs the same command again
  except DataError as e:
    sys.exit(f"{e}\nTo see the project work without the dataset, run `make demo` (synthetic faces).")
  except (NonFiniteLossError, ValueError) as e:
    sys.exit(str(e))
  if jax.process_index() == 0 and metrics:
    print(json.dumps(paper_metrics.scalar_metrics(metrics)))


if __name__ == "__main__":
  define_flags("Experiment config file, e.g. configs/rafdb.py.",
               "Directory for checkpoints, logs and the resolved config.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
