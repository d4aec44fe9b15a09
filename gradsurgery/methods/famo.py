"""FAMO: fast adaptive multitask optimisation (Liu, Liu, Stone & Liu, NeurIPS 2023).

FAMO balances the *rate* at which the losses fall without looking at any per-task gradient. It keeps task
logits ξ (z = softmax(ξ)) and minimises Σ_i z_i log L_i; the step on the model is along

    d = Σ_i w_i g_i,    w_i = (z_i / L_i) / Σ_j (z_j / L_j)      (weights positive, summing to 1),

the gradient of Σ_i z_i log L_i rescaled by c = (Σ_j z_j/L_j)⁻¹. After the step the logits are updated from
the observed decrease of the log-losses, δ_i = log L_i(previous) − log L_i(current):

    ∇ξ = Jₛᵀ δ = z ⊙ (δ − ⟨z, δ⟩),   ξ ← Adam(ξ, ∇ξ; lr, weight_decay),

(Jₛ the Jacobian of the softmax), which moves weight toward the tasks whose loss fell least. Adam is
``torch.optim.Adam`` (β = (0.9, 0.999), ε = 1e-8, L2 ``weight_decay`` added to the gradient, the paper's γ) on
the T float64 logits (``_learned.LearnedVector``). As in the authors' code, 1e-8 is added to every loss before
the log and the division.

Which losses measure the decrease: the paper re-evaluates the losses on the same batch after the step (one
more forward pass). A ``GradSurgery`` method sees only the losses of each ``backward``, so δ compares the
losses of the current batch with those of the previous one (the update to ξ is thus delayed by one step
and carries batch-to-batch noise). The first step leaves ξ = 0 (z uniform).

A task absent from a step (its loss ``None``) has no term in that step: the weights are those of the present
tasks, w_i = (z_i / L_i) / Σ_{j present} (z_j / L_j), and δ is taken over the tasks present both at this call
and at the previous one, S: ∇ξ_S = z^S ⊙ (δ_S − ⟨z^S, δ_S⟩) with z^S = softmax(ξ_S), the gradient of
Σ_{i∈S} z^S_i δ_i, and 0 for the other logits (which Adam still moves by their momentum); with S empty the
logits are not stepped, as at the first call.

Cost: the weights depend on the loss values only, so ``GradSurgery`` does a single backward pass of
Σ_i w_i L_i (``needs_gram = False``): O(1) backward passes and no T×d Jacobian, the paper's claim
(``diagnostics=True``: T per-task passes, for the Gram diagnostics). As a loss weighting, task-specific
parameters receive w_i g_i. Losses must be ≥ 0 (they are logged).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._validation import check_number
from ._learned import LearnedVector
from .base import LossValueWeighting, bound_state, non_negative_losses, of_present, on_every_task

_LOSS_EPS = 1e-8


class FAMO(LossValueWeighting):
    name = "famo"
    tracks_loss_decrease = True
    skips_absent_tasks = True  # δ over the tasks present at both calls: see the module docstring

    def __init__(self, *, lr: float = 0.025, weight_decay: float = 1e-3, diagnostics: bool = False) -> None:
        super().__init__(diagnostics=diagnostics)
        self.lr = check_number(lr, "lr", minimum=0.0, exclusive_minimum=True)
        self.weight_decay = check_number(weight_decay, "weight_decay", minimum=0.0)
        self.learned: LearnedVector | None = None
        self.prev_losses: torch.Tensor | None = None

    def _init_state(self, num_tasks: int) -> None:
        zeros = torch.zeros(num_tasks, dtype=torch.float64)
        self.learned = LearnedVector(zeros, "adam", self.lr, weight_decay=self.weight_decay)
        self.prev_losses = None

    def loss_weights(self, present: list[int] | None, losses: torch.Tensor) -> torch.Tensor:
        """The logits' step from the tasks present now (``present``; None: all) and at the last call, then
        the present tasks' weights; ``prev_losses`` keeps NaN for a task absent now."""
        losses = non_negative_losses(
            losses, self.name, "it takes their logarithm; subtract a lower bound of the loss first"
        )
        learned = bound_state(self.learned, self.name)
        num_tasks = learned.value.shape[0]
        current = on_every_task(losses, present, math.nan, num_tasks)
        if self.prev_losses is not None:
            both = self._present_before(present, self.prev_losses)
            if both is None or both:
                delta = torch.log(of_present(self.prev_losses, both) + _LOSS_EPS) - torch.log(
                    of_present(current, both) + _LOSS_EPS
                )
                z = torch.softmax(of_present(learned.value, both), dim=0)
                learned.accumulate(on_every_task(z * (delta - z @ delta), both, 0.0, num_tasks))
                learned.step()
        inverse = torch.softmax(of_present(learned.value, present), dim=0) / (losses + _LOSS_EPS)
        self.prev_losses = losses.clone() if current is losses else current
        return inverse / inverse.sum()

    @staticmethod
    def _present_before(present: list[int] | None, previous: torch.Tensor) -> list[int] | None:
        """The tasks of ``present`` (None: every task) that have a loss in ``previous`` too (None: every
        task)."""
        absent = {i for i, v in enumerate(previous.tolist()) if math.isnan(v)}
        if not absent:
            return present
        return [i for i in (range(len(previous)) if present is None else present) if i not in absent]

    @property
    def logits(self) -> torch.Tensor:
        """The current logits ξ (a copy)."""
        return bound_state(self.learned, self.name).value.clone()

    def snapshot(self) -> Any:
        # prev_losses is replaced at each call, never changed in place
        return bound_state(self.learned, self.name).snapshot(), self.prev_losses

    def restore(self, snapshot: Any) -> None:
        learned, self.prev_losses = snapshot
        bound_state(self.learned, self.name).restore(learned)

    def state_dict(self) -> dict[str, Any]:
        if self.learned is None:
            return {}
        return {"logits": self.learned.state_dict(), "prev_losses": self.prev_losses}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "logits" not in state:
            return
        logits = state["logits"]
        if isinstance(logits, torch.Tensor):
            logits = _from_version_1(state, self.lr, self.weight_decay)
        value = logits["value"]
        if value.shape != (self.num_tasks,):
            raise ValueError(
                f"famo state 'logits' has shape {tuple(value.shape)}, expected ({self.num_tasks},)"
            )
        bound_state(self.learned, self.name).load_state_dict(logits)
        prev = state["prev_losses"]
        self.prev_losses = None if prev is None else prev.detach().to("cpu", torch.float64).clone()


def _from_version_1(state: dict[str, Any], lr: float, weight_decay: float) -> dict[str, Any]:
    """gradsurgery 0.1.0 saved FAMO's hand-written Adam as logits, exp_avg, exp_avg_sq, adam_steps: the same
    quantities in ``torch.optim.Adam``'s state."""
    vector = LearnedVector(state["logits"], "adam", lr, weight_decay=weight_decay)
    steps = int(state["adam_steps"])
    for key in ("exp_avg", "exp_avg_sq"):
        if state[key].shape != vector.param.shape:
            raise ValueError(
                f"famo state {key!r} has shape {tuple(state[key].shape)}, "
                f"expected {tuple(vector.param.shape)}"
            )
    if steps > 0:
        vector.optimizer.state[vector.param] = {
            "step": torch.tensor(float(steps)),
            "exp_avg": state["exp_avg"].detach().to("cpu", torch.float64).clone(),
            "exp_avg_sq": state["exp_avg_sq"].detach().to("cpu", torch.float64).clone(),
        }
    return vector.state_dict()
