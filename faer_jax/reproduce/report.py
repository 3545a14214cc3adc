"""An experiment's results: WORKDIR/EXPERIMENT.md and .csv, and its figures as PNG.

Every cell holds the mean ± sample standard deviation over the finished
seeds of its run, for two readings of a run: the final checkpoint's accuracy,
and the best accuracy over the run's evaluations (what the original code
reports). Beside them: the paper's figure and each reading's difference from it.
"""

import csv
import dataclasses
import os

import numpy as np

from faer_jax.reproduce import runs
from faer_jax.reproduce.experiments import DATASET_NAMES, LAMBDA, LAMBDAS, Experiment, Table

CSV_COLUMNS = ("table", "row", "column", "run", "metric", "seeds", "final_mean", "final_std", "best_mean",
               "best_std", "paper", "final_minus_paper", "best_minus_paper")


@dataclasses.dataclass
class CellResult:
  seeds: int
  final: tuple[float, float | None] | None  # (mean, std) in %; None without a finished seed
  best: tuple[float, float | None] | None


def collect(experiment: Experiment, options: runs.Options) -> dict[str, list[runs.SeedResult]]:
  """Run name -> the results of its finished seeds."""
  out = {}
  for run in experiment.runs:
    found = (runs.read_result(runs.run_dir(options.workdir, run, s)) for s in range(options.seeds))
    out[run.name] = [r for r in found if r is not None]
  return out


def cell_result(cell, results: dict[str, list[runs.SeedResult]]) -> CellResult:
  seeds = results.get(cell.run.name, [])
  if not seeds:
    return CellResult(0, None, None)
  final = [runs.metric_value(r.final, cell.metric, r.class_names) for r in seeds]
  best = [runs.metric_value(r.best, cell.metric, r.class_names) for r in seeds]
  return CellResult(len(seeds), runs.summarize(final), runs.summarize(best))


def _pm(value) -> str:
  if value is None:
    return "—"
  mean, std = value
  return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _diff(value, paper) -> str:
  return "—" if value is None or paper is None else f"{value[0] - paper:+.2f}"


def write(experiment: Experiment, options: runs.Options) -> list[str]:
  """Writes the experiment's Markdown, CSV and figures; returns the paths written."""
  results = collect(experiment, options)
  base = os.path.join(options.workdir, experiment.name)
  lines = [f"# {experiment.title}", ""]
  if options.synthetic:
    lines += ["**Synthetic data and a short recipe** (`--synthetic`): these numbers exercise the pipeline and "
              "say nothing about the paper's claims; the paper's figures are shown for the layout only.", ""]
  done = sum(len(v) for v in results.values())
  lines += [f"Runs: {len(experiment.runs)} × {options.seeds} seed(s); {done} finished. "
            "*final*: the last checkpoint; *best*: the best evaluation during the run (the original code's "
            "figure). Mean ± sample standard deviation over the finished seeds (n); Δ: the mean minus the paper's.",
            ""]
  rows = []
  for table in experiment.tables:
    cells = {key: cell_result(cell, results) for key, cell in table.cells.items()}
    lines += _markdown_table(table, cells)
    for (row, column), cell in table.cells.items():
      r = cells[row, column]
      rows.append({"table": table.title, "row": row, "column": column, "run": cell.run.name, "metric": cell.metric,
                   "seeds": r.seeds, "final_mean": _num(r.final, 0), "final_std": _num(r.final, 1),
                   "best_mean": _num(r.best, 0), "best_std": _num(r.best, 1),
                   "paper": "" if cell.paper is None else cell.paper,
                   "final_minus_paper": _num_diff(r.final, cell.paper),
                   "best_minus_paper": _num_diff(r.best, cell.paper)})
  figures = []
  if "fig3" in experiment.figures:
    figures.append(_fig3(experiment, results, os.path.join(options.workdir, "fig3.png")))
  if "fig4" in experiment.figures:
    figures.append(_fig4(experiment, results, os.path.join(options.workdir, "fig4.png")))
  if "fig56" in experiment.figures:
    figures += _fig56(options, results)
  if figures:
    lines += ["## Figures", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in figures] + [""]
  with open(base + ".md", "w") as f:
    f.write("\n".join(lines))
  with open(base + ".csv", "w", newline="") as f:
    writer = csv.DictWriter(f, CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  return [base + ".md", base + ".csv"] + figures


def _num(value, i):
  return "" if value is None or value[i] is None else round(value[i], 4)


def _num_diff(value, paper):
  return "" if value is None or paper is None else round(value[0] - paper, 4)


def _markdown_table(table: Table, cells: dict) -> list[str]:
  lines = [f"## {table.title}", "", "| | | n | final | best | paper | Δ final | Δ best |",
           "|---|---|--:|--:|--:|--:|--:|--:|"]
  for row in table.rows:
    for column in table.columns:
      cell = table.cells.get((row, column))
      if cell is None:
        continue
      r = cells[row, column]
      paper = "—" if cell.paper is None else f"{cell.paper:.2f}"
      lines.append(f"| {row} | {column} | {r.seeds} | {_pm(r.final)} | {_pm(r.best)} | {paper} | "
                   f"{_diff(r.final, cell.paper)} | {_diff(r.best, cell.paper)} |")
  return lines + [""]


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _fig3(experiment: Experiment, results, path: str) -> str:
  """Accuracy against λ (log axis), one line per dataset, the paper's point at λ = 0.01."""
  table = next(t for t in experiment.tables if t.figure == "fig3")
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(table.columns), figsize=(5 * len(table.columns), 3.8), squeeze=False)
  for ax, column in zip(axes[0], table.columns):
    cells = [table.cells[row, column] for row in table.rows]
    stats = [cell_result(c, results) for c in cells]
    for reading, style in (("final", "o-"), ("best", "s--")):
      xs = [lam for lam, s in zip(LAMBDAS, stats) if getattr(s, reading)]
      means = [getattr(s, reading)[0] for s in stats if getattr(s, reading)]
      stds = [getattr(s, reading)[1] or 0.0 for s in stats if getattr(s, reading)]
      if xs:
        ax.errorbar(xs, means, yerr=stds, fmt=style, capsize=3, label=reading)
    paper = next(c.paper for c in cells if c.paper is not None)
    ax.plot([LAMBDA], [paper], "k*", markersize=12, label="paper")
    ax.set_xscale("log")
    ax.set_xlabel("center-loss weight λ")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(column)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _fig4(experiment: Experiment, results, path: str) -> str:
  """Per-attribute accuracy of Baseline and FAER (final checkpoint), two panels of 20 attributes as the paper's."""
  table = next(t for t in experiment.tables if t.figure == "fig4")
  names = [r for r in table.rows if r != "Mean"]
  plt = _pyplot()
  fig, axes = plt.subplots(2, 1, figsize=(12, 7.5))
  for panel, ax in enumerate(axes):
    shown = names[20 * panel:20 * panel + 20]
    x = np.arange(len(shown))
    lowest = 100.0
    for k, (model, colour) in enumerate((("Baseline", "tab:gray"), ("FAER", "tab:red"))):
      values = [cell_result(table.cells[n, model], results).final for n in shown]
      heights = [v[0] if v else np.nan for v in values]
      errors = [(v[1] or 0.0) if v else 0.0 for v in values]
      ax.bar(x + (k - 0.5) * 0.4, heights, 0.4, yerr=errors, label=model, color=colour, capsize=2)
      lowest = min([lowest] + [h for h in heights if np.isfinite(h)])
    ax.set_xticks(x, shown, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(max(0.0, lowest - 5), 100)
  axes[0].legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _fig56(options: runs.Options, results) -> list[str]:
  """Grad-CAM grids, Baseline beside FAER (seed 0, final checkpoint), on the same test images.

  One PNG per dataset: the images on the top row, each model's map of its own
  prediction below. CelebA: the first test images; AffectNet-7: the first
  validation image of each expression. Drawn by a single-process invocation.
  """
  import jax
  from faer_jax.reproduce.experiments import baseline, celeba, faer
  if jax.process_count() > 1:  # loading a checkpoint takes every process; the runs are done, one process draws
    print("fig56: run the same command as one process to draw the Grad-CAM grids (it trains nothing).")
    return []
  paths = []
  for dataset, pair in (("celeba", (celeba("focal", False), celeba("focal", True))),
                        ("affectnet7", (baseline("affectnet7"), faer("affectnet7")))):
    directories = [runs.run_dir(options.workdir, run, 0) for run in pair]
    if not all(runs.status(d) == "done" for d in directories):
      continue
    path = os.path.join(options.workdir, f"fig56_{dataset}.png")
    gradcam_comparison(directories, ("Baseline", "FAER"), path, DATASET_NAMES[dataset])
    paths.append(path)
  return paths


def gradcam_comparison(directories, labels, path: str, title: str, num_images: int = 7) -> None:
  """One row of test images, then one row of Grad-CAM maps per run (the layer before the head)."""
  import jax
  from faer_jax import config_lib, gradcam, predict, train
  from faer_jax.data import transforms
  config = config_lib.load(os.path.join(directories[0], "config.json"))
  source = train.create_data_source(config, config.data.eval_split)
  if config.task == "fer":  # the first image of each class
    indices = [int(np.flatnonzero(source.labels == k)[0]) for k in range(config.num_classes)
               if np.any(source.labels == k)][:num_images]
  else:
    indices = list(range(min(num_images, len(source))))
  shown = [transforms.resize(source[i]["image"], config.image_size, config.data.aspect) for i in indices]
  batch = np.stack([transforms.normalize(image) for image in shown])
  plt = _pyplot()
  rows = 1 + len(directories)
  fig, axes = plt.subplots(rows, len(indices), figsize=(1.9 * len(indices), 2.1 * rows), squeeze=False)
  truth = [source[i]["label"] for i in indices]
  for i, (image, label) in enumerate(zip(shown, truth)):
    axes[0, i].imshow(image)
    axes[0, i].set_title(source.class_names[label] if config.task == "fer" else f"test image {indices[i] + 1}",
                         fontsize=7)
  for row, (directory, label) in enumerate(zip(directories, labels), start=1):
    loaded = predict.load_model(directory)
    logits = jax.jit(lambda p, x: loaded.model.apply({"params": p}, x)[1])(loaded.params, batch)
    targets = np.argmax(np.asarray(logits), axis=-1)
    cams, _ = jax.jit(gradcam.gradcam, static_argnums=(0, 4))(loaded.model, loaded.params, batch, targets,
                                                              "cc_attention")
    maps = gradcam.upsample(np.asarray(cams), config.image_size)
    for i, (image, cam, target) in enumerate(zip(shown, maps, targets)):
      axes[row, i].imshow(gradcam.overlay(image, cam))
      axes[row, i].set_title(f"{label}: {loaded.class_names[target]}", fontsize=7)
  for ax in axes.flat:
    ax.axis("off")
  fig.suptitle(f"{title}: Grad-CAM of each model's prediction")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
