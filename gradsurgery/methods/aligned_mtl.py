"""Aligned-MTL: independent component alignment (Senushkin, Patakin, Kuznetsov & Konushin, CVPR 2023).

The task gradients are replaced by the closest set of orthogonal vectors of equal norm, which makes the
condition number of the gradient system 1 (no task dominates, none is drowned). With J = U Σ Wᵀ the thin
SVD of the T×d gradient matrix (U, Σ from the eigen-decomposition G = J Jᵀ = U Σ² Uᵀ), the aligned
gradients are the rows of

    Ĵ = σ_min U Wᵀ = Bᵀ J,     B = σ_min U Σ⁻¹ Uᵀ,

and the update is their sum, u = Σ_i ĝ_i = Jᵀ B 1 (the paper's task weights ω all equal to 1, as in the
authors' code), so the weights on the raw gradients are w = B 1. σ_min is the smallest singular value that is
not zero: eigenvalues of G at or below λ_max · T · ε count as zero and their directions are dropped, with ε
the machine epsilon of G's dtype (the authors' rank tolerance, which they fix at float32's ε; float64 by
default here, ``GradSurgery(gram_dtype=torch.float32)`` gives their cut-off). The aligned gradients then have
Gram matrix Bᵀ G B = σ_min² U_r U_rᵀ (σ_min² I when G has full rank).

Every factor σ_min/σ_k is at most 1, so nearly dependent gradients shrink the update rather than blow it up.
All gradients zero gives w = 0 (u is zero anyway).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Method, gram_to_numpy, require_gram


def aligned_matrix(gram: np.ndarray, eps: float | None = None) -> np.ndarray:
    """B = σ_min U_r Σ_r⁻¹ U_rᵀ over the eigen-directions of G above the rank tolerance λ_max·T·eps
    (eps: that of ``gram``'s dtype when not given)."""
    if eps is None:
        eps = float(np.finfo(np.asarray(gram).dtype).eps)
    t = gram.shape[0]
    eigenvalues, vectors = np.linalg.eigh((gram + gram.T) / 2)
    top = float(eigenvalues.max()) if t else 0.0
    if not top > 0.0:
        return np.zeros((t, t))
    keep = eigenvalues > top * t * eps
    lam, vec = eigenvalues[keep], vectors[:, keep]
    matrix: np.ndarray = np.sqrt(lam.min()) * (vec / np.sqrt(lam)) @ vec.T
    return matrix


class AlignedMTL(Method):
    """Sum of the task gradients aligned to an orthogonal, equal-norm system."""

    name = "aligned_mtl"
    skips_absent_tasks = True

    def compute_weights(self, gram: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        gram = require_gram(gram, self.name)
        eps = torch.finfo(gram.dtype).eps
        return torch.from_numpy(aligned_matrix(gram_to_numpy(gram), eps).sum(axis=1))
