"""MGDA: the minimum-norm point in the convex hull of the task gradients (Sener & Koltun 2018).

    α* = argmin_{α ∈ Δ} ‖Σ_i α_i g_i‖²,   u = Σ_i α*_i g_i.

Stepping along −u decreases every loss to first order unless the point is Pareto-stationary (u = 0):
⟨u, g_i⟩ ≥ ‖u‖² for every i. Solved on the Gram matrix: closed form for T = 2, the active-set solver
(``solvers.frank_wolfe``, O(T³) per face), or a cvxpy QP (``solvers.qp``, about 1.3 ms); ``solver="auto"``
(the default) takes the closed form for two tasks and the active set otherwise.

``normalization`` rescales the gradients before the solve as in the paper's appendix: ``"l2"`` uses
g_i/‖g_i‖, ``"loss"`` g_i/L_i, ``"loss+"`` g_i/(L_i‖g_i‖); the weights returned are those on the raw g_i.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .._validation import check_choice
from ..solvers import SimplexQP, min_norm_two_weights, simplex_min_norm
from .base import Method, bound_state, check_solver, gram_to_numpy, require_gram, solver_for

_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def normalization_scales(gram: np.ndarray, losses: np.ndarray, normalization: str) -> np.ndarray:
    """Per-task divisors n_i of a rescaling normalization (``"l2"``, ``"loss"``, ``"loss+"``; 1 for a task
    whose divisor is zero, so a zero gradient stays zero)."""
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    if normalization == "l2":
        scales = norms
    elif normalization == "loss":
        scales = np.abs(losses)
    else:
        scales = np.abs(losses) * norms
    return np.where(scales > 0, scales, 1.0)


class MGDA(Method):
    name = "mgda"
    interchangeable_options = ("solver",)
    no_conflict = True
    skips_absent_tasks = True

    def __init__(self, *, solver: str = "auto", normalization: str = "none") -> None:
        super().__init__()
        self.solver = check_solver(solver, ("auto", "frank_wolfe", "cvxpy", "closed_form"), self.name)
        self.normalization = check_choice(normalization, _NORMALIZATIONS, "normalization")
        self._solver = solver
        self._qp: SimplexQP | None = None

    def _check_num_tasks(self, num_tasks: int, task_names: Sequence[str] | None) -> None:
        if self.solver == "closed_form" and num_tasks != 2:
            raise ValueError(f"mgda solver='closed_form' needs exactly 2 tasks, got {num_tasks}")

    def _init_state(self, num_tasks: int) -> None:
        self._solver = solver_for(self.solver, num_tasks)
        if self.solver == "cvxpy":
            self._qp = SimplexQP(num_tasks)

    def compute_weights(self, gram: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        return self._weights(gram, losses, self._solver, lambda: bound_state(self._qp, self.name))

    def compute_present(
        self, present: list[int], gram: torch.Tensor | None, losses: torch.Tensor
    ) -> torch.Tensor:
        # The solver chosen at binding fits T tasks; the present ones are fewer.
        t = len(present)
        return self._weights(gram, losses, solver_for(self.solver, t), lambda: SimplexQP(t))

    def _weights(
        self, gram: torch.Tensor | None, losses: torch.Tensor, solver: str, qp: Callable[[], SimplexQP]
    ) -> torch.Tensor:
        gram = require_gram(gram, self.name)
        g = gram_to_numpy(gram)
        if self.normalization == "none":
            return torch.from_numpy(self._solve(g, solver, qp))
        scales = normalization_scales(g, losses.detach().cpu().double().numpy(), self.normalization)
        return torch.from_numpy(self._solve(g / np.outer(scales, scales), solver, qp) / scales)

    @staticmethod
    def _solve(g: np.ndarray, solver: str, qp: Callable[[], SimplexQP]) -> np.ndarray:
        if solver == "closed_form":
            return min_norm_two_weights(g)
        if solver == "cvxpy":
            return qp().solve(g)
        return simplex_min_norm(g)
