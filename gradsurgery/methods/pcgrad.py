"""PCGrad: project each task gradient off the gradients it conflicts with (Yu et al. 2020).

For each task i, starting from g'_i = g_i and visiting the other tasks j in a fresh random order:
if ⟨g'_i, g_j⟩ < 0 then g'_i ← g'_i − ⟨g'_i, g_j⟩/‖g_j‖² · g_j (g_j the original gradient).
The fused gradient is the sum u = Σ_i g'_i. Carried out on the Gram matrix (see ``_projection``): a visit
reads ⟨g'_i, g_j⟩ from the row C_i G, kept up to date, in O(1), a projection updates that row in O(T), so
a step costs O(T²) visits and O(T³) at worst.
"""

from __future__ import annotations

import torch

from ._projection import draw_orders
from .base import Method, gram_to_numpy, require_gram


class PCGrad(Method):
    name = "pcgrad"
    skips_absent_tasks = True

    def __init__(self, *, seed: int | None = None) -> None:
        super().__init__()
        self.seed = seed
        self.generator = self.new_generator(seed)

    def compute_weights(self, gram: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        gram = require_gram(gram, self.name)
        rows = gram_to_numpy(gram).tolist()
        num_tasks = len(rows)
        orders = draw_orders(num_tasks, self.generator)
        # Python floats, as in GradVac: the row (C_i G)_k = ⟨g'_i, g_k⟩ is kept up to date, so a visit reads
        # its inner product (O(1)) and a projection updates the row (O(T)), where a numpy product per visit
        # would cost more than the arithmetic of T(T − 1) visits.
        weights = [0.0] * num_tasks
        for i, order in enumerate(orders):
            coef = [0.0] * num_tasks
            coef[i] = 1.0
            inner = rows[i]
            for j in order:
                dot, square = inner[j], rows[j][j]
                if dot < 0.0 and square > 0.0:
                    step = -dot / square
                    coef[j] += step
                    inner = [a + step * b for a, b in zip(inner, rows[j], strict=True)]
            weights = [w + c for w, c in zip(weights, coef, strict=True)]
        return torch.tensor(weights, dtype=torch.float64)
