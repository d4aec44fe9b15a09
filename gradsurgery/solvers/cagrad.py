"""Exact CAGrad weights on the T×T Gram matrix (Conflict-Averse Gradient descent; Liu, Liu, Jin, Stone & Liu,
NeurIPS 2021). numpy float64 in and out.

The update maximises the worst task improvement within a ball around the mean gradient g_0 = (1/T) Σ g_i,

    max_d min_i ⟨g_i, d⟩   s.t.   ‖d − g_0‖ ≤ r = c ‖g_0‖,                                     (P)

whose dual is a convex problem over the probability simplex Δ,

    min_{w ∈ Δ} F(w) = qᵀw + r ‖g_w‖,    q = G 1/T (q_i = ⟨g_i, g_0⟩),  ‖g_w‖² = wᵀGw.          (D)

Weak duality holds for every pair: for w ∈ Δ and d = g_0 + Jᵀv with v ≥ 0, vᵀGv ≤ r²,

    min_i (q + Gv)_i = min_i ⟨g_i, d⟩ ≤ ⟨g_w, d⟩ ≤ qᵀw + r‖g_w‖ = F(w),

so F(w) − min_i (q + Gv)_i bounds how far w is from optimal. Every answer is returned with this gap.

Optimality conditions. With v = r w / ‖g_w‖ (so ‖Jᵀv‖ = r), w is optimal iff q + Gv ≥ ν 1 with equality on
the support S of w, where ν = min_i ⟨g_i, d⟩ is the optimal worst-case improvement (Lagrange multiplier of
Σw = 1). On a face S with G_SS ≻ 0 that reads v_S = ν a − b, a = G_SS⁻¹ 1, b = G_SS⁻¹ q_S, and
‖Jᵀv‖² = r² is the quadratic (1ᵀa) ν² − 2 (1ᵀb) ν + q_Sᵀb − r² = 0, of which the larger root is the one
(the same closed form as the polish of the SLSQP path in ``gradsurgery.methods.cagrad``).

Algorithm: a homotopy in ν (a parametric active set). For fixed ν, v(ν) = argmin_{v ≥ 0} ½vᵀGv − vᵀ(ν1 − q)
gives the point d(ν) = g_0 + Jᵀv(ν) of {d : Jd ≥ ν1} nearest to g_0; ‖Jᵀv(ν)‖ increases with ν and the
answer is the ν at which it reaches r. At ν = min_i q_i the nearest point is g_0 itself (v = 0, S = argmin q).
Along a face, v_S(ν) = ν a − b is linear in ν, the slack q_i + (Gv)_i − ν of an index off S is linear in ν,
and ‖Jᵀv‖² is the quadratic above; the next event is whichever comes first of

- stop: ‖Jᵀv(ν)‖ = r (the larger root): the answer, w = v/Σv;
- drop: some v_i (i ∈ S) reaches 0 — i leaves S;
- add: some slack off S reaches 0 while falling — i joins S. If g_i is (numerically) in the span of
  {g_k : k ∈ S}, G_{S+i} would be singular; then i replaces the k with the smallest v_k/c_k, c = G_SS⁻¹G_Si,
  c_k > 0 (the simplex method's ratio test: Jᵀv does not change). If no c_k > 0, zero is in the convex hull
  of the gradients of S + i and the optimum has g_w* = 0 (see Degenerate case).

Each face costs two triangular solves, a few T×|S| products, and one row added to the Cholesky factor of
G_SS (a refactorisation after a drop or an exchange); the path visits about one face per index of the
answer's support (4–6 for T = 10–16 on random problems), so a solve is O(T³), O(T⁴) at worst.

PSD. The dual is convex, and the gap a certificate, only for PSD G: where one Cholesky factorisation of G
fails (singular G, or indefinite at the 1e-7 level as a Gram matrix accumulated in float32 is), G is
replaced by its PSD projection (``psd_projection``) and the largest entry change counts as uncertainty of
the data in the certificate below.

Certified stop and fallback. The homotopy's answer is returned only if its duality gap is at most
``tol`` · max_i ‖g_i‖ (‖g_0‖ + r) plus a bound on the float64 rounding error of the gap. Otherwise it is
re-solved in closed form on the face its tightest slacks point at (up to three times: nearly singular faces
leave it close but short), and failing that (a face too ill-conditioned for its solve, cycling between
degenerate faces, more faces than 4T + 8) the problem is solved again by a slower method that is correct by
construction: F(w) = min_{μ>0} qᵀw + ‖g_w‖²/(2μ) + r²μ/2,
so for fixed μ the best w is the MGDA point of the shifted gradients g_i + μ g_0 (``simplex_min_norm`` on
G + μ(q1ᵀ + 1qᵀ) + μ²‖g_0‖²11ᵀ, itself certified), and the optimal μ is ‖g_w*‖/r, the unique crossing of the
nonincreasing ‖g_w(μ)‖/μ with r (the outer function of μ is convex), found by bisection. Every bracket end
with ‖g_w(μ)‖ ≤ rμ yields the primal point v = w/μ and so a gap; the face closed form is tried on each
support found. The result says which method produced it (``method``) and whether the gap was certified.

Degenerate case. If zero lies in the convex hull of the gradients and the ball reaches the cone
{d : Jd ≥ 0} (always when c ≥ 1), the optimum is ν* = 0 with g_w* = 0: w* is the MGDA point (‖g_w*‖ = 0) and
a primal point is the projection of g_0 onto {d : Jd ≥ 0}, d = g_0 + Jᵀλ with λ = argmin_{λ≥0} ‖g_0 + Jᵀλ‖
(``main_aux_min_norm`` on the Gram matrix of g_0, g_1, …, g_T). The paper's d = g_0 + r g_w/‖g_w‖ is then
0/0; ``fused`` is the mean, d = g_0, as in ``gradsurgery.methods.cagrad``. Like there, ``degenerate`` is
decided by ‖g_w*‖ ≤ 1e-6 max_i ‖g_i‖, so it is also set when the optimum is a task whose gradient is that
much smaller than the largest one (g_w* tiny but not zero).

Other special cases: G = 0 (every w is optimal: the mean), r = 0 (c = 0 or g_0 = 0: F = qᵀw is minimised at
a vertex with the smallest q_i; fused = the mean), T = 1 (d = (1 + c) g_1 from the general path).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from .._validation import check_number
from ..errors import SolverError
from ._lapack import lapack
from .closed_form import EPS, TINY, check_gram, psd_projection
from .frank_wolfe import main_aux_min_norm, simplex_min_norm

# ‖g_w*‖ at or below this fraction of the largest gradient norm is the degenerate case g_w* = 0 (the same
# threshold as ``gradsurgery.methods.cagrad``): the direction g_w/‖g_w‖ of a smaller vector is round-off.
DEGENERATE = 1e-6
# A face is solved by Cholesky only when every pivot keeps this fraction of its diagonal entry (L_ii² / G_ii
# is the squared sine of the angle between g_i and the span of the earlier gradients of the face): the
# scaled condition number is then at most ~T/1e-10. Flatter faces are treated as linearly dependent.
_PIVOT_MIN = 1e-10
# A falling slack is trusted to fall only if its slope exceeds its rounding bound by this factor: duplicated
# gradients have slope exactly 0, and must not join the face on round-off.
_SLOPE_SAFETY = 16.0
# Faces the homotopy may visit: about one per index of the support, with room for drops and exchanges.
_FACES_PER_TASK = 4
_FACES_EXTRA = 8
# Face re-solves tried on an uncertified homotopy answer before the fallback.
_REPOLISH = 3
# Bisection steps of the fallback: enough to halve from 1/r down to μ ≈ 1e-12/r and then to full precision.
_FALLBACK_STEPS = 120


class CAGradSolution(NamedTuple):
    weights: np.ndarray  # w* ∈ Δ, the minimiser of the dual F
    fused: np.ndarray  # weights of d = Jᵀ fused on the raw gradients: 1/T + r w*/‖g_w*‖ (mean if degenerate)
    objective: float  # F(w*) on the G given: the optimal worst-case improvement min_i ⟨g_i, d⟩
    gap: float  # F(w*) − min_i ⟨g_i, d⟩ for a feasible d: an upper bound on F(w*) − min F (up to round-off)
    certified: bool  # gap ≤ tol·max‖g_i‖(‖g_0‖ + r) + its rounding bound
    degenerate: bool  # ‖g_w*‖ ≤ DEGENERATE · max_i ‖g_i‖: d = g_0 + r g_w/‖g_w‖ is 0/0
    method: str  # "closed_form", "active_set" or "fallback" (the active set could not certify its answer)
    iterations: int  # faces visited by the active set, plus MGDA solves of the fallback


def cagrad_objective(gram: np.ndarray, w: np.ndarray, c: float) -> float:
    """F(w) = wᵀ G 1/T + c ‖g_0‖ ‖g_w‖ on any Gram matrix (the same function as in
    ``gradsurgery.methods.cagrad``)."""
    t = gram.shape[0]
    mean = np.full(t, 1.0 / t)
    g0_norm = math.sqrt(max(float(mean @ gram @ mean), 0.0))
    return float(w @ gram @ mean) + c * g0_norm * math.sqrt(max(float(w @ gram @ w), 0.0))


def cagrad_weights(gram: ArrayLike, c: float, *, tol: float = 1e-12) -> CAGradSolution:
    """The CAGrad dual minimiser w* = argmin_{w∈Δ} qᵀw + c‖g_0‖‖g_w‖ and the update's weights (module
    docstring). ``tol``: the duality gap to certify, relative to max_i ‖g_i‖ (‖g_0‖ + r), on top of the
    gap's own rounding bound. Never returns an uncertified point without saying so: ``certified`` is False
    only if the fallback, too, could not bring the gap under that bound (not seen on any test problem).

    Raises ValueError on a malformed G or a negative or non-finite c, TypeError when c is not a number.
    """
    g = check_gram(gram)
    c = check_number(c, "c", minimum=0.0)
    tol = check_number(tol, "tol", minimum=0.0)
    t = g.shape[0]
    mean = np.full(t, 1.0 / t)
    scale = float(g.diagonal().max())
    if not scale > 0.0:
        # Every gradient is zero: every w is optimal and d = 0 whatever the weights.
        return CAGradSolution(mean, mean.copy(), 0.0, 0.0, True, True, "closed_form", 0)
    # F is homogeneous of degree 1 in G and its minimiser does not depend on the scale; a unit largest
    # diagonal makes every tolerance below absolute.
    gn = g / scale
    # Sums over T rather than means: numpy's mean is that sum divided by T, through a slower wrapper.
    q = gn.sum(axis=1) / t
    if c * math.sqrt(max(float(q.sum()) / t, 0.0)) == 0.0:
        return _vertex(q, scale)
    # The dual is convex, and the gap a certificate, only for PSD G. One Cholesky factorisation certifies
    # G ≻ 0; where it fails (singular G: T > d, duplicates; or indefinite at the 1e-7 level: G from float32)
    # G is replaced by its PSD projection, which moves a PSD G by round-off only. How far it moved counts as
    # uncertainty of the data in the certificate: the answer is optimal to within what G determines.
    perturb = 0.0
    if lapack("potrf")(gn, lower=1, clean=0)[1] != 0:
        projected = psd_projection(gn)
        perturb = float(np.abs(projected - gn).max())
        gn = projected
        q = gn.sum(axis=1) / t
    n0 = max(float(q.sum()) / t, 0.0)
    r = c * math.sqrt(n0)
    if r == 0.0:
        return _vertex(q, scale)  # g_0 = 0 once G is projected
    problem = _Problem(gn, q, r, n0, tol, perturb)
    found = problem.active_set()
    for _ in range(_REPOLISH):
        if found is None:
            break
        check = problem.gap(*found)
        if check.gap <= check.bound:
            return _result(g, c, r, scale, perturb, found[0], check, "active_set", problem.faces)
        # Nearly singular faces (G within round-off of singular, as from float32) leave the homotopy's
        # answer close but short of the certificate: re-solve on the face its slacks point at.
        found = problem.closed_form(*found)
    w, v = problem.fallback()
    return _result(g, c, r, scale, perturb, w, problem.gap(w, v), "fallback", problem.faces)


def _vertex(q: np.ndarray, scale: float) -> CAGradSolution:
    """r = 0 (c = 0 or g_0 = 0): F = qᵀw is minimised at a vertex with the smallest q_i, and the update is
    g_0 whatever w is."""
    t = q.size
    w = np.zeros(t)
    w[int(np.argmin(q))] = 1.0
    return CAGradSolution(w, np.full(t, 1.0 / t), float(q @ w) * scale, 0.0, True, False, "closed_form", 0)


class _Check(NamedTuple):
    objective: float  # F(w) on the normalised G
    gap: float  # F(w) − min_i (q + Gv)_i
    bound: float  # what the gap must not exceed to be certified
    quad_w: float  # wᵀGw


def _result(
    g: np.ndarray,
    c: float,
    r: float,
    scale: float,
    perturb: float,
    w: np.ndarray,
    check: _Check,
    method: str,
    iterations: int,
) -> CAGradSolution:
    mean = np.full(g.shape[0], 1.0 / g.shape[0])
    gw = math.sqrt(max(check.quad_w, 0.0))
    degenerate = gw <= DEGENERATE
    fused = mean if degenerate else mean + (r / gw) * w
    # F is homogeneous of degree 1 in G: the objective on the G given, up to round-off, unless G had to be
    # projected onto the PSD cone.
    objective = check.objective * scale if perturb == 0.0 else cagrad_objective(g, w, c)
    return CAGradSolution(
        w,
        fused,
        objective,
        max(check.gap, 0.0) * scale,
        bool(check.gap <= check.bound),
        bool(degenerate),
        method,
        iterations,
    )


class _Problem:
    """The dual on the normalised G (max_i G_ii = 1), its homotopy, certificate and fallback."""

    def __init__(self, g: np.ndarray, q: np.ndarray, r: float, n0: float, tol: float, perturb: float) -> None:
        self.g, self.q, self.r, self.n0, self.tol = g, q, r, n0, tol
        self.perturb = perturb  # max |ΔG_ij| of the PSD projection (0 if G was used as given)
        self.t = g.shape[0]
        self.abs_g = np.abs(g)
        self.abs_q = np.abs(q)
        self.abs_q_max = float(self.abs_q.max())
        self.faces = 0

    # -- certificate -------------------------------------------------------------------------------------
    def gap(self, w: np.ndarray, v: np.ndarray) -> _Check:
        """F(w) − min_i (q + Gv)_i and the tolerance it must meet, for w ∈ Δ and v ≥ 0 (scaled into the ball
        if it is outside by round-off).

        The tolerance is ``tol``·(‖g_0‖ + r) (|⟨g_i, d⟩| ≤ ‖d‖ ≤ ‖g_0‖ + r with unit largest gradient) plus
        the float64 rounding error of both sides: T eps-sized terms for the products, and r √δ for ‖g_w‖ =
        √(wᵀGw) when wᵀGw is itself only known to ±δ (at g_w ≈ 0 the square root amplifies round-off).
        Where G had to be projected onto the PSD cone, the size of that change is added to every error
        term: the answer is then certified to within what the given G determines.
        """
        q, r = self.q, self.r
        vw = np.empty((self.t, 2))
        vw[:, 0] = v
        vw[:, 1] = w
        prod = self.g @ vw
        bounds = self.abs_g @ vw
        gv, gw = prod[:, 0], prod[:, 1]
        quad = float(v @ gv)
        shrink = 1.0
        if quad > r * r:
            # A face solve lands on the sphere up to round-off; pull v inside so that d is feasible.
            shrink = r / math.sqrt(quad)
        smin = float((q + shrink * gv).min())
        quad_w = float(w @ gw)
        root = math.sqrt(max(quad_w, 0.0))
        qw = float(q @ w)
        f = qw + r * root
        gamma = 4.0 * self.t * EPS
        eta = self.perturb  # a change of G by ≤ η per entry moves q_i by ≤ η, (Gv)_i by ≤ η Σv, wᵀGw by ≤ η
        noise_s = gamma * (self.abs_q_max + float(bounds[:, 0].max())) + eta * (1.0 + float(v.sum()))
        delta = gamma * float(w @ bounds[:, 1]) + eta
        noise_f = gamma * float(self.abs_q @ w) + eta + r * (math.sqrt(max(quad_w, 0.0) + delta) - root)
        bound = self.tol * (math.sqrt(self.n0) + r) + noise_s + noise_f + TINY
        return _Check(f, f - smin, bound, quad_w)

    # -- faces -------------------------------------------------------------------------------------------
    def _factor(self, face: list[int]) -> np.ndarray | None:
        """Cholesky factor of G_SS, or None when G_SS is (numerically) singular."""
        sub = self.g[np.ix_(face, face)]
        chol: np.ndarray
        chol, info = lapack("potrf")(sub, lower=1, clean=1)
        if info != 0:
            return None
        piv = chol.diagonal()
        if not np.all(piv * piv >= _PIVOT_MIN * sub.diagonal()):
            return None
        return chol

    def closed_form(self, w: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The face solution near the pair (w, v): v on the face where ‖Jᵀv‖ = r (the larger root), w = v/Σv;
        None if it is not a valid point. The face is the support of w plus the indices whose slack
        s_i = q_i + (Gv)_i is within 1e-6 of the smallest, thinned to linearly independent gradients
        (some optimum has such a support) tightest slack first: of two nearly equal gradients, the one
        whose constraint binds must stay."""
        s = self.q + self.g @ v
        near = (w > 0.0) | (s <= float(s.min()) + 1e-6 * (math.sqrt(self.n0) + self.r))
        face: list[int] = []
        for i in np.flatnonzero(near)[np.argsort(s[near], kind="stable")]:
            if self._factor(face + [int(i)]) is not None:
                face.append(int(i))
        chol = self._factor(face) if face else None
        if chol is None:
            return None
        rhs = np.stack([np.ones(len(face)), self.q[face]], axis=1)
        ab, info = lapack("potrs")(chol, rhs, lower=1)
        if info != 0:
            return None
        a, b = ab[:, 0], ab[:, 1]
        nu = _stop_root(float(a.sum()), float(b.sum()), float(self.q[face] @ b) - self.r * self.r)
        if nu is None:
            return None
        v = np.zeros(self.t)
        v[face] = nu * a - b
        return self._point(v)

    # -- the homotopy ------------------------------------------------------------------------------------
    def active_set(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The homotopy in ν (module docstring). Returns (w, v) at the stop event, None where it cannot
        get there (the caller then certifies or falls back)."""
        g, q, r, t = self.g, self.q, self.r, self.t
        gamma = 4.0 * t * EPS
        # The face is kept as the leading block of a symmetrically permuted copy of G, with its Cholesky
        # factor grown one row per added index: no fancy indexing and no refactorisation on the common path.
        gp = g.copy()
        qp = np.empty((t, 2))  # columns (1, q): the right-hand sides of a and b
        qp[:, 0] = 1.0
        qp[:, 1] = q
        perm = np.arange(t)
        chol = np.zeros((t, t))
        first = int(np.argmin(q))
        nu = float(q[first])
        _swap(gp, qp, perm, 0, first)
        if not gp[0, 0] > 0.0:
            # The smallest q_i belongs to a zero gradient: zero is in the hull and d = g_0 already attains
            # ν = min q = 0, the best possible.
            return self._degenerate()
        chol[0, 0] = math.sqrt(gp[0, 0])
        k = 1
        for _ in range(_FACES_PER_TASK * t + _FACES_EXTRA):
            self.faces += 1
            low = chol[:k, :k]
            ab, info = lapack("potrs")(low, qp[:k], lower=1)
            if info != 0:
                return None
            a, b = ab[:, 0], ab[:, 1]
            asum, bsum = ab.sum(axis=0).tolist()
            nu_stop = _stop_root(asum, bsum, float(qp[:k, 1] @ b) - r * r)
            if nu_stop is None:
                return None
            event, kind, pos = max(nu_stop, nu), 0, -1  # kind: 0 stop, 1 drop, 2 add
            # Drops: v_i(ν) = ν a_i − b_i reaches 0 for a falling weight.
            falling = float(a.min()) < 0.0
            if falling:
                idx = np.flatnonzero(a < 0.0)
                when = b[idx] / a[idx]
                j = int(np.argmin(when))
                if when[j] < event:
                    event, kind, pos = max(float(when[j]), nu), 1, int(idx[j])
            # Adds: the slack σ_i(ν) = (q_i − G_iS b) + ν (G_iS a − 1) of an index off the face reaches 0.
            if k < t:
                # |G_ij| ≤ 1 on the normalised G, so this bounds the rounding error of every slope.
                limit = _SLOPE_SAFETY * gamma * ((float(np.abs(a).sum()) if falling else asum) + 1.0)
                prod = gp[k:, :k] @ ab
                fall = 1.0 - prod[:, 0]  # −slope
                # Slacks that do not fall (fall ≤ limit) never reach 0: their time is +∞.
                when = np.where(fall > limit, (qp[k:, 1] - prod[:, 1]) / np.maximum(fall, limit), np.inf)
                j = int(when.argmin())
                if when[j] < event:
                    event, kind, pos = max(float(when[j]), nu), 2, k + j
            if kind == 0:
                v = np.zeros(t)
                v[perm[:k]] = nu_stop * a - b
                return self._point(v)
            if kind == 1:
                nu = event
                k -= 1
                if k == 0:
                    return None  # cannot happen in exact arithmetic: Σv grows along every face
                _swap(gp, qp, perm, pos, k)
                chol[:k, :k], info = lapack("potrf")(gp[:k, :k], lower=1, clean=1)
                if info != 0:
                    return None
                continue
            # Add: bring the index to position k and grow the factor by one row, if its pivot allows.
            v_face = np.maximum(event * a - b, 0.0)
            nu = event
            _swap(gp, qp, perm, pos, k)
            row, info = lapack("trtrs")(low, gp[:k, k], lower=1)
            if info != 0:
                return None
            pivot = float(gp[k, k] - row @ row)
            if gp[k, k] > 0.0 and pivot >= _PIVOT_MIN * gp[k, k]:
                chol[k, :k] = row
                chol[k, k] = math.sqrt(pivot)
                k += 1
                continue
            # g_k is (numerically) in the span of the face: exchange (module docstring).
            coef, info = lapack("trtrs")(low, row, lower=1, trans=1)
            if info != 0:
                return None
            pos_c = coef > 1e-12 * float(np.abs(coef).max(initial=0.0))
            if not pos_c.any():
                return self._degenerate()
            idx = np.flatnonzero(pos_c)
            leave = int(idx[int(np.argmin(v_face[idx] / coef[idx]))])
            _swap(gp, qp, perm, leave, k)  # the entering index takes the leaving one's place
            chol[:k, :k], info = lapack("potrf")(gp[:k, :k], lower=1, clean=1)
            if info != 0:
                return None
        return None

    def _point(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(w, v) with w = v/Σv from a face solution, negative round-off clipped."""
        np.maximum(v, 0.0, out=v)
        total = float(v.sum())
        if not (total > 0.0 and math.isfinite(total)):
            return None
        return v / total, v

    # -- degenerate case ---------------------------------------------------------------------------------
    def _degenerate(self) -> tuple[np.ndarray, np.ndarray] | None:
        """w = the MGDA point (g_w ≈ 0), v = λ of the projection of g_0 onto {d : Jd ≥ 0}, if it fits in the
        ball; None if the problem is not degenerate after all."""
        g, q, t = self.g, self.q, self.t
        w = simplex_min_norm(g)
        aug = np.empty((t + 1, t + 1))
        aug[0, 0] = self.n0
        aug[0, 1:] = aug[1:, 0] = q
        aug[1:, 1:] = g
        lam = main_aux_min_norm(aug, 0)[1:]
        if float(lam @ g @ lam) > self.r * self.r * (1.0 + 1e-12):
            return None
        return w, lam

    # -- fallback ----------------------------------------------------------------------------------------
    def fallback(self) -> tuple[np.ndarray, np.ndarray]:
        """Bisection on μ with MGDA solves of the shifted gradients g_i + μ g_0 (module docstring). Returns
        the best (smallest gap) pair found; it is certified unless round-off defeats every candidate."""
        g, q, r, n0 = self.g, self.q, self.r, self.n0
        ones = np.ones(self.t)
        best: tuple[float, np.ndarray, np.ndarray] | None = None

        def consider(w: np.ndarray, v: np.ndarray) -> bool:
            nonlocal best
            check = self.gap(w, v)
            if best is None or check.gap - check.bound < best[0]:
                best = (check.gap - check.bound, w, v)
            return check.gap <= check.bound

        degenerate = self._degenerate()
        if degenerate is not None and consider(*degenerate):
            return degenerate  # the first pair considered: best holds exactly it
        lo, hi = 0.0, 1.0 / r  # ‖g_w‖ ≤ max_i ‖g_i‖ = 1, so ‖g_w(1/r)‖ ≤ r · (1/r)
        for step in range(_FALLBACK_STEPS):
            mu = hi if step == 0 else 0.5 * (lo + hi)
            shifted = g + mu * (np.outer(q, ones) + np.outer(ones, q)) + (mu * mu * n0)
            w = simplex_min_norm(shifted)
            self.faces += 1
            norm = math.sqrt(max(float(w @ g @ w), 0.0))
            if norm <= r * mu or step == 0:  # at μ = 1/r only round-off can exceed the bound
                hi = mu
                # d = g_0 + g_w/μ is feasible: the majorant's primal point.
                if consider(w, w / mu):
                    break
                polished = self.closed_form(w, w / mu)
                if polished is not None and consider(*polished):
                    break
            else:
                lo = mu
            if hi - lo <= 4.0 * EPS * hi:
                break
        if best is None:  # cannot happen: the first step (μ = 1/r) always considers its pair
            raise SolverError("cagrad: the fallback considered no candidate")
        return best[1], best[2]


def _swap(gp: np.ndarray, qp: np.ndarray, perm: np.ndarray, i: int, j: int) -> None:
    """Exchange positions i and j of the symmetrically permuted G, its right-hand sides and permutation."""
    if i == j:
        return
    # Basic indexing with a copy: a few times cheaper than fancy indexing at this size.
    for arr in (gp, qp):
        row = arr[i].copy()
        arr[i] = arr[j]
        arr[j] = row
    col = gp[:, i].copy()
    gp[:, i] = gp[:, j]
    gp[:, j] = col
    perm[i], perm[j] = perm[j], perm[i]


def _stop_root(qa: float, qb: float, qc: float) -> float | None:
    """The larger root of qa ν² − 2 qb ν + qc = 0 (qa > 0), computed without cancellation."""
    if not (qa > 0.0 and math.isfinite(qa) and math.isfinite(qb) and math.isfinite(qc)):
        return None
    disc = max(qb * qb - qa * qc, 0.0)
    root = math.sqrt(disc)
    if qb >= 0.0:
        return (qb + root) / qa
    # qb + root cancels when qb < 0: use the product of the roots, qc/qa.
    denom = qb - root
    return qc / denom if denom != 0.0 else 0.0
