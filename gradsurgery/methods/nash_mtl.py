"""Nash-MTL: multi-task learning as a bargaining game (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik &
Fetaya, ICML 2022).

The update is the Nash bargaining solution among the tasks, u = argmax_{‖u‖ ≤ ε} Σ_i log ⟨u, g_i⟩. The
paper shows it is u = Σ_i α_i g_i with α > 0 solving

    G α = 1 / α      (elementwise: α_i (G α)_i = 1 for every i),

so ⟨u, g_i⟩ = 1/α_i and ‖u‖² = αᵀ G α = T: the step has norm √T whatever the gradients' scale, and a task
with a small gradient gets a large weight.

``solver="newton"`` (the default) solves the equation exactly: α is the unique minimiser of the strictly
convex potential ½ αᵀGα − Σ log α_i, found by damped Newton steps on the correlation matrix of the gradients
(``solvers.nash``: residual ≤ 1e-12, 3-8 T×T Cholesky solves, about 0.1 ms for T ≤ 10), warm started from
the previous step's weights.

``solver="cvxpy"`` follows the paper's Section 3.2 and the authors' code instead. With
φ_i(α) = log α_i + log (Gα)_i, the α sought minimises Σ_i φ_i(α) subject to φ_i(α) ≥ 0. The objective is
concave, so it is replaced by its linearisation at the current iterate α_τ (a convex-concave procedure);
following the authors' code the term Σ_i (Gα)_i is added:

    α_{τ+1} = argmin_{α ≥ 0}  (G 1 + ∇φ(α_τ))ᵀ α   s.t.  log α_i + log (Gα)_i ≥ 0,
    ∇φ(α_τ) = 1/α_τ + G (1 / Gα_τ),

for at most ``max_iter`` iterations, stopping early when max_i |α_i (Gα)_i − 1| < 1e-6 or when α stops
moving. The problem is built once with cvxpy Parameters (G and the linear coefficients; it is DPP, so it is
compiled once) and solved with Clarabel, which cvxpy installs (exponential cones; ECOS, which the authors
used, no longer ships with cvxpy). It is solved on Ĝ = G/‖G‖_F for conditioning; α = α̂/√‖G‖_F then solves
the original equation. The authors' code normalises G the same way but multiplies α by ‖G‖_F inside the
constraint (log(α_i‖G‖_F) + log((Ĝα)_i) ≥ 0), so their α is on the raw scale too: the same weights as here.
The iterates need not improve monotonically; the one with the smallest residual is kept.

Start point (the warm start): the previous step's α̂, else all ones, else the MGDA min-norm weights
(mixed with a little of the uniform ones so that every α_i > 0), the first one with Ĝα > 0 (the
linearisation needs log (Gα)). If even the min-norm point gives no positive improvement, some gradient is
zero or zero lies in the convex hull of the gradients (a Pareto-stationary point): then no direction
improves every task and the bargaining problem has no solution. Clarabel's own warm start is not used: it
makes the answer depend on the solve history, and a resumed run would not be bit-identical.

``update_every`` = k solves on every k-th step only and reuses the last weights in between. ``max_iter``
bounds each solve: Newton steps, or convex problems for ``"cvxpy"``.

A step with tasks absent (``"newton"`` only; ``Method.skips_absent_tasks``): the bargaining weights of the
present tasks, solved on their Gram block from their entries of the last weights (or those entries reused,
on a step ``update_every`` skips). The last weights and α̂ stay those of the last step with every task (the
start of the next one); the step counts towards ``update_every``.

Failures are never silent: when the solver raises, returns a non-optimal status, does not converge, or the
problem has no solution (above), a ``SolverFallbackWarning`` names the reason and the weights used instead
(this step's best completed iterate of the ``"cvxpy"`` sequence, else the previous step's weights, else all
ones: the plain sum), and the ``solver_failures`` counter (also in ``StepInfo.extras`` and the state dict)
goes up by one.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from .._validation import check_int
from ..errors import SolverError, SolverFallbackWarning
from ..solvers import simplex_min_norm
from ..solvers.nash import nash_bargaining_weights
from .base import Method, check_solver, gram_to_numpy, require_gram

_RESIDUAL_TOL = 1e-6
_STEP_TOL = 1e-9


class _NoSolution(Exception):
    """Raised inside a solve; the message says why, the fallback is chosen by the caller."""

    iterate: np.ndarray | None  # set by _solve: its best completed iterate (None before the first)


def nash_residual(gram: np.ndarray, alpha: np.ndarray) -> float:
    """max_i |α_i (Gα)_i − 1|: zero exactly at the Nash bargaining weights of G."""
    return float(np.abs(alpha * (gram @ alpha) - 1.0).max())


class NashMTL(Method):
    name = "nash_mtl"
    no_conflict = True  # ⟨u, g_i⟩ = 1/α_i > 0 wherever the bargaining problem has a solution
    scale_exponent = -1  # G α = 1/α: a common factor c on the gradients divides α by c
    task_scale_invariant = True  # g_i → d_i g_i gives α_i → α_i/d_i: u is unchanged
    interchangeable_options = ("solver",)
    skips_absent_tasks = True  # with the Newton solver: see __init__

    def __init__(self, *, update_every: int = 1, max_iter: int = 20, solver: str = "newton") -> None:
        super().__init__()
        self.update_every = check_int(update_every, "update_every", minimum=1)
        self.max_iter = check_int(max_iter, "max_iter", minimum=1)
        self.solver = check_solver(solver, ("newton", "cvxpy"), self.name)
        # The cvxpy problem is built for T tasks; the Newton solver takes any number.
        self.skips_absent_tasks = self.solver == "newton"
        self.steps = 0
        self.solver_failures = 0
        self.last_iterations = 0
        self.alpha: np.ndarray | None = None  # last α̂ (on the normalised Gram matrix): the next start point
        self.weights: np.ndarray | None = None  # last weights on the raw gradients, reused between solves
        self._problem: Any = None

    def _init_state(self, num_tasks: int) -> None:
        if self.solver != "cvxpy":
            return
        import cvxpy as cp

        self._variable = cp.Variable(num_tasks, nonneg=True)
        self._gram = cp.Parameter((num_tasks, num_tasks))
        self._linear = cp.Parameter(num_tasks)
        constraints = [cp.log(self._variable) + cp.log(self._gram @ self._variable) >= 0]
        self._problem = cp.Problem(cp.Minimize(self._linear @ self._variable), constraints)

    # -- one solve ---------------------------------------------------------------------------------------
    def _start(self, g: np.ndarray) -> np.ndarray:
        t: int = g.shape[0]
        floor = 1e-12 * float(np.abs(g).max())
        for candidate in (self.alpha, np.ones(t)):
            if candidate is not None and np.all(g @ candidate > floor):
                return candidate
        mgda = np.clip(np.asarray(simplex_min_norm(g), dtype=np.float64), 0.0, None)
        if np.all(g @ mgda > floor):
            # The linearisation divides by α: mix in a little of the uniform weights to make every entry
            # positive while Gα stays positive (it does for a small enough share, since G·mgda > 0).
            share = 0.5
            for _ in range(60):
                candidate = (1.0 - share) * mgda + share / t
                if np.all(g @ candidate > floor):
                    return candidate
                share /= 2
        raise _NoSolution(
            "no direction improves every task (a zero gradient, or zero in the convex hull of the gradients: "
            "a Pareto-stationary point), so the bargaining problem has no solution"
        )

    def _solve_subproblem(self, alpha: np.ndarray) -> np.ndarray:
        """One convex-concave iteration from α_τ = ``alpha`` (the Gram parameter is already set)."""
        import cvxpy as cp

        g = self._gram.value
        self._linear.value = g.sum(axis=0) + 1.0 / alpha + g.T @ (1.0 / (g @ alpha))
        try:
            # No solver-level warm start: cvxpy would hand Clarabel the previous solution, making the result
            # depend on the solve history and breaking bit-identical resumption. The sequence itself is warm
            # started (from the previous step's α̂), which is where the saving is.
            self._problem.solve(solver=cp.CLARABEL, warm_start=False)
        except cp.error.SolverError as err:
            raise _NoSolution(f"Clarabel raised: {err}") from err
        value = self._variable.value
        if self._problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or value is None:
            raise _NoSolution(f"Clarabel returned status {self._problem.status!r}")
        value = np.asarray(value, dtype=np.float64)
        if not (np.all(np.isfinite(value)) and np.all(value > 0) and np.all(g @ value > 0)):
            raise _NoSolution("Clarabel returned a point outside the problem's domain")
        return value

    def _solve(self, g: np.ndarray) -> tuple[np.ndarray, int]:
        """α̂ for the normalised Ĝ = ``g``: the iterate with the smallest residual. Raises _NoSolution with
        that iterate attached (None before the first one completed)."""
        self._gram.value = g
        alpha = self._start(g)
        best: np.ndarray | None = None
        best_residual = math.inf
        iteration = 0
        for iteration in range(1, self.max_iter + 1):  # noqa: B007 (returned below)
            try:
                new = self._solve_subproblem(alpha)
            except _NoSolution as err:
                err.iterate = best
                raise
            moved = float(np.abs(new - alpha).max())
            alpha = new
            residual = nash_residual(g, alpha)
            if residual < best_residual:
                best, best_residual = alpha, residual
            if residual < _RESIDUAL_TOL or moved < _STEP_TOL * float(alpha.max()):
                break
        if best is None:  # no residual compared below inf: NaN in every iterate
            raise _NoSolution("no iterate has a finite residual")
        return best, iteration

    # -- the method --------------------------------------------------------------------------------------
    def compute_weights(self, gram: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        gram = require_gram(gram, self.name)
        if self.steps % self.update_every != 0 and self.weights is not None:
            self.steps += 1
            self.last_iterations = 0
            return torch.from_numpy(self.weights.copy())
        g = gram_to_numpy(gram)
        scale = float(np.linalg.norm(g))
        if not scale > 0.0:
            # Every gradient is zero (or no parameter is shared): any weights give u = 0, nothing to bargain.
            weights = self.weights.copy() if self.weights is not None else np.ones(g.shape[0])
            self.weights, self.last_iterations = weights, 0
            self.steps += 1
            return torch.from_numpy(weights.copy())
        alpha, fallback = self.alpha, None
        if self.solver == "newton":
            weights, fallback = self._bargain(g, self.weights)
        else:
            self.last_iterations = 0
            try:
                alpha, self.last_iterations = self._solve(g / scale)
                weights = alpha / math.sqrt(scale)
            except (_NoSolution, SolverError) as err:
                partial = getattr(err, "iterate", None)
                if partial is not None:
                    alpha = partial
                    weights, fallback = self._fall_back(
                        err, partial / math.sqrt(scale), "this step's best completed iterate"
                    )
                else:
                    weights, fallback = self._fall_back_to_last(err, self.weights, g.shape[0])
        if fallback is not None:
            warnings.warn(fallback, SolverFallbackWarning, stacklevel=4)
        self.alpha, self.weights = alpha, weights
        self.steps += 1
        return torch.from_numpy(weights.copy())

    def compute_present(
        self, present: list[int], gram: torch.Tensor | None, losses: torch.Tensor
    ) -> torch.Tensor:
        gram = require_gram(gram, self.name)
        last = None if self.weights is None else self.weights[present]
        reuse = self.steps % self.update_every != 0
        self.steps += 1
        self.last_iterations = 0
        if reuse and last is not None:
            return torch.from_numpy(last.copy())
        g = gram_to_numpy(gram)
        if not float(np.linalg.norm(g)) > 0.0:
            return torch.from_numpy(last.copy() if last is not None else np.ones(len(present)))
        weights, fallback = self._bargain(g, last)
        if fallback is not None:
            warnings.warn(fallback, SolverFallbackWarning, stacklevel=4)
        return torch.from_numpy(weights)

    def _bargain(self, g: np.ndarray, last: np.ndarray | None) -> tuple[np.ndarray, str | None]:
        """The Newton solver's weights for ``g`` from ``last`` (the last weights of these tasks, or None);
        on a failure the fallback and the warning that names it."""
        self.last_iterations = 0
        start = last if last is not None and np.all(last > 0) else None
        try:
            solution = nash_bargaining_weights(g, start, max_iter=self.max_iter)
        except SolverError as err:
            return self._fall_back_to_last(err, last, g.shape[0])
        self.last_iterations = solution.iterations
        return solution.alpha, None

    def _fall_back_to_last(self, err: Exception, last: np.ndarray | None, t: int) -> tuple[np.ndarray, str]:
        if last is not None:
            return self._fall_back(err, last.copy(), "the previous step's weights")
        return self._fall_back(err, np.ones(t), "equal weights 1 (the plain sum)")

    def _fall_back(self, err: Exception, weights: np.ndarray, what: str) -> tuple[np.ndarray, str]:
        self.solver_failures += 1
        return weights, f"nash_mtl: {err}; using {what} (solver failure {self.solver_failures} of this run)"

    def info_extras(self) -> dict[str, Any]:
        return {"solver_failures": self.solver_failures, "solver_iterations": self.last_iterations}

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "solver_failures": self.solver_failures,
            "alpha": None if self.alpha is None else torch.from_numpy(self.alpha.copy()),
            "weights": None if self.weights is None else torch.from_numpy(self.weights.copy()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def array(value: torch.Tensor | None) -> np.ndarray | None:
            if value is None:
                return None
            out = value.detach().to("cpu", torch.float64).numpy().copy()
            if out.shape != (self.num_tasks,):
                raise ValueError(f"nash_mtl state has shape {out.shape}, expected ({self.num_tasks},)")
            return out

        self.steps = int(state["steps"])
        self.solver_failures = int(state["solver_failures"])
        self.alpha = array(state["alpha"])
        self.weights = array(state["weights"])
