"""Independent references for the tests: brute-force QP solves and d-space re-implementations.

Nothing here imports gradsurgery: these are the yardsticks the package is measured against.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch


def brute_force_qp(gram: np.ndarray, simplex: list[int], lower: list[float]) -> np.ndarray:
    """min xᵀGx s.t. Σ_{i∈simplex} x_i = 1 (if simplex is non-empty) and x_i ≥ lower_i, by enumerating
    which bounds are active and solving the equality-constrained problem on each face (small T only)."""
    t = gram.shape[0]
    lower = np.asarray(lower, dtype=float)
    best, best_val = None, np.inf
    for active in itertools.product([False, True], repeat=t):
        free = [i for i in range(t) if not active[i]]
        x = lower.copy()
        if free:
            # Stationarity on the free block with the sum constraint (if any free index is in the simplex).
            eq = [i for i in free if i in simplex]
            n = len(free)
            size = n + (1 if eq else 0)
            kkt = np.zeros((size, size))
            rhs = np.zeros(size)
            kkt[:n, :n] = 2 * gram[np.ix_(free, free)]
            rhs[:n] = (
                -2
                * gram[np.ix_(free, [i for i in range(t) if active[i]])]
                @ lower[list(np.flatnonzero(active))]
            )
            if eq:
                for r, i in enumerate(free):
                    if i in simplex:
                        kkt[r, n] = kkt[n, r] = 1.0
                rhs[n] = 1.0 - sum(lower[i] for i in simplex if active[i])
            sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
            x[free] = sol[:n]
        if simplex and abs(x[simplex].sum() - 1) > 1e-9:
            continue
        if np.any(x < lower - 1e-10):
            continue
        val = x @ gram @ x
        if val < best_val - 1e-15:
            best, best_val = x, val
    assert best is not None, "no feasible face"
    return best


def pcgrad_dspace(grads: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """PCGrad on explicit d-dimensional gradients (Yu et al. 2020, Algorithm 1)."""
    out = torch.zeros_like(grads[0])
    for i, order in enumerate(orders):
        gi = grads[i].clone()
        for j in order:
            dot = gi @ grads[j]
            if dot < 0:
                gi = gi - dot / (grads[j] @ grads[j]) * grads[j]
        out += gi
    return out


def gradvac_dspace(grads: torch.Tensor, orders: list[list[int]], targets: torch.Tensor, beta: float):
    """GradVac on explicit gradients (Wang et al. 2021): returns (fused, new targets)."""
    targets = targets.clone()
    out = torch.zeros_like(grads[0])
    for i, order in enumerate(orders):
        gi = grads[i].clone()
        for j in order:
            phi = (gi @ grads[j]) / (gi.norm() * grads[j].norm())
            tgt = targets[i, j]
            if phi < tgt:
                gi = (
                    gi
                    + gi.norm()
                    * (tgt * (1 - phi**2).sqrt() - phi * (1 - tgt**2).sqrt())
                    / (grads[j].norm() * (1 - tgt**2).sqrt())
                    * grads[j]
                )
            targets[i, j] = (1 - beta) * tgt + beta * phi
        out += gi
    return out, targets


def random_orders(num_tasks: int, seed: int) -> list[list[int]]:
    """The documented visiting order: per task i, torch.randperm over the other tasks from a seeded
    generator."""
    gen = torch.Generator().manual_seed(seed)
    orders = []
    for i in range(num_tasks):
        others = [j for j in range(num_tasks) if j != i]
        orders.append([others[k] for k in torch.randperm(len(others), generator=gen).tolist()])
    return orders


class LinearTasks(torch.nn.Module):
    """Losses linear in the parameters, so every task gradient is known exactly:
    L_i = ⟨A_i, θ⟩ + ⟨B_i, φ_i⟩ with θ shared (shape (2, 3) + a bias of 2) and φ_i task-specific."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.randn(2, 3, dtype=a.dtype))
        self.bias = torch.nn.Parameter(torch.randn(2, dtype=a.dtype))
        self.heads = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(b.shape[1], dtype=a.dtype)) for _ in range(a.shape[0])]
        )
        self.register_buffer("a", a)
        self.register_buffer("b", b)

    def forward(self) -> list[torch.Tensor]:
        flat = torch.cat([self.theta.reshape(-1), self.bias])
        return [self.a[i] @ flat + self.b[i] @ self.heads[i] for i in range(self.a.shape[0])]
