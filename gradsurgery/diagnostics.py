"""Logging and plotting the per-step diagnostics of ``GradSurgery.backward``.

Every ``StepInfo`` carries the weights applied, the losses, the task-gradient norms, the T×T cosine matrix,
the number of conflicting pairs (cosine < 0) and the norm of the fused gradient, all derived from the Gram
matrix the method already needed: logging them costs no backward pass. ``StepInfo.as_dict`` flattens them
into scalars named ``weight/<task>``, ``loss/<task>``, ``grad_norm/<task>``, ``cos/<a>,<b>``,
``num_conflicts`` and ``fused_norm``; the loggers here write those rows.

    with CSVLogger("run/diag.csv", task_names=["seg", "depth"]) as log:
        for step in range(n):
            ...; info = opt.backward(losses); opt.step()
            log.log(info, step)
    plot_history("run/diag.csv").savefig("run/diag.png")

No dependency beyond the standard library is needed for CSV. ``TensorBoardLogger`` needs the
``tensorboard`` package (``pip install gradsurgery[tensorboard]``) and ``plot_history`` needs matplotlib
(``pip install gradsurgery[plot]``); both are imported only when used.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .info import StepInfo

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch.utils.tensorboard import SummaryWriter

STEP = "step"
# What ``history_columns`` and ``plot_history`` read: a CSVLogger file, columns, StepInfos or logged rows.
History = (
    str
    | os.PathLike[str]
    | Mapping[str, Sequence[float]]
    | Sequence[StepInfo]
    | Sequence[Mapping[str, float]]
)


def info_row(
    info: StepInfo, step: int | None = None, task_names: Sequence[str] | None = None, **extra: float
) -> dict[str, float]:
    """One flat row: ``step`` (when given), the ``StepInfo.as_dict`` scalars, then ``extra`` scalars."""
    if not isinstance(info, StepInfo):
        raise TypeError(f"expected the StepInfo returned by GradSurgery.backward, got {type(info).__name__}")
    row: dict[str, float] = {}
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {step!r}")
        row[STEP] = step
    row.update(info.as_dict(list(task_names) if task_names is not None else None))
    for key, value in extra.items():
        if key in row:
            raise ValueError(f"extra scalar {key!r} collides with a diagnostic of the same name")
        row[key] = float(value)
    return row


class CSVLogger:
    """Appends one row per logged step to a CSV file (header from the first row).

    Args:
        path: the file; created (with its directory) or overwritten, or appended to with ``append=True``
            (its header must then match the rows logged).
        task_names: names used in the column headers instead of 0..T−1.
        flush_every: flush the file every this many rows (the last rows are flushed by ``close``).

    ``log(info, step=None, **extra)``: ``step`` defaults to the number of rows this logger has written;
    ``extra`` adds scalars (e.g. ``lr=...``). Every row must have the same columns. Floats are written
    with ``repr``, so reading them back (``read_csv``) gives the exact values.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        task_names: Sequence[str] | None = None,
        *,
        append: bool = False,
        flush_every: int = 1,
    ) -> None:
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be a positive int, got {flush_every!r}")
        self.path = os.fspath(path)
        self.task_names = list(task_names) if task_names is not None else None
        self.flush_every = flush_every
        self.rows = 0
        self._columns: list[str] | None = None
        if append and os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, newline="") as f:
                self._columns = next(csv.reader(f))
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        self._file = open(self.path, "a" if append else "w", newline="")  # noqa: SIM115 (closed by close())
        self._writer: csv.DictWriter[str] | None = None
        if self._columns is not None:
            self._writer = csv.DictWriter(self._file, fieldnames=self._columns)

    def log(self, info: StepInfo, step: int | None = None, **extra: float) -> dict[str, float]:
        """Write one row and return it."""
        if self._file.closed:
            raise ValueError(f"CSVLogger for {self.path!r} is closed")
        row = info_row(info, self.rows if step is None else step, self.task_names, **extra)
        writer = self._writer  # None exactly while self._columns is: no header yet
        if writer is None:
            self._columns = list(row)
            writer = self._writer = csv.DictWriter(self._file, fieldnames=self._columns)
            writer.writeheader()
        elif list(row) != self._columns:
            raise ValueError(
                f"row columns {sorted(set(row) ^ set(writer.fieldnames))} differ from the file's header; "
                "log the same tasks and extras every step"
            )
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
        self.rows += 1
        if self.rows % self.flush_every == 0:
            self._file.flush()
        return row

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> CSVLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_csv(path: str | os.PathLike[str]) -> dict[str, list[float]]:
    """The columns of a file written by ``CSVLogger``: name → values (floats; ``step`` as ints)."""
    with open(os.fspath(path), newline="") as f:
        reader = csv.DictReader(f)
        columns: dict[str, list[float]] = {name: [] for name in reader.fieldnames or []}
        for row in reader:
            for name, value in row.items():
                columns[name].append(int(value) if name == STEP else float(value))
    return columns


def _tensorboard_writer_class() -> type[SummaryWriter]:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(
            "TensorBoardLogger needs the 'tensorboard' package: pip install tensorboard "
            "(or pip install gradsurgery[tensorboard]); CSVLogger works without it"
        ) from err
    return SummaryWriter


class TensorBoardLogger:
    """Writes the diagnostics as TensorBoard scalars ``<prefix>/weight/<task>``, ``<prefix>/cos/<a>,<b>``, ...

    Args:
        log_dir: directory for a new ``torch.utils.tensorboard.SummaryWriter`` (its default when None).
        task_names: names used in the tags instead of 0..T−1.
        prefix: tag prefix grouping these scalars in TensorBoard.
        writer: an existing ``SummaryWriter`` (or anything with ``add_scalar(tag, value, step)``) to write
            to instead of creating one; it is then left open by ``close``.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        task_names: Sequence[str] | None = None,
        *,
        prefix: str = "gradsurgery",
        writer: Any = None,
    ) -> None:
        self.task_names = list(task_names) if task_names is not None else None
        self.prefix = prefix.rstrip("/")
        self._owns_writer = writer is None
        if writer is None:
            writer = _tensorboard_writer_class()(log_dir=None if log_dir is None else os.fspath(log_dir))
        elif not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(
                f"writer must have an add_scalar(tag, value, step) method, got {type(writer).__name__}"
            )
        self.writer = writer
        self.rows = 0

    def log(self, info: StepInfo, step: int | None = None, **extra: float) -> dict[str, float]:
        """Write one step's scalars and return them (``step`` defaults to the number of steps logged)."""
        step = self.rows if step is None else step
        row = info_row(info, step, self.task_names, **extra)
        del row[STEP]
        for key, value in row.items():
            self.writer.add_scalar(f"{self.prefix}/{key}" if self.prefix else key, value, step)
        self.rows += 1
        return row

    def close(self) -> None:
        if self._owns_writer:
            self.writer.close()
        elif callable(getattr(self.writer, "flush", None)):
            self.writer.flush()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def history_columns(
    history: History,
    task_names: Sequence[str] | None = None,
) -> dict[str, list[float]]:
    """Columns (name → values over steps) from a ``CSVLogger`` file, a column mapping, StepInfos or rows."""
    if isinstance(history, (str, os.PathLike)):
        return read_csv(history)
    if isinstance(history, Mapping):
        return {k: list(v) for k, v in history.items()}
    if not isinstance(history, Sequence):
        raise TypeError(
            f"history must be a CSV path, a column mapping or a sequence, got {type(history).__name__}"
        )
    rows = []
    for k, item in enumerate(history):
        if isinstance(item, StepInfo):
            rows.append(info_row(item, k, task_names))
        elif isinstance(item, Mapping):
            rows.append(dict(item))
        else:
            raise TypeError(f"history[{k}] is a {type(item).__name__}, expected a StepInfo or a row mapping")
    columns: dict[str, list[float]] = {}
    for k, row in enumerate(rows):
        for name, value in row.items():
            columns.setdefault(name, [math.nan] * k).append(value)
        for values in columns.values():
            if len(values) < k + 1:
                values.append(math.nan)
    return columns


def plot_history(
    history: History,
    task_names: Sequence[str] | None = None,
    *,
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """A matplotlib ``Figure`` with the task weights, each task's share of the fused step (comparable across
    methods, summing to 1; when logged) and the pairwise cosines over training.

    ``history``: a ``CSVLogger`` file, its ``read_csv`` columns, a list of ``StepInfo`` or of
    ``info_row`` dicts. ``task_names`` labels the tasks of a ``StepInfo`` list. Saved to ``path`` when given.
    Uses ``matplotlib.figure.Figure`` directly (no pyplot state, no display needed).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "plot_history needs matplotlib: pip install matplotlib (or gradsurgery[plot])"
        ) from err
    columns = history_columns(history, task_names)
    weight_keys = [k for k in columns if k.startswith("weight/")]
    share_keys = [k for k in columns if k.startswith("share/")]
    cos_keys = [k for k in columns if k.startswith("cos/")]
    if not weight_keys:
        raise ValueError(f"history has no 'weight/<task>' columns; columns are {sorted(columns)}")
    length = len(columns[weight_keys[0]])
    steps = columns.get(STEP, list(range(length)))

    fig = Figure(figsize=(7, 8 if share_keys else 6), layout="constrained")
    axes = fig.subplots(3 if share_keys else 2, 1, sharex=True)
    ax_w, ax_c = axes[0], axes[-1]
    for key in weight_keys:
        ax_w.plot(steps, columns[key], label=key.removeprefix("weight/"))
    ax_w.set_ylabel("task weight")
    ax_w.legend(loc="best", fontsize="small")
    if share_keys:
        ax_s = axes[1]
        for key in share_keys:
            ax_s.plot(steps, columns[key], label=key.removeprefix("share/"))
        ax_s.axhline(0.0, color="0.5", linewidth=0.8, linestyle="--")
        ax_s.set_ylabel("share of the fused step")
        ax_s.legend(loc="best", fontsize="small")
    for key in cos_keys:
        ax_c.plot(steps, columns[key], label=key.removeprefix("cos/"))
    ax_c.axhline(0.0, color="0.5", linewidth=0.8, linestyle="--")
    ax_c.set_ylim(-1.05, 1.05)
    ax_c.set_ylabel("cosine between task gradients")
    ax_c.set_xlabel(STEP)
    if cos_keys:
        ax_c.legend(loc="best", fontsize="small")
    if path is not None:
        fig.savefig(os.fspath(path))
    return fig


__all__ = ["CSVLogger", "TensorBoardLogger", "history_columns", "info_row", "plot_history", "read_csv"]
