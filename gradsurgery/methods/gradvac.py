"""Gradient Vaccine: steer pairwise gradient cosines toward their running targets (Wang et al. 2021).

Each ordered pair (i, j) keeps a target φ̂_ij, an exponential moving average of the observed cosine
(φ̂ ← (1 − β) φ̂ + β φ, updated every step for every pair). Visiting the other tasks j in a random order,
with φ = cos(g'_i, g_j): if φ < φ̂_ij, g'_i gains

    ‖g'_i‖ (φ̂ √(1 − φ²) − φ √(1 − φ̂²)) / (‖g_j‖ √(1 − φ̂²)) · g_j,

which sets cos(g'_i, g_j) to φ̂. The fused gradient is Σ_i g'_i. With every φ̂ = 0 this is exactly the
PCGrad projection, so the first step equals PCGrad's with the same seed. Works on the Gram matrix: with
g'_i = Σ_k C_ik g_k, the row C_i G of inner products ⟨g'_i, g_k⟩ is kept up to date (an adjustment by
c·g_j adds c·G_j) and ‖g'_i‖² = C_i G C_iᵀ is formed from it after each adjustment, so a visit costs O(1)
and an adjustment O(T): O(T³) per step at worst.

A pair with a zero gradient has no cosine: it is neither adjusted nor counted in the moving average. Nor is
a pair with a task absent from the step (its loss ``None``): the step runs on the present tasks alone, in a
random order of them, with their pairs' targets, and the pairs with an absent task keep theirs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .._validation import check_number
from ._projection import draw_orders
from .base import Method, bound_state, gram_to_numpy, require_gram

# A target of exactly ±1 would ask for an infinite adjustment; keep it strictly inside (−1, 1).
_MAX_TARGET = 1.0 - 1e-6


class GradVac(Method):
    name = "gradvac"
    skips_absent_tasks = True  # the present tasks' pairs only: see the module docstring

    def __init__(self, *, beta: float = 0.01, seed: int | None = None) -> None:
        super().__init__()
        self.beta = check_number(beta, "beta", minimum=0.0, exclusive_minimum=True, maximum=1.0)
        self.seed = seed
        self.generator = self.new_generator(seed)
        self.targets: torch.Tensor | None = None

    def _init_state(self, num_tasks: int) -> None:
        self.targets = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)

    def compute_weights(self, gram: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        state = bound_state(self.targets, self.name).numpy()
        targets = state.tolist()
        weights = self._vaccinate(gram, targets)
        state[:] = targets
        return weights

    def compute_present(
        self, present: list[int], gram: torch.Tensor | None, losses: torch.Tensor
    ) -> torch.Tensor:
        state = bound_state(self.targets, self.name).numpy()
        every = state.tolist()
        targets = [[every[i][j] for j in present] for i in present]
        weights = self._vaccinate(gram, targets)
        state[np.ix_(present, present)] = targets
        return weights

    def _vaccinate(self, gram: torch.Tensor | None, targets: list[list[float]]) -> torch.Tensor:
        """The weights Σ_i C_i for G, with its tasks' pair targets ``targets`` (rows, updated in place)."""
        gram = require_gram(gram, self.name)
        g = gram_to_numpy(gram)
        num_tasks = g.shape[0]
        # Python floats throughout: the loop visits T(T − 1) pairs one after the other, each a handful of
        # scalar operations, where a numpy call per operation would cost more than the arithmetic.
        rows = g.tolist()
        orders = draw_orders(num_tasks, self.generator)
        sqrt = math.sqrt
        norms = [sqrt(max(rows[j][j], 0.0)) for j in range(num_tasks)]
        keep, beta = 1.0 - self.beta, self.beta
        weights = [0.0] * num_tasks
        for i, order in enumerate(orders):
            coef = [0.0] * num_tasks
            coef[i] = 1.0
            inner = rows[i]  # (C_i G)_k = ⟨g'_i, g_k⟩, updated with each adjustment of C_i
            norm_i = norms[i]
            row_targets = targets[i]
            for j in order:
                norm_j = norms[j]
                if norm_i == 0.0 or norm_j == 0.0:
                    continue
                phi = inner[j] / (norm_i * norm_j)
                if phi > 1.0:
                    phi = 1.0
                elif phi < -1.0:
                    phi = -1.0
                target = row_targets[j]
                if target > _MAX_TARGET:
                    target = _MAX_TARGET
                elif target < -_MAX_TARGET:
                    target = -_MAX_TARGET
                if phi < target:
                    root_target = sqrt(1.0 - target * target)
                    step = (
                        norm_i * (target * sqrt(1.0 - phi * phi) - phi * root_target) / (norm_j * root_target)
                    )
                    coef[j] += step
                    inner = [a + step * b for a, b in zip(inner, rows[j], strict=True)]
                    square = 0.0  # summed in order: builtin sum() compensates from Python 3.12 on
                    for c, q in zip(coef, inner, strict=True):
                        square += c * q
                    norm_i = sqrt(max(square, 0.0))
                row_targets[j] = keep * row_targets[j] + beta * phi
            weights = [w + c for w, c in zip(weights, coef, strict=True)]
        return torch.tensor(weights, dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        return {"targets": None if self.targets is None else self.targets.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("targets") is not None:
            self.targets = state["targets"].detach().to(torch.float64).clone()
