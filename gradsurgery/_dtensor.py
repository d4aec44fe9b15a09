"""FSDP2 (``fully_shard``) parameters are ``DTensor``s, each rank holding a dim-0 shard over a 1-D mesh, or
over the second dimension of HSDP's 2-D mesh, replicated over its first (``distributed.fsdp_mesh`` checks
that layout): this rank's shard, a ``DTensor`` made from a shard, and the process group over which the shards
of a tensor are spread."""

from __future__ import annotations

from typing import Any, cast

import torch


def is_sharded(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage: an in-place change changes the DTensor)."""
    return cast(torch.Tensor, t.to_local())  # type: ignore[attr-defined]


def sharded_like(param: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
    """A DTensor with ``param``'s global shape, mesh and placement whose local shard is ``shard``."""
    from torch.distributed.tensor import DTensor

    p = cast(Any, param)
    return DTensor.from_local(
        shard.reshape(local(param).shape),
        device_mesh=p.device_mesh,
        placements=p.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


def shard_group(t: torch.Tensor) -> Any:
    """The process group of the ranks that hold the shards of the DTensor ``t`` (its mesh's last
    dimension), this rank's among them: summed over it, a sum over the shards counts each entry once."""
    mesh = cast(Any, t).device_mesh
    return mesh.get_group(mesh.ndim - 1)
