"""Data-parallel training: every rank fuses the *global* task gradients, identically.

Why ``GradSurgery`` synchronises by itself instead of letting ``DistributedDataParallel`` do it:

* a per-task ``loss_i.backward()`` under DDP fails (the reducer may mark a variable ready only once per
  iteration); with ``static_graph=True`` it runs but the gradients of later tasks are silently left unsynced;
* ``torch.autograd.grad``, which ``GradSurgery`` uses, never fires DDP's hooks: gradients stay local.

So the per-task gradients are taken with ``autograd.grad`` (under ``model.no_sync()`` when the DDP module
is known) and averaged here. With J_r the T×d Jacobian of rank r and n ranks, the batch-mean Jacobian is
J = (1/n) Σ_r J_r (equal per-rank batches, mean-reduced losses), and every rank must solve the method on
G = J Jᵀ. Averaging the local Gram matrices, (1/n) Σ_r J_r J_rᵀ, is a different matrix (it keeps the
per-rank noise: about 10 % off on a small MLP) and is never done. Two exact paths:

``"allreduce"`` — all-reduce (sum, then ÷ n) the T×d matrix J once; every rank forms G and u = Jᵀw.
    Per rank and step (ring algorithms): sends/receives ≈ 2·T·d·(n−1)/n values, plus the task-specific
    gradients and the T loss values. Compute: the full T²·d Gram and T·d fusion on every rank.

``"sharded"`` — reduce-scatter J by columns (rank k receives the mean of its d/n columns), all-reduce the
    T×T Gram of the shards (G = Σ_k J_k J_kᵀ, exact), fuse the shard u_k = J_kᵀw, all-gather u.
    Per rank and step: ≈ T·d·(n−1)/n (reduce-scatter) + d·(n−1)/n (all-gather) + T² values, i.e.
    (T+1)/(2T) of the ``"allreduce"`` volume, and 1/n of the Gram and fusion compute. Valid for every
    method that sees only G and the losses (all built-in methods).

Both paths also average the T loss values (loss-based methods need the global losses) and the task-specific
gradients, and run one tiny all-reduce per step that checks every rank passed the same task count and
reached the same parameters with the same tasks (so a mismatch is a clear error, not a hang or garbage).
On one process the reduction is ``LocalReduction``: the same interface, no communication.
Loss weightings that need no Gram matrix (``needs_gram = False``: one backward of Σ w_i L_i) average
their T loss values before computing the weights and their single gradient after (one all-reduce each).
Methods that draw random numbers (PCGrad, GradVac, RLW) get rank 0's generator state once, before their first
call, so all ranks visit the tasks in the same order (different seeds would make the ranks drift apart
silently). The collectives run on the parameters' device (CPU tensors for gloo, CUDA tensors for NCCL).

FSDP2 (``fully_shard``) parameters are DTensor shards: FSDP itself reduce-scatters each task's gradient, and
the Gram matrix is summed over the ranks' shards (``gradsurgery.sources.fsdp``); the reduction then only
sums, averages the losses and checks that the ranks agree. The group is the FSDP mesh's (a 1-D mesh).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeGuard

import torch

from ._collective import sum_in_place
from ._validation import check_choice
from .gram import combine, gram_matrix

if TYPE_CHECKING:
    from .methods import Method

STRATEGIES = ("allreduce", "sharded")


def _dist() -> ModuleType:
    # torch.distributed, typed as a module: its functions are called through it untyped.
    import torch.distributed as dist

    return dist


def is_ddp(module: Any) -> TypeGuard[torch.nn.parallel.DistributedDataParallel]:
    return torch.distributed.is_available() and isinstance(module, torch.nn.parallel.DistributedDataParallel)


def fsdp_mesh(params: Iterable[torch.Tensor]) -> Any | None:
    """The device mesh of FSDP2 (``fully_shard``) parameters, or None when no parameter is a DTensor.

    ValueError when the parameters are only partly sharded, live on several meshes, or are not sharded
    the way FSDP2 shards them: dim 0 over a 1-D mesh, or HSDP's (replicate, shard) 2-D mesh, replicated over
    its first dimension and sharded on dim 0 over its second (tensor parallelism is not supported)."""
    params = list(params)
    if not params or not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor, Replicate, Shard

    sharded = [p for p in params if isinstance(p, DTensor)]
    if not sharded:
        return None
    if len(sharded) != len(params):
        plain = next(p for p in params if not isinstance(p, DTensor))
        raise ValueError(
            "the optimizer holds FSDP2 (fully_shard) parameters and plain tensors (one of shape "
            f"{tuple(plain.shape)}): apply fully_shard to the whole model (its root module too)"
        )
    mesh = sharded[0].device_mesh
    for p in sharded:
        if p.device_mesh != mesh:
            raise ValueError("FSDP2 parameters on different device meshes are not supported")
        if tuple(p.placements) not in ((Shard(0),), (Replicate(), Shard(0))):
            raise ValueError(
                "only FSDP2 sharding is supported (dim 0 over a 1-D mesh, or HSDP: replicated over a 2-D "
                f"mesh's first dimension, dim 0 sharded over its second); found placements "
                f"{tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh (tensor parallelism?) for a "
                f"parameter of shape {tuple(p.shape)}"
            )
    return mesh


class DistributedSync:
    """Which reduction a ``backward`` uses, and what must persist between calls.

    Args:
        model: the ``DistributedDataParallel`` module (optional): its process group is used and the per-task
            gradients are taken inside its ``no_sync()``.
        process_group: the group to average over; default: the DDP module's group, else the default group.
        enabled: ``None`` (auto: on when ``torch.distributed`` is initialised with more than one rank in the
            group), ``True`` (required: error when not initialised) or ``False`` (each rank fuses its own
            gradients).
        strategy: ``"allreduce"`` or ``"sharded"`` (see the module docstring for their cost).

    All mutable state lives on this object and is changed in place, so framework proxies that copy the
    optimizer's ``__dict__`` (Lightning's ``LightningOptimizer``) share it.
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module | None = None,
        process_group: Any = None,
        enabled: bool | None = None,
        strategy: str = "allreduce",
    ) -> None:
        if enabled not in (None, True, False):
            raise TypeError(f"distributed must be None (auto), True or False, got {enabled!r}")
        check_choice(strategy, STRATEGIES, "dist_strategy")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module (the DDP-wrapped model), got {type(model).__name__}"
            )
        if process_group is not None and not _is_process_group(process_group):
            raise TypeError(
                f"process_group must be a torch.distributed ProcessGroup, got {type(process_group).__name__}"
            )
        self.model = model
        self.process_group = process_group
        self.enabled = enabled
        self.strategy = strategy
        self.rng_shared = False
        self._local = LocalReduction(self.no_sync)

    def use_mesh(self, mesh: Any) -> None:
        """Average over the ranks of an FSDP2 mesh: its group (an HSDP mesh's, all its ranks: those of the
        whole world), unless the same ranks were given as ``process_group``; ValueError when the ranks would
        not be averaged over (``distributed=False`` or another group)."""
        dist = _dist()
        if mesh.ndim == 1:
            group = mesh.get_group()
        elif mesh.size() == dist.get_world_size():
            group = dist.group.WORLD
        else:
            raise ValueError(
                f"the FSDP2 parameters are on an HSDP mesh of {mesh.size()} of the "
                f"{dist.get_world_size()} ranks: a 2-D mesh is supported when it spans every rank"
            )
        ranks = dist.get_process_group_ranks(group)
        if self.enabled is False and len(ranks) > 1:
            raise ValueError(
                f"the parameters are FSDP2 shards over {len(ranks)} ranks: the Gram matrix must be summed "
                "over them, so distributed=False is not possible"
            )
        if self.process_group is not None:
            given = dist.get_process_group_ranks(self.process_group)
            if given != ranks:
                raise ValueError(
                    f"process_group has ranks {given} but the FSDP2 parameters are sharded over ranks {ranks}"
                )
        else:
            self.process_group = group

    def group(self) -> Any | None:
        """The process group to average over, or None when this step is not distributed."""
        if self.enabled is False:
            return None
        dist = _dist() if torch.distributed.is_available() else None
        if dist is None or not dist.is_initialized():
            if self.enabled or self.process_group is not None or is_ddp(self.model):
                raise RuntimeError(
                    "GradSurgery was asked to synchronise gradients (distributed=True, a process_group or a "
                    "DDP model) but torch.distributed is not initialised"
                )
            return None
        group = self.process_group
        if group is None and is_ddp(self.model):
            group = self.model.process_group
        if group is None:
            group = dist.group.WORLD
        if self.enabled is None and dist.get_world_size(group) == 1:
            return None
        return group

    def reduction(self, device: torch.device) -> Reduction:
        """The reduction of this ``backward``: local, or over the group with the configured strategy."""
        group = self.group()
        if group is None:
            return self._local
        kind = ShardedReduction if self.strategy == "sharded" else AllReduceReduction
        return kind(self, group, device)

    def no_sync(self) -> contextlib.AbstractContextManager[Any]:
        """DDP's ``no_sync()`` when the DDP module is known: its gradient hooks must not fire on task
        gradients."""
        return self.model.no_sync() if is_ddp(self.model) else contextlib.nullcontext()

    def __deepcopy__(self, memo: dict[int, Any]) -> DistributedSync:
        # A process group and the live DDP module cannot (and need not) be copied: the copy shares them.
        twin = DistributedSync.__new__(DistributedSync)
        twin.__dict__.update(self.__dict__)
        memo[id(self)] = twin
        return twin

    def __getstate__(self) -> dict[str, Any]:
        # Pickling drops the DDP module and the process group (neither can be pickled); an unpickled wrapper
        # falls back to automatic detection on the default group.
        state = self.__dict__.copy()
        state["model"] = None
        state["process_group"] = None
        state["rng_shared"] = False
        return state


class LocalReduction:
    """One process: nothing to average, nothing to agree on."""

    group: Any = None
    spans_ranks = False  # whether the step is averaged over data-parallel ranks

    def __init__(self, no_sync: Callable[[], contextlib.AbstractContextManager[Any]]) -> None:
        self.no_sync = no_sync

    def fail(self, error: BaseException) -> None:
        """Called when this process's local checks failed (the caller raises ``error`` next)."""

    def agree(self, num_tasks: int, signature: int) -> None:
        """Every rank passed the same task count and reached the same parameters (one rank: trivially)."""

    def share_rng(self, method: Method) -> None:
        """Every rank draws the same random numbers (one rank: trivially)."""

    def jacobian(
        self,
        jac: torch.Tensor,
        values: torch.Tensor,
        task_specific: list[torch.Tensor],
        gram_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """(G, the loss values, w ↦ Jᵀw) of the rank-averaged J; averages ``task_specific`` in place."""
        return gram_matrix(jac, gram_dtype), values, _fuse_with(jac)

    def average(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def feature_gram(self, gram: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(G_z, the loss values) of the whole batch (``_GroupReduction.feature_gram``): one rank, its own."""
        return gram, values

    def sum_in_place(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over the ranks, in place (one rank: nothing to add)."""

    def average_in_place(self, tensors: list[torch.Tensor]) -> None:
        """Average each tensor over the ranks, in place (one rank: nothing to do)."""

    def average_gradients(
        self, params: list[torch.Tensor], grads: Sequence[torch.Tensor | None]
    ) -> Sequence[torch.Tensor | None]:
        return grads


class _GroupReduction(LocalReduction):
    spans_ranks = True

    def __init__(self, sync: DistributedSync, group: Any, device: torch.device) -> None:
        super().__init__(sync.no_sync)
        self.sync = sync
        self.group = group
        self.device = device

    def fail(self, error: BaseException) -> None:
        self._exchange(failure=error)

    def agree(self, num_tasks: int, signature: int) -> None:
        self._exchange(num_tasks=num_tasks, signature=signature)

    def _exchange(
        self, *, num_tasks: int = 0, signature: int = 0, failure: BaseException | None = None
    ) -> None:
        """One tiny all-reduce: every rank learns whether any rank failed its local checks, and that all
        ranks have the same task count and gradient layout. Raises on every rank together (no hang)."""
        dist = _dist()
        rank = dist.get_rank(self.group)
        # MAX of (x, −x) gives the largest and the smallest x over the ranks in one call.
        vec = torch.tensor(
            [rank + 1 if failure is not None else 0, num_tasks, -num_tasks, signature, -signature],
            dtype=torch.int64,
            device=self.device,
        )
        dist.all_reduce(vec, op=dist.ReduceOp.MAX, group=self.group)
        failed, t_max, t_min, s_max, s_min = (int(v) for v in vec.tolist())
        t_min, s_min = -t_min, -s_min
        if failure is not None:
            return
        if failed:
            raise RuntimeError(
                f"GradSurgery.backward failed its checks on rank {failed - 1}; "
                f"this rank (rank {rank}) stops too"
            )
        if t_max != t_min:
            raise ValueError(
                f"ranks passed different task counts to GradSurgery.backward (between {t_min} and {t_max}; "
                f"this rank passed {num_tasks}); every rank must pass the same losses in the same order"
            )
        if s_max != s_min:
            raise ValueError(
                "ranks reached different parameters with their tasks (the shared / task-specific layout "
                "differs between ranks); every rank must compute every task loss through the same parameters"
            )

    def share_rng(self, method: Method) -> None:
        """Give every rank rank 0's generator states (once): PCGrad's and GradVac's random task orders must
        be the same on all ranks."""
        if self.sync.rng_shared:
            return
        dist = _dist()
        for gen in method.generators().values():
            state = gen.get_state().to(self.device)
            dist.broadcast(state, group=self.group, group_src=0)
            gen.set_state(state.cpu())
        self.sync.rng_shared = True

    def feature_gram(self, gram: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Representation mode's G_z of the whole batch from each rank's G_r = J_r J_rᵀ, J_r the gradients of
        its own (mean) losses with respect to its own samples' features. The whole batch's J_z has the ranks'
        J_r / n side by side (its loss is the mean of the n ranks' means; each rank's features are its own
        columns), so G_z = Σ_r G_r / n² exactly; the losses are averaged. One all-reduce of T² + T numbers."""
        t = gram.shape[0]
        n = _dist().get_world_size(self.group)
        packed = torch.cat([gram.reshape(-1), values.to(device=gram.device, dtype=gram.dtype)])
        sum_in_place([packed], self.group)
        return packed[: t * t].view(t, t).div_(n * n), packed[t * t :].div_(n).to(values.dtype)

    def sum_in_place(self, tensors: list[torch.Tensor]) -> None:
        sum_in_place(tensors, self.group)

    def average_in_place(self, tensors: list[torch.Tensor]) -> None:
        sum_in_place(tensors, self.group)
        ranks = _dist().get_world_size(self.group)
        for t in tensors:
            t.div_(ranks)

    def average(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of ``values`` over the ranks (a new tensor)."""
        dist = _dist()
        out = values.clone()
        dist.all_reduce(out, group=self.group)
        return out.div_(dist.get_world_size(self.group))

    def average_gradients(
        self, params: list[torch.Tensor], grads: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor | None]:
        """Mean of one gradient per parameter over the ranks (the single backward of loss weightings, and
        representation mode's passes); a parameter keeps None only when no rank reached it. Which ranks
        reached a parameter, and whether its gradient is sparse anywhere (an ``nn.Embedding(sparse=True)``),
        is agreed first (one all-reduce of two flags per parameter), so that a rank that did not reach it
        takes part with zeros of the same kind."""
        flags = torch.tensor(
            [[float(g is not None), float(g is not None and g.is_sparse)] for g in grads],
            dtype=torch.float64,
            device=params[0].device,
        )
        sum_in_place([flags], self.group)
        reached, sparse = (flags > 0).T.tolist()
        filled = [
            g if g is not None else _sparse_zeros(p) if is_sparse else torch.zeros_like(p)
            for p, g, is_sparse in zip(params, grads, sparse, strict=True)
        ]
        averaged = mean_gradients(filled, self.group)
        return [g if r else None for g, r in zip(averaged, reached, strict=True)]


class AllReduceReduction(_GroupReduction):
    def jacobian(
        self,
        jac: torch.Tensor,
        values: torch.Tensor,
        task_specific: list[torch.Tensor],
        gram_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """Average J in place (one all-reduce of the T×d buffer), then the task-specific gradients and the
        losses (one small all-reduce per dtype)."""
        dist = _dist()
        n = dist.get_world_size(self.group)
        if jac.numel():
            dist.all_reduce(jac, group=self.group)
            jac.div_(n)
        values = values.clone()
        sum_in_place(task_specific + [values], self.group)
        for g in task_specific:
            g.div_(n)
        return gram_matrix(jac, gram_dtype), values.div_(n), _fuse_with(jac)


class ShardedReduction(_GroupReduction):
    def jacobian(
        self,
        jac: torch.Tensor,
        values: torch.Tensor,
        task_specific: list[torch.Tensor],
        gram_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """Reduce-scatter J by columns, all-reduce the Gram of the shards; u is fused per shard and
        all-gathered."""
        dist = _dist()
        group = self.group
        n = dist.get_world_size(group)
        num_tasks, dim = jac.shape
        width = max(1, math.ceil(dim / n))
        if dim == n * width:
            padded = jac
        else:
            padded = jac.new_zeros(num_tasks, n * width)
            padded[:, :dim] = jac
        # Rank k receives columns [k·width, (k+1)·width): lay the n blocks out one after the other.
        blocks = padded.view(num_tasks, n, width).transpose(0, 1).contiguous()
        shard = jac.new_empty(num_tasks, width)
        _reduce_scatter(shard, blocks.view(n * num_tasks, width), group)
        shard.div_(n)
        # G = Σ_k J_k J_kᵀ over the column blocks: summed, not averaged. The losses ride along.
        partial = gram_matrix(shard, gram_dtype)
        packed = torch.cat([partial.reshape(-1), values.to(device=partial.device, dtype=gram_dtype)])
        sum_in_place(task_specific + [packed], group)
        for g in task_specific:
            g.div_(n)
        gram = packed[: num_tasks * num_tasks].view(num_tasks, num_tasks)
        values = packed[num_tasks * num_tasks :].div(n).to(values.dtype)

        def fuse(weights: torch.Tensor) -> torch.Tensor:
            piece = combine(weights, shard)
            full = piece.new_empty(n * piece.numel())
            _all_gather(full, piece, group)
            return full[:dim]

        return gram, values, fuse


Reduction = LocalReduction


def _fuse_with(jac: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda weights: combine(weights, jac)


def _is_process_group(obj: Any) -> bool:
    return torch.distributed.is_available() and isinstance(obj, torch.distributed.ProcessGroup)


def _sparse_zeros(param: torch.Tensor) -> torch.Tensor:
    """An empty sparse COO gradient of ``param``'s shape (its rows sparse, as an embedding's)."""
    indices = torch.zeros(1, 0, dtype=torch.int64, device=param.device)
    values = param.new_zeros((0, *param.shape[1:]))
    return torch.sparse_coo_tensor(indices, values, param.shape, check_invariants=False).coalesce()


def mean_gradients(grads: list[torch.Tensor], group: Any) -> list[torch.Tensor]:
    """The rank mean of each gradient (new tensors): dense ones in one all-reduce per dtype, sparse COO ones
    by gathering every rank's (row, values) entries (ranks touch different rows)."""
    n = _dist().get_world_size(group)
    out: dict[int, torch.Tensor] = {}  # every position is filled: sparse, or by its dense bucket
    buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for k, g in enumerate(grads):
        if g.is_sparse:
            out[k] = _mean_sparse(g, group, n)
        else:
            buckets.setdefault((g.dtype, g.device), []).append(k)
    for _, members in sorted(buckets.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        flat = torch.cat([grads[k].reshape(-1) for k in members])
        _dist().all_reduce(flat, group=group)
        flat.div_(n)
        offset = 0
        for k in members:
            numel = grads[k].numel()
            out[k] = flat[offset : offset + numel].view_as(grads[k])
            offset += numel
    return [out[k] for k in range(len(grads))]


def _mean_sparse(g: torch.Tensor, group: Any, n: int) -> torch.Tensor:
    dist = _dist()
    g = g.coalesce()
    idx, vals = g.indices(), g.values()
    size = torch.tensor([vals.shape[0]], dtype=torch.int64, device=vals.device)
    sizes = [torch.zeros_like(size) for _ in range(n)]
    dist.all_gather(sizes, size, group=group)
    longest = max(int(s) for s in sizes)
    pidx = idx.new_zeros(idx.shape[0], longest)
    pidx[:, : idx.shape[1]] = idx
    pvals = vals.new_zeros((longest, *vals.shape[1:]))
    pvals[: vals.shape[0]] = vals
    gi = [torch.empty_like(pidx) for _ in range(n)]
    gv = [torch.empty_like(pvals) for _ in range(n)]
    dist.all_gather(gi, pidx, group=group)
    dist.all_gather(gv, pvals, group=group)
    all_idx = torch.cat([t[:, : int(s)] for t, s in zip(gi, sizes, strict=True)], dim=1)
    all_vals = torch.cat([t[: int(s)] for t, s in zip(gv, sizes, strict=True)])
    return torch.sparse_coo_tensor(all_idx, all_vals / n, g.shape, check_invariants=False).coalesce()


def _reduce_scatter(output: torch.Tensor, stacked: torch.Tensor, group: Any) -> None:
    dist = _dist()
    op = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    op(output, stacked, group=group)


def _all_gather(output: torch.Tensor, piece: torch.Tensor, group: Any) -> None:
    dist = _dist()
    op = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    op(output, piece, group=group)
