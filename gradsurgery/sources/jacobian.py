"""The exact full mode: one ``autograd.grad`` per task over the parameters, the T×d Jacobian J of the shared
ones, G = J Jᵀ and u = Jᵀw.

A parameter reached by two or more tasks is *shared* and gets the fused gradient; a parameter reached by a
single task is *task-specific* and gets that task's own gradient (times w_i for loss weightings). The layout
(which parameters are shared, where each one sits in a row of the Jacobian) is remembered between steps, so
each task's gradients go straight into a reused T×d buffer; it is rebuilt only when the set of shared
parameters changes.

A complex parameter takes two real columns per entry, its real and imaginary parts (``torch.view_as_real``),
as ``torch.optim`` treats it: G_ij = Re⟨g_i, g_j⟩ is then the inner product of the real view, the one whose
descent direction is the gradient autograd returns.

Cost per step: T backward passes, O(T² d) for G and O(T d) for u; memory T·d for J.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..gram import real_dtype, real_view
from . import TaskScale, check_finite, loss_values

if TYPE_CHECKING:
    from ..amp import LossScaling
    from ..distributed import Reduction


@dataclass
class Layout:
    """Where each shared parameter sits in a row of the Jacobian."""

    params: list[torch.Tensor]
    shared: list[int]  # indices into ``params`` of the shared parameters, in row order
    offsets: list[int]
    dim: int
    dtype: torch.dtype
    device: torch.device
    slot: dict[int, int] = field(default_factory=dict)  # param index -> position in ``shared``

    @classmethod
    def build(cls, params: list[torch.Tensor], shared: list[int]) -> Layout:
        offsets, total = [], 0
        for k in shared:
            offsets.append(total)
            total += columns(params[k])
        members = [params[k] for k in shared] or params
        devices = {p.device for p in members}
        if len(devices) > 1:
            raise ValueError(f"shared parameters must live on one device, found {sorted(map(str, devices))}")
        dtype = real_dtype(members[0].dtype)
        for p in members[1:]:
            dtype = torch.promote_types(dtype, real_dtype(p.dtype))
        slot = {k: s for s, k in enumerate(shared)}
        return cls(params, shared, offsets, total, dtype, devices.pop(), slot)

    def matches(self, params: list[torch.Tensor], shared: list[int]) -> bool:
        return (
            len(params) == len(self.params)
            and all(a is b for a, b in zip(params, self.params, strict=True))
            and shared == self.shared
        )

    def segment(self, row: torch.Tensor, slot: int) -> torch.Tensor:
        """The columns of shared parameter ``slot`` in ``row`` (a complex one: its real view, flattened)."""
        start = self.offsets[slot]
        return row[start : start + columns(self.params[self.shared[slot]])]

    def gradient(self, row: torch.Tensor, slot: int) -> torch.Tensor:
        """The gradient of shared parameter ``slot`` held in ``row``, in the parameter's shape (complex for a
        complex parameter), a view of ``row`` where the layout allows one."""
        param = self.params[self.shared[slot]]
        values = self.segment(row, slot)
        if not param.is_complex():
            return values.view_as(param)
        pairs = values.view(*param.shape, 2)
        if pairs.storage_offset() % 2:  # a complex view must start on a whole complex number
            pairs = pairs.clone()
        return torch.view_as_complex(pairs)


def columns(param: torch.Tensor) -> int:
    """How many columns of J a parameter takes: two per entry of a complex one."""
    return param.numel() * (2 if param.is_complex() else 1)


def real_entries(grad: torch.Tensor) -> torch.Tensor:
    """A gradient as the flat real entries of J's columns (``columns``)."""
    return real_view(grad).reshape(-1)


@dataclass
class TaskGradients:
    """What one ``backward`` collected."""

    layout: Layout
    jacobian: torch.Tensor  # (T, d) over the shared parameters; rows may be reused next step
    other: list[list[tuple[int, torch.Tensor]]]  # per parameter index: (task, gradient) of non-shared params
    reached: list[int]  # per task: how many parameters it reaches

    def task_specific(self) -> list[tuple[int, torch.Tensor]]:
        return [(i, g) for entries in self.other for i, g in entries]

    def reached_params(self) -> list[torch.Tensor]:
        layout = self.layout
        shared = [layout.params[k] for k in layout.shared]
        return shared + [layout.params[k] for k, entries in enumerate(self.other) if entries]

    def signature(self, num_tasks: int) -> int:
        """A 31-bit fingerprint of which parameter is shared and which task reaches each task-specific one."""
        layout = self.layout
        parts: list[Any] = [
            num_tasks,
            layout.dim,
            str(layout.dtype),
            len(layout.params),
            tuple(layout.shared),
        ]
        parts.append(
            tuple((k, tuple(i for i, _ in entries)) for k, entries in enumerate(self.other) if entries)
        )
        return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def check_dense(
    params: list[torch.Tensor], shared: Sequence[int], grads: Sequence[torch.Tensor | None]
) -> None:
    """A shared parameter with a sparse gradient (an ``nn.Embedding(sparse=True)`` table) has no row in a
    dense Jacobian: ValueError pointing to the activation source, which handles it."""
    for k in shared:
        g = grads[k]
        if g is not None and g.is_sparse:
            raise ValueError(
                f"a shared parameter of shape {tuple(params[k].shape)} gets a sparse gradient (an embedding "
                "table with sparse=True?), which the per-task Jacobian cannot hold: pass the model, "
                "GradSurgery(opt, method, model=model), to take the gradients from the activations instead"
            )


def check_reached(reached: Sequence[int]) -> None:
    lost = [i for i, n in enumerate(reached) if n == 0]
    if lost:
        raise ValueError(f"loss(es) {lost} reach none of the optimizer's parameters")


class GradientCollector:
    """Collects per-task gradients with one ``autograd.grad`` per task into a reused buffer."""

    def __init__(self, shared_params: Sequence[torch.Tensor] | None = None) -> None:
        self.shared_override = None if shared_params is None else {id(p) for p in shared_params}
        self.layout: Layout | None = None
        self._buffer: torch.Tensor | None = None

    def _shared_indices(self, params: list[torch.Tensor], counts: list[int]) -> list[int]:
        if self.shared_override is not None:
            return [k for k, p in enumerate(params) if id(p) in self.shared_override]
        return [k for k, c in enumerate(counts) if c >= 2]

    def _jacobian_buffer(self, layout: Layout, num_tasks: int) -> torch.Tensor:
        buf = self._buffer
        if (
            buf is None
            or buf.shape != (num_tasks, layout.dim)
            or buf.dtype != layout.dtype
            or buf.device != layout.device
        ):
            buf = torch.empty(num_tasks, layout.dim, dtype=layout.dtype, device=layout.device)
            self._buffer = buf
        return buf

    def collect(
        self, losses: Sequence[torch.Tensor], params: list[torch.Tensor], retain_graph: bool = False
    ) -> TaskGradients:
        num_tasks = len(losses)
        layout = (
            self.layout
            if self.layout is not None and self.layout.matches(params, self.layout.shared)
            else None
        )
        jac = self._jacobian_buffer(layout, num_tasks) if layout is not None else None
        touched: list[set[int]] = [set() for _ in params]  # per parameter: the tasks that reach it
        reached = [0] * num_tasks
        kept: list[dict[int, torch.Tensor]] = [{} for _ in range(num_tasks)]
        for i, loss in enumerate(losses):
            grads = torch.autograd.grad(
                loss, params, retain_graph=retain_graph or i < num_tasks - 1, allow_unused=True
            )
            for k, g in enumerate(grads):
                if g is not None:
                    touched[k].add(i)
                    reached[i] += 1
                    if layout is None or k not in layout.slot:
                        kept[i][k] = g
            if layout is not None and jac is not None:  # jac is None exactly when layout is
                check_dense(params, layout.shared, grads)
                pieces = [
                    real_entries(g) if (g := grads[k]) is not None else jac.new_zeros(columns(params[k]))
                    for k in layout.shared
                ]
                if pieces:
                    torch.cat([p.to(layout.dtype) for p in pieces], out=jac[i])
            del grads
        shared = self._shared_indices(params, [len(t) for t in touched])
        if layout is None or jac is None or shared != layout.shared:
            layout, jac = self._relayout(params, shared, layout, jac, kept, touched)
        other: list[list[tuple[int, torch.Tensor]]] = [[] for _ in params]
        for i in range(num_tasks):
            for k, g in kept[i].items():
                if k not in layout.slot:
                    other[k].append((i, g))
        return TaskGradients(layout, jac, other, reached)

    def _relayout(
        self,
        params: list[torch.Tensor],
        shared: list[int],
        old_layout: Layout | None,
        old_jac: torch.Tensor | None,
        kept: list[dict[int, torch.Tensor]],
        touched: list[set[int]],
    ) -> tuple[Layout, torch.Tensor]:
        """The shared set changed (or this is the first step): lay the Jacobian out anew."""
        for got in kept:
            check_dense(params, shared, [got.get(k) for k in range(len(params))])
        layout = Layout.build(params, shared)
        num_tasks = len(kept)
        new_jac = torch.empty(num_tasks, layout.dim, dtype=layout.dtype, device=layout.device)
        for i in range(num_tasks):
            for slot, k in enumerate(layout.shared):
                dest = layout.segment(new_jac[i], slot)
                if k in kept[i]:
                    dest.copy_(real_entries(kept[i][k]))
                elif old_layout is not None and old_jac is not None and k in old_layout.slot:
                    dest.copy_(old_layout.segment(old_jac[i], old_layout.slot[k]))
                else:
                    dest.zero_()
            if old_layout is not None and old_jac is not None:
                # Parameters that stopped being shared keep their gradient as a task-specific one.
                for k, slot in old_layout.slot.items():
                    if k not in layout.slot and i in touched[k]:
                        kept[i][k] = old_layout.gradient(old_jac[i], slot).clone()
        self.layout = layout
        self._buffer = new_jac
        return layout, new_jac


class JacobianSource:
    """Full mode: the per-task gradients of every parameter, the exact Gram matrix of the shared ones."""

    mode = "full"
    collectives_in_collect = False
    name = "jacobian"

    def __init__(
        self,
        shared_params: Sequence[torch.Tensor] | None,
        gram_dtype: torch.dtype,
        scales_task_specific: bool,
    ) -> None:
        self.collector = GradientCollector(shared_params)
        self.gram_dtype = gram_dtype
        self.scales_task_specific = scales_task_specific

    def collect(
        self,
        losses: list[torch.Tensor],
        params: list[torch.Tensor],
        scaling: LossScaling | None,
        retain_graph: bool,
        no_sync: Callable[[], Any],
    ) -> JacobianCollection:
        grad_losses = losses if scaling is None else scaling.scale(losses)
        with no_sync():
            grads = self.collector.collect(grad_losses, params, retain_graph=retain_graph)
        check_reached(grads.reached)
        if scaling is not None:
            scaling.unscale(grads.jacobian, [g for _, g in grads.task_specific()])
        values = loss_values(losses, self.gram_dtype)
        return JacobianCollection(grads, values, self.gram_dtype, self.scales_task_specific)


class JacobianCollection:
    mode = "full"
    source = "jacobian"

    def __init__(
        self, grads: TaskGradients, values: torch.Tensor, gram_dtype: torch.dtype, scales_task_specific: bool
    ) -> None:
        self.grads = grads
        self.loss_values = values
        self.gram_dtype = gram_dtype
        self.scales_task_specific = scales_task_specific
        self.gram: torch.Tensor | None = None
        self._fuse: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.grads.reached)

    def signature(self) -> int:
        return self.grads.signature(self.num_tasks)

    def reduce(self, reduction: Reduction) -> None:
        specific = [g for _, g in self.grads.task_specific()]
        gram, values, self._fuse = reduction.jacobian(
            self.grads.jacobian, self.loss_values, specific, self.gram_dtype
        )
        self.gram, self.loss_values = gram, values.to(gram.device)

    def check_finite(self) -> None:
        check_finite(
            self.loss_values, self.gram, self.grads.task_specific(), params=self.grads.reached_params()
        )

    def gradients(self, weights: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """u = Jᵀw for the shared parameters, Σ_i s_i g_i for the others (s_i = 1, or w_i for loss
        weightings)."""
        layout = self.grads.layout
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        if layout.shared:
            if self._fuse is None:
                raise RuntimeError("the Jacobian collection's gradients are taken after reduce()")
            fused = self._fuse(weights)
            for slot, k in enumerate(layout.shared):
                out.append((layout.params[k], layout.gradient(fused, slot)))
        scale = TaskScale(weights, self.scales_task_specific)
        for k, entries in enumerate(self.grads.other):
            total = scale.total(entries)
            if total is not None:
                out.append((layout.params[k], total))
        return out

    def reached_params(self) -> list[torch.Tensor]:
        return self.grads.reached_params()
