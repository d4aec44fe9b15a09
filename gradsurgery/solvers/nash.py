"""Exact Nash bargaining weights on the T×T Gram matrix (Nash-MTL; Navon, Shamsian, Achituve, Maron,
Kawaguchi, Chechik & Fetaya, "Multi-Task Learning as a Bargaining Game", ICML 2022). numpy float64 in and out.

The weights α > 0 solve

    G α = 1 / α      elementwise: α_i (G α)_i = 1 for every task i,

so the fused step u = Jᵀα has ⟨u, g_i⟩ = 1/α_i and ‖u‖² = αᵀGα = T. They are the unique minimiser of the
strictly convex, self-concordant potential

    f(α) = ½ αᵀGα − Σ_i log α_i,      ∇f = Gα − 1/α,      ∇²f = G + diag(1/α²)

on α > 0, which is bounded below (so that a solution exists) iff no non-zero α ≥ 0 has Jᵀα = 0: no gradient
is zero and zero is not in the convex hull of the gradients (the point is not Pareto-stationary).

Algorithm.

1. Scale-free form. With D = diag(1/√G_ii) and C = D G D (the correlation matrix of the gradients, unit
   diagonal), α = D β where β solves C β = 1/β. A task whose gradient is 1e-8 times smaller than the others
   therefore costs nothing in accuracy: only angles enter C.
2. Damped Newton on f(β) = ½βᵀCβ − Σ log β_i. Written in the relative step β ← β ∘ (1 + t z), the Newton
   system is (I + B C B) z = 1 − β ∘ Cβ with B = diag(β): the right-hand side is the residual itself and the
   matrix has every eigenvalue ≥ 1, so one Cholesky factorisation succeeds for PSD C (a C indefinite
   beyond that, from a float32 G, is replaced once by its PSD projection when it fails). The Newton
   decrement is λ² = zᵀ(I + BCB)z and max_i |z_i| ≤ λ. For λ ≤ 1/4 the full step is taken (f is
   self-concordant, so it is then inside the region of quadratic convergence and keeps β > 0); otherwise a
   backtracking (Armijo) line search on the exactly expanded decrease
   f(β∘(1+tz)) − f(β) = t sᵀz + ½t² zᵀBCBz − Σ log(1 + t z_i), s = β∘Cβ, starting from the largest step
   that keeps every β_i above 1% of its value.
3. Stop when the residual max_i |β_i (Cβ)_i − 1| is at most ``tol``; once it is below the float64
   rounding bound of computing it (4 T eps max_i β_i (|C| β)_i), stop as soon as a step no longer halves it
   (the bound is pessimistic; near the answer one more quadratic step is cheap).
4. No solution. Any β > 0 certifies ρ² ≤ βᵀCβ / (Σβ)², where ρ is the distance from zero to the convex hull
   of the unit gradients g_i/‖g_i‖ (w = β/Σβ is a point of the simplex), and when min_i (Cβ)_i > 0 also
   ρ ≥ min_i (Cβ)_i / √(βᵀCβ) (Cauchy-Schwarz against u = Σ β_i g_i/‖g_i‖). When no solution exists f is
   unbounded below along a ray, Newton's full steps double β along it and the first bound falls below
   ``stationary_tol`` within a few dozen iterations; it is only checked while λ ≥ 1, since λ < 1 at any
   point proves that a minimiser exists (Nesterov 2004, Thm 4.1.11). At a solution the two bounds are
   within a factor T² of each other; only when ``stationary_tol`` lies between them is ρ² computed
   exactly (MGDA, ``simplex_min_norm`` on C). ρ² ≤ ``stationary_tol`` raises ``NashNoSolutionError``: at
   that distance the weights grow like 1/ρ and the rounding error of G itself decides whether a solution
   exists.

Start: β_i = 1/√(C1)_i (half a fixed-point step from β = 1; β = 1 where some (C1)_i ≤ 0), or the warm start
D⁻¹·``start`` when its potential is lower, rescaled by the exact minimiser of f along the ray,
τ = √(T / βᵀCβ), so that the scale, which dominates a cold start's distance to the answer, is right at once.

Cost: O(T³/3) per Newton iteration (one Cholesky factorisation of a T×T matrix): on random problems 3–5
iterations cold (at most 8) and 2–3 from the previous step's weights; up to ~20 where zero is within 1e-8
of the hull. Nothing d-sized is touched.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from .._validation import check_int, check_number
from ..errors import SolverError
from ._lapack import lapack
from .closed_form import EPS, check_gram, psd_projection
from .frank_wolfe import simplex_min_norm

# Newton's full step is taken below this decrement: for a self-concordant f, λ < (3 − √5)/2 ≈ 0.38 is the
# region of quadratic convergence, and λ < 1 guarantees 1 + z > 0.
_FULL_STEP = 0.25
# Armijo's sufficient-decrease fraction of the predicted decrease −tλ², and the backtracking factor.
_ARMIJO = 0.25
_BACKTRACK = 0.5
# Never shrink any β_i by more than this fraction in one step: keeps the iterate off the boundary where
# log β_i blows up (the Armijo search then picks the length).
_BOUNDARY = 0.99
# The rounding bound of the residual (one extra T×T product) is only worth computing once the residual is
# this small; it exceeds this only when zero is within ~1e-10 of the hull, which raises anyway.
_FLOOR_CHECK = 1e-3


class NashNoSolutionError(SolverError):
    """The bargaining problem has no solution: a task's gradient is zero, or zero is (within
    ``stationary_tol``) in the convex hull of the gradients, i.e. the point is Pareto-stationary and no
    direction improves every task.

    Attributes: ``reason`` (a sentence), ``weights`` (a point w of the simplex certifying it: the unit
    gradients combined with weights w have squared norm ``min_norm`` ≤ stationary_tol; for a zero gradient
    w is that task's indicator) and ``min_norm`` (that squared norm, relative to unit gradients).
    """

    def __init__(self, reason: str, weights: np.ndarray, min_norm: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.weights = weights
        self.min_norm = min_norm


class NashSolution(NamedTuple):
    alpha: np.ndarray  # the weights α > 0 on the raw gradients: α_i (Gα)_i = 1
    residual: float  # max_i |α_i (Gα)_i − 1|, computed on the G given
    iterations: int  # Newton iterations used


def nash_residual(gram: ArrayLike, alpha: ArrayLike) -> float:
    """max_i |α_i (Gα)_i − 1|: zero exactly at the Nash bargaining weights of G."""
    g = np.asarray(gram, dtype=np.float64)
    a = np.asarray(alpha, dtype=np.float64)
    return float(np.abs(a * (g @ a) - 1.0).max())


def nash_bargaining_weights(
    gram: ArrayLike,
    start: ArrayLike | None = None,
    *,
    tol: float = 1e-12,
    max_iter: int = 100,
    stationary_tol: float = 1e-10,
) -> NashSolution:
    """The Nash bargaining weights α > 0 with α_i (Gα)_i = 1 for every task (module docstring).

    ``start``: a warm start on the raw scale (e.g. the previous step's α; every entry > 0). ``tol``: the
    target residual max_i |β_i (Cβ)_i − 1| on the correlation matrix (the float64 rounding error of the
    residual is accepted when larger). ``stationary_tol``: zero within this squared distance of the convex
    hull of the unit gradients counts as Pareto-stationary.

    Raises ``NashNoSolutionError`` when no solution exists (a zero gradient, including G = 0; zero in the
    convex hull), ``SolverError`` when ``max_iter`` Newton iterations do not reach the tolerance (never
    seen with the default: at most ~20 on the test problems), ValueError or TypeError on bad input.
    """
    g = check_gram(gram)
    t = g.shape[0]
    tol = check_number(tol, "tol", minimum=0.0)
    stationary_tol = check_number(stationary_tol, "stationary_tol", minimum=0.0)
    max_iter = check_int(max_iter, "max_iter", minimum=1)
    diag = g.diagonal().copy()
    zero = np.flatnonzero(diag <= 0.0)
    if zero.size:
        w = np.zeros(t)
        w[zero[0]] = 1.0
        raise NashNoSolutionError(
            f"task {zero[0]} has a zero gradient (G[{zero[0]}, {zero[0]}] = {diag[zero[0]]!r}): no direction "
            "improves it, so the bargaining problem has no solution",
            w,
            0.0,
        )
    root = np.sqrt(diag)
    inv = 1.0 / root
    corr = g * np.outer(inv, inv)
    # Round-off can push a correlation just past ±1; the exact values are cosines.
    np.clip(corr, -1.0, 1.0, out=corr)
    np.fill_diagonal(corr, 1.0)
    # β_i (Cβ)_i = 1 at the answer; half a fixed-point step from β = 1 (the geometric mean of 1 and
    # 1/(C1)_i) saves about one Newton iteration in six on random problems. It needs C1 > 0.
    c1 = corr.sum(axis=1)
    starts = [1.0 / np.sqrt(c1) if float(c1.min()) > 0.0 else np.ones(t)]
    if start is not None:
        starts.append(_check_start(start, t) * root)
    beta, iterations = _newton(corr, starts, tol, max_iter, stationary_tol)
    alpha = beta * inv
    return NashSolution(alpha, nash_residual(g, alpha), iterations)


def _check_start(start: ArrayLike, t: int) -> np.ndarray:
    try:
        s = np.array(start, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"start must be {t} positive numbers, got {start!r}") from exc
    if s.shape != (t,):
        raise ValueError(f"start must have shape ({t},), got {s.shape}")
    if not (np.all(np.isfinite(s)) and np.all(s > 0.0)):
        raise ValueError(f"start must be finite and > 0 (weights of the bargaining solution), got {s!r}")
    return s


def _no_solution(w: np.ndarray, rho2: float, stationary_tol: float) -> NashNoSolutionError:
    return NashNoSolutionError(
        "zero is in the convex hull of the gradients (a Pareto-stationary point: the unit gradients combine "
        f"to a vector of squared norm {rho2:.3g} ≤ stationary_tol = {stationary_tol:g}), so no direction "
        "improves every task and the bargaining problem has no solution",
        w,
        rho2,
    )


def _start(
    corr: np.ndarray, starts: list[np.ndarray], stationary_tol: float
) -> tuple[np.ndarray, np.ndarray]:
    """The start with the lowest potential, each rescaled to the exact minimiser of f along its ray:
    f(τβ) = ½τ²βᵀCβ − T log τ − Σ log β_i is least at τ² = T/βᵀCβ, where it is T/2 + (T/2) log(βᵀCβ/T)
    − Σ log β_i. A warm start is thus used only when it is better than the cold one (for T = 2 the cold one
    is exact: β_1 = β_2 by symmetry)."""
    t = corr.shape[0]
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for beta in starts:
        cb = corr @ beta
        quad = float(beta @ cb)
        total = float(beta.sum())
        if not quad > stationary_tol * total * total:
            # The start itself certifies (nearly) zero in the hull: e.g. Σ g_i/‖g_i‖ = 0.
            raise _no_solution(beta / total, max(quad, 0.0) / (total * total), stationary_tol)
        potential = 0.5 * t * np.log(quad / t) - float(np.log(beta).sum())
        if best is None or potential < best[0]:
            tau = np.sqrt(t / quad)
            best = (potential, beta * tau, cb * tau)
    if best is None:
        raise ValueError("nash: no start point given")
    return best[1], best[2]


def _newton(
    corr: np.ndarray, starts: list[np.ndarray], tol: float, max_iter: int, stationary_tol: float
) -> tuple[np.ndarray, int]:
    t = corr.shape[0]
    eye = np.eye(t)
    beta, cb = _start(corr, starts, stationary_tol)
    abs_corr = None
    projected = False
    iterations = 0
    # best is read only once previous is finite, i.e. after an iteration has set it.
    previous, best = np.inf, (beta, cb)
    while True:
        s = beta * cb
        res_vec = 1.0 - s
        res = float(np.abs(res_vec).max())
        if res <= tol:
            break
        if res <= _FLOOR_CHECK:
            # Below the worst-case rounding bound of the residual, go on only while Newton still halves it:
            # the bound is pessimistic (√T rather than T in practice), and near the answer a step is cheap.
            if abs_corr is None:
                abs_corr = np.abs(corr)
            floor = 4.0 * t * EPS * float((beta * (abs_corr @ beta)).max())
            if res <= floor and res > 0.5 * previous:
                if res > previous:
                    beta, cb = best
                break
        previous, best = res, (beta, cb)
        if iterations >= max_iter:
            _raise_unconverged(corr, res, iterations, stationary_tol)
        iterations += 1
        bcb = corr * beta[:, None] * beta
        _, z, info = lapack("posv")(bcb + eye, res_vec, lower=1)
        if info != 0:
            # I + BCB is singular only if C has negative curvature beyond round-off (G from float32 can be
            # indefinite at the 1e-7 level): remove it once and go on with the projected matrix.
            if projected:
                raise SolverError(f"nash: the Newton system is not positive definite (potrf info={info})")
            corr, abs_corr, projected = psd_projection(corr), None, True
            cb = corr @ beta
            continue
        lam2 = float(z @ res_vec)
        if lam2 <= _FULL_STEP * _FULL_STEP:
            step = 1.0
        else:
            if lam2 >= 1.0:
                # λ < 1 anywhere certifies that a minimiser exists (Nesterov 2004, Thm 4.1.11); while it has
                # not happened, check whether the iterate has run off towards a point of the hull near zero.
                total = float(beta.sum())
                upper = float(s.sum()) / (total * total)
                if upper <= stationary_tol:
                    raise _no_solution(beta / total, upper, stationary_tol)
            step = _line_search(z, s, bcb, lam2)
        beta = beta * (1.0 + step * z)
        cb = corr @ beta
    if t > 1:
        _check_stationary(corr, beta, cb, stationary_tol)
    return beta, iterations


def _line_search(z: np.ndarray, s: np.ndarray, bcb: np.ndarray, lam2: float) -> float:
    low = float(z.min())
    step = 1.0 if low >= -_BOUNDARY else _BOUNDARY / -low
    sz = float(s @ z)
    zbz = float(z @ bcb @ z)
    for _ in range(60):
        decrease = step * sz + 0.5 * step * step * zbz - float(np.log1p(step * z).sum())
        if decrease <= -_ARMIJO * step * lam2:
            return step
        step *= _BACKTRACK
    # Self-concordance guarantees the Armijo condition at t = 1/(1 + λ); if round-off still defeats the
    # test, that step is safe (β stays positive and f does not increase beyond round-off).
    safe: float = 1.0 / (1.0 + np.sqrt(lam2))
    return safe


def _check_stationary(corr: np.ndarray, beta: np.ndarray, cb: np.ndarray, stationary_tol: float) -> None:
    """At the solution, decide whether zero is within ``stationary_tol`` of the hull (module docstring)."""
    s = beta * cb
    total = float(beta.sum())
    upper = float(s.sum()) / (total * total)  # ρ² ≤ βᵀCβ/(Σβ)²: the hull point β/Σβ
    if upper <= stationary_tol:
        raise _no_solution(beta / total, upper, stationary_tol)
    low = float(cb.min())
    lower = low * low / float(s.sum()) if low > 0.0 else 0.0
    if lower > stationary_tol:
        return
    w = simplex_min_norm(corr)
    rho2 = max(float(w @ corr @ w), 0.0)
    if rho2 <= stationary_tol:
        raise _no_solution(w, rho2, stationary_tol)


def _raise_unconverged(corr: np.ndarray, res: float, iterations: int, stationary_tol: float) -> None:
    w = simplex_min_norm(corr)
    rho2 = max(float(w @ corr @ w), 0.0)
    if rho2 <= stationary_tol:
        raise _no_solution(w, rho2, stationary_tol)
    raise SolverError(
        f"nash: Newton's method did not reach the tolerance in {iterations} iterations (residual {res:.3g}; "
        f"zero is at squared distance {rho2:.3g} from the hull of the unit gradients)"
    )
