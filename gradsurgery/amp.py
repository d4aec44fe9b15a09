"""Mixed precision: ``opt.backward(losses, grad_scaler=scaler)`` with a ``torch.amp.GradScaler``.

A GradScaler multiplies the loss by a scale s so that small float16 gradients do not flush to zero, and
expects ``.grad`` to hold s·∇L. Fusing the *scaled* task gradients directly is wrong for every method that
is not invariant to a common factor s on all gradients (GradNorm's learned weights, absolute solver
tolerances, a Gram matrix s² too large for the diagnostics in ``StepInfo``), and an overflowed task gradient
must never reach the method. So, per step:

1. each task loss is scaled, L_i·s, and its gradient taken; each task gradient is divided by s (exact when s
   is a power of two, as GradScaler's default schedule keeps it);
2. inf/NaN in any loss or task gradient marks the step as overflowed: the reached parameters' ``.grad`` are
   set to inf so the scaler sees the overflow, the method is *not* called (its RNG, moving averages and
   weights do not advance) and ``info.overflow`` is True;
3. otherwise the method fuses the true gradients, the result is multiplied back by s and written to ``.grad``.

The user's usual ``scaler.unscale_(opt)`` / clipping / ``scaler.step(opt)`` / ``scaler.update()`` then work
unchanged: on an overflowed step ``scaler.step`` skips the optimizer and ``update`` backs the scale off.
(``scaler.step(opt, losses)`` cannot do the per-task scaling: the losses must go through ``backward``.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from .collect import TaskGradients


def active_scaler(grad_scaler: Any) -> torch.amp.GradScaler | None:
    """The scaler to use, or None when absent or disabled (a disabled scaler means plain float32 training)."""
    if grad_scaler is None:
        return None
    if not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
    return grad_scaler if grad_scaler.is_enabled() else None


def scale_losses(
    losses: list[torch.Tensor], scaler: torch.amp.GradScaler
) -> tuple[list[torch.Tensor], float]:
    """(L_i·s for each task, s). ``scaler.scale`` creates the scale tensor on the losses' device if needed."""
    scaled = [scaler.scale(loss) for loss in losses]
    scale = float(scaler.get_scale())
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"the GradScaler's scale must be finite and positive, got {scale}")
    return scaled, scale


def unscale(grads: TaskGradients, scale: float) -> None:
    """Divide every task gradient by s in place (the Jacobian buffer and the task-specific gradients)."""
    inv = 1.0 / scale
    grads.jacobian.mul_(inv)
    for entries in grads.other:
        for _, g in entries:
            g.mul_(inv)


def all_finite(loss_values: torch.Tensor, gram: torch.Tensor, grads: TaskGradients) -> bool:
    """One synchronisation: a non-finite shared gradient makes its Gram diagonal non-finite."""
    checks = [loss_values.reshape(-1).to(gram.device, gram.dtype), gram.diagonal()]
    checks += [
        g.detach().double().pow(2).sum().reshape(1).to(gram.device, gram.dtype)
        for e in grads.other
        for _, g in e
    ]
    return bool(torch.isfinite(torch.cat(checks)).all())


def mark_overflow(params: Iterable[torch.Tensor]) -> None:
    """Make the overflow visible to ``scaler.unscale_``/``scaler.step``: the reached parameters' ``.grad``
    become inf (as an overflowed scaled gradient, added to the accumulated one, would)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.full_like(p, math.inf)
        else:
            p.grad.fill_(math.inf)


def reached_params(grads: TaskGradients) -> list[torch.Tensor]:
    layout = grads.layout
    shared = [layout.params[k] for k in layout.shared]
    return shared + [layout.params[k] for k, entries in enumerate(grads.other) if entries]
