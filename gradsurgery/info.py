"""What one ``GradSurgery.backward`` reports: the weights applied and diagnostics from the Gram matrix.

Everything here derives from the T×T Gram matrix already computed for the method, so logging it costs no
extra backward pass and no d-sized work. Tensors stay on the parameters' device; convert when logging.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class StepInfo:
    """Per-step record. ``weights[i]`` is the weight of task i in the fused shared gradient Σ_i w_i g_i.

    A task absent from the step (its loss ``None``) has weight 0, a NaN loss, NaN in its row and column of
    ``gram`` (its gradient was not taken) and so NaN for its gradient norm and cosines."""

    weights: torch.Tensor  # (T,)
    losses: torch.Tensor  # (T,), detached
    # (T, T) float64, Gram matrix of the task gradients on the shared parameters; None for methods that take a
    # single backward pass (``Method.needs_gram = False``): the Gram-derived diagnostics below are then NaN.
    gram: torch.Tensor | None
    method: str = ""
    #: The task names when ``backward`` got a mapping ``{name: loss}``; None for a sequence (tasks 0..T−1).
    task_names: list[str] | None = None
    #: ``"full"``: ``gram`` is over the shared parameters; ``"representation"``: over the shared features
    #: passed as ``backward(..., features=z)`` (then ``grad_norms``, ``cosines`` and ``fused_norm`` are
    #: those of the gradients with respect to z).
    mode: str = "full"
    #: Where the gradients came from: ``"jacobian"`` (per-task gradients of the parameters),
    #: ``"activations"`` (per-task gradients of the recorded layers' outputs, G from them and the layers'
    #: inputs), ``"weighted"`` (one backward of Σ w_i L_i, no Gram matrix), ``"features"`` (representation
    #: mode).
    source: str = "jacobian"
    extras: dict[str, Any] = field(default_factory=dict)  # method-specific, from ``Method.info_extras()``
    #: True when a GradScaler step overflowed: nothing was fused, ``weights`` are NaN, ``.grad`` holds inf.
    overflow: bool = False

    def _measured_gram(self) -> torch.Tensor:
        if self.gram is None:
            t = self.weights.shape[0]
            return torch.full((t, t), float("nan"), dtype=torch.float64, device=self.weights.device)
        return self.gram

    #: λ of the L2 auxiliary applied in this backward (0-d, or (n,) per tensor; with ``evidence=True`` one per
    #: regularized layer, in the order of ``opt.l2.weights``); None without the L2 rule.
    l2_coefficient: torch.Tensor | None = None
    #: ``mode="mask"``: which noisy samples were kept (bool, (B,)); None otherwise.
    sample_mask: torch.Tensor | None = None

    @property
    def num_tasks(self) -> int:
        return self.weights.shape[0]

    @property
    def grad_norms(self) -> torch.Tensor:
        """‖g_i‖ on the shared parameters."""
        return self._measured_gram().diagonal().clamp_min(0).sqrt()

    @property
    def cosines(self) -> torch.Tensor:
        """cos(g_i, g_j); 0 where a gradient is zero (no direction to compare), NaN for an absent task."""
        if self.gram is None:
            return self._measured_gram()
        norms = self.grad_norms
        denom = torch.outer(norms, norms)
        cos = torch.where(denom > 0, self.gram / torch.where(denom > 0, denom, 1), 0)
        return torch.where(denom.isnan(), denom, cos.clamp(-1, 1))

    @property
    def num_conflicts(self) -> int:
        """Number of unordered task pairs whose gradients conflict (cosine < 0); 0 when G was not measured."""
        return int(torch.triu(self.cosines < 0, diagonal=1).sum())

    def _fusing_gram(self) -> torch.Tensor:
        """G with the rows and columns of the tasks of weight 0 set to 0: the same wᵀGw and w ⊙ Gw, and
        finite where an absent task's row is NaN."""
        gram = self._measured_gram()
        idle = self.weights == 0
        if not bool(idle.any()):
            return gram
        return gram.masked_fill(idle[:, None] | idle[None, :], 0.0)

    @property
    def fused_norm(self) -> torch.Tensor:
        """‖u‖ of the fused shared gradient, from wᵀGw."""
        gram = self._fusing_gram()
        w = self.weights.to(gram.dtype)
        return (w @ gram @ w).clamp_min(0).sqrt()

    @property
    def shares(self) -> torch.Tensor:
        """Each task's share of the fused step, s_i = ⟨w_i g_i, u⟩ / ‖u‖² = w_i (Gw)_i / wᵀGw (Σ s_i = 1).

        Comparable across methods, unlike the weights themselves (PCGrad's or Nash-MTL's weights can be in
        the thousands, MGDA's sum to 1): a share near 1 means the step is that task's, a negative share
        means the step works against that task's own contribution. NaN when G was not measured or u = 0."""
        gram = self._fusing_gram()
        w = self.weights.to(gram.dtype)
        parts = w * (gram @ w)
        total = parts.sum()
        return torch.where(total > 0, parts / torch.where(total > 0, total, 1), float("nan"))

    def names(self) -> list[str]:
        """The task names, or "0".."T−1" for unnamed tasks."""
        return list(self.task_names) if self.task_names else [str(i) for i in range(self.num_tasks)]

    @property
    def weights_by_task(self) -> dict[str, float]:
        return dict(zip(self.names(), self.weights.tolist(), strict=True))

    def as_dict(self, task_names: list[str] | None = None) -> dict[str, float]:
        """Flat scalars for a logger: ``weight/<task>``, ``loss/<task>``, ``grad_norm/<task>``,
        ``share/<task>``, ``cos/<a>,<b>``; tasks by their names (``task_names``, else the names the
        losses were given, else 0..T−1)."""
        names = list(task_names) if task_names else self.names()
        if len(names) != self.num_tasks:
            raise ValueError(f"{len(names)} task names for {self.num_tasks} tasks: {names}")
        out: dict[str, float] = {}
        weights, losses, norms = self.weights.tolist(), self.losses.tolist(), self.grad_norms.tolist()
        cos, shares = self.cosines.tolist(), self.shares.tolist()
        for i, name in enumerate(names):
            out[f"weight/{name}"] = weights[i]
            out[f"loss/{name}"] = losses[i]
            out[f"grad_norm/{name}"] = norms[i]
            out[f"share/{name}"] = shares[i]
            for j in range(i + 1, self.num_tasks):
                out[f"cos/{name},{names[j]}"] = cos[i][j]
        out["num_conflicts"] = float(self.num_conflicts) if self.gram is not None else float("nan")
        out["fused_norm"] = float(self.fused_norm)
        return out
