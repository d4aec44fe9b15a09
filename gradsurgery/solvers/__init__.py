"""Weight solvers on the T×T Gram matrix G = J Jᵀ: closed forms (T = 2), Frank-Wolfe / coordinate
solvers with an exact polish, the exact Nash-MTL and CAGrad solvers, and the cvxpy reference QPs. numpy
float64 in, numpy float64 out."""

from .cagrad import CAGradSolution, cagrad_objective, cagrad_weights
from .closed_form import (
    check_gram,
    check_main_indices,
    check_min_weights,
    check_task_index,
    main_aux_one,
    main_aux_one_weights,
    min_norm_two,
    min_norm_two_weights,
)
from .frank_wolfe import main_aux_min_norm, mixed_min_norm, pareto_min_norm, simplex_min_norm
from .nash import NashNoSolutionError, NashSolution, nash_bargaining_weights, nash_residual
from .qp import MainAuxQP, MixedQP, SimplexQP

__all__ = [
    "CAGradSolution",
    "MainAuxQP",
    "MixedQP",
    "NashNoSolutionError",
    "NashSolution",
    "SimplexQP",
    "cagrad_objective",
    "cagrad_weights",
    "check_gram",
    "check_main_indices",
    "check_min_weights",
    "check_task_index",
    "main_aux_min_norm",
    "main_aux_one",
    "main_aux_one_weights",
    "min_norm_two",
    "min_norm_two_weights",
    "mixed_min_norm",
    "nash_bargaining_weights",
    "nash_residual",
    "pareto_min_norm",
    "simplex_min_norm",
]
