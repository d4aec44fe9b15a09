"""Speed and memory of the activation gradient source against today's full mode and a plain backward.

``python -m benchmarks.activation_speed --out results/activation_speed.json`` (one thread by default).

Three workloads, each step = forward + gradients written to ``.grad`` (no optimizer step, so every member sees
the same parameters):

(a) **mlp**: the issue's prototype target, an MLP 512-1024-1024-1024-1024-512 (ReLU) with T = 8 linear heads,
    batch 128, float32. Members: ``plain`` (``sum(losses).backward()``), ``full`` (today's full mode:
    ``GradientCollector`` + ``gram_matrix`` + u = Jᵀw written to ``.grad``), ``activation``
    (``ActivationSource.collect`` + ``fused`` written to ``.grad``) in the forms auto / materialize, each
    with ``fused="backward"`` (one backward of Σ w_i L_i, the default) and ``fused="activations"``.
(b) **sparse**: 8 fields of ``Embedding(1_000_000, 64, sparse=True)``, batch 512, one small MLP tower
    512-64-1 per task on the concatenated fields, T = 2 and 4 (the shared parameters are the tables).
    **sparse+bottom**: the same with a shared dense bottom 512-256-128 before towers 128-64-1 (the exact
    Gram of a dense 512×256 layer at 512 rows costs T weight-gradient GEMMs, whichever form). Members:
    ``plain``, ``activation``; ``full`` is tried and its error reported (it cannot take sparse gradients).

Timing: interleaved repetitions, each timing every member once in a fresh random order; the medians of
the per-repetition ratios (member / plain, activation / full) with their 25th-75th percentiles, and the
median milliseconds. Memory, after every timing (it changes the allocator): a pass per member, two steps
each, the peak resident memory above the resident memory just before (VmHWM after resetting it through
``/proc/self/clear_refs``; large blocks forced to ``mmap`` so that freed memory leaves the process); on CUDA
``max_memory_allocated``. Reported as MB above plain's peak and as the ratio of the activation source's extra
memory to full mode's.

Accuracy (one step, float32): the largest |G_act − G_full| / √(G_ii G_jj) and the relative error of the
fused gradient against full mode's u = Jᵀw.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradsurgery.sources.jacobian import GradientCollector
from gradsurgery.gram import gram_matrix
from gradsurgery.sources.activation import ActivationSource


# -- workloads -----------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, widths: list[int], num_tasks: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(widths[-1], 1) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [head(z).squeeze(1) for head in self.heads]


class SparseRanker(nn.Module):
    """Sparse tables → (optionally a shared dense bottom) → one small MLP tower per task."""

    def __init__(self, fields: int, rows: int, dim: int, num_tasks: int, bottom: bool) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(rows, dim, sparse=True) for _ in range(fields))
        width = fields * dim
        self.bottom = None
        if bottom:
            self.bottom = nn.Sequential(nn.Linear(width, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
            width = 128
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, 1)) for _ in range(num_tasks)
        )

    def forward(self, idx: torch.Tensor) -> list[torch.Tensor]:
        z = torch.cat([table(idx[:, f]) for f, table in enumerate(self.tables)], dim=1)
        if self.bottom is not None:
            z = self.bottom(z)
        return [tower(z).squeeze(1) for tower in self.towers]


class Workload:
    def __init__(self, name: str, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, bce: bool):
        self.name, self.model, self.inputs, self.targets, self.bce = name, model, inputs, targets, bce
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.num_tasks = targets.shape[1]

    def losses(self) -> list[torch.Tensor]:
        outs = self.model(self.inputs)
        if self.bce:
            f = nn.functional.binary_cross_entropy_with_logits
        else:
            f = nn.functional.mse_loss
        return [f(o, self.targets[:, i]) for i, o in enumerate(outs)]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


def mlp_workload(device: torch.device, batch: int = 128, num_tasks: int = 8, widths=None) -> Workload:
    widths = widths or [512, 1024, 1024, 1024, 1024, 512]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = MLP(widths, num_tasks).to(device)
    x = torch.randn(batch, widths[0], generator=gen).to(device)
    y = torch.randn(batch, num_tasks, generator=gen).to(device)
    return Workload(f"mlp T={num_tasks}", model, x, y, bce=False)


def sparse_workload(
    device: torch.device,
    num_tasks: int,
    bottom: bool = False,
    batch: int = 512,
    fields: int = 8,
    rows: int = 1_000_000,
    dim: int = 64,
) -> Workload:
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = SparseRanker(fields, rows, dim, num_tasks, bottom).to(device)
    idx = torch.randint(0, rows, (batch, fields), generator=gen).to(device)
    y = torch.randint(0, 2, (batch, num_tasks), generator=gen).float().to(device)
    name = "sparse+bottom" if bottom else "sparse"
    return Workload(f"{name} T={num_tasks}", model, idx, y, bce=True)


# -- the members: each writes the step's gradients to .grad --------------------------------------------------
def _accumulate(p: torch.Tensor, g: torch.Tensor) -> None:
    p.grad = g if p.grad is None else p.grad + g


def plain_step(w: Workload) -> Callable[[], None]:
    def step() -> None:
        w.zero_grad()
        torch.stack(w.losses()).sum().backward()

    return step


def weights_for(w: Workload) -> torch.Tensor:
    # A fixed convex combination: the method's solve costs the same T×T work in both paths.
    return torch.linspace(1.0, 2.0, w.num_tasks, dtype=torch.float64) / (1.5 * w.num_tasks)


def full_step(w: Workload) -> Callable[[], None]:
    collector = GradientCollector()
    weights = weights_for(w)

    def step() -> None:
        w.zero_grad()
        grads = collector.collect(w.losses(), w.params)
        gram_matrix(grads.jacobian)
        layout = grads.layout
        fused = weights.to(grads.jacobian) @ grads.jacobian
        for slot, k in enumerate(layout.shared):
            _accumulate(layout.params[k], layout.segment(fused, slot).view_as(layout.params[k]))
        for k, entries in enumerate(grads.other):
            for _, g in entries:
                _accumulate(layout.params[k], g)

    return step


def activation_step(w: Workload, form: str, fused: str = "backward") -> Callable[[], None]:
    source = ActivationSource(w.model, form=form, fused=fused)
    weights = weights_for(w)

    def step() -> None:
        w.zero_grad()
        res = source.gradients(
            w.losses(), w.params, shared_ids=None, retain_graph=False, gram_dtype=torch.float64
        )
        for p, g in res.fused(weights):
            _accumulate(p, g)
        for p, entries in res.task_specific:
            for _, g in entries:
                _accumulate(p, g)

    step.source = source  # type: ignore[attr-defined]
    return step


def release(step: Callable[[], None]) -> None:
    source = getattr(step, "source", None)
    if source is not None:
        source.remove()


# -- timing and memory ---------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(step: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def quantile(values: list[float], q: float) -> float:
    vals = sorted(values)
    pos = q * (len(vals) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def interleaved(
    members: dict[str, Callable[[], None]], reps: int, warmup: int, device, rng
) -> dict[str, list[float]]:
    for step in members.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in members}
    names = list(members)
    for _ in range(reps):
        rng.shuffle(names)
        for name in names:
            times[name].append(time_once(members[name], device))
    return times


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _status_kb(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def peak_mb(w: Workload, factory: Callable[[], Callable[[], None]], device: torch.device, libc: Any) -> float:
    """Peak memory of building ``factory()`` and taking two steps, above the memory just before (no
    ``.grad`` allocated: the step's own gradients count)."""
    w.zero_grad()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step = factory()
        step()
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        if libc is None or not Path("/proc/self/clear_refs").exists():
            return float("nan")
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        base = _status_kb("VmRSS")
        step = factory()
        step()
        step()
        peak = (_status_kb("VmHWM") - base) * 1024
    release(step)
    del step
    w.zero_grad()
    gc.collect()
    return peak / 2**20


# -- accuracy ------------------------------------------------------------------------------------------------
def accuracy(w: Workload) -> dict[str, float]:
    source = ActivationSource(w.model)
    weights = weights_for(w)
    losses = w.losses()
    res = source.gradients(losses, w.params, shared_ids=None, retain_graph=True, gram_dtype=torch.float64)
    grads = GradientCollector().collect(losses, w.params, retain_graph=True)
    g_full = gram_matrix(grads.jacobian)
    scale = torch.sqrt(torch.outer(g_full.diagonal(), g_full.diagonal()))
    fused_full = weights.to(grads.jacobian) @ grads.jacobian
    fused_act = torch.cat([g.reshape(-1) for _, g in res.fused(weights)])
    source.remove()
    return {
        "gram_max_rel_err": float(((res.gram - g_full).abs() / scale).max()),
        "fused_rel_err": float((fused_act - fused_full).norm() / fused_full.norm()),
    }


# -- driver --------------------------------------------------------------------------------------------------
def members_of(w: Workload, forms: list[str], with_full: bool, fused_modes=("backward",)):
    """(step factories, errors of the members that cannot run on this workload)."""
    factories: dict[str, Callable[[], Callable[[], None]]] = {"plain": lambda: plain_step(w)}
    errors: dict[str, str] = {}
    if with_full:
        factories["full"] = lambda: full_step(w)
    else:
        try:
            full_step(w)()
        except Exception as err:  # noqa: BLE001 - reported
            errors["full"] = f"{type(err).__name__}: {err}"
        w.zero_grad()
    for form in forms:
        for fused in fused_modes:
            name = f"activation[{form}]" if fused == "backward" else f"activation[{form},fused={fused}]"
            factories[name] = lambda f=form, m=fused: activation_step(w, f, m)
    return factories, errors


def time_workload(w: Workload, forms, with_full: bool, fused_modes, reps: int, warmup: int, device, rng):
    factories, errors = members_of(w, forms, with_full, fused_modes)
    members = {name: make() for name, make in factories.items()}
    times = interleaved(members, reps, warmup, device, rng)
    for step in members.values():
        release(step)
    del members
    result: dict[str, Any] = {"workload": w.name, "errors": errors, "members": {}}
    plain = times["plain"]
    for name, ts in times.items():
        ratios = [a / b for a, b in zip(ts, plain, strict=True)]
        row = {
            "ms": 1e3 * statistics.median(ts),
            "vs_plain": statistics.median(ratios),
            "vs_plain_p25": quantile(ratios, 0.25),
            "vs_plain_p75": quantile(ratios, 0.75),
        }
        if "full" in times and name.startswith("activation"):
            vs = [a / b for a, b in zip(ts, times["full"], strict=True)]
            row.update(
                vs_full=statistics.median(vs), vs_full_p25=quantile(vs, 0.25), vs_full_p75=quantile(vs, 0.75)
            )
        result["members"][name] = row
    if with_full:
        result["accuracy"] = accuracy(w)
    return result


def measure_memory(
    w: Workload, result: dict[str, Any], forms, with_full: bool, fused_modes, device, libc
) -> None:
    factories, _ = members_of(w, forms, with_full, fused_modes)
    for name, make in factories.items():
        result["members"][name]["peak_mb"] = peak_mb(w, make, device, libc)
    plain_mb = result["members"]["plain"]["peak_mb"]
    full_extra = result["members"].get("full", {}).get("peak_mb", float("nan")) - plain_mb
    for name, row in result["members"].items():
        row["extra_mb_over_plain"] = row["peak_mb"] - plain_mb
        if name.startswith("activation") and "full" in result["members"]:
            row["extra_vs_full_extra"] = row["extra_mb_over_plain"] / full_extra


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| workload | member | ms | vs plain (p25-p75) | vs full (p25-p75) | peak MB | extra MB over plain "
        "| extra / full's extra |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for name, row in res["members"].items():
            vs_full = (
                f"{row['vs_full']:.2f} ({row['vs_full_p25']:.2f}-{row['vs_full_p75']:.2f})"
                if "vs_full" in row
                else ""
            )
            lines.append(
                f"| {res['workload']} | {name} | {row['ms']:.1f} | {row['vs_plain']:.2f} "
                f"({row['vs_plain_p25']:.2f}-{row['vs_plain_p75']:.2f}) | {vs_full} | "
                f"{row.get('peak_mb', float('nan')):.0f} | "
                f"{row.get('extra_mb_over_plain', float('nan')):.0f} | "
                f"{row.get('extra_vs_full_extra', float('nan')):.3f} |"
            )
        for name, err in res["errors"].items():
            lines.append(f"| {res['workload']} | {name} | error: {err[:90]} | | | | | |")
    for res in results:
        if "accuracy" in res:
            acc = res["accuracy"]
            lines.append(
                f"\n{res['workload']}: max |G_act − G_full|/√(G_ii G_jj) = {acc['gram_max_rel_err']:.2e}, "
                f"fused relative error = {acc['fused_rel_err']:.2e}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", required=True, help="JSON file for the results (a .md table is written beside)"
    )
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--workloads", default="mlp,sparse,sparse+bottom", help="comma-separated: mlp, sparse, sparse+bottom"
    )
    parser.add_argument("--forms", default="auto,materialize", help="activation forms for the MLP workload")
    parser.add_argument(
        "--fused", default="backward,activations", help="ActivationSource(fused=...) modes to time"
    )
    parser.add_argument("--sparse-rows", type=int, default=1_000_000, help="rows of each sparse table")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rng = random.Random(0)
    wanted = args.workloads.split(",")
    fused_modes = tuple(args.fused.split(","))
    # (name, builder, activation forms, whether full mode can run)
    plan = []
    if "mlp" in wanted:
        plan.append((lambda: mlp_workload(device), args.forms.split(","), True))
    for name, bottom in (("sparse", False), ("sparse+bottom", True)):
        if name in wanted:
            for t in (2, 4):
                make = lambda t=t, b=bottom: sparse_workload(device, t, b, rows=args.sparse_rows)  # noqa: E731
                plan.append((make, ["auto"], False))
    results = []
    # Every timing first, with the allocator as training sees it; the memory passes change it (below).
    for build, forms, with_full in plan:
        w = build()
        results.append(time_workload(w, forms, with_full, fused_modes, args.reps, args.warmup, device, rng))
        print(table(results[-1:]), flush=True)
        del w
        gc.collect()
    if not args.no_memory:
        libc = _libc() if device.type == "cpu" else None
        if libc is not None:
            libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: large blocks are mmap-ed and returned on free
        for (build, forms, with_full), result in zip(plan, results, strict=True):
            w = build()
            measure_memory(w, result, forms, with_full, fused_modes, device, libc)
            del w
            gc.collect()
        print(table(results), flush=True)
    meta = {
        "command": " ".join(
            ["python -m benchmarks.activation_speed", *(argv if argv is not None else sys.argv[1:])]
        ),
        "torch": torch.__version__,
        "threads": args.threads,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "platform": platform.platform(),
        "processor": platform.processor(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    out.with_suffix(".md").write_text(table(results) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
