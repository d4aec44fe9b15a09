"""Reference QP backend (cvxpy + Clarabel) for the min-norm problems on the Gram matrix.

Each class builds its cvxpy problem once, DPP-compliant, with the objective ‖F x‖² where F is a T×T
Parameter with FᵀF = G (so ‖F x‖² = xᵀGx = ‖Jᵀx‖²); ``solve(G)`` only sets F and re-solves, so cvxpy
reuses its compiled problem. F comes from the eigendecomposition of G (not a Cholesky factor) because G is
often singular: duplicated, collinear or zero task gradients, or T > d. Like the iterative solvers, the QP
sees G scaled to a unit largest diagonal and with round-off negative curvature removed
(``psd_projection``); auxiliary coefficients are solved for in units of 1/‖g_j‖.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import cvxpy as cp
import numpy as np

from ..errors import SolverError
from .closed_form import check_gram, check_main_indices, check_min_weights, check_task_index, psd_projection

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


def gram_factor(gram: np.ndarray) -> np.ndarray:
    """F = diag(√e) Vᵀ from G = V diag(e) Vᵀ, negative round-off eigenvalues clipped to 0: FᵀF = G."""
    e, v = np.linalg.eigh(gram)
    return np.sqrt(np.maximum(e, 0.0))[:, None] * v.T


class _MinNormQP:
    """min ‖F x‖² s.t. Σ_{i∈main} x_i = 1, x ≥ lower, built once; subclasses choose main and lower."""

    problem_name = "min-norm QP"

    def __init__(self, num_tasks: int, main: np.ndarray, lower: np.ndarray | cp.Parameter) -> None:
        self.num_tasks = num_tasks
        self._main = main
        self._x = cp.Variable(num_tasks, name="weights")
        self._factor = cp.Parameter((num_tasks, num_tasks), name="gram_factor")
        self._factor.value = np.zeros((num_tasks, num_tasks))
        constraints = [cp.sum(self._x[main]) == 1, self._x >= lower]
        objective = cp.Minimize(cp.sum_squares(self._factor @ self._x))
        self.problem = cp.Problem(objective, constraints)

    def _lower(self) -> np.ndarray:
        return np.zeros(self.num_tasks)

    def solve(self, gram) -> np.ndarray:
        """The optimal weights for this Gram matrix (see the class docstring for the problem)."""
        g = check_gram(gram)
        if g.shape != (self.num_tasks, self.num_tasks):
            raise ValueError(
                f"{self.problem_name} was built for {self.num_tasks} tasks, got G of shape {g.shape}"
            )
        diag = np.diag(g)
        main_scale = float(diag[self._main].max())
        scale = main_scale if main_scale > 0.0 else float(diag.max())
        if scale <= 0.0:
            # G = 0: every feasible point is optimal. Return the iterative solvers' canonical one (budget
            # spread evenly over the main tasks, auxiliaries 0), not wherever the interior point stops.
            return self._project(np.zeros(self.num_tasks))
        # The optimal weights are invariant to G → G/s. s is the largest main ‖g_i‖², not the largest
        # diagonal entry: with the auxiliaries rescaled to unit diagonal (``_variable_scale``) every entry of
        # Clarabel's matrix is then at most 1 and the objective of order one, whatever the tasks' scales.
        # Scaling by the largest diagonal put a main block 1e-9 times smaller than an auxiliary (click and
        # conversion beside a watch-time MSE) at the level of Clarabel's absolute tolerances, and its answers
        # came back 'optimal_inaccurate'. The round-off projection comes after the rescaling for the same
        # reason: an eigendecomposition's error is relative to the largest entry.
        gn = g / scale
        self._unit = self._variable_scale(gn)
        gs = psd_projection(gn * np.outer(self._unit, self._unit))
        self._factor.value = gram_factor(gs)
        failures = []
        for options in CLARABEL_ATTEMPTS:
            x, why = self._attempt(gs, options)
            if why is None:
                return self._drop_null_auxiliaries(gn, x)
            failures.append(why)
        raise SolverError(f"{self.problem_name}: Clarabel failed: " + "; then ".join(failures))

    def _variable_scale(self, gn: np.ndarray) -> np.ndarray:
        """Solve for μ_j = ‖g_j‖ λ_j instead of λ_j on the auxiliaries (x = D μ, G → DGD): an auxiliary
        1e-8 times smaller than the main task needs λ_j ~ 1e8, far outside the range where Clarabel's
        absolute tolerances mean anything; μ_j is of the order of ‖g_main‖ instead. Main weights stay on
        the simplex unscaled."""
        unit = np.ones(self.num_tasks)
        aux = np.setdiff1d(np.arange(self.num_tasks), self._main)
        diag = np.diag(gn)[aux]
        unit[aux] = np.where(diag > 0.0, 1.0 / np.sqrt(np.where(diag > 0.0, diag, 1.0)), 1.0)
        return unit

    def _drop_null_auxiliaries(self, gn: np.ndarray, x: np.ndarray) -> np.ndarray:
        """An auxiliary with g_j = 0 leaves u unchanged for any λ_j, and the interior point leaves λ_j at an
        arbitrary positive value; report 0 for it, as the iterative solvers do."""
        aux = np.setdiff1d(np.arange(self.num_tasks), self._main)
        x[aux[np.diag(gn)[aux] <= 0.0]] = 0.0
        return x

    def _attempt(self, gs: np.ndarray, options: dict) -> tuple[np.ndarray | None, str | None]:
        """One Clarabel solve on the rescaled matrix ``gs``: (weights, None), or (None, why it is not
        acceptable)."""
        try:
            with warnings.catch_warnings():
                # cvxpy warns on an inaccurate solution; that case is judged below by its KKT residual.
                warnings.simplefilter("ignore", UserWarning)
                self.problem.solve(solver=cp.CLARABEL, warm_start=False, **options)
        except cp.error.SolverError as exc:
            return None, f"solver error ({exc})"
        status, x = self.problem.status, self._x.value
        if status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
            return None, f"status {status!r}"
        if x is None or not np.all(np.isfinite(x)):
            return None, f"status {status!r} with weights {x!r}"
        x = self._project(self._unit * np.asarray(x, dtype=np.float64))
        if status == cp.OPTIMAL_INACCURATE:
            # Judged on Clarabel's rescaled problem: there the conditions are relative to ‖g_main‖ and ‖g_j‖.
            resid = kkt_residual(gs, x / self._unit, self._main, self._lower())
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


def kkt_residual(gram: np.ndarray, x: np.ndarray, main: np.ndarray, lower: np.ndarray) -> float:
    """Largest violation of the optimality conditions of min xᵀGx s.t. Σ_main x = 1, x ≥ lower:
    the Frank-Wolfe gap of the main block, and ⟨u, g_j⟩ ≥ 0 with λ_j⟨u, g_j⟩ = 0 on the others."""
    v = gram @ x
    aux = np.setdiff1d(np.arange(x.size), main)
    budget = 1.0 - float(lower[main].sum())
    gap = float(x[main] @ v[main]) - float(lower[main] @ v[main]) - budget * float(v[main].min())
    viol = [gap]
    if aux.size:
        viol += [float(np.max(-v[aux])), float(np.max(np.abs(x[aux] * v[aux])))]
    return max(viol)


class SimplexQP(_MinNormQP):
    """MGDA (Sener & Koltun 2018) and, with ``min_weights`` c, PE-LTR (Lin et al. 2019):
    min αᵀGα s.t. Σα = 1, α ≥ c. c is a cvxpy Parameter; ``min_weights`` can be reassigned."""

    problem_name = "SimplexQP"

    def __init__(self, num_tasks: int, min_weights: Sequence[float] | None = None) -> None:
        t = check_task_count(num_tasks)
        self._bounds = cp.Parameter(t, nonneg=True, name="min_weights")
        super().__init__(t, np.arange(t), self._bounds)
        self.min_weights = np.zeros(t) if min_weights is None else min_weights

    @property
    def min_weights(self) -> np.ndarray:
        return self._bounds.value.copy()

    @min_weights.setter
    def min_weights(self, value) -> None:
        self._bounds.value = check_min_weights(value, self.num_tasks)

    def _lower(self) -> np.ndarray:
        return self._bounds.value


class MainAuxQP(_MinNormQP):
    """Main/auxiliary (DESIGN.md): min ‖g_main + Σ λ_j g_j‖² over λ ≥ 0; weights[main] = 1."""

    problem_name = "MainAuxQP"

    def __init__(self, num_tasks: int, main: int) -> None:
        t = check_task_count(num_tasks)
        self.main = check_task_index(main, t)
        super().__init__(t, np.array([self.main]), 0.0)


class MixedQP(_MinNormQP):
    """Mixed n main + m auxiliary (DESIGN.md): min ‖Σ_main α_i g_i + Σ_aux λ_j g_j‖², α ∈ Δ^n, λ ≥ 0."""

    problem_name = "MixedQP"

    def __init__(self, num_tasks: int, main: Sequence[int]) -> None:
        t = check_task_count(num_tasks)
        self.main = [int(m) for m in check_main_indices(main, t)]
        super().__init__(t, np.array(self.main), 0.0)


def check_task_count(num_tasks) -> int:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int | np.integer) or num_tasks < 1:
        raise ValueError(f"num_tasks must be an int ≥ 1, got {num_tasks!r}")
    return int(num_tasks)
