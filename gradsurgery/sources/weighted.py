"""One backward pass of Σ_i w_i L_i, for loss weightings whose weights come from the loss values alone
(``Method.needs_gram = False``: sum, DWA, uncertainty, RLW and FAMO, ``methods.base.LossValueWeighting``,
unless ``diagnostics=True``).

The weights do not depend on the gradients, so a single backward pass gives every parameter Σ_i w_i g_i,
exactly what the per-task path gives a loss weighting, for one backward instead of T and no T×d Jacobian.
No Gram matrix is formed (``StepInfo.gram`` is None), and a loss that reaches no parameter is noticed only
when none of them does. With a GradScaler the weighted loss is scaled (the weights do not depend on the
gradients, so this equals scaling each loss). Under data parallelism the loss values are averaged over the
ranks before the weights are computed, and the gradient after.

Under data parallelism a rank may pass ``None`` for a task the others have (``absent_on_this_rank``): the
task's loss is then the mean of the ranks that have it, L_i = (1/n_i) Σ_{r has i} L_i^r, and its gradient
likewise. One all-reduce carries, with the losses (0 where absent), whether each rank has each task and a 1
per rank, so every rank learns n_i and the rank count n; a rank seeds its loss i with w_i n/n_i, and the
average of the ranks' gradients (÷ n) is then Σ_i w_i (1/n_i) Σ_{r has i} ∇L_i^r. A task no rank has is
absent from the step (``tasks_present``), for the methods that take such a step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch

from ..losses import PresentTasks
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
    #: Data parallelism: the tasks this rank has a loss for, when it lacks some (``absent_on_this_rank``).
    local_tasks: PresentTasks | None = None
    #: After ``reduce``: the tasks some rank has a loss for, when no rank has some; None when every task is.
    tasks_present: PresentTasks | None = None

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
        # Per local loss: its task's place among the tasks weighed, and the factor n/n_i of its seed.
        self._weighed_as = list(range(len(losses)))
        self._rank_scales = [1.0] * len(losses)

    @property
    def num_tasks(self) -> int:
        return len(self.losses) if self.local_tasks is None else self.local_tasks.num_tasks

    def signature(self) -> int:
        return 0

    def absent_on_this_rank(self, present: PresentTasks) -> None:
        """This rank passed losses for the tasks ``present`` only (data parallelism; ``reduce`` learns which
        tasks the other ranks have)."""
        self.local_tasks = present

    def reduce(self, reduction: Reduction) -> None:
        self.reduction = reduction
        if not reduction.spans_ranks:
            self.loss_values = reduction.average(self.loss_values)
            return
        t = self.num_tasks
        local = list(range(t)) if self.local_tasks is None else self.local_tasks.indices
        values = self.loss_values
        packed = torch.zeros(2 * t + 1, dtype=values.dtype, device=values.device)
        packed[local] = values
        packed[[t + i for i in local]] = 1.0
        packed[2 * t] = 1.0
        reduction.sum_in_place([packed])
        sums, counts = packed[:t], packed[t : 2 * t]
        *held_by, ranks = packed[t:].tolist()
        held = [i for i, n in enumerate(held_by) if n > 0]
        self.tasks_present = None if len(held) == t else PresentTasks(held, t)
        self.loss_values = (sums / counts)[held]
        place = {task: k for k, task in enumerate(held)}
        self._weighed_as = [place[i] for i in local]
        self._rank_scales = [ranks / held_by[i] for i in local]

    def _seeds(self, weights: torch.Tensor) -> list[torch.Tensor]:
        """Each local loss's seed, on its device and in its dtype: its task's weight, times n/n_i (1 unless
        some rank lacks the task)."""
        return [
            (weights[k] if scale == 1.0 else weights[k] * scale).to(device=loss.device, dtype=loss.dtype)
            for k, scale, loss in zip(self._weighed_as, self._rank_scales, self.losses, strict=True)
        ]

    def check_finite(self) -> None:
        check_finite(self.loss_values, params=self.params)

    def weighted_loss(self, weights: torch.Tensor) -> torch.Tensor:
        """Σ_i w_i L_i, times the loss scale under a GradScaler."""
        # At least one loss, so the sum is a tensor (never its start value 0).
        total = cast(
            torch.Tensor, sum(w * loss for w, loss in zip(self._seeds(weights), self.losses, strict=True))
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
