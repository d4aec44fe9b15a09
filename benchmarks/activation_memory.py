"""The activation source under a memory budget (``activation_memory``): peak memory and step time of the
speed suite's transformer encoders at T = 4, 512 tokens per batch, where the unbounded source keeps more
numbers than the Jacobian.

Variants (all ``mgda``): ``plain`` (the summed loss), ``jacobian`` (``gradient_source="jacobian"``),
``activations`` (no budget) and ``activations@B`` (a budget of B MiB for the layer-output gradients δ_i).
Step time: interleaved repetitions, each variant built afresh, one untimed step, then timed, divided by the
plain step of the same repetition (median and 25th-75th percentile). Peak memory: the speed suite's
measurement (two steps of a fresh variant, the peak resident size above the resident size just before; the
median of three). Writes ``report.md`` and ``rows.json``.

    python -m benchmarks.activation_memory --out results/activation_memory
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

try:
    from . import speed
    from .speed_models import transformer_workload
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import speed  # type: ignore[no-redef]
    from speed_models import transformer_workload  # type: ignore[no-redef]


def build(name: str, tiny: bool) -> Any:
    device = torch.device("cpu")
    torch_layers = name == "transformer-nn"
    if tiny:
        return transformer_workload(
            device, torch_layers=torch_layers, batch=2, seq=8, d=16, heads=2, ff=32, layers=1, vocab=50
        )
    return transformer_workload(device, torch_layers=torch_layers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/activation_memory")
    parser.add_argument("--workloads", nargs="+", default=["transformer", "transformer-nn"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[64, 32, 16, 8], help="MiB")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--memory-repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    variants = ["plain", "jacobian", "activations", *(f"activations@{b:g}" for b in args.budgets)]
    libc = speed._libc() if speed.memory_supported(torch.device("cpu")) else None
    rows = []
    for name in args.workloads:
        w = build(name, args.tiny)
        times = speed.time_exact(w, variants, args.reps, random.Random(0))
        speed.exact_member(w, "plain")()
        w.inner.zero_grad(set_to_none=True)
        if libc is not None:
            libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: large blocks are mmap-ed and returned on free
        for variant in variants:
            ratios = [v / p for v, p in zip(times[variant], times["plain"], strict=True)]
            peaks = []
            if libc is not None:
                for _ in range(args.memory_repeats):
                    peaks.append(
                        speed.peak_memory_mb(w, lambda w=w, v=variant: speed.exact_member(w, v), libc)
                    )
                    w.inner.zero_grad(set_to_none=True)
            rows.append(
                {
                    "workload": name,
                    "variant": variant,
                    "ms": 1e3 * statistics.median(times[variant]),
                    "ratio": statistics.median(ratios),
                    "ratio_p25": speed.quantile(ratios, 0.25),
                    "ratio_p75": speed.quantile(ratios, 0.75),
                    "peak_mb": statistics.median(peaks) if peaks else float("nan"),
                    "peak_range": [min(peaks), max(peaks)] if peaks else None,
                }
            )
        print(f"{name} done", file=sys.stderr)
    speed.write_rows_and_report(Path(args.out), rows, report(rows, args))
    return 0


def report(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"# The activation source under a memory budget (T = 4, `mgda`, one thread, {args.reps} timing "
        f"repetitions, memory the median of {args.memory_repeats}; torch {torch.__version__})",
        "",
        "| workload | variant | step / plain | peak MiB | (peak − plain) / (Jacobian − plain) |",
        "|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["workload"] for r in rows):
        mine = {r["variant"]: r for r in rows if r["workload"] == name}
        plain, jac = mine["plain"]["peak_mb"], mine["jacobian"]["peak_mb"]
        for variant, r in mine.items():
            extra = (r["peak_mb"] - plain) / (jac - plain) if jac > plain else float("nan")
            lines.append(
                f"| {name} | {variant} | {r['ratio']:.2f} ({r['ratio_p25']:.2f}-{r['ratio_p75']:.2f}) | "
                f"{r['peak_mb']:.1f} | {extra:.2f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
