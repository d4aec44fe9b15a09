"""Iterative min-norm solvers on the Gram matrix G = J Jᵀ (numpy float64 in and out).

Every problem here is one quadratic program over weights w, with u = Jᵀw the fused gradient:

    min_w  ‖u‖² = wᵀ G w   s.t.  Σ_{i∈M} w_i = 1,  w_i ≥ 0 for all i,

where M is the set of *main* tasks (their weights live on the simplex) and the other tasks are
*auxiliaries* (free coefficients λ_j ≥ 0). M = all tasks is MGDA (Sener & Koltun 2018); |M| = 1 is
main/auxiliary (``docs/maths.md``); anything in between is the mixed problem.

The answer is found by a *primal active-set* method (Wolfe's 1976 min-norm-point algorithm, which for a
single main task is Lawson & Hanson's NNLS, both written on G). It keeps a face F (the indices allowed to
be non-zero) and a feasible point w on it:

- minor cycle: y = the exact minimiser of wᵀGw over the affine hull of F, i.e. the KKT system G_FF y_F = ν
  e_S, Σ_{i∈S} y_i = 1 (S = the mains in F). When G_FF is positive definite this is y_F = x / (e_Sᵀx) with
  G_FF x = e_S (one Cholesky solve); otherwise the bordered system is solved by lstsq. If y ≥ 0 then w = y;
  else w walks towards y until the first weight reaches 0 (ratio test), that index leaves F, and the cycle
  repeats on the smaller face. Weights of y above −``_NEG_CLIP`` (times its largest weight where that exceeds
  1) count as round-off and are set to 0; if the point so clipped fails the check below (or complementary
  slackness on an auxiliary) on its own face, they were not (‖u‖² may be 1e-12 of max G_ii), and they leave F
  too. If nothing was clipped and an index of F fails the check below, two gradients of F are collinear to
  within round-off and the face has no stationary point in float64; the index of largest residual (Gw)_i − ν
  leaves F; and a main index that leaves the face right after joining it, collinear with a main of F, takes
  that main's place;
- major cycle: at a face minimiser the KKT conditions of the whole problem are checked (mains:
  (Gw)_i ≥ ν; auxiliaries: (Gw)_j ≥ 0); if some index outside F violates them, the one whose move lowers
  ‖u‖ fastest, |violation| / ‖direction‖, joins F.

Each face minimiser is strictly better than the last, so no face repeats and the method stops after
finitely many O(|F|³) solves, in practice about one per index of the answer's support. The start is the
uniform main weights with every auxiliary that violates ⟨u, g_j⟩ ≥ 0 there already in F, so that on
nearly orthogonal gradients the first solve is usually the answer. Two shortcuts cut the solves without
changing the answer (the last face's solve gives it): when the first y is infeasible, the start (no face's
minimiser, so no progress is lost) is left for y with its negative weights set to 0, instead of one walk
and one solve per index that leaves; and major cycles bring every violating index in at once until such a
face turns out infeasible, after which Wolfe's one-at-a-time rule, and its guarantee, hold. Measured on the
speed suite's random Gram matrices: the same weights to the bit, 3.4 instead of 6.3 solves for PE-LTR's
problem at T = 8 and 3.5 instead of 5.8 for the mixed problem (two mains) at T = 10.

The answer is returned only once the optimality conditions hold to ``tol``·‖u‖² plus a bound on the float64
rounding error of Gw (with ``tol`` relative to ‖u‖² alone, u* = 0 could never be certified). If they
cannot be certified (a face too ill-conditioned for its solve to be trusted, more solves than T allows for,
or a face minimiser reached a second time in the same mode, which starts the same round-off cycle again), the
steps below take over from the start:

- on the main block, Frank-Wolfe with away steps (Lacoste-Julien & Jaggi 2015) and exact line search,
  which is the two-vector closed form of ``min_norm_two`` along the step direction;
- on the auxiliaries, an exact coordinate re-fit λ_j ← max(0, −⟨u − λ_j g_j, g_j⟩) / ‖g_j‖²
  (``main_aux_one``), always on the coordinate whose re-fit lowers ‖u‖² the most;
- a *polish* minimises exactly on the face of the current support, as in the minor cycle above, whenever
  a step brings a new index into the support and every ``_CHECK_EVERY`` steps; a polished point is kept
  only if it is feasible and no worse than the point it replaces. The steps stop when the optimality
  conditions hold, when the objective stops decreasing, or after ``max_iter`` steps.

All work is O(T³) at most per solve on G; no d-sized data is touched. G is checked for positive
definiteness by one Cholesky factorisation, and only when that fails is it replaced by its eigenvalue
projection (``psd_projection``); a main task whose row of the projection is zero (a zero gradient) then
gives u = 0 at once (weights 1/k on the k such tasks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from ..errors import SolverError
from ._lapack import lapack
from .closed_form import (
    EPS,
    TINY,
    check_gram,
    check_main_indices,
    check_min_weights,
    check_task_index,
    main_aux_one,
    psd_projection,
    symmetric_rows,
)

# Besides after every step that brings a new index into the support, the polish is tried (and progress
# checked) every this many steps: often enough to finish soon after the support settles, rarely enough
# that its small lstsq does not dominate the cost of the steps.
_CHECK_EVERY = 16
# Weights at or below this (G normalised to max diag 1, mains summing to 1) are treated as zero when
# guessing the support for the polish.
_SUPPORT_EPS = 1e-12
# A face-minimiser weight this negative (relative to the largest weight) is round-off and clipped to 0;
# anything more negative means the face is wrong and the polish steps towards it and shrinks the face.
_NEG_CLIP = 1e-10
# A face is solved by Cholesky only when every pivot keeps this fraction of its diagonal entry (the squared
# sine of the angle between g_i and the earlier gradients of the face): the scaled condition number is then
# at most about T/1e-10, and the fused vector is accurate to ~eps·√(1e10) ≈ 1e-11 of max‖g_i‖. Flatter faces
# (near-duplicates, u* ≈ 0) go to lstsq.
_PIVOT_MIN = 1e-10
# Face solves the active set may spend: about one per index joining and one per index leaving, with room
# for degenerate ties; past that the Frank-Wolfe/coordinate steps take over.
_SOLVES_PER_TASK = 3
_SOLVES_EXTRA = 8
_GELSY_WORK: dict[int, int] = {}  # optimal gelsy workspace by matrix size


class _Blocks(NamedTuple):
    main: np.ndarray  # indices whose weights sum to one
    aux: np.ndarray  # indices with free non-negative coefficients


def simplex_min_norm(gram: ArrayLike, *, tol: float = 1e-12, max_iter: int = 2000) -> np.ndarray:
    """MGDA weights (Sener & Koltun 2018): α ∈ Δ minimising ‖Σ α_i g_i‖² = αᵀGα.

    Wolfe's min-norm-point active set on G (Frank-Wolfe with away steps where a face is degenerate; module
    docstring), returned once the duality gap αᵀGα − min_i (Gα)_i is at most ``tol``·αᵀGα plus the float64
    rounding error of Gα. At the optimum every task has ⟨u, g_i⟩ = (Gα)_i ≥ ‖u‖². For 3 to
    ``FULL_FACE_MAX_TASKS`` tasks the active set's first face, every task, is tried first in Python floats
    (``_full_face``).
    """
    _check_options(tol, max_iter)
    # read once: what check_gram would return, or None where its NumPy path must decide
    sym = symmetric_rows(gram) if isinstance(gram, np.ndarray) else None
    if sym is not None and max_iter >= 1:
        found = _full_face(sym, tol)
        if found is not None:
            return found
    g = check_gram(gram) if sym is None else np.array(sym)
    t = g.shape[0]
    return _solve(g, _Blocks(np.arange(t), np.arange(0)), tol, max_iter, "simplex_min_norm")


#: The largest T for which ``simplex_min_norm`` tries the full face in Python floats. Its O(T³) loops in the
#: interpreter, timed alone in a loop: 30, 40, 68 and 102 µs at T = 3, 4, 6 and 8, against 85-87 µs for the
#: general path; within a training step, where the general path's NumPy and LAPACK calls run with cold
#: caches, ``mgda`` steps at T = 6 and 8 still took 0.00-0.07× of a plain step less (representation mode on
#: the speed suite's ``small``, ``benchmarks/representation_overhead.py --numpy-twins``, six medians).
FULL_FACE_MAX_TASKS = 8


def _full_face(sym: list[list[float]], tol: float) -> np.ndarray | None:
    """MGDA's answer on G's checked rows ``sym`` (``symmetric_rows``) when its support is every task, or None:
    the active set's first face solve and its certificate (``_active_set``; ``_face_solve``'s pivot test,
    every weight positive, the Frank-Wolfe gap within tol·‖u‖² plus the rounding bound of Gw) in Python
    floats instead of NumPy and LAPACK calls.

    Within a training step those calls cost several times what they cost alone in a loop, because the
    model's kernels evict their code and data from the caches between two steps: the solve stage of
    ``mgda`` at T = 4 in representation mode on the speed suite's ``small`` took 264-301 µs a step through
    them (two runs) and 174 µs with this (``benchmarks/representation_stages.py``; the conversions of G and
    w included). The answer is the general path's to rounding (the same conditions, the factorisation and the
    sums in another order). None, and the general path runs, for T outside 3..``FULL_FACE_MAX_TASKS``, an
    indefinite G, a face whose Cholesky pivot falls below ``_PIVOT_MIN`` of its diagonal entry, a weight ≤ 0
    or a failed certificate.
    """
    t = len(sym)
    if not 3 <= t <= FULL_FACE_MAX_TASKS:
        return None
    # _solve's normalisation G / max G_ii
    scale = max(sym[i][i] for i in range(t))
    if scale <= 0.0:
        return None
    g = [[value / scale for value in row] for row in sym]
    # Cholesky G = L Lᵀ, trusted as _face_solve trusts LAPACK's: every pivot at least _PIVOT_MIN·G_ii
    low = [[0.0] * t for _ in range(t)]
    for j in range(t):
        pivot = g[j][j] - sum(low[j][k] * low[j][k] for k in range(j))
        if not pivot >= _PIVOT_MIN * g[j][j] or pivot <= 0.0:
            return None
        low[j][j] = root = math.sqrt(pivot)
        for i in range(j + 1, t):
            low[i][j] = (g[i][j] - sum(low[i][k] * low[j][k] for k in range(j))) / root
    # G x = 1 and w = x / Σx: the minimiser over the affine hull of the simplex
    y = [0.0] * t
    for i in range(t):
        y[i] = (1.0 - sum(low[i][k] * y[k] for k in range(i))) / low[i][i]
    x = [0.0] * t
    for i in reversed(range(t)):
        x[i] = (y[i] - sum(low[k][i] * x[k] for k in range(i + 1, t))) / low[i][i]
    total = sum(x)
    if not (total > 0.0 and math.isfinite(total)):
        return None
    w = [value / total for value in x]
    if min(w) <= 0.0:
        return None
    # the certificate of _active_set: (Gw)_i ≥ ν − (tol·ν + max_i noise_i) for every i, ν = wᵀGw
    v = [sum(g[i][k] * w[k] for k in range(t)) for i in range(t)]
    nu = sum(w[i] * v[i] for i in range(t))
    round_off = 4.0 * t * EPS
    noise = max(round_off * sum(abs(g[i][k]) * w[k] for k in range(t)) + TINY for i in range(t))
    if min(v) - nu + (tol * max(nu, 0.0) + noise) < 0.0:
        return None
    total = sum(w)
    if abs(total - 1.0) > 1e-9:
        return None
    return np.array([value / total for value in w])


def pareto_min_norm(
    gram: ArrayLike, min_weights: ArrayLike, *, tol: float = 1e-12, max_iter: int = 2000
) -> np.ndarray:
    """PE-LTR weights (Lin et al. 2019): min αᵀGα s.t. Σα = 1, α_i ≥ c_i (Σc ≤ 1).

    With s = 1 − Σc and α = c + sβ, β ∈ Δ, the objective is βᵀG'β with the shifted Gram matrix

        G'_ij = cᵀGc + s (Gc)_i + s (Gc)_j + s² G_ij,

    so the problem is ``simplex_min_norm`` on G'. s = 0 leaves α = c.
    """
    g = check_gram(gram)
    c = check_min_weights(min_weights, g.shape[0])
    _check_options(tol, max_iter)
    s = 1.0 - float(c.sum())
    if s <= 0.0:
        return c
    gc = g @ c
    shifted = float(c @ gc) + s * (gc[:, None] + gc[None, :]) + s * s * g
    beta = _solve(shifted, _Blocks(np.arange(g.shape[0]), np.arange(0)), tol, max_iter, "pareto_min_norm")
    return c + s * beta


def main_aux_min_norm(gram: ArrayLike, main: int, *, tol: float = 1e-12, max_iter: int = 2000) -> np.ndarray:
    """Main/auxiliary weights (``docs/maths.md``): w[main] = 1, w_j = λ_j ≥ 0 minimising
    ‖g_main + Σ λ_j g_j‖².

    The dual of max_u ⟨u, g_main⟩ − ½‖u‖² s.t. ⟨u, g_j⟩ ≥ 0: at the optimum every auxiliary has
    (Gw)_j ≥ 0 and λ_j (Gw)_j = 0. Solved by the Lawson-Hanson active set on G (each face: G_AA λ_A =
    −G_{A,main}; exact coordinate re-fits of λ where a face is degenerate; module docstring), returned once
    (Gw)_j ≥ −tol·‖u‖² and |λ_j (Gw)_j| ≤ tol·‖u‖² (plus rounding error).
    """
    g = check_gram(gram)
    t = g.shape[0]
    m = check_task_index(main, t)
    aux = np.array([j for j in range(t) if j != m], dtype=np.intp)
    return _solve(g, _Blocks(np.array([m]), aux), tol, max_iter, "main_aux_min_norm")


def mixed_min_norm(
    gram: ArrayLike, main: Sequence[int], *, tol: float = 1e-12, max_iter: int = 2000
) -> np.ndarray:
    """Mixed n main + m auxiliary weights (``docs/maths.md``): min ‖Σ_{i∈main} α_i g_i + Σ_j λ_j g_j‖² over
    α ∈ Δ^n, λ ≥ 0. One main task is ``main_aux_min_norm``; all tasks main is ``simplex_min_norm``.

    The same active set as the two special cases, each face solving the KKT system with the α-sum
    constraint exactly; where a face is degenerate, Frank-Wolfe/away steps on α and exact coordinate
    re-fits on λ take over (module docstring).
    """
    g = check_gram(gram)
    t = g.shape[0]
    m = check_main_indices(main, t)
    mains = set(m.tolist())
    aux = np.array([i for i in range(t) if i not in mains], dtype=np.intp)
    return _solve(g, _Blocks(m, aux), tol, max_iter, "mixed_min_norm")


def _solve(g: np.ndarray, blocks: _Blocks, tol: float, max_iter: int, what: str) -> np.ndarray:
    _check_options(tol, max_iter)
    w = np.zeros(g.shape[0])
    w[blocks.main] = 1.0 / blocks.main.size
    scale = float(g.diagonal().max())
    if scale <= 0.0:
        # G = 0: every feasible w gives u = 0; the uniform start is as good as any and symmetric.
        return w
    # The optimal weights do not change under G → G/scale, and a unit diagonal keeps the KKT system of the
    # face solves (which mixes G with a column of ones) well scaled and the stopping tolerances absolute.
    gn = g / scale
    # A Cholesky factorisation that succeeds certifies G ≻ 0 (to round-off) at a tenth of the cost of the
    # eigendecomposition, which ``psd_projection`` would then return unchanged; only singular or
    # indefinite G (collinear, duplicated or zero gradients, T > d, float32 round-off) pays for it.
    if lapack("potrf")(gn, lower=1, clean=0)[1] != 0:
        gn = psd_projection(gn)
        # The projection makes the rows of zero gradients exactly zero. A main task with one attains u = 0,
        # the least ‖u‖² there is, with its weight 1 and the auxiliaries' 0; with several such tasks the
        # faces the active set would visit are all optimal and it cannot certify any of them to round-off.
        zero = blocks.main[gn.diagonal()[blocks.main] <= 0.0]
        if zero.size:
            w = np.zeros(g.shape[0])
            w[zero] = 1.0 / zero.size
            return _finish(w, blocks, what)
    w = _iterate(gn, w, blocks, tol, max_iter)
    return _finish(w, blocks, what)


def _check_options(tol: float, max_iter: int) -> None:
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number ≥ 0, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int | np.integer) or max_iter < 0:
        raise ValueError(f"max_iter must be an int ≥ 0, got {max_iter!r}")


def _iterate(g: np.ndarray, w: np.ndarray, blocks: _Blocks, tol: float, max_iter: int) -> np.ndarray:
    """The active-set method from the start w; where it cannot certify its answer, the steps from w."""
    # Every face solve counts as a step against max_iter; the active set never needs more than a few per
    # index, so the cap only matters for degenerate G, where the steps are the better tool anyway.
    budget = min(max_iter, _SOLVES_PER_TASK * g.shape[0] + _SOLVES_EXTRA)
    found = _active_set(g, w, blocks, tol, budget) if budget > 0 else None
    return found if found is not None else _steps(g, w, blocks, tol, max_iter)


def _active_set(g: np.ndarray, w: np.ndarray, blocks: _Blocks, tol: float, budget: int) -> np.ndarray | None:
    """Wolfe's min-norm-point / Lawson-Hanson active-set method (module docstring) from the feasible start
    w, with at most ``budget`` face solves. Returns a point that satisfies the optimality conditions of
    ``_kkt_holds`` (the same test, computed inline), or None when it cannot get there."""
    t = g.shape[0]
    is_main = np.zeros(t, dtype=bool)
    is_main[blocks.main] = True
    many = blocks.main.size > 1
    # Every task main (MGDA, PE-LTR): a slice selects the same entries as the index array, without copies.
    main: np.ndarray | slice = slice(None) if blocks.main.size == t else blocks.main
    inv_norm: np.ndarray | None = None
    absg = np.abs(g)
    round_off = 4.0 * t * EPS  # _rounding: the float64 error bound of (Gw)_i is this times (|G| |w|)_i
    w = w.copy()
    # The start is the optimum of no face in general: bring every auxiliary that it violates in at once.
    on = is_main | ((g.dot(w) < 0.0) & ~is_main)
    added = -1  # the index the last major cycle brought in (-1: none, or several)
    first = True
    # Major cycles bring every violated index in at once until such a face turns out infeasible; from then
    # on one at a time (Wolfe's rule, whose strictly falling objective guarantees the end).
    several = True
    after_several = False
    visited: set[tuple[bytes, bool]] = set()
    for _ in range(budget):
        p = on.nonzero()[0]
        mp = is_main[p]
        y = _face_solve(g, p, mp)
        if y is None:
            return None
        lowest = float(y.min())
        if lowest < 0.0 and lowest < -_NEG_CLIP * max(1.0, float(np.abs(y).max())):
            several = several and not after_several
            after_several = False
            keep = y > 0.0
            if first and keep[mp].any():
                # The start is no face's minimiser, so nothing is lost by leaving it for the point of the
                # smaller face that y suggests (y's negative weights set to 0, the mains rescaled to sum 1):
                # one solve per index y drops instead of one walk and one solve each.
                first = False
                wp = np.where(keep, y, 0.0)
                wp[mp] /= wp[mp].sum()
                w[p] = wp
                on[p[~keep]] = False
                continue
            first = False
            # Minor cycle: y is infeasible. Indices already at 0 that y wants negative block at once, with
            # no move; otherwise walk w → y until the first weight reaches 0 and drop that index.
            wp = w[p]
            stuck = (wp <= 0.0) & (y < 0.0)
            if stuck.any():
                if added >= 0 and stuck[np.searchsorted(p, added)]:
                    # The index just brought in goes straight back: round-off, not progress. If it is a main
                    # task collinear with a main of the face to within the face solve's pivot threshold, the
                    # face cannot tell the two apart; it violated where the other is stationary, so it is the
                    # shorter, and it takes the other's place and weight (the longer is not in the answer).
                    partner = _collinear_partner(g, p, added, is_main)
                    if partner < 0:
                        return None
                    w[added], w[partner] = w[partner], 0.0
                    on[partner] = False
                    added = -1
                    continue
                on[p[stuck]] = False
            else:
                falling = (y < 0.0).nonzero()[0]
                ratios = wp[falling] / (wp[falling] - y[falling])
                k = int(ratios.argmin())
                wp += float(ratios[k]) * (y - wp)
                np.maximum(wp, 0.0, out=wp)
                wp[falling[k]] = 0.0
                on[p[falling[k]]] = False
                # Keep Σα = 1 exactly so that round-off cannot accumulate from one face to the next.
                wp[mp] /= wp[mp].sum()
                w[p] = wp
            added = -1
            continue
        first = after_several = False
        wp = np.maximum(y, 0.0)
        wp[mp] /= wp[mp].sum()
        w[p] = wp
        # From here the run depends only on w, now a function of the face alone (zero off it), and on
        # `several`: a face minimiser reached twice with the same `several` would repeat the same cycle until
        # the budget ran out, so the fallback takes over at once.
        visit = (on.tobytes(), several)
        if visit in visited:
            return None
        visited.add(visit)
        # Major cycle: the optimality conditions of _kkt_holds, at the face minimiser w.
        v = g.dot(w)
        slack = tol * max(float(w.dot(v)), 0.0)
        noise = round_off * absg.dot(w) + TINY
        margin = v + (slack + noise)  # auxiliaries: (Gw)_j ≥ −(slack + noise_j)
        nu = 0.0
        if many:
            # Mains: the Frank-Wolfe gap ν − min_i (Gw)_i ≤ slack + the largest noise among the mains.
            nu = float(w[main].dot(v[main]))
            margin[main] = (v[main] - nu) + (slack + float(noise[main].max()))
        else:
            margin[main] = np.inf  # a single main weight is fixed at 1
        bad = margin < 0.0
        face_violates = bool(bad.any())
        if face_violates:
            out = bad & ~on
            if out.any():
                if several and np.count_nonzero(out) > 1:
                    on |= out
                    added, after_several = -1, True
                    continue
                if inv_norm is None:
                    # Pricing divides a violation by the length of its direction in u-space (steepest edge),
                    # so that an auxiliary 1e-6 times smaller than the others is not priced 1e-6 times lower;
                    # zero rows never violate.
                    inv_norm = 1.0 / np.sqrt(np.maximum(g.diagonal(), TINY))
                score = v * inv_norm
                if many:
                    score[main] = (v[main] - nu) * inv_norm[main]
                added = int(out.nonzero()[0][score[out].argmin()])
                on[added] = True
                continue
        elif not blocks.aux.size:
            return w
        else:
            # Complementary slackness λ_j (Gw)_j = 0 on the auxiliaries: exact on the face up to its solve.
            lam = w.copy()
            lam[main] = 0.0
            if not (np.abs(lam * v) > slack + lam * noise).any():
                return w
        # The face minimiser fails on its own face. When y had weights clipped as round-off, they were not:
        # what round-off is depends on ‖u‖², which can be 1e-12 of max G_ii (a task whose gradient has all
        # but vanished, or a main task that has converged), not on the weights' size; clipping one moved
        # (Gw)_i off its face value for the indices coupled to it. Drop them and solve the smaller face.
        clipped = y < 0.0
        if clipped.any():
            on[p[clipped]] = False
            added, after_several = -1, False
            continue
        if not face_violates:
            return None  # complementary slackness fails by more than round-off
        # Nothing was clipped: the face's KKT system has no exact solution in float64. Two gradients of the
        # face are collinear to within round-off (g_b = c g_a, c ≠ 1): stationarity would need ⟨g_a, u⟩ =
        # ⟨g_b, u⟩ = ν, lstsq's rank cut-off settles for a point where it fails, and the index that needs
        # less weight, of largest residual (Gw)_i − ν (auxiliaries: (Gw)_j), cannot be in the support of the
        # answer. It leaves the face; whatever face follows is certified by the same test, and the solve
        # budget bounds the detour.
        residual = v[p] - np.where(mp, nu, 0.0)
        if not many:
            residual[mp] = -np.inf  # the single main weight is fixed at 1
        drop = int(residual.argmax())
        if not residual[drop] > 0.0:
            return None  # the face minimiser itself is off by more than round-off
        on[p[drop]] = False
        w[p[drop]] = 0.0
        if mp[drop]:
            w[main] /= w[main].sum()
        added, after_several = -1, False
        continue
    return None


def _collinear_partner(g: np.ndarray, p: np.ndarray, index: int, is_main: np.ndarray) -> int:
    """The main task of the face p whose gradient is collinear with g_index to within ``_PIVOT_MIN`` (squared
    sine of their angle, G_ii G_jj − G_ij² ≤ _PIVOT_MIN G_ii G_jj, and ⟨g_i, g_j⟩ > 0), the most collinear
    one; -1 if none or if ``index`` is not a main task."""
    if not is_main[index]:
        return -1
    others = p[(p != index) & is_main[p]]
    cross = g[index, others]
    norms = g[index, index] * g.diagonal()[others]
    sine = (norms - cross * cross) / np.maximum(norms, TINY)
    sine[~(cross > 0.0)] = np.inf
    if not others.size or not float(sine.min()) <= _PIVOT_MIN:
        return -1
    return int(others[int(sine.argmin())])


def _face_solve(g: np.ndarray, p: np.ndarray, mp: np.ndarray) -> np.ndarray | None:
    """The minimiser y_p of yᵀG y over {y_i = 0 off p, Σ_{i∈S} y_i = 1} (S = the mains in p, mask mp).

    Stationarity on the face reads G_pp y = ν e_S. With G_pp ≻ 0: y = x / (e_Sᵀx), G_pp x = e_S, one
    Cholesky solve (LAPACK posv). It is trusted only when every Cholesky pivot keeps at least
    ``_PIVOT_MIN`` of its diagonal entry, L_ii² ≥ _PIVOT_MIN·G_ii — L_ii²/G_ii is the squared sine of the
    angle between g_i and the span of the g's before it, so this bounds the scaled condition number and is
    blind to the scale of each task; otherwise (singular or nearly singular faces, where u* may be 0) the
    bordered KKT system goes to lstsq (``_face_lstsq``).
    """
    sub = g.take(p, 0).take(p, 1)
    x: np.ndarray
    chol, x, info = lapack("posv")(sub, mp.astype(np.float64), lower=1)
    if info == 0:
        piv = chol.diagonal()
        if (piv * piv >= _PIVOT_MIN * sub.diagonal()).all():
            total = float(x[mp].sum())
            if total > 0.0 and math.isfinite(total):
                return x / total
    return _face_lstsq(sub, mp)


def _face_lstsq(sub: np.ndarray, mp: np.ndarray) -> np.ndarray | None:
    """Minimise yᵀ G_pp y over Σ_{i∈S} y_i = 1 (sub = G_pp, mp the mask of S) through the KKT system
    [[G_pp, e_S], [e_Sᵀ, 0]] [y; ν] = [0; 1]. lstsq gives an exact solution even when G_pp is singular
    (duplicated, collinear or zero gradients), and its minimum-norm choice keeps weights moderate when they
    are not unique (two opposite auxiliaries: any λ_1 g − λ_2 g with the same difference); the system is
    consistent because the objective is bounded below on the affine set."""
    k = sub.shape[0]
    # Auxiliary coefficients are solved for as λ_j = z_j / ‖g_j‖: an auxiliary 1e-6 times smaller than the
    # others then does not look like a rank deficiency to lstsq's rank cut-off. Main weights are
    # left alone: rescaling them would skew the sum constraint's row instead.
    d = sub.diagonal()
    unit = np.where(mp, 1.0, 1.0 / np.sqrt(np.where(d > 0.0, d, 1.0)))
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, :k] = sub * np.outer(unit, unit)
    kkt[:k, k] = mp
    kkt[k, :k] = mp
    rhs = np.zeros(k + 1)
    rhs[k] = 1.0
    y = unit * _lstsq(kkt, rhs)[:k]
    return y if np.all(np.isfinite(y)) else None


def _lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``scipy.linalg.lstsq(a, b, lapack_driver="gelsy")`` for square a and one right-hand side, calling
    LAPACK directly: the same factorisation and rank cut-off (eps), without the wrapper's checks and
    workspace query, which cost twice the solve itself at this size. gelsy (complete orthogonal
    factorisation) gives the minimum-norm solution, like the SVD-based default at a third of its cost."""
    n = a.shape[0]
    lwork = _GELSY_WORK.get(n)
    if lwork is None:
        work, info = lapack("gelsy_lwork")(n, n, 1, EPS)
        if info != 0:
            raise SolverError(f"gelsy workspace query failed (info={info})")
        lwork = _GELSY_WORK[n] = int(work)
    x: np.ndarray
    x, info = lapack("gelsy")(a, b, np.zeros(n, dtype=np.int32), EPS, lwork, 0, 0)[1::3]
    if info < 0:
        raise SolverError(f"illegal value in argument {-info} of gelsy")
    return x


def _steps(g: np.ndarray, w: np.ndarray, blocks: _Blocks, tol: float, max_iter: int) -> np.ndarray:
    """The fallback: Frank-Wolfe/away steps on the mains, coordinate re-fits on the auxiliaries, polish."""
    w = _try_polish(g, w, blocks)
    checkpoint = _objective(g, w)
    for it in range(1, max_iter + 1):
        if _kkt_holds(g, w, blocks, tol):
            return w
        w_next = _main_step(g, w, blocks.main) if blocks.main.size > 1 else w
        w_next = _aux_step(g, w_next, blocks.aux) if blocks.aux.size else w_next
        if np.array_equal(w_next, w):
            break  # no step can lower the objective any more: only round-off is left
        grew = bool(np.any((w_next > 0.0) & (w == 0.0)))
        w = w_next
        # A new index in the support is when the face minimiser can jump to the answer (Wolfe's major
        # cycle); between such events the steps only shuffle weight within the face.
        if grew or it % _CHECK_EVERY == 0:
            w = _try_polish(g, w, blocks)
        if it % _CHECK_EVERY == 0:
            obj = _objective(g, w)
            # Ill-conditioned faces (near-duplicate gradients, 1e-3 scale differences) can leave the KKT
            # test just out of reach of float64 while the objective no longer moves: stop there.
            if checkpoint - obj <= tol * obj + _noise(g, w):
                break
            checkpoint = obj
    return _try_polish(g, w, blocks)


def _objective(g: np.ndarray, w: np.ndarray) -> float:
    return float(w @ g @ w)


def _noise(g: np.ndarray, w: np.ndarray) -> float:
    """A bound on the float64 rounding error of wᵀGw."""
    return float(np.abs(w) @ _rounding(g, w))


def _rounding(g: np.ndarray, w: np.ndarray) -> np.ndarray:
    """A bound on the float64 rounding error of each (Gw)_i: the stopping test cannot ask for less."""
    bound: np.ndarray = 4.0 * g.shape[0] * EPS * (np.abs(g) @ np.abs(w)) + TINY
    return bound


def _kkt_holds(g: np.ndarray, w: np.ndarray, blocks: _Blocks, tol: float) -> bool:
    """Optimality up to tol·‖u‖²: mains share the smallest ⟨u, g_i⟩ (Frank-Wolfe gap), auxiliaries have
    ⟨u, g_j⟩ ≥ 0 and complementary slackness λ_j ⟨u, g_j⟩ = 0."""
    v = g @ w
    slack = tol * max(float(w @ v), 0.0)
    noise = _rounding(g, w)
    m, a = blocks
    if m.size > 1 and float(w[m] @ v[m]) - v[m].min() > slack + noise[m].max():
        return False
    if a.size and np.any(v[a] < -(slack + noise[a])):
        return False
    return not (a.size and np.any(np.abs(w[a] * v[a]) > slack + w[a] * noise[a]))


def _main_step(g: np.ndarray, w: np.ndarray, main: np.ndarray) -> np.ndarray:
    """One Frank-Wolfe or away step on the main weights, whichever has the larger gap (Lacoste-Julien &
    Jaggi 2015): away steps can drop a vertex, which plain Frank-Wolfe never does, so convergence is
    linear."""
    v = g @ w
    am, vm = w[main], v[main]
    mu = float(am @ vm)
    toward = main[np.argmin(vm)]
    support = main[am > 0.0]
    away = support[np.argmax(v[support])]
    d = np.zeros_like(w)
    # With a single vertex in the support the away direction α − e_a is zero up to round-off, and its
    # step bound α_a / (1 − α_a) would blow that round-off up: only Frank-Wolfe steps make sense there.
    if support.size < 2 or mu - v[toward] >= v[away] - mu:
        d[main] = -am
        d[toward] += 1.0
        w = _line_step(g, w, v, d, 1.0, drop=None)
    else:
        d[main] = am
        d[away] -= 1.0
        w = _line_step(g, w, v, d, w[away] / (1.0 - w[away]), drop=away)
    # Keep Σα = 1 exactly so that round-off cannot accumulate across thousands of steps.
    w[main] /= w[main].sum()
    return w


def _line_step(
    g: np.ndarray,
    w: np.ndarray,
    v: np.ndarray,
    d: np.ndarray,
    gamma_max: float,
    drop: int | np.integer[Any] | None,
) -> np.ndarray:
    """Exact line search of ‖J(w + γd)‖² for γ ∈ [0, γ_max]: γ = −dᵀGw / dᵀGd, the closed form of
    ``min_norm_two`` written along the direction (no cancellation between two nearly equal endpoints)."""
    slope = float(d @ v)
    if slope >= 0.0:
        return w
    curv = float(d @ (g @ d))
    gamma = gamma_max if curv <= TINY else min(-slope / curv, gamma_max)
    w = w + gamma * d
    if drop is not None and gamma == gamma_max:
        w[drop] = 0.0  # an exact drop step: the vertex leaves the support instead of lingering at ~1e-17
    np.maximum(w, 0.0, out=w)
    return w


def _aux_step(g: np.ndarray, w: np.ndarray, aux: np.ndarray) -> np.ndarray:
    """Re-fit the auxiliary coefficient whose exact one-dimensional update lowers ‖u‖² the most
    (Gauss-Southwell rule: the decrease is ‖g_j‖² (λ_j' − λ_j)²)."""
    v = g @ w
    diag = np.diag(g)[aux]
    lam = w[aux]
    resid = v[aux] - lam * diag  # ⟨u − λ_j g_j, g_j⟩
    alive = diag > TINY
    new = np.zeros_like(lam)
    np.divide(np.maximum(-resid, 0.0), diag, out=new, where=alive)
    new = np.where(alive, new, lam)
    gain = diag * (new - lam) ** 2
    k = int(np.argmax(gain))
    if not gain[k] > 0.0:
        return w
    j = aux[k]
    w = w.copy()
    rest = float(w @ v) - 2.0 * lam[k] * v[j] + lam[k] ** 2 * diag[k]  # ‖u − λ_j g_j‖²
    w[j] = main_aux_one(rest, resid[k], diag[k])
    return w


def _try_polish(g: np.ndarray, w: np.ndarray, blocks: _Blocks) -> np.ndarray:
    """Replace w by the polished point when that is finite, feasible and no worse (up to round-off)."""
    p = _polish(g, w, blocks)
    if p is None:
        return w
    return p if _objective(g, p) <= _objective(g, w) + _noise(g, w) else w


def _polish(g: np.ndarray, w: np.ndarray, blocks: _Blocks) -> np.ndarray | None:
    """The exact minimiser on the face of w's support, or on a sub-face of it.

    y = argmin over the affine hull of the face (``_face_minimiser``). If y ≥ 0 it is the answer. Otherwise
    the objective still decreases along w → y (convex, minimised at y), so step there until the first
    weight reaches 0 (ratio test), drop that weight and repeat on the smaller face: the minor cycle of
    Wolfe's (1976) min-norm-point algorithm. At most |support| rounds, each with one small lstsq.
    """
    w = w.copy()
    w[w <= _SUPPORT_EPS] = 0.0
    for _ in range(w.size):
        if not w[blocks.main].sum() > 0.0:
            return None
        y: np.ndarray | None = _face_minimiser(g, w > 0.0, blocks)
        if y is None:
            return None
        clip = -_NEG_CLIP * max(1.0, float(np.abs(y).max()))
        if y.min() >= clip:
            y = np.maximum(y, 0.0)
            y[blocks.main] /= y[blocks.main].sum()
            return y
        w = _ratio_step(w, y)
        w[blocks.main] /= w[blocks.main].sum()
    return None


def _ratio_step(w: np.ndarray, y: np.ndarray) -> np.ndarray:
    """w + θ(y − w) with the largest θ ∈ [0, 1] keeping every weight ≥ 0; the blocking weight becomes 0."""
    falling = (y < 0.0) & (w > 0.0)
    ratios = w[falling] / (w[falling] - y[falling])
    k = np.flatnonzero(falling)[np.argmin(ratios)]
    out: np.ndarray = np.maximum(w + float(ratios.min()) * (y - w), 0.0)
    out[k] = 0.0
    return out


def _face_minimiser(g: np.ndarray, on: np.ndarray, blocks: _Blocks) -> np.ndarray | None:
    """The minimiser of wᵀGw over {w_i = 0 off the face ``on``, Σ_{i∈S} w_i = 1} (S = the face's main
    indices), by lstsq on the bordered KKT system (``_face_lstsq``), as a full-length vector."""
    s = blocks.main[on[blocks.main]]
    p = np.concatenate([s, blocks.aux[on[blocks.aux]]])
    mp = np.zeros(p.size, dtype=bool)
    mp[: s.size] = True
    x = _face_lstsq(g.take(p, 0).take(p, 1), mp)
    if x is None:
        return None
    out = np.zeros(g.shape[0])
    out[p] = x
    return out


def _finish(w: np.ndarray, blocks: _Blocks, what: str) -> np.ndarray:
    if not np.isfinite(w).all():
        raise SolverError(f"{what}: the iterations produced non-finite weights {w!r}")
    w = np.maximum(w, 0.0)
    total = float(w[blocks.main].sum())
    if abs(total - 1.0) > 1e-9 or total <= 0.0:
        raise SolverError(f"{what}: main weights sum to {total!r} instead of 1 (weights {w!r})")
    w[blocks.main] /= total
    return w


__all__ = ["simplex_min_norm", "pareto_min_norm", "main_aux_min_norm", "mixed_min_norm"]
