"""Checkpoints written by gradsurgery 0.1.0 (format version 1) load into this version, and training goes on
exactly as 0.1.0 went on from them (``tests/data/make_checkpoints_v1.py`` recorded what it computed)."""

from __future__ import annotations

import copy
import importlib.util
import pathlib

import pytest
import torch

DATA = pathlib.Path(__file__).resolve().parent / "data"
FIXTURES = torch.load(DATA / "checkpoints_v1.pt", weights_only=True)

_spec = importlib.util.spec_from_file_location("make_checkpoints_v1", DATA / "make_checkpoints_v1.py")
recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe)


# How 0.1.0 computed where today's default differs: another solver (exact, faster), or one backward of the
# summed loss instead of the sum of the per-task gradients (the same gradient, summed in another order).
OPTIONS_OF_0_1_0 = {
    "cagrad": {"solver": "slsqp"},
    "mixed": {"solver": "cvxpy"},
    "nash_mtl": {"solver": "cvxpy"},
    "pareto": {"solver": "cvxpy"},
    "sum": {"diagnostics": True},
}


def resume(method: str, **options):
    fixture = FIXTURES[method]
    assert fixture["optimizer"]["gradsurgery"]["version"] == 1
    net, opt = recipe.make(
        1, method, **options
    )  # another initialisation and seed: the checkpoint replaces them
    net.load_state_dict(fixture["model"])
    opt.load_state_dict(copy.deepcopy(fixture["optimizer"]))  # the optimizer steps its state in place
    return net, recipe.train(net, opt, method, 4, 3)


@pytest.mark.parametrize("method", sorted(FIXTURES))
def test_version_1_checkpoint_resumes_as_0_1_0_did(method):
    net, weights = resume(method, **OPTIONS_OF_0_1_0.get(method, {}))
    assert torch.equal(weights, FIXTURES[method]["weights_after"])
    assert all(
        torch.equal(p, q) for p, q in zip(net.parameters(), FIXTURES[method]["params_after"], strict=True)
    )


@pytest.mark.parametrize("method", sorted(OPTIONS_OF_0_1_0))
def test_version_1_checkpoint_resumes_under_todays_defaults(method):
    """Solvers and the summed backward are not part of the state: today's defaults continue the run to the
    old solver's accuracy (Nash-MTL's sequence of convex problems stopped at a residual of 1e-6)."""
    net, weights = resume(method)
    torch.testing.assert_close(weights, FIXTURES[method]["weights_after"], rtol=1e-5, atol=1e-7)
    for p, q in zip(net.parameters(), FIXTURES[method]["params_after"], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_version_1_generator_is_read_once_from_rng_state():
    """0.1.0 saved a method's generator twice (in method_state and rng_state); the copy in method_state is
    dropped and the state saved now holds it once."""
    fixture = FIXTURES["pcgrad"]
    net, opt = recipe.make(1, "pcgrad")
    opt.load_state_dict(fixture["optimizer"])
    saved = fixture["optimizer"]["gradsurgery"]["rng_state"]["generator"]
    assert torch.equal(opt.method.generator.get_state(), saved)
    ours = opt.state_dict()["gradsurgery"]
    assert ours["version"] == 2 and "generator" not in ours["method_state"]
