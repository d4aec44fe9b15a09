"""Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019, "End-to-End Multi-Task Learning with Attention").

    λ_k = T · exp(w_k / τ) / Σ_i exp(w_i / τ),      w_k = L̄_k(t−1) / L̄_k(t−2),

where L̄_k(t) is the mean loss of task k over period t, a block of ``period`` consecutive ``backward``
calls. A task whose loss fell less over the last period (larger w_k) gets a larger weight; the temperature
τ softens the weighting (τ → ∞ gives equal weights). The weights stay 1 until two periods have been seen,
and are constant within a period. ``period=1`` compares the last two steps; ``period`` = the number of
steps per epoch gives the paper's per-epoch form.

A task absent from a call (its loss ``None``) is left out of that call: the present tasks get
λ_k = P · exp(w_k / τ) / Σ_{i present} exp(w_i / τ) (P of them), a period mean L̄_k is the mean over the
calls of the period that had task k, and a task absent for a whole period has no mean for it; where
L̄_k(t−1) or L̄_k(t−2) is missing, the task's rate is taken as 1. Periods are counted in calls, absent or
not.

Only the loss values are used (not the Gram matrix), so ``GradSurgery`` takes one backward pass of
Σ_k λ_k L_k (``diagnostics=True``: T per-task passes, for the Gram diagnostics); no learnable parameter.
The history (current period's running sums and counts per task, the last two period means) is in
``state_dict``. Losses must be ≥ 0 (the ratio of negative means has no meaning); when L̄_k(t−2) = 0 the
task's rate is taken as 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._validation import check_int, check_number
from .base import LossValueWeighting, added_at, bound_state, non_negative_losses, of_present


class DWA(LossValueWeighting):
    name = "dwa"
    tracks_loss_decrease = True
    skips_absent_tasks = True  # period means over the calls that had the task: see the module docstring

    def __init__(self, *, temperature: float = 2.0, period: int = 1, diagnostics: bool = False) -> None:
        super().__init__(diagnostics=diagnostics)
        self.temperature = check_number(temperature, "temperature", minimum=0.0, exclusive_minimum=True)
        self.period = check_int(period, "period (backward calls per period)", minimum=1)
        self.calls = 0
        self.block_sum: torch.Tensor | None = None
        self.block_count: torch.Tensor | None = None  # per task: the calls of this period that had it
        self.last_mean: torch.Tensor | None = None  # L̄(t−1)
        self.before_last_mean: torch.Tensor | None = None  # L̄(t−2)

    def _init_state(self, num_tasks: int) -> None:
        self.block_sum = torch.zeros(num_tasks, dtype=torch.float64)
        self.block_count = torch.zeros(num_tasks, dtype=torch.float64)

    def current_weights(self, present: list[int] | None = None) -> torch.Tensor:
        """λ of the tasks ``present`` (None: every task) from the last two complete periods (ones before
        there are two)."""
        num_tasks = bound_state(self.block_sum, self.name).shape[0]
        count = num_tasks if present is None else len(present)
        prev, prev2 = self.last_mean, self.before_last_mean
        if prev is None or prev2 is None:  # L̄(t−2) is set only after L̄(t−1)
            return torch.ones(count, dtype=torch.float64)
        # A mean missing (NaN: the task absent for a whole period) or zero two periods ago: rate 1. On
        # Python floats, whose division rounds as the tensor's does: a handful of operator calls cost more.
        means = zip(of_present(prev, present).tolist(), of_present(prev2, present).tolist(), strict=True)
        rate = [last / before if before > 0 and not math.isnan(last) else 1.0 for last, before in means]
        return count * torch.softmax(torch.tensor(rate, dtype=torch.float64) / self.temperature, dim=0)

    def loss_weights(self, present: list[int] | None, losses: torch.Tensor) -> torch.Tensor:
        values = non_negative_losses(losses, self.name, "it compares loss ratios")
        weights = self.current_weights(present)
        block_sum = added_at(bound_state(self.block_sum, self.name), present, values)
        block_count = added_at(bound_state(self.block_count, self.name), present, 1.0)
        calls = self.calls + 1
        if calls % self.period == 0:
            # 0/0 = NaN for a task absent from the whole period: it has no mean for it.
            self.before_last_mean, self.last_mean = self.last_mean, block_sum / block_count
            block_sum, block_count = torch.zeros_like(block_sum), torch.zeros_like(block_count)
        self.block_sum, self.block_count, self.calls = block_sum, block_count, calls
        return weights

    def state_dict(self) -> dict[str, Any]:
        if self.block_sum is None:
            return {}
        return {
            "calls": self.calls,
            "block_sum": self.block_sum.clone(),
            "block_count": None if self.block_count is None else self.block_count.clone(),
            "last_mean": None if self.last_mean is None else self.last_mean.clone(),
            "before_last_mean": None if self.before_last_mean is None else self.before_last_mean.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "block_sum" not in state:
            return
        calls = state["calls"]
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
            raise ValueError(f"state has an invalid call count {calls!r}")
        expected = bound_state(self.block_sum, self.name).shape
        tensors: dict[str, torch.Tensor | None] = {}
        for key in ("block_sum", "last_mean", "before_last_mean"):
            value = state[key]
            if value is not None:
                value = value.detach().to("cpu", torch.float64).clone()
                if value.shape != expected:
                    raise ValueError(
                        f"state has {key} of shape {tuple(value.shape)}, expected {tuple(expected)}"
                    )
            tensors[key] = value
        count = state.get("block_count")
        if count is None:  # saved before tasks could be absent: every call of the period had every task
            count = torch.full(expected, float(calls % self.period), dtype=torch.float64)
        else:
            count = count.detach().to("cpu", torch.float64).clone()
            if count.shape != expected:
                raise ValueError(
                    f"state has block_count of shape {tuple(count.shape)}, expected {tuple(expected)}"
                )
        self.calls = calls
        self.block_sum, self.block_count = tensors["block_sum"], count
        self.last_mean, self.before_last_mean = tensors["last_mean"], tensors["before_last_mean"]
