"""UPGrad against projections computed in d-space (NNLS on the explicit vectors, and the primal projection QP
with cvxpy), a two-task closed form, and the property the paper proves: no task's loss rises."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch
from method_checks import one_step, random_jacobian, shared_grad
from scipy.optimize import nnls

from gradsurgery.methods.upgrad import UPGrad


def weights(jac: np.ndarray) -> np.ndarray:
    t = jac.shape[0]
    return UPGrad()(torch.from_numpy(jac @ jac.T), torch.ones(t, dtype=torch.float64)).numpy()


def upgrad_nnls_dspace(jac: np.ndarray) -> np.ndarray:
    """π(g_i) = g_i + Jᵀλ_i, λ_i = argmin_{λ≥0} ‖g_i + Jᵀλ‖ solved on the d-dimensional vectors."""
    projections = [g + jac.T @ nnls(jac.T, -g)[0] for g in jac]
    return np.mean(projections, axis=0)


def upgrad_primal_dspace(jac: np.ndarray) -> np.ndarray:
    """π(g_i) = argmin_y ‖y − g_i‖² s.t. J y ≥ 0: the projection itself, no duality involved."""
    projections = []
    for g in jac:
        y = cp.Variable(jac.shape[1])
        cp.Problem(cp.Minimize(cp.sum_squares(y - g)), [jac @ y >= 0]).solve(solver=cp.CLARABEL)
        projections.append(y.value)
    return np.mean(projections, axis=0)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("t,dim", [(2, 6), (3, 6), (5, 8), (6, 4)])
def test_matches_nnls_projection_in_d_space(seed, t, dim):
    jac = random_jacobian(seed, t, dim)
    expected = upgrad_nnls_dspace(jac)
    np.testing.assert_allclose(weights(jac) @ jac, expected, atol=1e-9 * np.abs(jac).max())


@pytest.mark.parametrize("seed", range(3))
def test_matches_primal_projection_qp(seed):
    jac = random_jacobian(50 + seed, 4, 6)
    expected = upgrad_primal_dspace(jac)
    np.testing.assert_allclose(weights(jac) @ jac, expected, atol=1e-6 * np.abs(jac).max())


def test_two_tasks_closed_form():
    """T = 2 with ⟨g_1, g_2⟩ < 0: each gradient loses its component along the other (onto the half-space)."""
    g1, g2 = np.array([2.0, 1.0, 0.0]), np.array([-1.0, 1.0, 0.5])
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g1 @ g2) / (g1 @ g1) * g1
    np.testing.assert_allclose(weights(np.stack([g1, g2])) @ np.stack([g1, g2]), (p1 + p2) / 2, atol=1e-12)


def test_no_conflict_gives_the_mean():
    jac = np.array([[1.0, 0.2, 0.0], [0.5, 1.0, 0.1], [0.3, 0.1, 2.0]])
    assert np.all(jac @ jac.T > 0)
    np.testing.assert_allclose(weights(jac), np.full(3, 1 / 3), atol=1e-12)


def test_degenerate_inputs_give_finite_weights():
    np.testing.assert_allclose(weights(np.zeros((3, 4))), np.full(3, 1 / 3))
    g = np.array([1.0, -2.0])
    w = weights(np.stack([g, -g, np.zeros(2)]))  # opposite gradients: the cone is the line ⊥ g
    assert np.all(np.isfinite(w))
    np.testing.assert_allclose(w @ np.stack([g, -g, np.zeros(2)]), np.zeros(2), atol=1e-12)


def test_end_to_end():
    model, a, b, info = one_step("upgrad", seed=6)
    expected = torch.from_numpy(upgrad_nnls_dspace(a.numpy()))
    torch.testing.assert_close(shared_grad(model), expected)
    assert torch.all(a @ shared_grad(model) >= -1e-10)
    for i in range(3):
        torch.testing.assert_close(model.heads[i].grad, b[i])
    torch.testing.assert_close(info.weights @ a, shared_grad(model))
