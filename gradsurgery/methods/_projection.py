"""Shared machinery of the projection methods (PCGrad, GradVac) on the Gram matrix.

Each adjusted gradient g'_i is a linear combination Σ_k C_ik g_k of the original gradients, so the
adjustments can be carried out on the coefficient row C_i alone: ⟨g'_i, g_j⟩ = (C_i G)_j and
‖g'_i‖² = C_i G C_iᵀ. The fused gradient Σ_i g'_i has weights w = Σ_i C_i (column sums of C).
"""

from __future__ import annotations

import torch


def draw_orders(num_tasks: int, generator: torch.Generator) -> list[list[int]]:
    """For each task i, a fresh random order of the other tasks (the order PCGrad and GradVac visit them)."""
    orders = []
    for i in range(num_tasks):
        others = [j for j in range(num_tasks) if j != i]
        perm = torch.randperm(len(others), generator=generator).tolist()
        orders.append([others[k] for k in perm])
    return orders
