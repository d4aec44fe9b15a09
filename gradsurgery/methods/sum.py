"""Fixed task weights: u = Σ_i w_i g_i (all ones by default, the plain summed loss)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .._validation import check_per_task_numbers, resolve_per_task
from .base import Method


class Sum(Method):
    """The baseline every other method is compared with: fixed weights (one per task, by index or by task
    name), ``None`` meaning all 1."""

    name = "sum"

    def __init__(self, *, weights: Sequence[float] | Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.weights = None if weights is None else check_per_task_numbers(weights, "weights")
        self._weights: list[float] | None = None

    def _check_num_tasks(self, num_tasks: int, task_names: Sequence[str] | None) -> None:
        if self.weights is not None:
            resolve_per_task(self.weights, num_tasks, task_names, "weights")

    def _init_state(self, num_tasks: int) -> None:
        if self.weights is not None:
            self._weights = resolve_per_task(self.weights, num_tasks, self.task_names, "weights")

    def compute_weights(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        if self._weights is None:
            return torch.ones(gram.shape[0], dtype=gram.dtype, device=gram.device)
        return torch.tensor(self._weights, dtype=gram.dtype, device=gram.device)
