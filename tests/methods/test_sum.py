"""Fixed weights: the gradient of the weighted loss Σ_i w_i L_i, by one backward pass unless the Gram
diagnostics are asked for."""

from __future__ import annotations

import pytest
import torch
from method_checks import make_linear_problem
from weighting_helpers import CountBackward, TwoHeads, make_data

from gradsurgery import GradSurgery


@pytest.mark.parametrize("weights", [None, [0.3, 2.0, 1.0], {"b": 2.0, "a": 0.3, "c": 1.0}])
@pytest.mark.parametrize("diagnostics", [False, True])
def test_the_gradient_of_the_weighted_loss(weights, diagnostics):
    xs, ys = make_data(3, 1)
    model, reference = TwoHeads(3), TwoHeads(3)
    model.counted = True
    opt = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.1), "sum", weights=weights, diagnostics=diagnostics
    )
    losses = model.losses(xs[0], ys[0])
    CountBackward.calls = 0
    info = opt.backward(dict(zip("abc", losses, strict=True)) if isinstance(weights, dict) else losses)
    w = torch.tensor([0.3, 2.0, 1.0] if weights is not None else [1.0, 1.0, 1.0])
    (w * torch.stack(reference.losses(xs[0], ys[0]))).sum().backward()  # what a user writes by hand
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(info.weights, w.double())
    assert CountBackward.calls == (3 if diagnostics else 1)  # one backward through the trunk per task, or one
    assert (info.gram is not None) == diagnostics and info.source == (
        "jacobian" if diagnostics else "weighted"
    )


def test_bad_options():
    model, _, _ = make_linear_problem(0)
    with pytest.raises(TypeError, match="diagnostics must be a bool"):
        GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "sum", diagnostics="yes")
    with pytest.raises(ValueError, match="weights has 2 entries for 3 tasks"):
        GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "sum", weights=[1.0, 2.0]).backward(model())
