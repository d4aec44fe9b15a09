"""The finiteness checks of the gradients: ``all_finite`` (the single-backward source's, representation
mode's) against ``torch.isfinite(x).all()`` on every float dtype, sizes around the vector widths, NaN/inf
anywhere, sparse, complex and empty gradients, and the error it raises in a step; ``check_finite``'s check of
the task-specific gradients (the task it names, no overflow of large finite gradients). Both first sum each
tensor and read again, for its extremes, only a tensor whose sum is not finite."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradsurgery import GradSurgery, sources
from gradsurgery.sources import NonFiniteError, all_finite, check_finite, extremes

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64]
# A CUDA device screens with Σ|x| over a list of tensors at once, the CPU with Σ x per tensor.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [1, 7, 8, 9, 31, 64, 1000, 65537])
@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_isfinite_all(dtype, size, bad, device):
    gen = torch.Generator().manual_seed(size)
    for position in sorted({0, size // 2, size - 1}):
        x = torch.randn(size, generator=gen).to(dtype)
        if bad is not None:
            x[position] = complex(bad, 0.0) if dtype.is_complex else bad
        x = x.to(device)
        expected = bool(torch.isfinite(x).all())
        assert expected == (bad is None)
        assert all_finite([x]) is expected
        # among finite tensors of other dtypes and shapes, and as a strided view
        others = [torch.ones(3, 4), torch.zeros(2, dtype=torch.float64), torch.zeros(0)]
        others = [t.to(device) for t in others]
        assert all_finite([*others, x, *others]) is expected
        assert all_finite([torch.stack([x, x]).T]) is expected


@pytest.mark.parametrize("device", DEVICES)
def test_an_imaginary_part_counts(device):
    x = torch.zeros(5, dtype=torch.complex128)
    x[3] = complex(1.0, math.inf)
    assert not all_finite([x.to(device)])


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_gradients_are_judged_by_their_stored_values(device):
    def sparse(index, values):
        return torch.sparse_coo_tensor(index.to(device), values.to(device), (5,), check_invariants=True)

    index = torch.tensor([[0, 3]])
    assert all_finite([sparse(index, torch.tensor([1.0, -2.0]))])
    assert not all_finite([sparse(index, torch.tensor([1.0, math.nan]))])
    assert all_finite([sparse(torch.zeros(1, 0, dtype=torch.long), torch.zeros(0))])


def test_nothing_to_check_is_finite():
    assert all_finite([])
    assert all_finite([torch.zeros(0), torch.zeros(3, 0)])


@pytest.mark.parametrize("device", DEVICES)
def test_a_large_finite_tensor_is_not_mistaken_for_an_overflow(device):
    x = torch.full((1000,), torch.finfo(torch.float32).max, device=device)
    assert all_finite([x, -x])


@pytest.mark.parametrize("bad", [None, math.nan, math.inf])
@pytest.mark.parametrize("device", DEVICES)
def test_only_a_tensor_whose_sum_is_not_finite_is_read_again(monkeypatch, bad, device):
    """The exact check (the extremes) runs on the tensors whose sum failed, and decides them."""
    read_again = []

    def spy(grad):
        read_again.append(grad)
        return extremes(grad)

    monkeypatch.setattr(sources, "extremes", spy)
    big = torch.full((10,), torch.finfo(torch.float32).max, device=device)  # finite, its sum overflows
    other = torch.ones(5, device=device)
    if bad is not None:
        other[2] = bad
    assert all_finite([torch.ones(3, device=device), big, other]) is (bad is None)
    assert [id(g) for g in read_again] == [id(big)] + ([] if bad is None else [id(other)])
    read_again.clear()
    half = torch.full((1000,), 60000.0, dtype=torch.float16, device=device)  # its sum beyond float16's range
    alike = [torch.ones(3, device=device), torch.zeros(0, device=device), -torch.ones(7, dtype=torch.float64)]
    assert all_finite([*alike, half])
    assert [id(g) for g in read_again] == [id(half)]
    read_again.clear()
    wide = torch.full((1000,), 60000.0, dtype=torch.bfloat16, device=device)  # float32's range
    assert all_finite([wide])
    assert read_again == []


@needs_cuda
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_gradients_on_two_devices_are_screened_on_each(bad):
    """One screen per device; a NaN or inf is found on either, and ``check_finite`` names its task."""
    on_cpu = [torch.ones(4), torch.randn(300, dtype=torch.float64)]
    on_cuda = [torch.randn(5000, device="cuda"), torch.ones(7, dtype=torch.bfloat16, device="cuda")]
    assert all_finite(on_cpu + on_cuda)
    values = torch.tensor([1.0, 2.0], device="cuda")
    gram = torch.eye(2, device="cuda")
    check_finite(values, gram, [(0, on_cpu[1]), (1, on_cuda[0])])  # nothing raised
    for grads in (on_cpu, on_cuda):
        spoiled = grads[1].clone()
        spoiled[-1] = bad
        assert not all_finite([*on_cpu, *on_cuda, spoiled])
        with pytest.raises(NonFiniteError, match=r"gradient for task\(s\) \[1\]"):
            check_finite(values, gram, [(0, on_cpu[0]), (0, on_cuda[1]), (1, spoiled)])


def test_an_inf_in_the_summed_gradient_stops_the_step_and_writes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 300), nn.Tanh(), nn.Linear(300, 2))
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "rlw")
    x = torch.randn(8, 64)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = [p.detach().clone() for p in model.parameters()]
    out = model(x)
    entry = model[0].weight.reshape(-1)[12345]
    spike = torch.sqrt(
        entry - entry.detach()
    )  # 0, with an infinite derivative: one inf in a 19200-entry grad
    losses = [out[:, 0].pow(2).mean() + spike, out[:, 1].pow(2).mean()]
    with pytest.raises(NonFiniteError, match="non-finite \\(NaN/inf\\) gradient of the weighted loss"):
        opt.backward(losses)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b) and torch.equal(p.grad, torch.full_like(p, 0.5))


def test_check_finite_names_the_task_whose_own_gradient_is_not_finite():
    values = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    gram = torch.eye(3, dtype=torch.float64)
    finite = [(0, torch.ones(4)), (1, torch.ones(2, dtype=torch.float16)), (2, torch.zeros(0))]
    check_finite(values, gram, finite)  # nothing raised
    for bad in (math.nan, math.inf, -math.inf):
        grads = [*finite, (2, torch.tensor([0.5, bad, 0.5]))]
        with pytest.raises(NonFiniteError, match=r"gradient for task\(s\) \[2\]"):
            check_finite(values, gram, grads)


def test_check_finite_takes_no_large_finite_gradient_for_an_overflow():
    """The check runs in the Gram dtype (here float32); a float64 gradient beyond float32's range, or one
    whose squares would overflow float64, is still finite."""
    values = torch.tensor([1.0, 2.0])
    gram = torch.eye(2)
    check_finite(values, gram, [(0, torch.tensor([1e300, -1e300], dtype=torch.float64)), (1, torch.ones(1))])
    # entries whose sum overflows their own dtype
    big = torch.finfo(torch.float32).max
    check_finite(values, gram, [(0, torch.tensor([big, big])), (1, torch.tensor([-big, -big, 1.0]))])
    with pytest.raises(NonFiniteError, match=r"gradient for task\(s\) \[1\]"):
        check_finite(values, gram, [(0, torch.tensor([big, big])), (1, torch.tensor([-big, math.nan]))])
