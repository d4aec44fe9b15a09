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


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, DATA / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


recipe = _load("make_checkpoints_v1")


def _cpu_vendor() -> str:
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("vendor_id")), "")


#: whether this machine's CPU kernels sum in the order of the machine that recorded the fixtures (another
#: CPU, BLAS or thread count rounds sums differently, and a continuation then agrees to rounding only): the
#: probe reproduces bit for bit, on an Intel CPU running torch's AVX-512 kernels (taken to be the recording
#: machine's kind). The probe alone is not enough: on an AMD EPYC with AVX2 only it reproduced while the
#: continuations of the eight Gram-based methods differed in their last bits (kernels the probe does not
#: run; under ATEN_CPU_CAPABILITY=default or MKL_CBWR=COMPATIBLE the probe differs there too).
SAME_KERNELS = (
    _cpu_vendor() == "GenuineIntel"
    and torch.backends.cpu.get_cpu_capability() == "AVX512"
    and all(
        torch.equal(a, b)
        for a, b in zip(
            _load("make_platform_probe").probe(), torch.load(DATA / "platform_probe.pt"), strict=True
        )
    )
)


# How 0.1.0 computed where today's default differs: another solver (exact, faster), or one backward of the
# weighted loss instead of the sum of the per-task gradients (the same gradient, summed in another order).
OPTIONS_OF_0_1_0 = {
    "cagrad": {"solver": "slsqp"},
    "mixed": {"solver": "cvxpy"},
    "nash_mtl": {"solver": "cvxpy"},
    "pareto": {"solver": "cvxpy"},
    "sum": {"diagnostics": True},
    "dwa": {"diagnostics": True},
    "uncertainty": {"diagnostics": True},
}
#: 0.1.0's defaults that are part of a method's state and have changed since: such a checkpoint resumes
#: only with those options spelled out (today's defaults are refused by name, test_changed_defaults_...)
STATE_OPTIONS_OF_0_1_0 = {"l2": {"decoupled": False, "per_tensor": False}}


def resume(method: str, **options):
    fixture = FIXTURES[method]
    assert fixture["optimizer"]["gradsurgery"]["version"] == 1
    net, opt = recipe.make(
        1, method, **options
    )  # another initialisation and seed: the checkpoint replaces them
    net.load_state_dict(fixture["model"])
    opt.load_state_dict(copy.deepcopy(fixture["optimizer"]))  # the optimizer steps its state in place
    return net, recipe.train(net, opt, method, 4, 3)


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    if SAME_KERNELS:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", sorted(FIXTURES))
def test_version_1_checkpoint_resumes_as_0_1_0_did(method):
    options = OPTIONS_OF_0_1_0.get(method, {}) | STATE_OPTIONS_OF_0_1_0.get(method, {})
    net, weights = resume(method, **options)
    assert_same(weights, FIXTURES[method]["weights_after"])
    for p, q in zip(net.parameters(), FIXTURES[method]["params_after"], strict=True):
        assert_same(p.detach(), q)


@pytest.mark.parametrize("method", sorted(STATE_OPTIONS_OF_0_1_0))
def test_changed_defaults_refuse_an_old_checkpoint_by_name(method):
    """Loading under today's defaults would silently change the run: it is a ValueError naming the
    options, and nothing is loaded."""
    fixture = FIXTURES[method]
    net, opt = recipe.make(1, method)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=f"different '{method}' options") as raised:
        opt.load_state_dict(copy.deepcopy(fixture["optimizer"]))
    for name in STATE_OPTIONS_OF_0_1_0[method]:
        assert name in str(raised.value)
    after = opt.state_dict()
    assert after["state"] == before["state"] and after["gradsurgery"].keys() == before["gradsurgery"].keys()


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
