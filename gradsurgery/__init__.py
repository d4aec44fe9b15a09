"""gradsurgery: let multi-task training balance its tasks by itself.

opt = GradSurgery(torch.optim.Adam(model.parameters(), lr=1e-3), method="mgda")
opt.zero_grad(); info = opt.backward([loss_a, loss_b]); opt.step()
"""

from .clean_guard import CleanBatches, NoiseCorrection, mask_noisy_samples
from .errors import SolverError, SolverFallbackWarning
from .gram import gram_matrix
from .info import StepInfo
from .methods import METHODS, Method, make_method, register
from .multi import MultiOptimizer
from .optimizer import GradSurgery
from .sources.features import task_views

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "CleanBatches",
    "GradSurgery",
    "Method",
    "MultiOptimizer",
    "NoiseCorrection",
    "SolverError",
    "SolverFallbackWarning",
    "StepInfo",
    "gram_matrix",
    "make_method",
    "mask_noisy_samples",
    "register",
    "task_views",
]
