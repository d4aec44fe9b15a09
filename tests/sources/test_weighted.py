"""The single-backward source (``Method.needs_gram = False``): one backward pass of Σ w_i L_i gives every
parameter what the per-task path gives a loss weighting, with no Jacobian and no Gram matrix."""

from __future__ import annotations

import pytest
import torch
from method_checks import make_linear_problem, registered
from weighting_helpers import CountBackward, TwoHeads, make_data, roundtrip, train

from gradsurgery import METHODS, GradSurgery
from gradsurgery.methods.base import LossValueWeighting

#: Every registered method whose weights come from the loss values alone.
LOSS_VALUE_WEIGHTINGS = sorted(n for n, cls in METHODS.items() if issubclass(cls, LossValueWeighting))


def test_the_loss_value_weightings_are_registered():
    assert set(LOSS_VALUE_WEIGHTINGS) == {"sum", "dwa", "uncertainty", "rlw", "famo"}


@pytest.mark.parametrize("name", LOSS_VALUE_WEIGHTINGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_backward_equals_the_per_task_path(name, seed):
    """Five steps of one backward of Σ w_i L_i against five of the per-task path (``diagnostics=True``: T
    backward passes, J and G formed), each on its own copy of the model: the same weights, gradients and
    parameters at every step, so the method's state evolves alike; one backward through the trunk instead
    of T, and no G."""
    num_tasks = 3
    xs, ys = make_data(num_tasks, 5, seed=seed)
    options = dict(registered(num_tasks, seed))[name]  # a seed for the methods that draw
    runs = []
    for diagnostics in (False, True):
        model = TwoHeads(num_tasks, seed=seed)
        model.counted = True
        opt = GradSurgery(
            torch.optim.SGD(model.parameters(), lr=0.1), name, diagnostics=diagnostics, **options
        )
        steps = []
        for x, y in zip(xs, ys, strict=True):
            opt.zero_grad()
            CountBackward.calls = 0
            info = opt.backward(model.losses(x, y))
            steps.append((info, CountBackward.calls, [p.grad.clone() for p in model.parameters()]))
            opt.step()
        runs.append((steps, [p.detach().clone() for p in model.parameters()]))
    (weighted, weighted_params), (per_task, per_task_params) = runs
    for (info, calls, grads), (ref_info, ref_calls, ref_grads) in zip(weighted, per_task, strict=True):
        assert (info.source, calls, info.gram) == ("weighted", 1, None)
        assert ref_info.source == "jacobian" and ref_calls == num_tasks and ref_info.gram is not None
        torch.testing.assert_close(info.weights, ref_info.weights, rtol=1e-6, atol=1e-9)
        for a, b in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(weighted_params, per_task_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if name != "sum":  # the weights moved off their start, so the state was exercised
        assert len(set(weighted[-1][0].weights.tolist())) == num_tasks


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


@pytest.mark.parametrize("name", LOSS_VALUE_WEIGHTINGS)
def test_a_checkpoint_resumes_under_the_other_diagnostics(name):
    """``diagnostics`` chooses the passes, not the state: a run checkpointed with the T passes goes on with
    one, as the uninterrupted run with the T passes goes on (to the rounding of the order of summation)."""
    num_tasks = 3
    xs, ys = make_data(num_tasks, 6)
    options = dict(registered(num_tasks))[name]

    def fresh(diagnostics):
        model = TwoHeads(num_tasks)
        opt = GradSurgery(
            torch.optim.Adam(model.parameters(), lr=0.05), name, diagnostics=diagnostics, **options
        )
        return model, opt

    model_a, opt_a = fresh(True)
    weights_a = train(model_a, opt_a, xs, ys, 0, 6)
    model_b, opt_b = fresh(True)
    train(model_b, opt_b, xs, ys, 0, 3)
    saved = roundtrip({"model": model_b.state_dict(), "opt": opt_b.state_dict()})
    model_c, opt_c = fresh(False)
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    weights_c = train(model_c, opt_c, xs, ys, 3, 6)
    for a, c in zip(weights_a[3:], weights_c, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-9)
    for a, c in zip(model_a.parameters(), model_c.parameters(), strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    if name != "sum":  # the resumed state was in use
        assert not torch.equal(weights_a[3], weights_a[-1])
