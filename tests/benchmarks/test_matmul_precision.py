"""The matmul-precision benchmark on tiny Jacobians and a tiny step: the package's G and Jᵀw within float32
rounding of float64 products under both settings, and a report that carries its rows."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import matmul_precision


@pytest.mark.slow
def test_tiny_run_writes_rows_and_report(tmp_path):
    matmul_precision.main(["--tiny", "--reps", "2", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "rows.json").read_text())
    products = [r for r in rows if r["part"] == "products"]
    assert [r["setting"] for r in products] == ["highest", "medium"] * 3
    for r in products:
        assert r["gram_package"] < 1e-6 and r["fused_package"] < 1e-6
    assert [r["case"] for r in rows if r["part"] == "steps"] == ["jacobian", "activations"]
    text = (tmp_path / "report.md").read_text()
    last = products[-1]
    assert f"| {last['case']} | medium | {last['gram_package']:.1e} | {last['gram_setting']:.1e} |" in text
    assert torch.get_float32_matmul_precision() == "highest"
