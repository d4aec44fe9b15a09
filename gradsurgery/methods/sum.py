"""Fixed task weights: the plain weighted loss Σ_i w_i L_i (all ones by default, the summed loss).

Its gradient is Σ_i w_i g_i for every parameter, task-specific ones included (w_i g_i), exactly what
``(w * losses).sum().backward()`` gives, so by default ``GradSurgery`` takes that one backward pass: no
per-task gradient, no Gram matrix (the Gram diagnostics of ``StepInfo`` read NaN). ``diagnostics=True``
takes the T per-task backward passes instead, for the same gradients plus G (norms, cosines, conflicts,
shares) in ``StepInfo``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .._validation import check_per_task_numbers, resolve_per_task
from .base import LossValueWeighting


class Sum(LossValueWeighting):
    """The baseline every other method is compared with: fixed weights (one per task, by index or by task
    name), ``None`` meaning all 1."""

    name = "sum"
    skips_absent_tasks = True

    def __init__(
        self, *, weights: Sequence[float] | Mapping[str, float] | None = None, diagnostics: bool = False
    ) -> None:
        super().__init__(diagnostics=diagnostics)
        self.weights = None if weights is None else check_per_task_numbers(weights, "weights")
        self._weights: list[float] | None = None

    def _check_num_tasks(self, num_tasks: int, task_names: Sequence[str] | None) -> None:
        if self.weights is not None:
            resolve_per_task(self.weights, num_tasks, task_names, "weights")

    def _init_state(self, num_tasks: int) -> None:
        if self.weights is not None:
            self._weights = resolve_per_task(self.weights, num_tasks, self.task_names, "weights")

    def loss_weights(self, present: list[int] | None, losses: torch.Tensor) -> torch.Tensor:
        if self._weights is None:
            return torch.ones(losses.shape[0], dtype=losses.dtype, device=losses.device)
        weights = self._weights if present is None else [self._weights[i] for i in present]
        return torch.tensor(weights, dtype=losses.dtype, device=losses.device)
