"""Loss preparation: what ``backward(losses)`` receives becomes T scalar losses, their names (when given as a
mapping), and for a method that takes one loss per sample the mask of the samples kept.

``backward`` accepts a sequence (or 1-D tensor) of scalars, or a mapping ``{"click": l1, "conversion": l2}``
whose order defines the task order at the first call; later calls are matched to it by name. A method's
``per_sample_task`` adds the masking stage (``MaskedLosses``: gradient-guided loss masking, Wang et al. 2021),
which reduces the per-sample loss to the mean over the samples whose gradient does not conflict with the
other task's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._validation import check_differentiable
from .clean_guard import masked_main_loss


def split_names(losses: Any) -> tuple[list[Any], list[str] | None]:
    """(the losses as a list, their names or None) from a mapping, a sequence or a tensor."""
    if isinstance(losses, Mapping):
        names = list(losses)
        bad = [n for n in names if not isinstance(n, str) or not n]
        if bad:
            raise TypeError(f"task names must be non-empty strings, got {bad}")
        return list(losses.values()), names
    if isinstance(losses, torch.Tensor):
        if losses.dim() > 1:
            raise ValueError(
                f"losses must be a sequence or a 1-D tensor of scalars, got shape {tuple(losses.shape)}"
            )
        return ([losses] if losses.dim() == 0 else list(losses.unbind())), None
    if not isinstance(losses, Sequence) or isinstance(losses, str):
        raise TypeError(
            f"losses must be a sequence of scalar tensors (or a mapping from task names to them), got "
            f"{type(losses).__name__}"
        )
    return list(losses), None


def check_scalars(losses: list[Any]) -> list[torch.Tensor]:
    """Every loss a scalar tensor that requires grad, as a 0-d tensor."""
    if not losses:
        raise ValueError("backward needs at least one loss, got none")
    for i, loss in enumerate(losses):
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss {i} is a {type(loss).__name__}, not a tensor")
        if loss.numel() != 1:
            raise ValueError(f"loss {i} is not a scalar: shape {tuple(loss.shape)}")
        check_differentiable(loss, i)
    return [loss if loss.dim() == 0 else loss.reshape(()) for loss in losses]


def align(
    losses: list[torch.Tensor],
    names: list[str] | None,
    bound: int | None,
    bound_names: list[str] | None,
    method: str,
) -> list[torch.Tensor]:
    """The losses in the task order of the earlier calls: a mapping is matched by name; a sequence is taken
    in order. ValueError when the count or the names differ from those the optimizer was set up with."""
    if bound is not None and len(losses) != bound:
        raise ValueError(f"expected {bound} losses (the task count of method {method!r}), got {len(losses)}")
    if names is None or bound is None:
        return losses
    if bound_names is None:
        raise ValueError(
            f"got named losses {names}, but the tasks of this optimizer are unnamed (its first backward got "
            "a sequence): pass a sequence, or name the tasks from the first call"
        )
    if set(names) != set(bound_names):
        raise ValueError(f"task names {names} differ from those of the earlier calls {bound_names}")
    return [losses[names.index(n)] for n in bound_names]


class PlainLosses:
    """Every loss is a scalar."""

    def __call__(self, losses: Any, params: list[torch.Tensor]) -> tuple[list[Any], list[str] | None, None]:
        tensors, names = split_names(losses)
        return tensors, names, None


class MaskedLosses:
    """Loss ``main`` (an index or a task name) comes per sample: keep the samples whose gradient has a
    non-negative inner product with the other loss's gradient on the parameters both reach (``shared_ids``
    restricts them further)."""

    def __init__(self, main: int | str, shared_ids: set[int] | None) -> None:
        self.main = main
        self.shared_ids = shared_ids

    def __call__(
        self, losses: Any, params: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[str] | None, torch.Tensor]:
        names = None
        if isinstance(losses, Mapping):
            losses, names = split_names(losses)
        main = self.main
        if isinstance(main, str):
            if names is None or main not in names:
                raise ValueError(f"main={main!r} names no task of this call (its tasks: {names})")
            main = names.index(main)
        tensors, mask = masked_main_loss(losses, main, params, self.shared_ids)
        return tensors, names, mask
