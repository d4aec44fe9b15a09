"""Seeded, offline multi-task benchmark problems.

Every problem module (``toy``, ``synthetic``, ``recsys``, ``multidigit``, ``tabular``, ``ranking``) has a
function ``make(seed: int, **size_options) -> Problem``.  A :class:`Problem` gives

``name``, ``num_tasks``, ``task_names``
    identification; ``task_names[i]`` names the i-th loss.
``build_model(seed=None) -> torch.nn.Module``
    a fresh model (shared trunk + one head per task, see :class:`MultiHeadModel`) whose ``model(x)`` returns
    a tuple of ``num_tasks`` outputs.  The initialisation is seeded (by the problem's seed unless ``seed`` is
    given) and does not touch the global torch RNG.
``train_batches(batch_size, generator, num_steps=None) -> iterator of (x, targets)``
    minibatches of the training set, shuffled by ``generator`` (a ``torch.Generator`` or an int seed).
    ``targets`` is a tuple with one entry per task.  ``num_steps=None`` yields one epoch (the last batch
    may be smaller); an int yields exactly that many batches, reshuffling at every epoch boundary.
``losses(outputs, targets) -> list[Tensor]``
    the ``num_tasks`` scalar training losses.
``evaluate(model) -> dict[str, float]``
    test metrics with self-describing names (``click_auc``, ``watch_mse``, ...); the keys are listed in
    ``metric_names`` and ``higher_is_better[name]`` says in which direction each one improves.

Identical seeds give bit-identical data; generation uses only ``numpy.random.Generator`` and
``torch.Generator`` objects, never the global RNGs.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["PROBLEMS", "MultiHeadModel", "Problem", "as_generator", "iterate_minibatches", "make"]

#: problem name -> module inside this package
PROBLEMS = {
    "toy": "toy",
    "synthetic": "synthetic",
    "recsys": "recsys",
    "multidigit": "multidigit",
    "tabular": "tabular",
    "ranking": "ranking",
}


def make(name: str, seed: int = 0, **size_options) -> Problem:
    """``make("recsys", seed=1, n_train=2000)`` is ``benchmarks.problems.recsys.make(1, n_train=2000)``."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; known: {sorted(PROBLEMS)}")
    module = importlib.import_module(f"{__name__}.{PROBLEMS[name]}")
    return module.make(seed, **size_options)


def as_generator(generator: torch.Generator | int | None, default_seed: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator``: passed through, built from an int seed, or seeded with ``default_seed``."""
    if isinstance(generator, torch.Generator):
        return generator
    g = torch.Generator()
    g.manual_seed(int(default_seed if generator is None else generator))
    return g


def _index(x, idx: torch.Tensor):
    """Row selection that also works on (nested) tuples of tensors."""
    if isinstance(x, tuple):
        return tuple(_index(part, idx) for part in x)
    return x[idx]


def iterate_minibatches(
    x,
    targets: tuple,
    n: int,
    batch_size: int,
    generator: torch.Generator | int | None,
    num_steps: int | None = None,
) -> Iterator[tuple]:
    """Shuffled minibatches of ``n`` rows of ``x`` (a tensor or tuple of tensors) and of each target.

    ``num_steps=None``: one epoch, last batch possibly smaller.  ``num_steps=k``: exactly k batches of
    ``min(batch_size, n)`` rows, a new permutation at each epoch (a short tail is dropped in that mode so that
    every step sees the same batch size).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    g = as_generator(generator)
    if num_steps is None:
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            yield _index(x, idx), tuple(_index(t, idx) for t in targets)
        return
    bs = min(batch_size, n)
    done = 0
    while done < num_steps:
        perm = torch.randperm(n, generator=g)
        for start in range(0, n - bs + 1, bs):
            if done == num_steps:
                return
            idx = perm[start : start + bs]
            yield _index(x, idx), tuple(_index(t, idx) for t in targets)
            done += 1


class MultiHeadModel(nn.Module):
    """``trunk`` shared by all tasks, then one head per task: ``forward(x) -> tuple(head_i(trunk(x)))``.

    Outputs of heads ending in a single unit are squeezed to shape ``(B,)``.
    """

    def __init__(self, trunk: nn.Module, heads: Sequence[nn.Module], squeeze: bool = True):
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)
        self.squeeze = squeeze

    def forward(self, x):
        z = self.trunk(x)
        outs = []
        for head in self.heads:
            o = head(z)
            if self.squeeze and o.dim() == 2 and o.shape[1] == 1:
                o = o[:, 0]
            outs.append(o)
        return tuple(outs)


class Problem:
    """Base class of the benchmark problems (see the module docstring for the interface)."""

    name: str = "problem"
    task_names: tuple[str, ...] = ()
    metric_names: tuple[str, ...] = ()
    higher_is_better: dict[str, bool] = {}

    def __init__(self, seed: int):
        self.seed = int(seed)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    # -- to implement -----------------------------------------------------------------------------------
    def _build_model(self) -> nn.Module:
        raise NotImplementedError

    def train_batches(self, batch_size: int, generator=None, num_steps: int | None = None):
        raise NotImplementedError

    def losses(self, outputs, targets) -> list[torch.Tensor]:
        raise NotImplementedError

    def _evaluate(self, model: nn.Module) -> dict[str, float]:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------------
    def build_model(self, seed: int | None = None) -> nn.Module:
        """A freshly initialised model, depending only on ``seed`` (default: the problem's seed)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed if seed is None else int(seed))
            return self._build_model()

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Test metrics (``metric_names``) of ``model``; the model is put in eval mode and then restored."""
        was_training = model.training
        model.eval()
        try:
            out = self._evaluate(model)
        finally:
            model.train(was_training)
        return {k: float(v) for k, v in out.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, seed={self.seed}, tasks={list(self.task_names)})"


def numpy_rng(seed: int, stream: int = 0) -> np.random.Generator:
    """A numpy Generator for an independent ``stream`` of a problem's ``seed`` (data, split, noise, ...)."""
    return np.random.default_rng([int(seed), int(stream)])
