"""Nash-MTL against the bargaining problem solved directly in d-space, its defining equation, and forced
solver failures (which must warn, fall back as documented and be counted)."""

from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch
from method_checks import check_resume_is_bit_identical, make_linear_problem, random_jacobian, shared_grad

from gradsurgery import GradSurgery
from gradsurgery.methods import nash_mtl
from gradsurgery.methods.nash_mtl import NashMTL, SolverFallbackWarning

ONES = torch.ones(1, dtype=torch.float64)


def bargaining_direction(jac: np.ndarray) -> np.ndarray:
    """argmax_u Σ_i log⟨u, g_i⟩ s.t. ‖u‖ ≤ √T on the explicit vectors (the problem, not its equation)."""
    t = jac.shape[0]
    u = cp.Variable(jac.shape[1])
    problem = cp.Problem(cp.Maximize(cp.sum(cp.log(jac @ u))), [cp.norm(u) <= np.sqrt(t)])
    with warnings.catch_warnings():  # at this precision Clarabel may call its answer "inaccurate"
        warnings.simplefilter("ignore", UserWarning)
        problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
    assert problem.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE)
    return u.value


def nash_weights(jac: np.ndarray, **options) -> np.ndarray:
    method = NashMTL(**options)
    t = jac.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverFallbackWarning)
        return method(torch.from_numpy(jac @ jac.T), ONES.expand(t)).numpy()


SOLVERS = ["newton", "cvxpy"]
RESIDUAL = {"newton": 1e-10, "cvxpy": 1e-5}  # Newton solves the equation; the paper's sequence stops at 1e-6


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("t", [2, 3, 5])
def test_matches_bargaining_solution_in_d_space(seed, t, solver):
    jac = random_jacobian(seed, t, 8)
    alpha = nash_weights(jac, solver=solver)
    gram = jac @ jac.T
    # The paper's equation G α = 1/α ...
    np.testing.assert_allclose(alpha * (gram @ alpha), np.ones(t), atol=RESIDUAL[solver])
    assert np.all(alpha > 0)
    # ... and the bargaining solution it characterises: same u, norm √T.
    u = alpha @ jac
    np.testing.assert_allclose(u, bargaining_direction(jac), atol=1e-5 * np.sqrt(t))
    assert abs(np.linalg.norm(u) - np.sqrt(t)) < 1e-5


@pytest.mark.parametrize("solver", SOLVERS)
def test_two_orthogonal_tasks_closed_form(solver):
    """Orthogonal g_1, g_2: α_i = 1/‖g_i‖ (each task's update component has length 1)."""
    jac = np.array([[3.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    np.testing.assert_allclose(nash_weights(jac, solver=solver), [1 / 3, 2.0], rtol=RESIDUAL[solver])


@pytest.mark.parametrize("seed", range(6))
def test_the_two_solvers_agree(seed):
    jac = random_jacobian(seed, 4, 9)
    newton, sequence = nash_weights(jac, solver="newton"), nash_weights(jac, solver="cvxpy")
    np.testing.assert_allclose(newton @ jac, sequence @ jac, rtol=0, atol=1e-6 * np.linalg.norm(newton @ jac))


def test_newton_that_does_not_converge_falls_back_and_says_so():
    jac = random_jacobian(3, 5, 9)
    method = NashMTL(max_iter=1)
    with pytest.warns(SolverFallbackWarning, match="did not reach the tolerance in 1 iteration"):
        w = method(torch.from_numpy(jac @ jac.T), ONES.expand(5))
    torch.testing.assert_close(w, torch.ones(5, dtype=torch.float64))
    assert method.solver_failures == 1


def test_problem_is_dpp_compiled_once_and_solved_by_clarabel():
    model, _, _ = make_linear_problem(0)
    opt = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.01), method="nash_mtl", num_tasks=3, solver="cvxpy"
    )
    problem = opt.method._problem
    assert problem.is_dpp()
    for _ in range(3):
        opt.zero_grad()
        opt.backward([loss * loss for loss in model()])
        opt.step()
    assert opt.method._problem is problem
    assert problem.solver_stats.solver_name == "CLARABEL"


def test_end_to_end_and_info_extras():
    model, a, b = make_linear_problem(2)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="nash_mtl")
    info = opt.backward(model())
    expected = bargaining_direction(a.numpy())
    np.testing.assert_allclose(shared_grad(model).numpy(), expected, atol=1e-5)
    torch.testing.assert_close(info.weights @ a, shared_grad(model))
    for i in range(3):
        torch.testing.assert_close(model.heads[i].grad, b[i])
    assert info.extras["solver_failures"] == 0 and info.extras["solver_iterations"] >= 1


def test_update_every_reuses_the_weights(monkeypatch):
    model, _, _ = make_linear_problem(4)
    opt = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.05), method="nash_mtl", update_every=3, solver="cvxpy"
    )
    solves = []
    original = NashMTL._solve
    monkeypatch.setattr(NashMTL, "_solve", lambda self, g: solves.append(1) or original(self, g))
    weights = []
    for _ in range(5):
        opt.zero_grad()
        weights.append(opt.backward([loss * loss for loss in model()]).weights)
        opt.step()
    assert len(solves) == 2  # steps 0 and 3
    assert torch.equal(weights[0], weights[1]) and torch.equal(weights[0], weights[2])
    assert not torch.allclose(weights[2], weights[3])
    assert torch.equal(weights[3], weights[4])


def _raise(*args, **kwargs):
    raise cp.error.SolverError("forced failure")


def test_forced_solver_failure_warns_falls_back_and_counts(monkeypatch):
    model, a, _ = make_linear_problem(1)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.0), method="nash_mtl", solver="cvxpy")
    monkeypatch.setattr(cp.Problem, "solve", _raise)
    with pytest.warns(SolverFallbackWarning, match="forced failure; using equal weights 1"):
        info = opt.backward(model())
    torch.testing.assert_close(info.weights, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(shared_grad(model), a.sum(0))
    assert info.extras["solver_failures"] == 1 and opt.method.solver_failures == 1

    monkeypatch.undo()
    opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverFallbackWarning)
        good = opt.backward(model())
    assert good.extras["solver_failures"] == 1

    monkeypatch.setattr(cp.Problem, "solve", _raise)
    opt.zero_grad()
    with pytest.warns(SolverFallbackWarning, match="using the previous step's weights"):
        info = opt.backward(model())
    assert torch.equal(info.weights, good.weights)
    assert info.extras["solver_failures"] == 2
    assert opt.state_dict()["gradsurgery"]["method_state"]["solver_failures"] == 2


def test_failure_after_some_iterations_keeps_the_best_iterate(monkeypatch):
    jac = random_jacobian(5, 3, 6)
    gram = jac @ jac.T
    method = NashMTL(max_iter=5, solver="cvxpy")
    monkeypatch.setattr(nash_mtl, "nash_residual", lambda g, alpha: 1.0)  # never converged: keep iterating
    calls = []
    original = cp.Problem.solve

    def second_fails(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise cp.error.SolverError("forced failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cp.Problem, "solve", second_fails)
    with pytest.warns(SolverFallbackWarning, match="this step's best completed iterate"):
        alpha = method(torch.from_numpy(gram), ONES.expand(3)).numpy()
    # The first convex iterate is feasible for the constraints α_i (Gα)_i ≥ 1.
    assert np.all(alpha * (gram @ alpha) >= 1 - 1e-6)
    assert method.solver_failures == 1


def test_the_iterate_with_the_smallest_residual_is_kept(monkeypatch):
    """The convex-concave iterates need not improve monotonically (one case reached a residual of 3.4e-6,
    then drifted to 1.5e-4 before the iteration budget ran out): the best one is returned."""
    gram = np.diag([4.0, 0.25])  # orthogonal tasks: α* = (1/2, 2) exactly
    exact = np.array([0.5, 2.0])
    scale = float(np.linalg.norm(gram))
    # The solver works on G/‖G‖_F, whose solution is α*·√‖G‖_F; feed it iterates around that.
    iterates = iter([exact * np.sqrt(scale) * f for f in (1 + 1.7e-6, 1 + 7.5e-5, 1 + 2e-4)])
    monkeypatch.setattr(NashMTL, "_solve_subproblem", lambda self, alpha: next(iterates))
    weights = NashMTL(max_iter=3, solver="cvxpy")(torch.from_numpy(gram), ONES.expand(2)).numpy()
    np.testing.assert_allclose(weights, exact * (1 + 1.7e-6), rtol=1e-12)
    assert nash_mtl.nash_residual(gram, weights) == pytest.approx(3.4e-6, rel=1e-3)


def test_non_optimal_status_is_a_failure(monkeypatch):
    def infeasible(self, *args, **kwargs):
        self._status = cp.INFEASIBLE

    monkeypatch.setattr(cp.Problem, "solve", infeasible)
    with pytest.warns(SolverFallbackWarning, match="status 'infeasible'"):
        w = NashMTL(solver="cvxpy")(torch.eye(2, dtype=torch.float64), ONES.expand(2))
    torch.testing.assert_close(w, torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize(
    "solver,reason", [("newton", "convex hull"), ("cvxpy", "no direction improves every task")]
)
def test_opposite_gradients_have_no_bargaining_solution(solver, reason):
    g = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)  # g_2 = −g_1
    method = NashMTL(solver=solver)
    with pytest.warns(SolverFallbackWarning, match=reason):
        w = method(g, ONES.expand(2))
    assert torch.isfinite(w).all() and method.solver_failures == 1


def test_all_zero_gradients_are_not_a_failure():
    method = NashMTL()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverFallbackWarning)
        w = method(torch.zeros(3, 3, dtype=torch.float64), ONES.expand(3))
    torch.testing.assert_close(w, torch.ones(3, dtype=torch.float64))
    assert method.solver_failures == 0


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"update_every": 0}, ValueError, "update_every must be >= 1, got 0"),
        ({"max_iter": -2}, ValueError, "max_iter must be >= 1, got -2"),
        ({"update_every": 1.5}, TypeError, "update_every must be an int"),
        ({"max_iter": True}, TypeError, "max_iter must be an int"),
    ],
)
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        NashMTL(**options)


def test_state_dict_shape_mismatch_is_refused():
    method = NashMTL()
    method.bind(3)
    state = {"steps": 1, "solver_failures": 0, "alpha": torch.ones(2), "weights": None}
    with pytest.raises(ValueError, match=r"shape \(2,\), expected \(3,\)"):
        method.load_state_dict(state)


@pytest.mark.parametrize("options", [{}, {"update_every": 2}])
def test_resume(options):
    check_resume_is_bit_identical("nash_mtl", **options)


def test_a_step_with_a_task_absent_solves_the_present_block_and_keeps_the_last_weights():
    """The present tasks' bargaining weights (the equation on their Gram block, and the d-space problem on
    their gradients), warm started from their last weights; the last weights and α stay those of the step
    with every task, and the step counts towards ``update_every`` (the next one reuses the weights)."""
    jac = random_jacobian(3, 3, 12)
    gram = torch.from_numpy(jac @ jac.T)
    method = NashMTL(update_every=2)
    method(gram, ONES.expand(3))  # step 0: solved
    full = method(gram, ONES.expand(3)).numpy()  # step 1: reused
    present = [0, 2]
    block = gram[present][:, present]
    weights = method.weights_of(present, block, ONES.expand(2)).numpy()  # step 2: solved on the block
    np.testing.assert_allclose(weights * (block.numpy() @ weights), 1.0, rtol=1e-10)
    np.testing.assert_allclose(weights @ jac[present], bargaining_direction(jac[present]), atol=1e-5)
    assert method.steps == 3 and np.array_equal(method.weights, full)
    reused = method.weights_of(present, block, ONES.expand(2)).numpy()  # step 3: reused
    np.testing.assert_array_equal(reused, full[present])
    assert method.steps == 4 and method.last_iterations == 0


def test_a_step_with_a_task_absent_under_cvxpy_is_refused_before_anything_runs():
    method = NashMTL(solver="cvxpy")
    method.bind(3)
    with pytest.raises(ValueError, match="cannot take a step with tasks absent"):
        method.weights_of([0, 2], torch.eye(2, dtype=torch.float64), ONES.expand(2))
