"""Loss preparation: what ``backward(losses)`` receives becomes T scalar losses, their names (when given as a
mapping), and for a method that takes one loss per sample the mask of the samples kept.

``backward`` accepts a sequence (or 1-D tensor) of scalars, or a mapping ``{"click": l1, "conversion": l2}``
whose order defines the task order at the first call; later calls are matched to it by name. ``None`` in
place of a loss marks a task absent from the step (``absent_tasks``). A method's
``per_sample_task`` adds the masking stage (``MaskedLosses``: gradient-guided loss masking, Wang et al. 2021),
which reduces the per-sample loss to the mean over the samples whose gradient does not conflict with the
other task's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch

from ._validation import check_differentiable
from .clean_guard import masked_main_loss
from .methods.base import on_every_task

_Loss = TypeVar("_Loss", torch.Tensor, torch.Tensor | None)


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


def check_scalars(losses: list[Any]) -> list[torch.Tensor | None]:
    """Every loss a scalar tensor that requires grad, as a 0-d tensor; ``None`` (a task absent from this
    step) kept as it is, but not for every loss."""
    if not losses:
        raise ValueError("backward needs at least one loss, got none")
    if all(loss is None for loss in losses):
        raise ValueError("every loss is None: backward needs the loss of at least one task")
    for i, loss in enumerate(losses):
        if loss is None:
            continue
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss {i} is a {type(loss).__name__}, not a tensor")
        if loss.numel() != 1:
            raise ValueError(f"loss {i} is not a scalar: shape {tuple(loss.shape)}")
        check_differentiable(loss, i)
    return [loss if loss is None or loss.dim() == 0 else loss.reshape(()) for loss in losses]


def absent_tasks(losses: Any) -> bool:
    """Whether ``losses`` (as ``backward`` got them) hold ``None`` for some task."""
    if isinstance(losses, Mapping):
        return any(loss is None for loss in losses.values())
    if isinstance(losses, Sequence) and not isinstance(losses, str):
        return any(loss is None for loss in losses)
    return False


def align(
    losses: list[_Loss],
    names: list[str] | None,
    bound: int | None,
    bound_names: list[str] | None,
    method: str,
) -> list[_Loss]:
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


class PresentTasks:
    """Which of the T tasks passed a loss in a step where some passed ``None``: the method weighs the present
    ones alone, and ``StepInfo`` spreads what they give back over all T (``spread``)."""

    def __init__(self, indices: list[int], num_tasks: int) -> None:
        self.indices = indices
        self.num_tasks = num_tasks

    @classmethod
    def of(cls, losses: Sequence[torch.Tensor | None]) -> PresentTasks | None:
        """The tasks whose loss is not None, or None when every task has one."""
        indices = [i for i, loss in enumerate(losses) if loss is not None]
        return None if len(indices) == len(losses) else cls(indices, len(losses))

    def spread(self, values: torch.Tensor, fill: float) -> torch.Tensor:
        """A (T,) tensor: ``values`` (one per present task) in their tasks' places, ``fill`` elsewhere."""
        return on_every_task(values, self.indices, fill, self.num_tasks)

    def spread_gram(self, gram: torch.Tensor) -> torch.Tensor:
        """The T×T Gram matrix with the present tasks' block in place and NaN in an absent task's row and
        column (its gradient was not taken)."""
        out = torch.full((self.num_tasks, self.num_tasks), float("nan"), dtype=gram.dtype, device=gram.device)
        index = torch.tensor(self.indices, device=gram.device)
        out[index.unsqueeze(1), index.unsqueeze(0)] = gram
        return out
