"""One backward pass of Σ_i w_i L_i, for loss weightings whose weights come from the loss values alone
(``Method.needs_gram = False``: sum, DWA, uncertainty, RLW and FAMO, ``methods.base.LossValueWeighting``,
unless ``diagnostics=True``).

The weights do not depend on the gradients, so a single backward pass gives every parameter Σ_i w_i g_i,
exactly what the per-task path gives a loss weighting, for one backward instead of T and no T×d Jacobian.
No Gram matrix is formed (``StepInfo.gram`` is None), and a loss that reaches no parameter is noticed only
when none of them does. With a GradScaler the weighted loss is scaled (the weights do not depend on the
gradients, so this equals scaling each loss). Under data parallelism the loss values are averaged over the
ranks before the weights are computed, and the gradient after.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch

from . import check_finite, finite_gradients, loss_values

if TYPE_CHECKING:
    from ..amp import LossScaling
    from ..distributed import Reduction


class WeightedSource:
    mode = "full"
    collectives_in_collect = False
    name = "weighted"

    def __init__(self, gram_dtype: torch.dtype) -> None:
        self.gram_dtype = gram_dtype

    def collect(
        self,
        losses: list[torch.Tensor],
        params: list[torch.Tensor],
        scaling: LossScaling | None,
        retain_graph: bool,
        no_sync: Callable[[], Any],
    ) -> WeightedCollection:
        return WeightedCollection(
            losses, params, loss_values(losses, self.gram_dtype), scaling, retain_graph, no_sync
        )


class WeightedCollection:
    source = "weighted"
    gram = None

    def __init__(
        self,
        losses: list[torch.Tensor],
        params: list[torch.Tensor],
        values: torch.Tensor,
        scaling: LossScaling | None,
        retain_graph: bool,
        no_sync: Callable[[], Any],
        mode: str = "full",
    ) -> None:
        self.mode = mode  # "representation" when the step was called with features (the same gradients)
        self.losses = losses
        self.params = params
        self.loss_values = values
        self.scaling = scaling
        self.retain_graph = retain_graph
        self.no_sync = no_sync
        self.reduction: Reduction | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.losses)

    def signature(self) -> int:
        return 0

    def reduce(self, reduction: Reduction) -> None:
        self.loss_values = reduction.average(self.loss_values)
        self.reduction = reduction

    def check_finite(self) -> None:
        check_finite(self.loss_values, params=self.params)

    def weighted_loss(self, weights: torch.Tensor) -> torch.Tensor:
        """Σ_i w_i L_i, times the loss scale under a GradScaler."""
        # At least one loss, so the sum is a tensor (never its start value 0).
        total = cast(
            torch.Tensor,
            sum(w.to(loss.dtype) * loss for w, loss in zip(weights.unbind(), self.losses, strict=True)),
        )
        return total if self.scaling is None else self.scaling.scale_one(total)

    def gradients(self, weights: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.reduction is None:
            raise RuntimeError("the weighted collection's gradients are taken after reduce()")
        with self.no_sync():
            grads = self._backward(weights)
        averaged = self.reduction.average_gradients(self.params, grads)
        reached = [(p, g) for p, g in zip(self.params, averaged, strict=True) if g is not None]
        if not reached:
            raise ValueError("the losses reach none of the optimizer's parameters")
        finite_gradients(reached, "gradient of the weighted loss")
        if self.scaling is not None:
            # Back to true units for the post-transforms; the write-back scales again (exact for 2^k).
            reached = [(p, g / self.scaling.scale_factor()) for p, g in reached]
        return reached

    def _backward(self, weights: torch.Tensor) -> Sequence[torch.Tensor | None]:
        """The gradient of Σ_i w_i L_i (times the loss scale) of every parameter, None where unreached."""
        return torch.autograd.grad(
            self.weighted_loss(weights), self.params, retain_graph=self.retain_graph, allow_unused=True
        )

    def reached_params(self) -> list[torch.Tensor]:
        return self.params
