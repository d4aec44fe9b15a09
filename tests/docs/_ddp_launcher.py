"""Run a ``torchrun`` script on 2 gloo ranks: ``python _ddp_launcher.py SCRIPT OUTDIR``.

A fresh interpreter imports what the script imports once, then forks the ranks (as tests/test_distributed.py
starts its ranks), each with the environment torchrun would give it. Forking from this small process rather
than from the test session keeps the ranks clear of whatever the session has started (threads, process
groups), and lets the test stop the whole process group on a timeout. Each rank leaves ``rank<r>.done`` or
``rank<r>.error`` (the traceback) in OUTDIR; the exit status is non-zero when a rank failed.
"""

from __future__ import annotations

import ast
import importlib
import os
import pathlib
import socket
import sys
import traceback

WORLD = 2


def imported_modules(code: str) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, port: int, script: str, outdir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
    )
    import torch

    torch.set_num_threads(1)
    os.chdir(outdir)
    code = pathlib.Path(script).read_text()
    try:
        exec(compile(code, script, "exec"), {"__name__": "__main__"})
    except BaseException:
        pathlib.Path(outdir, f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    pathlib.Path(outdir, f"rank{rank}.done").write_text("")


def main(script: str, outdir: str) -> int:
    for name in imported_modules(pathlib.Path(script).read_text()):
        importlib.import_module(name)  # once here, not by both ranks at once
    import torch.multiprocessing as mp

    try:
        mp.start_processes(
            rank_main, args=(free_port(), script, outdir), nprocs=WORLD, join=True, start_method="fork"
        )
    except Exception as err:  # a rank raised: its traceback is in rank<r>.error
        print(f"a rank failed: {type(err).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
