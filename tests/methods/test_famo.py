"""FAMO against a re-implementation of the paper's update with torch.optim.Adam and autograd, and the
single-backward path of GradSurgery that FAMO and RLW take (``Method.needs_gram = False``)."""

from __future__ import annotations

import math

import pytest
import torch
from method_checks import make_linear_problem, shared_grad
from state_checks import same_state, snapshot

from gradsurgery import GradSurgery
from gradsurgery.methods.famo import FAMO


class ReferenceFAMO:
    """Logits ξ learned by torch's Adam from ∂softmax(ξ)ᵀδ (autograd), δ = log L_prev − log L_now."""

    def __init__(self, num_tasks: int, lr: float, weight_decay: float):
        self.logits = torch.zeros(num_tasks, dtype=torch.float64, requires_grad=True)
        self.opt = torch.optim.Adam([self.logits], lr=lr, weight_decay=weight_decay)
        self.prev = None

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            delta = (self.prev + 1e-8).log() - (losses + 1e-8).log()
            (grad,) = torch.autograd.grad(torch.softmax(self.logits, 0), self.logits, grad_outputs=delta)
            self.opt.zero_grad()
            self.logits.grad = grad
            self.opt.step()
        self.prev = losses.clone()
        z = torch.softmax(self.logits.detach(), 0)
        # the gradient of Σ z_i log L_i / c with c = Σ z_i / L_i, as coefficients of ∇L_i
        return (z / (losses + 1e-8)) / (z / (losses + 1e-8)).sum()


LOSS_SEQUENCE = [
    [2.0, 1.0, 0.5],
    [1.5, 0.99, 0.45],
    [1.0, 0.98, 0.30],
    [0.7, 0.97, 0.29],
    [0.5, 0.96, 0.20],
    [0.45, 0.95, 0.21],
]


@pytest.mark.parametrize("lr,weight_decay", [(0.025, 1e-3), (0.3, 0.0), (0.1, 0.05)])
def test_matches_reference_update(lr, weight_decay):
    method = FAMO(lr=lr, weight_decay=weight_decay)
    reference = ReferenceFAMO(3, lr, weight_decay)
    for losses in LOSS_SEQUENCE:
        losses = torch.tensor(losses, dtype=torch.float64)
        torch.testing.assert_close(method(None, losses), reference.weights(losses))
    torch.testing.assert_close(method.logits, reference.logits.detach())


# (losses, the tasks present): task 1 absent, back, task 0 absent twice, all, two absent.
ABSENT_SEQUENCE = [
    ([2.0, 1.0, 0.5], [0, 1, 2]),
    ([1.5, None, 0.45], [0, 2]),
    ([1.0, 0.98, 0.30], [0, 1, 2]),
    ([None, 0.97, 0.29], [1, 2]),
    ([None, 0.96, 0.20], [1, 2]),
    ([0.45, 0.95, 0.21], [0, 1, 2]),
    ([0.40, None, None], [0]),
    ([0.38, 0.90, 0.19], [0, 1, 2]),
]


def test_tasks_absent_match_the_objective_over_the_tasks_seen_twice_in_torch():
    """Steps with tasks absent against autograd on Σ_{i∈S} softmax(ξ_S)_i δ_i (S: the tasks present at this
    call and the last) stepped by torch's Adam, the weights from softmax over the present tasks' logits."""
    method = FAMO(lr=0.2, weight_decay=0.01)
    method.bind(3)
    logits = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([logits], lr=0.2, weight_decay=0.01)
    prev: dict[int, float] = {}
    for values, present in ABSENT_SEQUENCE:
        losses = torch.tensor([values[i] for i in present], dtype=torch.float64)
        got = method.weights_of(present, None, losses)
        seen = [i for i in present if i in prev]
        if seen:
            delta = [math.log(prev[i] + 1e-8) - math.log(values[i] + 1e-8) for i in seen]
            grad_outputs = torch.tensor(delta, dtype=torch.float64)
            (grad,) = torch.autograd.grad(torch.softmax(logits[seen], 0), logits, grad_outputs=grad_outputs)
            adam.zero_grad()
            logits.grad = grad
            adam.step()
        prev = {i: values[i] for i in present}
        z = torch.softmax(logits.detach()[present], 0)
        expected = (z / (losses + 1e-8)) / (z / (losses + 1e-8)).sum()
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=0)
        torch.testing.assert_close(method.logits, logits.detach(), rtol=1e-13, atol=1e-15)
        assert torch.isnan(method.prev_losses).tolist() == [i not in present for i in range(3)]


def test_the_slowest_task_gains_weight():
    method = FAMO(lr=0.2, weight_decay=0.0)
    for losses in LOSS_SEQUENCE:
        method(None, torch.tensor(losses, dtype=torch.float64))
    z = torch.softmax(method.logits, 0)
    assert int(z.argmax()) == 1  # task 1 barely moves (0.99 → 0.95), the others halve


def test_first_step_weights_are_inverse_losses():
    w = FAMO()(None, torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64) / 7, rtol=1e-7, atol=0)


def test_end_to_end_single_backward():
    model, a, b = make_linear_problem(3)
    params = list(model.parameters())
    opt = GradSurgery(torch.optim.SGD(params, lr=0.01), method="famo")
    reference = ReferenceFAMO(3, 0.025, 1e-3)
    for _ in range(3):
        opt.zero_grad()
        losses = [loss.exp() for loss in model()]  # positive losses; g_i = L_i a_i on the shared part
        info = opt.backward(losses)
        values = torch.stack([loss.detach() for loss in losses])
        w = reference.weights(values)
        torch.testing.assert_close(info.weights, w)
        torch.testing.assert_close(shared_grad(model), (w * values) @ a)
        for i in range(3):
            torch.testing.assert_close(model.heads[i].grad, w[i] * values[i] * b[i])
        opt.step()
    assert info.gram is None and info.source == "weighted"
    assert torch.isnan(info.grad_norms).all() and torch.isnan(info.cosines).all()
    assert info.as_dict()["weight/0"] == pytest.approx(float(w[0]))


def test_negative_loss_is_refused_and_changes_nothing():
    model, _, _ = make_linear_problem(0)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="famo")
    opt.backward([loss.exp() for loss in model()])
    state = snapshot(opt.method.state_dict())
    losses = model()
    losses = [losses[0].exp(), losses[1].exp(), losses[2].exp() - 1e6]
    with pytest.raises(ValueError, match=r"non-negative losses .* task\(s\) \[2\]"):
        opt.backward(losses)
    assert same_state(opt.method.state_dict(), state)


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"lr": 0.0}, ValueError, "lr must be a finite number > 0, got 0.0"),
        ({"lr": float("inf")}, ValueError, "lr must be a finite number"),
        ({"weight_decay": -1e-3}, ValueError, "weight_decay must be a finite number >= 0"),
        ({"lr": "fast"}, TypeError, "lr must be a number"),
    ],
)
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        FAMO(**options)


def test_state_dict_shape_mismatch_is_refused():
    method = FAMO()
    method.bind(3)
    state = method.state_dict()
    state["logits"]["value"] = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"shape \(2,\), expected \(3,\)"):
        method.load_state_dict(state)
    version_1 = {
        "logits": torch.zeros(3, dtype=torch.float64),
        "exp_avg": torch.zeros(2, dtype=torch.float64),
        "exp_avg_sq": torch.zeros(3, dtype=torch.float64),
        "adam_steps": 1,
        "prev_losses": None,
    }
    with pytest.raises(ValueError, match=r"shape \(2,\), expected \(3,\)"):
        method.load_state_dict(version_1)
