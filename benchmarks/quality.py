"""The quality benchmarks: every method trains every problem for several seeds; tables, CSV/JSON and plots.

Problems (generators in ``benchmarks.problems``):

- ``toy``: the 2-D two-objective problem of CAGrad / Nash-MTL with the first loss scaled by 0.1; one run per
  starting point; reports the distance to the Pareto set and the end point's objectives.
- ``synthetic``: MMoE's two regression tasks with task correlation ρ ∈ {0, 0.5, 0.9}; per-task test MSE.
- ``recsys``: click / conversion (rare, only after a click) / watch time (an MSE 4-5 orders of magnitude above
  the BCEs); AUCs and MSE.
- ``multidigit``: two overlaid digits (scikit-learn's shipped 8×8 digits), two 10-way heads; accuracies.
- ``ranking``: shared-bottom, MMoE and PLE over sparse embedding tables of 10⁵-10⁶ rows (SparseAdam + Adam,
  ``GradSurgery(..., model=model)``), click / conversion / watch time; AUCs and MSE.

Every non-toy problem also trains one single-task model per task (same initial weights, batches and Adam, the
loss of that task alone) for the Δm% of Maninis et al. (2019).

Runs are independent, so they are spread over ``jobs`` worker processes; each result depends only on its
(problem, method, seed), not on the number of workers or on the order in which the runs finish.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import torch

from .console import counted_warnings
from .runner import RunResult, train, train_single_task

TOY_TOLERANCE = 0.05  # a run "reaches" the Pareto set when it ends this close to it (parameter space)


@dataclass(frozen=True)
class ProblemConfig:
    """How a suite runs one problem: its generator, the variants to run and the training budget."""

    key: str
    module: str
    title: str
    steps: int
    batch_size: int
    lr: float
    #: one entry per variant: (label suffix, keyword arguments of ``make`` beyond the size options)
    variants: tuple[tuple[str, dict[str, Any]], ...] = (("", {}),)
    size: dict[str, Any] = field(default_factory=dict)
    single_task: bool = True
    #: the toy is deterministic except for randomised methods: it runs with the first seeds only
    seeds_limit: int | None = None

    def label(self, suffix: str) -> str:
        return f"{self.key} ({suffix})" if suffix else self.key


def _toy(steps: int, seeds_limit: int | None) -> ProblemConfig:
    from .problems import toy

    starts = tuple(
        (f"start {i}: ({float(p[0]):g}, {float(p[1]):g})", {"start": i})
        for i, p in enumerate(toy.START_POINTS)
    )
    return ProblemConfig(
        "toy",
        "benchmarks.problems.toy",
        "Toy two-objective problem (CAGrad / Nash-MTL), loss 1 scaled by 0.1",
        steps=steps,
        batch_size=1,
        lr=0.2,
        variants=starts,
        single_task=False,
        seeds_limit=seeds_limit,
    )


_RHOS = tuple((f"rho={r}", {"rho": r}) for r in (0.0, 0.5, 0.9))
_ARCHS = tuple((arch, {"arch": arch}) for arch in ("shared_bottom", "mmoe", "ple"))
#: the quick suite's ranking tables: five fields, the largest a tenth of the full suite's (10⁵ rows)
_QUICK_VOCABS = (100_000, 20_000, 1000, 100, 10)


def suite_configs(suite: str) -> dict[str, ProblemConfig]:
    """The problems of ``suite`` (``quick``, ``full`` or ``tiny``, the last for tests and smoke runs)."""
    if suite == "quick":
        return {
            "toy": _toy(steps=200, seeds_limit=1),
            "synthetic": ProblemConfig(
                "synthetic",
                "benchmarks.problems.synthetic",
                "MMoE synthetic tasks, shared-bottom model",
                steps=100,
                batch_size=128,
                lr=1e-2,
                variants=_RHOS,
            ),
            "recsys": ProblemConfig(
                "recsys",
                "benchmarks.problems.recsys",
                "Recommendation: click, conversion, watch time",
                steps=150,
                batch_size=256,
                lr=3e-3,
            ),
            "multidigit": ProblemConfig(
                "multidigit",
                "benchmarks.problems.multidigit",
                "Two overlaid digits, MLP trunk",
                steps=150,
                batch_size=128,
                lr=1e-2,
                size={"trunk": "mlp"},
            ),
            "ranking": ProblemConfig(
                "ranking",
                "benchmarks.problems.ranking",
                "Ranking over sparse tables (SparseAdam + Adam, activation source): MMoE",
                steps=100,
                batch_size=256,
                lr=3e-3,
                variants=_ARCHS[1:2],
                size={"n_train": 16384, "n_test": 8192, "vocab_sizes": _QUICK_VOCABS},
            ),
        }
    if suite == "full":
        return {
            "toy": _toy(steps=1000, seeds_limit=3),
            "synthetic": ProblemConfig(
                "synthetic",
                "benchmarks.problems.synthetic",
                "MMoE synthetic tasks, shared-bottom model",
                steps=1000,
                batch_size=128,
                lr=3e-3,
                variants=_RHOS,
                size={"n_train": 8192, "n_test": 4096},
            ),
            "recsys": ProblemConfig(
                "recsys",
                "benchmarks.problems.recsys",
                "Recommendation: click, conversion, watch time",
                steps=1500,
                batch_size=256,
                lr=3e-3,
                size={"n_train": 32768, "n_test": 16384},
            ),
            "multidigit": ProblemConfig(
                "multidigit",
                "benchmarks.problems.multidigit",
                "Two overlaid digits, convolutional trunk",
                steps=1000,
                batch_size=128,
                lr=3e-3,
                size={"trunk": "conv", "n_train": 8192},
            ),
            "ranking": ProblemConfig(
                "ranking",
                "benchmarks.problems.ranking",
                "Ranking over sparse tables of 10⁵-10⁶ rows (SparseAdam + Adam, activation source)",
                steps=600,
                batch_size=512,
                lr=3e-3,
                variants=_ARCHS,
                size={"n_train": 65536, "n_test": 16384},
                seeds_limit=3,
            ),
        }
    if suite == "tiny":
        return {
            "toy": _toy(steps=5, seeds_limit=1),
            "synthetic": ProblemConfig(
                "synthetic",
                "benchmarks.problems.synthetic",
                "MMoE synthetic tasks (tiny)",
                steps=3,
                batch_size=32,
                lr=1e-2,
                variants=_RHOS[:1],
                size={"n_train": 64, "n_test": 64, "dim": 8, "hidden": 8, "tower": 4},
            ),
            "recsys": ProblemConfig(
                "recsys",
                "benchmarks.problems.recsys",
                "Recommendation (tiny)",
                steps=3,
                batch_size=64,
                lr=3e-3,
                size={"n_train": 512, "n_test": 512, "hidden": (8,)},
            ),
            "multidigit": ProblemConfig(
                "multidigit",
                "benchmarks.problems.multidigit",
                "Two overlaid digits (tiny)",
                steps=3,
                batch_size=32,
                lr=1e-2,
                size={"trunk": "mlp", "n_train": 64, "n_test": 64, "width": 2},
            ),
            "ranking": ProblemConfig(
                "ranking",
                "benchmarks.problems.ranking",
                "Ranking over sparse tables (tiny)",
                steps=3,
                batch_size=64,
                lr=3e-3,
                variants=_ARCHS[1:2],
                size={
                    "n_train": 512,
                    "n_test": 512,
                    "vocab_sizes": [50, 40, 30, 20],
                    "emb_dim": 4,
                    "model_options": {"expert": [8], "tower": 4, "num_experts": 2},
                },
            ),
        }
    raise ValueError(f"unknown quality suite {suite!r}; choose 'quick', 'full' or 'tiny'")


@dataclass(frozen=True)
class Job:
    """One run, picklable for the worker processes."""

    config: ProblemConfig
    suffix: str
    kwargs_json: str
    method: str  # a method name, or "single:<task index>"
    seed: int
    mode: str = "full"

    @property
    def label(self) -> str:
        return self.config.label(self.suffix)

    @property
    def make_kwargs(self) -> dict[str, Any]:
        return json.loads(self.kwargs_json)


def plan(
    configs: Iterable[ProblemConfig], methods: list[str], seeds: list[int], modes: list[str]
) -> list[Job]:
    """Every run of the suite, problem by problem (tables are printed as problems complete)."""
    jobs = []
    for cfg in configs:
        use_seeds = seeds[: cfg.seeds_limit] if cfg.seeds_limit else seeds
        for suffix, variant in cfg.variants:
            kwargs = json.dumps({**cfg.size, **variant}, sort_keys=True)
            for seed in use_seeds:
                for mode in modes:
                    if mode == "representation" and cfg.key == "toy":
                        continue  # the toy's "model" is its shared parameter: there is no representation
                    jobs.extend(Job(cfg, suffix, kwargs, m, seed, mode) for m in methods)
                if cfg.single_task:
                    num_tasks = _problem(cfg.module, kwargs, seed).num_tasks
                    jobs.extend(Job(cfg, suffix, kwargs, f"single:{t}", seed) for t in range(num_tasks))
    return jobs


_PROBLEMS: dict[tuple[str, str, int], Any] = {}


def _problem(module: str, kwargs_json: str, seed: int) -> Any:
    """Problems are cached per process: data generation runs once per (problem, variant, seed)."""
    key = (module, kwargs_json, seed)
    if key not in _PROBLEMS:
        if len(_PROBLEMS) > 8:
            _PROBLEMS.clear()
        _PROBLEMS[key] = importlib.import_module(module).make(seed, **json.loads(kwargs_json))
    return _PROBLEMS[key]


#: The toy's objectives are bounded below by −20 (the bowls' minimum), so each scaled loss plus 20·scale is
#: positive. Loss-ratio and log-loss methods (dwa, gradnorm, famo) refuse negative losses; the shift lets
#: them run and changes no gradient, so methods that read only gradients are unaffected.
TOY_LOSS_FLOOR = -20.0


class ShiftedToy:
    """The toy problem with its training losses shifted to be positive (``evaluate`` is unchanged)."""

    def __init__(self, problem: Any) -> None:
        self._problem = problem
        self.shifts = [-TOY_LOSS_FLOOR * s for s in problem.scales]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._problem, name)

    def losses(self, outputs: Any, targets: Any) -> list[torch.Tensor]:
        return [
            loss + shift
            for loss, shift in zip(self._problem.losses(outputs, targets), self.shifts, strict=True)
        ]


def _toy_tracker(problem: Any, every: int) -> tuple[Callable, dict[str, Any]]:
    """Records the trajectory x_t (every ``every`` steps) and the first step within the tolerance."""
    from .problems import toy

    record: dict[str, Any] = {"trajectory": [problem.start.tolist()], "steps_to_pareto": None}

    def hook(step: int, model: torch.nn.Module, info: Any) -> None:
        x = model.x.detach()
        if (step + 1) % every == 0:
            record["trajectory"].append(x.tolist())
        if record["steps_to_pareto"] is None and (step + 1) % 5 == 0:
            if toy.pareto_distance(x) < TOY_TOLERANCE:
                record["steps_to_pareto"] = step + 1

    return hook, record


def run_job(job: Job, raise_errors: bool = False) -> RunResult:
    """Execute one job (in a worker process or in-process)."""
    cfg = job.config
    setup_warnings: dict[str, int] = {}  # building the data; the runs count their own (runner.train)
    with counted_warnings(setup_warnings):
        problem = _problem(cfg.module, job.kwargs_json, job.seed)
    common = {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "raise_errors": raise_errors}
    if job.method.startswith("single:"):
        result = train_single_task(problem, int(job.method.split(":", 1)[1]), job.seed, **common)
    elif cfg.key == "toy":
        hook, record = _toy_tracker(problem, every=max(1, cfg.steps // 200))
        result = train(ShiftedToy(problem), job.method, job.seed, on_step=hook, **common)
        result.extra.update(record)
        if result.status == "ok":
            result.extra["trajectory"].append(result.extra["trajectory"][-1])
    else:
        result = train(problem, job.method, job.seed, mode=job.mode, **common)
    result.problem = job.label
    result.extra.update(
        {
            "problem_key": cfg.key,
            "variant": job.make_kwargs,
            "steps_planned": cfg.steps,
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "task_names": list(problem.task_names),
            "higher_is_better": dict(problem.higher_is_better),
        }
    )
    if job.mode == "representation":
        result.method = f"{job.method} [repr]"
    if setup_warnings:
        counts = result.extra.setdefault("warnings", {})
        for name, n in setup_warnings.items():
            counts[name] = counts.get(name, 0) + n
    return result


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def execute(
    jobs: list[Job],
    jobs_count: int = 1,
    threads: int = 1,
    progress: Any = None,
    on_result: Callable[[int, Job, RunResult], None] | None = None,
) -> list[RunResult]:
    """Run ``jobs`` (in ``jobs_count`` processes when > 1) and return their results in plan order."""
    results: list[RunResult | None] = [None] * len(jobs)

    def done(i: int, res: RunResult) -> None:
        results[i] = res
        if progress is not None:
            progress.set_postfix_str(f"{res.problem} {res.method} s{res.seed}", refresh=False)
            progress.update(1)
        if on_result is not None:
            on_result(i, jobs[i], res)

    if jobs_count <= 1:
        for i, job in enumerate(jobs):
            done(i, run_job(job))
    else:
        # spawn, not fork: torch's thread pools do not survive a fork cleanly
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            jobs_count, mp_context=ctx, initializer=_worker_init, initargs=(threads,)
        ) as pool:
            futures = {pool.submit(run_job, job): i for i, job in enumerate(jobs)}
            for fut in as_completed(futures):
                done(futures[fut], fut.result())
    return [r for r in results if r is not None]


def default_jobs() -> int:
    """Two worker processes where two cores exist: the quick suite is sized for a 2-core machine."""
    return max(1, min(2, os.cpu_count() or 1))


__all__ = [
    "Job",
    "ProblemConfig",
    "ShiftedToy",
    "TOY_TOLERANCE",
    "default_jobs",
    "execute",
    "plan",
    "run_job",
    "suite_configs",
]
