"""The exact tensor-memory counter of the sparse-memory benchmark, against byte counts worked out by hand, and
a tiny run of the benchmark."""

from __future__ import annotations

import json

import torch

from benchmarks import sparse_memory


def test_counts_new_storages_and_their_peak():
    kept = []

    def allocate():
        kept.append(torch.zeros(1000))  # 4000 bytes, kept
        a = torch.ones(500, dtype=torch.float64)  # 4000 bytes, freed when the step returns
        kept.append(a.sum())  # a 0-d float64: 8 bytes

    assert sparse_memory.counted_peak(allocate) == 4000 + 4000 + 8


def test_views_and_in_place_results_are_not_allocations():
    base = torch.randn(100, 100)

    def reuse():
        base.t().mul_(2.0)  # a view, then in place on it
        base.view(-1)[:10].add_(1.0)

    assert sparse_memory.counted_peak(reuse) == 0


def test_freed_memory_is_not_counted_twice():
    def one_after_the_other():
        for _ in range(3):
            t = torch.zeros(2500)  # 10000 bytes each time, the previous one freed by the reassignment
            del t

    assert sparse_memory.counted_peak(one_after_the_other) == 10000


def test_a_sparse_tensor_counts_its_indices_and_values():
    kept = []
    indices = torch.tensor([[0, 3, 5]])
    values = torch.ones(3, 4)

    def build():
        kept.append(torch.sparse_coo_tensor(indices, values, (10, 4)).coalesce())

    # coalesce copies: 3 int64 indices (24 bytes) and 3 × 4 float32 values (48 bytes)
    assert sparse_memory.counted_peak(build) >= 24 + 48


def test_tiny_run_writes_rows_and_report(tmp_path):
    sparse_memory.main(["--tiny", "--rows", "1000", "--tasks", "2", "--out", str(tmp_path)])
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert row["rows"] == 1000 and row["plain"] > 0 and row["activations"] > row["plain"]
    extra = (row["activations"] - row["plain"]) / 2**20
    assert f"| {extra:.3f} |" in (tmp_path / "report.md").read_text()
