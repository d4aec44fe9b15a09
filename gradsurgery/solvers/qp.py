"""Reference QP backend (cvxpy + Clarabel) for the min-norm problems on the Gram matrix.

Each class builds its cvxpy problem once, DPP-compliant, with the objective ‖F x‖² where F is a T×T
Parameter with FᵀF = G (so ‖F x‖² = xᵀGx = ‖Jᵀx‖²); ``solve(G)`` only sets F and re-solves, so cvxpy
reuses its compiled problem. F comes from the eigendecomposition of G (not a Cholesky factor) because G is
often singular: duplicated, collinear or zero task gradients, or T > d. Clarabel works in per-task units
where every task gradient has the same norm (``_MinNormQP``), with round-off negative curvature removed
(``psd_projection``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ..errors import SolverError
from .closed_form import (
    check_gram,
    check_main_indices,
    check_min_weights,
    check_task_index,
    gram_factor,
    psd_projection,
)

# Clarabel's defaults (gap 1e-8) leave u = Jᵀx off by up to ~1e-4·max‖g_i‖ when u* ≈ 0, because
# ‖u − u*‖² ≤ f(x) − f*: the objective gap must be near 1e-12 of max‖g_i‖² for the 1e-5 agreement with the
# iterative solvers. Shorter interior-point steps (max_step_fraction 0.9 instead of 0.99) let Clarabel reach
# that on the degenerate (collinear, duplicated, T > d) problems where it otherwise stalls. Every attempt
# starts from a fresh Clarabel workspace: a warm start carries scalings from the previous solves, so the
# answer would depend on the history and a run resumed from a checkpoint would not continue bit-identically.
_TIGHT = {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12, "max_iter": 400}
CLARABEL_ATTEMPTS = (  # Clarabel settings, tried in turn
    {**_TIGHT, "max_step_fraction": 0.9},
    {**_TIGHT, "max_step_fraction": 0.5},
    {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10, "max_iter": 400},
)
# For a result Clarabel flags as inaccurate: the largest optimality residual (G scaled to max diag 1) that
# still bounds the error of u by about 1e-5·max‖g_i‖.
INACCURATE_KKT_LIMIT = 1e-10


class _MinNormQP:
    """min xᵀGx s.t. Σ_{i∈main} x_i = 1, x ≥ lower, built once; subclasses choose main and lower.

    Clarabel solves it in per-task units, y_i = x_i / m_i with m_i = r / ‖g_i‖ (m_i = 1 where g_i = 0) and r
    the smallest non-zero main ‖g_i‖:

        min ‖F y‖²  s.t.  Σ_{i∈main} m_i y_i = 1,  y ≥ lower / m,  FᵀF = M G M / r²  (unit diagonal).

    Every optimum has ‖u*‖ ≤ r without lower bounds (a main vertex is feasible), so the objective is at most
    1 and Clarabel's tolerances are relative to the scale of the answer, whatever the tasks' relative
    scales. In plain units a task 1e-4 times smaller than another (a click loss beside a watch-time MSE)
    puts the whole answer at 1e-8 of the largest entry of G, where those tolerances mean nothing: its
    answers came back 'optimal_inaccurate', or MGDA's fused vector was off by 1e-3 of its own norm.
    """

    problem_name = "min-norm QP"

    def __init__(self, num_tasks: int, main: np.ndarray) -> None:
        import cvxpy as cp  # loaded by the first QP built: it takes half a second to import

        self.num_tasks = num_tasks
        self._main = main
        self._x = cp.Variable(num_tasks, name="scaled_weights")
        self._factor = cp.Parameter((num_tasks, num_tasks), name="gram_factor")
        self._main_scale = cp.Parameter(main.size, nonneg=True, name="main_scale")
        self._floor = cp.Parameter(num_tasks, name="scaled_lower")
        self._factor.value = np.zeros((num_tasks, num_tasks))
        self._main_scale.value = np.ones(main.size)
        self._floor.value = np.zeros(num_tasks)
        constraints = [cp.sum(cp.multiply(self._main_scale, self._x[main])) == 1, self._x >= self._floor]
        objective = cp.Minimize(cp.sum_squares(self._factor @ self._x))
        self.problem = cp.Problem(objective, constraints)

    def _lower(self) -> np.ndarray:
        return np.zeros(self.num_tasks)

    def solve(self, gram: ArrayLike) -> np.ndarray:
        """The optimal weights for this Gram matrix (see the class docstring for the problem)."""
        g = check_gram(gram)
        if g.shape != (self.num_tasks, self.num_tasks):
            raise ValueError(
                f"{self.problem_name} was built for {self.num_tasks} tasks, got G of shape {g.shape}"
            )
        diag = np.diag(g)
        if float(diag.max()) <= 0.0:
            # G = 0: every feasible point is optimal. Return the iterative solvers' canonical one (budget
            # spread evenly over the main tasks, auxiliaries 0), not wherever the interior point stops.
            return self._project(np.zeros(self.num_tasks))
        failures = []
        for per_task in (True, False):
            self._set_units(g, diag, per_task)
            for options in CLARABEL_ATTEMPTS:
                attempt = self._attempt(g, options)  # (x, None) or (None, why)
                if attempt[1] is None:
                    return self._drop_null_auxiliaries(diag, attempt[0])
                failures.append(attempt[1])
        raise SolverError(f"{self.problem_name}: Clarabel failed: " + "; then ".join(failures))

    def _set_units(self, g: np.ndarray, diag: np.ndarray, per_task: bool) -> None:
        """Set F, the main-constraint coefficients and the bounds for the units of the class docstring
        (``per_task``), or for the fallback that leaves the main weights in plain units (m_i = 1 on the
        mains, r the largest main ‖g_i‖; auxiliaries still per task): with lower bounds on tasks 1e8 times
        apart in norm, the per-task bounds c_i‖g_i‖/r reach 1e7 and Clarabel may report the problem
        infeasible."""
        norms = np.sqrt(np.maximum(diag, 0.0))
        main_norms = norms[self._main]
        if not np.any(main_norms > 0.0):
            r = float(norms.max())
        else:
            r = float(main_norms[main_norms > 0.0].min() if per_task else main_norms.max())
        unit = np.where(norms > 0.0, r / np.where(norms > 0.0, norms, 1.0), 1.0)
        if not per_task:
            unit[self._main] = 1.0
        self._unit, self._r2 = unit, r * r
        # The round-off projection comes after the rescaling: an eigendecomposition's error is relative to
        # the largest entry, which would otherwise swamp the small tasks.
        self._factor.value = gram_factor(psd_projection(g * np.outer(unit, unit) / self._r2))
        self._main_scale.value = unit[self._main]
        self._floor.value = self._lower() / unit

    def _drop_null_auxiliaries(self, diag: np.ndarray, x: np.ndarray) -> np.ndarray:
        """An auxiliary with g_j = 0 leaves u unchanged for any λ_j, and the interior point leaves λ_j at an
        arbitrary positive value; report 0 for it, as the iterative solvers do."""
        aux = np.setdiff1d(np.arange(self.num_tasks), self._main)
        x[aux[diag[aux] <= 0.0]] = 0.0
        return x

    def _attempt(self, g: np.ndarray, options: dict[str, Any]) -> tuple[np.ndarray, None] | tuple[None, str]:
        """One Clarabel solve: (weights, None), or (None, why it is not acceptable)."""
        import cvxpy as cp

        try:
            with warnings.catch_warnings():
                # cvxpy warns on an inaccurate solution; that case is judged below by its KKT residual.
                warnings.simplefilter("ignore", UserWarning)
                self.problem.solve(solver=cp.CLARABEL, warm_start=False, **options)
        except cp.error.SolverError as exc:
            return None, f"solver error ({exc})"
        status, y = self.problem.status, self._x.value
        if status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
            return None, f"status {status!r}"
        if y is None or not np.all(np.isfinite(y)):
            return None, f"status {status!r} with weights {y!r}"
        x = self._project(self._unit * np.asarray(y, dtype=np.float64))
        if status == cp.OPTIMAL_INACCURATE:
            # Judged in the units Clarabel worked in: G/r², and ⟨u, g_j⟩ per unit of ‖g_j‖ for auxiliaries.
            resid = kkt_residual(g / self._r2, x, self._main, self._lower(), aux_scale=self._unit)
            if not resid <= INACCURATE_KKT_LIMIT:
                return None, f"status {status!r} with KKT residual {resid:.3g} > {INACCURATE_KKT_LIMIT:g}"
        return x, None

    def _project(self, x: np.ndarray) -> np.ndarray:
        """Remove the interior-point solver's feasibility round-off (~tol_feas): bounds hold exactly and the
        main weights sum to exactly one."""
        lower = self._lower()
        x = np.maximum(x, lower)
        m = self._main
        budget = 1.0 - float(lower[m].sum())
        excess = x[m] - lower[m]
        total = float(excess.sum())
        if budget <= 0.0 or total <= 0.0:
            x[m] = lower[m] if budget <= 0.0 else lower[m] + budget / m.size
        else:
            x[m] = lower[m] + budget * excess / total
        return x


def kkt_residual(
    gram: np.ndarray, x: np.ndarray, main: np.ndarray, lower: np.ndarray, aux_scale: np.ndarray | None = None
) -> float:
    """Largest violation of the optimality conditions of min xᵀGx s.t. Σ_main x = 1, x ≥ lower:
    the Frank-Wolfe gap of the main block, and ⟨u, g_j⟩ ≥ 0 with λ_j⟨u, g_j⟩ = 0 on the others
    (⟨u, g_j⟩ multiplied by ``aux_scale[j]`` in the first of these, if given)."""
    v = gram @ x
    aux = np.setdiff1d(np.arange(x.size), main)
    budget = 1.0 - float(lower[main].sum())
    gap = float(x[main] @ v[main]) - float(lower[main] @ v[main]) - budget * float(v[main].min())
    viol = [gap]
    if aux.size:
        scale = np.ones(aux.size) if aux_scale is None else np.asarray(aux_scale)[aux]
        viol += [float(np.max(-v[aux] * scale)), float(np.max(np.abs(x[aux] * v[aux])))]
    return max(viol)


class SimplexQP(_MinNormQP):
    """MGDA (Sener & Koltun 2018) and, with ``min_weights`` c, PE-LTR (Lin et al. 2019):
    min αᵀGα s.t. Σα = 1, α ≥ c. c enters through a cvxpy Parameter; ``min_weights`` can be reassigned."""

    problem_name = "SimplexQP"

    def __init__(self, num_tasks: int, min_weights: Sequence[float] | None = None) -> None:
        t = check_task_count(num_tasks)
        super().__init__(t, np.arange(t))
        self.min_weights = np.zeros(t) if min_weights is None else min_weights

    @property
    def min_weights(self) -> np.ndarray:
        return self._bounds.copy()

    @min_weights.setter
    def min_weights(self, value: ArrayLike) -> None:
        self._bounds = check_min_weights(value, self.num_tasks)

    def _lower(self) -> np.ndarray:
        return self._bounds


class MainAuxQP(_MinNormQP):
    """Main/auxiliary (``docs/maths.md``): min ‖g_main + Σ λ_j g_j‖² over λ ≥ 0; weights[main] = 1."""

    problem_name = "MainAuxQP"

    def __init__(self, num_tasks: int, main: int) -> None:
        t = check_task_count(num_tasks)
        self.main = check_task_index(main, t)
        super().__init__(t, np.array([self.main]))


class MixedQP(_MinNormQP):
    """Mixed n main + m auxiliary (``docs/maths.md``): min ‖Σ_main α_i g_i + Σ_aux λ_j g_j‖² over
    α ∈ Δ^n, λ ≥ 0."""

    problem_name = "MixedQP"

    def __init__(self, num_tasks: int, main: Sequence[int]) -> None:
        t = check_task_count(num_tasks)
        self.main = [int(m) for m in check_main_indices(main, t)]
        super().__init__(t, np.array(self.main))


def check_task_count(num_tasks: Any) -> int:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int | np.integer) or num_tasks < 1:
        raise ValueError(f"num_tasks must be an int ≥ 1, got {num_tasks!r}")
    return int(num_tasks)
