"""Closed forms for two gradients, checked in d-space against optimality conditions and a dense grid."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from solver_cases import assert_fused_close, hypothesis_settings, kkt_tol, make_jacobian

from gradsurgery.solvers import (
    closed_form,
    main_aux_one,
    main_aux_one_weights,
    min_norm_two,
    min_norm_two_weights,
)

KINDS_2 = ["random", "conflicting", "collinear", "duplicated", "zero_rows", "all_zero", "scaled", "opposite"]


def _grid_best(g1, g2, lo=0.0, hi=1.0, n=4001):
    """Brute force over a dense grid of the segment; the exact minimiser is within (hi − lo)/n of it."""
    a = np.linspace(lo, hi, n)
    vals = np.sum((a[:, None] * g1 + (1 - a[:, None]) * g2) ** 2, axis=1)
    return a[np.argmin(vals)], vals.min()


two_tasks = st.builds(
    make_jacobian, st.sampled_from(KINDS_2), st.just(2), st.integers(1, 6), st.integers(0, 2**32 - 1)
)


@hypothesis_settings(120)
@given(two_tasks)
def test_min_norm_two_is_optimal_on_the_segment(jac):
    g1, g2 = jac
    a = min_norm_two(g1 @ g1, g1 @ g2, g2 @ g2)
    assert 0.0 <= a <= 1.0
    u = a * g1 + (1 - a) * g2
    # Optimality of the 1-D problem: derivative ⟨u, g1 − g2⟩ is 0 inside, ≤ 0 at α = 1, ≥ 0 at α = 0.
    slope = u @ (g1 - g2)
    tol = kkt_tol(jac)
    if 0.0 < a < 1.0:
        assert abs(slope) <= tol
    elif a == 1.0:
        assert slope <= tol
    else:
        assert slope >= -tol
    _, best = _grid_best(g1, g2)
    assert u @ u <= best + tol


@hypothesis_settings(120)
@given(two_tasks)
def test_main_aux_one_satisfies_kkt(jac):
    g0, g1 = jac
    lam = main_aux_one(g0 @ g0, g0 @ g1, g1 @ g1)
    u = g0 + lam * g1
    tol = kkt_tol(jac)
    assert lam >= 0.0
    assert u @ g1 >= -tol  # the auxiliary loss does not increase to first order
    assert abs(lam * (u @ g1)) <= tol * max(1.0, lam)  # λ > 0 only when the constraint is active
    grid = np.linspace(0.0, max(4.0 * lam, 1.0), 4001)
    best = np.min(np.sum((g0[None, :] + grid[:, None] * g1[None, :]) ** 2, axis=1))
    assert u @ u <= best + tol


def test_min_norm_two_known_values():
    # Orthogonal unit vectors: the midpoint. Opposite vectors of norms 1 and 3: u = 0 at α = 3/4.
    assert min_norm_two(1.0, 0.0, 1.0) == pytest.approx(0.5)
    assert min_norm_two(1.0, -3.0, 9.0) == pytest.approx(0.75)
    # g2 = 2 g1: the shorter vector alone.
    assert min_norm_two(1.0, 2.0, 4.0) == 1.0
    assert min_norm_two(4.0, 2.0, 1.0) == 0.0


@pytest.mark.parametrize(
    "g11,g12,g22", [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (1e-300, 1e-300, 1e-300), (1e300, 1e300, 1e300)]
)
def test_min_norm_two_identical_vectors_gives_half(g11, g12, g22):
    assert min_norm_two(g11, g12, g22) == 0.5


def test_min_norm_two_near_identical_is_finite_and_in_range():
    g = np.array([1.0, 2.0, 3.0])
    h = g + 1e-12 * np.array([1.0, -1.0, 0.5])
    a = min_norm_two(g @ g, g @ h, h @ h)
    assert np.isfinite(a) and 0.0 <= a <= 1.0


def test_main_aux_one_known_values():
    assert main_aux_one(1.0, -2.0, 4.0) == pytest.approx(0.5)
    assert main_aux_one(1.0, 0.5, 4.0) == 0.0  # no conflict: nothing added
    assert main_aux_one(1.0, -1.0, 0.0) == 0.0  # g1 = 0 (g01 would be 0 for a true Gram matrix)
    assert main_aux_one(0.0, 0.0, 0.0) == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_scalar_closed_forms_reject_non_finite(bad):
    with pytest.raises(ValueError, match="nan|inf"):
        min_norm_two(1.0, bad, 1.0)
    with pytest.raises(ValueError, match="nan|inf"):
        main_aux_one(bad, 0.0, 1.0)


@hypothesis_settings(100)
@given(two_tasks)
def test_weight_helpers_match_scalar_forms(jac):
    gram = jac @ jac.T
    w = min_norm_two_weights(gram)
    assert w.shape == (2,) and w.dtype == np.float64
    assert w.sum() == pytest.approx(1.0) and np.all(w >= 0)
    a, _ = _grid_best(jac[0], jac[1])
    assert_fused_close(jac, w, [a, 1 - a], rtol=1e-3, label="grid")  # grid resolution 2.5e-4
    for main in (0, 1):
        w = main_aux_one_weights(gram, main)
        other = 1 - main
        assert w[main] == 1.0
        u = jac.T @ w
        assert u @ jac[other] >= -kkt_tol(jac)
        assert w[other] >= 0.0


def test_main_aux_one_weights_example():
    # g0 = (1, 0), g1 = (−1, 1): ⟨g0, g1⟩ = −1, ‖g1‖² = 2 → λ = 1/2, u = (1/2, 1/2), ⟨u, g1⟩ = 0.
    jac = np.array([[1.0, 0.0], [-1.0, 1.0]])
    w = main_aux_one_weights(jac @ jac.T, 0)
    np.testing.assert_allclose(w, [1.0, 0.5], rtol=0, atol=1e-15)
    # Main g1, auxiliary g0: ⟨g1, g0⟩ = −1, ‖g0‖² = 1 → λ = 1, u = (0, 1).
    w = main_aux_one_weights(jac @ jac.T, 1)
    np.testing.assert_allclose(w, [1.0, 1.0], rtol=0, atol=1e-15)


def test_two_task_helpers_reject_bad_input():
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        min_norm_two_weights(np.eye(3))
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        main_aux_one_weights(np.eye(3), 0)
    with pytest.raises(ValueError, match="main=2"):
        main_aux_one_weights(np.eye(2), 2)
    with pytest.raises(ValueError, match="nan"):
        min_norm_two_weights(np.array([[1.0, np.nan], [np.nan, 1.0]]))


def test_closed_form_hand_computed_conflict():
    # g1 = (1, 0, 0), g2 = (−1/2, 1, 0): g11 = 1, g12 = −1/2, g22 = 5/4
    # → α = (5/4 + 1/2) / (1 + 1 + 5/4) = 7/13.
    jac = np.array([[1.0, 0.0, 0.0], [-0.5, 1.0, 0.0]])
    w = min_norm_two_weights(jac @ jac.T)
    np.testing.assert_allclose(w, [7 / 13, 6 / 13], rtol=0, atol=1e-15)


# --- check_gram: small matrices read in Python floats -------------------------------------------------


def _numpy_check_gram(gram, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(closed_form, "SMALL_GRAM_MAX_TASKS", 0)
        return closed_form.check_gram(gram)


def _small_grams():
    rng = np.random.default_rng(11)
    grams = []
    for t in range(1, closed_form.SMALL_GRAM_MAX_TASKS + 1):
        jac = rng.standard_normal((t, 30)) * 10.0 ** rng.uniform(-8, 8)
        gram = jac @ jac.T
        noisy = gram * (1.0 + 1e-7 * rng.standard_normal((t, t)))  # asymmetric within SYMMETRY_RTOL
        grams += [gram, noisy, noisy.astype(np.float32), noisy.T.copy(order="F")]
    # a diagonal entry slightly negative, within the tolerance (a zero gradient's G in float32)
    grams.append(np.array([[1.0, 0.0], [0.0, -1e-7]]))
    return grams


def test_small_grams_are_read_bit_for_bit_as_numpy_reads_them(monkeypatch):
    for gram in _small_grams():
        assert closed_form.symmetric_rows(gram) is not None
        fast = closed_form.check_gram(gram)
        expected = _numpy_check_gram(gram, monkeypatch)
        assert fast.dtype == expected.dtype == np.float64 and fast.shape == expected.shape
        np.testing.assert_array_equal(fast, expected)
        assert fast is not gram and fast.flags.writeable


@pytest.mark.parametrize(
    "gram,match",
    [
        (
            np.array([[1.0, np.nan, 0.0], [np.nan, 1.0, 0.0], [0.0, 0.0, 1.0]]),
            r"non-finite entry .*nan.* at \(0, 1\)",
        ),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), r"non-finite entry .*inf.* at \(0, 1\)"),
        (np.array([[1.0, 0.5], [0.4, 1.0]]), "G is not symmetric"),
        (np.array([[1.0, 0.0], [0.0, -0.5]]), r"G\[1, 1\] = .* is negative"),
    ],
)
def test_small_grams_that_fail_get_numpys_errors(gram, match):
    assert closed_form.symmetric_rows(gram) is None
    with pytest.raises(ValueError, match=match):
        closed_form.check_gram(gram)


def test_other_inputs_take_the_numpy_path():
    nine = np.eye(closed_form.SMALL_GRAM_MAX_TASKS + 1)
    for other in (nine, np.eye(3, dtype=np.int64), np.ones((2, 3)), np.zeros((0, 0)), np.ones(3)):
        assert closed_form.symmetric_rows(other) is None
    np.testing.assert_array_equal(closed_form.check_gram(nine), nine)
    np.testing.assert_array_equal(closed_form.check_gram(np.eye(3, dtype=np.int64)), np.eye(3))
    np.testing.assert_array_equal(closed_form.check_gram([[2.0, 1.0], [1.0, 2.0]]), [[2.0, 1.0], [1.0, 2.0]])
