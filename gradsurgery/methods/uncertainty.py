"""Uncertainty weighting: learned homoscedastic task uncertainty (Kendall, Gal & Cipolla, CVPR 2018).

With s_i = log σ_i² learned per task, the objective is

    total = Σ_i exp(−s_i) L_i + s_i,

so the model's parameters receive Σ_i exp(−s_i) ∇L_i (the weights w_i = exp(−s_i)), and each s_i receives

    ∂total/∂s_i = 1 − exp(−s_i) L_i,

which vanishes at s_i = log L_i: a task with a large loss is weighted down. The s_i gradient is taken in
this closed form from the detached loss values (no extra backward), so the method never touches d-sized
data; it does not use the Gram matrix, so ``GradSurgery`` takes one backward pass of Σ_i exp(−s_i) L_i
(``diagnostics=True``: T per-task passes, for the Gram diagnostics).

How s is stepped: by a small optimizer of the method's own (option ``weight_optimizer``, ``"adam"`` by
default, with learning rate ``lr``), on a float64 CPU vector, not by the wrapped optimizer. This keeps the
wrapped optimizer's parameter groups, checkpoints, schedulers and weight decay (which would pull s toward
0, i.e. σ toward 1) exactly as the user set them up, and makes the s update independent of the model's
optimizer. The update prepared by ``backward`` is applied by ``GradSurgery.step`` after the model's step
(it adds up over several ``backward`` calls like ``.grad``, and ``zero_grad`` drops it), so s is trained
with the model and does not move when a step fails or is skipped. s, its pending gradient and its
optimizer state are in ``state_dict``.

Options:
    init_log_var: initial s_i (one float for all tasks, or one per task); 0 means σ² = 1, weight 1.
    lr: learning rate of the s optimizer.
    weight_optimizer: ``"adam"`` (β = (0.9, 0.999), ε = 1e-8) or ``"sgd"`` (s ← s − lr (1 − exp(−s) L)).
    diagnostics: take the T per-task backward passes, for the Gram diagnostics in ``StepInfo``.

A task absent from a step (its loss ``None``) has no term in that step's objective: the present tasks get
w_i = exp(−s_i) and ∂total/∂s_i = 1 − exp(−s_i) L_i, the absent one weight 0 and ∂total/∂s_i = 0. Its s_i
then moves only as the s optimizer moves a coordinate whose gradient is 0: not at all with ``"sgd"``, by
its momentum with ``"adam"`` (what ``torch.optim.Adam`` does to an s held in the model's parameters, with
the objective written over the present tasks).

The losses are read as given: pass them unscaled (loss scaling for mixed precision would shift s by
log(scale)). Use losses ≥ 0 (MSE, cross-entropy, as in the paper): for L_i ≤ 0, exp(−s_i) L_i + s_i has no
minimum in s_i and s_i drifts to −∞. The name ``weight_optimizer`` (not ``optimizer``) keeps the option
apart from ``GradSurgery``'s own first argument.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._learned import LearnedVector, check_lr, check_optimizer, check_vector_option, expand
from .base import LossValueWeighting, bound_state, of_present, on_every_task


class Uncertainty(LossValueWeighting):
    name = "uncertainty"
    skips_absent_tasks = True  # an absent task's s_i gets gradient 0: see the module docstring

    def __init__(
        self,
        *,
        init_log_var: float | list[float] | Mapping[str, float] = 0.0,
        lr: float = 0.01,
        weight_optimizer: str = "adam",
        diagnostics: bool = False,
    ) -> None:
        super().__init__(diagnostics=diagnostics)
        self.init_log_var = check_vector_option(init_log_var, "init_log_var")
        self.lr = check_lr(lr)
        self.weight_optimizer = check_optimizer(weight_optimizer, self.name)
        self.learned: LearnedVector | None = None

    def _check_num_tasks(self, num_tasks: int, task_names: Sequence[str] | None) -> None:
        expand(self.init_log_var, num_tasks, task_names, "init_log_var")

    def _init_state(self, num_tasks: int) -> None:
        init = expand(self.init_log_var, num_tasks, self.task_names, "init_log_var")
        self.learned = LearnedVector(init, self.weight_optimizer, self.lr)

    @property
    def log_vars(self) -> torch.Tensor:
        """The current s_i = log σ_i² (a copy)."""
        return bound_state(self.learned, self.name).value.clone()

    @property
    def pending_grad(self) -> torch.Tensor | None:
        """∂total/∂s summed over the ``backward`` calls since the last step (None when there were none)."""
        pending = bound_state(self.learned, self.name).pending
        return None if pending is None else pending.clone()

    def loss_weights(self, present: list[int] | None, losses: torch.Tensor) -> torch.Tensor:
        """w_i = exp(−s_i) for the tasks ``present`` (None: every task), and ∂total/∂s added to the pending
        gradient: 1 − w_i L_i for those tasks, 0 for the others."""
        learned = bound_state(self.learned, self.name)
        weights = torch.exp(-of_present(learned.value, present))
        grad = 1.0 - weights * losses.detach().to("cpu", torch.float64)
        learned.accumulate(on_every_task(grad, present, 0.0, learned.value.shape[0]))
        return weights

    def after_step(self) -> None:
        if self.learned is not None:
            self.learned.step()

    def zero_grad(self) -> None:
        if self.learned is not None:
            self.learned.discard()

    def snapshot(self) -> Any:
        return bound_state(self.learned, self.name).snapshot()

    def restore(self, snapshot: Any) -> None:
        bound_state(self.learned, self.name).restore(snapshot)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.learned is None else {"log_vars": self.learned.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "log_vars" in state:
            bound_state(self.learned, self.name).load_state_dict(state["log_vars"])
