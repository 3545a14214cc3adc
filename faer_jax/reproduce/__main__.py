r"""Reproduce the paper: `python -m faer_jax.reproduce EXPERIMENT --workdir DIR [options]`.

  python -m faer_jax.reproduce table2 --workdir repro --data-root.rafdb=/data/RAF-DB \
      --data-root.affectnet=/data/AffectNet --pretrained=/ckpt/convnext_base.pth --seeds 3
  python -m faer_jax.reproduce all --workdir repro ... --dry-run
  python -m faer_jax.reproduce table2 --workdir /tmp/repro --synthetic --seeds 2

Experiments: table2, fig3, table3, table4, table5, fig4, fig56, all. Each run
is an ordinary training run (faer_jax.train) in DIR/runs/NAME/seedS; runs
shared by several experiments are trained once; an interrupted invocation
resumes, and a finished run is never trained again. The results go to
DIR/EXPERIMENT.md and .csv, the figures to DIR/*.png. --config.KEY=VALUE
changes every run's config (e.g. --config.batch_size=128).

Multi-host: every process runs the same command (a shared filesystem holds
DIR); the runs go one after another, each over all devices. --only RUN runs
one run (NAME or NAME/seedS), e.g. one task of a scheduler's job array.
"""

import json
import sys
import time

from absl import app, flags
import jax
from ml_collections import config_flags

from faer_jax import compile_cache, config_lib, cpu_memory, sharding, train
from faer_jax.data import DataError
from faer_jax.reproduce import report, runs
from faer_jax.reproduce.experiments import DATA_ROOT_FLAGS, experiments

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "The experiment's folder: runs/, data/ and the reports.")
  for dataset, flag in DATA_ROOT_FLAGS.items():
    flags.DEFINE_string(f"data-root.{flag}", None, f"The {dataset} dataset's folder.")
  flags.DEFINE_integer("seeds", 1, lower_bound=1,
                       help="Seeds 0 .. N-1 of every run; the tables give mean ± std over them.")
  flags.DEFINE_string("variant", None, "ConvNeXt variant (default: the configs' base; 'test' with --synthetic).")
  flags.DEFINE_string("pretrained", "", "PyTorch checkpoint every run starts from (ConvNeXt, timm or FAER).")
  flags.DEFINE_string("only", None, "Run only this run: NAME (every seed) or NAME/seedS.")
  flags.DEFINE_bool("dry-run", False, "List the runs, their configs and which are done; train nothing.")
  flags.DEFINE_bool("synthetic", False, "Synthetic faces in the owners' layouts and a short recipe.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
  config_flags.DEFINE_config_dict("config", config_lib.base_config(), "Overrides of every run's config.",
                                  lock_config=True)
  flags.mark_flags_as_required(["workdir"])


def _options() -> runs.Options:
  roots = {dataset: FLAGS[f"data-root.{flag}"].value for dataset, flag in DATA_ROOT_FLAGS.items()}
  return runs.Options(workdir=FLAGS.workdir, data_roots={k: v for k, v in roots.items() if v}, seeds=FLAGS.seeds,
                      variant=FLAGS.variant, pretrained=FLAGS.pretrained, synthetic=FLAGS.synthetic,
                      overrides=config_flags.get_override_values(FLAGS["config"]))


def plan(experiment, options: runs.Options, only: str | None):
  """[(run, seed, directory, config)] in order, checked against what the workdir holds."""
  planned = [(run, seed) for run in experiment.runs for seed in range(options.seeds)]
  if only is not None:
    chosen = [(r, s) for r, s in planned if only in (r.name, f"{r.name}/seed{s}")]
    if not chosen:
      names = ", ".join(r.name for r in experiment.runs)
      raise runs.ReproduceError(f"--only {only!r} is no run of {experiment.name} with --seeds {options.seeds}; "
                                f"its runs: {names} (each NAME or NAME/seedS)")
    planned = chosen
  out = []
  for run, seed in planned:
    directory = runs.run_dir(options.workdir, run, seed)
    config = runs.run_config(run, seed, options)
    config_lib.validate(config)
    runs.check_same_config(directory, config)
    out.append((run, seed, directory, config))
  return out


def dry_run(experiment, planned, options: runs.Options) -> None:
  done = sum(runs.status(d) == "done" for _, _, d, _ in planned)
  print(f"{experiment.name}: {len(planned)} runs, {done} done; workdir {options.workdir}")
  width = max(len(f"{run.name}/seed{seed}") for run, seed, _, _ in planned)
  for run, seed, directory, config in planned:
    length = f"{config.num_train_steps} steps" if config.num_train_steps > 0 else f"{config.num_epochs} epochs"
    print(f"  {run.name + f'/seed{seed}':<{width}}  {runs.status(directory):<9} {run.description}; "
          f"{config.data.dataset}, {config.model.variant}, loss {config.loss.name}, "
          f"λ {config.loss.center_loss_weight:g}, lr {config.optimizer.lr:g}, batch {config.batch_size}, {length}")


def main(argv) -> None:
  known = experiments()
  if len(argv) != 2 or argv[1] not in known:
    given = f"{argv[1]!r} is not one" if len(argv) == 2 else "give one experiment"
    sys.exit(f"error: {given} of the experiments: {', '.join(known)}")
  experiment = known[argv[1]]
  train.quiet_logs()
  compile_cache.enable()
  try:
    options = _options()
    runs.check_data_roots(experiment, options)
    planned = plan(experiment, options, FLAGS.only)
  except (runs.ReproduceError, ValueError) as e:
    sys.exit(f"error: {e}")
  if FLAGS["dry-run"].value:
    dry_run(experiment, planned, options)
    return

  sharding.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if jax.default_backend() == "cpu":
    cpu_memory.keep_freed_memory()
  is_main = jax.process_index() == 0
  if options.synthetic and is_main:
    runs.write_synthetic_data(options.workdir, experiment.datasets)
  if options.synthetic and jax.process_count() > 1:
    jax.experimental.multihost_utils.sync_global_devices("synthetic data written")
  say = print if is_main else (lambda *a, **k: None)
  for i, (run, seed, directory, config) in enumerate(planned, start=1):
    head = f"[{i}/{len(planned)}] {run.name}/seed{seed}"
    if runs.status(directory) == "done":
      say(f"{head}: done")
      continue
    say(f"{head}: training ({run.description}) in {directory}", flush=True)
    started = time.perf_counter()
    try:
      metrics = train.train_and_evaluate(config, directory)
    except train.Preempted as e:
      say(f"{head}: {e}")
      return
    except (DataError, train.NonFiniteLossError, ValueError) as e:
      sys.exit(f"{head}: {e}")
    say(f"{head}: accuracy {100 * metrics['accuracy']:.2f} % after {time.perf_counter() - started:.0f} s")
  if is_main:
    try:
      written = report.write(experiment, options)
    except (DataError, ValueError) as e:
      sys.exit(f"error: writing the report: {e}")
    print("wrote " + ", ".join(written))


def unknown_config_keys(argv) -> list[str]:
  """The keys of --config.KEY=VALUE arguments that no config has (absl would fail with a traceback)."""
  known = set(config_lib.flatten(json.loads(config_lib.base_config().to_json_best_effort())))
  given = (a.split("=", 1)[0].removeprefix("--config.") for a in argv if a.startswith("--config."))
  return [k for k in given if k not in known]


if __name__ == "__main__":
  if unknown := unknown_config_keys(sys.argv[1:]):
    sys.exit(f"error: no config key {unknown[0]!r} (see faer_jax/config_lib.py for every key)")
  define_flags()
  app.run(main)
