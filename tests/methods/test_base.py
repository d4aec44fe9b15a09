"""The method contract itself (``gradsurgery.methods.base``) and the registry: what every method must
declare, and what an extension gets from the base class."""

from __future__ import annotations

import copy
import numbers

import pytest
import torch
from method_checks import make_linear_problem, shared_grad
from state_checks import same_state

from gradsurgery import METHODS, GradSurgery, Method, make_method, register
from gradsurgery.methods import option_names
from gradsurgery.methods.base import added_at, clone_state, of_present, on_every_task


def primitive(value) -> bool:
    if isinstance(value, list | tuple):
        return all(primitive(v) for v in value)
    return (
        value is None or isinstance(value, bool | str | numbers.Real) and not isinstance(value, torch.Tensor)
    )


@pytest.mark.parametrize("name", sorted(METHODS))
def test_registered_methods_describe_themselves(name):
    cls = METHODS[name]
    assert cls.name == name and issubclass(cls, Method)
    assert option_names(cls) == cls.option_names()
    assert cls.min_tasks >= 1 and (cls.max_tasks is None or cls.max_tasks >= cls.min_tasks)
    assert cls.needs_gram or cls.scales_task_specific
    for num_tasks in range(cls.min_tasks, (cls.max_tasks or cls.min_tasks + 3) + 1):
        method = make_method(name, **cls.example_options(num_tasks))
        method.bind(num_tasks)
        # The options as configured go into checkpoints: primitives only, and every option is covered.
        assert set(method.options) == set(cls.option_names()) - set(cls.unsaved_options)
        assert all(primitive(v) for v in method.options.values()), method.options


@pytest.mark.parametrize("name", sorted(n for n, c in METHODS.items() if not c.option_names()))
def test_methods_without_options_refuse_any(name):
    with pytest.raises(TypeError, match="unknown option"):
        make_method(name, scale_mode="min")


def test_method_instance_and_options_do_not_mix():
    with pytest.raises(TypeError, match="together with a Method instance"):
        make_method(make_method("mgda"), solver="cvxpy")
    with pytest.raises(TypeError, match="name or a Method instance"):
        make_method(3)


def test_one_backward_needs_a_loss_weighting():
    with pytest.raises(TypeError, match="needs_gram = False needs scales_task_specific = True"):

        class Broken(Method):  # noqa: F841
            name = "broken"
            needs_gram = False


class Halves(Method):
    """An extension as a user would write it: weights halve every call, a counter in its state."""

    name = "halves_for_tests"

    def __init__(self, *, start: float = 1.0) -> None:
        super().__init__()
        self.start = start
        self.calls = 0

    def compute_weights(self, gram, losses):
        self.calls += 1
        return torch.full((gram.shape[0],), self.start * 0.5**self.calls, dtype=gram.dtype)

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def test_an_extension_gets_options_registry_and_transactions_from_the_base_class():
    register(Halves)
    try:
        model, a, _ = make_linear_problem(0)
        opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "halves_for_tests", start=2.0)
        assert opt.method.options == {"start": 2.0}
        info = opt.backward(model())
        torch.testing.assert_close(info.weights, torch.ones(3, dtype=torch.float64))
        torch.testing.assert_close(shared_grad(model), a.sum(0))
        # The write-back fails after the weights were computed (adding in place to a .grad that is itself a
        # leaf requiring grad): the call's increment of the counter is rolled back.
        model.theta.grad = torch.zeros_like(model.theta, requires_grad=True)
        with pytest.raises(RuntimeError):
            opt.backward(model())
        assert opt.method.calls == 1
        with pytest.raises(TypeError, match="unknown option"):
            make_method("halves_for_tests", stop=1.0)
    finally:
        METHODS.pop("halves_for_tests")


# -- clone_state: the transaction's snapshot ---------------------------------------------------------------


def tensors_in(state) -> list[torch.Tensor]:
    if isinstance(state, dict):
        return [t for v in state.values() for t in tensors_in(v)]
    if isinstance(state, list | tuple):
        return [t for v in state for t in tensors_in(v)]
    return [state] if isinstance(state, torch.Tensor) else []


@pytest.mark.parametrize("name", sorted(METHODS))
def test_clone_state_copies_what_deepcopy_copies_and_shares_nothing_mutable(name):
    cls = METHODS[name]
    num_tasks = max(cls.min_tasks, 3) if cls.max_tasks is None else cls.max_tasks
    method = make_method(name, **cls.example_options(num_tasks))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # the moving averages, histories and learned vectors exist after a few steps
        jac = torch.randn(num_tasks, 7, generator=gen, dtype=torch.float64)
        with method.transaction():
            method(jac @ jac.T, torch.rand(num_tasks, generator=gen, dtype=torch.float64) + 0.5)
        method.after_step()
    state = method.state_dict()
    reference, clone = copy.deepcopy(state), clone_state(state)
    assert same_state(clone, reference)
    originals = {id(t) for t in tensors_in(state)}
    assert not any(id(t) in originals for t in tensors_in(clone))
    for t in tensors_in(state):
        if t.is_floating_point():
            t.add_(1.0)  # the live state moves on; the snapshot must not
    assert same_state(clone, reference)


def test_clone_state_rebuilds_containers_and_deep_copies_unknown_leaves():
    class Box:
        def __init__(self, items: list[int]) -> None:
            self.items = items

    box = Box([1, 2])
    state = {"a": [torch.ones(2), (torch.zeros(1), 3, "x", None)], "box": box, "dtype": torch.float64}
    clone = clone_state(state)
    assert clone["a"] is not state["a"] and isinstance(clone["a"][1], tuple)
    assert clone["box"] is not box and clone["box"].items == [1, 2] and clone["box"].items is not box.items
    assert clone["dtype"] is torch.float64 and clone["a"][1][2] == "x"
    weight = torch.ones(2, requires_grad=True)  # a tensor that requires grad keeps that, as under deepcopy
    copied = clone_state({"w": weight})["w"]
    assert copied is not weight and copied.requires_grad and torch.equal(copied, weight)


@pytest.mark.parametrize("present", [None, [1], [0, 2], [0, 1, 3]])
def test_per_task_vector_helpers_against_a_loop(present):
    """The per-task helpers the loss weightings share, against the same vectors written entry by entry; with
    every task present (None) they index nothing and hand the tensors back as they are."""
    num_tasks = 4
    tasks = list(range(num_tasks)) if present is None else present
    vector = torch.tensor([0.5, -1.25, 2.0, 3.5], dtype=torch.float64)
    values = torch.tensor([10.0 * (k + 1) for k in range(len(tasks))], dtype=torch.float64)

    picked = of_present(vector, present)
    assert picked.tolist() == [vector[i].item() for i in tasks]

    spread = on_every_task(values, present, float("nan"), num_tasks)
    for i in range(num_tasks):
        if i in tasks:
            assert spread[i].item() == values[tasks.index(i)].item()
        else:
            assert torch.isnan(spread[i])

    total = added_at(vector, present, values)
    ones = added_at(vector, present, 1.0)
    for i in range(num_tasks):
        here = i in tasks
        assert total[i].item() == vector[i].item() + (values[tasks.index(i)].item() if here else 0.0)
        assert ones[i].item() == vector[i].item() + (1.0 if here else 0.0)
    assert vector.tolist() == [0.5, -1.25, 2.0, 3.5]  # a new vector each time, the given one untouched
    if present is None:
        assert picked is vector and spread is values
