"""Representation mode: task weights from the gradients with respect to the shared features, one backward.

MGDA-UB (Sener & Koltun 2018, section 3.3). With an encoder z = f(x; θ_sh) read by every task head, the
chain rule gives ∇_θ L_i = (∂z/∂θ)ᵀ ∇_z L_i, hence for any weights w

    ‖Σ_i w_i ∇_θ L_i‖ ≤ ‖∂z/∂θ‖ · ‖Σ_i w_i ∇_z L_i‖.

``GradSurgery.backward(losses, features=z)`` therefore

1. takes the T per-task gradients ∇_z L_i (the backward stops at z: it runs through the heads only),
   flattened over the batch into a T×D matrix J_z, and its Gram matrix G_z = J_z J_zᵀ;
2. lets the method turn G_z (and the losses) into weights w, exactly as in full mode;
3. sends u_z = Σ_i w_i ∇_z L_i through the trunk, which thus receives (∂z/∂θ)ᵀ u_z = Σ_i w_i ∇_θ L_i, the
   gradient of Σ_i w_i L_i; each head receives s_i times its task's gradient (s_i = w_i for loss-weighting
   methods, 1 otherwise), as in full mode.

How the heads are traversed:

- **Once**, when no node between the losses and z serves two losses (separate heads, the usual case; read
  on the graph by ``_feature_graph.split_at_features``): one backward pass of Σ_i L_i through the heads, a
  hook on each node that sends a gradient into z moving it to its task's row of J_z, gives every ∇_z L_i and
  the heads' gradients (seeds 1) at once; after the weights, one backward pass of u_z from z through the
  trunk (``SplitCollection``).
- **Once**, with **task views** (``task_views(z, T)``): each head reads its own view of z (a leaf sharing z's
  memory), where the same pass lands its ∇_z L_i; that each loss reads only its own view is checked on the
  graph (``ViewCollection``).
- **T + 1 times** otherwise (a head layer shared by the tasks, a weight tied between a head and the trunk, a
  loss that reads the trunk directly, a feature downstream of another, a gradient hook on a feature): one
  ``autograd.grad`` per task for J_z, then one backward pass of the losses with seeds s_i in which the
  gradient arriving at z is replaced by u_z (``FeatureCollection``).

In the first two, a loss weighting that forms G_z (GradNorm; the others with ``diagnostics=True``, below)
scales the head gradient of a parameter one task reaches by that task's weight, and passes the heads again
with seeds w_i only when several tasks reach a head parameter. All three
give the same gradients. Cost: the heads' passes above, O(T² D) for G_z, one backward pass through the trunk,
and one read of every gradient written, which must be finite as in full mode (``sources.finite_gradients``).

This is an approximation of the full mode: the weights are exact for the method's objective posed on z
(for MGDA: the min-norm combination of the ∇_z L_i), which for the parameters is an upper bound (above),
not the problem itself. When the trunk is the identity (z is itself the shared parameter), both modes
coincide exactly.

The loss weightings that read only the losses (``Method.needs_gram`` False: ``"sum"``, ``"dwa"``,
``"uncertainty"``, ``"rlw"``, ``"famo"``, unless ``diagnostics=True``) need no G_z, and the gradient they
write, w_i times each task's for every parameter, is that of Σ_i w_i L_i: ``FeatureSource`` takes it by one
backward, as full mode does (``sources.weighted``; over task views, one pass through the heads to the views
and one from z through the trunk: ``WeightedViewCollection``), so both modes write the same gradients. The
features are then not read for their reach (a loss that does not depend on them changes nothing there);
task views are still checked.

Assumption: every path from a loss to the shared parameters passes through ``features``. A path that
bypasses them (e.g. a penalty on trunk weights added to one task's loss) contributes s_i times its
gradient, not w_i times.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .._validation import check_int
from ..gram import combine, gram_matrix
from . import TaskScale, check_finite, finite_gradients, loss_values, unit_seeds
from ._feature_graph import HeadSplit, split_at_features
from .weighted import WeightedCollection

if TYPE_CHECKING:
    from ..amp import LossScaling
    from ..distributed import Reduction

# What the check of the written gradients names: G_z and the losses were checked before the weights, but a
# head parameter's gradient, or the trunk's from a finite u_z, can be non-finite on its own (a NaN-producing
# backward away from z).
PARAMETER_GRADIENT = (
    "gradient of a parameter in the pass through the heads or the trunk (the gradients with respect to the "
    "features are finite)"
)


class TaskViews(list[torch.Tensor | list[torch.Tensor]]):
    """What ``task_views`` returns: ``views[i]`` is task i's view of the features (a tensor, or a list of
    tensors for several features); pass the whole object as ``backward(losses, features=views)``."""

    def __init__(self, features: list[torch.Tensor], views: list[list[torch.Tensor]], single: bool) -> None:
        super().__init__(v[0] if single else v for v in views)
        self.features = features
        self.leaves = views
        self.single = single

    def of_tasks(self, tasks: list[int]) -> TaskViews:
        """The views of ``tasks`` only, in that order (a step whose other tasks are absent)."""
        return TaskViews(self.features, [self.leaves[i] for i in tasks], self.single)


def task_views(features: torch.Tensor | Sequence[torch.Tensor], num_tasks: int) -> TaskViews:
    """One view of the shared features per task, for representation mode with a single pass through the heads:
    ``views = task_views(z, T)``; head i reads ``views[i]``; ``opt.backward(losses, features=views)``. Each
    view is a leaf that shares z's memory (no copy)."""
    single = isinstance(features, torch.Tensor)
    tensors = check_features(features)
    count = check_int(num_tasks, "num_tasks", minimum=1)
    views = [[z.detach().requires_grad_(True) for z in tensors] for _ in range(count)]
    return TaskViews(tensors, views, single)


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


def feature_layout(features: list[torch.Tensor]) -> tuple[torch.dtype, list[tuple[int, int]], int]:
    """The dtype of J_z (the features' promoted dtype), each feature's (start, end) column range and the
    column count."""
    dtype = features[0].dtype
    for z in features[1:]:
        dtype = torch.promote_types(dtype, z.dtype)
    spans, total = [], 0
    for z in features:
        spans.append((total, total + z.numel()))
        total += z.numel()
    return dtype, spans, total


def check_reach(lost: list[int], unused: list[int], features: list[torch.Tensor]) -> None:
    """ValueError when a loss does not depend on any feature, or a feature feeds no loss: the weights would
    then be meaningless."""
    if not lost and not unused:
        return
    # DistributedDataParallel with find_unused_parameters=True or static_graph=True returns each output of
    # the forward through a node of its own: heads computed inside the forward read the tensor before it.
    sink = any(type(z.grad_fn).__name__ == "_DDPSinkBackward" for z in features)
    hint = (
        "; the features are an output of DistributedDataParallel (find_unused_parameters=True or "
        "static_graph=True), which passes each output through its own autograd node: apply the heads to the "
        "returned features outside the DDP forward, or pass task_views(z, T) to them"
        if sink
        else ""
    )
    if lost:
        raise ValueError(
            f"loss(es) {lost} do not depend on the features: every task head must read the shared "
            f"representation passed as features={hint}"
        )
    raise ValueError(f"features {unused} are on the path of no loss{hint}")


def feature_jacobian(
    losses: list[torch.Tensor], features: list[torch.Tensor]
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """J_z: row i is ∇_z L_i flattened (over the batch too) and concatenated over the features, one
    ``autograd.grad`` per loss.

    Returns J_z and the (start, end) column range of each feature. Raises ``ValueError`` when a loss does
    not depend on any feature, or a feature feeds no loss (``check_reach``).
    """
    dtype, spans, total = feature_layout(features)
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
    check_reach(lost, [j for j, f in enumerate(feeds) if not f], features)
    return jac, spans


class FeatureSource:
    """Representation mode: weights from the task gradients with respect to the shared features."""

    mode = "representation"
    collectives_in_collect = False
    name = "features"

    def __init__(
        self,
        features: torch.Tensor | Sequence[torch.Tensor],
        gram_dtype: torch.dtype,
        scales_task_specific: bool,
        needs_gram: bool = True,
    ) -> None:
        self.views = features if isinstance(features, TaskViews) else None
        self.features = self.views.features if self.views is not None else check_features(features)
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
    ) -> FeatureCollection | WeightedCollection:
        values = loss_values(losses, self.gram_dtype)
        passes = self._passes(retain_graph, no_sync, scaling)
        if not self.needs_gram:
            return self._weighted(losses, params, values, passes)
        if scaling is not None:
            losses = scaling.scale(losses)
        return self._collection(losses, params, values, passes)

    def _weighted(
        self, losses: list[torch.Tensor], params: list[torch.Tensor], values: torch.Tensor, passes: Passes
    ) -> WeightedCollection:
        """A loss weighting's step (``needs_gram`` False): its weights need no G_z, and the gradient it
        writes, Σ_i w_i ∇_θ L_i for every parameter, is that of Σ_i w_i L_i: one backward of it, as in full
        mode (``sources.weighted``); over task views, the heads to the views, then the trunk from z."""
        if self.views is not None:
            return WeightedViewCollection(self.views, losses, params, values, passes)
        return WeightedCollection(
            losses, params, values, passes.scaling, passes.retain_graph, passes.no_sync, self.mode
        )

    def _passes(self, retain_graph: bool, no_sync: Callable[[], Any], scaling: LossScaling | None) -> Passes:
        return Passes(retain_graph, no_sync, scaling)

    def _collection(
        self, losses: list[torch.Tensor], params: list[torch.Tensor], values: torch.Tensor, passes: Passes
    ) -> FeatureCollection:
        """J_z from one pass through the heads (over task views, or split at the features), else one per
        task (``losses`` scaled already)."""
        with passes.no_sync():
            if self.views is not None:
                return ViewCollection(self, losses, params, values, passes)
            split = split_at_features(losses, self.features)
            if split is not None:
                return SplitCollection(self, losses, params, values, passes, split)
            jac, spans = feature_jacobian(losses, self.features)
        return FeatureCollection(self, losses, params, passes.unscaled_jacobian(jac), spans, values, passes)


class Passes:
    """How a collection's backward passes run: whether they keep the graph, inside the DDP module's
    ``no_sync()``, and under which loss scale. With a GradScaler the passes run on the scaled losses (the
    features' gradients in the scaler's range) and their results are divided by s: J_z, in float32 at least
    so that the division cannot flush it, and every parameter gradient, which the write-back scales again;
    the trunk's pass is seeded with s·u_z (``FeatureCollection._fused_targets``). The written gradient is
    then that of the full mode's recipe (``gradsurgery.amp``)."""

    def __init__(self, retain_graph: bool, no_sync: Callable[[], Any], scaling: LossScaling | None) -> None:
        self.retain_graph = retain_graph
        self.no_sync = no_sync
        self.scaling = scaling

    def unscaled_jacobian(self, jac: torch.Tensor) -> torch.Tensor:
        if self.scaling is None:
            return jac
        jac = jac.to(torch.promote_types(jac.dtype, torch.float32))  # a fresh J_z: divided in place
        self.scaling.unscale(jac, ())
        return jac

    def unscaled(self, grads: Sequence[torch.Tensor | None]) -> Sequence[torch.Tensor | None]:
        if self.scaling is None:
            return grads
        factor = self.scaling.scale_factor()
        return [None if g is None else g / factor for g in grads]

    def gradients(
        self, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], seeds: Sequence[torch.Tensor]
    ) -> Sequence[torch.Tensor | None]:
        """A pass after the weights: the gradients of ``inputs`` (None where unreached), unscaled."""
        with self.no_sync():
            grads = torch.autograd.grad(
                outputs, inputs, grad_outputs=seeds, retain_graph=self.retain_graph, allow_unused=True
            )
        return self.unscaled(grads)


class FeatureCollection:
    """Under data parallelism each rank holds its own samples' features: G_z is summed over the ranks
    (``Reduction.feature_gram``), each rank sends its u_z through its trunk, and the parameter gradients are
    averaged over the ranks (one all-reduce, as DDP's): the step of one process on the concatenated batch."""

    mode = "representation"
    source = "features"

    def __init__(
        self,
        source: FeatureSource,
        losses: list[torch.Tensor],
        params: list[torch.Tensor],
        jac: torch.Tensor,
        spans: list[tuple[int, int]],
        values: torch.Tensor,
        passes: Passes,
    ) -> None:
        self.features = source.features
        self.gram_dtype = source.gram_dtype
        self.losses = losses
        self.params = params
        self.jac = jac
        self.spans = spans
        self.loss_values = values
        self.passes = passes
        self.scales_task_specific = source.scales_task_specific
        self.gram: torch.Tensor | None = None
        self.reduction: Reduction | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.losses)

    def signature(self) -> int:
        return 0

    def reduce(self, reduction: Reduction) -> None:
        gram = gram_matrix(self.jac, self.gram_dtype)
        self.gram, self.loss_values = reduction.feature_gram(gram, self.loss_values.to(gram.device))
        self.reduction = reduction

    def _averaged(self, grads: Sequence[torch.Tensor | None]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, gradient) pairs of the reached parameters, the gradients averaged over the ranks and
        checked finite."""
        if self.reduction is None:
            raise RuntimeError("the feature collection's gradients are taken after reduce()")
        averaged = self.reduction.average_gradients(self.params, grads)
        return finite_gradients(
            [(p, g) for p, g in zip(self.params, averaged, strict=True) if g is not None], PARAMETER_GRADIENT
        )

    def check_finite(self) -> None:
        check_finite(
            self.loss_values, self.gram, gradient="gradient with respect to the features", params=self.params
        )

    def gradients(self, weights: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One backward pass: the heads get s_i ∇L_i, the trunk the fused gradient through z."""
        if not self.params:
            return []
        targets = self._fused_targets(weights)
        if self.scales_task_specific:
            seeds = self._weight_seeds(weights)
        else:
            seeds = unit_seeds(self.losses)
        # The hook replaces the gradient reaching z (Σ_i s_i ∇_z L_i) by Σ_i w_i ∇_z L_i, so the trunk gets
        # the fused gradient while the heads keep their full-mode gradient; all within one pass.
        handles = [
            z.register_hook(lambda _grad, target=target: target)
            for z, target in zip(self.features, targets, strict=True)
        ]
        try:
            grads = self.passes.gradients(self.losses, self.params, seeds)
        finally:
            for handle in handles:
                handle.remove()
        return self._averaged(grads)

    def reached_params(self) -> list[torch.Tensor]:
        return self.params

    def _fused_targets(self, weights: torch.Tensor) -> list[torch.Tensor]:
        """u_z = Σ_i w_i ∇_z L_i (times the loss scale s under a GradScaler), split back into the shapes and
        dtypes of the features: scaled before the cast, so that a half-precision feature's share is not
        flushed before s lifts it."""
        fused = combine(weights, self.jac)
        if self.passes.scaling is not None:
            fused = fused * self.passes.scaling.scale_factor()
        spans = zip(self.features, self.spans, strict=True)
        return [fused[start:end].view_as(z).to(z.dtype) for z, (start, end) in spans]

    def _weight_seeds(self, weights: torch.Tensor) -> list[torch.Tensor]:
        """w_i as the seed of loss i's backward pass (a loss weighting's heads get w_i ∇L_i)."""
        return [weights[i].to(device=loss.device, dtype=loss.dtype) for i, loss in enumerate(self.losses)]


class WeightedViewCollection(WeightedCollection):
    """The gradient of Σ_i w_i L_i over task views, for a loss weighting: the views are leaves, so it takes
    two passes, one through the heads with seeds w_i (to the views and to every parameter the losses reach
    beyond them), then one from the features through the trunk with u_z, the sum of the views' gradients
    (Σ_i w_i ∇_z L_i). The views are checked as for the other methods (``check_own_views``), so that the
    same wiring is accepted and refused whatever the method; no Gram matrix; the step of
    ``WeightedCollection`` otherwise."""

    def __init__(
        self,
        views: TaskViews,
        losses: list[torch.Tensor],
        params: list[torch.Tensor],
        values: torch.Tensor,
        passes: Passes,
    ) -> None:
        check_own_views(losses, views.leaves)
        super().__init__(
            losses, params, values, passes.scaling, passes.retain_graph, passes.no_sync, FeatureSource.mode
        )
        self.views = views

    def _backward(self, weights: torch.Tensor) -> Sequence[torch.Tensor | None]:
        losses = self.losses if self.scaling is None else self.scaling.scale(self.losses)
        leaves = [z for view in self.views.leaves for z in view]
        grads = torch.autograd.grad(
            losses,
            leaves + self.params,
            self._seeds(weights),
            retain_graph=self.retain_graph,
            allow_unused=True,
        )
        heads, per_view = grads[len(leaves) :], len(self.views.features)
        features, targets = [], []
        for j, z in enumerate(self.views.features):
            reaching = [g for g in grads[j : len(leaves) : per_view] if g is not None]
            if reaching:
                features.append(z)
                targets.append(reaching[0] if len(reaching) == 1 else torch.stack(reaching).sum(0))
        if not features:
            return heads
        trunk = torch.autograd.grad(
            features, self.params, targets, retain_graph=self.retain_graph, allow_unused=True
        )
        return summed(heads, trunk)


class OnePassCollection(FeatureCollection):
    """Representation mode with one pass through the heads: a backward pass of Σ_i L_i gives every ∇_z L_i
    and the heads' own gradients (seeds 1), then one pass of u_z through the trunk. A loss weighting scales
    the head gradient of a parameter one task reaches by that task's weight, and takes a second pass through
    the heads, with seeds w_i, only when several tasks reach a head parameter.

    Subclasses say how the first pass lands each ∇_z L_i apart (``_heads_pass``)."""

    def __init__(
        self,
        source: FeatureSource,
        losses: list[torch.Tensor],
        params: list[torch.Tensor],
        values: torch.Tensor,
        passes: Passes,
        reached: list[set[int]],
    ) -> None:
        owners: dict[int, list[int]] = {}
        for i, ids in enumerate(reached):
            for key in ids:
                owners.setdefault(key, []).append(i)
        self.head_owners = [owners.get(id(p), []) for p in params]
        self.head_params = [p for p, tasks in zip(params, self.head_owners, strict=True) if tasks]
        self.second_pass = source.scales_task_specific and any(len(o) > 1 for o in self.head_owners)
        self.layout = feature_layout(source.features)
        jac, own = self._heads_pass(source, losses, passes.retain_graph or self.second_pass)
        jac = passes.unscaled_jacobian(jac)
        super().__init__(source, losses, params, jac, self.layout[1], values, passes)
        self.head_grads = self._on_params(passes.unscaled(own))

    def _heads_pass(
        self, source: FeatureSource, losses: list[torch.Tensor], keep: bool
    ) -> tuple[torch.Tensor, Sequence[torch.Tensor | None]]:
        """J_z and the gradients of ``head_params`` from one backward pass of Σ_i L_i through the heads (the
        losses as the pass's roots, each with seed 1: no summing nodes)."""
        raise NotImplementedError

    def _on_params(self, head_grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Gradients of ``head_params`` placed on ``params`` (None where no head reaches)."""
        given = iter(head_grads)
        return [next(given) if tasks else None for tasks in self.head_owners]

    def gradients(self, weights: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The trunk through z with u_z; the heads from the first pass, or again with seeds w_i for a loss
        weighting."""
        if not self.params:
            return []
        trunk = self.passes.gradients(self.features, self.params, self._fused_targets(weights))
        heads: Sequence[torch.Tensor | None] = self.head_grads
        if self.second_pass:
            heads = self._on_params(
                self.passes.gradients(self.losses, self.head_params, self._weight_seeds(weights))
            )
        elif self.scales_task_specific:
            scale = TaskScale(weights, True)
            heads = [
                g if g is None else scale(owners[0], g)
                for g, owners in zip(heads, self.head_owners, strict=True)
            ]
        return self._averaged(summed(trunk, heads))


class ViewCollection(OnePassCollection):
    """Over task views: head i reads its own leaf view of z, where the first pass lands ∇_z L_i."""

    def __init__(
        self,
        source: FeatureSource,
        losses: list[torch.Tensor],
        params: list[torch.Tensor],
        values: torch.Tensor,
        passes: Passes,
    ) -> None:
        views = source.views
        if views is None:
            raise TypeError("ViewCollection needs a FeatureSource over task_views(...)")
        self.views = views
        reached = check_own_views(losses, views.leaves)
        super().__init__(source, losses, params, values, passes, reached)

    def _heads_pass(
        self, source: FeatureSource, losses: list[torch.Tensor], keep: bool
    ) -> tuple[torch.Tensor, Sequence[torch.Tensor | None]]:
        leaves = [z for view in self.views.leaves for z in view]
        grads = torch.autograd.grad(
            losses, leaves + self.head_params, unit_seeds(losses), retain_graph=keep, allow_unused=True
        )
        features = self.views.features
        per_view = len(features)
        rows = []
        for i in range(len(self.views.leaves)):
            parts = zip(grads[i * per_view : (i + 1) * per_view], features, strict=True)
            flat = [(torch.zeros_like(z) if g is None else g).reshape(-1) for g, z in parts]
            rows.append(flat[0] if per_view == 1 else torch.cat(flat))  # one copy, by the stack below
        return torch.stack(rows), grads[len(leaves) :]


class SplitCollection(OnePassCollection):
    """Over the features themselves, with the heads' graph split at them (``_feature_graph``): a hook on each
    node that sends a gradient into a feature adds it to its task's row of J_z during the first pass."""

    def __init__(
        self,
        source: FeatureSource,
        losses: list[torch.Tensor],
        params: list[torch.Tensor],
        values: torch.Tensor,
        passes: Passes,
        split: HeadSplit,
    ) -> None:
        self.split = split
        super().__init__(source, losses, params, values, passes, split.reached)

    def _heads_pass(
        self, source: FeatureSource, losses: list[torch.Tensor], keep: bool
    ) -> tuple[torch.Tensor, Sequence[torch.Tensor | None]]:
        return split_jacobian(losses, source.features, self.split, self.head_params, keep)


def summed(
    first: Sequence[torch.Tensor | None], second: Sequence[torch.Tensor | None]
) -> list[torch.Tensor | None]:
    """Each parameter's gradient from two passes (the heads' and the trunk's): their sum, or the one that
    reached it (None where neither did)."""
    return [b if a is None else a if b is None else a + b for a, b in zip(first, second, strict=True)]


def check_own_views(losses: list[torch.Tensor], views: list[list[torch.Tensor]]) -> list[set[int]]:
    """ValueError unless there is a view per loss and loss i reaches task i's view and no other's (read on
    the autograd graph); returns, per loss, the ids of the other leaves it reaches (the heads' parameters)."""
    if len(views) != len(losses):
        raise ValueError(f"{len(views)} task views for {len(losses)} losses")
    owner = {id(z): i for i, view in enumerate(views) for z in view}
    leaves: list[set[int]] = []
    for i, loss in enumerate(losses):
        reached: set[int] = set()
        others: set[int] = set()
        # Visited nodes are kept alive: a node's Python object lives only while something refers to it, and
        # once freed its id() can be handed to another node's object (seen on torch 2.11); alive, a node
        # keeps its one object, and its id names it.
        stack, seen = [loss.grad_fn], {}
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen[id(node)] = node
            children = node.next_functions
            if children:
                for child, _ in children:
                    stack.append(child)
                continue
            variable = getattr(node, "variable", None)  # an AccumulateGrad node (it has no children): a leaf
            if variable is not None:
                if id(variable) in owner:
                    reached.add(owner[id(variable)])
                else:
                    others.add(id(variable))
        if reached != {i}:
            what = f"the views of tasks {sorted(reached)}" if reached else "no task view"
            raise ValueError(
                f"loss {i} reads {what}: with task_views, the head of task i must read views[i] only"
            )
        leaves.append(others)
    return leaves


def split_jacobian(
    losses: list[torch.Tensor],
    features: list[torch.Tensor],
    split: HeadSplit,
    others: list[torch.Tensor],
    keep: bool,
) -> tuple[torch.Tensor, Sequence[torch.Tensor | None]]:
    """J_z from one backward pass of Σ_i L_i through the heads split at the features (``split_at_features``):
    a hook on each node that sends a gradient into a feature adds it to its task's row and takes it out of
    the pass, so that autograd does not also sum the T contributions at the feature (T − 1 additions and a
    buffer of the feature's size, which nothing reads). Also returns the gradients of ``others`` (the heads'
    parameters) from that pass, None where unreached. ``ValueError`` (``check_reach``), before the pass, when
    a loss sends nothing into the features or a feature feeds no loss."""
    feeds = {j for edges in split.edges for _, _, j in edges}
    check_reach(
        [i for i, edges in enumerate(split.edges) if not edges],
        [j for j in range(len(features)) if j not in feeds],
        features,
    )
    dtype, spans, total = feature_layout(features)
    jac = torch.empty(len(split.edges), total, dtype=dtype, device=features[0].device)
    filled: set[tuple[int, int]] = set()

    def capture(task: int, index: int, feature: int) -> Callable[..., tuple[torch.Tensor | None, ...] | None]:
        start, end = spans[feature]

        def hook(
            grad_inputs: tuple[torch.Tensor | None, ...], _grad_outputs: Any
        ) -> tuple[torch.Tensor | None, ...] | None:
            grad = grad_inputs[index]
            if grad is None:
                return None
            block = jac[task, start:end]
            if (task, feature) in filled:
                block.add_(grad.reshape(-1))
            else:
                block.copy_(grad.reshape(-1))
                filled.add((task, feature))
            return grad_inputs[:index] + (None,) + grad_inputs[index + 1 :]

        return hook

    handles = [
        node.register_hook(capture(i, k, j)) for i, edges in enumerate(split.edges) for node, k, j in edges
    ]
    try:
        # z is requested so that the heads compute the gradients along their edges into it; the pass
        # stops there (no requested leaf lies beyond z: ``split_at_features``).
        grads = torch.autograd.grad(
            losses, features + others, unit_seeds(losses), retain_graph=keep, allow_unused=True
        )
    finally:
        for handle in handles:
            handle.remove()
    for i in range(len(split.edges)):
        for j, (start, end) in enumerate(spans):
            if (i, j) not in filled:
                jac[i, start:end].zero_()
    return jac, grads[len(features) :]
