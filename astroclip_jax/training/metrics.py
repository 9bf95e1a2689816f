"""Per-epoch metric writing (JSON lines + TensorBoard) and the training-curve figure.

``metrics.jsonl`` in the work directory holds one JSON object per line, appended and
flushed on every write so a crashed or resumed run keeps its history. TensorBoard events
go through tensorboardX (no TensorFlow) when it is installed; otherwise they are skipped.
"""

import csv
import dataclasses
import json
import math
import os

import numpy as np

from astroclip_jax import files
from astroclip_jax.data import shipped_files

METRICS_FILE = "metrics.jsonl"


def _to_python(value):
    """JSON-able Python scalar from numbers, NumPy or JAX scalars (NaN/inf as floats)."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    arr = np.asarray(value)
    if arr.ndim == 0:
        return arr.item()
    return arr.tolist()


class MetricWriter:
    """Write metrics per step/epoch to ``workdir/metrics.jsonl`` and TensorBoard.

    Usage: ``w = MetricWriter(workdir); w.write(epoch, {"train/loss": 5.1, "lr": 5e-4})``.
    Each line is ``{"step": step, **metrics}``. Non-scalar values are written to JSON only.
    """

    def __init__(self, workdir, tensorboard=True):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILE)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # optional: JSON lines are the record of truth
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))

    def write(self, step, metrics):
        """Append one record for ``step`` and flush it to disk."""
        record = {"step": int(step)}
        record.update({k: _to_python(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(name, value, int(step))
            self._tb.flush()

    def close(self):
        """Close the JSON file and the TensorBoard writer."""
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path):
    """Records of a ``metrics.jsonl`` file (or of a work directory) as a list of dicts.

    A truncated last line (a run killed mid-write) is ignored.
    """
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def read_paper_curve(path):
    """(epoch, loss) arrays from a wandb CSV export of the reproduction paper's run.

    The export's x axis is the global optimiser step, logged once per epoch; the epoch
    number is recovered as ``round(step / steps_per_epoch)`` with steps_per_epoch the
    median step spacing (33 in that run), so the first logged point is epoch 1.
    """
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    # the loss column is the one without the __MIN/__MAX suffix
    col = next(i for i, h in enumerate(header)
               if i > 0 and not h.endswith(("__MIN", "__MAX")))
    step = np.array([float(r[0]) for r in body])
    loss = np.array([float(r[col]) for r in body])
    spacing = np.median(np.diff(step)) if len(step) > 1 else max(step[0], 1.0)
    epoch = np.round(step / spacing)
    return epoch, loss


def _series(records, key):
    xs, ys = [], []
    for r in records:
        value = r.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(r.get("epoch", r["step"]))
            ys.append(value)
    return np.array(xs), np.array(ys)


def _first_key(records, candidates):
    for key in candidates:
        if any(key in r for r in records):
            return key
    return None


def plot_training_curves(metrics_path, out_png, reference=True, batch_size=None,
                         train_key=None, val_key=None, lr_key=None):
    """Draw train/validation InfoNCE per epoch (top) and the learning rate (bottom, log).

    Like Figure 5 of the reproduction paper. The x axis is the record's ``epoch`` if
    present, else its ``step``. Chance level ``ln(B)`` is dashed, with B from
    ``batch_size`` or the records' ``batch_size`` field. With ``reference``, the paper's
    real curves (wandb exports, step converted to epoch) are drawn for comparison.
    Metric names default to the first present of ``train/loss``, ``train_loss``, ... .
    The PNG is written atomically (temporary file + ``os.replace``).
    """
    # An Agg canvas bound to a bare Figure: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    train_key = train_key or _first_key(records, ("train/loss", "train_loss", "train/infonce"))
    val_key = val_key or _first_key(records, ("val/loss", "val_loss", "eval/loss", "val/infonce"))
    lr_key = lr_key or _first_key(records, ("train/lr", "lr", "learning_rate"))
    if batch_size is None:
        sizes = [r["batch_size"] for r in records if "batch_size" in r]
        batch_size = sizes[-1] if sizes else None

    fig = Figure(figsize=(7, 7))
    FigureCanvasAgg(fig)
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    if train_key:
        ax_loss.plot(*_series(records, train_key), "o-", ms=3, color="C0", label="train (this run)")
    if val_key:
        ax_loss.plot(*_series(records, val_key), "o-", ms=3, color="C1", label="validation (this run)")
    if reference:
        for split, color in (("train", "C0"), ("val", "C1")):
            epoch, loss = read_paper_curve(shipped_files.paper_curve_path(split))
            name = "train" if split == "train" else "validation"
            ax_loss.plot(epoch, loss, "-.", color=color, alpha=0.5,
                         label=f"{name} (paper's run; wandb step converted to epoch)")
    if batch_size:
        ax_loss.axhline(math.log(batch_size), ls="--", color="k",
                        label=f"chance ln(B) = {math.log(batch_size):.3f} (B = {batch_size})")
    ax_loss.set_ylabel("InfoNCE loss")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)

    if lr_key:
        xs, ys = _series(records, lr_key)
        positive = ys > 0
        ax_lr.plot(xs[positive], ys[positive], "-", color="C2")
        if positive.any():
            ax_lr.set_yscale("log")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("epoch")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out_png)


def save_figure(fig, out_png):
    """Write a matplotlib Figure as a PNG atomically (a reader never sees half of one)."""
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    with files.atomic_path(out_png, suffix=".png") as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return out_png


@dataclasses.dataclass(frozen=True)
class Panel:
    """One axes of a training-curve figure: metrics of the records against the epoch."""

    ylabel: str
    series: tuple  # (metrics key, legend label) pairs
    log: bool = False  # logarithmic y axis
    chance: tuple | None = None  # (y, label): a dashed line, e.g. a blind guess's loss
    height: int = 1  # relative height
    line: str = "o-"  # matplotlib format of the series


@dataclasses.dataclass(frozen=True)
class Curves:
    """A trainer's end-of-run figure: its panels top to bottom, sharing the epoch axis."""

    panels: tuple
    title: str | None = None
    figsize: tuple = (7, 7)


def plot_curves(metrics_path, out_png, curves):
    """Draw `curves` (a `Curves`) from a metrics.jsonl file to `out_png` (atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    fig = Figure(figsize=curves.figsize)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(curves.panels), 1, sharex=True, squeeze=False, gridspec_kw={
        "height_ratios": [p.height for p in curves.panels]})[:, 0]
    for ax, panel in zip(axes, curves.panels):
        for key, label in panel.series:
            ax.plot(*_series(records, key), panel.line, ms=3, label=label)
        if panel.chance is not None:
            ax.axhline(panel.chance[0], color="grey", ls="--", label=panel.chance[1])
        if panel.log:
            ax.set_yscale("log")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if len(panel.series) > 1 or panel.chance is not None:
            ax.legend(fontsize=8)
    if curves.title:
        axes[0].set_title(curves.title)
    axes[-1].set_xlabel("epoch")
    fig.tight_layout()
    return save_figure(fig, out_png)
