import copy
import math

import pytest
import torch
from weighting_helpers import TwoHeads, make_data

from gradsurgery import GradSurgery, make_method
from gradsurgery.methods.uncertainty import Uncertainty

S0 = [0.3, -0.5, 1.2]
LOSSES = [0.7, 2.0, 0.1]


def test_log_var_gradient_is_closed_form_and_matches_autograd():
    method = make_method("uncertainty", init_log_var=S0)
    method.bind(3)
    weights = method(torch.eye(3, dtype=torch.float64), torch.tensor(LOSSES, dtype=torch.float64))

    closed = [1 - math.exp(-s) * L for s, L in zip(S0, LOSSES, strict=True)]
    s = torch.tensor(S0, dtype=torch.float64, requires_grad=True)
    losses = torch.tensor(LOSSES, dtype=torch.float64)
    (torch.exp(-s) * losses + s).sum().backward()

    torch.testing.assert_close(
        method.pending_grad, torch.tensor(closed, dtype=torch.float64), rtol=0, atol=1e-15
    )
    torch.testing.assert_close(method.pending_grad, s.grad, rtol=0, atol=1e-15)
    torch.testing.assert_close(
        weights, torch.tensor([math.exp(-v) for v in S0], dtype=torch.float64), rtol=0, atol=1e-15
    )


def test_wrapper_applies_exp_minus_s_to_shared_and_task_specific_params():
    torch.manual_seed(0)
    model = TwoHeads(2)
    xs, ys = make_data(2, 1)
    opt = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.1), method="uncertainty", init_log_var=[0.4, -0.2]
    )
    info = opt.backward(model.losses(xs[0], ys[0]))

    w64 = torch.tensor([math.exp(-0.4), math.exp(0.2)], dtype=torch.float64)
    torch.testing.assert_close(info.weights, w64, rtol=0, atol=1e-15)
    w = w64.float()
    assert opt.method.scales_task_specific
    trunk = list(model.trunk.parameters())
    per_task = [
        torch.autograd.grad(L, list(model.parameters()), allow_unused=True, retain_graph=True)
        for L in model.losses(xs[0], ys[0])
    ]
    n_trunk = len(trunk)
    for k, p in enumerate(trunk):
        torch.testing.assert_close(p.grad, w[0] * per_task[0][k] + w[1] * per_task[1][k])
    for i, head in enumerate(model.heads):
        for k, p in enumerate(head.parameters()):
            index = n_trunk + 2 * i + k
            torch.testing.assert_close(p.grad, w[i] * per_task[i][index])


def test_sgd_step_on_log_vars_is_closed_form():
    model = TwoHeads(2)
    xs, ys = make_data(2, 1)
    opt = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.0),
        method="uncertainty",
        init_log_var=[0.1, 0.5],
        weight_optimizer="sgd",
        lr=0.3,
    )
    info = opt.backward(model.losses(xs[0], ys[0]))
    opt.step()
    L = info.losses.tolist()
    expected = [s - 0.3 * (1 - math.exp(-s) * loss) for s, loss in zip([0.1, 0.5], L, strict=True)]
    torch.testing.assert_close(
        opt.method.log_vars, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15
    )
    assert opt.method.pending_grad is None


def test_adam_trajectory_matches_torch_adam_on_the_paper_objective():
    model = TwoHeads(2)
    xs, ys = make_data(2, 5)
    opt = GradSurgery(torch.optim.Adam(model.parameters(), lr=0.05), method="uncertainty", lr=0.2)
    s_ref = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    adam_ref = torch.optim.Adam([s_ref], lr=0.2)
    for t in range(5):
        opt.zero_grad()
        info = opt.backward(model.losses(xs[t], ys[t]))
        torch.testing.assert_close(info.weights, torch.exp(-s_ref.detach()), rtol=1e-12, atol=0)
        opt.step()
        adam_ref.zero_grad()
        (torch.exp(-s_ref) * info.losses + s_ref).sum().backward()
        adam_ref.step()
    torch.testing.assert_close(opt.method.log_vars, s_ref.detach(), rtol=1e-12, atol=1e-14)
    assert not torch.equal(opt.method.log_vars, torch.zeros(2, dtype=torch.float64))


# Per step, the tasks of each backward call before the step (several: their gradients add up).
ABSENCE_STEPS = [[[0, 1, 2]], [[0, 2]], [[1]], [[0, 1], [2]], [[0, 1, 2]], [[1, 2], [0, 2]]]


@pytest.mark.parametrize("weight_optimizer", ["adam", "sgd"])
def test_tasks_absent_match_the_paper_objective_over_the_present_tasks_in_torch(weight_optimizer):
    """Steps with tasks absent against plain torch: s as one tensor stepped by torch's own optimizer, and
    per backward call the objective Σ exp(−s_i) L_i + s_i over the present tasks (an absent task has no
    term: its s_i gets gradient 0). The weights, the model's parameters and s after every step."""
    model = TwoHeads(3).double()
    twin = copy.deepcopy(model)
    xs, ys = make_data(3, len(ABSENCE_STEPS))
    xs, ys = xs.double(), ys.double()
    opt = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.1),
        method="uncertainty",
        init_log_var=S0,
        lr=0.2,
        weight_optimizer=weight_optimizer,
    )
    s_ref = torch.tensor(S0, dtype=torch.float64, requires_grad=True)
    kind = torch.optim.Adam if weight_optimizer == "adam" else torch.optim.SGD
    s_opt, model_opt = kind([s_ref], lr=0.2), torch.optim.SGD(twin.parameters(), lr=0.1)
    for t, calls in enumerate(ABSENCE_STEPS):
        opt.zero_grad()
        s_opt.zero_grad()
        model_opt.zero_grad()
        for present in calls:
            losses = model.losses(xs[t], ys[t])
            info = opt.backward([loss if i in present else None for i, loss in enumerate(losses)])
            expected = torch.exp(-s_ref.detach())
            torch.testing.assert_close(info.weights[present], expected[present], rtol=1e-14, atol=0)
            assert all(info.weights[i] == 0 for i in range(3) if i not in present)
            ref_losses = twin.losses(xs[t], ys[t])
            sum(torch.exp(-s_ref[i]) * ref_losses[i] + s_ref[i] for i in present).backward()
        before = opt.method.log_vars
        opt.step()
        s_opt.step()
        model_opt.step()
        torch.testing.assert_close(opt.method.log_vars, s_ref.detach(), rtol=1e-13, atol=1e-15)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)
        never = [i for i in range(3) if not any(i in present for present in calls)]
        if weight_optimizer == "sgd":  # a zero gradient leaves an SGD coordinate where it is
            assert torch.equal(opt.method.log_vars[never], before[never])
        elif never and t > 1:  # Adam moves it by its momentum, as torch's Adam does
            assert not torch.equal(opt.method.log_vars[never], before[never])


def test_pending_gradient_accumulates_like_grad_and_zero_grad_drops_it():
    model = TwoHeads(2)
    xs, ys = make_data(2, 3)
    opt = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.0), method="uncertainty", weight_optimizer="sgd", lr=0.5
    )
    a = opt.backward(model.losses(xs[0], ys[0]))
    b = opt.backward(model.losses(xs[1], ys[1]))
    opt.step()
    expected = -0.5 * ((1 - a.losses) + (1 - b.losses))
    torch.testing.assert_close(opt.method.log_vars, expected, rtol=0, atol=1e-15)

    before = opt.method.log_vars
    opt.backward(model.losses(xs[2], ys[2]))
    opt.zero_grad()
    opt.step()  # nothing pending: s must not move
    assert torch.equal(opt.method.log_vars, before)


def test_backward_without_step_does_not_move_log_vars():
    model = TwoHeads(2)
    xs, ys = make_data(2, 1)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="uncertainty")
    opt.backward(model.losses(xs[0], ys[0]))
    assert torch.equal(opt.method.log_vars, torch.zeros(2, dtype=torch.float64))


def test_options_are_validated():
    with pytest.raises(ValueError, match="lr"):
        Uncertainty(lr=0)
    with pytest.raises(ValueError, match="weight_optimizer"):
        Uncertainty(weight_optimizer="rmsprop")
    with pytest.raises(ValueError, match="init_log_var"):
        Uncertainty(init_log_var=float("inf"))
    method = Uncertainty(init_log_var=[0.0, 1.0])
    with pytest.raises(ValueError, match="2 entries for 3 tasks"):
        method.bind(3)
    with pytest.raises(TypeError, match="unknown option"):
        make_method("uncertainty", alpha=1.0)


def test_state_dict_rejects_a_different_optimizer_kind():
    a, b = Uncertainty(weight_optimizer="adam"), Uncertainty(weight_optimizer="sgd")
    a.bind(2)
    b.bind(2)
    with pytest.raises(ValueError, match="weight_optimizer='adam'"):
        b.load_state_dict(a.state_dict())
