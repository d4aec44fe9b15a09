"""Gradient sources: the first stage of ``GradSurgery.backward``.

A source turns the task losses into what the method needs (the T×T Gram matrix of the task gradients, or
only the loss values) and, once the method has produced weights w, into the new gradient of every parameter
it reaches. Each ``collect`` returns a *collection* for that one call:

- ``mode`` (``"full"`` or ``"representation"``) and ``source`` (its name, reported in ``StepInfo``);
- ``loss_values``: the T detached losses, in the Gram dtype;
- ``signature()``: a fingerprint of what the tasks reached, compared across data-parallel ranks;
- ``reduce(reduction)``: average over the ranks (the identity on one process); afterwards ``gram`` holds G,
  or None for sources that need none;
- ``check_finite()``: raises ``NonFiniteError`` naming the tasks with a NaN/inf loss or gradient;
- ``gradients(w)``: the (parameter, new gradient) pairs, in true units (not loss-scaled).

A source whose ``collect`` itself runs collectives (``collectives_in_collect``: FSDP2's backward passes
all-gather and reduce-scatter) has the ranks agree on the task count before it, so that a rank whose losses
failed their checks cannot leave the others waiting in a collective.

The sources: ``jacobian`` (one ``autograd.grad`` per task over the parameters, the exact full mode),
``features`` (gradients with respect to a shared representation: representation mode) and ``weighted``
(one backward pass of Σ w_i L_i, for loss weightings whose weights need no gradient, in either mode);
``fsdp`` (FSDP2's gradient shards, one backward per task, the Gram matrix summed over the ranks).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from .._validation import non_finite
from ..gram import real_view


class NonFiniteError(ValueError):
    """A loss or a gradient is NaN or inf. ``params`` are the parameters whose ``.grad`` a GradScaler must
    see as overflowed when the step was loss-scaled."""

    def __init__(self, message: str, params: Iterable[torch.Tensor] = ()) -> None:
        super().__init__(message)
        self.params = list(params)


def all_finite(grads: Iterable[torch.Tensor]) -> bool:
    """No NaN or inf in any of ``grads``, dense or sparse; one host synchronisation per device when they are
    finite. Each tensor is read once, for its screen (``finite_screens``); only a tensor whose screen fails (a
    NaN or inf, or finite entries whose sum overflows) is read again, for its exact ``extremes``.
    ``isfinite(g).all()`` would take several passes and tensor-sized temporaries; the extremes of every
    tensor cost 1.4× the screens (the 14 gradients of a 0.3M-parameter MLP, one CPU thread: 99 against
    72 µs)."""
    suspects = []
    for values, screens in screened(grads):
        # Read as Python floats: torch.isfinite takes four operations, each a kernel launch on a GPU.
        passed = [math.isfinite(v) for v in screens.tolist()]
        suspects += [v for v, ok in zip(values, passed, strict=True) if not ok]
    return all(exactly_finite(v) for v in suspects)


def finite_gradients(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], what: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``pairs`` ((parameter, new gradient)) unchanged, or ``NonFiniteError`` naming ``what`` when a gradient
    holds a NaN or inf: the check of the gradients a source computes after the weights, before any is
    written."""
    if not all_finite(g for _, g in pairs):
        raise NonFiniteError(f"non-finite (NaN/inf) {what}; nothing was written", (p for p, _ in pairs))
    return pairs


def entries(grad: torch.Tensor) -> torch.Tensor:
    """The real entries a finiteness check reads: a sparse gradient's stored values, a complex one's real and
    imaginary parts."""
    values = real_view(grad._values() if grad.is_sparse else grad)
    return values.detach() if values.requires_grad else values


def screened(grads: Iterable[torch.Tensor]) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """The non-empty ``entries`` of ``grads`` grouped by device, each group with its ``finite_screens``
    stacked (mixed float dtypes promote to a wider one, which keeps every NaN and inf)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        values = entries(g)
        if values.numel():
            by_device.setdefault(values.device, []).append(values)
    return [(values, torch.stack(finite_screens(values))) for values in by_device.values()]


def finite_screens(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """One number per tensor of ``values`` (non-empty, real, on one device), NaN or inf whenever an entry is:
    Σ x per tensor on the CPU, Σ |x| on a CUDA device, in the tensor's own dtype. A sum propagates a NaN, and
    an inf stays one or meets the opposite inf in a NaN, in any order of summation: a finite screen proves
    every entry finite, a non-finite one may come from finite entries whose sum overflows (in float16 already
    beyond 65504). On a CUDA device, where a small model's step is bound by the host, one
    ``torch._foreach_norm(values, 1)`` (``clip_grad_norm_``'s kernel) reads the list in a few launches
    instead of one per tensor; on the CPU it takes 5× the sums' time (the 14 gradients of a 0.3M-parameter
    MLP, one thread). float16 and bfloat16 are summed in their own dtype: on the CPU a float32 sum converts
    every entry first, 1.0-2.4× the time of ``extremes``, the native sum 0.5-0.6× (0.15M and 4.2M entries)."""
    if values[0].device.type == "cuda":
        return list(torch._foreach_norm(values, 1))
    return [v.sum() for v in values]


def extremes(grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The smallest and largest entry of ``grad`` (of its ``entries``), in one pass; none for an empty
    tensor. Both are finite exactly when every entry is: ``torch.aminmax`` propagates NaN, and an inf is one
    of the two."""
    values = entries(grad)
    if values.numel() == 0:  # nothing to check, and aminmax refuses an empty tensor
        return ()
    return tuple(torch.aminmax(values))


def exactly_finite(grad: torch.Tensor) -> bool:
    """Whether every entry of ``grad`` is finite, from its ``extremes`` (an empty tensor is)."""
    ends = extremes(grad)
    return not ends or bool(torch.isfinite(torch.stack(ends)).all())


class TaskScale:
    """s_i g for a gradient g of task i: s_i = w_i for a loss weighting (``active``), 1 otherwise; w cast once
    per device and dtype, since on small task-specific tensors the cast costs as much as the product, to
    float32 at least: a half-precision g times a 0-d float32 w_i is computed in float32 and rounded once,
    where w_i rounded to g's dtype would bias every entry by up to 2⁻⁹ (bfloat16)."""

    def __init__(self, weights: torch.Tensor, active: bool) -> None:
        self.weights = weights
        self.active = active
        self._cast: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    def __call__(self, task: int, grad: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return grad
        key = (grad.device, grad.dtype)
        if key not in self._cast:
            dtype = torch.promote_types(grad.dtype, torch.float32)
            self._cast[key] = self.weights.to(device=grad.device, dtype=dtype).unbind()
        return grad * self._cast[key][task]

    def total(self, entries: Iterable[tuple[int, torch.Tensor]]) -> torch.Tensor | None:
        """Σ s_i g_i over (task, gradient) entries, in their order; None when there are none."""
        total: torch.Tensor | None = None
        for task, grad in entries:
            grad = self(task, grad)
            total = grad if total is None else total + grad
        return total


def holds_reentrant_checkpoint(losses: Iterable[torch.Tensor]) -> bool:
    """Whether the autograd graph of ``losses`` holds a reentrant activation checkpoint
    (``torch.utils.checkpoint(..., use_reentrant=True)``). Its parameters are not in the graph: its backward
    node recomputes the segment and accumulates their ``.grad`` itself, which ``autograd.grad`` cannot ask
    for, so it prunes the node when no input it asks for lies below it (and raises when one does). Cost: one
    visit per node of the graph."""
    from torch.utils.checkpoint import CheckpointFunction

    stack = [loss.grad_fn for loss in losses if loss.grad_fn is not None]
    # Visited nodes are kept alive: a node's Python object lives only while something refers to it, and once
    # freed its id() can be handed to another node's object (``features.check_own_views``).
    seen = {id(node): node for node in stack}
    while stack:
        node = stack.pop()
        if getattr(node, "_forward_cls", None) is CheckpointFunction:
            return True
        for child, _ in node.next_functions:
            if child is not None and id(child) not in seen:
                seen[id(child)] = child
                stack.append(child)
    return False


def unit_seeds(losses: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The seeds 1 of one backward pass over several 0-d losses: one tensor per dtype and device (a seed of
    another dtype would be cast), shared by the losses that have them, where autograd's default makes one per
    loss, each a kernel launch on a GPU. Sharing is what autograd itself does with the gradient of a sum,
    which reaches both inputs as one tensor: its engine accumulates in place only into a tensor nothing else
    refers to."""
    ones: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
    seeds = []
    for loss in losses:
        key = (loss.dtype, loss.device)
        if key not in ones:
            ones[key] = torch.ones_like(loss)
        seeds.append(ones[key])
    return seeds


def loss_values(losses: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The losses (0-d, as ``losses.check_scalars`` returns them) as one detached (T,) tensor in ``dtype``."""
    with torch.no_grad():  # one stack, no detached copies
        return torch.stack(list(losses)).to(dtype)


def check_finite(
    values: torch.Tensor,
    gram: torch.Tensor | None = None,
    task_grads: Sequence[tuple[int, torch.Tensor]] = (),
    *,
    params: Iterable[torch.Tensor] = (),
    gradient: str = "gradient",
) -> None:
    """Raise ``NonFiniteError`` when a loss value, a task gradient (seen through the Gram diagonal: a
    non-finite gradient makes it non-finite) or a gradient in ``task_grads`` ((task, gradient) pairs) is NaN
    or inf. One host synchronisation (a few numbers cross) when everything is finite."""
    like = values if gram is None else gram
    checks = [values.reshape(-1).to(like.device, like.dtype)]
    if gram is not None:
        checks.append(gram.diagonal())
    for _, screens in screened(g for _, g in task_grads):
        # × 0: 0 for a finite screen, NaN otherwise, so that no cast to the check's dtype can overflow.
        checks.append((screens * 0).to(like.device, like.dtype))
    if not non_finite(torch.cat(checks).tolist()):
        return
    listed = values.tolist()
    bad = non_finite(listed)
    if bad:
        raise NonFiniteError(f"non-finite loss value(s) for task(s) {bad}: {listed}", params)
    tasks = set(non_finite(gram.diagonal().tolist())) if gram is not None else set()
    tasks |= {i for i, g in task_grads if not all_finite([g])}
    if not tasks:  # the screen of a large finite gradient overflowed
        return
    raise NonFiniteError(
        f"non-finite (NaN/inf) {gradient} for task(s) {sorted(tasks)}; nothing was written", params
    )
