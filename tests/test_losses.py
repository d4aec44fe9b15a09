"""The loss-preparation stage: what ``backward`` accepts, task names, and their consistency across calls."""

from __future__ import annotations

import io

import pytest
import torch
from method_checks import make_linear_problem, shared_grad
from references import brute_force_qp

from gradsurgery import GradSurgery

NAMES = ["click", "conversion", "watch"]


def named(losses, order=(0, 1, 2)):
    return {NAMES[i]: losses[i] for i in order}


def sgd(model, method="mgda", **options):
    return GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method, **options)


def test_a_mapping_names_the_tasks_in_info():
    model, a, _ = make_linear_problem(0)
    info = sgd(model).backward(named(model()))
    assert info.task_names == NAMES
    assert list(info.weights_by_task) == NAMES
    row = info.as_dict()
    assert {"weight/click", "share/watch", "loss/conversion", "cos/click,watch"} <= set(row)
    expected = brute_force_qp((a @ a.T).numpy(), [0, 1, 2], [0.0] * 3)
    assert row["weight/conversion"] == pytest.approx(expected[1], abs=1e-8)


def test_later_calls_are_matched_by_name_whatever_the_order():
    model, _, _ = make_linear_problem(0)
    ref_model, _, _ = make_linear_problem(0)
    opt, ref = sgd(model), sgd(ref_model)
    opt.backward(named(model()))
    ref.backward(named(ref_model()))
    info = opt.backward(named(model(), order=(2, 0, 1)))  # same tasks, another dict order
    ref_info = ref.backward(named(ref_model()))
    assert info.task_names == NAMES
    assert torch.equal(info.weights, ref_info.weights)
    assert torch.equal(shared_grad(model), shared_grad(ref_model))


@pytest.mark.parametrize(
    "second,match",
    [
        (
            lambda m: {"click": m()[0], "conversion": m()[1], "watchtime": m()[2]},
            "differ from those of the earlier",
        ),
        (lambda m: {"click": m()[0], "conversion": m()[1]}, "expected 3 losses"),
    ],
)
def test_other_names_are_refused_and_change_nothing(second, match):
    model, _, _ = make_linear_problem(0)
    opt = sgd(model, "pcgrad", seed=0)
    opt.backward(named(model()))
    grads = [p.grad.clone() for p in model.parameters()]
    state = opt.method.generator.get_state()
    with pytest.raises(ValueError, match=match):
        opt.backward(second(model))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert torch.equal(opt.method.generator.get_state(), state)


def test_unnamed_then_named_is_refused_and_named_then_sequence_is_positional():
    model, _, _ = make_linear_problem(0)
    opt = sgd(model)
    opt.backward(model())
    with pytest.raises(ValueError, match="unnamed"):
        opt.backward(named(model()))
    other = sgd(model)
    other.backward(named(model()))
    assert other.backward(model()).task_names == NAMES  # a sequence is taken in the named order


def test_bad_names_are_type_errors():
    model, _, _ = make_linear_problem(0)
    losses = model()
    with pytest.raises(TypeError, match="non-empty strings"):
        sgd(model).backward({0: losses[0], 1: losses[1], 2: losses[2]})


def test_options_by_task_name_equal_options_by_index():
    model, a, _ = make_linear_problem(1)
    by_name = sgd(
        model, "pareto", min_weights={"watch": 0.1, "click": 0.3, "conversion": 0.2}, solver="frank_wolfe"
    )
    w_name = by_name.backward(named(model())).weights
    model2, _, _ = make_linear_problem(1)
    w_index = (
        sgd(model2, "pareto", min_weights=[0.3, 0.2, 0.1], solver="frank_wolfe").backward(model2()).weights
    )
    torch.testing.assert_close(w_name, w_index, rtol=0, atol=0)
    expected = brute_force_qp((a @ a.T).numpy(), [0, 1, 2], [0.3, 0.2, 0.1])
    torch.testing.assert_close(w_name, torch.from_numpy(expected), rtol=0, atol=1e-8)
    for method, options, index_options in [
        ("main_aux", {"main": "conversion"}, {"main": 1}),
        (
            "mixed",
            {"main": ["watch", "click"], "solver": "frank_wolfe"},
            {"main": [2, 0], "solver": "frank_wolfe"},
        ),
        ("sum", {"weights": {"click": 1.0, "conversion": 0.5, "watch": 2.0}}, {"weights": [1.0, 0.5, 2.0]}),
        (
            "uncertainty",
            {"init_log_var": {"click": 0.0, "conversion": 1.0, "watch": -1.0}},
            {"init_log_var": [0, 1, -1]},
        ),
    ]:
        m1, _, _ = make_linear_problem(2)
        m2, _, _ = make_linear_problem(2)
        w1 = sgd(m1, method, **options).backward(named(m1())).weights
        w2 = sgd(m2, method, **index_options).backward(m2()).weights
        torch.testing.assert_close(w1, w2, rtol=0, atol=0, msg=method)


@pytest.mark.parametrize(
    "options,losses,match",
    [
        ({"main": "ctr"}, "named", r"main='ctr' names no task \(the tasks are \['click'"),
        ({"main": "click"}, "list", r"main='click' names no task \(the losses are unnamed\)"),
    ],
)
def test_a_name_that_is_not_a_task_is_refused_before_anything_binds(options, losses, match):
    model, _, _ = make_linear_problem(0)
    opt = sgd(model, "main_aux", **options)
    with pytest.raises(ValueError, match=match):
        opt.backward(named(model()) if losses == "named" else model())
    assert opt.method.num_tasks is None and opt.method.task_names is None
    assert all(p.grad is None for p in model.parameters())


def test_min_weights_by_name_must_name_every_task():
    model, _, _ = make_linear_problem(0)
    opt = sgd(model, "pareto", min_weights={"click": 0.2, "watch": 0.1})
    with pytest.raises(ValueError, match=r"names tasks \['click', 'watch'\], the tasks are"):
        opt.backward(named(model()))


def test_names_are_checkpointed():
    model, _, _ = make_linear_problem(0)
    opt = sgd(model, "main_aux", main="watch")
    opt.backward(named(model()))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["gradsurgery"]["task_names"] == NAMES and saved["gradsurgery"]["options"]["main"] == "watch"
    fresh = sgd(model, "main_aux", main="watch")
    fresh.load_state_dict(saved)
    assert fresh.method.task_names == NAMES
    other = sgd(model, "main_aux", main="watch")
    other.backward({"a": model()[0], "b": model()[1], "watch": model()[2]})
    with pytest.raises(ValueError, match="tasks named"):
        other.load_state_dict(saved)
