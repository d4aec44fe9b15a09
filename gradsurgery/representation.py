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

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .gram import gram_matrix
from .info import StepInfo

if TYPE_CHECKING:
    from .optimizer import GradSurgery

MODE = "representation"


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


def _check_finite(loss_values: torch.Tensor, gram: torch.Tensor) -> None:
    if bool(torch.isfinite(torch.cat([loss_values.to(gram.device), gram.diagonal()])).all()):
        return
    values = loss_values.tolist()
    bad = [i for i, v in enumerate(values) if v != v or abs(v) == float("inf")]
    if bad:
        raise ValueError(f"non-finite loss value(s) for task(s) {bad}: {values}")
    diag = gram.diagonal().tolist()
    bad = [i for i, v in enumerate(diag) if v != v or abs(v) == float("inf")]
    raise ValueError(
        f"non-finite (NaN/inf) gradient with respect to the features for task(s) {bad}; nothing was written"
    )


def representation_backward(
    opt: GradSurgery,
    losses: list[torch.Tensor],
    features: torch.Tensor | Sequence[torch.Tensor],
    *,
    retain_graph: bool = False,
) -> StepInfo:
    """Representation mode of ``GradSurgery.backward`` (``losses`` already checked); see the module doc."""
    features = check_features(features)
    jac, spans = feature_jacobian(losses, features)
    gram = gram_matrix(jac, opt.gram_dtype)
    loss_values = torch.stack([loss.detach().reshape(()) for loss in losses]).to(opt.gram_dtype)
    _check_finite(loss_values, gram)
    method = opt.method
    weights = method(gram, loss_values.to(gram.device))

    fused = weights.to(device=jac.device, dtype=jac.dtype) @ jac
    targets = [
        fused[start:end].view_as(z).to(z.dtype) for z, (start, end) in zip(features, spans, strict=True)
    ]
    if method.scales_task_specific:
        seeds = [weights[i].to(device=loss.device, dtype=loss.dtype) for i, loss in enumerate(losses)]
    else:
        seeds = [torch.ones_like(loss) for loss in losses]
    params = opt._trainable_params()
    # The hook replaces the gradient reaching z (Σ_i s_i ∇_z L_i) by Σ_i w_i ∇_z L_i, so the trunk gets the
    # fused gradient while the heads keep their full-mode gradient; all within one pass.
    handles = [
        z.register_hook(lambda _grad, target=target: target)
        for z, target in zip(features, targets, strict=True)
    ]
    try:
        if params:
            torch.autograd.backward(losses, grad_tensors=seeds, retain_graph=retain_graph, inputs=params)
    finally:
        for handle in handles:
            handle.remove()
    return StepInfo(
        weights=weights,
        losses=loss_values,
        gram=gram,
        method=method.name,
        mode=MODE,
        extras=method.info_extras(),
    )
