"""Aligned-MTL against the SVD of the explicit gradient matrix, and its defining property (the aligned
gradients are orthogonal with equal norms σ_min)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from method_checks import one_step, random_jacobian, shared_grad

from gradsurgery.methods.aligned_mtl import AlignedMTL, aligned_matrix


def weights(jac: np.ndarray) -> np.ndarray:
    t = jac.shape[0]
    return AlignedMTL()(torch.from_numpy(jac @ jac.T), torch.ones(t, dtype=torch.float64)).numpy()


def aligned_update_svd(jac: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """u = 1ᵀ σ_min U Wᵀ from J = U Σ Wᵀ (thin SVD), keeping the ``rank`` largest singular values."""
    u, s, wt = torch.linalg.svd(jac, full_matrices=False)
    r = rank if rank is not None else s.shape[0]
    return s[r - 1] * (u[:, :r] @ wt[:r]).sum(0)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("t", [2, 3, 5])
def test_matches_svd_in_d_space(seed, t):
    jac = random_jacobian(seed, t, 8)
    expected = aligned_update_svd(torch.from_numpy(jac)).numpy()
    np.testing.assert_allclose(weights(jac) @ jac, expected, atol=1e-9 * np.abs(expected).max())


@pytest.mark.parametrize("seed", range(4))
def test_aligned_gradients_are_orthogonal_with_equal_norms(seed):
    jac = random_jacobian(20 + seed, 4, 7)
    b = aligned_matrix(jac @ jac.T)
    aligned = b.T @ jac  # row i is ĝ_i = Σ_j B_ji g_j
    sigma_min = np.linalg.svd(jac, compute_uv=False).min()
    np.testing.assert_allclose(aligned @ aligned.T, sigma_min**2 * np.eye(4), atol=1e-9 * sigma_min**2)


def test_orthogonal_gradients_become_unit_vectors_times_the_smallest_norm():
    jac = np.diag([3.0, 0.5, 2.0])
    np.testing.assert_allclose(weights(jac) @ jac, [0.5, 0.5, 0.5])
    np.testing.assert_allclose(weights(jac), [0.5 / 3, 1.0, 0.25])


def test_rank_deficient_drops_the_null_directions():
    jac = random_jacobian(7, 4, 2)  # four gradients in the plane: rank 2
    expected = aligned_update_svd(torch.from_numpy(jac), rank=2).numpy()
    w = weights(jac)
    assert np.all(np.isfinite(w))
    np.testing.assert_allclose(w @ jac, expected, atol=1e-9 * np.abs(expected).max())


def test_zero_gradients_give_zero_weights():
    np.testing.assert_array_equal(weights(np.zeros((3, 5))), np.zeros(3))


def test_end_to_end():
    model, a, b, info = one_step("aligned_mtl", seed=8)
    torch.testing.assert_close(shared_grad(model), aligned_update_svd(a))
    torch.testing.assert_close(info.weights @ a, shared_grad(model))
    for i in range(3):
        torch.testing.assert_close(model.heads[i].grad, b[i])
