"""IMTL-G against the paper's closed form on explicit gradient vectors, and its defining property."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from method_checks import one_step, random_jacobian, shared_grad

from gradsurgery.methods.imtl import IMTL


def imtl_dspace(jac: torch.Tensor) -> torch.Tensor:
    """α from D = [g_1 − g_i], U = [u_1 − u_i]: α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹, α_1 = 1 − Σ α_{2:T}."""
    units = jac / jac.norm(dim=1, keepdim=True)
    d = jac[0] - jac[1:]
    u = units[0] - units[1:]
    rest = jac[0] @ u.T @ torch.linalg.inv(d @ u.T)
    return torch.cat([(1 - rest.sum()).reshape(1), rest])


def weights(jac: np.ndarray) -> np.ndarray:
    t = jac.shape[0]
    return IMTL()(torch.from_numpy(jac @ jac.T), torch.ones(t, dtype=torch.float64)).numpy()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("t", [2, 3, 4, 6])
def test_matches_closed_form_in_d_space(seed, t):
    jac = random_jacobian(seed, t, 9)
    expected = imtl_dspace(torch.from_numpy(jac)).numpy()
    np.testing.assert_allclose(weights(jac), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("seed", range(5))
def test_equal_projections_on_every_unit_gradient(seed):
    jac = random_jacobian(10 + seed, 5, 8)
    alpha = weights(jac)
    u = alpha @ jac
    projections = jac @ u / np.linalg.norm(jac, axis=1)
    np.testing.assert_allclose(projections, projections[0], rtol=1e-9)
    assert abs(alpha.sum() - 1) < 1e-12


def test_two_tasks_closed_form():
    """T = 2: u is the point of the segment [g_2, g_1] on the angle bisector of the two gradients."""
    g1, g2 = np.array([4.0, 0.0]), np.array([0.0, 1.0])
    alpha = weights(np.stack([g1, g2]))
    u = alpha @ np.stack([g1, g2])
    np.testing.assert_allclose(u, [0.8, 0.8])  # on the diagonal and on the line x/4 + y = 1
    np.testing.assert_allclose(alpha, [0.2, 0.8])


def test_singular_system_gives_no_nan():
    g = np.array([1.0, 2.0, 0.5])
    jac = np.stack([g, 3 * g, np.array([0.0, -1.0, 1.0])])  # tasks 0 and 1 share a direction: D Uᵀ singular
    alpha = weights(jac)
    assert np.all(np.isfinite(alpha)) and abs(alpha.sum() - 1) < 1e-12
    u = alpha @ jac
    projections = jac @ u / np.linalg.norm(jac, axis=1)
    np.testing.assert_allclose(projections, projections[0], rtol=1e-9)


def test_zero_gradient_task_gets_weight_zero():
    jac = random_jacobian(3, 3, 5)
    jac[2] = 0.0
    alpha = weights(jac)
    assert alpha[2] == 0.0
    np.testing.assert_allclose(alpha[:2], weights(jac[:2]))
    np.testing.assert_allclose(weights(np.zeros((3, 4))), np.full(3, 1 / 3))
    np.testing.assert_allclose(weights(np.stack([np.zeros(3), np.ones(3)])), [0.0, 1.0])


def test_end_to_end():
    model, a, b, info = one_step("imtl", seed=5)
    expected = imtl_dspace(a) @ a
    torch.testing.assert_close(shared_grad(model), expected)
    torch.testing.assert_close(info.weights @ a, shared_grad(model))
    for i in range(3):
        torch.testing.assert_close(model.heads[i].grad, b[i])
