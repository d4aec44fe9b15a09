"""Activation gradient source: the exact Gram matrix G = J Jᵀ with memory that follows the activations.

Full mode materialises J (T × d, every shared parameter, one ``autograd.grad`` per task), then G = J Jᵀ and
u = Jᵀw. Every method reads only G and the losses, and Σ_i w_i g_i is the gradient of Σ_i w_i L_i, so J
itself is never needed:

1. **forward**: a hook on each supported module (Linear, Embedding, EmbeddingBag, Conv1d/2d/3d, LayerNorm,
   BatchNorm1d/2d/3d; exact types) records the call's input and the gradient edge of its output
   (``_activation_record``);
2. **per task**: one ``autograd.grad(L_i, [output edges] + [other parameters])``: the gradients δ_i with
   respect to the recorded outputs (activation-sized; autograd skips the weight-gradient GEMMs of those
   layers), plus the parameter gradients of whatever is not covered by a recorded call and of the
   parameters only one task reaches;
3. **Gram**: each shared parameter's contribution from the recorded inputs and the δ_i, one group of
   parameters at a time, materialised chunk by chunk or in kernel form, whichever costs fewer flops
   (``_activation_gram``); the per-parameter gradients add theirs. Memory: T × (recorded activations) plus
   one chunk, instead of T × d;
4. **fuse**: ``ActivationGradients.fused(w)`` runs ONE backward of Σ_i w_i L_i restricted to the shared
   parameters; its gradient is sparse where the parameter's gradient is (``Embedding(sparse=True)``).

Which parameter uses are covered is read from the autograd graph (``_activation_graph``): a parameter with
any use outside a recorded call (weight tying through ``F.linear(h, embedding.weight)``, an unsupported
module, a functional call) takes the exact per-parameter path. Errors (``ValueError``, naming the module):
a supported module's parameter reached through a call made before the source was attached; a recorded
input changed in place after its forward; a parameter changed between forward and ``collect`` (an optimizer
step in between). No ``.grad`` is ever written here, and ``collect`` registers no hooks.

Cost per step, against full mode: T backward passes without the covered layers' weight-gradient GEMMs
(about half of a backward's work in an MLP), the Gram contributions (kernel form: n²(in + T·out) per
Linear of n rows; materialised: T·n·out·in), and one fused backward, against T full backward passes, the
T²·d Gram and the T·d fusion. Measured by the speed suite's exact rows (``python -m benchmarks --suite speed
--speed-rows mlp-5M,sparse-1e6,transformer``).
"""

from __future__ import annotations

import functools
import threading
import weakref
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from .._validation import check_choice, check_int
from ..distributed import mean_gradients
from . import TaskScale, check_finite, loss_values
from . import _activation_dist as adist
from ._activation_gram import (
    ConvGroup,
    DirectGroup,
    Group,
    LinearGroup,
    LookupGroup,
    MixedGroup,
    NormGroup,
    choose_form,
    conv_input,
    lookup_entries,
    materialize_gram,
    norm_delta,
    normalized_input,
)
from ._activation_graph import Coverage, Graph, coverage, walk
from ._activation_record import (
    METADATA_KEY,
    SUPPORTED,
    Record,
    Registry,
    build_record,
    input_stops,
    output_edge,
)
from .jacobian import JacobianCollection, JacobianSource, check_reached

if TYPE_CHECKING:
    from ..amp import LossScaling
    from ..distributed import Reduction

FORMS = ("auto", "kernel", "materialize")
FUSED = ("backward", "activations")


def _current_sequence_nr() -> int:
    """The next autograd node's sequence number on this thread (a throw-away node's)."""
    with torch.enable_grad():
        probe = torch.empty(0, requires_grad=True).view(0)
    node = probe.grad_fn
    if node is None:  # a view of a tensor that requires grad always has one
        raise RuntimeError("autograd recorded no node for a view of a tensor that requires grad")
    return node._sequence_nr()


class ActivationSource:
    """Records supported modules' calls in ``model`` and turns T losses into G, per-task gradients of the
    task-specific parameters, and a fused gradient (see the module docstring).

    Args:
        model: the module whose supported submodules are hooked (a DDP wrapper works: its ``.module`` is a
            submodule).
        form: ``"auto"`` (per group, the form with fewer flops), ``"kernel"`` (the kernel form wherever one
            exists: Linear weights, Embedding/EmbeddingBag sum/mean) or ``"materialize"``.
        fused: how ``ActivationGradients.fused(w)`` forms Σ_i w_i g_i. ``"backward"`` (default): one backward
            pass of Σ_i w_i L_i restricted to the shared parameters (autograd's own gradient, sparse where
            the parameter's is). ``"activations"``: from the δ_i already collected, each group's contraction
            applied once to Σ_i w_i δ_i (one weight-gradient GEMM per Linear instead of a backward through the
            whole model; the graph is freed after the last task's pass unless ``retain_graph``; the δ_i stay
            until ``fused``). Both are exact; ``test_activation.py`` checks both against autograd.
        memory: the bytes of δ_i (all tasks together) held at once, or None (default) to take every δ_i in
            one backward pass per task. With a budget the per-task passes are split: the groups' δ_i are
            taken a budget's worth at a time, right before their contributions to G, and dropped after
            them, so that memory stays near the budget at the cost of more (each one shorter or as long)
            backward passes; G is the same. Not with ``fused="activations"``, which needs every δ_i.
        fallback: a ``JacobianSource`` that ``collect`` runs instead, for one step, when the recorded layer
            outputs that G needs hold more numbers than the shared parameters (T δ_i of them against T rows
            of the Jacobian: a transformer at many tokens per batch), unless a shared parameter is a sparse
            table or ``torch.distributed`` runs several ranks (whose batches may differ while their sources
            must not). ``GradSurgery``'s ``gradient_source="auto"`` passes one.
    """

    mode = "full"
    collectives_in_collect = False
    name = "activations"

    def __init__(
        self,
        model: nn.Module,
        *,
        form: str = "auto",
        fused: str = "backward",
        shared_params: Sequence[torch.Tensor] | None = None,
        gram_dtype: torch.dtype = torch.float64,
        scales_task_specific: bool = False,
        memory: int | None = None,
        fallback: JacobianSource | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_choice(form, FORMS, "form")
        check_choice(fused, FUSED, "fused")
        if memory is not None:
            memory = check_int(memory, "memory", minimum=1)
            if fused == "activations":
                raise ValueError(
                    "a memory budget drops the δ_i that fused='activations' needs; use one or the other"
                )
        self.memory = memory
        self.model = model
        self.form = form
        self.fused = fused
        self.shared_ids = None if shared_params is None else {id(p) for p in shared_params}
        self.gram_dtype = gram_dtype
        self.scales_task_specific = scales_task_specific
        self.fallback = fallback
        self._registry = Registry()
        self._busy = False
        self._handles: list[Any] = []
        self._hooked: list[tuple[str, nn.Module]] = []
        # Nodes created before the hooks existed belong to calls nobody recorded (same-thread numbering).
        self._attach_seq = _current_sequence_nr()
        self._attach_thread = threading.get_ident()
        # The hooks hold the source weakly, and its finalizer removes them: a source (an optimizer) that is
        # dropped leaves no hook on the model it recorded.
        this = weakref.ref(self)
        try:
            for name, module in model.named_modules():
                kind = SUPPORTED.get(type(module))
                if kind is None:
                    continue
                hook = functools.partial(_weak_hook, this, kind)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
                self._hooked.append((name, module))
        except BaseException:
            self.remove()
            raise
        self._finalizer = weakref.finalize(self, _remove_handles, self._handles)
        self._removed = False

    def __deepcopy__(self, memo: dict[int, Any]) -> ActivationSource:
        # The model and its hooks are not copied (a deep copy of an optimizer shares its model): the copy
        # shares this source.
        memo[id(self)] = self
        return self

    def __reduce__(self) -> Any:
        raise TypeError(
            "an optimizer that records a model's activations (gradient_source='activations') cannot be "
            "pickled: save its state_dict() and build a new one around the model instead"
        )

    # -- recording ----------------------------------------------------------------------------------------
    def _hook(
        self, kind: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        # Cheap exits first: no graph is being built (eval, no_grad) or it is our own backward pass
        # (activation checkpointing recomputes forwards inside it).
        if self._busy or not torch.is_grad_enabled():
            return None
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        record = build_record(module, kind, args, kwargs)
        if record is None:
            return None
        edge = output_edge(output)
        record.out_shape = output.shape
        record.output_nr = edge.output_nr
        record.stops = input_stops([*args, *kwargs.values()])
        node = edge.node
        # torch's Node stub declares ``metadata`` as a method; on a real node it is a dict attribute.
        node.metadata.setdefault(METADATA_KEY, []).append(record)  # type: ignore[attr-defined]
        self._registry.add(node._sequence_nr(), record)
        return None

    def remove(self) -> None:
        """Remove every hook this source installed (idempotent); pending records die with their graphs."""
        _remove_handles(self._handles)
        self._removed = True

    @property
    def hooked_modules(self) -> list[str]:
        return [name for name, _ in self._hooked]

    # -- one backward -------------------------------------------------------------------------------------
    def collect(
        self,
        losses: list[torch.Tensor],
        params: list[torch.Tensor],
        scaling: LossScaling | None,
        retain_graph: bool,
        no_sync: Callable[[], Any],
    ) -> ActivationCollection | JacobianCollection:
        """The engine's entry (``gradsurgery.sources``): the local part of one ``GradSurgery.backward``."""
        factor = None
        if scaling is not None:
            scaling.scale(losses)  # reads (and creates, on first use) the scaler's scale
            factor = scaling.factor
        with no_sync():
            result = self._prepare(
                losses,
                params,
                shared_ids=self.shared_ids,
                retain_graph=retain_graph,
                gram_dtype=self.gram_dtype,
                loss_scale=factor,
                may_fall_back=self.fallback is not None,
            )
        if result is None:
            if self.fallback is None:  # prepare falls back only when allowed
                raise RuntimeError("the activation source fell back without a Jacobian source")
            return self.fallback.collect(losses, params, scaling, retain_graph, no_sync)
        check_reached(result.reached)
        return ActivationCollection(result, loss_values(losses, self.gram_dtype), factor, self, no_sync)

    def gradients(
        self,
        losses: list[torch.Tensor],
        params: list[torch.Tensor],
        *,
        shared_ids: set[int] | None,
        retain_graph: bool,
        gram_dtype: torch.dtype,
        loss_scale: float | None = None,
        group: Any = None,
    ) -> ActivationGradients:
        """G over the shared parameters, the task-specific gradients and what ``fused`` needs: ``prepare``
        (local), the ranks' agreement on the layout, then ``ActivationGradients.reduce`` (see both). The
        engine (``GradSurgery``) runs the same steps through ``collect``."""
        result = self.prepare(
            losses,
            params,
            shared_ids=shared_ids,
            retain_graph=retain_graph,
            gram_dtype=gram_dtype,
            loss_scale=loss_scale,
        )
        if group is not None:
            adist.agree(group, _device(result._trainable), result._layout)
        result.reduce(group)
        return result

    def prepare(
        self,
        losses: list[torch.Tensor],
        params: list[torch.Tensor],
        *,
        shared_ids: set[int] | None,
        retain_graph: bool,
        gram_dtype: torch.dtype,
        loss_scale: float | None = None,
    ) -> ActivationGradients:
        """The local part of ``collect``: the graph walk, the checks and the T task passes; no communication.
        ``reduce`` then forms G and the task-specific gradients.

        ``params``: the trainable parameters (frozen ones are ignored). ``shared_ids``: ids of the parameters
        that receive the fused gradient (default: those reached by two or more tasks). ``loss_scale`` s: the
        losses are scaled by s for the per-task passes; G is returned ÷ s², the task-specific gradients ÷ s,
        and ``fused`` returns the gradient of s·Σ w_i L_i.
        """
        result = self._prepare(
            losses,
            params,
            shared_ids=shared_ids,
            retain_graph=retain_graph,
            gram_dtype=gram_dtype,
            loss_scale=loss_scale,
            may_fall_back=False,
        )
        if result is None:  # only with may_fall_back
            raise RuntimeError("the activation source fell back to the Jacobian unasked")
        return result

    def _prepare(
        self,
        losses: list[torch.Tensor],
        params: list[torch.Tensor],
        *,
        shared_ids: set[int] | None,
        retain_graph: bool,
        gram_dtype: torch.dtype,
        loss_scale: float | None,
        may_fall_back: bool,
    ) -> ActivationGradients | None:
        """``prepare``; with ``may_fall_back``, None (before any task pass) when the Jacobian would hold
        fewer numbers (see ``fallback``)."""
        if self._removed:
            raise ValueError("this ActivationSource was removed; create a new one for the model")
        losses = list(losses)
        if not losses:
            raise ValueError("collect needs at least one loss")
        for i, loss in enumerate(losses):
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(f"loss {i} must be a scalar tensor")
            if not loss.requires_grad:
                raise ValueError(f"loss {i} does not require grad")
        scale = None if loss_scale is None else float(loss_scale)
        task_losses = [loss.reshape(()) if scale is None else loss.reshape(()) * scale for loss in losses]
        num_tasks = len(task_losses)
        trainable: list[torch.Tensor] = []
        position: dict[int, int] = {}
        for p in params:
            if p.requires_grad and id(p) not in position:
                position[id(p)] = len(trainable)
                trainable.append(p)
        roots = [get_gradient_edge(loss).node for loss in task_losses]
        graph = walk(roots, position, self._registry)
        reach = [
            graph.masks[graph.param_node[k]] if k in graph.param_node else 0 for k in range(len(trainable))
        ]
        reached = [sum((m >> i) & 1 for m in reach) for i in range(num_tasks)]
        if shared_ids is None:
            shared = [k for k, m in enumerate(reach) if m.bit_count() >= 2]
        else:
            shared = [k for k, p in enumerate(trainable) if id(p) in shared_ids]
        shared_set = set(shared)
        cov = coverage(graph, {k for k in shared if reach[k]}, trainable)
        names = self._names()
        self._check(graph, cov, trainable, names)
        direct = sorted(k for k, m in enumerate(reach) if m and (k not in shared_set or k in cov.uncovered))
        used = _used_records(cov)
        if may_fall_back and not _activations_hold_less(used, [trainable[k] for k in shared], names):
            return None
        from_activations = self.fused == "activations"
        # The graph must survive the last pass only when a backward will run on it again.
        keep_graph = retain_graph or (bool(shared) and not from_activations)
        # With a memory budget, the first passes take only the direct parameters; the δ_i follow in chunks.
        budget = self.memory
        first = used if budget is None else []
        deltas, grads = self._task_passes(task_losses, graph, first, direct, trainable, reach, keep_graph)
        fill = (
            None
            if budget is None
            else _ChunkedDeltas(self, task_losses, graph, used, trainable, reach, deltas)
        )
        plans = self._plans(cov, deltas, grads, trainable, shared, reach, num_tasks, fill)
        if fill is not None and budget is not None:
            fill.plan([recs for recs, _ in plans], budget)
        return ActivationGradients(
            gram=None,
            shared=[trainable[k] for k in shared],
            task_specific=[],
            reached=reached,
            _form_of=[],
            _names=names,
            _source=self,
            _losses=task_losses,
            _retain=retain_graph,
            _group=None,
            _sparse_owner={id(trainable[k]) for k in shared if not reach[k] and names.sparse(trainable[k])},
            _entries=[(graph.nodes[entry], rec) for rec, entry in used],
            _plans=plans,
            _trainable=trainable,
            _layout=_signature(num_tasks, reach, shared, cov, used),
            _pending=(deltas, grads, direct, reach, scale, gram_dtype, from_activations),
        )

    # -- the pieces of collect ----------------------------------------------------------------------------
    def _names(self) -> _Names:
        return _Names(self.model, self._hooked)

    def _check(self, graph: Graph, cov: Coverage, params: list[torch.Tensor], names: _Names) -> None:
        """Refuse what would make G wrong or silently lose the memory saving (see the module docstring)."""
        same_thread = threading.get_ident() == self._attach_thread
        for pos, consumers in cov.uncovered.items():
            owners = names.hooked_owners(params[pos])
            if not owners or not same_thread:
                continue
            if any(graph.nodes[c]._sequence_nr() < self._attach_seq for c in consumers):
                raise ValueError(
                    f"parameter {names.param(params[pos])!r} of module {owners[0]!r} is reached by the "
                    "losses "
                    "through a call that the activation source did not record: the forward ran before the "
                    "source was attached. Run the forward again after creating the source."
                )
        latest: dict[int, tuple[int, nn.Module]] = {}
        for pos, uses in cov.uses.items():
            for rec, _, role in uses:
                rec.check_versions(names.module)
                version = rec.param_versions[role]
                if id(params[pos]) not in latest or version > latest[id(params[pos])][0]:
                    latest[id(params[pos])] = (version, rec.module)
        for pos in cov.uses:
            p = params[pos]
            version, module = latest[id(p)]
            if p._version != version:
                name = names.module(module)
                raise ValueError(
                    f"parameter {names.param(p)!r} of module {name!r} changed after the forward that the "
                    "losses "
                    f"come from (version {version} -> {p._version}: an optimizer step between forward and "
                    "backward?); compute the losses again with the current parameters"
                )

    def _task_passes(
        self,
        task_losses: list[torch.Tensor],
        graph: Graph,
        used: list[tuple[Record, int]],
        direct: list[int],
        trainable: list[torch.Tensor],
        reach: list[int],
        keep_last: bool,
    ) -> tuple[dict[int, torch.Tensor], list[dict[int, torch.Tensor]]]:
        """One ``autograd.grad`` per task: δ_i for the used records, gradients of the direct parameters."""
        num_tasks = len(task_losses)
        deltas: dict[int, torch.Tensor] = {}  # id(record) → T × output shape
        grads: list[dict[int, torch.Tensor]] = [{} for _ in range(num_tasks)]
        filled: dict[int, set[int]] = {}
        self._busy = True
        try:
            for i, loss in enumerate(task_losses):
                recs = [(rec, entry) for rec, entry in used if (graph.masks[entry] >> i) & 1]
                mine = [k for k in direct if (reach[k] >> i) & 1]
                inputs: list[GradientEdge | torch.Tensor] = [
                    GradientEdge(graph.nodes[entry], rec.output_nr) for rec, entry in recs
                ]
                inputs += [trainable[k] for k in mine]
                if not inputs:
                    continue
                # autograd.grad takes edges and tensors mixed; its annotation lists only pure sequences.
                out = torch.autograd.grad(
                    loss,
                    inputs,  # type: ignore[arg-type]
                    retain_graph=keep_last or i < num_tasks - 1,
                    allow_unused=True,
                )
                for (rec, _), g in zip(recs, out[: len(recs)], strict=True):
                    if g is None:
                        continue
                    buf = deltas.get(id(rec))
                    if buf is None:
                        # Uninitialised (zero-filling T × activation costs a pass over fresh pages); the
                        # slots of tasks that pass no gradient are zeroed below.
                        buf = deltas[id(rec)] = g.new_empty((num_tasks, *rec.out_shape))
                        filled[id(rec)] = set()
                    buf[i] = g.reshape(rec.out_shape)
                    filled[id(rec)].add(i)
                for k, g in zip(mine, out[len(recs) :], strict=True):
                    if g is not None:
                        grads[i][k] = g
                del out
        finally:
            self._busy = False
        for key, tasks in filled.items():
            for i in range(num_tasks):
                if i not in tasks:
                    deltas[key][i].zero_()
        return deltas, grads

    def _plans(
        self,
        cov: Coverage,
        deltas: dict[int, torch.Tensor],
        grads: list[dict[int, torch.Tensor]],
        trainable: list[torch.Tensor],
        shared: list[int],
        reach: list[int],
        num_tasks: int,
        fill: _ChunkedDeltas | None = None,
    ) -> list[tuple[list[Record], Callable[[], Group]]]:
        """The Gram groups (see ``_activation_gram``) in the order of their first parameter, as
        (records whose δ they read, builder): each is built right before its contribution. With ``fill``
        (a memory budget) a missing δ is taken then, with the rest of its chunk."""

        def delta(rec: Record) -> torch.Tensor:
            d = deltas.get(id(rec))
            if d is None and fill is not None:
                fill.take(rec)
                d = deltas.get(id(rec))
            if d is None:  # reached in the graph, but autograd passed no gradient to it
                p = next(iter(rec.params.values()))
                d = deltas[id(rec)] = torch.zeros((num_tasks, *rec.out_shape), dtype=p.dtype, device=p.device)
            return d

        def build(family: str, recs: list[Record], members: dict[str, torch.Tensor]) -> Group:
            w, b = members.get("weight"), members.get("bias")
            if family == "linear":
                xs = [r.inputs["input"].detach().reshape(-1, r.inputs["input"].shape[-1]) for r in recs]
                ds = [delta(r).reshape(num_tasks, -1, r.out_shape[-1]) for r in recs]
                return LinearGroup(w, b, xs, ds)
            if family == "lookup":
                if w is None:  # an Embedding/EmbeddingBag's only member
                    raise ValueError("a lookup group needs the table's weight")
                lookups = []
                for r in recs:
                    d = delta(r)
                    lookups.append(lookup_entries(r, d.reshape(num_tasks, -1, d.shape[-1])))
                return LookupGroup(w, lookups, sparse=all(r.config["sparse"] for r in recs))
            if family == "conv":
                calls = []
                for r in recs:
                    x, padding, unbatched = conv_input(r)
                    d = delta(r)
                    calls.append((x, d.unsqueeze(1) if unbatched else d, r.config, padding))
                return ConvGroup(w, b, calls)
            xh = [normalized_input(r) for r in recs]
            return NormGroup(w, b, xh, [norm_delta(r, delta(r)) for r in recs])

        plans: list[tuple[int, list[Record], Callable[[], Group]]] = []
        regular: dict[tuple[str, tuple[int, ...]], dict[str, Any]] = {}
        for pos in sorted(cov.uses):
            uses = cov.uses[pos]
            families = {rec.family for rec, _, _ in uses}
            roles = {role for _, _, role in uses}
            if len(families) == 1 and len(roles) == 1:
                key = (families.pop(), tuple(id(rec) for rec, _, _ in uses))
                slot = regular.setdefault(
                    key, {"pos": pos, "recs": [rec for rec, _, _ in uses], "members": {}}
                )
                slot["members"][roles.pop()] = trainable[pos]
                continue
            by_kind: dict[tuple[str, str], list[Record]] = {}
            for rec, _, role in uses:
                by_kind.setdefault((rec.family, role), []).append(rec)

            def mixed(pos: int = pos, by_kind: dict[tuple[str, str], list[Record]] = by_kind) -> Group:
                parts = [build(f, recs, {role: trainable[pos]}) for (f, role), recs in by_kind.items()]
                return MixedGroup(trainable[pos], parts)

            plans.append((pos, [rec for rec, _, _ in uses], mixed))
        for (family, _), slot in regular.items():
            plans.append(
                (slot["pos"], slot["recs"], functools.partial(build, family, slot["recs"], slot["members"]))
            )
        shared_set = set(shared)
        for pos in sorted(cov.uncovered):
            if pos in shared_set and reach[pos]:
                per_task = [grads[i].get(pos) for i in range(num_tasks)]
                plans.append((pos, [], functools.partial(DirectGroup, trainable[pos], per_task)))
        plans.sort(key=lambda plan: plan[0])
        return [(recs, make) for _, recs, make in plans]


class _ChunkedDeltas:
    """The δ_i of the used records under a memory budget: the records in the order the groups read them,
    cut into chunks of at most the budget's bytes (a record larger than the budget is a chunk of its own);
    a chunk's T passes run when a group first reads one of its records."""

    def __init__(
        self,
        source: ActivationSource,
        task_losses: list[torch.Tensor],
        graph: Graph,
        used: list[tuple[Record, int]],
        trainable: list[torch.Tensor],
        reach: list[int],
        deltas: dict[int, torch.Tensor],
    ) -> None:
        self.source = source
        self.task_losses = task_losses
        self.graph = graph
        self.entry = {id(rec): (rec, entry) for rec, entry in used}
        self.trainable = trainable
        self.reach = reach
        self.deltas = deltas
        self.chunk_of: dict[int, int] = {}
        self.chunks: list[list[tuple[Record, int]]] = []

    def plan(self, reads: list[list[Record]], budget: int) -> None:
        num_tasks = len(self.task_losses)
        chunk: list[tuple[Record, int]] = []
        size = 0
        for recs in reads:
            for rec in recs:
                if id(rec) in self.chunk_of or id(rec) not in self.entry:
                    continue
                param = next(iter(rec.params.values()))
                need = num_tasks * rec.out_shape.numel() * param.element_size()
                if chunk and size + need > budget:
                    self.chunks.append(chunk)
                    chunk, size = [], 0
                self.chunk_of[id(rec)] = len(self.chunks)
                chunk.append(self.entry[id(rec)])
                size += need
        if chunk:
            self.chunks.append(chunk)

    def take(self, rec: Record) -> None:
        index = self.chunk_of.pop(id(rec), None)
        if index is None:
            return
        chunk = self.chunks[index]
        for other, _ in chunk:
            self.chunk_of.pop(id(other), None)
        # The graph stays for the next chunks and the fused backward, which frees it.
        got, _ = self.source._task_passes(
            self.task_losses, self.graph, chunk, [], self.trainable, self.reach, True
        )
        self.deltas.update(got)


def _build(
    plans: list[tuple[list[Record], Callable[[], Group]]], deltas: dict[int, torch.Tensor] | None
) -> Iterator[Group]:
    """The groups one at a time. With ``deltas``, each δ buffer is dropped after its last group, so
    temporaries (x̂, padded conv inputs, concatenated rows) never pile up on top of all the δ."""
    remaining: dict[int, int] = {}
    for recs, _ in plans:
        for rec in recs:
            remaining[id(rec)] = remaining.get(id(rec), 0) + 1
    for recs, make in plans:
        yield make()
        if deltas is None:
            continue
        for rec in recs:
            remaining[id(rec)] -= 1
            if remaining[id(rec)] == 0:
                deltas.pop(id(rec), None)


@dataclass
class ActivationGradients:
    """What ``ActivationSource.collect`` returns (see ``collect``); ``prepare`` returns it before ``reduce``,
    with ``gram`` None."""

    gram: torch.Tensor | None
    shared: list[torch.Tensor]
    task_specific: list[tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]]
    reached: list[int]
    _source: ActivationSource = field(repr=False)
    _losses: list[torch.Tensor] | None = field(repr=False)
    _retain: bool = field(repr=False)
    _group: Any = field(repr=False)
    _sparse_owner: set[int] = field(repr=False)  # ids of unreached shared tables with sparse gradients
    _entries: list[tuple[Any, Record]] = field(repr=False)
    # fused="activations": the groups' builders
    _plans: list[tuple[list[Record], Callable[[], Group]]] | None = field(default=None, repr=False)
    _form_of: list[tuple[torch.Tensor, str]] = field(default_factory=list, repr=False)
    _names: Any = field(default=None, repr=False)
    _trainable: list[torch.Tensor] = field(default_factory=list, repr=False)
    _layout: str = field(default="", repr=False)  # what every rank must share before ``reduce``
    _pending: Any = field(default=None, repr=False)  # what ``reduce`` consumes

    def signature(self) -> int:
        """A 31-bit fingerprint of the layout (what is shared, covered and reached, by which tasks)."""
        return zlib.crc32(self._layout.encode()) & 0x7FFFFFFF

    def reduce(self, group: Any = None) -> None:
        """G from the groups' contributions and the task-specific gradients. With a process group ``group``
        (the ranks must have agreed on the layout), G is that of the rank-averaged Jacobian: every group
        materialised chunk by chunk and each chunk all-reduced; the task-specific gradients are rank means."""
        deltas, grads, direct, reach, scale, gram_dtype, from_activations = self._pending
        self._pending = None
        self._group = group
        trainable = self._trainable
        num_tasks = len(self.reached)
        plans = self._plans
        if plans is None:
            raise RuntimeError("reduce() runs once, on what prepare() returned")
        device = _device(trainable)
        gram = torch.zeros(num_tasks, num_tasks, dtype=gram_dtype, device=device)
        for grp in _build(plans, None if from_activations else deltas):
            form = "materialize" if group is not None else choose_form(grp, self._source.form)
            label = "per-parameter" if isinstance(grp, DirectGroup) else form
            self._form_of += [(p, label) for p in grp.params]
            part: torch.Tensor | None
            if form == "kernel":
                part = grp.kernel_gram(gram_dtype)
            elif group is not None:
                ids = grp.touched()
                if ids is not None:
                    ids = adist.union_rows(ids.to(device), group)
                part = materialize_gram(grp, gram_dtype, ids=ids, reduce=lambda b: adist.mean_(b, group))
            else:
                part = grp.direct_gram(gram_dtype)
                if part is None:
                    part = materialize_gram(grp, gram_dtype)
            gram += part.to(device)
            del grp
        del deltas
        gram = (gram + gram.T) / 2  # the kernel form's two products round differently
        if scale is not None:
            gram /= scale * scale
        shared_ids = {id(p) for p in self.shared}
        specific: list[tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]] = []
        flat: list[torch.Tensor] = []
        for k in direct:
            if id(trainable[k]) in shared_ids:
                continue
            entries = []
            for i in range(num_tasks):
                if (reach[k] >> i) & 1:
                    g = grads[i].get(k)
                    if g is None:
                        g = torch.zeros_like(trainable[k])
                    if scale is not None:
                        g = g / scale
                    entries.append((i, g))
                    flat.append(g)
            specific.append((trainable[k], entries))
        if group is not None and flat:
            averaged = iter(mean_gradients(flat, group))
            specific = [(p, [(i, next(averaged)) for i, _ in entries]) for p, entries in specific]
        self.gram = gram
        self.task_specific = specific
        if not from_activations:
            self._plans = None

    @property
    def forms(self) -> dict[str, str]:
        """Module (or bare parameter) name → the form its shared parameters' contribution took:
        "kernel", "materialize", "per-parameter" (joined by "+" when its parameters differ)."""
        out: dict[str, set[str]] = {}
        for p, form in self._form_of:
            out.setdefault(self._names.owner(p), set()).add(form)
        return {name: "+".join(sorted(f)) for name, f in out.items()}

    def fused(self, weights: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The gradient of Σ_i w_i L_i (times the loss scale) for each shared parameter: by default from one
        backward pass restricted to them (the graph is kept only with ``retain_graph=True``), or, with
        ``ActivationSource(fused="activations")``, from the collected δ_i. Under data parallelism the rank
        mean. A shared parameter no task reaches gets zeros."""
        if self._losses is None:
            raise RuntimeError("fused() already ran without retain_graph: the graph was freed")
        if not self.shared:
            self._release()
            return []
        losses = self._losses
        w = weights.detach().to(device=losses[0].device, dtype=losses[0].dtype).reshape(-1)
        if w.numel() != len(losses):
            raise ValueError(f"expected {len(losses)} weights, got {w.numel()}")
        grads: Sequence[torch.Tensor | None]
        if self._plans is not None:
            grads = self._from_activations(self._plans, w)
        else:
            total = (torch.stack(losses) * w).sum()
            source = self._source
            source._busy = True
            try:
                grads = torch.autograd.grad(total, self.shared, retain_graph=self._retain, allow_unused=True)
            finally:
                source._busy = False
        out = []
        for p, g in zip(self.shared, grads, strict=True):
            if g is None:  # no task reaches it (shared by ``shared_ids``): a zero gradient, as full mode
                if id(p) in self._sparse_owner:
                    g = torch.sparse_coo_tensor(
                        torch.zeros(1, 0, dtype=torch.long, device=p.device),
                        p.new_zeros((0, *p.shape[1:])),
                        p.shape,
                        check_invariants=False,
                    )
                else:
                    g = torch.zeros_like(p)
            out.append(g)
        if self._group is not None:
            out = mean_gradients(out, self._group)
        if not self._retain:
            self._release()
        return list(zip(self.shared, out, strict=True))

    def _from_activations(
        self, plans: list[tuple[list[Record], Callable[[], Group]]], w: torch.Tensor
    ) -> list[torch.Tensor | None]:
        """Σ_i w_i g_i per shared parameter from the collected δ_i (``fused="activations"``); the δ_i carry
        the loss scale already."""
        total: dict[int, torch.Tensor] = {}
        for group in _build(plans, None):
            for p, g in group.fused(w):
                total[id(p)] = g if id(p) not in total else total[id(p)] + g
        return [total.get(id(p)) for p in self.shared]

    def finite_checks(self) -> list[torch.Tensor]:
        """Squared norms (float64) of the task-specific gradients; G's diagonal covers the shared ones."""
        checks = []
        for _, entries in self.task_specific:
            for _, g in entries:
                v = g._values() if g.is_sparse else g
                checks.append(v.detach().double().pow(2).sum())
        return checks

    def _release(self) -> None:
        """Drop the losses and the records of this step (their inputs) once the graph is spent."""
        self._losses = None
        self._plans = None
        for node, rec in self._entries:
            stored = node.metadata.get(METADATA_KEY)
            if stored is not None:
                stored[:] = [r for r in stored if r is not rec]
        self._entries = []


# -- helpers -------------------------------------------------------------------------------------------------
def _weak_hook(
    source: weakref.ref[ActivationSource],
    kind: str,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    output: Any,
) -> None:
    live = source()
    if live is not None:
        live._hook(kind, module, args, kwargs, output)


def _remove_handles(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class _Names:
    """Names for messages and ``forms``: modules by their path in the model, parameters by theirs. Built on
    first use (a walk over the model's modules), which most steps never need: ``forms`` is read on demand,
    and the checks ask only when something is wrong."""

    def __init__(self, model: nn.Module, hooked: list[tuple[str, nn.Module]]) -> None:
        self._model, self._hooked_modules = model, hooked
        self._built = False

    def _build(self) -> None:
        if self._built:
            return
        model, hooked = self._model, self._hooked_modules
        self._built = True
        self._modules = {id(m): name or type(m).__name__ for name, m in model.named_modules()}
        self._params: dict[int, str] = {}
        self._owner: dict[int, str] = {}
        self._hooked: dict[int, list[str]] = {}
        self._sparse: dict[int, bool] = {}
        for mname, m in model.named_modules(remove_duplicate=False):
            for pname, p in m._parameters.items():
                if p is None:
                    continue
                full = f"{mname}.{pname}" if mname else pname
                self._params.setdefault(id(p), full)
                self._owner.setdefault(id(p), mname or full)  # a bare parameter of the root: its own name
                if getattr(m, "sparse", False) is True:
                    self._sparse[id(p)] = True
        for name, m in hooked:
            for p in m._parameters.values():
                if p is not None:
                    self._hooked.setdefault(id(p), []).append(name)

    def module(self, m: nn.Module) -> str:
        self._build()
        return self._modules.get(id(m), type(m).__name__)

    def param(self, p: torch.Tensor) -> str:
        self._build()
        return self._params.get(id(p), f"<parameter of shape {tuple(p.shape)}>")

    def owner(self, p: torch.Tensor) -> str:
        self._build()
        return self._owner.get(id(p), self.param(p))

    def hooked_owners(self, p: torch.Tensor) -> list[str]:
        self._build()
        return self._hooked.get(id(p), [])

    def sparse(self, p: torch.Tensor) -> bool:
        self._build()
        return self._sparse.get(id(p), False)


def _activations_hold_less(used: list[tuple[Record, int]], shared: list[torch.Tensor], names: _Names) -> bool:
    """Whether the δ_i that G needs (one per used record and task) hold no more numbers than the Jacobian's
    rows over the shared parameters; always with a shared sparse table (the Jacobian cannot hold it) or
    several data-parallel ranks (the choice must not differ between them)."""
    if any(names.sparse(p) for p in shared):
        return True
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            return True
    held = sum(rec.out_shape.numel() for rec, _ in used)
    return held <= sum(p.numel() for p in shared)


def _used_records(cov: Coverage) -> list[tuple[Record, int]]:
    seen: dict[int, tuple[Record, int]] = {}
    for pos in sorted(cov.uses):
        for rec, entry, _ in cov.uses[pos]:
            seen.setdefault(id(rec), (rec, entry))
    return sorted(seen.values(), key=lambda u: u[1])


def _device(params: list[torch.Tensor]) -> torch.device:
    return params[0].device if params else torch.device("cpu")


def _signature(
    num_tasks: int, reach: list[int], shared: list[int], cov: Coverage, used: list[tuple[Record, int]]
) -> str:
    """The layout every rank must share before the collectives (what is shared, covered, reached)."""
    covered = sorted(
        (pos, tuple((rec.kind, role) for rec, _, role in uses)) for pos, uses in cov.uses.items()
    )
    return repr((num_tasks, reach, shared, covered, sorted(cov.uncovered), len(used)))


class ActivationCollection:
    """One ``backward`` through the activation source, in the engine's terms (``gradsurgery.sources``)."""

    mode = "full"
    source = "activations"

    def __init__(
        self,
        result: ActivationGradients,
        values: torch.Tensor,
        factor: float | None,
        source: ActivationSource,
        no_sync: Callable[[], Any],
    ) -> None:
        self.result = result
        self.loss_values = values
        self.factor = factor
        self.scales_task_specific = source.scales_task_specific
        self.no_sync = no_sync
        self.gram: torch.Tensor | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.result.reached)

    @property
    def forms(self) -> dict[str, str]:
        return self.result.forms

    def signature(self) -> int:
        return self.result.signature()

    def reduce(self, reduction: Reduction) -> None:
        self.result.reduce(reduction.group)
        gram = self.result.gram
        if gram is None:
            raise RuntimeError("the activation source's reduce() formed no Gram matrix")
        self.gram = gram
        self.loss_values = reduction.average(self.loss_values).to(gram.device)

    def _task_grads(self) -> list[tuple[int, torch.Tensor]]:
        return [(i, g) for _, entries in self.result.task_specific for i, g in entries]

    def check_finite(self) -> None:
        check_finite(self.loss_values, self.gram, self._task_grads(), params=self.reached_params())

    def gradients(self, weights: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Σ_i w_i g_i for the shared parameters (one backward of Σ w_i L_i, sparse where their gradient
        is), Σ_i s_i g_i for the task-specific ones (s_i = 1, or w_i for loss weightings)."""
        with self.no_sync():
            out = self.result.fused(weights)
        if self.factor is not None:
            out = [(p, g / self.factor) for p, g in out]
        scale = TaskScale(weights, self.scales_task_specific)
        for p, entries in self.result.task_specific:
            total = scale.total(entries)
            if total is not None:
                out.append((p, total))
        return out

    def reached_params(self) -> list[torch.Tensor]:
        return self.result.shared + [p for p, _ in self.result.task_specific]
