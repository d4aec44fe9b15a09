"""Fixed task weights: u = Σ_i w_i g_i (all ones by default, the plain summed loss)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._validation import check_numbers
from .base import Method


class Sum(Method):
    """The baseline every other method is compared with: fixed weights, ``None`` meaning all 1."""

    name = "sum"

    def __init__(self, *, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.weights = None if weights is None else check_numbers(weights, "weights")

    def _check_num_tasks(self, num_tasks: int) -> None:
        if self.weights is not None and len(self.weights) != num_tasks:
            raise ValueError(f"weights has {len(self.weights)} entries for {num_tasks} tasks: {self.weights}")

    def compute_weights(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            return torch.ones(gram.shape[0], dtype=gram.dtype, device=gram.device)
        return torch.tensor(self.weights, dtype=gram.dtype, device=gram.device)
