"""Data parallelism for the activation source: the exact G of the rank-averaged Jacobian.

With J_r the T×d Jacobian of rank r and n ranks, the batch-mean Jacobian is J = (1/n) Σ_r J_r and G = J Jᵀ
has cross-rank terms J_r J_sᵀ: the local kernels X_r X_rᵀ cannot give them without gathering every rank's
activations. So each group is materialised chunk by chunk (identical chunks on every rank), every chunk is
all-reduced (sum, ÷ n) before its T×T Gram: memory stays one chunk, communication is T·d values per step in
total (as ``dist_strategy="allreduce"`` of the dense path, but in chunks). Sparse tables: the ranks touch
different rows, so the union of touched rows is gathered first (one all-gather of the row numbers).
"""

from __future__ import annotations

import zlib
from types import ModuleType
from typing import Any

import torch


def _dist() -> ModuleType:
    # torch.distributed, typed as a module: its functions are called through it untyped.
    import torch.distributed as dist

    return dist


def world(group: Any) -> int:
    size: int = _dist().get_world_size(group)
    return size


def agree(group: Any, device: torch.device, signature: str) -> None:
    """Raise on every rank together when the ranks' layouts differ (the collectives that follow would
    otherwise pair different tensors, or hang)."""
    dist = _dist()
    sig = zlib.crc32(signature.encode()) & 0x7FFFFFFF
    vec = torch.tensor([sig, -sig], dtype=torch.int64, device=device)
    dist.all_reduce(vec, op=dist.ReduceOp.MAX, group=group)
    hi, lo = int(vec[0]), -int(vec[1])
    if hi != lo:
        raise ValueError(
            "ranks reached different parameters or recorded different module calls with their tasks "
            "(the activation source's layout differs between ranks); every rank must compute every task "
            "loss through the same modules"
        )


def mean_(buf: torch.Tensor, group: Any) -> None:
    """In-place mean over the ranks."""
    _dist().all_reduce(buf, group=group)
    buf.div_(world(group))


def union_rows(ids: torch.Tensor, group: Any) -> torch.Tensor:
    """The sorted union over the ranks of sorted unique row numbers."""
    dist = _dist()
    n = world(group)
    size = torch.tensor([ids.numel()], dtype=torch.int64, device=ids.device)
    sizes = [torch.zeros_like(size) for _ in range(n)]
    dist.all_gather(sizes, size, group=group)
    longest = max(int(s) for s in sizes)
    padded = torch.full((longest,), -1, dtype=torch.int64, device=ids.device)
    padded[: ids.numel()] = ids
    gathered = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(gathered, padded, group=group)
    rows = torch.cat([g[: int(s)] for g, s in zip(gathered, sizes, strict=True)])
    union: torch.Tensor = torch.unique(rows)
    return union
