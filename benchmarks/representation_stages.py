"""Where a representation-mode step spends its time: a method with task views against the floor of
``representation_overhead`` (the same algorithm written directly in torch), stage by stage.

The plain step, the floor and the method alternate in blocks of ``--block`` steps (the order shuffled per
repetition, as in ``representation_overhead``) in one process, on the same model and batch; the wall time
of every step is split into stages:

- the floor's, between the marks its step sets (``floor_step``'s ``lap``);
- the package's, by timing the internal functions that run each stage (wrapped for the run and restored
  after): ``zero_grad``, the heads pass that lands every ∇_z L_i and the heads' gradients
  (``ViewCollection._heads_pass``), the check that head i reads view i only (``check_own_views``), the
  Gram matrix (``FeatureCollection.reduce``), the check of the losses and G (``check_finite``), the
  method's weights (``Method.__call__``), the fused target u_z (``_fused_targets``), the pass through the
  trunk (``Passes.gradients``), the NaN/inf check of the written gradients (``finite_gradients``), the
  write-back (``accumulate``) and the optimizer step; ``backward, rest`` is what ``backward`` spends outside
  those (validation, bookkeeping, the transaction, the ``StepInfo``), ``forward`` what the step spends
  outside ``zero_grad``, ``backward`` and ``step`` (the trunk, the task views and the heads' losses).
  The ``forward`` of both also holds what lies outside every other stage: entering the step, and freeing
  its tensors and graph as it returns (30-60 µs a step on the speed suite's ``small``).

Each stage's time is a mean over the steps (µs per step), so the stages add up to the step; the timers'
own cost (two clock reads and a Python call per stage) is included. A stage costs more here than the same
call timed on its own in a loop, where its code and data stay in the caches: within a training step the
rest of the step (the model's kernels and the engine's other code) evicts them. Writes ``stages.md`` and
``stages.json``.

    python -m benchmarks.representation_stages --sizes small --tasks 2 4 8 --out results/stages
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import gradsurgery.optimizer as engine
import gradsurgery.sources.features as feature_source
from gradsurgery import GradSurgery
from gradsurgery.methods.base import Method

try:
    from .representation_overhead import Case, floor_step, gram_methods, method_step, plain_step
    from .speed import SIZES, TINY_SIZES
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from representation_overhead import (  # type: ignore[no-redef]
        Case,
        floor_step,
        gram_methods,
        method_step,
        plain_step,
    )
    from speed import SIZES, TINY_SIZES  # type: ignore[no-redef]

#: The package's stages: (owner, attribute, stage), timed around every call of ``owner.attribute``.
PACKAGE_STAGES: list[tuple[Any, str, str]] = [
    (GradSurgery, "zero_grad", "zero_grad"),
    (feature_source.ViewCollection, "_heads_pass", "heads pass"),
    (feature_source, "check_own_views", "view check"),
    (feature_source.FeatureCollection, "reduce", "gram"),
    (feature_source.FeatureCollection, "check_finite", "loss and G check"),
    (Method, "__call__", "solve"),
    (feature_source.FeatureCollection, "_fused_targets", "fused targets"),
    (feature_source.Passes, "gradients", "trunk pass"),
    (feature_source, "finite_gradients", "gradient check"),
    (engine, "accumulate", "write-back"),
    (GradSurgery, "step", "optimizer step"),
]
#: The package's stages that ``GradSurgery.backward`` does not run.
OUTSIDE_BACKWARD = {"zero_grad", "optimizer step"}
#: Stages in the order of a step, the two remainders included.
STAGES = [
    "zero_grad",
    "forward",
    "heads pass",
    "view check",
    "gram",
    "loss and G check",
    "solve",
    "fused targets",
    "trunk pass",
    "gradient check",
    "write-back",
    "backward, rest",
    "optimizer step",
]


class Stopwatch:
    """Seconds per stage, summed over the steps timed."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.last = time.perf_counter()

    def mark(self) -> None:
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        """Add the time since the last mark or lap to ``stage``."""
        now = time.perf_counter()
        self.seconds[stage] += now - self.last
        self.last = now

    def timed(self, fn: Callable[..., Any], stage: str) -> Callable[..., Any]:
        seconds = self.seconds

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[stage] += time.perf_counter() - start

        return wrapper


@contextlib.contextmanager
def timing_package(watch: Stopwatch) -> Iterator[None]:
    """The package's stage functions and ``GradSurgery.backward`` wrapped with ``watch``'s timers for the
    duration, the originals restored after."""
    wrapped = [*PACKAGE_STAGES, (GradSurgery, "backward", "backward")]
    originals = [(owner, name, vars(owner)[name]) for owner, name, _ in wrapped]
    try:
        for owner, name, stage in wrapped:
            setattr(owner, name, watch.timed(getattr(owner, name), stage))
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def measure_stages(
    size: str, num_tasks: int, method: str, reps: int, block: int, warmup: int = 5
) -> list[dict[str, Any]]:
    """One row per variant (plain, floor, the method): µs per step in all and per stage."""
    dims = {**SIZES, **TINY_SIZES}[size]
    case = Case(dims, num_tasks)
    floor_watch, package_watch = Stopwatch(), Stopwatch()
    steps = {
        "plain": plain_step(case),
        "floor": floor_step(case, lap=floor_watch.lap),
        method: method_step(case, method, views=True),
    }
    watches = {"floor": floor_watch, method: package_watch}
    totals: defaultdict[str, float] = defaultdict(float)
    with timing_package(package_watch):
        for step in steps.values():
            for _ in range(warmup):
                step()
        for timed in watches.values():
            timed.seconds.clear()
        rng = random.Random(0)
        names = list(steps)
        for _ in range(reps):
            rng.shuffle(names)
            for name in names:
                step, watch = steps[name], watches.get(name)
                for _ in range(block):
                    start = time.perf_counter()
                    if watch is not None:
                        watch.mark()
                    step()
                    totals[name] += time.perf_counter() - start
    count = reps * block
    package = package_watch.seconds
    inside = sum(package[stage] for _, _, stage in PACKAGE_STAGES if stage not in OUTSIDE_BACKWARD)
    package["backward, rest"] = package["backward"] - inside
    package["forward"] = (
        totals[method] - package["zero_grad"] - package["backward"] - package["optimizer step"]
    )
    del package["backward"]
    # what lies outside the floor's marks: entering the step, and freeing its tensors as it returns
    floor_watch.seconds["forward"] += totals["floor"] - sum(floor_watch.seconds.values())
    rows = []
    for name in steps:
        seconds = watches[name].seconds if name in watches else defaultdict(float)
        rows.append(
            {
                "size": size,
                "num_tasks": num_tasks,
                "variant": name,
                "step_us": 1e6 * totals[name] / count,
                "stages_us": {stage: 1e6 * seconds[stage] / count for stage in STAGES if stage in seconds},
            }
        )
    return rows


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"# Representation-mode stages ({args.threads} thread(s), batch 128, linear heads, {args.reps} "
        f"repetitions × {args.block} steps, torch {torch.__version__})",
        "",
        "µs per step, mean over the steps; the stages add up to the step (module docstring).",
    ]
    configs = list(dict.fromkeys((r["size"], r["num_tasks"]) for r in rows))
    for size, num_tasks in configs:
        plain, floor, ours = (r for r in rows if (r["size"], r["num_tasks"]) == (size, num_tasks))
        name = ours["variant"]
        lines += [
            "",
            f"## {size}, T = {num_tasks}: plain step {plain['step_us']:.0f} µs, floor "
            f"{floor['step_us']:.0f} µs ({floor['step_us'] / plain['step_us']:.2f}×), `{name}` "
            f"{ours['step_us']:.0f} µs ({ours['step_us'] / plain['step_us']:.2f}×)",
            "",
            f"| stage | floor | `{name}` | difference |",
            "|---|---|---|---|",
        ]
        for stage in STAGES:
            a, b = floor["stages_us"].get(stage), ours["stages_us"].get(stage)
            if a is None and b is None:
                continue
            diff = (b or 0.0) - (a or 0.0)
            cells = ["—" if v is None else f"{v:.0f}" for v in (a, b)]
            lines.append(f"| {stage} | {cells[0]} | {cells[1]} | {diff:+.0f} |")
        total = ours["step_us"] - floor["step_us"]
        lines.append(f"| **step** | {floor['step_us']:.0f} | {ours['step_us']:.0f} | {total:+.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/stages")
    parser.add_argument("--sizes", nargs="+", default=["small"], choices=sorted({**SIZES, **TINY_SIZES}))
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--method", default="mgda", help="a Gram-based method (default mgda, the floor's)")
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--block", type=int, default=10, help="steps per variant and repetition")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    for num_tasks in args.tasks:
        if args.method not in gram_methods(num_tasks):
            parser.error(
                f"--method: {args.method!r} is not a Gram-based method that runs {num_tasks} tasks "
                f"(those: {', '.join(gram_methods(num_tasks))})"
            )
    if args.reps < 1 or args.block < 1:
        parser.error("--reps and --block: at least 1")
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        for num_tasks in args.tasks:
            rows += measure_stages(size, num_tasks, args.method, args.reps, args.block)
            print(f"{size} T={num_tasks} done", file=sys.stderr)
    text = report(rows, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stages.json").write_text(json.dumps(rows, indent=1))
    (out / "stages.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
