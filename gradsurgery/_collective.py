"""Collectives shared by the data-parallel reductions (``distributed``) and the sums over the ranks that hold
a sharded tensor's pieces (the FSDP2 source, the λ-free L2 rule)."""

from __future__ import annotations

from typing import Any

import torch


def sum_in_place(tensors: list[torch.Tensor], group: Any) -> None:
    """Sum each tensor over the ranks of ``group``, in place: one all-reduce per (dtype, device), so the
    float64 Gram keeps its precision and float32 head gradients do not travel as float64."""
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for _, members in sorted(buckets.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        flat = torch.cat([t.reshape(-1) for t in members])
        torch.distributed.all_reduce(flat, group=group)
        offset = 0
        for t in members:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
