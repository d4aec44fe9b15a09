"""Peak tensor memory of a step on the sparse-table workloads, counted exactly: does the exact full mode's
extra memory over a plain step grow with the tables?

The speed suite measures the resident set size, whose spread (about 1 MiB between repeats) is as large as the
activation source's whole extra on these workloads (3-4 MiB). Here every tensor a step allocates is counted
as it is created and as it is freed (a ``TorchDispatchMode`` sees every operator's outputs, the backward's
included; a weak reference on each storage sees it freed; a sparse tensor counts its indices and values), so
the peak of live bytes above those live before the step is exact and repeats to the byte. Each variant takes
one step first (the optimizer's state exists), then the counted step.

Variants (``mgda``): ``plain`` (the summed loss) and ``activations`` (``GradSurgery(..., model=model)``),
on 8 ``Embedding(rows, 64, sparse=True)`` tables, batch 512, T = 2 and 4, for 10⁵ and 10⁶ rows. Writes
``report.md`` and ``rows.json``.

    python -m benchmarks.sparse_memory --out results/sparse_memory
"""

from __future__ import annotations

import argparse
import sys
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

try:
    from . import speed
    from .speed_models import sparse_workload
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import speed  # type: ignore[no-redef]
    from speed_models import sparse_workload  # type: ignore[no-redef]


class LiveBytes(TorchDispatchMode):
    """The bytes of the storages created while active that are still alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, Any] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: only new storages are allocations.
        inputs = {ptr for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) for ptr in _ptrs(t)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._count(t, inputs)
        return out

    def _count(self, t: torch.Tensor, inputs: set[int]) -> None:
        if t.is_sparse:
            self._count(t._indices(), inputs)
            self._count(t._values(), inputs)
            return
        if t.layout != torch.strided:
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in inputs or key in self._refs:
            return
        size = storage.nbytes()
        self._refs[key] = weakref.ref(storage, lambda _ref, key=key, size=size: self._free(key, size))
        self.live += size
        self.peak = max(self.peak, self.live)

    def _free(self, key: int, size: int) -> None:
        if self._refs.pop(key, None) is not None:
            self.live -= size


def _ptrs(t: torch.Tensor) -> list[int]:
    if t.is_sparse:
        return [*_ptrs(t._indices()), *_ptrs(t._values())]
    if t.layout != torch.strided:
        return []
    return [t.untyped_storage().data_ptr()]


def counted_peak(step: Any) -> int:
    """Bytes: the peak of what ``step()`` allocates and holds at once."""
    with LiveBytes() as mode:
        step()
    return mode.peak


def measure(rows: int, num_tasks: int, tiny: bool) -> dict[str, int]:
    if tiny:
        w = sparse_workload(rows, num_tasks, torch.device("cpu"), fields=2, dim=4, batch=16)
    else:
        w = sparse_workload(rows, num_tasks, torch.device("cpu"))
    out = {}
    for variant in ("plain", "activations"):
        step = speed.exact_member(w, variant)
        step()  # the optimizer's state exists before the counted step
        w.inner.zero_grad(set_to_none=True)
        out[variant] = counted_peak(step)
        w.inner.zero_grad(set_to_none=True)
        speed._close(step)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/sparse_memory")
    parser.add_argument("--rows", type=int, nargs="+", default=[10**5, 10**6])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for num_tasks in args.tasks:
        for rows in args.rows:
            peaks = measure(rows, num_tasks, args.tiny)
            results.append({"rows": rows, "num_tasks": num_tasks, **peaks})
            print(f"rows {rows} T={num_tasks} done", file=sys.stderr)
    lines = [
        f"# Peak tensor memory of a step, counted exactly (MiB; torch {torch.__version__})",
        "",
        "| T | table rows | plain | activations | activations − plain |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        plain, act = r["plain"] / 2**20, r["activations"] / 2**20
        lines.append(f"| {r['num_tasks']} | {r['rows']:,} | {plain:.3f} | {act:.3f} | {act - plain:.3f} |")
    speed.write_rows_and_report(Path(args.out), results, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
