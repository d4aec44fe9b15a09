"""A step with some tasks absent (their loss ``None``, e.g. no labelled sample in the batch): for a method
that declares ``skips_absent_tasks``, the method's step on the present tasks alone; the others refuse it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from method_checks import registered
from state_checks import same_state
from weighting_helpers import TwoHeads, make_data

import gradsurgery
from gradsurgery import GradSurgery
from gradsurgery.distributed import LocalReduction
from gradsurgery.methods._learned import LearnedVector

T = 3
SKIPPING = [(m, o) for m, o in registered(T) if gradsurgery.make_method(m, **o).skips_absent_tasks]
# The cvxpy backends build their problem for all T tasks: a step with fewer builds its own.
SKIPPING += [("mgda", {"solver": "cvxpy"}), ("pareto", {**dict(SKIPPING)["pareto"], "solver": "cvxpy"})]
# The main task last: renumbered among the present ones.
SKIPPING += [("main_aux", {"main": 1}), ("main_aux", {"main": 2}), ("mixed", {"main": [2]})]
SKIPPING_IDS = [
    m + (" cvxpy" if o.get("solver") == "cvxpy" else "") + (f" main={o['main']}" if "main" in o else "")
    for m, o in SKIPPING
]
REFUSING = [(m, o) for m, o in registered(T) if not gradsurgery.make_method(m, **o).skips_absent_tasks]
REFUSING.append(("nash_mtl", {"solver": "cvxpy"}))  # its convex problem is built for all T tasks
PATTERNS = {"task 0 absent": [1, 2], "task 1 absent": [0, 2], "only task 2": [2]}


def task_losses(model, x, y, present, mode, absent_as_none=True):
    """The losses of ``present`` (None for the others when ``absent_as_none``) and the ``features=`` argument
    of ``mode`` (full mode: None)."""
    z = model.features(x)
    features = None
    inputs = {i: z for i in range(T)}
    if mode == "task views":  # without the absent tasks: views for the present ones only
        features = gradsurgery.task_views(z, T if absent_as_none else len(present))
        keys = range(T) if absent_as_none else present
        inputs = dict(zip(keys, features, strict=True))
    elif mode == "z":
        features = z
    losses = [
        (head(inputs[i]).squeeze(-1) - y[i]).pow(2).mean() if i in present else None
        for i, head in enumerate(model.heads)
    ]
    if not absent_as_none:
        losses = [loss for loss in losses if loss is not None]
    return losses, features


def present_options(options, present):
    """The options of an optimizer given only the ``present`` tasks: per-task lists cut to them, the main
    tasks (``main_aux``, ``mixed``) renumbered among them."""
    out = {}
    for key, value in options.items():
        if key == "main":
            out[key] = (
                present.index(value)
                if isinstance(value, int)
                else [present.index(i) for i in value if i in present]
            )
        else:
            out[key] = [value[i] for i in present] if isinstance(value, list) else value
    return out


def main_absent(method, options, present):
    """Whether the step leaves ``main_aux`` without its main task, or ``mixed`` without all of its main
    ones."""
    if method == "main_aux":
        return options.get("main", 0) not in present
    if method == "mixed":
        return not set(options["main"]) & set(present)
    return False


def grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["full", "z", "task views"])
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("method,options", SKIPPING, ids=SKIPPING_IDS)
def test_a_step_with_tasks_absent_is_the_methods_step_on_the_present_tasks(method, options, pattern, mode):
    """The first call (the optimizer binds to T = 3 tasks) against a fresh optimizer given only the present
    losses: the same weights, every ``.grad`` the same, the absent tasks' heads untouched; ``info`` spreads
    the present tasks' numbers over all T (weight 0, loss and Gram row NaN for an absent task)."""
    present = PATTERNS[pattern]
    absent = [i for i in range(T) if i not in present]
    xs, ys = make_data(T, 2)
    model = TwoHeads(T)
    twin = copy.deepcopy(model)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method, **options)
    losses, features = task_losses(model, xs[0], ys[0], present, mode)
    if main_absent(method, options, present):  # the main task is what these weigh the others against
        with pytest.raises(ValueError, match=r"main task.* absent from this step"):
            opt.backward(losses, features=features)
        assert opt.method.num_tasks is None and all(p.grad is None for p in model.parameters())
        return
    info = opt.backward(losses, features=features)
    if len(present) < gradsurgery.METHODS[method].min_tasks:  # main_aux with its main task alone: weight 1
        assert info.weights.tolist() == [1.0 if i in present else 0.0 for i in range(T)]
        return
    reference = GradSurgery(
        torch.optim.SGD(twin.parameters(), lr=0.1), method, **present_options(options, present)
    )
    ref_losses, ref_features = task_losses(twin, xs[0], ys[0], present, mode, absent_as_none=False)
    ref = reference.backward(ref_losses, features=ref_features)
    assert opt.method.num_tasks == T and reference.method.num_tasks == len(present)
    torch.testing.assert_close(info.weights[present], ref.weights, rtol=1e-12, atol=1e-15)
    assert torch.equal(info.weights[absent], torch.zeros(len(absent), dtype=info.weights.dtype))
    torch.testing.assert_close(info.losses[present], ref.losses, rtol=0, atol=0)
    assert torch.isnan(info.losses[absent]).all()
    if ref.gram is None:
        assert info.gram is None
    else:
        block = info.gram[present][:, present]
        torch.testing.assert_close(block, ref.gram, rtol=0, atol=0)
        assert torch.isnan(info.gram[absent]).all() and torch.isnan(info.gram[:, absent]).all()
    for a, b in zip(grads(model), grads(twin), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    for i in absent:
        assert all(p.grad is None for p in model.heads[i].parameters())
    # The optimizer stays bound to the three tasks: a step with all of them runs next.
    opt.zero_grad()
    losses, features = task_losses(model, xs[1], ys[1], list(range(T)), mode)
    assert torch.isfinite(opt.backward(losses, features=features).weights).all()


def carries_task_history(method, options):
    """Whether the method's weights follow each task's history: a vector learned per task (``uncertainty``'s
    s, ``famo``'s logits) or the losses of earlier steps (``dwa``). After steps with every task its weights
    are then no longer a fresh optimizer's."""
    bound = gradsurgery.make_method(method, **options)
    bound.bind(T)
    return bound.tracks_loss_decrease or any(
        isinstance(value, LearnedVector) for value in vars(bound).values()
    )


STATELESS = [
    (m, o)
    for m, o in SKIPPING
    if not gradsurgery.make_method(m, **o)._generators
    and not main_absent(m, o, [0, 2])
    and not carries_task_history(m, o)
]
STATELESS_IDS = [
    m + (" cvxpy" if o.get("solver") == "cvxpy" else "") + (f" main={o['main']}" if "main" in o else "")
    for m, o in STATELESS
]


@pytest.mark.parametrize("method,options", STATELESS, ids=STATELESS_IDS)
def test_a_task_absent_after_full_steps_weighs_the_present_ones_as_a_fresh_optimizer(method, options):
    """Nothing per task carries over: after two steps with every task, a step with task 1 absent takes the
    weights a fresh optimizer gives the two present tasks (the same model)."""
    xs, ys = make_data(T, 3)
    model = TwoHeads(T)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method, **options)
    for t in range(2):
        opt.zero_grad()
        opt.backward(task_losses(model, xs[t], ys[t], [0, 1, 2], "full")[0])
        opt.step()
    fresh = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.1), method, **present_options(options, [0, 2])
    )
    opt.zero_grad()
    info = opt.backward(task_losses(model, xs[2], ys[2], [0, 2], "full")[0])
    got = grads(model)
    fresh.zero_grad()
    ref = fresh.backward(task_losses(model, xs[2], ys[2], [0, 2], "full", absent_as_none=False)[0])
    torch.testing.assert_close(info.weights[[0, 2]], ref.weights, rtol=1e-12, atol=1e-15)
    for a, b in zip(got, grads(model), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("solver", ["auto", "frank_wolfe", "cvxpy"])
def test_mgda_weighs_the_present_tasks_by_the_two_task_closed_form(solver):
    """Bound to three tasks (the active set, or a cvxpy problem of three variables), a step with two present
    takes their min-norm point: w_0 = clip((G₂₂ − G₀₂)/(G₀₀ + G₂₂ − 2G₀₂), 0, 1) from their Gram block."""
    xs, ys = make_data(T, 1)
    model = TwoHeads(T)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", solver=solver)
    info = opt.backward(task_losses(model, xs[0], ys[0], [0, 2], "full")[0])
    g = info.gram.numpy()
    g02 = (g[0, 2] + g[2, 0]) / 2  # G as the solvers read it, symmetrised
    w0 = min(max((g[2, 2] - g02) / (g[0, 0] + g[2, 2] - 2 * g02), 0.0), 1.0)
    assert 0.0 < w0 < 1.0  # both tasks matter
    tol = 1e-6 if solver == "cvxpy" else 1e-12  # an interior-point solve against the closed form
    torch.testing.assert_close(
        info.weights, torch.tensor([w0, 0.0, 1.0 - w0], dtype=torch.float64), rtol=tol, atol=tol
    )


@pytest.mark.parametrize("solver", ["auto", "closed_form", "frank_wolfe", "cvxpy"])
def test_mgda_bound_to_two_tasks_gives_the_one_present_task_weight_1(solver):
    xs, ys = make_data(2, 2)
    model = TwoHeads(2)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", solver=solver)
    opt.backward(model.losses(xs[0], ys[0]))
    info = opt.backward([None, model.losses(xs[1], ys[1])[1]])
    assert info.weights.tolist() == [0.0, 1.0]


def test_sum_weighs_the_present_tasks():
    xs, ys = make_data(T, 1)
    model = TwoHeads(T)
    twin = copy.deepcopy(model)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "sum", weights=[1.0, 2.0, 3.0])
    info = opt.backward(task_losses(model, xs[0], ys[0], [0, 2], "full")[0])
    assert info.weights.tolist() == [1.0, 0.0, 3.0]
    losses = task_losses(twin, xs[0], ys[0], [0, 2], "full", absent_as_none=False)[0]
    (1.0 * losses[0] + 3.0 * losses[1]).backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)


def test_named_tasks_may_be_absent_by_name():
    xs, ys = make_data(T, 2)
    model = TwoHeads(T)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "mgda")
    names = ["click", "conversion", "watch"]
    losses = task_losses(model, xs[0], ys[0], [0, 1, 2], "full")[0]
    opt.backward(dict(zip(names, losses, strict=True)))
    opt.zero_grad()
    losses = task_losses(model, xs[1], ys[1], [0, 2], "full")[0]
    info = opt.backward({"watch": losses[2], "conversion": None, "click": losses[0]})  # matched by name
    assert info.task_names == names and info.weights_by_task["conversion"] == 0.0
    with pytest.raises(ValueError, match="expected 3 losses"):
        opt.backward({"click": losses[0], "watch": losses[2]})  # leaving a name out is not absence


@pytest.mark.parametrize(
    "method,options", REFUSING, ids=[m for m, _ in REFUSING[:-1]] + ["nash_mtl solver=cvxpy"]
)
def test_methods_that_follow_every_task_refuse_a_step_with_one_absent(method, options):
    xs, ys = make_data(T, 2)
    model = TwoHeads(T)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method, **options)
    opt.backward(task_losses(model, xs[0], ys[0], [0, 1, 2], "full")[0])
    before, state = grads(model), copy.deepcopy(opt.method.state_dict())
    with pytest.raises(ValueError, match=rf"method '{method}' cannot take: .*Methods that take a step"):
        opt.backward(task_losses(model, xs[1], ys[1], [0, 2], "full")[0])
    assert all(torch.equal(a, b) for a, b in zip(grads(model), before, strict=True))
    assert same_state(opt.method.state_dict(), state)


def test_every_loss_absent_is_refused_and_leaves_the_optimizer_unbound():
    model = TwoHeads(T)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "mgda")
    with pytest.raises(ValueError, match="every loss is None"):
        opt.backward([None, None, None])
    assert opt.method.num_tasks is None and all(p.grad is None for p in model.parameters())


class SpanningRanks(LocalReduction):
    spans_ranks = True


def test_a_task_absent_on_a_rank_is_refused_for_a_method_on_the_gram_matrix(monkeypatch):
    """Each rank averages every task's gradient with the others' (the Jacobian, G): a rank without a task's
    loss would leave the ranks' steps apart. The loss weightings take it (``tests/test_distributed.py``)."""
    xs, ys = make_data(T, 1)
    model = TwoHeads(T)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "mgda")
    monkeypatch.setattr(opt.sync, "reduction", lambda device: SpanningRanks(opt.sync.no_sync))
    with pytest.raises(ValueError, match=r"only the loss weightings .* every rank passes every task's loss"):
        opt.backward(task_losses(model, xs[0], ys[0], [0, 2], "full")[0])
    assert opt.method.num_tasks is None and all(p.grad is None for p in model.parameters())


def test_a_task_absent_under_a_grad_scaler_writes_s_times_the_unscaled_step():
    xs, ys = make_data(T, 1)
    model = TwoHeads(T)
    twin = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "mgda")
    plain = GradSurgery(torch.optim.SGD(twin.parameters(), lr=0.1), "mgda")
    info = opt.backward(task_losses(model, xs[0], ys[0], [0, 2], "full")[0], grad_scaler=scaler)
    plain.backward(task_losses(twin, xs[0], ys[0], [0, 2], "full")[0])
    assert not info.overflow
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad * 2.0**10)


def test_info_reports_the_present_tasks_diagnostics_and_nan_for_the_absent_one():
    """Shares, the fused norm, gradient norms and cosines of the present tasks are those of the optimizer
    given only them; the absent task's gradient norm and cosines are NaN, its weight and share 0."""
    xs, ys = make_data(T, 1)
    model = TwoHeads(T)
    twin = copy.deepcopy(model)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "upgrad")
    reference = GradSurgery(torch.optim.SGD(twin.parameters(), lr=0.1), "upgrad")
    losses = task_losses(model, xs[0], ys[0], [0, 2], "full")[0]
    info = opt.backward(dict(zip("abc", losses, strict=True))).as_dict()
    losses = task_losses(twin, xs[0], ys[0], [0, 2], "full", absent_as_none=False)[0]
    ref = reference.backward(dict(zip("ac", losses, strict=True))).as_dict()
    for key, value in ref.items():
        assert info[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert info["weight/b"] == info["share/b"] == 0.0
    assert all(np.isnan(info[k]) for k in ("loss/b", "grad_norm/b", "cos/a,b", "cos/b,c"))


def test_the_activation_source_takes_a_step_with_a_task_absent():
    xs, ys = make_data(T, 1)
    model = TwoHeads(T)
    twin = copy.deepcopy(model)
    opt = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.1), "mgda", model=model, gradient_source="activations"
    )
    plain = GradSurgery(
        torch.optim.SGD(twin.parameters(), lr=0.1), "mgda", model=twin, gradient_source="activations"
    )
    info = opt.backward(task_losses(model, xs[0], ys[0], [0, 2], "full")[0])
    ref = plain.backward(task_losses(twin, xs[0], ys[0], [0, 2], "full", absent_as_none=False)[0])
    assert info.source == ref.source == "activations"
    torch.testing.assert_close(info.weights[[0, 2]], ref.weights, rtol=1e-12, atol=1e-15)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("solver", ["frank_wolfe", "cvxpy"])
def test_pareto_keeps_the_bounds_of_the_present_tasks(solver):
    """min_weights (0.05, 0.3, 0.6) with task 1 absent: the step of bounds (0.05, 0.6) on tasks 0 and 2, the
    bound of task 2 active (it holds exactly 0.6 or more)."""
    xs, ys = make_data(T, 1)
    model = TwoHeads(T)
    twin, bare = copy.deepcopy(model), copy.deepcopy(model)
    opt = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.1), "pareto", min_weights=[0.05, 0.3, 0.6], solver=solver
    )
    reference = GradSurgery(
        torch.optim.SGD(twin.parameters(), lr=0.1), "pareto", min_weights=[0.05, 0.6], solver=solver
    )
    info = opt.backward(task_losses(model, xs[0], ys[0], [0, 2], "full")[0])
    ref = reference.backward(task_losses(twin, xs[0], ys[0], [0, 2], "full", absent_as_none=False)[0])
    torch.testing.assert_close(info.weights[[0, 2]], ref.weights, rtol=1e-12, atol=1e-15)
    assert info.weights[1] == 0.0 and info.weights[2] >= 0.6 - 1e-9 and info.weights[0] >= 0.05 - 1e-9
    free = GradSurgery(torch.optim.SGD(bare.parameters(), lr=0.1), "mgda")
    unbounded = free.backward(task_losses(bare, xs[0], ys[0], [0, 2], "full", absent_as_none=False)[0])
    assert unbounded.weights[1] < 0.6  # the bound binds: without it task 2 would get less


def test_main_aux_without_one_auxiliary_takes_the_one_auxiliary_closed_form():
    """Main task 0 and auxiliary 2 present: w_main = 1, λ_2 = max(0, −G₀₂)/G₂₂ from their Gram block (the
    main/auxiliary closed form); ``mixed`` with main tasks (0, 1) gives the same step (task 1 absent)."""
    xs, ys = make_data(T, 4)
    for t in range(4):  # batches until the auxiliary conflicts with the main task (λ > 0)
        model, twin = TwoHeads(T, seed=t), TwoHeads(T, seed=t)
        opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "main_aux", main=0)
        info = opt.backward(task_losses(model, xs[t], ys[t], [0, 2], "full")[0])
        g = info.gram.numpy()
        g02 = (g[0, 2] + g[2, 0]) / 2
        if g02 < 0:
            break
    else:
        pytest.fail("no batch with conflicting main and auxiliary gradients")
    torch.testing.assert_close(
        info.weights, torch.tensor([1.0, 0.0, -g02 / g[2, 2]], dtype=torch.float64), rtol=1e-12, atol=1e-15
    )
    mixed = GradSurgery(torch.optim.SGD(twin.parameters(), lr=0.1), "mixed", main=[0, 1])
    other = mixed.backward(task_losses(twin, xs[t], ys[t], [0, 2], "full")[0])
    torch.testing.assert_close(other.weights, info.weights, rtol=1e-9, atol=1e-12)


def test_main_aux_in_the_masking_mode_refuses_an_absent_task():
    model = TwoHeads(2)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "main_aux", mode="mask")
    with pytest.raises(ValueError, match="method 'main_aux' cannot take"):
        opt.backward([model.losses(*[d[0] for d in make_data(2, 1)])[0], None])
    assert opt.method.num_tasks is None and all(p.grad is None for p in model.parameters())
