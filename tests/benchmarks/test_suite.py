"""The benchmark harness: runner, quality pipeline, report files, speed suite and command line.

The suite's numbers are not asserted (they live in the benchmark outputs); what is tested is that every
problem runs through the harness, that results are reproducible and correctly aggregated (against numpy and
hand computations), that the files parse, and that bad arguments fail clearly.
"""

from __future__ import annotations

import csv
import importlib.machinery
import json
import math
import re
import sys
import types

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")  # multidigit's digits ship with scikit-learn (the bench extra)

import gradsurgery  # noqa: E402
from benchmarks import quality, report, runner, speed, suite  # noqa: E402
from benchmarks.problems import synthetic, toy  # noqa: E402

TINY = quality.suite_configs("tiny")


pytestmark = pytest.mark.usefixtures("one_thread")


# -- methods and their options ------------------------------------------------------------------------------
def test_methods_come_from_the_registry_with_the_baseline_first():
    names = runner.parse_methods("all")
    assert names[0] == "sum"
    assert sorted(names) == sorted(set(gradsurgery.METHODS) - set(runner.single_loss_methods()))
    assert runner.parse_methods("pcgrad,mgda") == ["sum", "pcgrad", "mgda"]
    assert runner.parse_methods(["mgda", "sum", "mgda"]) == ["mgda", "sum"]


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="'nope'"):
        runner.parse_methods("mgda,nope")


def test_benchmark_options_table():
    assert runner.method_options("pareto", 4, 0) == {"min_weights": [0.125] * 4}
    assert runner.method_options("main_aux", 3, 0) == {"main": 0}
    assert runner.method_options("mixed", 3, 0) == {"main": [0, 1]}
    assert runner.method_options("pcgrad", 2, 7) == {"seed": 7}
    assert runner.method_options("sum", 2, 7) == {}
    assert "main task: click" == runner.method_note("main_aux", ["click", "conversion", "watch"])


@pytest.mark.parametrize("num_tasks", [2, 3])
def test_every_default_method_constructs_with_the_benchmark_options(num_tasks):
    for name in runner.parse_methods("all"):
        method = gradsurgery.make_method(name, **runner.method_options(name, num_tasks, 0))
        method.bind(num_tasks)


def test_methods_that_refuse_several_losses_leave_the_default_list_only():
    class OneLoss(gradsurgery.Method):
        name = "one_loss_for_test"

        def _check_num_tasks(self, num_tasks):
            if num_tasks != 1:
                raise ValueError(f"one_loss_for_test takes one loss, got {num_tasks}")

    gradsurgery.register(OneLoss)
    try:
        assert runner.single_loss_methods()["one_loss_for_test"] == "one_loss_for_test takes one loss, got 2"
        assert "one_loss_for_test" not in runner.parse_methods("all")
        assert runner.parse_methods("one_loss_for_test") == ["sum", "one_loss_for_test"]
    finally:
        del gradsurgery.METHODS["one_loss_for_test"]


# -- the runner ---------------------------------------------------------------------------------------------
def test_run_is_reproducible_and_independent_of_what_ran_before():
    problem = synthetic.make(0, n_train=64, n_test=32, dim=6, hidden=8, tower=4)
    kwargs = {"steps": 4, "batch_size": 16, "lr": 1e-2, "raise_errors": True}
    a = runner.train(problem, "pcgrad", 3, **kwargs)
    runner.train(problem, "mgda", 5, **kwargs)  # other runs in between: no shared RNG state
    torch.manual_seed(123)
    b = runner.train(problem, "pcgrad", 3, **kwargs)
    assert a.status == b.status == "ok"
    assert a.metrics == b.metrics and a.final_losses == b.final_losses and a.mean_weights == b.mean_weights


def test_single_task_run_trains_only_its_own_head():
    problem = synthetic.make(0, n_train=64, n_test=32, dim=6, hidden=8, tower=4)
    initial = problem.build_model(seed=1)
    seen = {}

    def spy(model):
        seen["model"] = model
        return problem.__class__.evaluate(problem, model)

    problem.evaluate = spy
    result = runner.train_single_task(problem, 1, 1, steps=3, batch_size=16, lr=1e-2, raise_errors=True)
    assert result.status == "ok" and result.method == "single:task2"
    trained = seen["model"]
    for p0, p1 in zip(initial.heads[0].parameters(), trained.heads[0].parameters(), strict=True):
        assert torch.equal(p0, p1)  # task 1's head never received a gradient
    assert not torch.equal(initial.heads[1][0].weight, trained.heads[1][0].weight)
    assert not torch.equal(initial.trunk[0].weight, trained.trunk[0].weight)


def test_failures_are_recorded_not_raised():
    problem = synthetic.make(0, n_train=64, n_test=32, dim=6, hidden=8, tower=4)
    result = runner.train(problem, "mgda", 0, steps=2, batch_size=16, lr=1e-2, options={"solver": "bogus"})
    assert result.status == "error" and "bogus" in result.message and result.metrics == {}
    with pytest.raises(ValueError, match="bogus"):
        runner.train(
            problem,
            "mgda",
            0,
            steps=2,
            batch_size=16,
            lr=1e-2,
            options={"solver": "bogus"},
            raise_errors=True,
        )


def test_toy_losses_are_shifted_by_a_constant():
    problem = toy.make(0, start=3)
    shifted = quality.ShiftedToy(problem)
    x = torch.tensor([1.5, -7.0])
    f1, f2 = toy.raw_objectives(x)
    got = shifted.losses(toy.losses_at(x, problem.scales), ())
    assert torch.allclose(got[0], 0.1 * f1 + 2.0) and torch.allclose(got[1], f2 + 20.0)
    grid = torch.stack(
        torch.meshgrid(torch.linspace(-12, 12, 121), torch.linspace(-12, 12, 121), indexing="ij"), -1
    )
    floor = torch.stack(toy.raw_objectives(grid.double())).min()
    assert floor > quality.TOY_LOSS_FLOOR  # so the shifted losses are positive


# -- every problem through the harness ----------------------------------------------------------------------
def test_every_problem_runs_with_two_methods():
    jobs = quality.plan(TINY.values(), ["sum", "mgda"], [0], ["full"])
    results = quality.execute(jobs)
    assert len(results) == len(jobs)
    for job, res in zip(jobs, results, strict=True):
        assert res.status == "ok", (res.problem, res.method, res.message)
        assert res.steps == job.config.steps
        assert set(res.metrics) == set(res.extra["higher_is_better"])
        assert all(math.isfinite(v) for v in res.metrics.values())
    singles = [r for r in results if r.method.startswith("single:")]
    assert len(singles) == 2 + 3 + 2 + 3  # one per task of synthetic, recsys, multidigit, ranking
    toy_runs = [r for r in results if r.extra["problem_key"] == "toy"]
    assert len(toy_runs) == 2 * len(toy.START_POINTS)
    for r in toy_runs:
        traj = np.asarray(r.extra["trajectory"])
        assert traj.shape[1] == 2 and np.allclose(traj[0], toy.START_POINTS[r.extra["variant"]["start"]])


def test_representation_mode_runs_through_the_trunk():
    cfg = TINY["multidigit"]
    jobs = quality.plan([cfg], ["sum", "mgda"], [0], ["representation"])
    results = [quality.run_job(j, raise_errors=True) for j in jobs if not j.method.startswith("single:")]
    assert [r.method for r in results] == ["sum [repr]", "mgda [repr]"]
    assert all(r.status == "ok" and r.extra["mode"] == "representation" for r in results)


def test_parallel_workers_give_the_same_results():
    jobs = quality.plan([TINY["synthetic"]], ["sum", "pcgrad"], [0, 1], ["full"])
    serial = quality.execute(jobs, jobs_count=1)
    parallel = quality.execute(jobs, jobs_count=2)
    assert [(r.method, r.seed, r.metrics) for r in serial] == [
        (r.method, r.seed, r.metrics) for r in parallel
    ]


# -- aggregation against independent computations -----------------------------------------------------------
def _run(method, seed, metrics, label="p", weights=(1.0, 1.0)):
    r = runner.RunResult(problem=label, method=method, seed=seed, metrics=metrics, mean_weights=list(weights))
    r.extra = {
        "problem_key": "p",
        "higher_is_better": {"a_acc": True, "b_mse": False},
        "task_names": ["a", "b"],
    }
    r.steps, r.seconds = 10, 0.01
    return r


def test_summary_statistics_and_delta_m():
    data = {
        "sum": [(0.80, 2.0), (0.70, 2.2), (0.75, 1.9)],
        "mgda": [(0.90, 1.0), (0.92, 1.1), (0.91, 1.05)],
        "single:a": [(0.85, 9.0), (0.80, 9.0), (0.82, 9.0)],
        "single:b": [(0.10, 1.6), (0.10, 2.0), (0.10, 1.5)],
    }
    results = [
        _run(m, s, {"a_acc": a, "b_mse": b}) for m, rows in data.items() for s, (a, b) in enumerate(rows)
    ]
    (summary,) = report.summarize(results)
    by = {m.method: m for m in summary.methods}
    acc = np.array([a for a, _ in data["mgda"]])
    assert by["mgda"].metrics["a_acc"] == pytest.approx((acc.mean(), acc.std(ddof=1)))
    # Δm per seed by hand: accuracy vs single:a's accuracy (higher better), MSE vs single:b's (lower better)
    dm = [
        100 / 2 * (-(a - sa) / sa + (b - sb) / sb)
        for (a, b), (sa, _), (_, sb) in zip(data["mgda"], data["single:a"], data["single:b"], strict=True)
    ]
    assert by["mgda"].delta_single == pytest.approx((np.mean(dm), np.std(dm, ddof=1)))
    de = [
        100 / 2 * (-(a - ea) / ea + (b - eb) / eb)
        for (a, b), (ea, eb) in zip(data["mgda"], data["sum"], strict=True)
    ]
    assert by["mgda"].delta_equal == pytest.approx((np.mean(de), np.std(de, ddof=1)))
    # mgda's accuracy interval lies above sum's, its MSE interval below: better on both
    assert by["mgda"].versus_baseline == {"a_acc": 1, "b_mse": 1}
    assert summary.wins() == [("mgda", "a_acc"), ("mgda", "b_mse")]
    assert [s.method for s in summary.singles] == ["single:a", "single:b"]


def test_compare_uses_non_overlapping_intervals():
    assert report.compare(1.0, 0.1, 0.7, 0.1, True) == 1
    assert report.compare(1.0, 0.2, 0.7, 0.15, True) == 0  # 0.3 gain < 0.35 spread
    assert report.compare(0.5, 0.1, 0.7, 0.05, False) == 1  # lower is better
    assert report.compare(0.5, 0.1, 0.7, 0.05, True) == -1
    assert report.compare(float("nan"), 0.1, 0.7, 0.05, True) == 0


def test_metric_tasks_by_prefix_then_position():
    assert report.metric_tasks(["click_auc", "cvr_auc", "watch_mse"], ["click", "conversion", "watch"]) == {
        "click_auc": 0,
        "cvr_auc": 1,
        "watch_mse": 2,
    }
    assert report.metric_tasks(["right_acc", "left_acc"], ["left", "right"]) == {
        "right_acc": 1,
        "left_acc": 0,
    }


def test_number_formatting():
    assert report.fmt_mean_std(0.71234, 0.01234) == "0.712 ± 0.012"
    assert report.fmt_mean_std(3708.4, 123.0) == "3708 ± 123"
    assert report.fmt_mean_std(float("nan"), 1.0) == "—"
    assert report.mean_std([1.0]) == (1.0, 0.0)


def test_quantile_matches_numpy():
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    for q in (0.0, 0.25, 0.5, 0.9, 1.0):
        assert speed.quantile(values, q) == pytest.approx(np.percentile(values, 100 * q))


def test_random_grams_are_gram_matrices():
    for g in speed.random_grams(5, 3):
        assert np.allclose(g, g.T) and np.linalg.eigvalsh(g).min() > -1e-9
        assert (g[np.triu_indices(5, 1)] < 0).any()  # some task pairs conflict


@pytest.mark.skipif(not speed.memory_supported(torch.device("cpu")), reason="peak RSS needs Linux /proc")
def test_peak_memory_sees_a_known_allocation():
    case = speed.make_case("tiny", (4, 8, 4), 2, torch.device("cpu"), 4)
    held = []

    def factory():
        def step():
            held.append(torch.ones(10 * 2**20 // 4 * 4))  # 40 MiB of written float32 pages

        return step

    peak = speed.peak_memory_mb(case, factory, speed._libc())
    held.clear()
    assert peak >= 0.9 * 80  # two steps, two live blocks of 40 MiB


# -- files and command line ---------------------------------------------------------------------------------
def _table_widths(markdown: str) -> list[set[int]]:
    tables, current = [], None
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = len(re.findall(r"(?<!\\)\|", line)) - 1
            current = current or set()
            current.add(cells)
        elif current is not None:
            tables.append(current)
            current = None
    if current is not None:
        tables.append(current)
    return tables


def test_quick_tiny_writes_files_that_parse(tmp_path, capsys):
    out = tmp_path / "res"
    code = suite.main(
        [
            "--tiny",
            "--methods",
            "mgda",
            "--seeds",
            "2",
            "--problems",
            "toy,synthetic",
            "--jobs",
            "1",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| method |" in printed  # a table per problem on stdout
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    expected = 2 * len(toy.START_POINTS) + 2 * (
        2 + 2
    )  # toy: one seed; synthetic: 2 methods + 2 singles, 2 seeds
    assert len(rows) == expected
    for row in rows:
        assert row["status"] == "ok"
        metrics = {k: float(v) for k, v in row.items() if k.startswith("metric.") and v}
        assert metrics and all(math.isfinite(v) for v in metrics.values())
        json.loads(row["options"]), json.loads(row["mean_weights"])
    runs = json.loads((out / "runs.json").read_text())
    assert len(runs["runs"]) == expected and runs["meta"]["suite"] == "quick"
    summary = json.loads((out / "summary.json").read_text())
    assert {p["problem"] for p in summary["problems"]} == {"synthetic (rho=0.0)"}
    assert [t["method"] for t in summary["toy"]] == ["sum", "mgda"]
    text = (out / "report.md").read_text()
    assert "## Quality" in text and "### L2 and noisy" not in text
    widths = _table_widths(text)
    assert len(widths) == 3 and all(len(w) == 1 for w in widths)  # every row as wide as its header
    for png in ("toy_trajectories.png", "synthetic.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_speed_tiny(tmp_path):
    out = tmp_path / "speed"
    rows = "solvers,small,sparse-1e5"
    argv = ["--suite", "speed", "--tiny", "--methods", "mgda", "--speed-rows", rows, "--no-progress"]
    assert suite.main([*argv, "--out", str(out)]) == 0
    with open(out / "speed.csv") as f:
        rows = list(csv.DictReader(f))
    steps = {(r["method"], r["variant"]): r for r in rows if r["kind"] == "step"}
    assert {("plain", "plain"), ("sum", "full"), ("mgda", "full"), ("mgda", "representation")} <= set(steps)
    for key in [("mgda", "full"), ("mgda", "representation")]:
        assert steps[key]["status"] == "ok" and float(steps[key]["ratio"]) > 0
        assert float(steps[key]["ratio_p25"]) <= float(steps[key]["ratio"]) <= float(steps[key]["ratio_p75"])
    solvers = {(r["method"], r["num_tasks"]) for r in rows if r["kind"] == "solver" and r["status"] == "ok"}
    assert ("closed form (min_norm_two_weights)", "2") in solvers and (
        "cvxpy QP (SimplexQP.solve)",
        "4",
    ) in solvers
    data = json.loads((out / "speed.json").read_text())
    assert data["steps"] and data["solvers"]
    assert "### Targets" in (out / "report.md").read_text()
    # the exact rows: the activation source runs everywhere, with the Gram matrix of plain autograd
    exact = {(r["size"], r["variant"]): r for r in rows if r["kind"] == "exact"}
    for workload in ("sparse-1e5",):
        act = exact[(workload, "activations")]
        assert act["status"] == "ok" and float(act["ratio"]) > 0, act
        assert float(act["gram_rel_err"]) < 1e-5
    assert exact[("sparse-1e5", "jacobian")]["status"] == "error"  # no Jacobian of sparse tables
    assert "Exact full mode at scale" in (out / "report.md").read_text()


def test_speed_rows_are_validated(capsys):
    with pytest.raises(SystemExit):
        suite.parse_args(["--suite", "speed", "--speed-rows", "sparse-1e7"])
    assert "unknown speed row(s) ['sparse-1e7']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        suite.parse_args(["--suite", "quick", "--speed-rows", "solvers"])
    assert suite.parse_args(["--suite", "speed", "--speed-rows", "5M,solvers"]).speed_rows == [
        "5M",
        "solvers",
    ]


@pytest.mark.parametrize("name", ["mlp-5M", "transformer", "transformer-nn"])
def test_exact_members_agree_and_leave_no_hook_behind(name):
    from benchmarks.speed_models import WORKLOADS

    task_counts, build = WORKLOADS[name]
    w = build(task_counts[0], torch.device("cpu"), True)
    reference = speed.reference_gram(w)
    grams = speed.exact_grams(w, ["activations", "jacobian"])
    for gram in grams.values():
        assert torch.allclose(gram, reference, rtol=0, atol=1e-5 * float(reference.diagonal().max()))
    for variant in ("plain", "activations", "jacobian"):
        step = speed.exact_member(w, variant)
        step()
        speed._close(step)
    assert sum(len(m._forward_hooks) for m in w.model.modules()) == 0


def test_mode_benchmarks_are_called_by_module_path(tmp_path, monkeypatch):
    calls = []

    def fake_main(argv):
        calls.append(list(argv))
        target = tmp_path / "res" / "l2"
        target.mkdir(parents=True)
        (target / "table.md").write_text("| a | b |\n|---|---|\n| 1 | 2 |\n")
        return 0

    fake = types.ModuleType("benchmarks.l2_regularization")
    fake.__spec__ = importlib.machinery.ModuleSpec("benchmarks.l2_regularization", None)
    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "benchmarks.l2_regularization", fake)
    monkeypatch.setattr(
        suite,
        "MODE_BENCHMARKS",
        {"l2": "benchmarks.l2_regularization", "noisy": "benchmarks.no_such_module_here"},
    )
    args = suite.parse_args(["--problems", "l2,noisy", "--seeds", "0,1", "--out", str(tmp_path / "res")])
    lines = suite.run_modes(args, tmp_path / "res")
    quick = ["--quick", "--epochs", "30", "--width", "256"]
    assert calls == [["--seeds", "0", "1", "--out", str(tmp_path / "res" / "l2"), *quick]]
    text = "\n".join(lines)
    assert (
        "| 1 | 2 |" in text
        and "noisy: skipped, module benchmarks.no_such_module_here is not installed" in text
    )


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--seeds", "abc"], "expected a number of seeds"),
        (["--seeds", "0"], "at least 1"),
        (["--seeds", "1,1"], "distinct"),
        (["--methods", "mgda,nope"], "unknown method(s) ['nope']"),
        (["--problems", "toy,mnist"], "unknown problem(s) ['mnist']"),
        (["--suite", "huge"], "invalid choice: 'huge'"),
        (["--jobs", "0"], "expected a positive integer"),
        (["--suite", "speed", "--mode", "both"], "the speed suite always measures both modes"),
        (["--suite", "quick", "--device", "cuda"], "only the speed suite runs on another device"),
        (["--suite", "speed", "--device", "gpu"], "expected cpu or cuda[:N], got 'gpu'"),
    ],
)
def test_bad_arguments_fail_clearly(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        suite.parse_args(argv)
    assert exc.value.code == 2
    assert fragment in capsys.readouterr().err


def test_seeds_argument_forms():
    assert suite.parse_args(["--seeds", "3"]).seeds == [0, 1, 2]
    assert suite.parse_args(["--seeds", "4,9"]).seeds == [4, 9]
    assert suite.parse_args(["--suite", "full"]).seeds == [0, 1, 2, 3, 4]
