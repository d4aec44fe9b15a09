"""UPGrad: unconflicting projection of gradients (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective
Optimization").

Each task gradient is projected onto the dual cone of the gradients, C = {v : ⟨v, g_j⟩ ≥ 0 for every j},
and the projections are averaged:

    u = (1/T) Σ_i π_C(g_i).

Because every π_C(g_i) lies in the convex cone C, so does u: ⟨u, g_j⟩ ≥ 0 for every task j (no loss rises
to first order), and when no pair of gradients conflicts every projection is the identity and u is the mean
gradient.

On the Gram matrix (the paper's Proposition 1). The projection of x = Jᵀa solves min ½‖y − x‖² s.t. Jy ≥ 0;
its Lagrange dual gives y = x + Jᵀλ with λ = argmin_{λ ≥ 0} ‖Jᵀ(a + λ)‖² = (a + λ)ᵀ G (a + λ). So
π_C(g_i) = Jᵀ v_i with v_i = e_i + λ_i, and the weights of u are w = (1/T) Σ_i v_i.

Solver. Each λ_i is a non-negative least-squares problem in T variables: with a square factor A of G
(AᵀA = G from its eigen-decomposition, negative rounding eigenvalues clipped to 0),
‖Jᵀ(e_i + λ)‖ = ‖A e_i + A λ‖, solved exactly (active set, Lawson-Hanson) by ``scipy.optimize.nnls``. No
regularisation of G is added (TorchJD adds 1e-4·I to make G definite for its QP solver; NNLS does not need
it). G is divided by its trace first: the weights do not depend on the scale.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import SolverError
from ..solvers.closed_form import gram_factor
from .base import Method, gram_to_numpy, require_gram


def upgrad_weights(gram: np.ndarray) -> np.ndarray:
    """Weights w with Jᵀw = (1/T) Σ_i π_C(g_i)."""
    from scipy.optimize import nnls

    t = gram.shape[0]
    scale = float(np.trace(gram))
    if not scale > 0.0:
        return np.full(t, 1.0 / t)
    factor = gram_factor(gram / scale)
    total = np.zeros(t)
    for i in range(t):
        try:
            lam, _ = nnls(factor, -factor[:, i], maxiter=50 * t)
        except RuntimeError as err:  # scipy reports an exhausted iteration budget this way
            raise SolverError(f"upgrad: NNLS projection of task {i} failed: {err}") from err
        total += lam
        total[i] += 1.0
    weights: np.ndarray = total / t
    return weights


class UPGrad(Method):
    """Mean of the task gradients each projected onto the cone where no task's loss rises."""

    name = "upgrad"
    no_conflict = True
    skips_absent_tasks = True

    def compute_weights(self, gram: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        gram = require_gram(gram, self.name)
        return torch.from_numpy(upgrad_weights(gram_to_numpy(gram)))
