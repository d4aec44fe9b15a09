"""What one ``GradSurgery.backward`` reports: the weights applied and diagnostics from the Gram matrix.

Everything here derives from the T×T Gram matrix already computed for the method, so logging it costs no
extra backward pass and no d-sized work. Tensors stay on the parameters' device; convert when logging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepInfo:
    """Per-step record. ``weights[i]`` is the weight of task i in the fused shared gradient Σ_i w_i g_i."""

    weights: torch.Tensor  # (T,)
    losses: torch.Tensor  # (T,), detached
    gram: torch.Tensor  # (T, T) float64, Gram matrix of the task gradients on the shared parameters
    method: str = ""
    #: λ of the L2 auxiliary applied in this backward (0-d, or (n,) per tensor); None without the L2 rule.
    l2_coefficient: torch.Tensor | None = None
    #: ``mode="mask"``: which noisy samples were kept (bool, (B,)); None otherwise.
    sample_mask: torch.Tensor | None = None

    @property
    def num_tasks(self) -> int:
        return self.weights.shape[0]

    @property
    def grad_norms(self) -> torch.Tensor:
        """‖g_i‖ on the shared parameters."""
        return self.gram.diagonal().clamp_min(0).sqrt()

    @property
    def cosines(self) -> torch.Tensor:
        """cos(g_i, g_j); 0 where a gradient is zero (no direction to compare)."""
        norms = self.grad_norms
        denom = torch.outer(norms, norms)
        cos = torch.where(denom > 0, self.gram / torch.where(denom > 0, denom, 1), 0)
        return cos.clamp(-1, 1)

    @property
    def num_conflicts(self) -> int:
        """Number of unordered task pairs whose gradients conflict (cosine < 0)."""
        return int(torch.triu(self.cosines < 0, diagonal=1).sum())

    @property
    def fused_norm(self) -> torch.Tensor:
        """‖u‖ of the fused shared gradient, from wᵀGw."""
        w = self.weights.to(self.gram.dtype)
        return (w @ self.gram @ w).clamp_min(0).sqrt()

    def as_dict(self, task_names: list[str] | None = None) -> dict[str, float]:
        """Flat scalars for a logger: ``weight/<task>``, ``loss/<task>``, ``grad_norm/<task>``, ``cos/<a>,<b>``."""
        names = task_names or [str(i) for i in range(self.num_tasks)]
        if len(names) != self.num_tasks:
            raise ValueError(f"{len(names)} task names for {self.num_tasks} tasks: {names}")
        out: dict[str, float] = {}
        weights, losses, norms = self.weights.tolist(), self.losses.tolist(), self.grad_norms.tolist()
        cos = self.cosines.tolist()
        for i, name in enumerate(names):
            out[f"weight/{name}"] = weights[i]
            out[f"loss/{name}"] = losses[i]
            out[f"grad_norm/{name}"] = norms[i]
            for j in range(i + 1, self.num_tasks):
                out[f"cos/{name},{names[j]}"] = cos[i][j]
        out["num_conflicts"] = float(self.num_conflicts)
        out["fused_norm"] = float(self.fused_norm)
        return out
