"""Gradient Vaccine: steer pairwise gradient cosines toward their running targets (Wang et al. 2021).

Each ordered pair (i, j) keeps a target φ̂_ij, an exponential moving average of the observed cosine
(φ̂ ← (1 − β) φ̂ + β φ, updated every step for every pair). Visiting the other tasks j in a random order,
with φ = cos(g'_i, g_j): if φ < φ̂_ij, g'_i gains

    ‖g'_i‖ (φ̂ √(1 − φ²) − φ √(1 − φ̂²)) / (‖g_j‖ √(1 − φ̂²)) · g_j,

which sets cos(g'_i, g_j) to φ̂. The fused gradient is Σ_i g'_i. With every φ̂ = 0 this is exactly the
PCGrad projection, so the first step equals PCGrad's with the same seed. Works on the Gram matrix.

A pair with a zero gradient has no cosine: it is neither adjusted nor counted in the moving average.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._projection import draw_orders
from .base import Method, gram_to_numpy, new_generator

# A target of exactly ±1 would ask for an infinite adjustment; keep it strictly inside (−1, 1).
_MAX_TARGET = 1.0 - 1e-6


class GradVac(Method):
    name = "gradvac"

    def __init__(self, *, beta: float = 0.01, seed: int | None = None) -> None:
        beta = float(beta)
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must lie in (0, 1], got {beta}")
        super().__init__(beta=beta, seed=seed)
        self.beta = beta
        self.generator = new_generator(seed)
        self.targets: torch.Tensor | None = None

    def _init_state(self, num_tasks: int) -> None:
        self.targets = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)

    def compute_weights(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        g = gram_to_numpy(gram)
        num_tasks = g.shape[0]
        targets = self.targets.numpy().copy()
        orders = draw_orders(num_tasks, self.generator)
        coef = np.eye(num_tasks)
        for i, order in enumerate(orders):
            for j in order:
                norm_j = math.sqrt(max(g[j, j], 0.0))
                norm_i = math.sqrt(max(coef[i] @ g @ coef[i], 0.0))
                if norm_i == 0.0 or norm_j == 0.0:
                    continue
                phi = min(max((coef[i] @ g[:, j]) / (norm_i * norm_j), -1.0), 1.0)
                target = min(max(targets[i, j], -_MAX_TARGET), _MAX_TARGET)
                if phi < target:
                    root_target = math.sqrt(1.0 - target * target)
                    coef[i, j] += (
                        norm_i
                        * (target * math.sqrt(1.0 - phi * phi) - phi * root_target)
                        / (norm_j * root_target)
                    )
                targets[i, j] = (1.0 - self.beta) * targets[i, j] + self.beta * phi
        # Committed only now: a step that fails before this point leaves the targets as they were.
        self.targets.copy_(torch.from_numpy(targets))
        return torch.from_numpy(coef.sum(axis=0))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "targets": self.targets}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        if state.get("targets") is not None:
            self.targets = state["targets"].detach().to(torch.float64).clone()
