"""IMTL-G: impartial multi-task learning, gradient part (Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang,
ICLR 2021).

The fused gradient u = Σ_i α_i g_i with Σ_i α_i = 1 is chosen so that its projections on every unit task
gradient u_i = g_i/‖g_i‖ are equal: ⟨u, u_1⟩ = ⟨u, u_i⟩ for all i. With the row stacks
D = [g_1 − g_2; …; g_1 − g_T] and U = [u_1 − u_2; …; u_1 − u_T] the paper's closed form is

    α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹,   α_1 = 1 − Σ_{i≥2} α_i.

On the Gram matrix: with P_ab = ⟨g_a, u_b⟩ = G_ab / ‖g_b‖,
(g_1 Uᵀ)_j = P_11 − P_1j and (D Uᵀ)_kj = (P_11 − P_1j) − (P_k1 − P_kj).

When D Uᵀ is singular (two tasks with the same gradient direction, more tasks than parameters) the system is
solved in the least-squares sense with the minimum-norm solution, so no NaN appears. A task whose gradient
is exactly zero has no direction; it is left out of the system and gets weight 0 (it adds nothing to u
whatever its weight). Only the gradient part of IMTL is implemented; IMTL-L (learned loss scales) is not.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Method, gram_to_numpy, require_gram


def imtl_weights(gram: np.ndarray) -> np.ndarray:
    """IMTL-G weights α (summing to 1 over the tasks with a non-zero gradient)."""
    t = gram.shape[0]
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    live = np.flatnonzero(norms > 0.0)
    alpha = np.zeros(t)
    if live.size == 0:
        return np.full(t, 1.0 / t)
    if live.size == 1:
        alpha[live[0]] = 1.0
        return alpha
    # Dividing by the trace leaves α unchanged (both sides of the system scale alike) and keeps the numbers
    # near 1 whatever the gradients' magnitude.
    g = gram[np.ix_(live, live)]
    g = g / np.trace(g)
    n = np.sqrt(np.diag(g))
    p = g / n[None, :]
    rhs = p[0, 0] - p[0, 1:]
    system = rhs[None, :] - (p[1:, 0][:, None] - p[1:, 1:])
    rest = np.linalg.lstsq(system.T, rhs, rcond=None)[0]
    alpha[live] = np.concatenate([[1.0 - rest.sum()], rest])
    return alpha


class IMTL(Method):
    """IMTL-G: the fused gradient projects equally on every task's unit gradient."""

    name = "imtl"
    skips_absent_tasks = True
    task_scale_invariant = True  # equal projections on the unit gradients: only the directions matter

    def compute_weights(self, gram: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        gram = require_gram(gram, self.name)
        return torch.from_numpy(imtl_weights(gram_to_numpy(gram)))
