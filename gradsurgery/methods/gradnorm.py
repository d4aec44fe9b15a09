"""GradNorm: learned task weights that balance the tasks' training rates (Chen et al., ICML 2018).

Each task has a learnable weight w_i (all 1 at the start). At step t, on the shared parameters,

    G_i = ‖∇ w_i L_i‖ = w_i ‖g_i‖,          Ḡ = mean_i G_i,
    L̃_i = L_i(t) / L_i(0),                  r_i = L̃_i / mean_k L̃_k   (relative inverse training rate),
    L_grad = Σ_i |G_i − Ḡ · r_i^α|,

with the target Ḡ · r_i^α held constant. A task that trains slowly (r_i > 1) gets a larger target, so its
weight grows; α sets how strongly. The model's shared parameters receive Σ_i w_i g_i with the current w.

The norms come from the Gram diagonal, ‖g_i‖ = sqrt(G_ii), so GradNorm costs no extra backward pass (the
paper restricts G_i to the last shared layer to save that pass; here they are over all shared parameters,
or over the features in representation mode). The gradient of L_grad with respect to w is taken in closed
form, ∂L_grad/∂w_i = sign(G_i − Ḡ r_i^α) · ‖g_i‖, and w is then stepped by an optimizer of the method's own
(``weight_optimizer="adam"`` by default, learning rate ``lr`` = 0.025 as in the paper), after the model's step
(``GradSurgery.step``; see ``_learned`` for why and for the life cycle of the pending gradient). After each
update w is floored at ``min_weight`` (it must stay positive) and renormalised to Σ_i w_i = T.

L_i(0) is the loss of the first step, or the mean over the first ``initial_steps`` steps (the paper's
initial loss is noisy for small batches); until that window is over, L_i(0) is the mean seen so far.
The loss ratios need L_i(0) > 0 and L_i(t) ≥ 0: other losses raise ``ValueError``.

A task absent from a step (its loss ``None``) has no term in that step's L_grad: Ḡ and the mean of the
loss ratios are taken over the present tasks, an absent task's w_i gets gradient 0 (its Adam still moves it
by momentum) and the renormalisation to Σ_i w_i = T is over every task, as always. Each task's L_i(0) is
the mean over the first ``initial_steps`` steps that had it.
"""

from __future__ import annotations

from typing import Any

import torch

from .._validation import check_int, check_number
from ._learned import LearnedVector, check_lr, check_optimizer
from .base import Method, added_at, bound_state, non_negative_losses, of_present, on_every_task, require_gram


class GradNorm(Method):
    name = "gradnorm"
    scales_task_specific = True
    tracks_loss_decrease = True
    skips_absent_tasks = True  # L_grad over the present tasks: see the module docstring

    def __init__(
        self,
        *,
        alpha: float = 1.5,
        lr: float = 0.025,
        initial_steps: int = 1,
        weight_optimizer: str = "adam",
        min_weight: float = 1e-3,
    ) -> None:
        super().__init__()
        self.alpha = check_number(alpha, "alpha", minimum=0.0)
        self.lr = check_lr(lr)
        self.initial_steps = check_int(initial_steps, "initial_steps", minimum=1)
        self.weight_optimizer = check_optimizer(weight_optimizer, self.name)
        # The weights average 1 after each renormalisation, so a floor at or above 1 would pin them all.
        self.min_weight = check_number(
            min_weight, "min_weight", minimum=0.0, exclusive_minimum=True, maximum=1.0, exclusive_maximum=True
        )
        self.learned: LearnedVector | None = None
        self.initial_sum: torch.Tensor | None = None
        self.initial_count: torch.Tensor | None = None  # per task: its steps in the L_i(0) window so far

    def _init_state(self, num_tasks: int) -> None:
        self.learned = LearnedVector(
            torch.ones(num_tasks, dtype=torch.float64), self.weight_optimizer, self.lr
        )
        self.initial_sum = torch.zeros(num_tasks, dtype=torch.float64)
        self.initial_count = torch.zeros(num_tasks, dtype=torch.float64)

    @property
    def weights(self) -> torch.Tensor:
        """The current task weights w (a copy); they sum to T."""
        return bound_state(self.learned, self.name).value.clone()

    @property
    def initial_losses(self) -> torch.Tensor | None:
        """L_i(0) as far as it is known (None before the first step; NaN for a task not seen yet)."""
        count = self.initial_count
        if count is None or not bool((count > 0).any()):
            return None
        return bound_state(self.initial_sum, self.name) / count

    @property
    def pending_grad(self) -> torch.Tensor | None:
        """∂L_grad/∂w summed over the ``backward`` calls since the last step (None when there were none)."""
        pending = bound_state(self.learned, self.name).pending
        return None if pending is None else pending.clone()

    def compute_weights(self, gram: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        return self._weights(None, gram, losses)

    def compute_present(
        self, present: list[int], gram: torch.Tensor | None, losses: torch.Tensor
    ) -> torch.Tensor:
        return self._weights(present, gram, losses)

    def _weights(
        self, present: list[int] | None, gram: torch.Tensor | None, losses: torch.Tensor
    ) -> torch.Tensor:
        """The present tasks' weights (``present``; None: every task) and ∂L_grad/∂w added to the pending
        gradient, 0 for the absent ones; the L_i(0) window of each present task advanced."""
        gram = require_gram(gram, self.name)
        values = non_negative_losses(losses, self.name, "it compares L_i(t)/L_i(0)")
        learned = bound_state(self.learned, self.name)
        initial_sum = bound_state(self.initial_sum, self.name)
        initial_count = bound_state(self.initial_count, self.name)
        tasks = range(len(initial_count)) if present is None else present
        counts = initial_count.tolist()
        # Positions in ``present`` of the tasks still in their L_i(0) window: usually all or none.
        opening = [k for k, i in enumerate(tasks) if counts[i] < self.initial_steps]
        if opening:
            opened = present if len(opening) == len(tasks) else [tasks[k] for k in opening]
            added = values if len(opening) == len(tasks) else values[opening]
            initial_sum = added_at(initial_sum, opened, added)
            initial_count = added_at(initial_count, opened, 1.0)
        initial = of_present(initial_sum, present) / of_present(initial_count, present)
        zero = [i for i, v in enumerate(initial.tolist()) if v <= 0]
        if zero:
            names = zero if present is None else [present[i] for i in zero]
            raise ValueError(
                f"gradnorm needs L_i(0) > 0 to form loss ratios; "
                f"task(s) {names} have L(0) = {initial.tolist()}"
            )

        ratio = values / initial
        mean_ratio = ratio.mean()
        # All losses at 0: every task is done, none is slower than the others.
        rate = ratio / mean_ratio if mean_ratio > 0 else torch.ones_like(ratio)
        norms = gram.detach().diagonal().to("cpu", torch.float64).clamp_min(0).sqrt()
        weights = of_present(learned.value, present)
        grad_norms = weights * norms
        target = grad_norms.mean() * rate.pow(self.alpha)
        grad = on_every_task(torch.sign(grad_norms - target) * norms, present, 0.0, len(learned.value))

        self.initial_sum, self.initial_count = initial_sum, initial_count
        learned.accumulate(grad)
        return weights.clone()

    def after_step(self) -> None:
        if self.learned is None or not self.learned.step():
            return
        with torch.no_grad():
            w = self.learned.param
            w.clamp_(min=self.min_weight)
            w.mul_(w.shape[0] / w.sum())

    def zero_grad(self) -> None:
        if self.learned is not None:
            self.learned.discard()

    def snapshot(self) -> Any:
        # initial_sum and initial_count are replaced at each call, never changed in place
        return bound_state(self.learned, self.name).snapshot(), self.initial_sum, self.initial_count

    def restore(self, snapshot: Any) -> None:
        learned, self.initial_sum, self.initial_count = snapshot
        bound_state(self.learned, self.name).restore(learned)

    def state_dict(self) -> dict[str, Any]:
        if self.learned is None:
            return {}
        return {
            "weights": self.learned.state_dict(),
            "initial_sum": bound_state(self.initial_sum, self.name).clone(),
            "initial_count": bound_state(self.initial_count, self.name).clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "weights" not in state:
            return
        expected = bound_state(self.initial_sum, self.name).shape
        initial_sum = state["initial_sum"].detach().to("cpu", torch.float64).clone()
        if initial_sum.shape != expected:
            raise ValueError(
                f"state has initial losses of shape {tuple(initial_sum.shape)}, expected {tuple(expected)}"
            )
        count = state["initial_count"]
        if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
            # saved before tasks could be absent: every step of the window had every task
            count = torch.full(expected, float(count), dtype=torch.float64)
        elif not (
            isinstance(count, torch.Tensor)
            and count.shape == expected
            and bool((count >= 0).all())
            and bool((count == count.round()).all())
        ):
            raise ValueError(f"state has an invalid initial_count {count!r}")
        else:
            count = count.detach().to("cpu", torch.float64).clone()
        bound_state(self.learned, self.name).load_state_dict(state["weights"])
        self.initial_sum, self.initial_count = initial_sum, count
