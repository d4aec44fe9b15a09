"""The exact Nash bargaining solver (gradsurgery.solvers.nash) against independent references: its defining
equation checked on the explicit vectors, closed forms (T = 1, 2, orthogonal), the bargaining problem itself
as a cvxpy model on the explicit vectors, the existing cvxpy/Clarabel path of ``NashMTL``, and no-solution
cases built so that zero is (or is not) in the convex hull of the gradients by construction."""

from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch
from references import brute_force_qp
from solver_cases import make_jacobian, seeded_cases

from gradsurgery.errors import SolverError
from gradsurgery.methods.nash_mtl import NashMTL, SolverFallbackWarning
from gradsurgery.solvers.nash import NashNoSolutionError, NashSolution, nash_bargaining_weights


def residual_dspace(jac: np.ndarray, alpha: np.ndarray) -> float:
    """max_i |α_i ⟨g_i, u⟩ − 1| with u = Jᵀα formed from the explicit vectors (not through G)."""
    return float(np.abs(alpha * (jac @ (jac.T @ alpha)) - 1.0).max())


def solvable_jacobian(rng: np.random.Generator, t: int, d: int, margin: float, spread: float) -> np.ndarray:
    """T×d gradients that all make an angle of at most arccos(margin) with a common direction p, so zero is
    at distance ≥ margin from the hull of the unit gradients (a solution exists), while pairs of tasks still
    conflict (noise of size ``spread`` around p). Norms span 1e-8..1."""
    p = rng.standard_normal(d)
    p /= np.linalg.norm(p)
    rows = []
    while len(rows) < t:
        g = p + spread * rng.standard_normal(d)
        if g @ p >= margin * np.linalg.norm(g):
            rows.append(g)
    jac = np.array(rows)
    return jac * 10.0 ** rng.uniform(-8.0, 0.0, size=(t, 1))


def random_solvable(count: int, seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for n in range(count):
        t = int(rng.integers(2, 11))
        # d < T (G singular) and d ≥ T in turn.
        d = int(rng.integers(2, t)) if n % 2 == 0 and t > 2 else int(rng.integers(t, t + 8))
        spread = (0.2, 1.0, 3.0)[n % 3]  # aligned ... strongly conflicting
        out.append(solvable_jacobian(rng, t, d, margin=0.05, spread=spread))
    return out


SOLVABLE = random_solvable(300, seed=11)


def test_residual_on_random_problems_with_a_solution():
    worst, pairs_in_conflict, wide = 0.0, 0, 0
    for jac in SOLVABLE:
        sol = nash_bargaining_weights(jac @ jac.T)
        assert isinstance(sol, NashSolution)
        assert np.all(sol.alpha > 0.0) and np.all(np.isfinite(sol.alpha))
        worst = max(worst, residual_dspace(jac, sol.alpha), sol.residual)
        # ‖u‖² = αᵀGα = T at the solution, on the explicit vectors.
        u = jac.T @ sol.alpha
        assert abs(u @ u - jac.shape[0]) <= 1e-9 * jac.shape[0]
        pairs_in_conflict += int(np.any(np.triu(jac @ jac.T, 1) < 0.0))
        wide += int(jac.shape[0] > jac.shape[1])
    assert worst <= 1e-9, worst
    # The sample really has conflicting tasks and T > d (rank-deficient G) in it.
    assert pairs_in_conflict >= 100 and wide >= 100


def bargaining_direction(jac: np.ndarray) -> np.ndarray:
    """argmax_u Σ_i log ⟨u, g_i⟩ s.t. ‖u‖² ≤ T on the explicit (unit) vectors: the bargaining problem, not
    its equation. u does not depend on the gradients' norms (log⟨u, k g⟩ = log k + log⟨u, g⟩)."""
    t = jac.shape[0]
    unit = jac / np.linalg.norm(jac, axis=1, keepdims=True)
    u = cp.Variable(jac.shape[1])
    problem = cp.Problem(cp.Maximize(cp.sum(cp.log(unit @ u))), [cp.sum_squares(u) <= t])
    # Tolerances 1e-12: Clarabel then calls most answers "inaccurate", yet they are its most accurate ones
    # (measured: u within 5e-7 of the exact answer, against 2e-6 at the default-like 1e-10).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, max_iter=400)
    assert problem.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE)
    return u.value


def test_matches_the_bargaining_problem_solved_by_cvxpy():
    """u = Jᵀα against the interior-point solution of the bargaining problem: 1e-6 relative to ‖u‖ = √T."""
    rng = np.random.default_rng(5)
    for n in range(40):
        t = int(rng.integers(2, 9))
        jac = solvable_jacobian(rng, t, int(rng.integers(2, 12)), margin=0.1, spread=(0.3, 1.5)[n % 2])
        alpha = nash_bargaining_weights(jac @ jac.T).alpha
        assert np.linalg.norm(jac.T @ alpha - bargaining_direction(jac)) <= 1e-6 * np.sqrt(t), n


def test_matches_the_existing_cvxpy_path_where_it_converges():
    """The solver cases of the other solvers' tests, through NashMTL (Clarabel, convex-concave iterations,
    stopping at residual 1e-6): the same α to 1e-6 relative wherever that path reached its tolerance."""
    compared = 0
    for _kind, jac in seeded_cases(80, 2, 8, seed=7):
        g = jac @ jac.T
        t = g.shape[0]
        try:
            alpha = nash_bargaining_weights(g).alpha
        except NashNoSolutionError:
            continue
        method = NashMTL()
        with warnings.catch_warnings():
            warnings.simplefilter("error", SolverFallbackWarning)
            try:
                old = method(torch.from_numpy(g), torch.ones(t, dtype=torch.float64)).numpy()
            except SolverFallbackWarning:
                continue
        if np.abs(old * (g @ old) - 1.0).max() >= 1e-6:
            continue  # ran out of iterations: not converged, nothing to compare with
        np.testing.assert_allclose(old, alpha, rtol=1e-6, atol=0)
        compared += 1
    assert compared >= 25


def test_closed_forms():
    # T = 1: α = 1/‖g‖.
    sol = nash_bargaining_weights(np.array([[4e-6]]))
    np.testing.assert_allclose(sol.alpha, [1 / 2e-3], rtol=1e-15)
    # Orthogonal gradients: α_i = 1/‖g_i‖.
    jac = np.diag([3.0, 1e-4, 50.0])
    np.testing.assert_allclose(nash_bargaining_weights(jac @ jac.T).alpha, [1 / 3, 1e4, 1 / 50], rtol=1e-14)
    # T = 2: by symmetry of the unit-gradient problem α_i ‖g_i‖ = 1/√(1 + cos θ).
    rng = np.random.default_rng(2)
    for _ in range(50):
        jac = rng.standard_normal((2, 5)) * 10.0 ** rng.uniform(-8, 0, size=(2, 1))
        norms = np.linalg.norm(jac, axis=1)
        cos = jac[0] @ jac[1] / (norms[0] * norms[1])
        expected = 1.0 / (norms * np.sqrt(1.0 + cos))
        np.testing.assert_allclose(nash_bargaining_weights(jac @ jac.T).alpha, expected, rtol=1e-12)


def test_each_task_scale_only_rescales_its_weight():
    jac = SOLVABLE[3]
    k = 10.0 ** np.linspace(-8, 0, jac.shape[0])
    a1 = nash_bargaining_weights(jac @ jac.T).alpha
    scaled = jac * k[:, None]
    a2 = nash_bargaining_weights(scaled @ scaled.T).alpha
    np.testing.assert_allclose(a2 * k, a1, rtol=1e-11)


def test_unique_whatever_the_start():
    rng = np.random.default_rng(8)
    for jac in SOLVABLE[:60]:
        g = jac @ jac.T
        t = g.shape[0]
        a = nash_bargaining_weights(g, start=10.0 ** rng.uniform(-3, 3, t)).alpha
        b = nash_bargaining_weights(g, start=10.0 ** rng.uniform(-3, 3, t) / np.sqrt(np.diag(g))).alpha
        np.testing.assert_allclose(a, b, rtol=1e-10)


def test_duplicated_gradients_have_a_unique_solution():
    """G singular through exact duplicates: a solution still exists (the duplicates share one direction, so
    zero is not in the hull); it is unique and gives duplicates equal weights. Checked against the cvxpy
    bargaining problem on the explicit vectors and from two starts."""
    rng = np.random.default_rng(4)
    for _ in range(10):
        base = solvable_jacobian(rng, 3, 6, margin=0.2, spread=0.8)
        jac = base[[0, 1, 1, 2, 0, 1]] * np.array([[1.0], [1.0], [1.0], [1.0], [1e-3], [1.0]])
        g = jac @ jac.T
        assert np.linalg.matrix_rank(jac / np.linalg.norm(jac, axis=1, keepdims=True)) == 3
        a = nash_bargaining_weights(g, start=np.ones(6)).alpha
        b = nash_bargaining_weights(g, start=np.arange(1.0, 7.0)).alpha
        np.testing.assert_allclose(a, b, rtol=1e-10)
        np.testing.assert_allclose(a[1], a[2], rtol=1e-12)
        np.testing.assert_allclose(a[1], a[5], rtol=1e-12)
        np.testing.assert_allclose(a[0], 1e-3 * a[4], rtol=1e-12)
        assert residual_dspace(jac, a) <= 1e-10
        assert np.linalg.norm(jac.T @ a - bargaining_direction(jac)) <= 1e-6 * np.sqrt(6)


def test_warm_start_gives_the_same_answer_in_fewer_iterations():
    """Training changes G a little from one step to the next: starting from the previous α."""
    rng = np.random.default_rng(6)
    cold_total = warm_total = 0
    for jac in SOLVABLE[:80]:
        g = jac @ jac.T
        previous = nash_bargaining_weights(g).alpha
        moved = jac * (1.0 + 0.02 * rng.standard_normal(jac.shape))
        g2 = moved @ moved.T
        cold = nash_bargaining_weights(g2)
        warm = nash_bargaining_weights(g2, start=previous)
        np.testing.assert_allclose(warm.alpha, cold.alpha, rtol=1e-10)
        assert warm.residual <= 1e-9
        assert warm.iterations <= cold.iterations + 1
        cold_total += cold.iterations
        warm_total += warm.iterations
    assert warm_total < 0.75 * cold_total, (warm_total, cold_total)
    # From the exact answer: no iteration at all.
    g = SOLVABLE[0] @ SOLVABLE[0].T
    exact = nash_bargaining_weights(g).alpha
    assert nash_bargaining_weights(g, start=exact).iterations <= 1


def unit_hull_distance2(jac: np.ndarray) -> float:
    """min_{w∈Δ} ‖Σ w_i g_i/‖g_i‖‖² by enumerating faces (references.brute_force_qp, small T only)."""
    unit = jac / np.linalg.norm(jac, axis=1, keepdims=True)
    c = unit @ unit.T
    w = brute_force_qp(c, list(range(c.shape[0])), [0.0] * c.shape[0])
    return float(np.sum((unit.T @ w) ** 2))


def assert_certificate(err: NashNoSolutionError, jac: np.ndarray, stationary_tol: float = 1e-10) -> None:
    """The exception's weights w ∈ Δ combine the unit gradients to a vector of squared norm ≤ stationary_tol
    (checked on the explicit vectors), or point at a zero gradient."""
    w = err.weights
    assert np.all(w >= 0.0) and abs(w.sum() - 1.0) <= 1e-12
    norms = np.linalg.norm(jac, axis=1)
    if np.any(norms[w > 0] == 0.0):
        return
    unit = jac / norms[:, None]
    assert np.sum((unit.T @ w) ** 2) <= stationary_tol * (1 + 1e-6) + 1e-15
    assert err.min_norm <= stationary_tol


def test_no_solution_zero_gradient():
    jac = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.5, -1.0, 3.0]])
    with pytest.raises(NashNoSolutionError, match="task 1 has a zero gradient") as info:
        nash_bargaining_weights(jac @ jac.T)
    np.testing.assert_array_equal(info.value.weights, [0.0, 1.0, 0.0])
    assert isinstance(info.value, SolverError)
    with pytest.raises(NashNoSolutionError, match="zero gradient"):
        nash_bargaining_weights(np.zeros((3, 3)))


@pytest.mark.parametrize("k", [1.0, 0.37, 1e-6, 2.5])
def test_no_solution_exactly_opposite_gradients(k):
    rng = np.random.default_rng(int(k * 1000))
    g1 = rng.standard_normal(7)
    for jac in (np.stack([g1, -k * g1]), np.stack([g1, rng.standard_normal(7), -k * g1])):
        with pytest.raises(NashNoSolutionError, match="convex hull") as info:
            nash_bargaining_weights(jac @ jac.T)
        assert_certificate(info.value, jac)


def test_no_solution_zero_in_the_hull():
    rng = np.random.default_rng(12)
    for n in range(30):
        t = int(rng.integers(3, 8))
        jac = rng.standard_normal((t, int(rng.integers(2, 9))))
        # The last gradient is minus a positive combination of the others (norms spread 1e-8..1): zero is a
        # convex combination of all of them by construction.
        jac[:-1] *= 10.0 ** rng.uniform(-8, 0, size=(t - 1, 1))
        jac[-1] = -(rng.uniform(0.1, 1.0, t - 1) @ jac[:-1])
        start = None if n % 2 else 10.0 ** rng.uniform(-2, 2, t)
        with pytest.raises(NashNoSolutionError) as info:
            nash_bargaining_weights(jac @ jac.T, start=start)
        assert_certificate(info.value, jac)


def test_solution_exists_exactly_when_zero_is_not_near_the_hull():
    """Random T > d problems (often Pareto-stationary), against the distance from zero to the hull of the
    unit gradients found by enumerating faces: raise iff that squared distance is ≤ stationary_tol, and
    otherwise solve to the rounding floor of the residual."""
    raised = solved = 0
    for kind, jac in seeded_cases(150, 2, 6, seed=21):
        if np.any(np.linalg.norm(jac, axis=1) == 0.0):
            continue
        rho2 = unit_hull_distance2(jac)
        if 1e-12 < rho2 < 1e-8:
            continue  # too close to the threshold for the enumeration's own round-off to decide
        try:
            sol = nash_bargaining_weights(jac @ jac.T)
        except NashNoSolutionError as err:
            assert rho2 <= 1e-10, (kind, rho2)
            assert_certificate(err, jac)
            raised += 1
            continue
        assert rho2 > 1e-10, (kind, rho2)
        # Zero near the hull makes α ~ 1/ρ and the residual's rounding error ~ eps/ρ².
        assert sol.residual <= max(1e-9, 1e-14 / rho2), (kind, rho2, sol.residual)
        solved += 1
    assert raised >= 30 and solved >= 30, (raised, solved)


def test_near_opposite_pair_threshold():
    """Two unit gradients at angle π − δ: ρ² = sin²(δ/2), α_i = 1/√(1 − cos δ)."""
    for delta, raises in [(1e-7, True), (1e-6, True), (1e-4, False), (1e-2, False)]:
        jac = np.array([[1.0, 0.0], [-np.cos(delta), np.sin(delta)]])
        if raises:
            with pytest.raises(NashNoSolutionError):
                nash_bargaining_weights(jac @ jac.T)
        else:
            sol = nash_bargaining_weights(jac @ jac.T)
            np.testing.assert_allclose(sol.alpha, 1.0 / np.sqrt(2.0 * np.sin(delta / 2) ** 2), rtol=1e-8)


def test_singular_and_float32_gram_matrices():
    """T > d with a solution (G of rank d), and a G accumulated in float32 (indefinite at the 1e-7 level)."""
    rng = np.random.default_rng(9)
    for _ in range(20):
        jac = solvable_jacobian(rng, 8, 3, margin=0.3, spread=0.5)
        g = jac @ jac.T
        assert np.linalg.matrix_rank(jac / np.linalg.norm(jac, axis=1, keepdims=True)) == 3
        assert residual_dspace(jac, nash_bargaining_weights(g).alpha) <= 1e-9
        j32 = torch.from_numpy(jac / np.linalg.norm(jac, axis=1, keepdims=True)).float()
        g32 = (j32 @ j32.T).double().numpy()
        sol = nash_bargaining_weights(g32)
        assert sol.residual <= 1e-9  # on the G given


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"start": [1.0, -1.0, 1.0]}, "start must be finite and > 0"),
        ({"start": [1.0, 1.0]}, r"start must have shape \(3,\)"),
        ({"tol": -1.0}, "tol must be"),
        ({"max_iter": 0}, "max_iter must be >= 1"),
        ({"stationary_tol": float("nan")}, "stationary_tol must be"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nash_bargaining_weights(np.eye(3), **kwargs)


def test_iteration_limit_is_an_error_not_a_silent_answer():
    jac = make_jacobian("conflicting", 6, 9, 3)
    with pytest.raises(SolverError, match="did not reach the tolerance in 1 iterations"):
        nash_bargaining_weights(jac @ jac.T, max_iter=1)
