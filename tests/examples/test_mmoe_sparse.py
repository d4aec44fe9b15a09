"""``examples/mmoe_sparse.py``: MMoE over sparse tables with MGDA / Nash-MTL; the run resumed from the
half-way checkpoint is bit-identical to the uninterrupted run (in this process and in a fresh one)."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load():
    spec = importlib.util.spec_from_file_location("mmoe_sparse", ROOT / "examples" / "mmoe_sparse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", ["mgda", "nash_mtl"])
def test_resumed_run_equals_the_uninterrupted_one(example, method, tmp_path):
    ckpt = tmp_path / "half.pt"
    whole = example.train(method, steps=10, checkpoint=ckpt)
    assert whole["source"] == "activations"  # the exact source that holds sparse table gradients
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 5 and "gradsurgery" in saved["optimizer"]
    resumed = example.train(method, steps=10, resume=ckpt)
    assert sorted(resumed["losses"]) == list(range(5, 10))
    for step in range(5, 10):
        assert resumed["losses"][step] == whole["losses"][step]
        assert resumed["weights"][step] == whole["weights"][step]
    assert whole["model"].keys() == resumed["model"].keys()
    for name, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    # the run trained: the tables moved, only on the rows the batches touched
    fresh = example.build(method, 0)[0].state_dict()
    moved = (whole["model"]["tables.0.weight"] != fresh["tables.0.weight"]).any(1)
    assert 0 < int(moved.sum()) < moved.numel() // 2


@pytest.mark.slow
def test_resume_in_a_fresh_process(example, tmp_path):
    ckpt = tmp_path / "half.pt"
    whole = example.train("mgda", steps=8, checkpoint=ckpt)
    script = ROOT / "examples" / "mmoe_sparse.py"
    out = subprocess.run(
        [sys.executable, str(script), "--steps", "8", "--resume", str(ckpt)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        check=True,
    ).stdout
    assert f"last losses: {whole['losses'][7]}" in out, out


def test_a_checkpoint_of_another_method_is_refused(example, tmp_path):
    ckpt = tmp_path / "half.pt"
    example.train("mgda", steps=2, checkpoint=ckpt)
    with pytest.raises(ValueError, match="'mgda', not 'nash_mtl'"):
        example.train("nash_mtl", steps=2, resume=ckpt)
