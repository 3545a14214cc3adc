"""The paper's experiments: which training runs each needs, and the figures it reports.

A `Run` is one training recipe (dataset, model, center-loss weight λ, loss);
experiments that need the same recipe share its runs. Each experiment is a
list of `Table`s whose cells name a run, the metric read from it and the
paper's figure.
"""

import dataclasses

LAMBDA = 0.01                                   # the paper's center-loss weight (best in Fig. 3)
LAMBDAS = (1.0, 0.1, 0.01, 0.001, 0.0001)       # Fig. 3
DATASET_NAMES = {"rafdb": "RAF-DB", "affectnet7": "AffectNet-7", "celeba": "CelebA"}
# The --data-root.NAME flag that gives each dataset's folder.
DATA_ROOT_FLAGS = {"rafdb": "rafdb", "affectnet7": "affectnet", "celeba": "celeba"}
CELEBA_LOSSES = ("asymmetric", "bce", "focal")  # Table 3's rows, in the paper's order
LOSS_NAMES = {"asymmetric": "Asymmetric loss", "bce": "BCE", "focal": "Focal loss"}
# Table 5's columns, in the paper's order; each dataset's own name for the class.
EXPRESSIONS = ("Anger", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise")
CLASS_ALIASES = {"Happiness": ("Happiness", "Happy"), "Sadness": ("Sadness", "Sad")}


@dataclasses.dataclass(frozen=True)
class Run:
  """One training recipe; every seed of it is a training run of its own.

  Attributes:
    dataset: 'rafdb', 'affectnet7' or 'celeba'.
    cc_attention: False for the paper's Baseline (ConvNeXt -> pool -> LayerNorm -> head).
    center_loss_weight: λ; 0 without the center loss (always 0 for CelebA).
    loss: 'cross_entropy' (expressions), or 'focal', 'bce', 'asymmetric' (attributes).
  """

  dataset: str
  cc_attention: bool
  center_loss_weight: float = 0.0
  loss: str = "cross_entropy"

  @property
  def name(self) -> str:
    model = "faer" if self.cc_attention else "baseline"
    if self.dataset == "celeba":
      return f"celeba-{model}-{self.loss}"
    if self.center_loss_weight == 0.0:
      return f"{self.dataset}-{'cca' if self.cc_attention else 'baseline'}"
    suffix = "" if self.center_loss_weight == LAMBDA else f"-lambda{self.center_loss_weight:g}"
    return f"{self.dataset}-{model}{'' if self.cc_attention else '-center'}{suffix}"

  @property
  def description(self) -> str:
    if self.dataset == "celeba":
      model = "FAER" if self.cc_attention else "Baseline"
      return f"{model}, {LOSS_NAMES[self.loss]}"
    model = "Baseline + CC Attention" if self.cc_attention else "Baseline"
    if not self.center_loss_weight:
      return model
    return ("FAER: " if self.cc_attention else "") + f"{model} + center loss (λ = {self.center_loss_weight:g})"


def baseline(dataset: str) -> Run:
  return Run(dataset, cc_attention=False)


def cc_attention(dataset: str) -> Run:
  """Baseline + CC Attention: FAER without the center loss."""
  return Run(dataset, cc_attention=True)


def faer(dataset: str, center_loss_weight: float = LAMBDA) -> Run:
  return Run(dataset, cc_attention=True, center_loss_weight=center_loss_weight)


def celeba(loss: str, with_cc_attention: bool) -> Run:
  return Run("celeba", cc_attention=with_cc_attention, loss=loss)


@dataclasses.dataclass(frozen=True)
class Cell:
  """One number of a table: `metric` of `run`, beside the paper's figure (%, None where it gives none).

  metric: 'accuracy' (the paper's: top-1 for expressions, the mean over the 40
  attributes for CelebA), 'class:NAME' (one expression's accuracy, Table 5) or
  'attribute:NAME' (one attribute's accuracy, Fig. 4).
  """

  run: Run
  paper: float | None
  metric: str = "accuracy"


@dataclasses.dataclass(frozen=True)
class Table:
  title: str
  rows: tuple[str, ...]
  columns: tuple[str, ...]
  cells: dict  # (row, column) -> Cell
  figure: str | None = None  # the figure `report` draws from it: 'fig3', 'fig4'


@dataclasses.dataclass(frozen=True)
class Experiment:
  name: str
  title: str
  tables: tuple[Table, ...]
  figures: tuple[str, ...] = ()  # what `report` draws besides the tables: 'fig3', 'fig4', 'fig56'

  @property
  def runs(self) -> tuple[Run, ...]:
    """The runs the experiment needs, once each, in the order of its tables."""
    seen: dict[str, Run] = {}
    for table in self.tables:
      for key in ((r, c) for r in table.rows for c in table.columns):
        if key in table.cells:
          seen.setdefault(table.cells[key].run.name, table.cells[key].run)
    return tuple(seen.values())

  @property
  def datasets(self) -> tuple[str, ...]:
    return tuple(d for d in DATASET_NAMES if any(r.dataset == d for r in self.runs))


def _table2() -> Table:
  rows = ("Baseline", "Baseline + CC Attention", "+ Center Loss (FAER)")
  paper = {"affectnet7": (64.77, 65.03, 66.66), "rafdb": (90.74, 90.91, 91.75)}
  cells = {}
  for dataset, figures in paper.items():
    for row, make, figure in zip(rows, (baseline, cc_attention, faer), figures):
      cells[row, DATASET_NAMES[dataset]] = Cell(make(dataset), figure)
  return Table("Table 2: the components, accuracy (%)", rows, ("AffectNet-7", "RAF-DB"), cells)


def _table3() -> Table:
  paper = {"asymmetric": (90.69, 91.23), "bce": (91.03, 91.71), "focal": (91.66, 91.87)}
  cells = {}
  for loss, (base_figure, faer_figure) in paper.items():
    cells[LOSS_NAMES[loss], "Baseline"] = Cell(celeba(loss, False), base_figure)
    cells[LOSS_NAMES[loss], "FAER"] = Cell(celeba(loss, True), faer_figure)
  return Table("Table 3: CelebA by loss, mean attribute accuracy (%)", tuple(LOSS_NAMES[x] for x in CELEBA_LOSSES),
               ("Baseline", "FAER"), cells)


def _table4() -> Table:
  paper = {"Baseline": (90.74, 64.77), "FAER": (91.75, 66.66)}
  cells = {}
  for row, make in (("Baseline", baseline), ("FAER", faer)):
    for dataset, figure in zip(("rafdb", "affectnet7"), paper[row]):
      cells[row, DATASET_NAMES[dataset]] = Cell(make(dataset), figure)
  return Table("Table 4: Baseline and FAER, accuracy (%)", ("Baseline", "FAER"), ("RAF-DB", "AffectNet-7"), cells)


def _table5() -> Table:
  paper = {
      ("rafdb", "Baseline"): (88.20, 72.80, 75.39, 95.74, 90.86, 87.65, 89.97),
      ("rafdb", "FAER"): (90.06, 79.62, 72.37, 97.11, 86.99, 92.94, 92.72),
      ("affectnet7", "Baseline"): (61.39, 66.18, 67.23, 77.20, 53.05, 71.07, 59.26),
      ("affectnet7", "FAER"): (62.25, 72.86, 70.22, 80.97, 56.57, 66.33, 59.93),
  }
  rows, cells = [], {}
  for (dataset, model), figures in paper.items():
    row = f"{DATASET_NAMES[dataset]} {model}"
    rows.append(row)
    run = faer(dataset) if model == "FAER" else baseline(dataset)
    for expression, figure in zip(EXPRESSIONS, figures):
      cells[row, expression] = Cell(run, figure, f"class:{expression}")
  return Table("Table 5: accuracy (%) per expression", tuple(rows), EXPRESSIONS, cells)


def _fig3() -> Table:
  rows = tuple(f"λ = {lam:g}" for lam in LAMBDAS)
  paper = {"affectnet7": 66.66, "rafdb": 91.75}  # the paper prints the curve's value only at its best, λ = 0.01
  cells = {(row, DATASET_NAMES[d]): Cell(faer(d, lam), paper[d] if lam == LAMBDA else None)
           for row, lam in zip(rows, LAMBDAS) for d in ("affectnet7", "rafdb")}
  return Table("Fig. 3: FAER's accuracy (%) against the center-loss weight λ", rows, ("AffectNet-7", "RAF-DB"), cells,
               figure="fig3")


def _fig4(attribute_names) -> Table:
  cells = {}
  for name in attribute_names:
    cells[name, "Baseline"] = Cell(celeba("focal", False), None, f"attribute:{name}")
    cells[name, "FAER"] = Cell(celeba("focal", True), None, f"attribute:{name}")
  cells["Mean", "Baseline"] = Cell(celeba("focal", False), 91.66)
  cells["Mean", "FAER"] = Cell(celeba("focal", True), 91.87)
  return Table("Fig. 4: CelebA accuracy (%) per attribute, focal loss", tuple(attribute_names) + ("Mean",),
               ("Baseline", "FAER"), cells, figure="fig4")


def _fig56() -> Table:
  rows = ("CelebA (focal loss)", "AffectNet-7")
  cells = {("CelebA (focal loss)", "Baseline"): Cell(celeba("focal", False), 91.66),
           ("CelebA (focal loss)", "FAER"): Cell(celeba("focal", True), 91.87),
           ("AffectNet-7", "Baseline"): Cell(baseline("affectnet7"), 64.77),
           ("AffectNet-7", "FAER"): Cell(faer("affectnet7"), 66.66)}
  return Table("Figs. 5 and 6: the runs whose Grad-CAM maps are drawn, accuracy (%)", rows, ("Baseline", "FAER"),
               cells)


def experiments() -> dict[str, Experiment]:
  """Every experiment by name; 'all' holds every table, each run trained once."""
  from faer_jax.data.celeba import ATTRIBUTE_NAMES
  found = [
      Experiment("table2", "Table 2: Baseline, + CC Attention, + center loss on RAF-DB and AffectNet-7",
                 (_table2(),)),
      Experiment("fig3", "Fig. 3: the center-loss weight λ", (_fig3(),), figures=("fig3",)),
      Experiment("table3", "Table 3: CelebA with the asymmetric, BCE and focal losses", (_table3(),)),
      Experiment("table4", "Table 4: Baseline and FAER on RAF-DB and AffectNet-7", (_table4(),)),
      Experiment("table5", "Table 5: per-expression accuracy of Baseline and FAER", (_table5(),)),
      Experiment("fig4", "Fig. 4: CelebA per-attribute accuracy of Baseline and FAER", (_fig4(ATTRIBUTE_NAMES),),
                 figures=("fig4",)),
      Experiment("fig56", "Figs. 5 and 6: Grad-CAM maps of Baseline and FAER", (_fig56(),), figures=("fig56",)),
  ]
  by_name = {e.name: e for e in found}
  by_name["all"] = Experiment("all", "Every table and figure of the paper",
                              tuple(t for e in found for t in e.tables),
                              figures=tuple(f for e in found for f in e.figures))
  return by_name
