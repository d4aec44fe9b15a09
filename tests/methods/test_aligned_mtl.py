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


def test_a_small_independent_component_is_kept_at_float64_precision():
    """Task 3's component outside the plane of the others is ~1e-4 of the largest singular value: a float64
    Gram matrix resolves it, so it is a direction of its own (rank 3), not noise to drop. (A float32 rank
    tolerance, λ_max·T·ε₃₂ ≈ 3.6e-7·λ_max, would drop it and give a step 1e4 times larger.)"""
    jac = torch.tensor([[1.0, 0.3, 0.0], [-0.2, 1.0, 0.0], [1e-4, 0.0, 1e-4]], dtype=torch.float64)
    s = torch.linalg.svdvals(jac)
    assert s[-1] ** 2 / s[0] ** 2 < 3 * float(torch.finfo(torch.float32).eps)  # below the float32 cut-off
    expected = aligned_update_svd(jac)  # full rank: all three singular directions
    got = weights(jac.numpy()) @ jac.numpy()
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-8, atol=1e-12)
    dropped = aligned_update_svd(jac, rank=2)
    assert float(dropped.norm()) > 1e3 * float(expected.norm())


def test_the_rank_cut_off_follows_the_gram_dtype():
    """With a float32 Gram matrix the same component is below the resolution of G and is dropped."""
    jac = torch.tensor([[1.0, 0.3, 0.0], [-0.2, 1.0, 0.0], [1e-4, 0.0, 1e-4]], dtype=torch.float64)
    gram32 = (jac @ jac.T).to(torch.float32)
    w = AlignedMTL()(gram32, torch.ones(3)).double()
    torch.testing.assert_close(w @ jac, aligned_update_svd(jac, rank=2), rtol=1e-4, atol=1e-6)


def test_zero_gradients_give_zero_weights():
    np.testing.assert_array_equal(weights(np.zeros((3, 5))), np.zeros(3))


def test_end_to_end():
    model, a, b, info = one_step("aligned_mtl", seed=8)
    torch.testing.assert_close(shared_grad(model), aligned_update_svd(a))
    torch.testing.assert_close(info.weights @ a, shared_grad(model))
    for i in range(3):
        torch.testing.assert_close(model.heads[i].grad, b[i])
