"""Representation mode: task weights from the gradients with respect to the shared features, one backward.

MGDA-UB (Sener & Koltun 2018, section 3.3). With an encoder z = f(x; θ_sh) read by every task head, the
chain rule gives ∇_θ L_i = (∂z/∂θ)ᵀ ∇_z L_i, hence for any weights w

    ‖Σ_i w_i ∇_θ L_i‖ ≤ ‖∂z/∂θ‖ · ‖Σ_i w_i ∇_z L_i‖.

``GradSurgery.backward(losses, features=z)`` therefore

1. takes the T per-task gradients ∇_z L_i (each backward stops at z: it runs through the heads only),
   flattened over the batch into a T×D matrix J_z, and its Gram matrix G_z = J_z J_zᵀ;
2. lets the method turn G_z (and the losses) into weights w, exactly as in full mode;
3. runs **one** backward pass: the losses are seeded with s_i (s_i = w_i for loss-weighting methods, 1
   otherwise) and the gradient arriving at z is replaced by u_z = Σ_i w_i ∇_z L_i. The trunk thus receives
   (∂z/∂θ)ᵀ u_z = Σ_i w_i ∇_θ L_i, the gradient of Σ_i w_i L_i, and each head receives s_i times its task's
   gradient, as in full mode.

Cost: T backward passes through the heads, O(T² D) for G_z, one full backward pass.

This is an approximation of the full mode: the weights are exact for the method's objective posed on z
(for MGDA: the min-norm combination of the ∇_z L_i), which for the parameters is an upper bound (above),
not the problem itself. Methods that read only the losses (``"uncertainty"``, ``"dwa"``) give the same
weights in both modes. When the trunk is the identity (z is itself the shared parameter), both modes
coincide exactly.

Assumption: every path from a loss to the shared parameters passes through ``features``. A path that
bypasses them (e.g. a penalty on trunk weights added to one task's loss) contributes s_i times its
gradient, not w_i times.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..gram import gram_matrix
from . import check_finite, loss_values

if TYPE_CHECKING:
    from ..amp import LossScaling
    from ..distributed import Reduction


def check_features(features: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The features as a list of distinct floating tensors that require grad."""
    if isinstance(features, torch.Tensor):
        features = [features]
    elif not isinstance(features, Sequence) or isinstance(features, str):
        raise TypeError(f"features must be a tensor or a sequence of tensors, got {type(features).__name__}")
    features = list(features)
    if not features:
        raise ValueError("features is empty: pass the shared representation z the task heads read")
    seen: dict[int, int] = {}
    for j, z in enumerate(features):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"features[{j}] is a {type(z).__name__}, not a tensor")
        if not z.is_floating_point():
            raise TypeError(f"features[{j}] has dtype {z.dtype}; a floating representation is needed")
        if not z.requires_grad:
            raise ValueError(
                f"features[{j}] (shape {tuple(z.shape)}) does not require grad: pass the trunk output as "
                "computed, not detached or produced under torch.no_grad()"
            )
        if id(z) in seen:
            raise ValueError(f"features[{j}] is the same tensor as features[{seen[id(z)]}]")
        seen[id(z)] = j
    return features


def feature_jacobian(
    losses: list[torch.Tensor], features: list[torch.Tensor]
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """J_z: row i is ∇_z L_i flattened (over the batch too) and concatenated over the features.

    Returns J_z and the (start, end) column range of each feature. Raises ``ValueError`` when a loss does
    not depend on any feature, or a feature feeds no loss: the weights would then be meaningless.
    """
    dtype = features[0].dtype
    for z in features[1:]:
        dtype = torch.promote_types(dtype, z.dtype)
    spans, total = [], 0
    for z in features:
        spans.append((total, total + z.numel()))
        total += z.numel()
    jac = torch.zeros(len(losses), total, dtype=dtype, device=features[0].device)
    feeds = [False] * len(features)
    lost = []
    for i, loss in enumerate(losses):
        # The graph is kept: the single backward pass below runs through it again.
        grads = torch.autograd.grad(loss, features, retain_graph=True, allow_unused=True)
        if all(g is None for g in grads):
            lost.append(i)
            continue
        for j, g in enumerate(grads):
            if g is not None:
                feeds[j] = True
                start, end = spans[j]
                jac[i, start:end].copy_(g.reshape(-1))
    if lost:
        raise ValueError(
            f"loss(es) {lost} do not depend on the features: every task head must read the shared "
            "representation passed as features="
        )
    unused = [j for j, f in enumerate(feeds) if not f]
    if unused:
        raise ValueError(f"features {unused} are on the path of no loss")
    return jac, spans


class FeatureSource:
    """Representation mode: weights from the task gradients with respect to the shared features."""

    mode = "representation"
    name = "features"

    def __init__(
        self,
        features: torch.Tensor | Sequence[torch.Tensor],
        gram_dtype: torch.dtype,
        scales_task_specific: bool,
    ) -> None:
        self.features = check_features(features)
        self.gram_dtype = gram_dtype
        self.scales_task_specific = scales_task_specific

    @staticmethod
    def check_supported(scaling: LossScaling | None, reduction: Reduction, gradient_transforms: bool) -> None:
        if scaling is not None or reduction.group is not None or gradient_transforms:
            raise ValueError(
                "representation mode (features=) does not support grad_scaler=, distributed training "
                "or the direct l2 rule yet; use the full mode (no features=)"
            )

    def collect(
        self,
        losses: list[torch.Tensor],
        params: list[torch.Tensor],
        scaling: LossScaling | None,
        retain_graph: bool,
        no_sync: Callable[[], Any],
    ) -> FeatureCollection:
        jac, spans = feature_jacobian(losses, self.features)
        values = loss_values(losses, self.gram_dtype)
        return FeatureCollection(self, losses, params, jac, spans, values, retain_graph)


class FeatureCollection:
    mode = "representation"
    source = "features"

    def __init__(self, source, losses, params, jac, spans, values, retain_graph) -> None:
        self.features = source.features
        self.gram_dtype = source.gram_dtype
        self.losses = losses
        self.params = params
        self.jac = jac
        self.spans = spans
        self.loss_values = values
        self.retain_graph = retain_graph
        self.scales_task_specific = source.scales_task_specific
        self.gram: torch.Tensor | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.losses)

    def signature(self) -> int:
        return 0

    def reduce(self, reduction: Reduction) -> None:
        self.gram = gram_matrix(self.jac, self.gram_dtype)
        self.loss_values = self.loss_values.to(self.gram.device)

    def check_finite(self) -> None:
        check_finite(self.loss_values, self.gram, gradient="gradient with respect to the features")

    def gradients(self, weights: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One backward pass: the heads get s_i ∇L_i, the trunk the fused gradient through z."""
        if not self.params:
            return []
        fused = weights.to(device=self.jac.device, dtype=self.jac.dtype) @ self.jac
        targets = [
            fused[start:end].view_as(z).to(z.dtype)
            for z, (start, end) in zip(self.features, self.spans, strict=True)
        ]
        if self.scales_task_specific:
            seeds = [
                weights[i].to(device=loss.device, dtype=loss.dtype) for i, loss in enumerate(self.losses)
            ]
        else:
            seeds = [torch.ones_like(loss) for loss in self.losses]
        # The hook replaces the gradient reaching z (Σ_i s_i ∇_z L_i) by Σ_i w_i ∇_z L_i, so the trunk gets
        # the fused gradient while the heads keep their full-mode gradient; all within one pass.
        handles = [
            z.register_hook(lambda _grad, target=target: target)
            for z, target in zip(self.features, targets, strict=True)
        ]
        try:
            grads = torch.autograd.grad(
                self.losses,
                self.params,
                grad_outputs=seeds,
                retain_graph=self.retain_graph,
                allow_unused=True,
            )
        finally:
            for handle in handles:
                handle.remove()
        return [(p, g) for p, g in zip(self.params, grads, strict=True) if g is not None]

    def reached_params(self) -> list[torch.Tensor]:
        return self.params
