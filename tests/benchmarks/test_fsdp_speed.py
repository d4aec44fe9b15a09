"""The FSDP2 speed benchmark runs end to end on 2 gloo ranks and writes a table whose ratios are its own
timings divided by the plain step's (checked against the median of the per-repetition ratios it saved)."""

from __future__ import annotations

import json

import pytest
from torch_support import FSDP2_ON_CPU, FSDP2_ON_CPU_REASON

from benchmarks import fsdp_speed

pytestmark = [pytest.mark.distributed, pytest.mark.skipif(not FSDP2_ON_CPU, reason=FSDP2_ON_CPU_REASON)]


def test_writes_rows_and_report(tmp_path):
    fsdp_speed.main(
        [
            "--size",
            "tiny",
            "--tasks",
            "2",
            "--methods",
            "mgda",
            "--reps",
            "3",
            "--inner-steps",
            "1",
            "--out",
            str(tmp_path),
            "--representation",
        ]
    )
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {(r["num_tasks"], r["variant"]) for r in rows} == {(2, "plain"), (2, "mgda"), (2, "mgda z")}
    plain = next(r for r in rows if r["variant"] == "plain")
    assert plain["ratio"] == 1.0 and plain["ms"] > 0
    mgda = next(r for r in rows if r["variant"] == "mgda")
    assert mgda["ratio_p25"] <= mgda["ratio"] <= mgda["ratio_p75"]
    report = (tmp_path / "report.md").read_text()
    assert (
        f"| 2 | {plain['ms']:.1f} | {mgda['ratio']:.2f} ({mgda['ratio_p25']:.2f}-{mgda['ratio_p75']:.2f}) |"
        in report
    )
