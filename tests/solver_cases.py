"""Random Jacobian cases and independent references for the solver tests.

Nothing here imports gradsurgery: the brute force below works on J (d-space least squares on each face),
not on the Gram-matrix KKT system the solvers' polish uses.
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

KINDS = (
    "random",
    "conflicting",
    "collinear",
    "duplicated",
    "zero_rows",
    "all_zero",
    "wide",  # T > d, so G is singular
    "scaled",  # one task ×1e-3
    "opposite",  # g and −g both present: u* = 0
    "near_duplicate",
)

# Backend agreement on the fused vector u = Jᵀw (see fused_gap): the cvxpy reference is an interior-point
# solver, 1e-5 is its contract. Exact methods (closed forms, the polished iterative solvers, brute force)
# must agree much more closely.
AGREEMENT_RTOL = 1e-5
EXACT_RTOL = 1e-8


def hypothesis_settings(max_examples: int):
    """Deterministic (derandomized) hypothesis runs: the same examples on every machine and run."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


def make_jacobian(kind: str, num_tasks: int, dim: int, seed: int) -> np.ndarray:
    """A T×d Jacobian of the given structural kind, deterministic in seed."""
    rng = np.random.default_rng(seed)
    t, d = num_tasks, dim
    j = rng.standard_normal((t, d))
    if kind == "conflicting":
        # Two camps pulling in opposite directions along b, so most pairs have ⟨g_i, g_k⟩ < 0.
        b = rng.standard_normal(d)
        signs = np.where(np.arange(t) % 2 == 0, 1.0, -1.0)
        j = 3.0 * signs[:, None] * b[None, :] + 0.5 * rng.standard_normal((t, d))
    elif kind == "collinear":
        b = rng.standard_normal(d)
        j = rng.uniform(-2.0, 2.0, size=t)[:, None] * b[None, :]
        if t > 2:
            j[-1] = rng.standard_normal(d)
    elif kind == "duplicated":
        src = rng.integers(0, max(1, t // 2), size=t)
        j = j[src]
    elif kind == "zero_rows":
        j[rng.random(t) < 0.4] = 0.0
    elif kind == "all_zero":
        j[:] = 0.0
    elif kind == "wide":
        j = rng.standard_normal((t, max(1, min(d, t // 2))))
    elif kind == "scaled":
        j[rng.integers(0, t)] *= 1e-3
    elif kind == "opposite":
        if t >= 2:
            j[1] = -rng.uniform(0.5, 2.0) * j[0]
    elif kind == "near_duplicate":
        j[-1] = j[0] + 1e-9 * rng.standard_normal(j.shape[1])
    return j


@st.composite
def jacobians(draw, min_tasks: int = 1, max_tasks: int = 8):
    """Hypothesis strategy: a structured random Jacobian (kind, T, d, seed drawn by hypothesis)."""
    kind = draw(st.sampled_from(KINDS))
    t = draw(st.integers(min_tasks, max_tasks))
    d = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    return make_jacobian(kind, t, d, seed)


@st.composite
def integer_jacobians(draw, min_tasks: int = 1, max_tasks: int = 6):
    """Hypothesis strategy: small-integer Jacobians (shrinking drives them to ties, zeros, duplicates)."""
    t = draw(st.integers(min_tasks, max_tasks))
    d = draw(st.integers(1, 5))
    vals = draw(st.lists(st.integers(-3, 3), min_size=t * d, max_size=t * d))
    return np.array(vals, dtype=np.float64).reshape(t, d)


def seeded_cases(count: int, min_tasks: int = 1, max_tasks: int = 8, seed: int = 0):
    """Deterministic (kind, J) pairs cycling through every kind."""
    rng = np.random.default_rng(seed)
    out = []
    for n in range(count):
        kind = KINDS[n % len(KINDS)]
        t = int(rng.integers(min_tasks, max_tasks + 1))
        d = int(rng.integers(1, 13)) if kind != "wide" else 6
        out.append((kind, make_jacobian(kind, t, d, int(rng.integers(2**32)))))
    return out


def fused_gap(jac: np.ndarray, w_a: np.ndarray, w_b: np.ndarray) -> float:
    """‖u_a − u_b‖ / max(‖u_b‖, max_i ‖g_i‖) with u = Jᵀw: the agreement measure. The second term of the
    denominator covers u* = 0, where a relative error in u is meaningless; 0/0 (J = 0) counts as 0."""
    u_a, u_b = jac.T @ w_a, jac.T @ w_b
    denom = max(np.linalg.norm(u_b), np.linalg.norm(jac, axis=1).max(initial=0.0))
    diff = np.linalg.norm(u_a - u_b)
    return 0.0 if diff == 0.0 else diff / denom


def assert_fused_close(jac, w_a, w_b, rtol: float = AGREEMENT_RTOL, label: str = "") -> None:
    gap = fused_gap(jac, np.asarray(w_a), np.asarray(w_b))
    assert gap <= rtol, f"{label}: fused vectors differ by {gap:.3g} (relative) > {rtol:g}\nJ={jac!r}"


def brute_force(jac: np.ndarray, main, lower=None) -> np.ndarray:
    """min ‖Jᵀx‖² s.t. Σ_{i∈main} x_i = 1, x_i ≥ lower_i (lower = 0 by default), by enumerating faces.

    On a face, main tasks outside the free set S sit at their bound, auxiliaries outside A are 0, and the
    free weights solve an unconstrained least-squares problem in d-space after eliminating the sum
    constraint through the first index of S. Some optimum is a basic point of some face (free columns
    linearly independent), where lstsq's answer is the unique one, so the best feasible face answer is
    optimal. Exponential in T: small T only.
    """
    t = jac.shape[0]
    main = list(main)
    aux = [i for i in range(t) if i not in main]
    lower = np.zeros(t) if lower is None else np.asarray(lower, dtype=np.float64)
    best, best_val = None, np.inf
    for s in _subsets(main, nonempty=True):
        for a in _subsets(aux, nonempty=False):
            x = _face_solution(jac, main, s, a, lower)
            if x is None:
                continue
            val = float(np.sum((jac.T @ x) ** 2))
            if best is None or val < best_val - 1e-15 * max(1.0, best_val):
                best, best_val = x, val
    assert best is not None, "brute force found no feasible face"
    return best


def exact_min_norm(jac: np.ndarray, main=None) -> np.ndarray:
    """The min-norm weights in exact rational arithmetic, for problems where float64 brute force is not
    precise enough (‖u*‖ many orders below max ‖g_i‖, gradients collinear to within round-off): min ‖Jᵀw‖²
    s.t. Σ_{i∈main} w_i = 1, w ≥ 0 (``main`` None: every task, MGDA's α*). G from J's float64 entries
    taken exactly; for every support S with a main task, the face's KKT system G_SS y_S = ν e_{S∩main},
    Σ_{S∩main} y_i = 1 solved exactly; the answer is the y ≥ 0 with (Gy)_i ≥ ν on the mains and (Gy)_j ≥ 0
    on the auxiliaries (the optimality conditions; unique u* on full-rank G). Exponential in T, O(T² d)
    fractions for G."""
    t = jac.shape[0]
    mains = set(range(t)) if main is None else set(main)
    rows = [[Fraction(float(v)) for v in row] for row in jac]
    g = [
        [sum((a * b for a, b in zip(rows[i], rows[j], strict=True)), Fraction(0)) for j in range(t)]
        for i in range(t)
    ]
    for r in range(1, t + 1):
        for s in itertools.combinations(range(t), r):
            e = [Fraction(int(i in mains)) for i in s]
            if not any(e):
                continue
            # [[G_SS, −e], [eᵀ, 0]] [y_S; ν] = [0; 1]
            bordered = [[g[i][j] for j in s] + [-e[k]] for k, i in enumerate(s)] + [e + [Fraction(0)]]
            x = _exact_solve(bordered, [Fraction(0)] * r + [Fraction(1)])
            if x is None or min(x[:r]) < 0:
                continue
            y = [Fraction(0)] * t
            for k, i in enumerate(s):
                y[i] = x[k]
            nu = x[r]
            gy = [sum(g[i][j] * y[j] for j in range(t)) for i in range(t)]
            if all(gy[i] >= (nu if i in mains else 0) for i in range(t)):
                return np.array([float(v) for v in y])
    raise AssertionError("no support satisfies the optimality conditions")


def _exact_solve(a: list, b: list) -> list | None:
    """Gauss-Jordan elimination over fractions; None when a is singular."""
    n = len(a)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for c in range(n):
        pivot = next((r for r in range(c, n) if m[r][c] != 0), None)
        if pivot is None:
            return None
        m[c], m[pivot] = m[pivot], m[c]
        for r in range(n):
            if r != c and m[r][c] != 0:
                f = m[r][c] / m[c][c]
                m[r] = [u - f * v for u, v in zip(m[r], m[c], strict=True)]
    return [m[i][n] / m[i][i] for i in range(n)]


def _subsets(items, nonempty: bool):
    start = 1 if nonempty else 0
    for r in range(start, len(items) + 1):
        yield from itertools.combinations(items, r)


def _face_solution(jac, main, s, a, lower):
    x = lower.copy()
    fixed = [i for i in main if i not in s]
    budget = 1.0 - lower[fixed].sum()
    s0, rest = s[0], list(s[1:])
    # x_{s0} = budget − Σ_{rest} x_i, so u = base + Σ_{rest} x_i (g_i − g_{s0}) + Σ_A λ_j g_j.
    base = jac[fixed].T @ lower[fixed] + budget * jac[s0]
    cols = [jac[i] - jac[s0] for i in rest] + [jac[j] for j in a]
    if cols:
        z = np.linalg.lstsq(np.stack(cols, axis=1), -base, rcond=None)[0]
        x[rest] = z[: len(rest)]
        x[list(a)] = z[len(rest) :]
    x[s0] = budget - x[rest].sum() if rest else budget
    if np.any(x[list(s)] < lower[list(s)] - 1e-12) or np.any(x[list(a)] < -1e-12):
        return None
    return x


def fused(jac: np.ndarray, w) -> np.ndarray:
    return jac.T @ np.asarray(w, dtype=np.float64)


def inner_products(jac: np.ndarray, w) -> np.ndarray:
    """⟨u, g_i⟩ for every task, computed in d-space (not through G)."""
    return jac @ fused(jac, w)


def kkt_tol(jac: np.ndarray) -> float:
    """Absolute tolerance for inner products ⟨u, g_i⟩: 1e-9 of the largest ‖g_i‖² (at least tiny)."""
    return 1e-9 * max(float(np.max(np.sum(jac * jac, axis=1), initial=0.0)), 1e-300)
