"""Mixed precision: autocast (bfloat16 / float16) with a ``torch.amp.GradScaler``, on the CPU and, where
one is present, on a CUDA device (the tests parametrized by ``device``).

Reference: the same model in plain float32 without a scaler, its fused gradient written in d-space with the
two-task closed forms. The usual recipe ``backward(losses, grad_scaler=scaler)`` → ``scaler.unscale_`` →
clip → ``scaler.step`` → ``scaler.update`` must give that gradient and step, and an overflow must move
nothing.
"""

from __future__ import annotations

import math

import pytest
import torch
from references import pcgrad_dspace
from state_checks import same_state, snapshot
from torch import nn

from gradsurgery import GradSurgery, task_views


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 8)
        self.head_a = nn.Linear(8, 1)
        self.head_b = nn.Linear(8, 1)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return self.head_a(h).squeeze(1), self.head_b(h).squeeze(1), h


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


def make(device="cpu"):
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # equal heads and opposed targets: the trunk gradients conflict
        net.head_b.load_state_dict(net.head_a.state_dict())
    return net.to(device)


def data(device="cpu"):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(16, 6, generator=gen).to(device), torch.randn(16, generator=gen).to(device)


def losses_of(net, x, y, tasks=2):
    a, b, h = net(x)
    # Losses in float32 even under autocast (as the autocast docs recommend for reductions).
    losses = [(a.float() - y).pow(2).mean(), (b.float() + 2 * y).pow(2).mean()]
    if tasks == 3:  # a third task on the trunk alone (so that PCGrad's random order matters)
        losses.append((h.float() - 0.5).pow(2).mean())
    return losses


def closed_form(method: str, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    if method == "mgda":
        alpha = ((g2 - g1) @ g2 / (g1 - g2).pow(2).sum()).clamp(0, 1)
        return alpha * g1 + (1 - alpha) * g2
    # pcgrad, two tasks: each gradient loses its component along the other when they conflict.
    dot = g1 @ g2
    if dot >= 0:
        return g1 + g2
    return g1 - dot / (g2 @ g2) * g2 + g2 - dot / (g1 @ g1) * g1


def reference_grad(method: str) -> torch.Tensor:
    """The fused gradient of the float32 model, all parameters flattened (trunk, head a, head b)."""
    return reference(method)[0]


def reference(method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(fused gradient, the per-task trunk gradient norms) of the float32 model."""
    net = make()
    x, y = data()
    la, lb = losses_of(net, x, y)
    trunk = list(net.trunk.parameters())
    ga = torch.cat([g.reshape(-1) for g in torch.autograd.grad(la, trunk, retain_graph=True)])
    gb = torch.cat([g.reshape(-1) for g in torch.autograd.grad(lb, trunk, retain_graph=True)])
    assert float(ga @ gb) < 0  # the tasks conflict, so the methods differ from the plain sum
    heads = [
        torch.cat(
            [g.reshape(-1) for g in torch.autograd.grad(loss, list(head.parameters()), retain_graph=True)]
        )
        for loss, head in ((la, net.head_a), (lb, net.head_b))
    ]
    return torch.cat([closed_form(method, ga, gb)] + heads), torch.stack([ga.norm(), gb.norm()])


def flat_grad(net):
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()]).cpu()


TOL = {torch.bfloat16: 3e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["mgda", "pcgrad"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scaled_step_matches_float32_reference(dtype, method, device):
    net = make(device)
    opt = GradSurgery(torch.optim.SGD(net.parameters(), lr=0.1), method)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12)
    x, y = data(device)
    before = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).cpu()
    opt.zero_grad()
    with torch.autocast(device, dtype=dtype):
        losses = losses_of(net, x, y)
    info = opt.backward(losses, grad_scaler=scaler)
    assert not info.overflow
    expected, norms = reference(method)
    # .grad holds the scaled fused gradient, as GradScaler expects ...
    torch.testing.assert_close(flat_grad(net) / 2.0**12, expected, rtol=TOL[dtype], atol=TOL[dtype] * 0.1)
    scaler.unscale_(opt)
    # ... and unscale_ turns it into the fused gradient of the true losses.
    torch.testing.assert_close(flat_grad(net), expected, rtol=TOL[dtype], atol=TOL[dtype] * 0.1)
    # The info describes the true (unscaled) task gradients.
    torch.testing.assert_close(info.grad_norms.float().cpu(), norms, rtol=TOL[dtype], atol=0)
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1e9)  # clipping works between the two calls
    assert math.isfinite(float(norm))
    scaler.step(opt)
    scaler.update()
    after = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).cpu()
    torch.testing.assert_close(after, before - 0.1 * expected, rtol=TOL[dtype], atol=TOL[dtype] * 0.01)
    assert scaler.get_scale() == 2.0**12  # no overflow: the scale did not back off


@pytest.mark.parametrize("method", ["pcgrad", "gradvac"])
def test_overflow_moves_nothing_and_keeps_method_state(method):
    net = make()
    opt = GradSurgery(torch.optim.Adam(net.parameters(), lr=0.1), method, seed=5)
    # float16 overflows at 65504: a 2⁴⁰ scale overflows the first backward for sure; the back-off then
    # brings the scale to 2¹⁰ at once.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-30)
    x, y = data()
    params = [p.detach().clone() for p in net.parameters()]
    gen_state = opt.method.generator.get_state()
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        losses = losses_of(net, x, y, tasks=3)
    info = opt.backward(losses, grad_scaler=scaler)
    assert info.overflow and torch.isnan(info.weights).all() and info.weights.shape == (3,)
    assert all(torch.isinf(p.grad).all() for p in net.parameters())
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), params, strict=True))
    assert len(opt.state) == 0  # Adam never stepped
    assert torch.equal(opt.method.generator.get_state(), gen_state)  # the method's RNG did not advance
    assert opt.method.num_tasks is None  # the failed first call did not even bind the task count
    assert scaler.get_scale() == 2.0**10

    # The next step goes through, and (PCGrad) matches the float32 d-space reference with the same orders.
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        losses = losses_of(net, x, y, tasks=3)
    info = opt.backward(losses, grad_scaler=scaler)
    assert not info.overflow and torch.isfinite(info.weights).all()
    assert not torch.equal(opt.method.generator.get_state(), gen_state)
    if method == "gradvac":
        assert not torch.equal(opt.method.targets, torch.zeros(3, 3, dtype=torch.float64))
    scaler.unscale_(opt)
    if method == "pcgrad":
        gen = torch.Generator().manual_seed(5)
        orders = [
            [others[k] for k in torch.randperm(2, generator=gen).tolist()]
            for others in ([1, 2], [0, 2], [0, 1])
        ]
        ref = make()
        trunk = list(ref.trunk.parameters())
        task_grads = [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, trunk, retain_graph=True)])
            for loss in losses_of(ref, x, y, tasks=3)
        ]
        got = torch.cat([p.grad.reshape(-1) for p in net.trunk.parameters()])
        torch.testing.assert_close(got, pcgrad_dspace(torch.stack(task_grads), orders), rtol=3e-3, atol=3e-4)
    scaler.step(opt)
    scaler.update()
    assert not all(torch.equal(p, q) for p, q in zip(net.parameters(), params, strict=True))


def test_disabled_scaler_is_plain_float32():
    net_a, net_b = make(), make()
    opt_a = GradSurgery(torch.optim.SGD(net_a.parameters(), lr=0.1), "mgda")
    opt_b = GradSurgery(torch.optim.SGD(net_b.parameters(), lr=0.1), "mgda")
    x, y = data()
    opt_a.backward(losses_of(net_a, x, y), grad_scaler=torch.amp.GradScaler("cpu", enabled=False))
    opt_b.backward(losses_of(net_b, x, y))
    assert torch.equal(flat_grad(net_a), flat_grad(net_b))
    torch.testing.assert_close(flat_grad(net_a), reference_grad("mgda"), rtol=1e-5, atol=1e-7)


def test_accumulated_overflow_skips_the_whole_step():
    net = make()
    opt = GradSurgery(torch.optim.SGD(net.parameters(), lr=0.1), "mgda")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = data()
    params = [p.detach().clone() for p in net.parameters()]
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        first = losses_of(net, x[:8], y[:8])
    assert not opt.backward(first, grad_scaler=scaler).overflow
    with torch.autocast("cpu", dtype=torch.float16):
        second = losses_of(net, x[8:], y[8:])
    second[1] = second[1] * float("inf")  # a second micro-batch that overflows
    assert opt.backward(second, grad_scaler=scaler).overflow
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), params, strict=True))
    assert scaler.get_scale() == 2.0**7


@pytest.mark.parametrize("method", ["famo", "rlw"])
def test_single_backward_loss_weighting_under_the_scaler(method):
    # Methods with needs_gram = False take one backward of Σ w_i L_i: the scaler scales that loss.
    net = make()
    opt = GradSurgery(
        torch.optim.SGD(net.parameters(), lr=0.1), method, **({"seed": 2} if method == "rlw" else {})
    )
    x, y = data()
    opt.method.bind(2)  # the state to compare with is that of the bound method
    state = snapshot(opt.method.state_dict()) if method == "famo" else None
    gen_state = opt.method.generator.get_state() if method == "rlw" else None

    # A forced overflow first: nothing moves and the method's state is restored.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-30)
    params = [p.detach().clone() for p in net.parameters()]
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        losses = losses_of(net, x, y)
    info = opt.backward(losses, grad_scaler=scaler)
    assert info.overflow and torch.isnan(info.weights).all()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), params, strict=True))
    if method == "rlw":
        assert torch.equal(opt.method.generator.get_state(), gen_state)
    else:
        assert same_state(opt.method.state_dict(), state)

    # Then a real step: .grad / s is Σ w_i g_i with the step's weights and the float32 task gradients.
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        losses = losses_of(net, x, y)
    info = opt.backward(losses, grad_scaler=scaler)
    assert not info.overflow
    ref = make()
    la, lb = losses_of(ref, x, y)
    w = info.weights.float()
    expected = torch.cat(
        [g.reshape(-1) for g in torch.autograd.grad(w[0] * la + w[1] * lb, list(ref.parameters()))]
    )
    torch.testing.assert_close(flat_grad(net) / scaler.get_scale(), expected, rtol=3e-3, atol=3e-4)


# -- representation mode under the scaler --------------------------------------------------------------------


class InfGradient(torch.autograd.Function):
    """The identity forward, an inf backward: a trunk whose gradient overflows from a finite u_z."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, math.inf)


def representation(net, x, y, layout, dtype=None, overflow_in_trunk=False):
    """The two losses and the ``features=`` argument: the heads on z (one pass), on task views (one pass) or
    on a node both read (T + 1 passes)."""
    with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        pre = net.trunk(x)
        h = torch.tanh(InfGradient.apply(pre) if overflow_in_trunk else pre)
        features = task_views(h, 2) if layout == "views" else h
        if layout == "views":
            inputs = list(features)
        else:
            inputs = [h * 1.0] * 2 if layout == "shared" else [h, h]
        a, b = net.head_a(inputs[0]).squeeze(1), net.head_b(inputs[1]).squeeze(1)
    return [(a.float() - y).pow(2).mean(), (b.float() + 2 * y).pow(2).mean()], features


# A Gram-based method, a loss weighting without G_z (one backward of Σ w_i L_i) and with it, a generator.
REPRESENTATION_METHODS = {
    "mgda": ("mgda", {}),
    "uncertainty": ("uncertainty", {}),
    "uncertainty G_z": ("uncertainty", {"diagnostics": True}),
    "pcgrad": ("pcgrad", {"seed": 5}),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["z", "views", "shared"])
@pytest.mark.parametrize("method", sorted(REPRESENTATION_METHODS))
def test_representation_mode_under_the_scaler_writes_s_times_the_unscaled_step(method, layout, device):
    """With a power-of-two scale the scaled passes are exact: every ``.grad`` is s times that of the run
    without a scaler, bit for bit, and ``scaler.step`` takes the same steps (three, a learned method's
    weights included)."""
    method, options = REPRESENTATION_METHODS[method]
    plain_net, net = make(device), make(device)
    plain = GradSurgery(torch.optim.SGD(plain_net.parameters(), lr=0.1), method, **options)
    opt = GradSurgery(torch.optim.SGD(net.parameters(), lr=0.1), method, **options)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    x, y = data(device)
    for _ in range(3):
        plain.zero_grad()
        losses, features = representation(plain_net, x, y, layout)
        plain.backward(losses, features=features)
        opt.zero_grad()
        losses, features = representation(net, x, y, layout)
        info = opt.backward(losses, features=features, grad_scaler=scaler)
        assert not info.overflow and info.mode == "representation"
        assert torch.equal(flat_grad(net), flat_grad(plain_net) * 2.0**10)
        plain.step()
        scaler.step(opt)
        scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), plain_net.parameters(), strict=True))


def against_float32(
    layout: str, dtype: torch.dtype, init_scale: float, factor: float = 1.0, device="cpu", method="mgda"
):
    """Representation mode (``mgda``, or ``method``) on the losses times ``factor``: the float32 step without
    a scaler on the CPU and the step on ``device`` under ``dtype`` autocast with a GradScaler, its ``.grad``
    unscaled. Returns both nets."""
    plain_net, net = make(), make(device)
    plain = GradSurgery(torch.optim.SGD(plain_net.parameters(), lr=0.1), method)
    opt = GradSurgery(torch.optim.SGD(net.parameters(), lr=0.1), method)
    scaler = torch.amp.GradScaler(device, init_scale=init_scale)
    x, y = data()
    losses, features = representation(plain_net, x, y, layout)
    plain.backward([factor * loss for loss in losses], features=features)
    x, y = data(device)
    losses, features = representation(net, x, y, layout, dtype)
    assert not opt.backward(
        [factor * loss for loss in losses], features=features, grad_scaler=scaler
    ).overflow
    scaler.unscale_(opt)
    return plain_net, net


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["mgda", "uncertainty"])
@pytest.mark.parametrize("layout", ["z", "views", "shared"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_representation_mode_under_autocast_and_the_scaler_matches_float32(dtype, layout, method, device):
    plain_net, net = against_float32(layout, dtype, 2.0**12, device=device, method=method)
    torch.testing.assert_close(flat_grad(net), flat_grad(plain_net), rtol=TOL[dtype], atol=TOL[dtype] * 0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["pcgrad", "uncertainty"])
@pytest.mark.parametrize("where", ["features", "trunk"])
@pytest.mark.parametrize("layout", ["z", "views", "shared"])
def test_representation_mode_overflow_moves_nothing_and_keeps_method_state(layout, where, method, device):
    """An overflow in the gradients with respect to the features (a 2⁴⁰ scale in float16), or in the
    trunk's pass from a finite u_z: every ``.grad`` inf, ``scaler.step`` skips, the scale backs off, and the
    method's state (``pcgrad``'s generator; ``uncertainty``, by one backward of Σ w_i L_i, its learned
    log-variances) has not moved."""
    net = make(device)
    options = {"seed": 5} if method == "pcgrad" else {}
    opt = GradSurgery(torch.optim.SGD(net.parameters(), lr=0.1), method, **options)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**40 if where == "features" else 2.0**4)
    x, y = data(device)
    params = [p.detach().clone() for p in net.parameters()]
    opt.method.bind(2)
    state = snapshot(opt.method.state_dict())
    opt.zero_grad()
    losses, features = representation(
        net, x, y, layout, torch.float16 if where == "features" else None, overflow_in_trunk=where == "trunk"
    )
    info = opt.backward(losses, features=features, grad_scaler=scaler)
    assert info.overflow and torch.isnan(info.weights).all()
    assert all(torch.isinf(p.grad).all() for p in net.parameters())
    assert same_state(opt.method.state_dict(), state)
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), params, strict=True))
    assert scaler.get_scale() < (2.0**40 if where == "features" else 2.0**4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["z", "views", "shared"])
def test_representation_mode_scales_the_trunk_seed_before_float16(layout, device):
    """Losses 10⁻⁶ as large: the fused gradient at the float16 features lies around float16's smallest
    subnormals; scaled before its cast to float16, the trunk still receives it to float16 accuracy."""
    plain_net, net = against_float32(layout, torch.float16, 2.0**24, factor=1e-6, device=device)
    expected = plain_net.trunk.weight.grad
    torch.testing.assert_close(
        net.trunk.weight.grad.cpu(), expected, rtol=3e-3, atol=3e-3 * float(expected.abs().max())
    )
