"""Checkpoints: the wrapped optimizer's state plus one ``"gradsurgery"`` entry, readable with
``torch.load(weights_only=True)``; incompatible state dicts are refused before anything changes. (That every
method resumes bit-identically is a contract property: ``tests/methods/test_contract.py``; version-1
checkpoints: ``test_checkpoint_version_1.py``.)"""

from __future__ import annotations

import io

import pytest
import torch
from method_checks import make_mlp, train_mlp
from state_checks import same_state

from gradsurgery import METHODS

NUM_TASKS = 3


def make(seed: int, method: str, **extra):
    return make_mlp(seed, method, NUM_TASKS, **dict(METHODS[method].example_options(NUM_TASKS), **extra))


def train(net, opt, steps, start):
    return train_mlp(net, opt, steps, start, 1 if opt.method.max_tasks == 1 else None)


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def only_tensors_and_primitives(obj) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, str | int) and only_tensors_and_primitives(v) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return all(only_tensors_and_primitives(v) for v in obj)
    return obj is None or isinstance(obj, bool | int | float | str | torch.Tensor)


def test_state_dict_layout():
    net, opt = make(0, "gradvac", beta=0.2)
    train(net, opt, 2, 0)
    sd = opt.state_dict()
    inner = opt.optimizer.state_dict()
    assert set(sd) == set(inner) | {"gradsurgery"}
    ours = sd["gradsurgery"]
    assert ours["version"] == 2 and ours["method"] == "gradvac" and ours["num_tasks"] == NUM_TASKS
    assert ours["options"] == {"beta": 0.2, "seed": 0}
    assert torch.equal(ours["rng_state"]["generator"], opt.method.generator.get_state())
    assert torch.equal(ours["method_state"]["targets"], opt.method.targets)
    assert "generator" not in ours["method_state"]  # each generator is saved once, under rng_state
    assert only_tensors_and_primitives(sd)
    loaded = roundtrip(sd)  # weights_only=True
    assert torch.equal(loaded["gradsurgery"]["method_state"]["targets"], opt.method.targets)


def test_load_keeps_param_groups_and_state_objects():
    net, opt = make(0, "mgda")
    train(net, opt, 2, 0)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    sd = roundtrip(opt.state_dict())
    groups, state = opt.param_groups, opt.state
    opt.load_state_dict(sd)
    train(net, opt, 1, 5)
    # Refilled in place: the wrapper, the inner optimizer and any holder of the old objects agree.
    assert opt.param_groups is groups is opt.optimizer.param_groups
    assert opt.state is state is opt.optimizer.state
    scheduler.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_plain_optimizer_state_dict_restores_the_optimizer_only():
    net, opt = make(0, "pcgrad")
    train(net, opt, 2, 0)
    gen_state = opt.method.generator.get_state()
    bare = torch.optim.Adam(net.parameters(), lr=0.5)
    opt.load_state_dict(bare.state_dict())
    assert opt.param_groups[0]["lr"] == 0.5
    assert torch.equal(opt.method.generator.get_state(), gen_state)


def snapshot(opt):
    sd = opt.state_dict()
    return roundtrip(sd)


@pytest.mark.parametrize("case", ["method", "tasks", "options", "version", "malformed"])
def test_incompatible_state_dict_is_refused_and_nothing_changes(case):
    net, trained = make(0, "gradvac")
    train(net, trained, 2, 0)
    saved, target = trained.state_dict(), trained
    if case == "method":
        other_net, other = make(0, "mgda")
        train(other_net, other, 1, 0)
        saved, match = other.state_dict(), "state dict is for method 'mgda', this optimizer uses 'gradvac'"
    elif case == "tasks":
        target = make(0, "gradvac")[1]
        target.method.bind(2)
        match = "state dict is for 3 tasks, this optimizer has 2"
    elif case == "options":
        target = make(0, "gradvac", beta=0.5)[1]
        match = r"different 'gradvac' options \(beta: saved 0.01 vs 0.5\)"
    elif case == "version":
        saved["gradsurgery"]["version"] = 99
        match = "unsupported gradsurgery state version 99"
    else:
        saved["gradsurgery"]["rng_state"] = {"generator": torch.zeros(3, dtype=torch.uint8)}
        match = "malformed gradsurgery method state for 'gradvac'"
    saved["param_groups"][0]["lr"] = 123.0  # a partial load would show here
    before = snapshot(target)
    method_before = (target.method.num_tasks, target.method.generator.get_state())
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(saved)
    assert same_state(snapshot(target), before)
    assert target.method.num_tasks == method_before[0]
    assert torch.equal(target.method.generator.get_state(), method_before[1])


# -- torch.distributed.checkpoint ----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process: what this test runs
@pytest.mark.parametrize("method", ["famo", "gradnorm", "rlw"])
def test_distributed_checkpoint_with_the_method_entry_resumes_bit_for_bit(method, tmp_path):
    """``torch.distributed.checkpoint`` keeps an optimizer's ``state`` and ``param_groups`` only: the model
    and optimizer through ``get_state_dict``/``dcp.save``/``dcp.load``/``set_state_dict``, the method's entry
    beside them (``method_state_dict``), resumes as the run that never stopped. Without the entry FAMO's and
    GradNorm's learned weights restart, and RLW's generator draws the first steps' weights again."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    straight_net, straight = make(0, method)
    train(straight_net, straight, 4, 0)
    net, opt = make(0, method)
    train(net, opt, 2, 0)
    model_sd, optim_sd = get_state_dict(net, opt)
    assert "gradsurgery" not in optim_sd
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))
    torch.save(opt.method_state_dict(), tmp_path / "gradsurgery.pt")

    def resumed(with_entry: bool) -> list[torch.Tensor]:
        net, opt = make(0, method)
        model_sd, optim_sd = get_state_dict(net, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(tmp_path))
        set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if with_entry:
            opt.load_method_state_dict(torch.load(tmp_path / "gradsurgery.pt", weights_only=True))
        train(net, opt, 2, 2)
        return [p.detach() for p in net.parameters()]

    expected = [p.detach() for p in straight_net.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(resumed(True), expected, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(resumed(False), expected, strict=True))


def test_a_method_entry_is_refused_as_the_state_dict_refuses_it():
    net, opt = make(0, "gradvac")
    train(net, opt, 2, 0)
    other_net, other = make(0, "mgda")
    train(other_net, other, 1, 0)
    before = snapshot(opt)
    with pytest.raises(ValueError, match="state dict is for method 'mgda', this optimizer uses 'gradvac'"):
        opt.load_method_state_dict(other.method_state_dict())
    with pytest.raises(TypeError, match="entry must be a dict"):
        opt.load_method_state_dict(opt.state_dict()["gradsurgery"]["method_state"]["targets"])
    assert same_state(snapshot(opt), before)
    assert opt.method_state_dict().keys() == opt.state_dict()["gradsurgery"].keys()
