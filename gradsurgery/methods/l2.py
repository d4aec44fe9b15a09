"""``method="l2"``: one data loss, with ½‖θ‖² as its λ-free auxiliary (see ``gradsurgery/l2.py``).

    u = g + relu(−⟨g, θ⟩)/‖θ‖² · θ

θ is not a task gradient, so the rule is not a weighting of the Gram matrix: this method only declares the
single task (weight 1, every parameter gets the loss's plain gradient) and carries the options;
``GradSurgery`` applies the rule to the new gradient (or, with ``decoupled=True``, to the step).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..l2 import _tensor_list
from .base import Method


class L2(Method):
    """Options: ``params`` (the regularized tensors; default every parameter with dim ≥ 2), ``per_tensor``
    (the rule per tensor instead of one global inner product), ``decoupled`` (correct the optimizer's
    step instead of the gradient)."""

    name = "l2"

    def __init__(
        self,
        *,
        params: Iterable[torch.Tensor] | None = None,
        per_tensor: bool = False,
        decoupled: bool = False,
    ) -> None:
        for what, value in (("per_tensor", per_tensor), ("decoupled", decoupled)):
            if not isinstance(value, bool):
                raise TypeError(f"method 'l2' option {what} must be a bool, got {value!r}")
        # The tensors stay out of ``options``: those are written into checkpoints, which hold primitives only.
        super().__init__(per_tensor=per_tensor, decoupled=decoupled)
        self.params = None if params is None else _tensor_list(params, "method 'l2' params")
        self.per_tensor = per_tensor
        self.decoupled = decoupled

    def _check_num_tasks(self, num_tasks: int) -> None:
        if num_tasks != 1:
            raise ValueError(
                f"method 'l2' takes one loss (the data loss), got {num_tasks}; for several losses combine a "
                "multi-task method with the rule, e.g. GradSurgery(opt, method='mgda', l2=True)"
            )

    def compute_weights(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        return torch.ones(1, dtype=gram.dtype, device=gram.device)

    def extra_repr(self) -> str:
        which = "dim>=2" if self.params is None else f"<{len(self.params)} tensors>"
        return f"params={which}, per_tensor={self.per_tensor}, decoupled={self.decoupled}"
