"""Loss preparation: what ``backward(losses)`` receives becomes T scalar losses (and, for a method that takes
one loss per sample, the mask of the samples kept).

``as_task_losses`` validates the container and every loss; a method's ``per_sample_task`` adds the masking
stage (``MaskedLosses``: gradient-guided loss masking, Wang et al. 2021), which reduces the per-sample loss to
the mean over the samples whose gradient does not conflict with the other task's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .clean_guard import masked_main_loss


def as_task_losses(losses: Any, expected: int | None, method: str) -> list[torch.Tensor]:
    """The losses as a list of scalar tensors that require grad; ``expected``: the task count ``method`` is
    bound to, if any."""
    if isinstance(losses, torch.Tensor):
        if losses.dim() > 1:
            raise ValueError(
                f"losses must be a sequence or a 1-D tensor of scalars, got shape {tuple(losses.shape)}"
            )
        losses = [losses] if losses.dim() == 0 else list(losses.unbind())
    elif not isinstance(losses, Sequence) or isinstance(losses, str):
        raise TypeError(f"losses must be a sequence of scalar tensors, got {type(losses).__name__}")
    losses = list(losses)
    if not losses:
        raise ValueError("backward needs at least one loss, got none")
    for i, loss in enumerate(losses):
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss {i} is a {type(loss).__name__}, not a tensor")
        if loss.numel() != 1:
            raise ValueError(f"loss {i} is not a scalar: shape {tuple(loss.shape)}")
        if not loss.requires_grad:
            raise ValueError(f"loss {i} does not require grad (was it computed under torch.no_grad()?)")
    if expected is not None and len(losses) != expected:
        raise ValueError(
            f"expected {expected} losses (the task count of method {method!r}), got {len(losses)}"
        )
    return [loss.reshape(()) for loss in losses]


class PlainLosses:
    """Every loss is a scalar."""

    def __call__(self, losses: Any, params: list[torch.Tensor]) -> tuple[Any, None]:
        return losses, None


class MaskedLosses:
    """Loss ``main`` comes per sample: keep the samples whose gradient has a non-negative inner product with
    the other loss's gradient on the parameters both reach (``shared_ids`` restricts them further)."""

    def __init__(self, main: int, shared_ids: set[int] | None) -> None:
        self.main = main
        self.shared_ids = shared_ids

    def __call__(self, losses: Any, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        return masked_main_loss(losses, self.main, params, self.shared_ids)
