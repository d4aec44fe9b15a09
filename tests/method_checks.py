"""Shared scaffolding for the per-method tests: random Gram problems and end-to-end runs through GradSurgery
on losses linear in the parameters, so every task gradient is known exactly (row i of ``a`` on the shared
parameters, ``b[i]`` on head i). Nothing here computes a method's weights: the tests bring their references.
"""

from __future__ import annotations

import copy
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


def check_resume_is_bit_identical(method: str, **options) -> None:
    """Train, checkpoint through torch.save/torch.load(weights_only=True), train on: the resumed run must
    match the uninterrupted one exactly."""

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            opt.backward([loss * loss + 0.1 for loss in model()])  # nonlinear, positive: G and losses move
            opt.step()

    model, _, _ = make_linear_problem(7)
    opt = GradSurgery(torch.optim.Adam(model.parameters(), lr=0.01), method=method, **options)
    train(model, opt, 3)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(copy.deepcopy(opt.state_dict()), buffer)
    train(model, opt, 4)

    torch.manual_seed(123)  # the resumed run must not depend on the global RNG
    fresh, _, _ = make_linear_problem(7)
    fresh.load_state_dict(saved_model)
    fresh_opt = GradSurgery(torch.optim.Adam(fresh.parameters(), lr=0.01), method=method, **options)
    buffer.seek(0)
    fresh_opt.load_state_dict(torch.load(buffer, weights_only=True))
    train(fresh, fresh_opt, 4)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
