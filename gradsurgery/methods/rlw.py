"""RLW: random loss weighting (Lin, Ye, Xu, Shi & Zhang, TMLR 2022, "Reasonable Effectiveness of Random
Weighting: A Litmus Test for Multi-Task Learning").

Every step draws fresh weights λ = softmax(ε), ε ~ N(0, I_T), and minimises Σ_i λ_i L_i. The weights are
positive and sum to 1 (the paper's normalisation; E[λ_i] = 1/T), so on average the update is the mean
gradient. It is a loss weighting: task-specific parameters receive λ_i g_i too, and it needs no per-task
gradient, so ``GradSurgery`` takes a single backward pass of Σ_i λ_i L_i (``needs_gram = False``;
``diagnostics=True``: T per-task passes, for the Gram diagnostics).

The normal samples come from the method's own ``torch.Generator`` (``seed``; ``None`` draws the seed from
torch's global RNG), whose state is saved in ``state_dict`` so a resumed run draws the same weights.
"""

from __future__ import annotations

import torch

from .base import LossValueWeighting


class RLW(LossValueWeighting):
    name = "rlw"
    skips_absent_tasks = True

    def __init__(self, *, seed: int | None = None, diagnostics: bool = False) -> None:
        super().__init__(diagnostics=diagnostics)
        self.seed = seed
        self.generator = self.new_generator(seed)

    def loss_weights(self, present: list[int] | None, losses: torch.Tensor) -> torch.Tensor:
        samples = torch.randn(losses.shape[0], generator=self.generator, dtype=torch.float64)
        return torch.softmax(samples, dim=0)
