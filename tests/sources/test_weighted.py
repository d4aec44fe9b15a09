"""The single-backward source (``Method.needs_gram = False``): one backward pass of Σ w_i L_i gives every
parameter what the per-task path gives a loss weighting, with no Jacobian and no Gram matrix."""

from __future__ import annotations

import pytest
import torch
from method_checks import make_linear_problem
from weighting_helpers import CountBackward, TwoHeads, make_data

from gradsurgery import GradSurgery
from gradsurgery.methods.rlw import RLW


class RLWPerTask(RLW):
    """The same random weights through the per-task path (T backward passes, G formed): the reference."""

    needs_gram = True


def fused_grads(method, model, losses_of):
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method=method)
    info = opt.backward(losses_of(model))
    return info, [None if p.grad is None else p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_backward_equals_the_per_task_path(seed):
    xs, ys = make_data(3, 1, seed=seed)
    losses_of = lambda m: m.losses(xs[0], ys[0])  # noqa: E731
    info, weighted = fused_grads(RLW(seed=seed), TwoHeads(3, seed=seed), losses_of)
    ref_info, per_task = fused_grads(RLWPerTask(seed=seed), TwoHeads(3, seed=seed), losses_of)
    assert info.source == "weighted" and info.gram is None
    assert ref_info.source == "jacobian" and ref_info.gram is not None
    assert torch.equal(info.weights, ref_info.weights)
    for a, b in zip(weighted, per_task, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_one_backward_pass_through_the_trunk():
    xs, ys = make_data(3, 1)
    model = TwoHeads(3)
    model.counted = True
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="rlw", seed=0)
    CountBackward.calls = 0
    opt.backward(model.losses(xs[0], ys[0]))
    assert CountBackward.calls == 1


def test_losses_that_reach_no_parameter_are_refused():
    model, _, _ = make_linear_problem(0)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="rlw", seed=0)
    stray = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="reach none"):
        opt.backward([stray.sum(), stray.pow(2).sum()])
    assert all(p.grad is None for p in model.parameters())
