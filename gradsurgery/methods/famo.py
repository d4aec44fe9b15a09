"""FAMO: fast adaptive multitask optimisation (Liu, Liu, Stone & Liu, NeurIPS 2023).

FAMO balances the *rate* at which the losses fall without looking at any per-task gradient. It keeps task
logits ξ (z = softmax(ξ)) and minimises Σ_i z_i log L_i; the step on the model is along

    d = Σ_i w_i g_i,    w_i = (z_i / L_i) / Σ_j (z_j / L_j)      (weights positive, summing to 1),

the gradient of Σ_i z_i log L_i rescaled by c = (Σ_j z_j/L_j)⁻¹. After the step the logits are updated from
the observed decrease of the log-losses, δ_i = log L_i(previous) − log L_i(current):

    ∇ξ = Jₛᵀ δ = z ⊙ (δ − ⟨z, δ⟩),   ξ ← Adam(ξ, ∇ξ; lr, weight_decay),

(Jₛ the Jacobian of the softmax), which moves weight toward the tasks whose loss fell least. Adam is
PyTorch's (β = (0.9, 0.999), ε = 1e-8, L2 ``weight_decay`` added to the gradient, the paper's γ), run in
float64 on the T logits. As in the authors' code, 1e-8 is added to every loss before the log and the division.

Which losses measure the decrease: the paper re-evaluates the losses on the same batch after the step (one
more forward pass). A ``GradSurgery`` method sees only the losses of each ``backward``, so δ compares the
losses of the current batch with those of the previous one (the update to ξ is thus delayed by one step
and carries batch-to-batch noise). The first step leaves ξ = 0 (z uniform).

Cost: the weights depend on the loss values only, so ``GradSurgery`` does a single backward pass of
Σ_i w_i L_i (``needs_gram = False``): O(1) backward passes and no T×d Jacobian, the paper's claim. As a loss
weighting, task-specific parameters receive w_i g_i. Losses must be ≥ 0 (they are logged).
"""

from __future__ import annotations

import math

import torch

from .base import Method, non_negative_losses

_LOSS_EPS = 1e-8
_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8


def _check_rate(value, what: str, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0.0 or (positive and value == 0.0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{what} must be a finite number {bound}, got {value}")
    return value


class FAMO(Method):
    name = "famo"
    scales_task_specific = True
    needs_gram = False

    def __init__(self, *, lr: float = 0.025, weight_decay: float = 1e-3) -> None:
        lr = _check_rate(lr, "lr", positive=True)
        weight_decay = _check_rate(weight_decay, "weight_decay", positive=False)
        super().__init__(lr=lr, weight_decay=weight_decay)
        self.lr = lr
        self.weight_decay = weight_decay
        self.logits: torch.Tensor | None = None
        self.exp_avg: torch.Tensor | None = None
        self.exp_avg_sq: torch.Tensor | None = None
        self.adam_steps = 0
        self.prev_losses: torch.Tensor | None = None

    def _init_state(self, num_tasks: int) -> None:
        self.logits = torch.zeros(num_tasks, dtype=torch.float64)
        self.exp_avg = torch.zeros(num_tasks, dtype=torch.float64)
        self.exp_avg_sq = torch.zeros(num_tasks, dtype=torch.float64)
        self.adam_steps = 0
        self.prev_losses = None

    def compute_weights(self, gram: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        losses = non_negative_losses(
            losses, self.name, "it takes their logarithm; subtract a lower bound of the loss first"
        )
        logits, exp_avg, exp_avg_sq = self.logits.clone(), self.exp_avg.clone(), self.exp_avg_sq.clone()
        steps = self.adam_steps
        if self.prev_losses is not None:
            delta = torch.log(self.prev_losses + _LOSS_EPS) - torch.log(losses + _LOSS_EPS)
            z = torch.softmax(logits, dim=0)
            grad = z * (delta - z @ delta) + self.weight_decay * logits
            steps += 1
            exp_avg.mul_(_BETA1).add_(grad, alpha=1 - _BETA1)
            exp_avg_sq.mul_(_BETA2).addcmul_(grad, grad, value=1 - _BETA2)
            denom = exp_avg_sq.sqrt() / math.sqrt(1 - _BETA2**steps) + _ADAM_EPS
            logits -= self.lr / (1 - _BETA1**steps) * exp_avg / denom
        z = torch.softmax(logits, dim=0)
        inverse = z / (losses + _LOSS_EPS)
        weights = inverse / inverse.sum()
        # Committed only now: a refused call leaves the logits, the Adam moments and the loss history alone.
        self.logits, self.exp_avg, self.exp_avg_sq, self.adam_steps = logits, exp_avg, exp_avg_sq, steps
        self.prev_losses = losses.clone()
        return weights

    def state_dict(self) -> dict:
        return {
            "logits": self.logits,
            "exp_avg": self.exp_avg,
            "exp_avg_sq": self.exp_avg_sq,
            "adam_steps": self.adam_steps,
            "prev_losses": self.prev_losses,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("logits", "exp_avg", "exp_avg_sq"):
            value = state[key].detach().to("cpu", torch.float64).clone()
            if value.shape != (self.num_tasks,):
                raise ValueError(
                    f"famo state {key!r} has shape {tuple(value.shape)}, expected ({self.num_tasks},)"
                )
            setattr(self, key, value)
        self.adam_steps = int(state["adam_steps"])
        prev = state["prev_losses"]
        self.prev_losses = None if prev is None else prev.detach().to("cpu", torch.float64).clone()
