"""Training logs: metrics.jsonl and TensorBoard event files from process 0, and the progress bar.

TensorBoard files are written with tensorboardX, so TensorFlow is not needed.
"""

import json
import math
import os
import sys
from typing import Any

import tqdm


class TrainWindow:
  """Sums of the per-step training metrics since the last log line.

  Saved with each checkpoint, so the first log line after a resume averages
  exactly the steps an uninterrupted run's would.
  """

  def __init__(self, sums: dict[str, float] | None = None, count: int = 0):
    self.sums = dict(sums or {})
    self.count = count

  def add(self, metrics: dict[str, Any]) -> None:
    for k, v in metrics.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(v)
    self.count += 1

  def pop(self) -> dict[str, float]:
    averages = {k: v / max(self.count, 1) for k, v in self.sums.items()}
    self.sums, self.count = {}, 0
    return averages

  def to_json(self) -> dict:
    return {"sums": self.sums, "count": self.count}

  @classmethod
  def from_json(cls, value: dict | None) -> "TrainWindow":
    return cls(**value) if value else cls()


def _jsonable(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricWriter:
  """Writes `metrics.jsonl` (one object per step with `step`) and TensorBoard scalars.

  All methods do nothing when `enabled` is False (processes other than 0).
  `truncate_after`: on a resumed run, lines past the restored step are
  dropped, since the run will log those steps again.
  """

  def __init__(self, workdir: str, enabled: bool = True, truncate_after: int | None = None):
    self.enabled = enabled
    self._jsonl = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    if truncate_after is not None and os.path.exists(self._jsonl):
      with open(self._jsonl) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= truncate_after]
      with open(self._jsonl, "w") as f:
        f.writelines(kept)
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write_scalars(self, step: int, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self._jsonl, "a") as f:
      f.write(json.dumps({"step": step, **{k: _jsonable(v) for k, v in values.items()}}) + "\n")
    for k, v in values.items():
      if isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, step)

  def write_throughput(self, step: int, images_per_sec: float) -> None:
    """TensorBoard only: timings differ from run to run, metrics.jsonl must not."""
    if self.enabled:
      self._tb.add_scalar("train_images_per_sec", images_per_sec, step)

  def write_text(self, tag: str, text: str) -> None:
    if self.enabled:
      self._tb.add_text(tag, f"```\n{text}\n```", 0)

  def progress(self, total: int, initial: int, stream=None):
    """A progress bar on a terminal; elsewhere (a log file, a batch job) one line per log step.

    tqdm redraws its bar with carriage returns every second, which a log file
    keeps as one ever-growing line.
    """
    stream = stream or sys.stderr
    if not self.enabled:
      return tqdm.tqdm(total=total, initial=initial, disable=True)
    if not getattr(stream, "isatty", lambda: False)():
      return LineProgress(total, initial, stream)
    return tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=stream, mininterval=1.0)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class LineProgress:
  """tqdm's interface (update, set_postfix, write, close) as plain lines.

  `set_postfix` (called at each log step) queues the values; the next
  `update` prints them as `step N/TOTAL  key=value ...` on a line of its own.
  """

  def __init__(self, total: int, initial: int, stream):
    self.n, self.total, self._stream = initial, total, stream
    self._postfix: dict[str, Any] | None = None

  def set_postfix(self, **values: Any) -> None:
    self._postfix = values

  def update(self, n: int = 1) -> None:
    self.n += n
    if self._postfix is not None:
      fields = "  ".join(f"{k}={v}" for k, v in self._postfix.items())
      self.write(f"step {self.n}/{self.total}  {fields}")
      self._postfix = None

  def write(self, message: str) -> None:
    print(message, file=self._stream, flush=True)

  def close(self) -> None:
    pass
