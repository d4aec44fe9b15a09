"""PCGrad: project each task gradient off the gradients it conflicts with (Yu et al. 2020).

For each task i, starting from g'_i = g_i and visiting the other tasks j in a fresh random order:
if ⟨g'_i, g_j⟩ < 0 then g'_i ← g'_i − ⟨g'_i, g_j⟩/‖g_j‖² · g_j (g_j the original gradient).
The fused gradient is the sum u = Σ_i g'_i. Carried out on the Gram matrix (see ``_projection``).
"""

from __future__ import annotations

import numpy as np
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
        g = gram_to_numpy(gram)
        num_tasks = g.shape[0]
        orders = draw_orders(num_tasks, self.generator)
        coef = np.eye(num_tasks)
        for i, order in enumerate(orders):
            for j in order:
                dot = coef[i] @ g[:, j]
                if dot < 0 and g[j, j] > 0:
                    coef[i, j] -= dot / g[j, j]
        return torch.from_numpy(coef.sum(axis=0))
