"""CAGrad against a brute-force grid of its dual (T = 2, 3) and an independent SOCP of its primal in
d-space."""

from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch
from method_checks import one_step, random_jacobian, shared_grad

from gradsurgery.methods.cagrad import CAGrad, cagrad_dual


def dual_objective_many(gram: np.ndarray, w: np.ndarray, c: float) -> np.ndarray:
    """F(w) = ⟨g_w, g_0⟩ + c‖g_0‖‖g_w‖ for each row of w, written out independently of the package."""
    t = gram.shape[0]
    mean = np.full(t, 1.0 / t)
    g0_norm = np.sqrt(mean @ gram @ mean)
    return w @ gram @ mean + c * g0_norm * np.sqrt(np.clip(np.einsum("ni,ij,nj->n", w, gram, w), 0, None))


def simplex_grid(t: int, steps: int) -> np.ndarray:
    if t == 2:
        s = np.linspace(0.0, 1.0, steps + 1)
        return np.stack([s, 1 - s], axis=1)
    i, j = np.meshgrid(np.arange(steps + 1), np.arange(steps + 1), indexing="ij")
    keep = i + j <= steps
    i, j = i[keep], j[keep]
    return np.stack([i, j, steps - i - j], axis=1) / steps


def primal_direction(jac: np.ndarray, c: float) -> np.ndarray:
    """argmax_d min_i ⟨g_i, d⟩ s.t. ‖d − g_0‖ ≤ c‖g_0‖, on the explicit gradient vectors (Clarabel SOCP)."""
    g0 = jac.mean(axis=0)
    d = cp.Variable(jac.shape[1])
    worst = cp.Variable()
    problem = cp.Problem(cp.Maximize(worst), [jac @ d >= worst, cp.norm(d - g0) <= c * np.linalg.norm(g0)])
    # Tight tolerances: the optimum sits where the objective is flat, so the default 1e-8 gap leaves ~1e-5.
    with warnings.catch_warnings():  # at this precision Clarabel may call its answer "inaccurate"
        warnings.simplefilter("ignore", UserWarning)
        problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    assert problem.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE)
    return d.value


def fused(jac: np.ndarray, c: float, rescale: bool) -> np.ndarray:
    method = CAGrad(c=c, rescale=rescale)
    return method(torch.from_numpy(jac @ jac.T), torch.ones(jac.shape[0], dtype=torch.float64)).numpy() @ jac


@pytest.mark.parametrize("t,steps", [(2, 200_000), (3, 600)])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("c", [0.3, 0.8])
def test_dual_matches_brute_force_grid(t, steps, seed, c):
    jac = random_jacobian(seed, t, 6)
    gram = jac @ jac.T
    grid = simplex_grid(t, steps)
    values = dual_objective_many(gram, grid, c)
    best = grid[np.argmin(values)]
    w = cagrad_dual(gram, c)
    assert w.min() >= 0 and abs(w.sum() - 1) < 1e-12
    scale = np.trace(gram)
    # The grid minimum can only be above the true minimum; ours must reach it.
    assert dual_objective_many(gram, w[None], c)[0] <= values.min() + 1e-10 * scale
    assert np.abs(w - best).max() <= 2.0 / steps + 1e-6


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("t", [2, 3, 5])
@pytest.mark.parametrize("c", [0.2, 0.5, 0.9])
def test_update_matches_primal_socp_in_d_space(seed, t, c):
    jac = random_jacobian(100 + seed, t, 10)
    expected = primal_direction(jac, c)
    got = fused(jac, c, rescale=False)
    g0 = jac.mean(axis=0)
    scale = np.linalg.norm(g0) ** 2
    # Feasible, and a worst-case improvement at least as good as the independent solver's ...
    assert np.linalg.norm(got - g0) <= c * np.linalg.norm(g0) * (1 + 1e-12)
    assert (jac @ got).min() >= (jac @ expected).min() - 1e-10 * scale
    # ... and the same point: the objective is flat at the optimum, so the SOCP's d is only good to ~1e-6.
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.linalg.norm(expected))
    rescaled = fused(jac, c, rescale=True)
    np.testing.assert_allclose(rescaled, got / (1 + c * c), rtol=0, atol=1e-14 * np.linalg.norm(got))


@pytest.mark.parametrize("seed", range(10))
def test_worst_task_improves_at_least_as_much_as_with_the_mean(seed):
    """The paper's guarantee: d maximises min_i ⟨g_i, d⟩ over a ball that contains g_0; it lies on the rim."""
    c = 0.5
    jac = random_jacobian(200 + seed, 4, 7)
    g0 = jac.mean(axis=0)
    d = fused(jac, c, rescale=False)
    assert (jac @ d).min() >= (jac @ g0).min() - 1e-9 * np.linalg.norm(g0) ** 2
    assert abs(np.linalg.norm(d - g0) - c * np.linalg.norm(g0)) <= 1e-9 * np.linalg.norm(g0)


@pytest.mark.parametrize("seed", [0, 1])
def test_c_zero_is_the_mean_gradient_end_to_end(seed):
    model, a, b, info = one_step("cagrad", seed=seed, c=0.0)
    torch.testing.assert_close(shared_grad(model), a.sum(0) / 3)
    torch.testing.assert_close(info.weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    for i in range(3):  # a gradient-surgery method: heads keep their own task's gradient
        torch.testing.assert_close(model.heads[i].grad, b[i])


def test_end_to_end_default_options():
    model, a, _, info = one_step("cagrad", seed=3)
    expected = primal_direction(a.numpy(), 0.5) / 1.25
    np.testing.assert_allclose(shared_grad(model).numpy(), expected, atol=1e-6 * np.linalg.norm(expected))
    torch.testing.assert_close(info.weights @ a, shared_grad(model))


def test_degenerate_dual_optimum_falls_back_to_the_mean():
    """g_2 = −g_1/2 and c = 1.5: F ≥ 0 with F = 0 at g_w = 0, so the paper's direction is 0/0."""
    g1 = np.array([1.0, 2.0, -0.5])
    jac = np.stack([g1, -0.5 * g1])
    d = fused(jac, 1.5, rescale=False)
    assert np.all(np.isfinite(d))
    np.testing.assert_allclose(d, jac.mean(axis=0), atol=1e-12)


def test_single_task_and_zero_gradients():
    g = torch.tensor([[4.0]], dtype=torch.float64)
    w = CAGrad(c=0.5, rescale=False)(g, torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([1.5], dtype=torch.float64))  # g + c‖g‖ g/‖g‖
    w = CAGrad()(torch.zeros(3, 3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    assert torch.isfinite(w).all()


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"c": -0.1}, ValueError, "c must be a finite number >= 0, got -0.1"),
        ({"c": float("nan")}, ValueError, "got nan"),
        ({"c": "0.5"}, TypeError, "c must be a number"),
        ({"c": True}, TypeError, "c must be a number"),
        ({"rescale": 1}, TypeError, r"rescale must be a bool \(True or False\)"),
    ],
)
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        CAGrad(**options)
