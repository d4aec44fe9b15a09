"""The Lightning and Accelerate examples run and train (skipped where those optional packages are absent:
they are not gradsurgery dependencies; ``pip install lightning accelerate`` to run these)."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_lightning_example_trains_and_resumes(tmp_path):
    pytest.importorskip("lightning")
    example = load("lightning_example")
    torch.manual_seed(0)  # main's seed: the untrained net it starts from, whatever ran before in this process
    start = example.evaluate(example.TwoTaskNet(), example.toy_data())
    results = example.main(workdir=str(tmp_path))
    for name in ("ManualGradSurgery", "HookGradSurgery"):
        assert all(after < 0.7 * before for after, before in zip(results[name], start, strict=True)), results
    # The resumed run went on from the checkpoint: better than where the saved run stopped.
    assert sum(results["resumed"]) < sum(results["HookGradSurgery"])


@pytest.mark.slow
def test_accelerate_example_trains_with_accumulation():
    pytest.importorskip("accelerate")
    example = load("accelerate_example")
    torch.manual_seed(0)
    with torch.no_grad():
        start = example.task_losses(example.TwoTaskNet(), *example.toy_data().tensors)
    after = example.main(epochs=2)
    assert all(a < 0.9 * float(b) for a, b in zip(after, start, strict=True)), (after, start)
