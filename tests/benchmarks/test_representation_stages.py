"""The stage profile of representation mode: every package stage it names is one the step really runs, the
package comes back unwrapped, and each variant's stages add up to its step."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import representation_stages as rs


def _attributes():
    # torch.optim replaces an Optimizer subclass's step by a profiling wrapper when its first instance is
    # made: make one first, so that only the profile could change what is read here.
    rs.GradSurgery(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), "mgda")
    return [vars(owner)[name] for owner, name, _ in rs.PACKAGE_STAGES] + [vars(rs.GradSurgery)["backward"]]


def test_every_package_stage_runs_in_the_step_and_the_package_is_restored():
    before = _attributes()
    plain, floor, ours = rs.measure_stages("tiny", 3, "mgda", reps=1, block=2, warmup=1)
    assert [r["variant"] for r in (plain, floor, ours)] == ["plain", "floor", "mgda"]
    # A stage whose function the step no longer calls (renamed or bypassed) would read 0 here.
    timed = {stage for _, _, stage in rs.PACKAGE_STAGES} | {"forward", "backward, rest"}
    assert set(ours["stages_us"]) == timed
    assert all(ours["stages_us"][stage] > 0 for stage in timed)
    assert sum(ours["stages_us"].values()) == pytest.approx(ours["step_us"], rel=1e-9)
    after = _attributes()
    assert all(a is b for a, b in zip(before, after, strict=True))


def test_the_floors_stages_are_its_marks_and_add_up_to_its_step():
    _, floor, _ = rs.measure_stages("tiny", 2, "upgrad", reps=1, block=2, warmup=1)
    stages = floor["stages_us"]
    assert set(stages) == set(rs.STAGES) - {
        "view check",
        "loss and G check",
        "gradient check",
        "backward, rest",
    }
    assert all(v > 0 for v in stages.values())
    assert sum(stages.values()) == pytest.approx(floor["step_us"], rel=1e-9)


def test_the_package_is_restored_when_the_profile_fails():
    before = _attributes()
    with pytest.raises(RuntimeError, match="inside"), rs.timing_package(rs.Stopwatch()):
        assert vars(rs.GradSurgery)["backward"] is not before[-1]
        raise RuntimeError("inside")
    assert all(a is b for a, b in zip(before, _attributes(), strict=True))


def test_tiny_run_writes_the_table(tmp_path):
    rs.main(["--sizes", "tiny", "--tasks", "2", "--reps", "1", "--block", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "stages.json").read_text())
    assert [r["variant"] for r in rows] == ["plain", "floor", "mgda"]
    text = (tmp_path / "stages.md").read_text()
    assert "| view check | — |" in text and "| **step** |" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "sum"], "'sum' is not a Gram-based method that runs 2 tasks"),
        (["--method", "main_aux", "--tasks", "1"], "'main_aux' is not a Gram-based method that runs 1 tasks"),
        (["--reps", "0"], "--reps and --block: at least 1"),
    ],
)
def test_options_it_cannot_run_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        rs.main(["--sizes", "tiny", "--tasks", "2", *argv])
    assert message in capsys.readouterr().err
