"""Shared scaffolding for the per-method tests: random Gram problems and end-to-end runs through GradSurgery
on losses linear in the parameters, so every task gradient is known exactly (row i of ``a`` on the shared
parameters, ``b[i]`` on head i). Nothing here computes a method's weights: the tests bring their references.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from references import LinearTasks

from gradsurgery import GradSurgery


def random_jacobian(seed: int, num_tasks: int, dim: int, conflict: bool = True) -> np.ndarray:
    """T×d gradients with uneven norms; with ``conflict`` task 1 points partly against task 0."""
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(num_tasks, dim)) * rng.lognormal(sigma=1.0, size=(num_tasks, 1))
    if conflict and num_tasks > 1:
        jac[1] = -0.6 * jac[0] + 0.4 * jac[1]
    return jac


def make_linear_problem(seed: int, num_tasks: int = 3, conflict: bool = True):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(num_tasks, 8, generator=gen, dtype=torch.float64)
    if conflict:
        a[1] = -0.5 * a[0] + 0.3 * a[1]
    b = torch.randn(num_tasks, 4, generator=gen, dtype=torch.float64)
    torch.manual_seed(seed)
    return LinearTasks(a, b), a, b


def shared_grad(model: LinearTasks) -> torch.Tensor:
    return torch.cat([model.theta.grad.reshape(-1), model.bias.grad])


def one_step(method: str, seed: int = 0, num_tasks: int = 3, conflict: bool = True, **options):
    """One backward on the linear problem; returns (model, a, b, info)."""
    model, a, b = make_linear_problem(seed, num_tasks, conflict)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method=method, **options)
    info = opt.backward(model())
    return model, a, b, info


def make_mlp(init: int, method: str, num_tasks: int = 3, **options):
    """A small tanh MLP (initialised from seed ``init``) with one output per task and a GradSurgery around
    Adam; a method with a ``seed`` option gets ``init`` unless given one."""
    from torch import nn

    from gradsurgery import METHODS

    torch.manual_seed(init)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, num_tasks))
    if "seed" in METHODS[method].option_names():
        options.setdefault("seed", init)
    return net, GradSurgery(torch.optim.Adam(net.parameters(), lr=0.02), method, **options)


def train_mlp(net, opt, steps: int, start: int, num_losses: int | None = None):
    """``steps`` steps on batches seeded ``start``, ``start + 1``, …; three conflicting losses (their sum
    when ``num_losses == 1``). Returns the StepInfo of each step."""
    infos = []
    for k in range(start, start + steps):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(k))
        out = net(x)
        losses = [
            out[:, 0].pow(2).mean(),
            (out[:, 1] - out[:, 0] - 1).pow(2).mean(),
            (out[:, 2] + 2 * out[:, 0]).abs().mean(),
        ]
        opt.zero_grad()
        infos.append(opt.backward([sum(losses)] if num_losses == 1 else losses))
        opt.step()
    return infos


def check_resume_is_bit_identical(method: str, num_losses: int | None = None, **options) -> None:
    """Train, checkpoint through torch.save/torch.load(weights_only=True), train on; a fresh model and
    optimizer (another initialisation, another seed, another global RNG state) resumed from the checkpoint
    must match the uninterrupted run exactly, weights and parameters."""
    net, opt = make_mlp(0, method, **options)
    train_mlp(net, opt, 3, 0, num_losses)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, buffer)
    uninterrupted = train_mlp(net, opt, 4, 3, num_losses)
    fresh_options = dict(options)
    if fresh_options.get("seed") is not None:
        fresh_options["seed"] += 1  # the checkpoint's generator state must replace the seed's
    fresh_net, fresh_opt = make_mlp(1, method, **fresh_options)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh_net.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["optimizer"])
    torch.manual_seed(123)
    resumed = train_mlp(fresh_net, fresh_opt, 4, 3, num_losses)
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert torch.equal(a.weights, b.weights)
    for p, q in zip(net.parameters(), fresh_net.parameters(), strict=True):
        assert torch.equal(p, q)


def registered(num_tasks: int, seed: int = 0) -> list[tuple[str, dict]]:
    """Every registered method that runs ``num_tasks`` tasks, with its example options (``seed`` for the
    methods that have one), by name."""
    from gradsurgery import METHODS

    out = []
    for name, cls in sorted(METHODS.items()):
        if cls.min_tasks <= num_tasks and (cls.max_tasks is None or num_tasks <= cls.max_tasks):
            options = dict(cls.example_options(num_tasks))
            if "seed" in cls.option_names():
                options["seed"] = seed
            out.append((name, options))
    return out
