"""Iterative solvers on G, against brute force on J, closed forms, and optimality conditions in d-space."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from references import brute_force_qp
from solver_cases import (
    EXACT_RTOL,
    assert_fused_close,
    brute_force,
    exact_min_norm,
    fused,
    hypothesis_settings,
    inner_products,
    integer_jacobians,
    jacobians,
    kkt_tol,
    make_jacobian,
    seeded_cases,
)

import gradsurgery.solvers.frank_wolfe as fw
from gradsurgery.errors import SolverError
from gradsurgery.solvers import (
    main_aux_min_norm,
    main_aux_one_weights,
    min_norm_two_weights,
    mixed_min_norm,
    pareto_min_norm,
    simplex_min_norm,
)
from gradsurgery.solvers.closed_form import psd_projection

SMALL = seeded_cases(160, 1, 4, seed=1)  # brute force is exponential in T
ALL = seeded_cases(200, 1, 8, seed=2)


def _lower_bounds(num_tasks: int, seed: int, total: float) -> np.ndarray:
    c = np.random.default_rng(seed).uniform(0.0, 1.0, num_tasks)
    return c / c.sum() * total


def _assert_simplex(w, idx=None):
    w = np.asarray(w)
    idx = np.arange(w.size) if idx is None else np.asarray(idx)
    assert np.all(np.isfinite(w)) and np.all(w >= 0.0)
    assert abs(w[idx].sum() - 1.0) <= 1e-12


def _assert_mgda_kkt(jac, alpha):
    """⟨u, g_i⟩ ≥ ‖u‖² for every task, with equality on the support (Sener & Koltun 2018)."""
    _assert_simplex(alpha)
    u = fused(jac, alpha)
    v = inner_products(jac, alpha)
    tol = kkt_tol(jac)
    assert np.all(v >= u @ u - tol)
    assert np.all(np.abs(v[alpha > 1e-9] - u @ u) <= tol)


def _assert_aux_kkt(jac, w, aux):
    """λ ≥ 0, ⟨u, g_j⟩ ≥ 0 and λ_j ⟨u, g_j⟩ = 0 for every auxiliary j."""
    v = inner_products(jac, w)[aux]
    lam = np.asarray(w)[aux]
    tol = kkt_tol(jac)
    assert np.all(lam >= 0.0)
    assert np.all(v >= -tol)
    assert np.all(np.abs(lam * v) <= tol * np.maximum(1.0, lam))


# --- MGDA -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,jac", SMALL, ids=[f"{k}-{j.shape}" for k, j in SMALL])
def test_simplex_matches_brute_force(kind, jac):
    alpha = simplex_min_norm(jac @ jac.T)
    assert_fused_close(jac, alpha, brute_force(jac, range(jac.shape[0])), rtol=EXACT_RTOL, label=kind)
    _assert_mgda_kkt(jac, alpha)


@hypothesis_settings(150)
@given(st.one_of(jacobians(1, 8), integer_jacobians(1, 6)))
def test_simplex_kkt_property(jac):
    _assert_mgda_kkt(jac, simplex_min_norm(jac @ jac.T))


@hypothesis_settings(100)
@given(st.one_of(jacobians(2, 2), integer_jacobians(2, 2)))
def test_simplex_matches_closed_form_for_two_tasks(jac):
    gram = jac @ jac.T
    assert_fused_close(jac, simplex_min_norm(gram), min_norm_two_weights(gram), rtol=EXACT_RTOL)


@hypothesis_settings(60)
@given(jacobians(1, 4))
def test_simplex_matches_brute_force_property(jac):
    alpha = simplex_min_norm(jac @ jac.T)
    assert_fused_close(jac, alpha, brute_force(jac, range(jac.shape[0])), rtol=EXACT_RTOL)


def test_simplex_degenerate_inputs():
    np.testing.assert_array_equal(simplex_min_norm(np.zeros((3, 3))), np.full(3, 1 / 3))
    np.testing.assert_array_equal(simplex_min_norm(np.array([[4.0]])), [1.0])
    np.testing.assert_array_equal(simplex_min_norm(np.zeros((1, 1))), [1.0])
    # T > d and a zero gradient: u* = 0, reached by putting all weight on the zero task (or a mix).
    jac = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [-1.0, -1.0], [2.0, 3.0]])
    alpha = simplex_min_norm(jac @ jac.T)
    assert np.linalg.norm(fused(jac, alpha)) <= 1e-12
    _assert_simplex(alpha)


def test_simplex_known_answer():
    # Three unit vectors at 120°: u* = 0 with equal weights, the only optimum.
    ang = np.array([0.0, 2.0, 4.0]) * np.pi / 3
    jac = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    np.testing.assert_allclose(simplex_min_norm(jac @ jac.T), np.full(3, 1 / 3), atol=1e-12)
    # Orthogonal gradients of norms 1 and 2: α ∝ 1/‖g_i‖², i.e. (4/5, 1/5).
    np.testing.assert_allclose(simplex_min_norm(np.diag([1.0, 4.0])), [0.8, 0.2], atol=1e-14)


@pytest.mark.parametrize("seed", range(20))
def test_simplex_permutation_invariance(seed):
    jac = make_jacobian(["random", "conflicting", "duplicated", "wide"][seed % 4], 2 + seed % 7, 5, seed)
    perm = np.random.default_rng(seed).permutation(jac.shape[0])
    a = simplex_min_norm(jac @ jac.T)
    b = simplex_min_norm(jac[perm] @ jac[perm].T)
    assert_fused_close(jac, a, b[np.argsort(perm)], rtol=EXACT_RTOL)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("k", [1e-6, 0.37, 1e5])
def test_simplex_scale_invariance(seed, k):
    # T ≤ d with Gaussian rows: G is non-singular, so α itself is unique.
    jac = make_jacobian("random", 2 + seed % 5, 8, seed)
    gram = jac @ jac.T
    np.testing.assert_allclose(simplex_min_norm(k * gram), simplex_min_norm(gram), rtol=0, atol=1e-10)


# --- PE-LTR --------------------------------------------------------------------------------------------


def _assert_pareto_kkt(jac, alpha, c):
    """α ≥ c, Σα = 1, and every coordinate above its bound has the smallest ⟨u, g_i⟩ (Lin et al. 2019)."""
    _assert_simplex(alpha)
    assert np.all(alpha >= c - 1e-12)
    v = inner_products(jac, alpha)
    free = alpha > c + 1e-9
    if free.any():
        assert v[free].max() <= v.min() + kkt_tol(jac)


@pytest.mark.parametrize("kind,jac", SMALL[:120], ids=[f"{k}-{j.shape}" for k, j in SMALL[:120]])
def test_pareto_matches_brute_force(kind, jac):
    t = jac.shape[0]
    for n, total in enumerate([0.0, 0.3, 0.9, 1.0]):
        c = _lower_bounds(t, n, total)
        alpha = pareto_min_norm(jac @ jac.T, c)
        assert_fused_close(jac, alpha, brute_force(jac, range(t), c), rtol=EXACT_RTOL, label=f"{kind} c={c}")
        _assert_pareto_kkt(jac, alpha, c)


@hypothesis_settings(100)
@given(jacobians(1, 8), st.floats(0.0, 1.0), st.integers(0, 1000))
def test_pareto_kkt_property(jac, total, seed):
    c = _lower_bounds(jac.shape[0], seed, total)
    _assert_pareto_kkt(jac, pareto_min_norm(jac @ jac.T, c), c)


@pytest.mark.parametrize("kind,jac", ALL[:60], ids=[f"{k}-{j.shape}" for k, j in ALL[:60]])
def test_pareto_with_zero_bounds_is_mgda(kind, jac):
    gram = jac @ jac.T
    a = pareto_min_norm(gram, np.zeros(jac.shape[0]))
    assert_fused_close(jac, a, simplex_min_norm(gram), rtol=EXACT_RTOL, label=kind)


def test_pareto_bounds_summing_to_one_are_the_answer():
    c = np.array([0.25, 0.5, 0.25])
    np.testing.assert_array_equal(pareto_min_norm(np.diag([1.0, 2.0, 3.0]), c), c)


# --- main / auxiliary ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,jac", SMALL, ids=[f"{k}-{j.shape}" for k, j in SMALL])
def test_main_aux_matches_brute_force(kind, jac):
    t = jac.shape[0]
    for main in range(t):
        w = main_aux_min_norm(jac @ jac.T, main)
        assert w[main] == 1.0
        assert_fused_close(jac, w, brute_force(jac, [main]), rtol=EXACT_RTOL, label=f"{kind} main={main}")
        _assert_aux_kkt(jac, w, [j for j in range(t) if j != main])


@hypothesis_settings(100)
@given(st.one_of(jacobians(2, 2), integer_jacobians(2, 2)), st.integers(0, 1))
def test_main_aux_matches_closed_form_for_one_auxiliary(jac, main):
    gram = jac @ jac.T
    assert_fused_close(jac, main_aux_min_norm(gram, main), main_aux_one_weights(gram, main), rtol=EXACT_RTOL)


@hypothesis_settings(150)
@given(st.one_of(jacobians(1, 8), integer_jacobians(1, 6)), st.integers(0, 7))
def test_main_aux_kkt_property(jac, main):
    main = main % jac.shape[0]
    w = main_aux_min_norm(jac @ jac.T, main)
    assert w[main] == 1.0
    _assert_aux_kkt(jac, w, [j for j in range(jac.shape[0]) if j != main])


def test_main_aux_l2_without_lambda():
    # The λ-free L2 rule (docs/maths.md): the auxiliary ½‖θ‖² has gradient θ: u = g + relu(−⟨g, θ⟩)/‖θ‖² θ.
    g, theta = np.array([1.0, -2.0, 0.5]), np.array([0.3, 1.0, -0.2])
    jac = np.stack([g, theta])
    w = main_aux_min_norm(jac @ jac.T, 0)
    expected = g + max(0.0, -(g @ theta)) / (theta @ theta) * theta
    np.testing.assert_allclose(fused(jac, w), expected, atol=1e-14)


# --- mixed ---------------------------------------------------------------------------------------------


def _main_sets(t: int):
    return [list(range(0, t, 2)), [t - 1], list(range(t))] + ([[0, t - 1]] if t > 2 else [])


@pytest.mark.parametrize("kind,jac", SMALL, ids=[f"{k}-{j.shape}" for k, j in SMALL])
def test_mixed_matches_brute_force(kind, jac):
    t = jac.shape[0]
    for main in _main_sets(t):
        w = mixed_min_norm(jac @ jac.T, main)
        _assert_simplex(w, main)
        assert_fused_close(jac, w, brute_force(jac, main), rtol=EXACT_RTOL, label=f"{kind} main={main}")
        _assert_aux_kkt(jac, w, [j for j in range(t) if j not in main])


@pytest.mark.parametrize("kind,jac", ALL[:80], ids=[f"{k}-{j.shape}" for k, j in ALL[:80]])
def test_mixed_identities(kind, jac):
    gram = jac @ jac.T
    t = jac.shape[0]
    assert_fused_close(jac, mixed_min_norm(gram, list(range(t))), simplex_min_norm(gram), rtol=EXACT_RTOL)
    for k in range(t):
        assert_fused_close(jac, mixed_min_norm(gram, [k]), main_aux_min_norm(gram, k), rtol=EXACT_RTOL)


@hypothesis_settings(100)
@given(jacobians(2, 8), st.data())
def test_mixed_kkt_property(jac, data):
    t = jac.shape[0]
    main = data.draw(st.lists(st.integers(0, t - 1), min_size=1, max_size=t, unique=True))
    w = mixed_min_norm(jac @ jac.T, main)
    _assert_simplex(w, main)
    v = inner_products(jac, w)
    # The main weights share the smallest ⟨u, g_i⟩ among main tasks on their support.
    on = [i for i in main if w[i] > 1e-9]
    assert v[on].max() <= v[main].min() + kkt_tol(jac)
    _assert_aux_kkt(jac, w, [j for j in range(t) if j not in main])


@pytest.mark.parametrize("seed", range(15))
def test_mixed_permutation_invariance(seed):
    jac = make_jacobian(["random", "conflicting", "zero_rows"][seed % 3], 3 + seed % 5, 4, seed)
    t = jac.shape[0]
    perm = np.random.default_rng(seed).permutation(t)
    inv = np.argsort(perm)
    main = [0, 2]
    a = mixed_min_norm(jac @ jac.T, main)
    b = mixed_min_norm(jac[perm] @ jac[perm].T, [int(inv[m]) for m in main])
    assert_fused_close(jac, a, b[inv], rtol=EXACT_RTOL)
    c = main_aux_min_norm(jac[perm] @ jac[perm].T, int(inv[1]))
    assert_fused_close(jac, main_aux_min_norm(jac @ jac.T, 1), c[inv], rtol=EXACT_RTOL)


# --- robustness and bad input --------------------------------------------------------------------------


@hypothesis_settings(100)
@given(integer_jacobians(1, 6), st.floats(1e-150, 1e150))
def test_never_nan_at_any_scale(jac, scale):
    gram = scale * (jac @ jac.T)
    t = jac.shape[0]
    for w in (
        simplex_min_norm(gram),
        pareto_min_norm(gram, np.full(t, 0.5 / t)),
        main_aux_min_norm(gram, 0),
        mixed_min_norm(gram, [t - 1]),
    ):
        assert np.all(np.isfinite(w)) and np.all(w >= 0)


def test_accepts_read_only_and_slightly_asymmetric_gram():
    jac = make_jacobian("conflicting", 4, 6, 0)
    gram = jac @ jac.T
    noisy = gram + 1e-9 * np.triu(np.ones_like(gram), 1)  # float32-style round-off in one triangle
    noisy.setflags(write=False)
    assert_fused_close(jac, simplex_min_norm(noisy), simplex_min_norm(gram), rtol=1e-6)
    assert not noisy.flags.writeable


SOLVERS = {
    "simplex": lambda g: simplex_min_norm(g),
    "pareto": lambda g: pareto_min_norm(g, np.zeros(len(g))),
    "main_aux": lambda g: main_aux_min_norm(g, 0),
    "mixed": lambda g: mixed_min_norm(g, [0]),
}


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(
    "gram,match",
    [
        (np.ones((2, 3)), r"\(2, 3\)"),
        (np.ones(3), r"\(3,\)"),
        (np.zeros((0, 0)), r"\(0, 0\)"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), "nan"),
        (np.array([[1.0, 0.0], [0.0, np.inf]]), "inf"),
        (np.array([[1.0, 0.5], [-0.5, 1.0]]), "not symmetric"),
        (np.array([[-1.0, 0.0], [0.0, 1.0]]), "-1.0"),
        ([["a", "b"], ["c", "d"]], "'a'"),
    ],
)
def test_bad_gram_raises_value_error(solver, gram, match):
    with pytest.raises(ValueError, match=match):
        SOLVERS[solver](gram)


@pytest.mark.parametrize(
    "c,match",
    [
        ([0.6, 0.6], "1.2"),
        ([-0.1, 0.5], "-0.1"),
        ([0.2, 0.2, 0.2], r"length 2.*\[0.2, 0.2, 0.2\]"),
        ([np.nan, 0.1], "nan"),
        ([0.1, np.inf], "inf"),
    ],
)
def test_pareto_rejects_bad_bounds(c, match):
    with pytest.raises(ValueError, match=match):
        pareto_min_norm(np.eye(2), c)


def test_pareto_allows_round_off_over_one():
    c = np.array([0.5, 0.5 + 5e-13])
    np.testing.assert_array_equal(pareto_min_norm(np.eye(2), c), c)


@pytest.mark.parametrize(
    "main,error,match",
    [
        (3, ValueError, "main=3"),
        (-1, ValueError, "main=-1"),
        (1.0, TypeError, "1.0"),
        (True, TypeError, "True"),
    ],
)
def test_main_aux_rejects_bad_main(main, error, match):
    with pytest.raises(error, match=match):
        main_aux_min_norm(np.eye(3), main)


@pytest.mark.parametrize(
    "main,error,match",
    [
        ([], ValueError, r"\[\]"),
        ([0, 0], ValueError, "0"),
        ([0, 5], ValueError, "5"),
        (0, TypeError, "0"),
        (["a"], TypeError, "'a'"),
        ([0.5], TypeError, "0.5"),
    ],
)
def test_mixed_rejects_bad_main(main, error, match):
    with pytest.raises(error, match=match):
        mixed_min_norm(np.eye(3), main)


@pytest.mark.parametrize(
    "kwargs,match", [({"tol": -1.0}, "-1.0"), ({"tol": np.nan}, "nan"), ({"max_iter": -2}, "-2")]
)
def test_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simplex_min_norm(np.eye(2), **kwargs)


def test_max_iter_zero_still_returns_a_feasible_point():
    jac = make_jacobian("conflicting", 5, 7, 3)
    _assert_simplex(simplex_min_norm(jac @ jac.T, max_iter=0))


def test_non_finite_iterates_raise_solver_error(monkeypatch):
    monkeypatch.setattr(fw, "FULL_FACE_MAX_TASKS", 0)  # else the full face answers eye(3) in Python floats
    monkeypatch.setattr(fw, "_iterate", lambda g, w, *args: np.full_like(w, np.nan))
    with pytest.raises(SolverError, match="simplex_min_norm.*non-finite"):
        simplex_min_norm(np.eye(3))


# --- the full face in Python floats (simplex_min_norm, 3 ≤ T ≤ FULL_FACE_MAX_TASKS) -----------------------


def _full_face(gram, tol=1e-12):
    """``simplex_min_norm``'s full face on ``gram`` as it reaches it: through ``symmetric_rows``."""
    sym = fw.symmetric_rows(gram)
    return None if sym is None else fw._full_face(sym, tol)


def _general_path(gram, monkeypatch, **options):
    with monkeypatch.context() as patch:
        patch.setattr(fw, "FULL_FACE_MAX_TASKS", 0)
        return simplex_min_norm(gram, **options)


FULL_FACE = [(k, j) for k, j in ALL if 3 <= j.shape[0] <= fw.FULL_FACE_MAX_TASKS]


@pytest.mark.parametrize("kind,jac", FULL_FACE, ids=[f"{k}-{j.shape}" for k, j in FULL_FACE])
def test_the_full_face_gives_the_general_paths_answer(kind, jac, monkeypatch):
    gram = jac @ jac.T
    taken = _full_face(gram)
    expected = _general_path(gram, monkeypatch)
    if taken is None:  # not every task in the support, or a face the general path must handle
        np.testing.assert_array_equal(simplex_min_norm(gram), expected)
        return
    assert np.all(expected > 0.0)  # the general path's support is every task too
    assert_fused_close(jac, taken, expected, rtol=1e-12, label=kind)
    np.testing.assert_array_equal(simplex_min_norm(gram), taken)


def test_the_full_face_answers_nearly_orthogonal_problems(monkeypatch):
    # The case it is for: task gradients of a shared representation, nearly orthogonal, every task kept;
    # well conditioned, so the weights themselves agree to rounding.
    rng = np.random.default_rng(0)
    for t in range(3, fw.FULL_FACE_MAX_TASKS + 1):
        for _ in range(10):
            jac = rng.standard_normal((t, 256)) * rng.uniform(0.5, 2.0, (t, 1))
            gram = jac @ jac.T
            w = _full_face(gram)
            assert w is not None
            _assert_mgda_kkt(jac, w)
            np.testing.assert_allclose(w, _general_path(gram, monkeypatch), rtol=0, atol=1e-14)


def _near_duplicate_pair(eps: float) -> np.ndarray:
    """g_0, g_1 = a ± eps·b with b orthogonal to every other gradient: MGDA splits a's weight equally
    between them (any other split adds eps·b to u), so every task stays in the support."""
    rng = np.random.default_rng(3)
    jac = rng.standard_normal((4, 40))
    basis, _ = np.linalg.qr(jac[1:].T)
    b = rng.standard_normal(40)
    b -= basis @ (basis.T @ b)
    a = jac[1].copy()
    jac[0], jac[1] = a + eps * b / np.linalg.norm(b), a - eps * b / np.linalg.norm(b)
    return jac


@pytest.mark.parametrize(
    "case",
    [
        "two tasks",
        "nine tasks",
        "a dominated task",
        "a duplicated gradient",
        "a near-duplicate pair",
        "a zero gradient",
        "zero G",
    ],
)
def test_the_full_face_leaves_other_problems_to_the_general_path(case, monkeypatch):
    rng = np.random.default_rng(3)
    t = {"two tasks": 2, "nine tasks": 9}.get(case, 4)
    jac = rng.standard_normal((t, 40))
    if case == "a dominated task":  # g_3 = 2 g_0 + 2 g_1: MGDA gives it weight 0
        jac[3] = 2.0 * (jac[0] + jac[1])
    elif case == "a duplicated gradient":
        jac[3] = jac[2]
    elif case == "a near-duplicate pair":  # full support, but a pivot below _PIVOT_MIN (sin² ≈ 1e-11)
        jac = _near_duplicate_pair(1e-5)
    elif case == "a zero gradient":
        jac[3] = 0.0
    elif case == "zero G":
        jac[:] = 0.0
    gram = jac @ jac.T
    assert _full_face(gram) is None
    np.testing.assert_array_equal(simplex_min_norm(gram), _general_path(gram, monkeypatch))


def test_the_full_face_keeps_the_general_paths_errors_and_options(monkeypatch):
    jac = np.random.default_rng(4).standard_normal((4, 256))
    gram = jac @ jac.T
    assert _full_face(gram) is not None
    bad = gram.copy()
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match=r"G has a non-finite entry .*nan.* at \(0, 1\)"):
        simplex_min_norm(bad)
    bad = gram.copy()
    bad[0, 1] += 1e-3 * np.abs(gram).max()
    with pytest.raises(ValueError, match="G is not symmetric"):
        simplex_min_norm(bad)
    with pytest.raises(ValueError, match="tol must be"):
        simplex_min_norm(gram, tol=-1.0)
    # max_iter=0 takes no face solve: the general path's start, not the full face's answer
    np.testing.assert_array_equal(
        simplex_min_norm(gram, max_iter=0), _general_path(gram, monkeypatch, max_iter=0)
    )
    # a float32 G and one asymmetric within round-off are read as the general path reads them
    for other in (gram.astype(np.float32), gram + 1e-7 * np.tril(np.abs(gram), -1)):
        assert _full_face(other) is not None
        np.testing.assert_allclose(simplex_min_norm(other), _general_path(other, monkeypatch), atol=1e-14)


def test_the_full_face_certifies_its_answer(monkeypatch):
    # Without the rounding allowance (tol, eps and tiny at 0) stationarity computed in floats fails by a few
    # ulps on some problems: the certificate is what refuses them.
    monkeypatch.setattr(fw, "EPS", 0.0)
    monkeypatch.setattr(fw, "TINY", 0.0)
    rng = np.random.default_rng(5)
    refused = 0
    for _ in range(40):
        jac = rng.standard_normal((5, 64))
        refused += _full_face(jac @ jac.T, 0.0) is None
    assert 0 < refused < 40


# --- the two paths of _iterate: the active set and the step fallback -------------------------------------


@pytest.mark.parametrize("kind,jac", SMALL[:80], ids=[f"{k}-{j.shape}" for k, j in SMALL[:80]])
def test_step_fallback_alone_matches_brute_force(kind, jac, monkeypatch):
    # The Frank-Wolfe/coordinate steps are what runs when the active set cannot certify its answer
    # (degenerate faces); here they run on every case, so both paths are held to the same reference.
    monkeypatch.setattr(fw, "_active_set", lambda *args: None)
    gram, t = jac @ jac.T, jac.shape[0]
    alpha = simplex_min_norm(gram)
    assert_fused_close(jac, alpha, brute_force(jac, range(t)), rtol=EXACT_RTOL, label=kind)
    for main in _main_sets(t):
        w = mixed_min_norm(gram, main)
        assert_fused_close(jac, w, brute_force(jac, main), rtol=EXACT_RTOL, label=f"{kind} main={main}")
        _assert_aux_kkt(jac, w, [j for j in range(t) if j not in main])


@pytest.mark.parametrize("seed", range(40))
def test_active_set_certifies_generic_problems_without_the_fallback(seed):
    # On full-rank G (d ≥ T, no duplicated directions) the active set alone must find the answer; the step
    # fallback is for degenerate faces only.
    t = 2 + seed % 5  # brute force is exponential in T
    jac = make_jacobian(["random", "conflicting", "scaled"][seed % 3], t, t + 5, seed)
    gram = jac @ jac.T
    scale = np.diag(gram).max()
    for main in _main_sets(t):
        blocks = fw._Blocks(
            np.array(sorted(main)), np.array([j for j in range(t) if j not in main], dtype=int)
        )
        w0 = np.zeros(t)
        w0[blocks.main] = 1.0 / blocks.main.size
        w = fw._active_set(gram / scale, w0, blocks, 1e-12, 3 * t + 8)
        assert w is not None, f"{main=}"
        assert_fused_close(jac, w, brute_force(jac, main), rtol=EXACT_RTOL, label=f"main={main}")


@pytest.mark.parametrize(
    "dim,scale,seed",
    [(20, 1e-7, 96), (200, 1e-6, 78), (200, 1e-7, 60), (200, 1e-7, 101), (2000, 1e-7, 18), (2000, 1e-7, 26)],
)
def test_active_set_certifies_a_task_whose_gradient_has_all_but_vanished(dim, scale, seed):
    # One task's gradient 1e-6-1e-7 of the others' (a task that has converged): ‖u*‖² is then 1e-12-1e-14 of
    # max G_ii, so a face weight of −1e-13 is no round-off to clip but an index to drop. Each of these cases
    # sent the active set to the step fallback when such weights were clipped. The float64 brute force is off
    # by 1e-3 of ‖u*‖ here; the reference is exact.
    t = 2 + seed % 7
    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((t, dim)) * 10 ** rng.uniform(-1, 1, (t, 1))
    jac[seed % t] *= scale
    gram = jac @ jac.T
    blocks = fw._Blocks(np.arange(t), np.arange(0))
    w = fw._active_set(gram / np.diag(gram).max(), np.full(t, 1.0 / t), blocks, 1e-12, 3 * t + 8)
    assert w is not None
    exact = exact_min_norm(jac)
    np.testing.assert_allclose(w, exact, rtol=0, atol=1e-15)
    assert np.linalg.norm(jac.T @ (w - exact)) <= 1e-12 * np.linalg.norm(jac.T @ exact)
    np.testing.assert_array_equal(simplex_min_norm(gram), w)


@pytest.mark.parametrize("seed,num_main", [(507, 1), (1280, 1), (2086, 1), (2086, 2)])
def test_active_set_certifies_auxiliaries_when_a_main_task_has_all_but_vanished(seed, num_main):
    # The main tasks' gradient 1e-5-1e-7 of the auxiliaries' (a main task that has fitted its batch): an
    # auxiliary's face weight of −1e-12 is then no round-off; clipped, it would move (Gw)_j off 0 for the
    # auxiliaries coupled to it and fail complementary slackness. The active set must drop it from the face
    # and certify the answer itself, without the step fallback.
    rng = np.random.default_rng(seed)
    t = 3 + seed % 4
    jac = rng.standard_normal((t, 200)) * 10 ** rng.uniform(-0.2, 0.2, (t, 1))
    jac[0] *= 10 ** rng.uniform(-7, -5)
    main = list(range(num_main))
    gram = jac @ jac.T
    start = np.zeros(t)
    start[main] = 1.0 / num_main
    blocks = fw._Blocks(np.array(main), np.arange(num_main, t))
    w = fw._active_set(gram / np.diag(gram).max(), start, blocks, 1e-12, 3 * t + 8)
    assert w is not None
    exact = exact_min_norm(jac, main)
    np.testing.assert_allclose(w, exact, rtol=0, atol=1e-15)
    assert np.linalg.norm(jac.T @ (w - exact)) <= 1e-12 * np.linalg.norm(jac.T @ exact)
    public = main_aux_min_norm(gram, 0) if num_main == 1 else mixed_min_norm(gram, main)
    np.testing.assert_array_equal(public, w)


@pytest.mark.parametrize(
    "ratio,dim,seed",
    [
        (1 + 1e-9, 20, 1),
        (1 + 1e-9, 200, 3),
        (1 - 1e-9, 200, 2),
        (1 - 1e-9, 200, 5),
        (1 + 1e-8, 200, 2),
        (1 + 1e-7, 20, 6),
        # the shorter gradient, brought into the face, goes straight back out on the face solve's round-off
        (1 + 1e-9, 200, 15),
        (1 - 1e-9, 200, 11),
        (1 + 1e-8, 20, 28),
        (1 + 1e-7, 200, 30),
    ],
)
def test_active_set_certifies_two_gradients_collinear_to_within_round_off(ratio, dim, seed):
    # g_b = c g_a with c = 1 ± 1e-9 to 1 + 1e-7 (a task repeated up to its scale): a face holding both has no
    # stationary point in float64, and the longer of the two is not in the answer's support. The active set
    # must leave it out and certify the answer itself (the step fallback's answers are off by up to 2e-7 of
    # ‖u*‖ on such problems).
    t = 3 + seed % 4
    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((t, dim)) * 10 ** rng.uniform(-1, 1, (t, 1))
    jac[-1] = jac[0] * ratio
    gram = jac @ jac.T
    blocks = fw._Blocks(np.arange(t), np.arange(0))
    w = fw._active_set(gram / np.diag(gram).max(), np.full(t, 1.0 / t), blocks, 1e-12, 3 * t + 8)
    assert w is not None
    exact = exact_min_norm(jac)
    assert exact[0] == 0.0 if ratio < 1 else exact[-1] == 0.0
    np.testing.assert_allclose(w, exact, rtol=0, atol=1e-15)
    assert np.linalg.norm(jac.T @ (w - exact)) <= 1e-12 * np.linalg.norm(jac.T @ exact)
    # The public solver may first project G onto the PSD cone (its Cholesky test fails on such G).
    np.testing.assert_allclose(simplex_min_norm(gram), exact, rtol=0, atol=1e-15)


@pytest.mark.parametrize("seed", [7, 8, 9, 17, 22, 29])
def test_active_set_certifies_the_same_gradient_twice_in_a_float32_gram_matrix(seed):
    # The same loss given twice, its G formed in float32 (J Jᵀ on an accelerator): the two rows agree only to
    # float32 round-off, and the matrix is asymmetric at that level too. The active set must certify these
    # itself (the step fallback's answers stop at duality gaps of 1e-10 to 1e-8).
    t = 3 + seed % 5
    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((t, 512)) + rng.uniform(-2, 2, (t, 1)) * rng.standard_normal(512)
    jac32 = torch.from_numpy(jac).float()
    jac32[-1] = jac32[0]
    gram = (jac32 @ jac32.T).double().numpy()
    sym = 0.5 * (gram + gram.T)
    # What the solver works on: G symmetrised, scaled to a unit largest diagonal, projected onto the PSD cone
    # where a Cholesky factorisation fails.
    g = sym / np.diag(sym).max()
    if np.linalg.eigvalsh(g)[0] < 0.0:
        g = psd_projection(g)
    blocks = fw._Blocks(np.arange(t), np.arange(0))
    w = fw._active_set(g, np.full(t, 1.0 / t), blocks, 1e-12, 3 * t + 8)
    assert w is not None
    reference = brute_force_qp(g, list(range(t)), [0.0] * t)
    v = g @ w
    assert w @ v - v.min() <= 1e-15  # the Frank-Wolfe duality gap: optimal up to round-off
    assert w @ v <= reference @ g @ reference + 1e-15


@pytest.mark.parametrize("zeros", [1, 2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_a_main_task_with_a_zero_gradient_gives_u_zero(seed, zeros):
    # u = 0 is the least ‖u‖² there is, and a main task whose gradient is zero attains it (a task with no
    # signal in its batch, e.g. no conversions). With two or more such tasks every face holding them is
    # optimal and none can be certified to round-off; the answer is u = 0 exactly, the weight split evenly.
    t = 5 + seed % 3
    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((t, 300)) + rng.uniform(-2, 2, (t, 1)) * rng.standard_normal(300)
    zero = rng.choice(t, size=zeros, replace=False)
    jac[zero] = 0.0
    gram = jac @ jac.T
    expected = np.zeros(t)
    expected[zero] = 1.0 / zeros
    np.testing.assert_array_equal(simplex_min_norm(gram), expected)
    main = sorted({int(zero[0]), int(np.setdiff1d(np.arange(t), zero)[0])})  # one zero main, one other
    expected_mixed = np.zeros(t)
    expected_mixed[zero[0]] = 1.0
    np.testing.assert_array_equal(mixed_min_norm(gram, main), expected_mixed)
    np.testing.assert_array_equal(main_aux_min_norm(gram, int(zero[0])), expected_mixed)


def test_the_active_set_leaves_for_the_fallback_once_a_face_minimiser_repeats(monkeypatch):
    # Collinear gradients (G of rank 2, T = 4): the face solves cycle on round-off through the same face
    # minimisers. A repeat means the same cycle again, so the active set gives up at once instead of spending
    # its whole budget (3T + 8 = 20 solves) first; the fallback starts from the same point either way.
    jac = make_jacobian("collinear", 4, 20, 205)
    gram = jac @ jac.T
    solves = []
    face_solve = fw._face_solve
    monkeypatch.setattr(fw, "_face_solve", lambda *args: solves.append(1) or face_solve(*args))
    w = simplex_min_norm(gram)
    assert len(solves) < 3 * 4 + 8
    assert_fused_close(jac, w, brute_force(jac, range(4)), rtol=EXACT_RTOL)


def _conflicting_grams(num_tasks: int, count: int) -> list[np.ndarray]:
    """G of g_i = s_i (c_i u + v_i): a shared direction, signed mixing (tasks 0 and 1 conflict), scales over
    two orders of magnitude; full rank."""
    rng = np.random.default_rng(num_tasks)
    grams = []
    for _ in range(count):
        u, v = rng.standard_normal(64), rng.standard_normal((num_tasks, 64))
        c = rng.uniform(-1.0, 1.0, num_tasks)
        c[0], c[1] = 1.0, -0.2 - abs(c[1])
        jac = 10 ** rng.uniform(-1, 1, num_tasks)[:, None] * (c[:, None] * u + v)
        grams.append(jac @ jac.T)
    return grams


@pytest.mark.parametrize("problem,bound", [("pareto", 6.0), ("mixed", 4.5)])
def test_the_start_shortcut_and_entering_several_indices_cut_the_face_solves(problem, bound, monkeypatch):
    # One index in or out per solve takes 8.8 (PE-LTR's shifted problem) and 5.4 (mixed, two mains) solves
    # on average on these T = 10 problems, the shortcuts 4.7 and 3.9; the supports hold 2-8 indices.
    solves = 0
    face_solve = fw._face_solve

    def counted(*args):
        nonlocal solves
        solves += 1
        return face_solve(*args)

    monkeypatch.setattr(fw, "_face_solve", counted)
    grams = _conflicting_grams(10, 32)
    for gram in grams:
        if problem == "pareto":
            pareto_min_norm(gram, [0.05] * 10)
        else:
            mixed_min_norm(gram, [0, 1])
    assert solves / len(grams) <= bound
