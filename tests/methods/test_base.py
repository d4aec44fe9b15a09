"""The method contract itself (``gradsurgery.methods.base``) and the registry: what every method must
declare, and what an extension gets from the base class."""

from __future__ import annotations

import numbers

import pytest
import torch
from method_checks import make_linear_problem, shared_grad

from gradsurgery import METHODS, GradSurgery, Method, make_method, register
from gradsurgery.methods import option_names


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
