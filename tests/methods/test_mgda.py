"""MGDA's own maths: the min-norm point of the convex hull, for each solver and normalization, against a
brute-force solve of the QP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from references import brute_force_qp

from gradsurgery import make_method
from gradsurgery.solvers import min_norm_two_weights, simplex_min_norm


def problem(seed: int, num_tasks: int) -> tuple[np.ndarray, torch.Tensor]:
    rng = np.random.default_rng(seed)
    # Gradients of very different sizes, some conflicting: the weights then sit on a face, not the centre.
    jac = rng.standard_normal((num_tasks, 6)) * np.exp(rng.uniform(-3, 3, (num_tasks, 1)))
    return jac, torch.from_numpy(rng.uniform(0.5, 3.0, num_tasks))


def weights(jac: np.ndarray, losses: torch.Tensor, **options) -> np.ndarray:
    method = make_method("mgda", **options)
    return method(torch.from_numpy(jac @ jac.T), losses).numpy()


SOLVER_CASES = [
    (solver, num_tasks)
    for solver in ("auto", "frank_wolfe", "cvxpy", "closed_form")
    for num_tasks in (2, 3, 5)
    if solver != "closed_form" or num_tasks == 2
]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("solver,num_tasks", SOLVER_CASES)
def test_every_solver_finds_the_min_norm_point_of_the_hull(seed, solver, num_tasks):
    jac, losses = problem(seed, num_tasks)
    gram = jac @ jac.T
    reference = brute_force_qp(gram, list(range(num_tasks)), [0.0] * num_tasks)
    w = weights(jac, losses, solver=solver)
    tol = 1e-6 if solver == "cvxpy" else 1e-9
    np.testing.assert_allclose(w @ jac, reference @ jac, atol=tol * np.abs(jac).max())
    assert w.sum() == pytest.approx(1.0, abs=tol) and w.min() >= -tol


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_tasks", [2, 4])
def test_auto_takes_the_closed_form_for_two_tasks_and_the_active_set_otherwise(seed, num_tasks):
    jac, losses = problem(seed, num_tasks)
    expected = min_norm_two_weights(jac @ jac.T) if num_tasks == 2 else simplex_min_norm(jac @ jac.T)
    np.testing.assert_array_equal(weights(jac, losses), expected)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("normalization", ["l2", "loss", "loss+"])
def test_normalized_weights_give_the_min_norm_point_of_the_rescaled_gradients(seed, normalization):
    jac, losses = problem(seed, 3)
    norms = np.linalg.norm(jac, axis=1)
    divisors = {"l2": norms, "loss": losses.numpy(), "loss+": losses.numpy() * norms}[normalization]
    scaled = jac / divisors[:, None]
    reference = brute_force_qp(scaled @ scaled.T, [0, 1, 2], [0.0] * 3) @ scaled
    w = weights(jac, losses, normalization=normalization)
    # The weights act on the raw gradients and give the min-norm point of the rescaled ones.
    np.testing.assert_allclose(w @ jac, reference, atol=1e-9 * np.abs(reference).max())
