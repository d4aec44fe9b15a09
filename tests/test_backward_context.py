"""``GradSurgery.backward`` called inside a context that changes how torch computes: an autocast region
(``torch.autocast``) or ``torch.no_grad()``. Reference: the same step with the call made after the context,
the forward pass unchanged; the fused ``.grad``, weights and Gram matrix must be the same bit for bit, for
every gradient source (Jacobian, activations, representation mode) and the evidence λ.

And under a lowered float32 matrix-product precision (oneDNN's ``fp32_precision = "bf16"``, what
``torch.set_float32_matmul_precision("medium")`` sets), where the reference is the setting each matrix
product ran under, read at the product: IEEE for G's and the fusion's, the user's for the rest.
"""

from __future__ import annotations

import contextlib
import functools
import traceback

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch_support import PER_BACKEND_MATMUL_PRECISION

from gradsurgery import GradSurgery, task_views

KINDS = ["jacobian", "activations", "features", "evidence", "scaled"]


def make() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))


def forward(kind: str, net: nn.Sequential, x: torch.Tensor, backward_options: dict) -> list[torch.Tensor]:
    """The two tasks' outputs; representation mode reads them through task views (added to
    ``backward_options``)."""
    if kind != "features":
        return list(net(x).unbind(1))
    views = task_views(torch.tanh(net[0](x)), 2)
    backward_options["features"] = views
    return [net[2](views[i])[:, i] for i in range(2)]


def step(kind: str, context: str, inside: bool):
    """One step; ``context`` "autocast": the forward pass in a bfloat16 region, the call inside it or after
    it; "no_grad": the call under ``torch.no_grad()`` or not."""
    net = make()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 6, generator=gen), torch.randn(16, generator=gen)
    method, options, backward_options = "mgda", {}, {}
    if kind == "activations":
        options = {"gradient_source": "activations", "model": net}
    elif kind == "evidence":
        method, options = "l2", {"evidence": True, "layers": net, "num_samples": 100}
    elif kind == "scaled":
        backward_options = {"grad_scaler": torch.amp.GradScaler("cpu", init_scale=2.0**4)}
    opt = GradSurgery(torch.optim.SGD(net.parameters(), lr=0.1), method, **options)
    autocast = context == "autocast"
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        out = forward(kind, net, x, backward_options)
        losses = [(out[0].float() - y).pow(2).mean(), (out[1].float() + 2 * y).pow(2).mean()]
        call = functools.partial(
            opt.backward, losses[0] if kind == "evidence" else losses, **backward_options
        )
        if inside and autocast:
            info = call()
    if inside and not autocast:
        with torch.no_grad():
            info = call()
    if not inside:
        info = call()
    return [p.grad for p in net.parameters()], info


def assert_same_step(kind: str, context: str) -> None:
    (grads_in, info_in), (grads_out, info_out) = (step(kind, context, inside) for inside in (True, False))
    for a, b in zip(grads_in, grads_out, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(info_in.weights, info_out.weights)
    assert (info_in.gram is None) == (info_out.gram is None)
    if info_out.gram is not None:
        assert torch.equal(info_in.gram, info_out.gram)
    assert torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("kind", KINDS)
def test_inside_an_autocast_region_is_the_call_after_it(kind):
    """``backward`` turns autocast off for its own work: inside a bfloat16 region its float32 products (the
    Gram matrix's chunks, representation mode's and the evidence rule's) would run in bfloat16."""
    assert_same_step(kind, "autocast")


@pytest.mark.parametrize("kind", KINDS)
def test_under_no_grad_is_the_call_with_gradients_on(kind):
    """``backward`` turns gradients on: under ``torch.no_grad()`` the scaled or reshaped losses it builds
    would leave the graph (the activation source raised an AssertionError from autograd)."""
    assert_same_step(kind, "no_grad")


PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default}
#: the functions whose products run in IEEE float32 whatever the setting
IEEE = {"gram_matrix", "combine"}


class ProductSpy(TorchDispatchMode):
    """Records, for each matrix product, whether a function of ``IEEE`` issued it and the setting oneDNN's
    products ran under at that moment."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in PRODUCTS:
            guarded = any(frame.name in IEEE for frame in traceback.extract_stack())
            self.seen.append((guarded, cpu_matmul_precision()))
        return func(*args, **(kwargs or {}))


# oneDNN's float32 product setting: the backend's own where torch has it, else the legacy global one.
# Its readings: lowered (bfloat16 products), IEEE, and torch's default.
LOWERED, IEEE_READING, DEFAULT = (
    ("bf16", "ieee", "none") if PER_BACKEND_MATMUL_PRECISION else ("medium", "highest", "highest")
)


def cpu_matmul_precision() -> str:
    if PER_BACKEND_MATMUL_PRECISION:
        return torch.backends.mkldnn.matmul.fp32_precision
    return torch.get_float32_matmul_precision()


def set_cpu_matmul_precision(value: str) -> None:
    if PER_BACKEND_MATMUL_PRECISION:
        torch.backends.mkldnn.matmul.fp32_precision = value
    else:
        torch.set_float32_matmul_precision(value)


@pytest.mark.parametrize("kind", ["jacobian", "activations-kernel", "activations-materialize", "features"])
def test_under_a_lowered_matmul_precision_g_and_the_fusion_are_ieee_and_the_rest_the_users(kind):
    """The activation source's kernel form does not use ``gram_matrix``: all of its products follow the
    setting; its materialised form forms the gradient rows in the setting and their Gram in IEEE."""
    net = make()
    options = {}
    if kind.startswith("activations"):
        options = {"gradient_source": "activations", "model": net, "activation_form": kind.split("-")[1]}
    opt = GradSurgery(torch.optim.SGD(net.parameters(), lr=0.1), "mgda", **options)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))
    set_cpu_matmul_precision(LOWERED)
    try:
        backward_options: dict = {}
        out = forward(kind, net, x, backward_options)
        with ProductSpy() as spy:
            opt.backward([out[0].pow(2).mean(), (out[1] - 1).pow(2).mean()], **backward_options)
        assert cpu_matmul_precision() == LOWERED
    finally:
        set_cpu_matmul_precision(DEFAULT)
    guarded = [precision for is_guarded, precision in spy.seen if is_guarded]
    rest = [precision for is_guarded, precision in spy.seen if not is_guarded]
    assert bool(guarded) == (kind != "activations-kernel") and rest
    assert set(guarded) <= {IEEE_READING}
    assert set(rest) == {LOWERED}
