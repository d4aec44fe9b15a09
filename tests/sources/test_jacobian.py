"""Gradient collection: shared detection, the reused Jacobian buffer, layout changes; the task-specific
gradients' scaling by the weights."""

import torch
from torch import nn

from gradsurgery import GradSurgery
from gradsurgery.sources.jacobian import GradientCollector


def test_shared_detection_and_rows():
    shared = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    own0 = torch.nn.Parameter(torch.tensor([1.0]))
    own1 = torch.nn.Parameter(torch.tensor([2.0, 2.0]))
    unused = torch.nn.Parameter(torch.tensor([5.0]))
    params = [own0, shared, unused, own1]
    col = GradientCollector()
    losses = [
        (shared * torch.tensor([1.0, 2.0, 3.0])).sum() + 4 * own0.sum(),
        shared.sum() * 5 + (own1**2).sum(),
    ]
    got = col.collect(losses, params)
    assert [params[k] is shared for k in got.layout.shared] == [True]
    torch.testing.assert_close(got.jacobian, torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    assert [len(e) for e in got.other] == [1, 0, 0, 1]
    torch.testing.assert_close(got.other[0][0][1], torch.tensor([4.0]))
    assert got.other[3][0][0] == 1
    torch.testing.assert_close(got.other[3][0][1], torch.tensor([4.0, 4.0]))
    assert got.reached == [2, 2]


def test_buffer_is_reused_between_steps():
    w = torch.nn.Parameter(torch.randn(50))
    col = GradientCollector()
    first = col.collect([(w**2).sum(), w.sum()], [w]).jacobian
    ptr = first.data_ptr()
    second = col.collect([(3 * w).sum(), w.sum()], [w]).jacobian
    assert second.data_ptr() == ptr
    torch.testing.assert_close(second[0], torch.full((50,), 3.0))


def test_task_not_reaching_a_shared_parameter_gets_a_zero_row():
    a = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    b = torch.nn.Parameter(torch.tensor([2.0]))
    col = GradientCollector()
    losses = lambda: [a.sum() + b.sum(), 2 * a.sum() + b.sum(), 3 * b.sum()]  # noqa: E731
    col.collect(losses(), [a, b])
    got = col.collect(losses(), [a, b])  # second call: the cached layout path
    torch.testing.assert_close(
        got.jacobian, torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 1.0], [0.0, 0.0, 3.0]])
    )


def test_override_makes_a_single_task_parameter_shared():
    a = torch.nn.Parameter(torch.tensor([1.0]))
    b = torch.nn.Parameter(torch.tensor([1.0]))
    col = GradientCollector(shared_params=[a])
    got = col.collect([2 * a.sum(), 3 * b.sum()], [a, b])
    torch.testing.assert_close(got.jacobian, torch.tensor([[2.0], [0.0]]))
    assert got.other[1] == [(1, got.other[1][0][1])]


def test_half_precision_task_specific_gradients_are_scaled_with_one_rounding():
    """A loss weighting gives a task's own parameters w_i g_i: for a bfloat16 g, the float64 product rounded
    to bfloat16 (but for double-rounding ties), not g times w_i already rounded to bfloat16."""
    torch.manual_seed(0)
    trunk = nn.Linear(8, 16).to(torch.bfloat16)
    heads = [nn.Linear(16, 64).to(torch.bfloat16) for _ in range(2)]
    params = [*trunk.parameters(), *heads[0].parameters(), *heads[1].parameters()]
    opt = GradSurgery(torch.optim.SGD(params, lr=0.1), "uncertainty", init_log_var=[0.3, -0.7])
    z = trunk(torch.randn(32, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16))
    losses = [head(z).float().pow(2).mean() for head in heads]
    own = [
        torch.autograd.grad(loss, head.weight, retain_graph=True)[0]
        for loss, head in zip(losses, heads, strict=True)
    ]
    info = opt.backward(losses)
    assert len(set(info.weights.tolist())) == 2
    for head, grad, weight in zip(heads, own, info.weights.tolist(), strict=True):
        want = (grad.double() * weight).to(torch.bfloat16)
        assert float((head.weight.grad == want).double().mean()) >= 0.999
