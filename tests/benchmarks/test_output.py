"""What the benchmark commands print and draw: the tables first and the notes after them, warnings counted
and never printed raw, ``--help`` under the command one types, plots on axes that fit the metric."""

from __future__ import annotations

import math
import re
import warnings

import pytest

pytest.importorskip("sklearn")  # the bench extra

from benchmarks import l2_regularization, noisy_labels, report, runner, speed, suite  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tables_come_first_and_notes_after_them(tmp_path, capsys):
    argv = ["--tiny", "--methods", "mgda", "--seeds", "1", "--problems", "synthetic", "--jobs", "1"]
    assert suite.main([*argv, "--no-progress", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert lines[0].startswith("gradsurgery benchmarks: suite=quick")
    last_table_row = max(i for i, line in enumerate(lines) if line.startswith("|"))
    notes = lines.index("Notes:")
    assert notes > last_table_row
    l2_note = next(i for i, line in enumerate(lines) if line.startswith("- method 'l2' is not part of"))
    assert l2_note > notes
    assert "it refuses a problem with several losses" in lines[l2_note]
    report_text = (tmp_path / "report.md").read_text()
    assert report_text.index("## Notes") > report_text.rindex("| mgda |")
    assert "Warning" not in printed.err


def test_warnings_outside_the_runs_are_counted_not_printed(tmp_path, monkeypatch, capsys):
    def noisy_quality(args, out, meta):
        warnings.warn("Solution may be inaccurate. Try another solver.", UserWarning, stacklevel=1)
        warnings.warn("Solution may be inaccurate. Try another solver.", UserWarning, stacklevel=1)
        return ["## Quality", "", "| method |", "|---|", "| sum |", ""]

    monkeypatch.setattr(suite, "run_quality", noisy_quality)
    monkeypatch.setattr(suite, "run_modes", lambda args, out: [])
    assert suite.main(["--tiny", "--methods", "mgda", "--no-progress", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr()
    assert not re.search(r":\d+: UserWarning:", printed.err + printed.out)  # how warnings are printed
    assert "warnings outside the runs (counted, not printed): 2 UserWarning" in printed.out
    assert "2 UserWarning" in (tmp_path / "report.md").read_text()


def test_run_warnings_go_to_the_note_column():
    def warns(*args, **kwargs):
        warnings.warn("fallback", UserWarning, stacklevel=1)
        return runner.RunResult(problem="p", method="m", seed=0)

    counted = runner._recording_warnings(warns)()
    assert counted.extra["warnings"] == {"UserWarning": 1}
    assert report.warning_note([counted, runner.RunResult(problem="p", method="m", seed=1)]) == (
        "warnings: 1 UserWarning (1/2 runs)"
    )


def test_speed_warnings_are_counted_per_method():
    counts: dict[str, dict[str, int]] = {}
    from benchmarks.console import counted_warnings

    with counted_warnings(counts.setdefault("nash_mtl", {})):
        warnings.warn("inaccurate", UserWarning, stacklevel=1)
    lines = speed.warning_lines(counts, {"method pcgrad": {}})
    assert lines[0] == "### Warnings counted during the measurements"
    assert "- steps of `nash_mtl`: 1 UserWarning" in lines
    assert speed.warning_lines({"mgda": {}}, {}) == []


@pytest.mark.parametrize(
    "main, prog",
    [
        (suite.main, "python -m benchmarks"),
        (l2_regularization.main, "python -m benchmarks.l2_regularization"),
        (noisy_labels.main, "python -m benchmarks.noisy_labels"),
    ],
)
def test_help_names_the_command_to_type(main, prog, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {prog} ")


def test_metric_ranges_and_axis_limits():
    assert report.metric_range("click_auc") == (0.0, 1.0)
    assert report.metric_range("left_acc") == (0.0, 1.0)
    assert report.metric_range("watch_mse") == (0.0, math.inf)
    assert report.metric_range("f1") == (-math.inf, math.inf)
    # MSE means 3600..24700 with spreads: the axis stays at or above 0 (the old plot went to -10000)
    low, high = report.axis_limits([3400, 3900, 23000, 26100], report.metric_range("watch_mse"))
    assert 0 <= low < 3400 and high > 26100
    # AUCs: never beyond [0, 1], and chance (0.5) inside when it is among the values shown
    low, high = report.axis_limits([0.3, 0.98, 1.02, 0.5], (0.0, 1.0))
    assert 0 <= low < 0.3 and high == 1.0
    assert report.axis_limits([math.nan], (0.0, 1.0)) is None


def _summary():
    def run(method, seed, auc, mse):
        r = runner.RunResult(problem="recsys", method=method, seed=seed, metrics={"a_auc": auc, "b_mse": mse})
        r.extra = {
            "problem_key": "recsys",
            "higher_is_better": {"a_auc": True, "b_mse": False},
            "task_names": ["a", "b"],
        }
        r.steps, r.seconds, r.mean_weights = 10, 0.01, [1.0, 1.0]
        return r

    data = {"sum": (0.4, 3600.0), "mgda": (0.7, 20000.0), "single:a": (0.73, 9e4), "single:b": (0.5, 3500.0)}
    (summary,) = report.summarize(
        [run(m, s, a + 0.01 * s, b * (1 + 0.01 * s)) for m, (a, b) in data.items() for s in range(2)]
    )
    return summary


def test_single_task_reference_is_the_model_of_the_metrics_own_task():
    summary = _summary()
    assert report.single_task_reference(summary, "a_auc") == pytest.approx(0.735)
    assert report.single_task_reference(summary, "b_mse") == pytest.approx(3517.5)


def test_problem_plot_draws_references_and_chance(tmp_path, monkeypatch):
    plt = pytest.importorskip("matplotlib.pyplot")
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    assert report.plot_problem(tmp_path / "recsys.png", [_summary()])
    assert (tmp_path / "recsys.png").read_bytes()[:4] == b"\x89PNG"
    (fig,) = figures
    auc, mse = fig.axes[:2]
    auc_lines = {
        round(line.get_ydata()[0], 4) for line in auc.get_lines() if line.get_linestyle() in ("--", ":")
    }
    assert auc_lines == {0.5, 0.735}  # chance and the single-task model of task a
    assert 0.0 <= auc.get_ylim()[0] < 0.4 and auc.get_ylim()[1] <= 1.0
    assert mse.get_ylim()[0] >= 0.0
    assert {text.get_text() for text in fig.legends[0].get_texts()} == {
        "single-task model",
        "chance (AUC 0.5)",
    }
    plt.close(fig)
