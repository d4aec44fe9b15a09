"""Two gloo processes on 127.0.0.1 for the data-parallel tests: each runs a scenario function and saves
what it saw; the test process reads both ranks' results back."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _worker(
    rank: int, port: int, outdir: str, scenarios: Callable[[int], dict[Any, Any]], world: int
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(scenarios(rank), os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_ranks(
    scenarios: Callable[[int], dict[Any, Any]], outdir: str, world: int = WORLD
) -> list[dict[Any, Any]]:
    """``scenarios(rank)`` on each of ``world`` ranks; returns their results by rank.

    Fork where it is safe: the workers inherit the imported torch instead of importing it again (seconds on a
    busy machine). Where CUDA is present, autograd has started a thread per device by the first backward in
    this process, and a forked child cannot run autograd: spawn there."""
    method = "spawn" if torch.cuda.is_available() else "fork"
    mp.start_processes(
        _worker, args=(free_port(), outdir, scenarios, world), nprocs=world, join=True, start_method=method
    )
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def catch(fn: Callable[[], Any]) -> tuple[str | None, str]:
    """Run ``fn`` on a rank and record its exception as (class name, message), (None, "") without one: the
    parent process asserts on what each rank raised."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - recorded for the assertions in the parent process
        return type(err).__name__, str(err)
    return None, ""


def gloo_carries_complex() -> bool:
    """Whether this torch's gloo process group broadcasts and reduce-scatters complex tensors, asked on every
    rank of the group (each gets the same answer). torch 2.6 to 2.8 refuse them (``RuntimeError: Invalid
    scalar type``; their all-reduce takes them), so DistributedDataParallel's first broadcast and FSDP2's
    reduce-scatter fail on complex parameters: the complex scenarios are then not run, and their tests skip
    (``torch_support.GLOO_COMPLEX_REASON``)."""
    try:
        dist.broadcast(torch.zeros(WORLD, dtype=torch.complex64), 0)
        dist.reduce_scatter_tensor(
            torch.zeros(1, dtype=torch.complex64), torch.zeros(dist.get_world_size(), dtype=torch.complex64)
        )
    except RuntimeError as err:
        if "Invalid scalar type" not in str(err):
            raise
        return False
    return True
