"""The activation-memory benchmark runs its variants on a tiny encoder and writes a table that reads its own
rows (the budget variants are checked for exactness in tests/sources/test_activation_engine.py)."""

from __future__ import annotations

import json

import pytest

from benchmarks import activation_memory


@pytest.mark.slow
def test_tiny_run_writes_rows_and_report(tmp_path):
    activation_memory.main(
        [
            "--tiny",
            "--workloads",
            "transformer",
            "--budgets",
            "1",
            "--reps",
            "2",
            "--memory-repeats",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["variant"] for r in rows] == ["plain", "jacobian", "activations", "activations@1"]
    assert rows[0]["ratio"] == 1.0
    text = (tmp_path / "report.md").read_text()
    budget = rows[3]
    assert f"| transformer | activations@1 | {budget['ratio']:.2f} ({budget['ratio_p25']:.2f}-" in text
