"""Aggregation (mean ± std over seeds, Δm%), Markdown tables, CSV/JSON files and PNG plots.

Conventions of every table:

- ``mean ± std``: over the seeds that finished (sample standard deviation, ddof = 1; 0 with one seed).
- Δm% (Maninis et al. 2019): Δm = (1/K) Σ_k (−1)^{l_k} (M_k − B_k)/B_k × 100 over the K metrics of the
  problem, l_k = 1 when higher is better: the mean relative *loss* of performance against the reference B.
  **Negative is better.** Computed per seed against the same seed's reference, then averaged.
  "vs single-task": B = the single-task model of the metric's task; "vs equal weights": B = ``sum``.
- A ``⁺`` after a value: better than equal weights by more than the seed spread, i.e. the intervals
  mean ± std of the method and of ``sum`` do not overlap; ``⁻``: worse by more than the spread.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .problems.metrics import delta_m
from .quality import TOY_TOLERANCE
from .runner import BASELINE, RunResult

BETTER, WORSE = "⁺", "⁻"


# -- numbers ------------------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value; NaN for none)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt_value(value: float, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    return f"{value:.{decimals}f}"


def fmt_mean_std(mean: float, std: float) -> str:
    """``0.712 ± 0.012``: decimals follow the spread (two significant digits of the std)."""
    if not math.isfinite(mean):
        return "—"
    if not math.isfinite(std) or std == 0:
        return fmt_value(mean)
    decimals = min(6, max(0, 1 - math.floor(math.log10(std))))
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def compare(mean: float, std: float, base_mean: float, base_std: float, higher_is_better: bool) -> int:
    """+1 / −1 when ``mean ± std`` lies entirely above / below the baseline's interval, in the good
    direction."""
    if not all(math.isfinite(v) for v in (mean, std, base_mean, base_std)):
        return 0
    gain = (mean - base_mean) if higher_is_better else (base_mean - mean)
    if gain > std + base_std:
        return 1
    if -gain > std + base_std:
        return -1
    return 0


def metric_tasks(metric_names: Sequence[str], task_names: Sequence[str]) -> dict[str, int]:
    """Which task each metric measures: the task whose name prefixes the metric (``click_auc`` → click),
    else by position when there is one metric per task (``cvr_auc`` → conversion)."""
    out: dict[str, int] = {}
    for k, metric in enumerate(metric_names):
        owners = [t for t, name in enumerate(task_names) if metric.startswith(name)]
        if len(owners) == 1:
            out[metric] = owners[0]
        elif len(metric_names) == len(task_names):
            out[metric] = k
    return out


# -- aggregation --------------------------------------------------------------------------------------------
@dataclass
class MethodSummary:
    method: str
    runs: int
    ok: int
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)
    versus_baseline: dict[str, int] = field(default_factory=dict)
    delta_single: tuple[float, float] = (float("nan"), float("nan"))
    delta_equal: tuple[float, float] = (float("nan"), float("nan"))
    ms_per_step: float = float("nan")
    weights: list[float] = field(default_factory=list)
    note: str = ""
    messages: list[str] = field(default_factory=list)
    warnings: str = ""


def warning_note(runs: Sequence[RunResult]) -> str:
    """``"warnings: 13 SolverFallbackWarning (2/3 runs)"`` from the counts the runner recorded."""
    totals: dict[str, int] = {}
    with_warnings = 0
    for r in runs:
        counts = r.extra.get("warnings") or {}
        with_warnings += bool(counts)
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + v
    if not totals:
        return ""
    return (
        "warnings: "
        + ", ".join(f"{v} {k}" for k, v in totals.items())
        + f" ({with_warnings}/{len(runs)} runs)"
    )


@dataclass
class ProblemSummary:
    label: str
    key: str
    metric_names: list[str]
    higher_is_better: dict[str, bool]
    task_names: list[str]
    methods: list[MethodSummary]
    singles: list[MethodSummary]
    info: dict[str, Any]

    def wins(self) -> list[tuple[str, str]]:
        """(method, metric) pairs where a method beats equal weights by more than the seed spread."""
        return [(m.method, k) for m in self.methods for k, v in m.versus_baseline.items() if v > 0]

    def overall_wins(self) -> list[tuple[str, tuple[float, float]]]:
        """Methods whose Δm% against equal weights (paired by seed) is below 0 by more than its spread."""
        return [
            (m.method, m.delta_equal)
            for m in self.methods
            if math.isfinite(m.delta_equal[0]) and m.delta_equal[0] + m.delta_equal[1] < 0
        ]


def _group(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.problem, []).append(r)
    return groups


def summarize(results: Sequence[RunResult], baseline: str = BASELINE) -> list[ProblemSummary]:
    """One summary per problem variant (toy excluded: see ``summarize_toy``)."""
    out = []
    for label, runs in _group(results).items():
        first = runs[0]
        if first.extra.get("problem_key") == "toy":
            continue
        hib: dict[str, bool] = first.extra.get("higher_is_better", {})
        metric_names = list(hib)
        task_names = list(first.extra.get("task_names", []))
        owner = metric_tasks(metric_names, task_names)
        singles_by_seed: dict[int, dict[int, RunResult]] = {}
        for r in runs:
            if r.method.startswith("single:") and r.status == "ok":
                singles_by_seed.setdefault(r.seed, {})[task_names.index(r.method.split(":", 1)[1])] = r
        single_ref: dict[int, dict[str, float]] = {}
        for seed, by_task in singles_by_seed.items():
            if len(owner) == len(metric_names) and all(owner[m] in by_task for m in metric_names):
                single_ref[seed] = {m: by_task[owner[m]].metrics[m] for m in metric_names}
        base_by_seed = {r.seed: r.metrics for r in runs if r.method == baseline and r.status == "ok"}

        order = list(dict.fromkeys(r.method for r in runs))
        summaries: dict[str, MethodSummary] = {}
        for name in order:
            group = [r for r in runs if r.method == name]
            ok = [r for r in group if r.status == "ok"]
            s = MethodSummary(name, len(group), len(ok), note=group[0].note)
            s.messages = sorted({r.message for r in group if r.status != "ok"})
            s.warnings = warning_note(group)
            for m in metric_names:
                s.metrics[m] = mean_std([r.metrics[m] for r in ok if m in r.metrics])
            if not name.startswith("single:"):
                s.delta_single = mean_std(
                    [delta_m(r.metrics, single_ref[r.seed], hib) for r in ok if r.seed in single_ref]
                )
                s.delta_equal = mean_std(
                    [delta_m(r.metrics, base_by_seed[r.seed], hib) for r in ok if r.seed in base_by_seed]
                )
            s.ms_per_step = mean_std([r.ms_per_step for r in ok])[0]
            weights = [r.mean_weights for r in ok if r.mean_weights]
            if weights:
                s.weights = [statistics.fmean(col) for col in zip(*weights, strict=True)]
            summaries[name] = s
        base = summaries.get(baseline)
        for s in summaries.values():
            if base is None or s.method == baseline or s.method.startswith("single:"):
                continue
            for m in metric_names:
                s.versus_baseline[m] = compare(*s.metrics[m], *base.metrics[m], hib[m])
        info = {k: first.extra.get(k) for k in ("steps_planned", "lr", "batch_size", "variant")}
        info["seeds"] = sorted({r.seed for r in runs})
        out.append(
            ProblemSummary(
                label=label,
                key=first.extra.get("problem_key", label),
                metric_names=metric_names,
                higher_is_better=hib,
                task_names=task_names,
                methods=[s for s in summaries.values() if not s.method.startswith("single:")],
                singles=[s for s in summaries.values() if s.method.startswith("single:")],
                info=info,
            )
        )
    return out


@dataclass
class ToySummary:
    method: str
    runs: int
    reached: int
    distance: tuple[float, float]
    worst: float
    steps_to_pareto: float
    per_start: dict[str, float]
    ends: dict[str, tuple[float, float]]
    messages: list[str]
    warnings: str = ""


def summarize_toy(results: Sequence[RunResult]) -> list[ToySummary]:
    runs = [r for r in results if r.extra.get("problem_key") == "toy"]
    out = []
    for name in dict.fromkeys(r.method for r in runs):
        group = [r for r in runs if r.method == name]
        ok = [r for r in group if r.status == "ok"]
        dists = [r.metrics["pareto_distance"] for r in ok]
        hits = [r.extra.get("steps_to_pareto") for r in ok if r.extra.get("steps_to_pareto") is not None]
        per_start: dict[str, list[float]] = {}
        ends: dict[str, list[tuple[float, float]]] = {}
        for r in ok:
            start = str(r.extra["variant"].get("start"))
            per_start.setdefault(start, []).append(r.metrics["pareto_distance"])
            ends.setdefault(start, []).append((r.metrics["f1"], r.metrics["f2"]))
        out.append(
            ToySummary(
                method=name,
                runs=len(group),
                reached=sum(d <= TOY_TOLERANCE for d in dists),
                distance=mean_std(dists),
                worst=max(dists) if dists else float("nan"),
                steps_to_pareto=statistics.median(hits) if hits else float("nan"),
                per_start={k: statistics.fmean(v) for k, v in per_start.items()},
                ends={
                    k: (statistics.fmean(a for a, _ in v), statistics.fmean(b for _, b in v))
                    for k, v in ends.items()
                },
                messages=sorted({r.message for r in group if r.status != "ok"}),
                warnings=warning_note(group),
            )
        )
    return out


# -- Markdown -----------------------------------------------------------------------------------------------
def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def clean(cell: Any) -> str:
        return str(cell).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(clean(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _short(message: str, limit: int = 90) -> str:
    return message if len(message) <= limit else message[: limit - 1] + "…"


def problem_table(summary: ProblemSummary) -> str:
    """The Markdown table of one problem variant: one row per method, then the single-task references."""
    arrows = {m: "↑" if summary.higher_is_better[m] else "↓" for m in summary.metric_names}
    header = [
        "method",
        *[f"{m} {arrows[m]}" for m in summary.metric_names],
        "Δm% vs single-task ↓",
        "Δm% vs equal weights ↓",
        "ms/step",
        "mean weights (last 20%)",
        "note",
    ]
    best: dict[str, float] = {}
    for m in summary.metric_names:
        means = [s.metrics[m][0] for s in summary.methods if math.isfinite(s.metrics[m][0])]
        if means:
            best[m] = max(means) if summary.higher_is_better[m] else min(means)
    rows = []
    for s in summary.methods:
        cells = [s.method if s.ok == s.runs else f"{s.method} ({s.ok}/{s.runs} ok)"]
        for m in summary.metric_names:
            text = fmt_mean_std(*s.metrics[m])
            if text != "—" and s.metrics[m][0] == best.get(m):
                text = f"**{text}**"
            text += {1: BETTER, -1: WORSE}.get(s.versus_baseline.get(m, 0), "")
            cells.append(text)
        equal = "(baseline)" if s.method == BASELINE else fmt_mean_std(*s.delta_equal)
        cells += [
            fmt_mean_std(*s.delta_single),
            equal,
            fmt_value(s.ms_per_step, 3),
            ", ".join(f"{w:.3g}" for w in s.weights) or "—",
        ]
        note = "; ".join(part for part in [s.note, *(_short(msg) for msg in s.messages), s.warnings] if part)
        cells.append(note)
        rows.append(cells)
    for s in summary.singles:
        cells = [f"*{s.method}*"] + [fmt_mean_std(*s.metrics[m]) for m in summary.metric_names]
        cells += [
            "(reference)",
            "",
            fmt_value(s.ms_per_step, 3),
            "",
            s.note + ("; " + "; ".join(s.messages) if s.messages else ""),
        ]
        rows.append(cells)
    return md_table(header, rows)


def toy_tables(summaries: Sequence[ToySummary]) -> str:
    header = [
        "method",
        f"reached (distance ≤ {TOY_TOLERANCE})",
        "final distance",
        "worst",
        "median steps to reach",
        "note",
    ]
    rows = [
        [
            s.method,
            f"{s.reached}/{s.runs}",
            fmt_mean_std(*s.distance),
            fmt_value(s.worst, 3),
            f"{s.steps_to_pareto:.0f}" if math.isfinite(s.steps_to_pareto) else "—",
            "; ".join([*(_short(m) for m in s.messages), *([s.warnings] if s.warnings else [])]),
        ]
        for s in summaries
    ]
    starts = sorted({k for s in summaries for k in s.per_start}, key=int)
    header2 = ["method", *[f"start {k}: distance (f1, f2)" for k in starts]]
    rows2 = []
    for s in summaries:
        cells = [s.method]
        for k in starts:
            if k in s.per_start:
                f1, f2 = s.ends[k]
                cells.append(f"{fmt_value(s.per_start[k], 3)} ({f1:.2f}, {f2:.2f})")
            else:
                cells.append("—")
        rows2.append(cells)
    return (
        md_table(header, rows)
        + "\n\nEnd points per start (distance to the Pareto set; unscaled objectives):\n\n"
        + md_table(header2, rows2)
    )


def legend() -> str:
    return (
        "mean ± std over seeds. **bold**: best mean. ⁺/⁻: better/worse than equal weights (`sum`) by "
        "more than the seed spread (mean ± std intervals do not overlap). Δm% (Maninis et al. 2019): mean "
        "relative loss of performance against the reference, negative = better. ms/step: wall time of a "
        "training step (busy machines and parallel workers inflate it; see the speed suite for controlled "
        "timings)."
    )


# -- files --------------------------------------------------------------------------------------------------
def environment(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import torch

    import gradsurgery

    return {
        "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gradsurgery": getattr(gradsurgery, "__version__", "?"),
        "methods": list(gradsurgery.METHODS),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(_jsonable(payload), indent=1, ensure_ascii=False) + "\n")


def write_runs(out: Path, results: Sequence[RunResult], meta: dict[str, Any], stem: str = "runs") -> None:
    """``runs.json`` (everything, trajectories included) and ``runs.csv`` (one flat row per run)."""
    write_json(out / f"{stem}.json", {"meta": meta, "runs": [r.as_dict() for r in results]})
    metric_keys = sorted({k for r in results for k in r.metrics})
    fields = [
        "problem",
        "problem_key",
        "method",
        "mode",
        "seed",
        "status",
        "message",
        "steps",
        "seconds",
        "ms_per_step",
        "lr",
        "batch_size",
        "variant",
        "options",
        "note",
        "mean_weights",
        "final_losses",
        "steps_to_pareto",
        *[f"metric.{k}" for k in metric_keys],
    ]
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in results:
            row = {
                "problem": r.problem,
                "problem_key": r.extra.get("problem_key", ""),
                "method": r.method,
                "mode": r.extra.get("mode", "full"),
                "seed": r.seed,
                "status": r.status,
                "message": r.message,
                "steps": r.steps,
                "seconds": f"{r.seconds:.6g}",
                "ms_per_step": f"{r.ms_per_step:.6g}",
                "lr": r.extra.get("lr", ""),
                "batch_size": r.extra.get("batch_size", ""),
                "variant": json.dumps(r.extra.get("variant", {}), sort_keys=True),
                "options": json.dumps(_jsonable(r.options), sort_keys=True),
                "note": r.note,
                "mean_weights": json.dumps(r.mean_weights),
                "final_losses": json.dumps(_jsonable(r.final_losses)),
                "steps_to_pareto": r.extra.get("steps_to_pareto") or "",
            }
            row.update({f"metric.{k}": repr(float(v)) for k, v in r.metrics.items()})
            writer.writerow(row)


def summary_payload(summaries: Sequence[ProblemSummary], toy: Sequence[ToySummary]) -> dict[str, Any]:
    return {
        "problems": [
            {
                "problem": s.label,
                "key": s.key,
                "info": s.info,
                "higher_is_better": s.higher_is_better,
                "methods": [
                    {
                        "method": m.method,
                        "runs": m.runs,
                        "ok": m.ok,
                        "metrics": {k: {"mean": v[0], "std": v[1]} for k, v in m.metrics.items()},
                        "versus_equal_weights": m.versus_baseline,
                        "delta_m_vs_single_task": {"mean": m.delta_single[0], "std": m.delta_single[1]},
                        "delta_m_vs_equal_weights": {"mean": m.delta_equal[0], "std": m.delta_equal[1]},
                        "ms_per_step": m.ms_per_step,
                        "mean_weights": m.weights,
                        "note": m.note,
                        "errors": m.messages,
                        "warnings": m.warnings,
                    }
                    for m in [*s.methods, *s.singles]
                ],
            }
            for s in summaries
        ],
        "toy": [
            {
                "method": t.method,
                "runs": t.runs,
                "reached": t.reached,
                "distance": {"mean": t.distance[0], "std": t.distance[1]},
                "worst": t.worst,
                "median_steps_to_pareto": t.steps_to_pareto,
                "per_start_distance": t.per_start,
                "errors": t.messages,
            }
            for t in toy
        ],
    }


# -- plots --------------------------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_toy(path: Path, results: Sequence[RunResult]) -> bool:
    """One panel per method: contours of the summed training loss, the Pareto set, every trajectory."""
    plt = _pyplot()
    runs = [r for r in results if r.extra.get("problem_key") == "toy" and r.extra.get("trajectory")]
    if plt is None or not runs:
        return False
    import numpy as np

    from .problems import toy

    methods = list(dict.fromkeys(r.method for r in runs))
    x1, x2, f1, f2 = toy.contour_grid(160)
    scales = runs[0].extra.get("variant", {}).get("scales", (0.1, 1.0))
    total = scales[0] * f1 + scales[1] * f2
    pareto = toy.pareto_set().numpy()
    cols = min(4, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.2 * rows), squeeze=False)
    colors = plt.cm.tab10(np.linspace(0, 1, 10))
    for ax, name in zip(axes.flat, methods, strict=False):  # spare panels stay empty
        ax.contour(x1, x2, total, levels=25, linewidths=0.5, cmap="Greys")
        ax.plot(pareto[:, 0], pareto[:, 1], color="black", linewidth=2.5, alpha=0.6)
        for r in runs:
            if r.method != name or r.seed != min(q.seed for q in runs):
                continue
            traj = np.asarray(r.extra["trajectory"])
            c = colors[int(r.extra["variant"].get("start", 0)) % 10]
            ax.plot(traj[:, 0], traj[:, 1], color=c, linewidth=1.2)
            ax.plot(traj[0, 0], traj[0, 1], "o", color=c, markersize=4)
            ax.plot(
                traj[-1, 0], traj[-1, 1], "*", color=c, markersize=8, markeredgecolor="k", markeredgewidth=0.4
            )
        ax.set_title(name, fontsize=9)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    fig.suptitle(
        "Toy problem: trajectories (o start, * end) on contours of 0.1·f1 + f2; black: Pareto set", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def metric_range(metric: str) -> tuple[float, float]:
    """The values a metric can take, from its name: AUCs and accuracies lie in [0, 1], errors and losses
    are ≥ 0, anything else is unbounded. The plots never show an axis beyond it."""
    name = metric.lower()
    if "auc" in name or name.endswith("acc") or "accuracy" in name:
        return 0.0, 1.0
    if any(key in name for key in ("mse", "mae", "loss", "error", "distance")):
        return 0.0, math.inf
    return -math.inf, math.inf


def single_task_reference(summary: ProblemSummary, metric: str) -> float | None:
    """The mean of ``metric`` for the model trained on the metric's own task alone, if it was run."""
    owner = metric_tasks(summary.metric_names, summary.task_names).get(metric)
    if owner is None:
        return None
    for s in summary.singles:
        if s.method == f"single:{summary.task_names[owner]}" and math.isfinite(s.metrics[metric][0]):
            return s.metrics[metric][0]
    return None


def axis_limits(values: Sequence[float], domain: tuple[float, float]) -> tuple[float, float] | None:
    """Limits around the finite ``values`` with a margin, clipped to the metric's ``domain``."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    lo, hi = min(finite), max(finite)
    pad = 0.08 * (hi - lo) or 0.05 * max(abs(hi), 1e-12)
    return max(domain[0], lo - pad), min(domain[1], hi + pad)


def plot_problem(path: Path, summaries: Sequence[ProblemSummary]) -> bool:
    """One panel per (variant, metric): mean ± std per method as a point with an error bar, equal weights in
    grey; the single-task model of the metric's task as a dashed line, chance (0.5) as a dotted line on AUC
    panels. The y axis covers the points, their error bars and those lines, clipped to the metric's range
    (no negative MSE or AUC)."""
    plt = _pyplot()
    if plt is None or not summaries:
        return False
    panels = [(s, m) for s in summaries for m in s.metric_names]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax, (s, metric) in zip(axes.flat, panels, strict=False):
        names = [m.method for m in s.methods]
        means = [m.metrics[metric][0] for m in s.methods]
        stds = [m.metrics[metric][1] if math.isfinite(m.metrics[metric][1]) else 0.0 for m in s.methods]
        for x, (name, mean, std) in enumerate(zip(names, means, stds, strict=True)):
            if math.isfinite(mean):
                color = "#888888" if name == BASELINE else "#3b75af"
                ax.errorbar([x], [mean], yerr=[std], fmt="o", color=color, markersize=4, capsize=2)
        shown = [v for mean, std in zip(means, stds, strict=True) for v in (mean - std, mean + std)]
        reference = single_task_reference(s, metric)
        if reference is not None:
            ax.axhline(reference, color="#c44e52", linestyle="--", linewidth=1, label="single-task model")
            shown.append(reference)
        if "auc" in metric.lower():
            ax.axhline(0.5, color="black", linestyle=":", linewidth=1, label="chance (AUC 0.5)")
            shown.append(0.5)
        limits = axis_limits(shown, metric_range(metric))
        if limits is not None and limits[0] < limits[1]:
            ax.set_ylim(*limits)
        ax.set_xlim(-0.7, len(names) - 0.3)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        arrow = "↑" if s.higher_is_better[metric] else "↓"
        ax.set_title(f"{s.label}: {metric} {arrow}", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", linewidth=0.3, alpha=0.5)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    legend: dict[str, Any] = {}  # the reference lines, once for the figure, under the panels
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    bottom = 0.0
    if legend:
        bottom = min(0.25, 0.3 / fig.get_figheight())
        fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=len(legend), fontsize=7)
    fig.tight_layout(rect=(0.0, bottom, 1.0, 1.0))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
