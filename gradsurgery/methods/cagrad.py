"""CAGrad: Conflict-Averse Gradient descent (Liu, Liu, Jin, Stone & Liu, NeurIPS 2021).

The update maximises the worst task improvement within a ball around the average gradient g_0 = (1/T) Σ g_i:

    max_d min_i ⟨g_i, d⟩   s.t.   ‖d − g_0‖ ≤ c ‖g_0‖.

Its dual (the paper's Algorithm 1) is a convex problem over the probability simplex Δ,

    w* = argmin_{w ∈ Δ}  g_wᵀ g_0 + √φ ‖g_w‖,     g_w = Σ_i w_i g_i,   φ = c² ‖g_0‖²,

and the update is d = g_0 + (√φ / ‖g_w*‖) g_w*. Everything is a function of the Gram matrix G:
g_wᵀ g_0 = wᵀ G 1/T, ‖g_w‖² = wᵀ G w, ‖g_0‖² = 1ᵀ G 1 / T². The weights on the raw gradients are
therefore w_i = 1/T + (√φ / ‖g_w*‖) w*_i.

Scale. ``rescale=True`` (the default) divides d by 1 + c², as the authors' released code does by default
(``rescale=1``); Algorithm 1 in the paper has no such factor, which ``rescale=False`` reproduces. Either way
c = 0 gives d = g_0, the plain mean of the task gradients ("sum" divided by T); the released code then
multiplies by T to match the summed loss, which this implementation does not (use a T times larger learning
rate to compare with it).

Solver. ``solver="active_set"`` (the default) solves the dual exactly on G (``solvers.cagrad``: an active set
over supports, each face in closed form, every answer certified by its duality gap against a feasible
primal point, with a bisection on MGDA solves as the fallback; ≤ 0.2 ms for T ≤ 10). ``solver="slsqp"`` is
the authors' approach: SciPy's SLSQP on G/trace(G) from the uniform weights with the analytic gradient
∇F = G 1/T + √φ G w / ‖g_w‖, then the optimality conditions solved exactly on the support it found
(``_polish``; SLSQP alone leaves errors near 1e-5 on this flat objective); a few milliseconds. The tests check
both against a brute-force grid of the dual (T = 2, 3) and an SOCP of the primal on the explicit vectors.

Degenerate case. If the dual optimum has g_w* = 0 (zero lies on the boundary of the convex hull of the
gradients, or c ≥ 1 and zero lies in the hull) the paper's d is 0/0: the primal has many solutions, all with
worst-case improvement 0. The step then falls back to d = g_0 (before rescaling) rather than dividing solver
noise by a tiny norm, which is what the released code's ``c / (‖g_w‖ + 1e-8)`` amounts to.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .._validation import check_bool, check_number
from ..errors import SolverError
from ..solvers.cagrad import cagrad_weights
from .base import Method, check_solver, gram_to_numpy, require_gram

# ‖g_w*‖ below this fraction of the largest gradient norm counts as the degenerate case g_w* = 0: SLSQP's
# weights are accurate to about 1e-8, so a direction computed from a smaller vector would be noise.
_DEGENERATE = 1e-6


def cagrad_objective(gram: np.ndarray, w: np.ndarray, c: float) -> float:
    """F(w) = wᵀ G 1/T + c ‖g_0‖ ‖g_w‖ on any Gram matrix (used by the solver and the tests)."""
    t = gram.shape[0]
    mean = np.full(t, 1.0 / t)
    g0_norm = math.sqrt(max(float(mean @ gram @ mean), 0.0))
    return float(w @ gram @ mean) + c * g0_norm * math.sqrt(max(float(w @ gram @ w), 0.0))


def cagrad_dual(gram: np.ndarray, c: float) -> np.ndarray:
    """argmin_{w ∈ Δ} F(w) for a PSD Gram matrix (T ≥ 1); returns the simplex weights w*."""
    from scipy.optimize import minimize

    t = gram.shape[0]
    mean = np.full(t, 1.0 / t)
    scale = float(np.trace(gram))
    if t == 1 or scale <= 0.0:
        return mean
    g = gram / scale
    q = g @ mean
    radius = c * math.sqrt(max(float(mean @ q), 0.0))
    if radius == 0.0:
        return mean

    def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
        gw = g @ w
        norm = math.sqrt(max(float(w @ gw), 1e-300))
        return float(q @ w) + radius * norm, q + radius * gw / norm

    result = minimize(
        fun,
        mean,
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * t,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}],
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    w = np.clip(np.nan_to_num(result.x, nan=0.0), 0.0, None)
    total = w.sum()
    if not total > 0.0:
        return mean
    w = w / total
    polished = _polish(g, q, radius, w)
    # The polished point satisfies the optimality conditions exactly; the objective, flat at the optimum,
    # cannot tell the two apart beyond rounding, so it only guards against a gross mistake.
    if polished is not None and fun(polished)[0] <= fun(w)[0] + 1e-12 * (1.0 + abs(fun(w)[0])):
        w = polished
    # SLSQP may stop early (iteration limit, line-search trouble) without a usable point; the uniform start
    # is feasible, so never return something worse than it.
    return w if fun(w)[0] <= fun(mean)[0] else mean


def _polish(g: np.ndarray, q: np.ndarray, radius: float, w: np.ndarray) -> np.ndarray | None:
    """Solve the optimality conditions exactly on the support S that SLSQP found.

    With v = radius · w / ‖g_w‖ the KKT conditions read q_S + G_SS v_S = ν 1, v_Sᵀ G_SS v_S = radius² and
    q_i + (G v)_i ≥ ν off S. So v_S = ν a − b with a = G_SS⁻¹ 1, b = G_SS⁻¹ q_S, and ν is the larger root of
    (1ᵀa) ν² − 2 (1ᵀb) ν + q_Sᵀb − radius² = 0 (the one with Σ v > 0). SLSQP's ~1e-8 objective accuracy
    leaves the weights with errors near 1e-5 on this flat objective; the exact solve removes them. Returns
    None when the conditions fail (wrong support, singular G_SS): SLSQP's point is then kept.
    """
    support = np.flatnonzero(w > 1e-7)
    try:
        a = np.linalg.solve(g[np.ix_(support, support)], np.ones(support.size))
        b = np.linalg.solve(g[np.ix_(support, support)], q[support])
    except np.linalg.LinAlgError:
        return None
    qa, qb, qc = a.sum(), b.sum(), q[support] @ b - radius**2
    disc = qb * qb - qa * qc
    if not (qa > 0 and disc >= 0):
        return None
    nu = (qb + np.sqrt(disc)) / qa
    v = np.zeros_like(w)
    v[support] = nu * a - b
    if not (np.all(v[support] > 0) and np.all(np.isfinite(v))):
        return None
    if np.any(q + g @ v < nu - 1e-9 * (abs(nu) + radius**2)):
        return None
    polished: np.ndarray = v / v.sum()
    return polished


def _fused_weights(g: np.ndarray, w: np.ndarray, c: float) -> np.ndarray:
    """The update's weights on the raw gradients, 1/T + c‖g_0‖ w/‖g_w‖ (the mean when g_w ≈ 0)."""
    t = g.shape[0]
    weights = np.full(t, 1.0 / t)
    gw_norm = math.sqrt(max(float(w @ g @ w), 0.0))
    g0_norm = math.sqrt(max(float(weights @ g @ weights), 0.0))
    largest = math.sqrt(max(float(np.diag(g).max()), 0.0))
    if gw_norm > _DEGENERATE * largest:
        weights = weights + (c * g0_norm / gw_norm) * w
    return weights


class CAGrad(Method):
    """Conflict-Averse Gradient descent; ``c`` ≥ 0 sets the radius of the ball around the mean gradient."""

    name = "cagrad"

    interchangeable_options = ("solver",)
    skips_absent_tasks = True

    def __init__(self, *, c: float = 0.5, rescale: bool = True, solver: str = "active_set") -> None:
        super().__init__()
        self.c = check_number(c, "c", minimum=0.0)
        self.rescale = check_bool(rescale, "rescale")
        self.solver = check_solver(solver, ("active_set", "slsqp"), self.name)

    def compute_weights(self, gram: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        gram = require_gram(gram, self.name)
        g = gram_to_numpy(gram)
        if self.solver == "active_set":
            solution = cagrad_weights(g, self.c)
            if not solution.certified:
                raise SolverError(
                    f"cagrad: the dual solution could not be certified (duality gap {solution.gap:.3g})"
                )
            weights = solution.fused
        else:
            weights = _fused_weights(g, cagrad_dual(g, self.c), self.c)
        if self.rescale:
            weights = weights / (1.0 + self.c**2)
        return torch.from_numpy(weights)
