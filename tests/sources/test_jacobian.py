"""Gradient collection: shared detection, the reused Jacobian buffer, layout changes; the task-specific
gradients' scaling by the weights."""

import pytest
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
    # diagnostics=True: the per-task passes of this source, not one backward of the weighted loss
    opt = GradSurgery(
        torch.optim.SGD(params, lr=0.1), "uncertainty", init_log_var=[0.3, -0.7], diagnostics=True
    )
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


# -- complex parameters ------------------------------------------------------------------------------------


class ComplexTasks(nn.Module):
    """Three tasks over a complex and a real shared tensor, each with a complex head of its own; with
    ``as_pairs`` the complex tensors are stored as real (…, 2) pairs (``torch.view_as_complex`` in the
    forward), the real parameterisation of the same model. ``reach_shared`` lists the tasks that read the
    complex shared tensor (the layout changes when it does)."""

    def __init__(self, as_pairs: bool, real_first: bool = False):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.as_pairs = as_pairs
        z = torch.randn(5, 2, generator=gen, dtype=torch.float64)
        r = torch.randn(3, generator=gen, dtype=torch.float64)
        if real_first:  # registered first, so its 3 columns put the complex tensor's at an odd offset
            self.r = nn.Parameter(r)
        self.z = self._complex(z)
        if not real_first:
            self.r = nn.Parameter(r)
        self.heads = nn.ParameterList(
            [self._complex(torch.randn(5, 2, generator=gen, dtype=torch.float64)) for _ in range(3)]
        )
        self.targets = torch.view_as_complex(torch.randn(3, 5, 2, generator=gen, dtype=torch.float64))
        self.reach_shared = [0, 1, 2]

    def _complex(self, pairs: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(pairs if self.as_pairs else torch.view_as_complex(pairs).clone())

    def _read(self, p: torch.Tensor) -> torch.Tensor:
        return torch.view_as_complex(p) if self.as_pairs else p

    def forward(self) -> list[torch.Tensor]:
        losses = []
        for i, head in enumerate(self.heads):
            z = self._read(self.z) if i in self.reach_shared else torch.ones(5, dtype=torch.complex128)
            out = (z + self.r.sum()) * self._read(head)
            losses.append((out - self.targets[i]).abs().pow(2).sum() + (i + 1) * (self.r**2).sum())
        return losses


@pytest.mark.parametrize("real_first", [False, True])
def test_complex_parameters_are_read_as_real_pairs(real_first):
    """G = Re⟨g_i, g_j⟩ and every step, through a change of layout (the complex tensor shared, then reached by
    one task, then shared again), are those of the same model held as real pairs (its gradient autograd's,
    view_as_real of the complex one)."""
    complex_model = ComplexTasks(as_pairs=False, real_first=real_first)
    pairs_model = ComplexTasks(as_pairs=True, real_first=real_first)
    opts = [
        GradSurgery(torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.5), method="mgda")
        for m in (complex_model, pairs_model)
    ]
    for reach in ([0, 1, 2], [1], [0, 2]):
        infos = []
        for model, opt in zip((complex_model, pairs_model), opts, strict=True):
            model.reach_shared = reach
            opt.zero_grad()
            infos.append(opt.backward(model()))
            opt.step()
        torch.testing.assert_close(infos[0].gram, infos[1].gram, rtol=1e-14, atol=1e-12)
        torch.testing.assert_close(infos[0].weights, infos[1].weights, rtol=1e-10, atol=1e-12)
        for p, q in zip(complex_model.parameters(), pairs_model.parameters(), strict=True):
            torch.testing.assert_close(torch.view_as_real(p.detach()) if p.is_complex() else p, q.detach())
    # G itself against Re(J Jᴴ) of autograd's gradients on the shared tensors
    complex_model.reach_shared = [0, 1, 2]
    losses = complex_model()
    rows = [
        torch.cat(
            [
                g.reshape(-1)
                for g in torch.autograd.grad(loss, [complex_model.z, complex_model.r], retain_graph=True)
            ]
        )
        for loss in losses
    ]
    jac = torch.stack(rows)
    expected = (jac @ jac.conj().T).real
    torch.testing.assert_close(opts[0].backward(complex_model()).gram, expected, rtol=1e-13, atol=1e-12)
