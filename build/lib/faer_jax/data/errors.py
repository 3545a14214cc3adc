"""Errors for bad dataset input, with messages that say what to do next.

Every problem with the data on disk (a missing folder, a malformed label line,
an image that does not decode) raises a `DataError`, so that command-line tools
can print the message without a traceback and training can fail early with
the file named.
"""

from collections.abc import Sequence

# Where each dataset comes from; quoted whenever a dataset cannot be found.
DATASET_HOMES = {
    "RAF-DB": "http://www.whdeng.cn/raf/model1.html (by request to the owners)",
    "AffectNet": "http://mohammadmahoor.com/affectnet/ (by request to the owners)",
    "CelebA": "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html",
}

_SYNTH_LAYOUTS = {"RAF-DB": "rafdb", "CelebA": "celeba"}


class DataError(Exception):
  """The dataset on disk is missing, incomplete or malformed."""


class ImageReadError(DataError):
  """An image file is missing or cannot be decoded.

  Attributes:
    path: the image file (or a descriptive id for in-memory bytes).
    reason: why it could not be read.
  """

  def __init__(self, path: str, reason: str):
    # Both values go to `Exception.__init__` so that the error survives
    # pickling, which is how grain worker processes report it.
    super().__init__(path, reason)
    self.path = path
    self.reason = reason

  def __str__(self) -> str:
    return f"cannot read image {self.path}: {self.reason}"


def dataset_not_found(dataset: str, problem: str, expected: Sequence[str], detail: str = "") -> DataError:
  """Builds the error for dataset files that are not where we looked.

  Args:
    dataset: the display name, a key of `DATASET_HOMES`.
    problem: the first line, e.g. "RAF-DB not found under '/data'.".
    expected: the paths that were looked for, most likely first.
    detail: optional sentence, e.g. which layouts were tried.

  Returns:
    A `DataError` to raise; its message names every expected path, where the
    dataset can be obtained and how to make a synthetic stand-in.
  """
  lines = [problem] + ([detail] if detail else []) + ["Looked for:"]
  lines += [f"  {path}" for path in expected]
  lines.append(f"{dataset} is distributed at {DATASET_HOMES[dataset]}.")
  if dataset in _SYNTH_LAYOUTS:
    lines.append(
        "For a synthetic stand-in in the same layout, run "
        f"`python -m faer_jax.data synth --layout {_SYNTH_LAYOUTS[dataset]} --out DIR`."
    )
  else:
    lines.append(
        "For a synthetic expression stand-in (in RAF-DB's layout, read with "
        "`--dataset rafdb`), run `python -m faer_jax.data synth --layout rafdb --out DIR`."
    )
  return DataError("\n".join(lines))


def malformed_line(path: str, line_number: int, text: str, problem: str):
  """Builds the error for a bad line in a label file.

  Args:
    path: the label file.
    line_number: 1-based line number in that file.
    text: the offending line (shortened if very long).
    problem: what is wrong with it.

  Returns:
    A `DataError` naming the file, the line number and the text.
  """
  text = text.rstrip("\r\n")
  if len(text) > 200:
    text = text[:200] + "..."
  return DataError(f"{path}:{line_number}: {problem}: {text!r}")
