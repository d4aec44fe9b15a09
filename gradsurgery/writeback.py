"""Write-back, the last stage: the new gradients are added to ``.grad`` as ``loss.backward()`` adds them."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .amp import LossScaling


def accumulate(
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], scaling: LossScaling | None = None
) -> None:
    """``p.grad += g`` for each (parameter, new gradient) pair (``p.grad = g`` when there is none), the
    gradient first multiplied by the loss scale when the step is loss-scaled."""
    for p, g in pairs:
        if scaling is not None:
            g = scaling.rescale(g)
        if g.dtype != p.dtype:
            g = g.to(p.dtype)
        if p.grad is None:
            # A gradient from autograd.grad is already detached; the check spares one op per parameter.
            p.grad = g.detach() if g.requires_grad else g
        else:
            p.grad.add_(g)
