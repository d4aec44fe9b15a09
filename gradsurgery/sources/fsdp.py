"""FSDP2 (``fully_shard``): the exact task gradients read from the shards that FSDP reduce-scatters.

Under FSDP2 each of the n ranks holds a dim-0 shard of every parameter (a ``DTensor``). ``autograd.grad``
cannot reach them (the graph holds the unsharded copies FSDP all-gathers for the forward), but ``backward``
does: FSDP's post-backward hook reduce-scatters the gradient, averaged over the ranks, into the sharded
``.grad``. With J_k the T×d_k block of the task gradients over rank k's shards (the shards partition the
columns of J), G = J Jᵀ = Σ_k J_k J_kᵀ. So, per step:

1. the ``.grad`` already there (gradient accumulation) is set aside and put back after step 2, also when
   it fails;
2. per task, ``L_i.backward()``: rank k copies its shard of the rank-averaged g_i (``.grad.to_local()``)
   and clears ``.grad``;
3. G = Σ_k J_k J_kᵀ: each rank's T×T Gram of its shards, summed over the ranks (one all-reduce of T²
   numbers, exact); the losses are averaged over the ranks;
4. u_k = J_kᵀ w on each rank, written back as a ``DTensor`` with the parameter's placement.

A parameter reached by one task gets that task's gradient (times w_i for loss weightings), as in the
Jacobian source. Loss weightings that need no Gram matrix take one backward of Σ_i w_i L_i instead of T.
Parameters that require grad but are not the optimizer's receive, through the T backward passes, Σ_i g_i
in their ``.grad``: what ``sum(losses).backward()`` would give them.

Cost per step: T backward passes, each with FSDP's all-gathers and reduce-scatter (T times the communication
of a plain step), T²·d/n for the Gram and T·d/n for u on each rank; memory T·d/n per rank for the task
gradients (each parameter's T shards, stacked into one matrix that replaces them). Supported: a 1-D mesh
(plain FSDP) or HSDP's 2-D mesh over every rank (G summed over one replica's shards: each replica holds
them all) on any backend, with FSDP's gradient sync on (the default).

Representation mode (``features=z``) over the same shards: ``FSDPFeatureSource``, one backward through the
trunk instead of T.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from .._collective import sum_in_place
from .._dtensor import local, shard_group, sharded_like
from ..gram import combine, gram_matrix, real_view
from . import NonFiniteError, TaskScale, check_finite, entries, exactly_finite, finite_screens, loss_values
from ._feature_graph import split_at_features
from .features import (
    PARAMETER_GRADIENT,
    FeatureCollection,
    FeatureSource,
    Passes,
    feature_jacobian,
    feature_layout,
    split_jacobian,
)
from .weighted import WeightedCollection

if TYPE_CHECKING:
    from ..amp import LossScaling
    from ..distributed import Reduction


@contextmanager
def grads_set_aside(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Clear ``.grad`` for the duration and put the original objects back afterwards (also on error)."""
    kept = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, kept, strict=True):
            p.grad = g


def reaches_nothing(tasks: Sequence[int]) -> ValueError:
    return ValueError(
        f"loss(es) {list(tasks)} reach none of the optimizer's parameters (under FSDP2 the gradients are "
        "read from the shards FSDP reduce-scatters: keep its gradient sync on, set_requires_gradient_sync"
        "(True))"
    )


class FSDPSource:
    """Full mode for FSDP2 parameters: the per-task gradient shards, the exact Gram matrix summed over the
    ranks."""

    mode = "full"
    collectives_in_collect = True
    name = "fsdp"

    def __init__(
        self,
        shared_params: Sequence[torch.Tensor] | None,
        gram_dtype: torch.dtype,
        scales_task_specific: bool,
        needs_gram: bool,
    ) -> None:
        self.shared_override = None if shared_params is None else {id(p) for p in shared_params}
        self.gram_dtype = gram_dtype
        self.scales_task_specific = scales_task_specific
        self.needs_gram = needs_gram

    def collect(
        self,
        losses: list[torch.Tensor],
        params: list[torch.Tensor],
        scaling: LossScaling | None,
        retain_graph: bool,
        no_sync: Callable[[], Any],
    ) -> FSDPCollection | FSDPWeightedCollection:
        values = loss_values(losses, self.gram_dtype)
        if not self.needs_gram:
            return FSDPWeightedCollection(losses, params, values, scaling, retain_graph, no_sync)
        grad_losses = losses if scaling is None else scaling.scale(losses)
        shards: list[dict[int, torch.Tensor]] = []  # per task: param index -> this rank's gradient shard
        with grads_set_aside(params):
            for i, loss in enumerate(grad_losses):
                torch.autograd.backward(loss, retain_graph=retain_graph or i < len(losses) - 1)
                got = {k: local(p.grad).clone() for k, p in enumerate(params) if p.grad is not None}
                for p in params:
                    p.grad = None
                shards.append(got)
        lost = [i for i, got in enumerate(shards) if not got]
        if lost:
            raise reaches_nothing(lost)
        if scaling is not None:
            factor = scaling.scale_factor()
            for got in shards:
                for g in got.values():
                    g.div_(factor)
        return FSDPCollection(self, params, shards, values)

    def is_shared(self, param: torch.Tensor, reached_by: int) -> bool:
        if self.shared_override is not None:
            return id(param) in self.shared_override
        return reached_by >= 2


class FSDPCollection:
    mode = "full"
    source = "fsdp"

    def __init__(
        self,
        owner: FSDPSource,
        params: list[torch.Tensor],
        shards: list[dict[int, torch.Tensor]],
        values: torch.Tensor,
    ) -> None:
        self.params = params
        self.shards = shards
        self.loss_values = values
        self.gram_dtype = owner.gram_dtype
        self.scales_task_specific = owner.scales_task_specific
        reached_by = [[i for i, got in enumerate(shards) if k in got] for k in range(len(params))]
        self.reached_by = reached_by
        self.shared = [
            k for k, p in enumerate(params) if reached_by[k] and owner.is_shared(p, len(reached_by[k]))
        ]
        shared = set(self.shared)
        self.specific = [k for k in range(len(params)) if reached_by[k] and k not in shared]
        self.gram: torch.Tensor | None = None
        self._specific_norms: torch.Tensor | None = None
        self._stacks: dict[int, torch.Tensor] = {}  # shared parameter index -> (T, local numel), by reduce

    @property
    def num_tasks(self) -> int:
        return len(self.shards)

    def signature(self) -> int:
        """A 31-bit fingerprint of the global shapes, which tasks reach each parameter and which are shared
        (the same on every rank whatever the size of its shards)."""
        parts = [
            self.num_tasks,
            [(tuple(p.shape), tuple(by)) for p, by in zip(self.params, self.reached_by, strict=True)],
            self.shared,
        ]
        return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF

    def _stack(self, k: int) -> torch.Tensor:
        """Parameter k's T task-gradient shards as a (T, local numel) matrix (zeros for the tasks that do
        not reach it); the separate shards are dropped, so the memory stays T shards."""
        shard = local(self.params[k])
        rows = [got.pop(k, None) for got in self.shards]
        like = next(g for g in rows if g is not None)
        return torch.stack([(g if g is not None else torch.zeros_like(like)).reshape(-1) for g in rows]).view(
            self.num_tasks, shard.numel()
        )

    def reduce(self, reduction: Reduction) -> None:
        """G and the squared norms of the task-specific gradients, summed over the shards (one all-reduce
        over the ranks that hold them: on an HSDP mesh, each replica holds them all); the losses averaged
        over every rank."""
        t = self.num_tasks
        device = self.loss_values.device
        partial = torch.zeros(t, t, dtype=self.gram_dtype, device=device)
        for k in self.shared:
            self._stacks[k] = self._stack(k)
            partial += gram_matrix(self._stacks[k], self.gram_dtype).to(device)
        norms = torch.zeros(t, dtype=self.gram_dtype, device=device)
        for k in self.specific:
            for i in self.reached_by[k]:
                norms[i] += real_view(self.shards[i][k]).to(self.gram_dtype).pow(2).sum().to(device)
        packed = torch.cat([partial.reshape(-1), norms])
        if reduction.group is not None:
            sum_in_place([packed], shard_group(self.params[0]))
        self.gram = packed[: t * t].view(t, t)
        self._specific_norms = packed[t * t :]
        self.loss_values = reduction.average(self.loss_values)

    def check_finite(self) -> None:
        norms = self._specific_norms
        reached = sorted({i for k in self.specific for i in self.reached_by[k]})
        task_norms = [(i, norms[i]) for i in reached] if norms is not None else []
        check_finite(self.loss_values, self.gram, task_norms, params=self.reached_params())

    def gradients(self, weights: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """u_k = J_kᵀw for the shared parameters, Σ_i s_i g_i for the others (s_i = 1, or w_i for loss
        weightings), each as a sharded DTensor."""
        if len(self._stacks) != len(self.shared):
            raise RuntimeError("the FSDP collection's gradients are taken after reduce()")
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for k in self.shared:
            stacked = self._stacks[k]
            fused = combine(weights, stacked)
            out.append((self.params[k], sharded_like(self.params[k], fused)))
        scale = TaskScale(weights, self.scales_task_specific)
        for k in self.specific:
            total = scale.total((i, self.shards[i][k]) for i in self.reached_by[k])
            if total is not None:  # every task-specific parameter is reached by some task
                out.append((self.params[k], sharded_like(self.params[k], total)))
        return out

    def reached_params(self) -> list[torch.Tensor]:
        return [self.params[k] for k in self.shared + self.specific]


class FSDPWeightedCollection(WeightedCollection):
    """A loss weighting without Gram matrix under FSDP2: the losses averaged over the ranks, then one
    ``backward`` of Σ_i w_i L_i whose gradient FSDP reduce-scatters."""

    source = "fsdp"

    def gradients(self, weights: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.reduction is None:
            raise RuntimeError("the weighted collection's gradients are taken after reduce()")
        total = self.weighted_loss(weights)
        with grads_set_aside(self.params):
            torch.autograd.backward(total, retain_graph=self.retain_graph)
            got = [(p, local(p.grad).clone()) for p in self.params if p.grad is not None]
        if not got:
            raise reaches_nothing(range(self.num_tasks))
        finite_on_every_rank(
            [g for _, g in got], self.reduction, [p for p, _ in got], "gradient of the weighted loss"
        )
        factor = 1.0 if self.scaling is None else self.scaling.scale_factor()
        return [(p, sharded_like(p, g / factor if factor != 1.0 else g)) for p, g in got]


def finite_on_every_rank(
    shards: Sequence[torch.Tensor], reduction: Reduction, params: Sequence[torch.Tensor], what: str
) -> None:
    """``NonFiniteError`` on every rank when some rank's shard holds a NaN or inf (all ranks stop together).
    Each shard is read once for its screen (``sources.finite_screens``: one sum per tensor in its own dtype,
    no float64 copy of a shard), the screens summed over the ranks in float64 (one all-reduce of a number per
    tensor); only where a summed screen is not finite (a NaN or inf, or finite entries whose sum overflowed)
    are the shards' exact extremes read and their verdicts summed over the ranks."""
    if not shards:  # nothing reached, on every rank alike
        return
    values = [entries(g) for g in shards]
    device = values[0].device
    filled = [k for k, v in enumerate(values) if v.numel()]
    screens = torch.zeros(len(values), dtype=torch.float64, device=device)
    if filled:
        screens[filled] = torch.stack(finite_screens([values[k] for k in filled])).to(torch.float64)
    reduction.sum_in_place([screens])
    suspects = [k for k, v in enumerate(screens.tolist()) if not math.isfinite(v)]
    if not suspects:
        return
    failed = torch.tensor(
        [float(not exactly_finite(values[k])) for k in suspects], dtype=torch.float64, device=device
    )
    reduction.sum_in_place([failed])
    if bool((failed > 0).any()):
        raise NonFiniteError(f"non-finite (NaN/inf) {what}; nothing was written", params)


class FSDPFeatureSource(FeatureSource):
    """Representation mode for FSDP2 parameters (``backward(losses, features=z)``).

    ``autograd.grad`` reaches z through the heads (FSDP all-gathers their shards for the pass as for any
    backward), so J_z is taken as on one process: one pass split at z where the heads' graph allows it
    (FSDP's own hook on the features it returns passes the gradient through), else one per task. The
    parameters, which ``autograd.grad`` cannot reach, get their gradients from one ``backward`` of the
    losses in which the gradient arriving at z is replaced by u_z
    (``FeatureCollection.gradients``): FSDP reduce-scatters it, averaged over the ranks, and each rank reads
    its shards. So the trunk gets the mean over the ranks of each rank's (∂z/∂θ)ᵀ u_z and each head s_i
    times its task's mean gradient: one process's step on the concatenated batch, with G_z = Σ_r G_r / n²
    (``Reduction.feature_gram``). Task views are refused: their leaves end the losses' graph at the heads,
    and a separate pass from z would run outside FSDP's backward hooks of the root module. Cost: two passes
    through the heads (T + 1 where the graph does not split at z) and one through the trunk, with FSDP's
    all-gathers in each. A loss weighting (``needs_gram`` False) takes full mode's one ``backward`` of
    Σ_i w_i L_i instead (``FSDPWeightedCollection``)."""

    collectives_in_collect = True

    def _passes(self, retain_graph: bool, no_sync: Callable[[], Any], scaling: LossScaling | None) -> Passes:
        return ShardPasses(retain_graph, no_sync, scaling)

    def _weighted(
        self, losses: list[torch.Tensor], params: list[torch.Tensor], values: torch.Tensor, passes: Passes
    ) -> WeightedCollection:
        self._refuse_views()
        return FSDPWeightedCollection(
            losses, params, values, passes.scaling, passes.retain_graph, passes.no_sync, self.mode
        )

    def _collection(
        self, losses: list[torch.Tensor], params: list[torch.Tensor], values: torch.Tensor, passes: Passes
    ) -> FeatureCollection:
        self._refuse_views()
        split = split_at_features(losses, self.features)
        if split is not None:
            jac, _ = split_jacobian(losses, self.features, split, [], keep=True)
            spans = feature_layout(self.features)[1]
        else:
            jac, spans = feature_jacobian(losses, self.features)
        return ShardedFeatureCollection(
            self, losses, params, passes.unscaled_jacobian(jac), spans, values, passes
        )

    def _refuse_views(self) -> None:
        if self.views is not None:
            raise ValueError(
                "representation mode over FSDP2 (fully_shard) parameters takes the features themselves "
                "(backward(losses, features=z)), not task_views: the views end each loss's graph at its "
                "head, and the trunk's pass must start from the losses to run under FSDP's backward hooks"
            )


class ShardPasses(Passes):
    """A pass after the weights over FSDP2 parameters: one ``backward`` (FSDP reduce-scatters each gradient,
    averaged over the ranks), ``.grad`` set aside around it; returns this rank's shards, unscaled."""

    def gradients(
        self, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], seeds: Sequence[torch.Tensor]
    ) -> Sequence[torch.Tensor | None]:
        with self.no_sync(), grads_set_aside(inputs):
            torch.autograd.backward(outputs, seeds, retain_graph=self.retain_graph)
            shards = [None if p.grad is None else local(p.grad) for p in inputs]
        return self.unscaled(shards)


class ShardedFeatureCollection(FeatureCollection):
    """Representation mode's collection over FSDP2 parameters (``FSDPFeatureSource``): the gradients come
    averaged over the ranks from FSDP itself; their finiteness is agreed over the ranks."""

    source = "fsdp"

    def _averaged(self, grads: Sequence[torch.Tensor | None]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.reduction is None:
            raise RuntimeError("the feature collection's gradients are taken after reduce()")
        got = [(p, g) for p, g in zip(self.params, grads, strict=True) if g is not None]
        finite_on_every_rank([g for _, g in got], self.reduction, [p for p, _ in got], PARAMETER_GRADIENT)
        return [(p, sharded_like(p, g)) for p, g in got]
