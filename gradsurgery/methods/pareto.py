"""Constrained Pareto weights with per-task lower bounds (PE-LTR, Lin et al. 2019).

    α* = argmin ‖Σ_i α_i g_i‖²  s.t.  Σ_i α_i = 1,  α_i ≥ c_i,   u = Σ_i α*_i g_i.

The exact QP (not the paper's relaxed projection). The lower bounds c express business priorities: each task
keeps at least weight c_i. Feasible iff c_i ≥ 0 and Σ c_i ≤ 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..solvers import SimplexQP, pareto_min_norm
from .base import Method, check_solver, gram_to_numpy


class Pareto(Method):
    name = "pareto"

    def __init__(self, *, min_weights: Sequence[float], solver: str = "cvxpy") -> None:
        check_solver(solver, ("cvxpy", "frank_wolfe"), self.name)
        if isinstance(min_weights, torch.Tensor):
            min_weights = min_weights.detach().cpu().tolist()
        try:
            bounds = [float(c) for c in min_weights]
        except TypeError as err:
            raise TypeError(f"min_weights must be a sequence of numbers, got {min_weights!r}") from err
        if any(not math.isfinite(c) or c < 0 for c in bounds):
            raise ValueError(f"min_weights must be finite and non-negative, got {bounds}")
        if sum(bounds) > 1 + 1e-12:
            raise ValueError(f"min_weights are infeasible: they sum to {sum(bounds):.6g} > 1 ({bounds})")
        super().__init__(min_weights=bounds, solver=solver)
        self.min_weights = bounds
        self.solver = solver
        self._qp: SimplexQP | None = None

    def _check_num_tasks(self, num_tasks: int) -> None:
        if len(self.min_weights) != num_tasks:
            raise ValueError(
                f"min_weights has {len(self.min_weights)} entries for {num_tasks} tasks: {self.min_weights}"
            )

    def _init_state(self, num_tasks: int) -> None:
        if self.solver == "cvxpy":
            self._qp = SimplexQP(num_tasks, min_weights=self.min_weights)

    def compute_weights(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        g = gram_to_numpy(gram)
        alpha = self._qp.solve(g) if self.solver == "cvxpy" else pareto_min_norm(g, self.min_weights)
        return torch.from_numpy(alpha)
