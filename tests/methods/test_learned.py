"""The learned T-vector (``methods/_learned.py``, the weights of uncertainty, GradNorm and FAMO): its steps
are torch.optim's, bit for bit, whether they go through ``optimizer.step()`` or the functional kernel on the
optimizer's state, through a checkpoint too; ``snapshot``/``restore`` give back everything a step changes."""

from __future__ import annotations

import copy

import pytest
import torch

from gradsurgery.methods._learned import LearnedVector

CASES = [("adam", 0.0), ("adam", 1e-3), ("sgd", 0.0), ("sgd", 1e-2)]


def reference(kind: str, init: torch.Tensor, lr: float, weight_decay: float):
    param = init.clone().requires_grad_(True)
    cls = torch.optim.Adam if kind == "adam" else torch.optim.SGD
    return param, cls([param], lr=lr, weight_decay=weight_decay)


@pytest.mark.parametrize("kind,weight_decay", CASES)
def test_steps_are_torch_optims_bit_for_bit(kind, weight_decay):
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(5, dtype=torch.float64, generator=gen)
    vector = LearnedVector(init, kind, 0.03, weight_decay=weight_decay)
    param, optimizer = reference(kind, init, 0.03, weight_decay)
    for step in range(40):
        grads = [torch.randn(5, dtype=torch.float64, generator=gen) for _ in range(2)]
        for g in grads:  # two backward calls per step add up, as .grad does
            vector.accumulate(g)
        param.grad = grads[0] + grads[1]
        assert vector.step()
        optimizer.step()
        assert torch.equal(vector.value, param.detach()), step
        if step == 20:  # through a checkpoint: the kernel then reads the loaded state
            saved = copy.deepcopy(vector.state_dict())
            vector = LearnedVector(torch.zeros(5, dtype=torch.float64), kind, 0.03, weight_decay=weight_decay)
            vector.load_state_dict(saved)
    ours, theirs = vector.optimizer.state_dict(), optimizer.state_dict()
    assert ours["param_groups"] == theirs["param_groups"] and ours["state"].keys() == theirs["state"].keys()
    for key, value in theirs["state"].get(0, {}).items():
        assert torch.equal(ours["state"][0][key], value), key
    assert not vector.step()  # nothing pending: nothing moves


@pytest.mark.parametrize("kind,weight_decay", CASES)
@pytest.mark.parametrize("steps_before", [0, 3])
def test_restore_gives_back_the_state_a_step_changed(kind, weight_decay, steps_before):
    gen = torch.Generator().manual_seed(4)
    vector = LearnedVector(torch.randn(4, dtype=torch.float64, generator=gen), kind, 0.1, weight_decay)
    for _ in range(steps_before):
        vector.accumulate(torch.randn(4, dtype=torch.float64, generator=gen))
        vector.step()
    vector.accumulate(torch.randn(4, dtype=torch.float64, generator=gen))
    before = copy.deepcopy(vector.state_dict())
    snapshot = vector.snapshot()
    vector.accumulate(torch.randn(4, dtype=torch.float64, generator=gen))
    vector.step()
    vector.accumulate(torch.randn(4, dtype=torch.float64, generator=gen))
    vector.restore(snapshot)
    after = vector.state_dict()
    assert torch.equal(after["value"], before["value"]) and torch.equal(after["pending"], before["pending"])
    assert after["optimizer"]["state"].keys() == before["optimizer"]["state"].keys()
    for key, value in before["optimizer"]["state"].get(0, {}).items():
        assert torch.equal(after["optimizer"]["state"][0][key], value), key
