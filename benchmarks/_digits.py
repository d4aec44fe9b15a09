"""Shared pieces of the two λ-free benchmarks (``l2_regularization.py``, ``noisy_labels.py``): scikit-learn's
shipped digits data (8×8 images, 10 classes, 1797 samples; no download), seeded splits, an MLP, the size
options of their command lines, and the Markdown/CSV writers."""

from __future__ import annotations

import argparse
import csv
import math
import pathlib
import statistics
import sys

import numpy as np
import torch

NUM_CLASSES = 10


def symmetric_noise(y: torch.Tensor, rate: float, gen: torch.Generator) -> torch.Tensor:
    """Exactly round(rate·n) labels, chosen at random, moved to a uniformly drawn *different* class."""
    n = len(y)
    flip = torch.randperm(n, generator=gen)[: round(rate * n)]
    shift = torch.randint(1, NUM_CLASSES, (len(flip),), generator=gen)
    noisy = y.clone()
    noisy[flip] = (y[flip] + shift) % NUM_CLASSES
    return noisy


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """(x (1797, 64) float32 in [0, 1], y (1797,) int64): ``load_digit_images`` of the multi-digit problem,
    flattened."""
    from benchmarks.problems.multidigit import load_digit_images

    images, labels = load_digit_images()
    return torch.from_numpy(images.reshape(len(images), -1)), torch.from_numpy(labels)


def split(n: int, sizes: list[int], seed: int) -> list[torch.Tensor]:
    """Disjoint random index sets of the given sizes (the last one takes the rest when its size is -1)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for size in sizes:
        stop = n if size == -1 else start + size
        out.append(perm[start:stop])
        start = stop
    return out


def standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Centre every pixel on the training mean and divide by one global scale (a per-pixel scale would blow
    up the border pixels that are almost always blank)."""
    mean = train.mean(0)
    scale = (train - mean).std().clamp_min(1e-6)
    return [(t - mean) / scale for t in (train, *others)]


def mlp(widths: list[int], seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(torch.nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def weight_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that weight decay and the L2 rules act on: those with two or more dimensions."""
    return [p for p in model.parameters() if p.dim() >= 2]


def optimizer(
    model: torch.nn.Module, name: str, lr: float, weight_decay: float | None = None
) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` (``name="sgd"``) or Adam over the model. With ``weight_decay``, the decay acts on
    the weight matrices only, and Adam becomes AdamW."""
    if weight_decay is None:
        params = list(model.parameters())
        return torch.optim.SGD(params, lr=lr) if name == "sgd" else torch.optim.Adam(params, lr=lr)
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": weight_matrices(model), "weight_decay": weight_decay},
        {"params": others, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=lr) if name == "sgd" else torch.optim.AdamW(groups, lr=lr)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def batches(n: int, batch_size: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pm(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    m, s = mean_std(values)
    return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def read_rows(folder: pathlib.Path) -> list[dict]:
    """The rows of every ``rows-*.csv`` under ``folder`` (the per-process files ``write_csv`` wrote)."""
    rows = []
    for path in sorted(folder.glob("rows-*.csv")):
        with path.open() as f:
            rows += list(csv.DictReader(f))
    return rows


def write_report(out: pathlib.Path, stem: str, rows: list[dict], text: str) -> None:
    """``out/<stem>.csv`` (one row per run) and ``out/<stem>.md`` (``text``), which is also printed."""
    write_csv(out / f"{stem}.csv", rows)
    (out / f"{stem}.md").write_text(text)
    print(text)


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that ran: ``python -m <module>`` and its arguments (``argv``, else the process's)."""
    return ("python -m " + module + " " + " ".join(argv if argv is not None else sys.argv[1:])).strip()


def add_size_options(
    parser: argparse.ArgumentParser, *, full: tuple[int, int], quick: tuple[int, int]
) -> None:
    """``--quick``, ``--epochs`` and ``--width``; ``full`` and ``quick`` are the (epochs, width) defaults
    without and with ``--quick``. ``run_size`` reads the choice back."""
    parser.add_argument("--quick", action="store_true", help="a smoke test of well under a minute")
    parser.add_argument(
        "--epochs", type=int, help=f"training epochs (default: {full[0]}; {quick[0]} with --quick)"
    )
    parser.add_argument(
        "--width", type=int, help=f"MLP hidden width (default: {full[1]}; {quick[1]} with --quick)"
    )
    parser.set_defaults(size_defaults=(full, quick))


def run_size(args: argparse.Namespace) -> tuple[int, int]:
    """(epochs, width) from the options of ``add_size_options``."""
    full, quick = args.size_defaults
    epochs, width = quick if args.quick else full
    return args.epochs or epochs, args.width or width


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
