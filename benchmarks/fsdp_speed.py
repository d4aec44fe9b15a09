"""FSDP2 step time: GradSurgery's exact full mode on ``fully_shard`` parameters against a plain FSDP step.

Two gloo ranks on 127.0.0.1 (one thread each) train the speed suite's MLP (trunk and T linear heads, every
Linear and the root wrapped by ``fully_shard``) on their own batch of 128. Variants, timed interleaved (every
repetition times each variant once, in an order shuffled the same way on both ranks, and divides by the plain
step of the same repetition):

- ``plain``: ``sum(losses).backward()`` and the Adam step (one backward, FSDP's own reduce-scatter);
- each method: ``GradSurgery(adam, method).backward(losses)`` and ``step()`` (T backward passes, each
  reduce-scattered by FSDP, and one all-reduce of the T×T Gram matrix);
- with ``--representation``, each method also in representation mode, ``backward(losses, features=z)``
  (``<method> z``: one pass through the heads split at z for J_z, one all-reduce of G_z, one backward of the
  losses with u_z sent through the trunk); with ``--per-task`` also as if the heads' graph did not split at z
  (``<method> z per task``: one pass through the heads per task for J_z).

``--tower N`` replaces the linear heads by towers d_z → N → N → 1 (ReLU), each Linear an FSDP unit.

Rank 0 writes ``report.md`` and ``rows.json`` under ``--out``: the median ratio to the plain step and its
25th-75th percentiles.

    python -m benchmarks.fsdp_speed --out results/fsdp
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradsurgery.sources.fsdp as fsdp_source
from gradsurgery import GradSurgery

try:
    from .speed import SIZES, TINY_SIZES, interleaved_times, quantile, write_rows_and_report
    from .speed_models import SpeedModel
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from speed import (  # type: ignore[no-redef]
        SIZES,
        TINY_SIZES,
        interleaved_times,
        quantile,
        write_rows_and_report,
    )
    from speed_models import SpeedModel  # type: ignore[no-redef]

WORLD = 2
BATCH = 128


def sharded_model(dims: tuple[int, int, int], num_tasks: int, tower: int = 0) -> SpeedModel:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(num_tasks)
    model = SpeedModel(*dims, num_tasks)
    if tower:
        model.heads = nn.ModuleList(
            nn.Sequential(
                nn.Linear(dims[2], tower), nn.ReLU(), nn.Linear(tower, tower), nn.ReLU(), nn.Linear(tower, 1)
            )
            for _ in range(num_tasks)
        )
    mesh = init_device_mesh("cpu", (WORLD,))  # gloo on the CPU, also where CUDA is present
    for module in model.modules():
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def variant_step(
    dims: tuple[int, int, int],
    num_tasks: int,
    method: str | None,
    rank: int,
    features: bool = False,
    per_task: bool = False,
    tower: int = 0,
) -> Callable[[], None]:
    model = sharded_model(dims, num_tasks, tower)
    gen = torch.Generator().manual_seed(1000 * num_tasks + rank)
    x, y = torch.randn(BATCH, dims[0], generator=gen), torch.randn(BATCH, num_tasks, generator=gen)
    inner = torch.optim.Adam(model.parameters(), lr=1e-5)
    opt = GradSurgery(inner, method) if method is not None else None

    def losses() -> tuple[torch.Tensor, list[torch.Tensor]]:
        z, outs = model(x)
        return z, [nn.functional.mse_loss(o, y[:, i]) for i, o in enumerate(outs)]

    def step() -> None:
        if opt is None:
            inner.zero_grad(set_to_none=True)
            torch.stack(losses()[1]).sum().backward()
            inner.step()
        else:
            opt.zero_grad(set_to_none=True)
            z, task_losses = losses()
            if per_task:
                split = fsdp_source.split_at_features
                fsdp_source.split_at_features = lambda losses, features: None
                try:
                    opt.backward(task_losses, features=z)
                finally:
                    fsdp_source.split_at_features = split
            else:
                opt.backward(task_losses, features=z if features else None)
            opt.step()

    return step


def worker(rank: int, port: int, args: argparse.Namespace) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # The model returns its heads' squeezed outputs, views: FSDP warns about in-place ops on them; none run.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        dims = {**SIZES, **TINY_SIZES}[args.size]
        rows = []
        for num_tasks in args.tasks:
            members = {"plain": variant_step(dims, num_tasks, None, rank, tower=args.tower)}
            for method in args.methods:
                for name in columns(args, method):
                    members[name] = variant_step(
                        dims,
                        num_tasks,
                        method,
                        rank,
                        features=name != method,
                        per_task=name.endswith("per task"),
                        tower=args.tower,
                    )
            times = interleaved_times(members, args.reps, args.inner_steps, around=dist.barrier)
            plain = times["plain"]
            for name, values in times.items():
                ratios = [v / p for v, p in zip(values, plain, strict=True)]
                rows.append(
                    {
                        "size": args.size,
                        "num_tasks": num_tasks,
                        "variant": name,
                        "ms": 1e3 * statistics.median(values),
                        "ratio": statistics.median(ratios),
                        "ratio_p25": quantile(ratios, 0.25),
                        "ratio_p75": quantile(ratios, 0.75),
                    }
                )
        if rank == 0:
            write(rows, Path(args.out), args)
    finally:
        dist.destroy_process_group()


def columns(args: argparse.Namespace, method: str) -> list[str]:
    """The variants of ``method``: full mode, and representation mode (split at z, and per task)."""
    names = [method]
    if args.representation:
        names.append(f"{method} z")
        if args.per_task:
            names.append(f"{method} z per task")
    return names


def write(rows: list[dict], out: Path, args: argparse.Namespace) -> None:
    names = [name for m in args.methods for name in columns(args, m)]
    heads = f"towers d_z→{args.tower}→{args.tower}→1" if args.tower else "linear heads"
    lines = [
        f"# FSDP2 step time ({WORLD} gloo ranks, one thread each, model {args.size} with {heads}, "
        f"batch {BATCH} per rank, {args.reps} repetitions × {args.inner_steps} steps, "
        f"torch {torch.__version__})",
        "",
        "| T | plain ms | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for num_tasks in args.tasks:
        sub = {r["variant"]: r for r in rows if r["num_tasks"] == num_tasks}
        cells = [
            f"{sub[m]['ratio']:.2f} ({sub[m]['ratio_p25']:.2f}-{sub[m]['ratio_p75']:.2f})" for m in names
        ]
        lines.append(f"| {num_tasks} | {sub['plain']['ms']:.1f} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Cells: step time / plain FSDP step, median (25th-75th percentile) over the repetitions; "
        "`<method> z`: representation mode, features=z; `per task`: one pass through the heads per task."
    )
    write_rows_and_report(out, rows, "\n".join(lines) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/fsdp")
    parser.add_argument("--size", default="0.5M", choices=sorted({**SIZES, **TINY_SIZES}))
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--methods", nargs="+", default=["mgda", "nash_mtl", "cagrad"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument(
        "--representation", action="store_true", help="also time each method in representation mode"
    )
    parser.add_argument(
        "--per-task",
        action="store_true",
        help="with --representation: also as if the heads' graph did not split at z (one pass per task)",
    )
    parser.add_argument("--tower", type=int, default=0, help="heads d_z → N → N → 1 (default 0: linear)")
    args = parser.parse_args(argv)
    mp.start_processes(worker, args=(free_port(), args), nprocs=WORLD, join=True, start_method="spawn")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
