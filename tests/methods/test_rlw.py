"""RLW: softmax of seeded normal draws, applied as loss weights with a single backward pass."""

from __future__ import annotations

import math

import pytest
import torch
from method_checks import make_linear_problem, shared_grad

from gradsurgery import GradSurgery
from gradsurgery.methods.rlw import RLW


def reference_draws(seed: int, num_tasks: int, steps: int) -> list[list[float]]:
    """exp(ε_i)/Σ_j exp(ε_j) with ε from a generator seeded alike, written out in plain Python."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        eps = torch.randn(num_tasks, generator=gen, dtype=torch.float64).tolist()
        total = sum(math.exp(e) for e in eps)
        out.append([math.exp(e) / total for e in eps])
    return out


def test_weights_are_softmax_of_seeded_normals():
    method = RLW(seed=3)
    losses = torch.ones(4, dtype=torch.float64)
    for expected in reference_draws(3, 4, 5):
        torch.testing.assert_close(method(None, losses), torch.tensor(expected, dtype=torch.float64))


def test_distribution_properties():
    method = RLW(seed=0)
    draws = torch.stack([method(None, torch.ones(3, dtype=torch.float64)) for _ in range(4000)])
    assert torch.all(draws > 0)
    torch.testing.assert_close(draws.sum(1), torch.ones(4000, dtype=torch.float64))
    # E[λ_i] = 1/T by symmetry; 4000 draws give a standard error near 0.004.
    assert torch.all((draws.mean(0) - 1 / 3).abs() < 0.02)


def test_end_to_end_single_backward_scales_heads():
    model, a, b = make_linear_problem(1)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="rlw", seed=9)
    info = opt.backward(model())
    w = torch.tensor(reference_draws(9, 3, 1)[0], dtype=torch.float64)
    torch.testing.assert_close(info.weights, w)
    torch.testing.assert_close(shared_grad(model), w @ a)
    for i in range(3):  # a loss weighting: the heads get w_i b_i
        torch.testing.assert_close(model.heads[i].grad, w[i] * b[i])
    assert info.gram is None and info.source == "weighted"  # no per-task gradients were taken


def test_seed_none_follows_the_global_rng():
    torch.manual_seed(5)
    first = RLW()(None, torch.ones(3, dtype=torch.float64))
    torch.manual_seed(5)
    again = RLW()(None, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(first, again)


def test_bad_seed():
    with pytest.raises(TypeError, match="seed must be an int or None"):
        RLW(seed=1.5)
