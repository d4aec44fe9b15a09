"""cvxpy reference QPs: DPP, built once, agreement with the iterative solvers and brute force, failures."""

import cvxpy as cp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from solver_cases import (
    assert_fused_close,
    brute_force,
    hypothesis_settings,
    inner_products,
    integer_jacobians,
    jacobians,
    kkt_tol,
    seeded_cases,
)

import gradsurgery.solvers.qp as qp
from gradsurgery.errors import SolverError
from gradsurgery.solvers import (
    MainAuxQP,
    MixedQP,
    SimplexQP,
    main_aux_min_norm,
    main_aux_one_weights,
    min_norm_two_weights,
    mixed_min_norm,
    pareto_min_norm,
    simplex_min_norm,
)

AGREE = seeded_cases(240, 1, 8, seed=3) + seeded_cases(30, 9, 12, seed=5)
SMALL = seeded_cases(60, 1, 4, seed=4)

# One problem object per (class, T, config), reused across tests as the optimizer would reuse it across
# steps: this is also what keeps the test time down (cvxpy compiles a problem once, ~50 ms).
_QPS: dict = {}


def simplex_qp(t: int) -> SimplexQP:
    return _QPS.setdefault(("simplex", t), SimplexQP(t))


def pareto_qp(t: int, c) -> SimplexQP:
    q = _QPS.setdefault(("pareto", t), SimplexQP(t, min_weights=np.zeros(t)))
    q.min_weights = c
    return q


def main_aux_qp(t: int, main: int) -> MainAuxQP:
    return _QPS.setdefault(("main_aux", t, main), MainAuxQP(t, main))


def mixed_qp(t: int, main) -> MixedQP:
    return _QPS.setdefault(("mixed", t, tuple(main)), MixedQP(t, main))


def _bounds(t: int, seed: int) -> np.ndarray:
    c = np.random.default_rng(seed).uniform(0.0, 1.0, t)
    return c / c.sum() * (0.9 * (seed % 3) / 2)  # Σc ∈ {0, 0.45, 0.9}


# --- DPP and problem reuse -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: SimplexQP(4),
        lambda: SimplexQP(4, [0.1, 0.2, 0.0, 0.3]),
        lambda: MainAuxQP(4, 2),
        lambda: MixedQP(4, [0, 3]),
    ],
    ids=["simplex", "pareto", "main_aux", "mixed"],
)
def test_problem_is_dpp_and_built_once(make):
    q = make()
    assert q.problem.is_dpp()
    problem = q.problem
    rng = np.random.default_rng(0)
    for _ in range(3):
        jac = rng.standard_normal((4, 6))
        q.solve(jac @ jac.T)
        assert q.problem is problem
    assert problem.status == cp.OPTIMAL


def test_min_weights_can_be_updated_on_the_same_problem():
    jac = np.random.default_rng(1).standard_normal((3, 5))
    q = SimplexQP(3)
    problem = q.problem
    a = q.solve(jac @ jac.T)
    q.min_weights = [0.5, 0.0, 0.4]
    b = q.solve(jac @ jac.T)
    assert q.problem is problem
    assert b[0] >= 0.5 - 1e-12 and b[2] >= 0.4 - 1e-12
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(q.min_weights, [0.5, 0.0, 0.4])


# --- agreement with the iterative solvers (fused vector, 1e-5) -----------------------------------------


@pytest.mark.parametrize("kind,jac", AGREE, ids=[f"{k}-{j.shape}" for k, j in AGREE])
def test_backends_agree(kind, jac):
    gram = jac @ jac.T
    t = jac.shape[0]
    assert_fused_close(jac, simplex_qp(t).solve(gram), simplex_min_norm(gram), label=f"mgda {kind}")
    c = _bounds(t, t + len(kind))
    assert_fused_close(jac, pareto_qp(t, c).solve(gram), pareto_min_norm(gram, c), label=f"pareto {kind}")
    m = (t - 1) // 2
    w = main_aux_qp(t, m).solve(gram)
    assert_fused_close(jac, w, main_aux_min_norm(gram, m), label=f"main_aux {kind}")
    main = list(range(0, t, 2))
    assert_fused_close(jac, mixed_qp(t, main).solve(gram), mixed_min_norm(gram, main), label=f"mixed {kind}")
    if t == 2:
        assert_fused_close(jac, simplex_qp(2).solve(gram), min_norm_two_weights(gram), label="mgda T=2")
        assert_fused_close(jac, main_aux_qp(2, 0).solve(gram), main_aux_one_weights(gram, 0), label="aux T=2")


@hypothesis_settings(50)
@given(st.one_of(jacobians(1, 8), integer_jacobians(1, 6)), st.data())
def test_backends_agree_property(jac, data):
    gram = jac @ jac.T
    t = jac.shape[0]
    assert_fused_close(jac, simplex_qp(t).solve(gram), simplex_min_norm(gram), label="mgda")
    c = _bounds(t, data.draw(st.integers(0, 5)))
    assert_fused_close(jac, pareto_qp(t, c).solve(gram), pareto_min_norm(gram, c), label="pareto")
    m = data.draw(st.integers(0, t - 1))
    assert_fused_close(jac, main_aux_qp(t, m).solve(gram), main_aux_min_norm(gram, m), label="main_aux")
    main = sorted(data.draw(st.sets(st.integers(0, t - 1), min_size=1, max_size=t)))
    assert_fused_close(jac, mixed_qp(t, main).solve(gram), mixed_min_norm(gram, main), label="mixed")


@pytest.mark.parametrize("kind,jac", SMALL, ids=[f"{k}-{j.shape}" for k, j in SMALL])
def test_qp_matches_brute_force(kind, jac):
    gram = jac @ jac.T
    t = jac.shape[0]
    assert_fused_close(jac, simplex_qp(t).solve(gram), brute_force(jac, range(t)), label=f"mgda {kind}")
    c = _bounds(t, 2)
    w = pareto_qp(t, c).solve(gram)
    assert_fused_close(jac, w, brute_force(jac, range(t), c), label=f"pareto {kind}")
    assert_fused_close(jac, main_aux_qp(t, 0).solve(gram), brute_force(jac, [0]), label=f"main_aux {kind}")
    main = [t - 1] if t < 3 else [0, t - 1]
    assert_fused_close(jac, mixed_qp(t, main).solve(gram), brute_force(jac, main), label=f"mixed {kind}")


@pytest.mark.parametrize("kind,jac", AGREE[:60], ids=[f"{k}-{j.shape}" for k, j in AGREE[:60]])
def test_qp_answers_are_feasible_and_satisfy_kkt(kind, jac):
    gram = jac @ jac.T
    t = jac.shape[0]
    # 1e-4 of max‖g_i‖²: an interior-point answer meets the conditions only to its tolerance (ε for ‖u‖²
    # means about √ε for ⟨u, g_i⟩).
    tol = 1e5 * kkt_tol(jac)
    alpha = simplex_qp(t).solve(gram)
    assert np.all(alpha >= 0) and abs(alpha.sum() - 1) <= 1e-12
    u2 = float(np.sum((jac.T @ alpha) ** 2))
    assert np.all(inner_products(jac, alpha) >= u2 - tol)
    w = main_aux_qp(t, 0).solve(gram)
    assert w[0] == 1.0 and np.all(w >= 0)
    assert np.all(inner_products(jac, w)[1:] >= -tol)


def test_pareto_bounds_summing_to_one():
    c = [0.25, 0.75]
    np.testing.assert_allclose(SimplexQP(2, c).solve(np.diag([1.0, 2.0])), c, atol=1e-12)


def test_zero_and_single_task():
    assert simplex_qp(3).solve(np.zeros((3, 3))).sum() == pytest.approx(1.0)
    np.testing.assert_allclose(simplex_qp(1).solve(np.array([[2.0]])), [1.0])
    np.testing.assert_allclose(main_aux_qp(1, 0).solve(np.array([[2.0]])), [1.0])
    np.testing.assert_allclose(main_aux_qp(3, 0).solve(np.zeros((3, 3))), [1.0, 0.0, 0.0], atol=1e-9)


# --- failures and bad input ----------------------------------------------------------------------------


def _status(monkeypatch, value):
    monkeypatch.setattr(cp.Problem, "status", property(lambda self: value))


@pytest.mark.parametrize("status", ["infeasible", "unbounded", "user_limit", "infeasible_inaccurate"])
def test_bad_status_raises_solver_error(monkeypatch, status):
    q = SimplexQP(3)
    _status(monkeypatch, status)
    with pytest.raises(SolverError, match=f"SimplexQP.*{status}"):
        q.solve(np.eye(3))


def test_backend_exception_raises_solver_error(monkeypatch):
    q = MixedQP(3, [0, 1])

    def fail(*args, **kwargs):
        raise cp.error.SolverError("Solver 'CLARABEL' failed.")

    monkeypatch.setattr(q.problem, "solve", fail)
    with pytest.raises(SolverError, match="MixedQP.*CLARABEL' failed"):
        q.solve(np.eye(3))


@pytest.mark.parametrize("value", [None, np.array([np.nan, 1.0, 0.0]), np.array([np.inf, 1.0, 0.0])])
def test_missing_or_non_finite_value_raises_solver_error(monkeypatch, value):
    q = MainAuxQP(3, 1)
    monkeypatch.setattr(q.problem, "solve", lambda *a, **k: None)
    _status(monkeypatch, cp.OPTIMAL)
    # cvxpy refuses to store a non-finite value in a Variable, so the read is faked.
    monkeypatch.setattr(type(q._x), "value", property(lambda self: value))
    with pytest.raises(SolverError, match=r"MainAuxQP.*'optimal'.*(None|nan|inf)"):
        q.solve(np.eye(3))


def test_inaccurate_answer_is_judged_by_its_kkt_residual(monkeypatch):
    # Rows of equal norm: Clarabel's per-task units are then the weights themselves, so the faked values
    # below are weights.
    jac = np.array([[1.0, 0.0], [0.6, 0.8]])
    q = SimplexQP(2)
    expected = q.solve(jac @ jac.T)  # exact: (1/2, 1/2)

    def fake(value):
        def solve(*args, **kwargs):
            q._x.value = np.array(value)

        return solve

    _status(monkeypatch, cp.OPTIMAL_INACCURATE)
    monkeypatch.setattr(q.problem, "solve", fake(expected))
    np.testing.assert_allclose(q.solve(jac @ jac.T), [0.5, 0.5], atol=1e-8)
    monkeypatch.setattr(q.problem, "solve", fake([0.8, 0.2]))
    with pytest.raises(SolverError, match="optimal_inaccurate.*KKT residual"):
        q.solve(jac @ jac.T)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: SimplexQP(0), "num_tasks.*0"),
        (lambda: SimplexQP(2.0), "2.0"),
        (lambda: SimplexQP(2, [0.7, 0.7]), "1.4"),
        (lambda: SimplexQP(2, [-0.2, 0.1]), "-0.2"),
        (lambda: SimplexQP(2, [0.1]), r"length 2.*\[0.1\]"),
        (lambda: MainAuxQP(3, 3), "main=3"),
        (lambda: MainAuxQP(3, -1), "main=-1"),
        (lambda: MixedQP(3, []), r"\[\]"),
        (lambda: MixedQP(3, [1, 1]), "1"),
        (lambda: MixedQP(3, [0, 7]), "7"),
    ],
)
def test_constructor_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "gram,match",
    [
        (np.eye(3), r"2 tasks.*\(3, 3\)"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), "nan"),
        (np.array([[1.0, 2.0], [0.0, 1.0]]), "not symmetric"),
    ],
)
def test_solve_validation(gram, match):
    with pytest.raises(ValueError, match=match):
        SimplexQP(2).solve(gram)


def test_failed_update_of_min_weights_keeps_the_old_bounds():
    q = SimplexQP(2, [0.3, 0.2])
    with pytest.raises(ValueError, match="-1"):
        q.min_weights = [-1.0, 0.0]
    np.testing.assert_array_equal(q.min_weights, [0.3, 0.2])


def test_gram_factor_reproduces_gram():
    jac = np.random.default_rng(5).standard_normal((6, 3))  # rank 3 < 6: eigenvalues ~ -1e-16 get clipped
    gram = jac @ jac.T
    f = qp.gram_factor(gram)
    np.testing.assert_allclose(f.T @ f, gram, atol=1e-12 * np.abs(gram).max())


def _two_small_tasks(seed: int, ratio: float) -> np.ndarray:
    """Four random task gradients, the first two ``ratio`` times the size of the others."""
    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((4, 6))
    jac[:2] *= ratio
    jac[2:] *= rng.uniform(0.5, 2.0, (2, 1))
    return jac


@pytest.mark.parametrize("ratio", [1e-2, 1e-4, 1e-6, 1e-8])
@pytest.mark.parametrize("seed", range(6))
def test_main_tasks_much_smaller_than_an_auxiliary(ratio, seed):
    # Click and conversion gradients beside a watch-time MSE ~1e4 times larger (benchmarks' recsys): the
    # answer lives at the main tasks' scale, so agreement is measured there, not relative to the auxiliary.
    # Brute force (lstsq with absolute cut-offs) is a reference down to 1e-6; the exact active-set solvers
    # are one at every ratio.
    jac = _two_small_tasks(seed, ratio)
    gram = jac @ jac.T
    main_scale = np.linalg.norm(jac[:2], axis=1).max()
    cases = [
        ([0, 1], mixed_qp(4, [0, 1]).solve(gram), mixed_min_norm(gram, [0, 1])),
        ([0], main_aux_qp(4, 0).solve(gram), main_aux_min_norm(gram, 0)),
        ([0, 1, 2, 3], simplex_qp(4).solve(gram), simplex_min_norm(gram)),
    ]
    for main, qp_answer, exact in cases:
        references = {"active set": exact}
        if ratio >= 1e-6:
            references["brute force"] = brute_force(jac, main)
        for name, reference in references.items():
            gap = np.linalg.norm(jac.T @ (qp_answer - reference)) / main_scale
            assert gap <= 1e-5, f"{main=}, {name}: fused vectors differ by {gap:.3g} of max main ‖g_i‖"


@pytest.mark.parametrize("ratio", [1e-2, 1e-4, 1e-6, 1e-8])
@pytest.mark.parametrize("seed", range(6))
def test_pareto_bounds_on_tasks_of_very_different_scales(ratio, seed):
    # Per-task units put bounds c_i‖g_i‖/r up to 1e7 at ratio 1e-8, where Clarabel may call the problem
    # infeasible; the solver then retries with the main weights in plain units. Either way the answer
    # matches the iterative solver on the shifted simplex, relative to the fused vector.
    jac = _two_small_tasks(seed, ratio)
    gram = jac @ jac.T
    c = np.array([0.1, 0.05, 0.01, 0.0])
    w = pareto_qp(4, c).solve(gram)
    assert np.all(w >= c) and abs(w.sum() - 1.0) <= 1e-12
    reference = pareto_min_norm(gram, c)
    gap = np.linalg.norm(jac.T @ (w - reference)) / np.linalg.norm(jac.T @ reference)
    assert gap <= 1e-5
