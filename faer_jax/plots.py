"""Figures of an evaluation: the confusion matrix (FER) and per-attribute accuracy (FAE, the paper's Fig. 4)."""

from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt
import numpy as np


def confusion_matrix_figure(confusion: Sequence[Sequence[int]], class_names: Sequence[str], path: str,
                            title: str = "") -> None:
  """Row-normalised confusion matrix (rows: true class), with counts and percentages."""
  counts = np.asarray(confusion, np.float64)
  rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
  n = len(class_names)
  fig, ax = plt.subplots(figsize=(1.1 * n + 2, 1.1 * n + 1.5))
  ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
  for i in range(n):
    for j in range(n):
      ax.text(j, i, f"{100 * rates[i, j]:.1f}\n({int(counts[i, j])})", ha="center", va="center", fontsize=8,
              color="white" if rates[i, j] > 0.5 else "black")
  ax.set_xticks(range(n), class_names, rotation=45, ha="right")
  ax.set_yticks(range(n), class_names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def attribute_accuracy_figure(accuracies: Sequence[float], attribute_names: Sequence[str], path: str,
                              title: str = "") -> None:
  """One bar per attribute, in the file's order, with the mean as a line."""
  acc = 100 * np.asarray(accuracies, np.float64)
  fig, ax = plt.subplots(figsize=(14, 5))
  ax.bar(range(len(acc)), acc, color="#4c72b0")
  ax.axhline(acc.mean(), color="#c44e52", linestyle="--", label=f"mean {acc.mean():.2f} %")
  ax.set_xticks(range(len(acc)), attribute_names, rotation=90, fontsize=8)
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(max(0, acc.min() - 10), 100)
  ax.legend(loc="lower right")
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
