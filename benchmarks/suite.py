"""Command line of the benchmark suite: ``python -m benchmarks``, run from the repository root.

    python -m benchmarks --suite quick --out results            # < 5 min on 2 CPU cores
    python -m benchmarks --suite full --seeds 5 --out results    # about 30 min (measured: 31 min)
    python -m benchmarks --suite speed --out results             # step time, memory, solver time

``quick`` and ``full`` run the quality problems (toy, synthetic, recsys, multidigit, ranking) and then the
L2 and noisy-label benchmarks of ``benchmarks.l2_regularization`` / ``benchmarks.noisy_labels`` (skipped
with a note when those modules are not installed). Results go to ``--out``: ``report.md`` (every table),
``runs.csv`` / ``runs.json`` (every run), ``summary.json`` (aggregates) and PNG plots.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .console import count_text, counted_warnings, progress_bar, say

QUALITY_PROBLEMS = ("toy", "synthetic", "recsys", "multidigit", "ranking")
#: item 5 of the suite: benchmarks of the "modes" feature, each a module with ``main(argv)``
MODE_BENCHMARKS = {"l2": "benchmarks.l2_regularization", "noisy": "benchmarks.noisy_labels"}
ALL_PROBLEMS = (*QUALITY_PROBLEMS, *MODE_BENCHMARKS)
# The quick suite's size of the two mode benchmarks: their own --quick (a smoke test: 4 and 2 epochs, too
# short for the networks to fit, let alone overfit) with more epochs and width, about 20 s each on one core.
QUICK_MODE_SIZES = {"l2": ["--epochs", "30", "--width", "256"], "noisy": ["--epochs", "15", "--width", "128"]}


def _seeds(text: str) -> list[int]:
    """``3`` → seeds 0, 1, 2; ``0,4,7`` → exactly those."""
    text = text.strip()
    try:
        if "," not in text:
            count = int(text)
            if count < 1:
                raise argparse.ArgumentTypeError(f"the number of seeds must be at least 1, got {count}")
            return list(range(count))
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of seeds (e.g. 3) or a comma-separated list of seeds (e.g. 0,1,2), "
            f"got {text!r}"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _names(text: str, known: Sequence[str], what: str) -> list[str]:
    """The comma-separated names in ``text``, each one of ``known``, in order and without repeats."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {what}(s) {unknown or text!r}; choose from {list(known)}")
    return list(dict.fromkeys(names))


def _problems(text: str) -> list[str]:
    return _names(text, list(ALL_PROBLEMS), "problem")


def _speed_rows(text: str) -> list[str]:
    from .speed import SPEED_ROWS

    return _names(text, list(SPEED_ROWS), "speed row")


def build_parser() -> argparse.ArgumentParser:
    from .quality import default_jobs

    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Quality and speed of every gradsurgery method, side by side (offline, seeded).",
    )
    p.add_argument(
        "--suite",
        choices=("quick", "full", "speed"),
        default="quick",
        help="quick: all quality problems in < 5 min on 2 cores; full: bigger, about 30 min on 2 cores; "
        "speed: step time, memory and solver time (default: quick)",
    )
    p.add_argument(
        "--methods",
        default="all",
        help="comma-separated method names, or 'all' (default): every method registered in "
        "gradsurgery.METHODS; 'sum' (equal weights) is always added as the baseline",
    )
    p.add_argument(
        "--seeds",
        type=_seeds,
        default=None,
        help="number of seeds (3 → 0,1,2) or a comma-separated list (default: 3 quick, 5 full)",
    )
    p.add_argument("--out", type=Path, default=Path("results"), help="output folder (default: results)")
    p.add_argument(
        "--problems",
        type=_problems,
        default=None,
        help=f"comma-separated subset of {','.join(ALL_PROBLEMS)} (default: all)",
    )
    p.add_argument(
        "--mode",
        choices=("full", "representation", "both"),
        default="full",
        help="quality suites: gradients over the shared parameters (full), over the shared "
        "representation (representation, one backward), or both (default: full)",
    )
    p.add_argument(
        "--jobs",
        type=_positive_int,
        default=default_jobs(),
        help="worker processes for the quality runs (default: min(2, CPU count)); the speed suite "
        "always runs in one process",
    )
    p.add_argument("--threads", type=_positive_int, default=1, help="torch threads per process (default: 1)")
    p.add_argument(
        "--device",
        default="cpu",
        help="speed suite: where the step-time models run, cpu (default) or cuda[:N]",
    )
    p.add_argument(
        "--speed-rows",
        type=_speed_rows,
        default=None,
        help="speed suite: comma-separated subset of solvers, the step-table sizes (small, 0.5M, 5M) and the "
        "exact-mode workloads (sparse-1e5, sparse-1e6, mlp-5M, transformer, transformer-nn, transformer-b1); "
        "default: all",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="a few steps of everything, on tiny data: a smoke test of the whole pipeline",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from .runner import parse_methods

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.methods = parse_methods(args.methods)
    except ValueError as err:
        parser.error(f"argument --methods: {err}")
    if args.seeds is None:
        args.seeds = list(range(5 if args.suite == "full" else 3))
    if args.problems is None:
        args.problems = list(ALL_PROBLEMS)
    if args.speed_rows is not None and args.suite != "speed":
        parser.error("argument --speed-rows: only for --suite speed")
    if args.suite == "speed" and args.mode != "full":
        parser.error("argument --mode: the speed suite always measures both modes; --mode is for quick/full")
    if args.device != "cpu":
        if args.suite != "speed":
            parser.error(
                "argument --device: only the speed suite runs on another device; quality suites use the CPU"
            )
        import torch

        if not re.fullmatch(r"cuda(:\d+)?", args.device):
            parser.error(f"argument --device: expected cpu or cuda[:N], got {args.device!r}")
        if not torch.cuda.is_available():
            parser.error(f"argument --device: {args.device} requested but torch.cuda.is_available() is False")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"argument --out: {args.out} exists and is not a folder")
    return args


def run_quality(args: argparse.Namespace, out: Path, meta: dict[str, Any]) -> list[str]:
    """The quality problems; returns the Markdown sections of the report."""
    from . import quality, report

    problems = [p for p in QUALITY_PROBLEMS if p in args.problems]
    if not problems:
        return []
    configs = quality.suite_configs("tiny" if args.tiny else args.suite)
    configs = [configs[p] for p in problems]
    modes = {"full": ["full"], "representation": ["representation"], "both": ["full", "representation"]}[
        args.mode
    ]
    jobs = quality.plan(configs, args.methods, args.seeds, modes)
    remaining = {cfg.key: sum(j.config.key == cfg.key for j in jobs) for cfg in configs}
    finished: dict[str, list] = {cfg.key: [] for cfg in configs}
    sections: dict[str, str] = {}

    def section(key: str, results: list) -> str:
        cfg = next(c for c in configs if c.key == key)
        head = (
            f"### {cfg.title}\n\nproblem `{key}`, {cfg.steps} steps, batch {cfg.batch_size}, "
            f"Adam lr {cfg.lr:g}, "
            f"size options {cfg.size or 'default'}, seeds {sorted({r.seed for r in results})}\n"
        )
        if key == "toy":
            note = (
                "One run per starting point (and seed); the training losses are 0.1·f1 + 20·0.1 and f2 + 20 "
                "(the "
                "constant makes them positive for dwa, gradnorm and famo and changes no gradient).\n"
            )
            return head + "\n" + report.toy_tables(report.summarize_toy(results)) + "\n\n" + note
        parts = [head]
        for s in report.summarize(results):
            parts.append(f"#### {s.label}\n\n{report.problem_table(s)}\n")
        return "\n".join(parts)

    def on_result(index: int, job: Any, result: Any) -> None:
        key = job.config.key
        finished[key].append((index, result))
        remaining[key] -= 1
        if remaining[key] == 0:  # all runs of this problem are in: its tables, in plan order
            sections[key] = section(key, [r for _, r in sorted(finished[key], key=lambda pair: pair[0])])
            say("\n" + sections[key])

    bar = progress_bar(
        len(jobs), f"quality ({args.suite}{', tiny' if args.tiny else ''})", not args.no_progress
    )
    start = time.perf_counter()
    try:
        results = quality.execute(jobs, args.jobs, args.threads, bar, on_result)
    finally:
        bar.close()
    meta["quality_seconds"] = time.perf_counter() - start
    report.write_runs(out, results, meta)
    summaries = report.summarize(results)
    toy = report.summarize_toy(results)
    report.write_json(out / "summary.json", {"meta": meta, **report.summary_payload(summaries, toy)})
    plots = []
    if report.plot_toy(out / "toy_trajectories.png", results):
        plots.append("toy_trajectories.png")
    for cfg in configs:
        if cfg.key != "toy" and report.plot_problem(
            out / f"{cfg.key}.png", [s for s in summaries if s.key == cfg.key]
        ):
            plots.append(f"{cfg.key}.png")
    wins = [(s.label, m, k) for s in summaries for m, k in s.wins()]
    lines = ["## Quality", "", report.legend(), ""]
    lines += [sections[cfg.key] for cfg in configs if cfg.key in sections]
    lines += [
        "### Beats equal weights by more than the seed spread",
        "",
        "Per metric (mean ± std intervals of the method and of `sum` do not overlap):",
        "",
    ]
    if wins:
        by_problem: dict[str, list[str]] = {}
        for label, m, k in wins:
            by_problem.setdefault(label, []).append(f"`{m}` ({k})")
        lines += [f"- {label}: " + ", ".join(items) for label, items in by_problem.items()]
    else:
        lines.append("- none in this run")
    overall = [(s.label, m, d) for s in summaries for m, d in s.overall_wins()]
    lines += ["", "Over all metrics at once (Δm% vs equal weights, paired by seed, mean + std < 0):", ""]
    if overall:
        by_problem = {}
        for label, m, d in overall:
            by_problem.setdefault(label, []).append(f"`{m}` ({report.fmt_mean_std(*d)})")
        lines += [f"- {label}: " + ", ".join(items) for label, items in by_problem.items()]
    else:
        lines.append("- none in this run")
    lines += [
        "",
        "Plots: " + ", ".join(f"`{p}`" for p in plots) if plots else "Plots: none (matplotlib missing)",
        "",
    ]
    say(
        f"quality: {len(results)} runs in {meta['quality_seconds']:.0f} s; "
        f"{sum(r.status != 'ok' for r in results)} not ok"
    )
    return lines


def run_modes(args: argparse.Namespace, out: Path) -> list[str]:
    """Item 5: the L2 and noisy-label benchmarks, by module path, each in its own sub-folder."""
    lines: list[str] = []
    for name, module_name in MODE_BENCHMARKS.items():
        if name not in args.problems:
            continue
        if importlib.util.find_spec(module_name) is None:
            note = f"{name}: skipped, module {module_name} is not installed"
            say(note)
            lines += [f"### {name}", "", note, ""]
            continue
        target = out / name
        argv = ["--seeds", *map(str, args.seeds), "--out", str(target)]
        if args.suite != "full":
            argv.append("--quick")
            if not args.tiny:
                argv += QUICK_MODE_SIZES.get(name, [])
        say(f"\n{name}: {module_name}.main({argv})")
        start = time.perf_counter()
        try:
            code = importlib.import_module(module_name).main(argv)
        except SystemExit as err:  # argparse inside the module
            code = err.code
        except Exception as err:  # one failing benchmark must not lose the others' results
            code = f"{type(err).__name__}: {err}"
        seconds = time.perf_counter() - start
        lines += [f"### {name} (`{module_name}`, {seconds:.0f} s)", ""]
        if code not in (0, None):
            lines += [f"failed: {code}", ""]
            say(f"{name}: failed ({code})")
        tables = sorted(target.glob("*.md")) if target.is_dir() else []
        for table in tables:
            lines += [table.read_text().strip(), ""]
        if not tables and code in (0, None):
            lines += [f"(no Markdown table written to `{target}`)", ""]
    return ["## L2 and noisy labels", "", *lines] if lines else []


def suite_notes(left_out: dict[str, str], outside: dict[str, int], first: dict[str, str]) -> list[str]:
    """What the reader should know about the run as a whole, printed after the tables: the registered methods
    left out of the default list (with the reason they give) and the warnings counted outside the runs."""
    notes = []
    for name, reason in left_out.items():
        notes.append(
            f"method {name!r} is not part of the default method list, which holds the multi-task methods: "
            f"it refuses a problem with several losses ({reason}). Name it in --methods to run it anyway."
        )
    if outside:
        notes.append(
            f"warnings outside the runs (counted, not printed): {count_text(outside)}; first of each: "
            + "; ".join(f"{name} ({msg!r})" for name, msg in first.items())
        )
    return notes


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from . import report

    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    meta = report.environment(argv if argv is not None else sys.argv[1:])
    meta.update(
        {
            "suite": args.suite,
            "tiny": args.tiny,
            "seeds": args.seeds,
            "methods": args.methods,
            "jobs": args.jobs,
            "mode": args.mode,
        }
    )
    start = time.perf_counter()
    say(
        f"gradsurgery benchmarks: suite={args.suite}{' (tiny)' if args.tiny else ''}, "
        f"methods={args.methods}, "
        f"seeds={args.seeds}, out={out}"
    )
    # Warnings raised outside the runs (which count their own into the tables' note column) are counted
    # here too and reported after the tables: never printed raw in the middle of the output.
    outside: dict[str, int] = {}
    first: dict[str, str] = {}
    with counted_warnings(outside, first):
        from .runner import single_loss_methods

        left_out = {name: why for name, why in single_loss_methods().items() if name not in args.methods}
        if args.suite == "speed":
            from . import speed

            lines = speed.run(args, out, meta)
        else:
            lines = run_quality(args, out, meta)
            lines += run_modes(args, out)
    notes = suite_notes(left_out, outside, first)
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
        say("\nNotes:\n" + "\n".join(f"- {n}" for n in notes))
    meta["total_seconds"] = time.perf_counter() - start
    header = [
        f"# gradsurgery benchmarks: `{meta['command']}`",
        "",
        f"torch {meta['torch']}, {meta['torch_threads']} thread(s), {meta['cpu_count']} CPU(s), "
        f"{meta['platform']}; {meta['total_seconds']:.0f} s in total",
        "",
    ]
    (out / "report.md").write_text("\n".join(header + lines) + "\n")
    report.write_json(out / "meta.json", meta)
    say(
        f"done in {meta['total_seconds']:.0f} s; results in {out}/ "
        "(report.md and the CSV/JSON/PNG files it names)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
