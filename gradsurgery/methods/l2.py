"""``method="l2"``: one data loss, with ½‖θ‖² as its λ-free auxiliary (``gradsurgery/l2.py``).

    u = g + relu(−⟨g, θ⟩)/‖θ‖² · θ

θ is not a task gradient, so the rule is not a weighting of the Gram matrix: the method takes the single
task with weight 1 and brings the rule as a post-transform of the gradient (or, with ``decoupled=True``, a
correction of the optimizer's step), the same transform that ``GradSurgery(..., l2=True)`` adds to any other
method.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .._validation import check_bool
from ..l2 import L2Rule
from .base import Method, Transform, require_gram


class L2(Method):
    """Options: ``params`` (the regularized tensors; default every parameter with dim ≥ 2), ``per_tensor``
    (the rule per tensor instead of one global inner product; default: per tensor for adaptive optimizers,
    global for SGD), ``decoupled`` (correct the optimizer's step instead of the gradient; default True)."""

    name = "l2"
    max_tasks = 1
    unsaved_options = ("params",)

    def __init__(
        self,
        *,
        params: Iterable[torch.Tensor] | None = None,
        per_tensor: bool | None = None,
        decoupled: bool = True,
    ) -> None:
        super().__init__()
        self.per_tensor = (
            None if per_tensor is None else check_bool(per_tensor, "method 'l2' option per_tensor")
        )
        self.decoupled = check_bool(decoupled, "method 'l2' option decoupled")
        self.rule = L2Rule(params, per_tensor=self.per_tensor, decoupled=self.decoupled, what="method 'l2'")
        self.params = self.rule.params

    def transforms(self) -> list[Transform]:
        return [self.rule]

    def check_num_tasks(self, num_tasks: int, task_names: Sequence[str] | None = None) -> None:
        if num_tasks != 1:
            raise ValueError(
                f"method 'l2' takes one loss (the data loss), got {num_tasks}; for several losses combine a "
                "multi-task method with the rule, e.g. GradSurgery(opt, method='mgda', l2=True)"
            )

    def compute_weights(self, gram: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        gram = require_gram(gram, self.name)
        return torch.ones(1, dtype=gram.dtype, device=gram.device)

    def extra_repr(self) -> str:
        which = "dim>=2" if self.params is None else f"<{len(self.params)} tensors>"
        return f"params={which}, per_tensor={self.per_tensor}, decoupled={self.decoupled}"
