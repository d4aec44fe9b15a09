"""Small seeded models for the loss-weighting, representation-mode and diagnostics tests."""

from __future__ import annotations

import io

import torch

from gradsurgery import GradSurgery


class CountBackward(torch.autograd.Function):
    """Identity whose backward counts how often it runs (one count per backward pass through it)."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        CountBackward.calls += 1
        return grad


class TwoHeads(torch.nn.Module):
    """A tanh trunk read by T linear heads; ``counted`` routes the trunk output through ``CountBackward``."""

    def __init__(self, num_tasks: int = 2, seed: int = 0, d_in: int = 4, d_hidden: int = 5) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.trunk = torch.nn.Linear(d_in, d_hidden)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(d_hidden, 1) for _ in range(num_tasks))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
        self.counted = False

    def features(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(self.trunk(x))
        return CountBackward.apply(z) if self.counted else z

    def losses(self, x: torch.Tensor, ys: torch.Tensor, z: torch.Tensor | None = None) -> list[torch.Tensor]:
        z = self.features(x) if z is None else z
        return [(head(z).squeeze(-1) - ys[i]).pow(2).mean() for i, head in enumerate(self.heads)]


def make_data(num_tasks: int = 2, steps: int = 6, batch: int = 8, seed: int = 1, d_in: int = 4):
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(steps, batch, d_in, generator=gen)
    ys = torch.randn(steps, num_tasks, batch, generator=gen) * torch.arange(1, num_tasks + 1).view(1, -1, 1)
    return xs, ys


def train(model: TwoHeads, opt: GradSurgery, xs, ys, start: int, stop: int, features: bool = False):
    """Steps start..stop−1; returns the weights each step reported."""
    reported = []
    for t in range(start, stop):
        opt.zero_grad()
        z = model.features(xs[t])
        info = opt.backward(model.losses(xs[t], ys[t], z), features=z if features else None)
        opt.step()
        reported.append(info.weights.clone())
    return reported


def roundtrip(state: dict) -> dict:
    """Through bytes, as a checkpoint file would go (and readable with weights_only=True)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_resume_bit_identical(method: str, steps: int = 6, cut: int = 3, num_tasks: int = 2, **options):
    """A run interrupted at ``cut`` (checkpoint, fresh objects, load) equals the uninterrupted run exactly."""
    xs, ys = make_data(num_tasks, steps)

    def fresh():
        model = TwoHeads(num_tasks)
        return model, GradSurgery(torch.optim.Adam(model.parameters(), lr=0.05), method=method, **options)

    model_a, opt_a = fresh()
    weights_a = train(model_a, opt_a, xs, ys, 0, steps)

    model_b, opt_b = fresh()
    weights_b = train(model_b, opt_b, xs, ys, 0, cut)
    checkpoint = roundtrip({"model": model_b.state_dict(), "opt": opt_b.state_dict()})
    model_c, opt_c = fresh()
    model_c.load_state_dict(checkpoint["model"])
    opt_c.load_state_dict(checkpoint["opt"])
    weights_b += train(model_c, opt_c, xs, ys, cut, steps)

    for t, (wa, wb) in enumerate(zip(weights_a, weights_b, strict=True)):
        assert torch.equal(wa, wb), (t, wa, wb)
    for (name, pa), pc in zip(model_a.named_parameters(), model_c.parameters(), strict=True):
        assert torch.equal(pa, pc), name
    # The weights must actually have changed over the run, or the comparison proves little.
    assert not torch.equal(weights_a[0], weights_a[-1])
    return opt_a, opt_c
