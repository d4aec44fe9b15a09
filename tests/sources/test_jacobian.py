"""Gradient collection: shared detection, the reused Jacobian buffer, layout changes."""

import torch

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
