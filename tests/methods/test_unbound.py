"""Calls the engine never makes, refused by name instead of failing on None: ``compute_weights(None, ...)``
for a method that reads the Gram matrix, and the state that ``bind`` creates read before the first
``backward`` (both were ``AttributeError: 'NoneType' object has no attribute ...``)."""

from __future__ import annotations

import pytest
import torch

from gradsurgery import METHODS, make_method

#: the methods whose weights are computed from G (the others read only the losses)
READS_GRAM = [
    "aligned_mtl", "cagrad", "gradnorm", "gradvac", "imtl", "l2", "main_aux", "mgda", "mixed", "nash_mtl",
    "pareto", "pcgrad", "upgrad",
]  # fmt: skip


def bound(name: str, num_tasks: int):
    method = make_method(name, **METHODS[name].example_options(num_tasks))
    method.bind(num_tasks)
    return method


@pytest.mark.parametrize("name", READS_GRAM)
def test_gram_none_is_refused_by_methods_that_read_it(name):
    num_tasks = 1 if name == "l2" else 2
    with pytest.raises(TypeError, match=f"method '{name}' needs the Gram matrix"):
        bound(name, num_tasks).compute_weights(None, torch.ones(num_tasks, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(set(METHODS) - set(READS_GRAM)))
def test_methods_that_read_only_the_losses_take_gram_none(name):
    weights = bound(name, 2).compute_weights(None, torch.ones(2, dtype=torch.float64))
    assert weights.shape == (2,)


@pytest.mark.parametrize(
    ("name", "attribute"),
    [
        ("uncertainty", "log_vars"),
        ("uncertainty", "pending_grad"),
        ("gradnorm", "weights"),
        ("gradnorm", "pending_grad"),
        ("famo", "logits"),
    ],
)
def test_learned_state_before_the_first_backward_is_refused(name, attribute):
    with pytest.raises(RuntimeError, match=f"method '{name}' is not bound to its tasks yet"):
        getattr(make_method(name), attribute)


def test_gradnorm_initial_losses_are_unknown_before_the_first_backward():
    assert make_method("gradnorm").initial_losses is None
