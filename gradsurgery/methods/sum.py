"""Fixed task weights: u = Σ_i w_i g_i (all ones by default, the plain summed loss)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import Method


class Sum(Method):
    """The baseline every other method is compared with: fixed weights, ``None`` meaning all 1."""

    name = "sum"

    def __init__(self, *, weights: Sequence[float] | None = None) -> None:
        if weights is not None:
            if isinstance(weights, torch.Tensor):
                weights = weights.detach().cpu().tolist()
            weights = [float(w) for w in weights]
            bad = [w for w in weights if not math.isfinite(w)]
            if bad:
                raise ValueError(f"weights must be finite, got {weights}")
        super().__init__(weights=weights)
        self._weights = weights

    def _check_num_tasks(self, num_tasks: int) -> None:
        if self._weights is not None and len(self._weights) != num_tasks:
            raise ValueError(
                f"weights has {len(self._weights)} entries for {num_tasks} tasks: {self._weights}"
            )

    def compute_weights(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        if self._weights is None:
            return torch.ones(gram.shape[0], dtype=gram.dtype, device=gram.device)
        return torch.tensor(self._weights, dtype=gram.dtype, device=gram.device)
