"""End-to-end tests of GradSurgery on models whose task gradients are known exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from method_checks import make_linear_problem
from references import brute_force_qp, gradvac_dspace, pcgrad_dspace, random_orders

from gradsurgery import GradSurgery

T = 3


def reference_weights(method: str, gram: np.ndarray, options: dict) -> np.ndarray:
    t = gram.shape[0]
    if method == "sum":
        return np.asarray(options.get("weights") or [1.0] * t)
    if method == "mgda":
        return brute_force_qp(gram, list(range(t)), [0.0] * t)
    if method == "pareto":
        return brute_force_qp(gram, list(range(t)), options["min_weights"])
    if method == "main_aux":
        lower = [0.0] * t
        return brute_force_qp(gram, [options.get("main", 0)], lower)
    if method == "mixed":
        return brute_force_qp(gram, list(options["main"]), [0.0] * t)
    raise AssertionError(method)


QP_CASES = [
    ("sum", {}),
    ("sum", {"weights": [0.5, 2.0, 1.0]}),
    ("mgda", {}),
    ("mgda", {"solver": "cvxpy"}),
    ("pareto", {"min_weights": [0.2, 0.3, 0.1]}),
    ("pareto", {"min_weights": [0.2, 0.3, 0.1], "solver": "frank_wolfe"}),
    ("main_aux", {"main": 1}),
    ("main_aux", {"main": 2, "solver": "cvxpy"}),
    ("mixed", {"main": [0, 2]}),
    ("mixed", {"main": [1], "solver": "frank_wolfe"}),
]


@pytest.mark.parametrize("method,options", QP_CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_gradient_matches_reference(method, options, seed):
    model, a, b = make_linear_problem(seed)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method=method, **options)
    info = opt.backward(model())
    w_ref = reference_weights(method, (a @ a.T).numpy(), options)
    expected = torch.from_numpy(w_ref) @ a
    got = torch.cat([model.theta.grad.reshape(-1), model.bias.grad])
    scale = max(float(expected.norm()), float(a.norm(dim=1).max()))
    assert float((got - expected).norm()) <= 1e-6 * scale
    # info.weights reproduce the fused gradient on the shared parameters
    assert torch.allclose(info.weights.to(a.dtype) @ a, got, atol=1e-9 * scale)
    # task-specific parameters get their own task's plain gradient, unscaled; for the fixed weights of
    # "sum" (the weighted loss Σ w_i L_i) w_i times it
    for i in range(T):
        scale_i = float(w_ref[i]) if opt.method.scales_task_specific else 1.0
        torch.testing.assert_close(model.heads[i].grad, scale_i * b[i])


@pytest.mark.parametrize("seed", [0, 3])
def test_pcgrad_matches_dspace_algorithm(seed):
    model, a, _ = make_linear_problem(seed, num_tasks=4)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="pcgrad", seed=seed)
    opt.backward(model())
    expected = pcgrad_dspace(a, random_orders(4, seed))
    torch.testing.assert_close(torch.cat([model.theta.grad.reshape(-1), model.bias.grad]), expected)


@pytest.mark.parametrize("num_tasks", [3, 6])
def test_gradvac_matches_dspace_over_steps_and_equals_pcgrad_first(num_tasks):
    model, a, _ = make_linear_problem(5, num_tasks=num_tasks)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.0), method="gradvac", beta=0.3, seed=11)
    pc_model, _, _ = make_linear_problem(5, num_tasks=num_tasks)
    pc = GradSurgery(torch.optim.SGD(pc_model.parameters(), lr=0.0), method="pcgrad", seed=11)
    pc.backward(pc_model())
    gen = torch.Generator().manual_seed(11)
    targets = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
    for step in range(6):
        opt.zero_grad()
        opt.backward(model())
        orders = []
        for i in range(num_tasks):
            others = [j for j in range(num_tasks) if j != i]
            orders.append([others[k] for k in torch.randperm(num_tasks - 1, generator=gen).tolist()])
        expected, targets = gradvac_dspace(a, orders, targets, beta=0.3)
        got = torch.cat([model.theta.grad.reshape(-1), model.bias.grad])
        torch.testing.assert_close(got, expected)
        if step == 0:
            torch.testing.assert_close(got, torch.cat([pc_model.theta.grad.reshape(-1), pc_model.bias.grad]))
    torch.testing.assert_close(opt.method.targets, targets)


def test_gradvac_with_tasks_absent_runs_on_the_present_pairs_and_keeps_the_others_targets():
    """Steps with tasks absent against the d-space algorithm on the present gradients alone (a random
    order of the present tasks, their pairs' targets): the fused gradient and the targets each step, where
    a pair with an absent task keeps its value."""
    num_tasks = 4
    model, a, _ = make_linear_problem(7, num_tasks=num_tasks)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.0), method="gradvac", beta=0.3, seed=5)
    gen = torch.Generator().manual_seed(5)
    targets = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
    for present in ([0, 1, 2, 3], [0, 2, 3], [1, 3], [0, 1, 2, 3], [0, 1, 2], [2, 3]):
        opt.zero_grad()
        losses = model()
        before = opt.method.targets.clone() if opt.method.targets is not None else targets.clone()
        opt.backward([loss if i in present else None for i, loss in enumerate(losses)])
        orders = []
        for i in range(len(present)):
            others = [j for j in range(len(present)) if j != i]
            orders.append([others[k] for k in torch.randperm(len(others), generator=gen).tolist()])
        block = targets[present][:, present]
        expected, block = gradvac_dspace(a[present], orders, block, beta=0.3)
        targets[torch.tensor(present)[:, None], torch.tensor(present)] = block
        torch.testing.assert_close(torch.cat([model.theta.grad.reshape(-1), model.bias.grad]), expected)
        torch.testing.assert_close(opt.method.targets, targets)
        absent = [i for i in range(num_tasks) if i not in present]
        assert torch.equal(opt.method.targets[absent], before[absent])
        assert torch.equal(opt.method.targets[:, absent], before[:, absent])


def test_unreached_and_frozen_parameters_keep_their_grad():
    model, _, _ = make_linear_problem(0)
    stray = torch.nn.Parameter(torch.ones(3))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    opt = GradSurgery(torch.optim.Adam([*model.parameters(), stray, frozen], lr=0.1), method="mgda")
    opt.backward(model())
    assert stray.grad is None and frozen.grad is None
    opt.step()
    assert torch.equal(stray.detach(), torch.ones(3))


def test_gradients_accumulate_like_autograd():
    model, a, b = make_linear_problem(1)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="sum")
    model.theta.grad = torch.full_like(model.theta, 0.5)
    opt.backward(model())
    opt.backward(model())
    expected = 2 * a.sum(0)[:6].reshape(2, 3) + 0.5
    torch.testing.assert_close(model.theta.grad, expected)
    torch.testing.assert_close(model.heads[0].grad, 2 * b[0])


def test_shared_params_override():
    model, a, b = make_linear_problem(2)
    # Declare head 0 shared too: it receives the fused gradient (only task 0 reaches it, so w_0 * b_0).
    shared = [model.theta, model.bias, model.heads[0]]
    opt = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.1),
        method="sum",
        weights=[2.0, 1.0, 1.0],
        shared_params=shared,
    )
    opt.backward(model())
    torch.testing.assert_close(model.heads[0].grad, 2.0 * b[0])
    torch.testing.assert_close(model.heads[1].grad, b[1])


def test_layout_change_between_steps():
    """A parameter that becomes shared (or stops being shared) is laid out anew without losing gradients."""
    trunk = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    extra = torch.nn.Parameter(torch.tensor([3.0]))
    opt = GradSurgery(torch.optim.SGD([trunk, extra], lr=0.1), method="sum")
    opt.backward([trunk.sum() * 2, trunk.sum() + extra.sum()])
    torch.testing.assert_close(trunk.grad, torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(extra.grad, torch.tensor([1.0]))
    opt.zero_grad()
    opt.backward([trunk.sum() + 4 * extra.sum(), trunk.sum() + extra.sum()])
    torch.testing.assert_close(trunk.grad, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(extra.grad, torch.tensor([5.0]))
    opt.zero_grad()
    opt.backward([trunk.sum() * 2, trunk.sum() + extra.sum()])
    torch.testing.assert_close(extra.grad, torch.tensor([1.0]))


def test_zero_gradients_give_no_nan():
    p = torch.nn.Parameter(torch.zeros(4))
    for method, opts in [
        ("mgda", {}),
        ("pcgrad", {}),
        ("gradvac", {}),
        ("main_aux", {}),
        ("pareto", {"min_weights": [0.5, 0.5]}),
    ]:
        opt = GradSurgery(torch.optim.SGD([p], lr=0.1), method=method, **opts)
        p.grad = None
        info = opt.backward([(p * 0).sum(), (p * 0).sum()])
        assert torch.isfinite(info.weights).all(), method
        assert torch.equal(p.grad, torch.zeros(4)), method


def test_single_tensor_of_losses_and_one_dim_tensor():
    model, a, _ = make_linear_problem(0)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="sum")
    opt.backward(torch.stack(model()))
    torch.testing.assert_close(model.theta.grad.reshape(-1), a.sum(0)[:6])


def test_step_is_the_inner_step():
    model, a, _ = make_linear_problem(0)
    ref, _, _ = make_linear_problem(0)
    opt = GradSurgery(torch.optim.Adam(model.parameters(), lr=0.01), method="sum")
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        opt.backward(model())
        opt.step()
        ref_opt.zero_grad()
        sum(ref()).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert opt.param_groups is opt.optimizer.param_groups and opt.state is opt.optimizer.state


# -- bad input ---------------------------------------------------------------------------------------------


def snapshot(model):
    return [(p.detach().clone(), None if p.grad is None else p.grad.clone()) for p in model.parameters()]


def assert_unchanged(model, snap):
    for p, (value, grad) in zip(model.parameters(), snap, strict=True):
        assert torch.equal(p.detach(), value)
        assert (p.grad is None and grad is None) or torch.equal(p.grad, grad)


def inference(model):
    with torch.inference_mode():
        return model()


@pytest.mark.parametrize(
    "make_losses,error,match",
    [
        (lambda m: m()[:2], ValueError, "expected 3 losses"),
        (lambda m: [*m()[:2], torch.stack([m()[2], m()[2]])], ValueError, "loss 2 is not a scalar"),
        (lambda m: [*m()[:2], torch.tensor(1.0)], ValueError, "loss 2 does not require grad"),
        (lambda m: [*m()[:2], inference(m)[2]], ValueError, r"loss 2 .*torch\.inference_mode\(\)"),
        (lambda m: [m()[0] * float("nan"), *m()[1:]], ValueError, "non-finite loss"),
        (lambda m: [m()[0], m()[1] + m.theta.sum() * float("inf"), m()[2]], ValueError, "non-finite"),
        (lambda m: [m()[0], m()[1], torch.ones((), requires_grad=True) * 2], ValueError, r"\[2\] reach none"),
        (lambda m: "abc", TypeError, "sequence of scalar tensors"),
        (lambda m: [1.0, 2.0, 3.0], TypeError, "loss 0 is a float"),
        (lambda m: [m()[0], m()[1] * 1j, m()[2]], TypeError, r"loss 1 is complex \(torch.complex128\)"),
    ],
)
def test_bad_losses_leave_everything_untouched(make_losses, error, match):
    model, _, _ = make_linear_problem(0)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="gradvac", num_tasks=3)
    model.theta.grad = torch.ones_like(model.theta)
    snap = snapshot(model)
    targets_before = opt.method.targets.clone()
    gen_before = opt.method.generator.get_state()
    with pytest.raises(error, match=match):
        opt.backward(make_losses(model))
    assert_unchanged(model, snap)
    assert torch.equal(opt.method.targets, targets_before)
    assert torch.equal(opt.method.generator.get_state(), gen_before)


def test_nan_in_task_specific_gradient_names_the_task():
    model, _, _ = make_linear_problem(0)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="mgda")
    losses = model()
    losses[2] = losses[2] + (model.heads[2] * float("inf")).sum() * 0  # inf * 0 = NaN in the head gradient
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"task\(s\) \[2\]"):
        opt.backward(losses)
    assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"method": "nope"}, ValueError, "unknown method 'nope'"),
        ({"method": "mgda", "slover": "cvxpy"}, TypeError, r"unknown option\(s\) \['slover'\]"),
        ({"method": "mgda", "solver": "newton"}, ValueError, "unknown solver 'newton'"),
        ({"method": "pareto"}, TypeError, r"needs option\(s\) \['min_weights'\]"),
        ({"method": "pareto", "min_weights": [0.7, 0.6]}, ValueError, "infeasible: they sum to 1.3"),
        ({"method": "pareto", "min_weights": [-0.1, 0.6]}, ValueError, "non-negative"),
        ({"method": "main_aux", "main": 5, "num_tasks": 3}, ValueError, "main=5 is out of range"),
        ({"method": "mixed", "main": [0, 0]}, ValueError, "duplicate"),
        ({"method": "mixed", "main": [], "num_tasks": 2}, ValueError, "at least one main"),
        ({"method": "mgda", "solver": "closed_form", "num_tasks": 3}, ValueError, "exactly 2 tasks"),
        ({"method": "gradvac", "beta": 0.0}, ValueError, "beta"),
        ({"method": "mgda", "num_tasks": 2.0}, TypeError, "num_tasks must be an int, got 2.0"),
        ({"method": "mgda", "num_tasks": True}, TypeError, "num_tasks must be an int, got True"),
        ({"method": "mgda", "num_tasks": 0}, ValueError, "num_tasks must be >= 1, got 0"),
        (
            {"method": "pareto", "min_weights": [0.1, 0.1], "num_tasks": 3},
            ValueError,
            "2 entries for 3 tasks",
        ),
    ],
)
def test_bad_options(kwargs, error, match):
    model, _, _ = make_linear_problem(0)
    with pytest.raises(error, match=match):
        GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_main_aux_single_loss_is_refused():
    p = torch.nn.Parameter(torch.ones(2))
    opt = GradSurgery(torch.optim.SGD([p], lr=0.1), method="main_aux")
    with pytest.raises(ValueError, match="at least one auxiliary"):
        opt.backward([p.sum()])
    assert p.grad is None


def test_not_an_optimizer():
    with pytest.raises(TypeError, match="got Linear"):
        GradSurgery(torch.nn.Linear(2, 2))


# -- checkpoints -----------------------------------------------------------------------------------------


def test_state_dict_from_another_method_is_refused():
    model, _, _ = make_linear_problem(0)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="pcgrad")
    opt.backward(model())
    other = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="mgda")
    with pytest.raises(ValueError, match="for method 'pcgrad'"):
        other.load_state_dict(opt.state_dict())
    four = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="pcgrad", num_tasks=4)
    with pytest.raises(ValueError, match="for 3 tasks"):
        four.load_state_dict(opt.state_dict())
