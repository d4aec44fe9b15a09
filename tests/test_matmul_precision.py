"""``torch.set_float32_matmul_precision`` and the backends' ``fp32_precision``: the Gram matrix of a
Jacobian or of a block of gradient rows (``gram_matrix``) and the fusion Jᵀw (``combine``) run in IEEE float32
whatever they say; every other product (the model's backward, the activation source's gradient rows and
kernel form, which are compute-bound) keeps what the user chose; the setting is restored exactly.

References: the backends' own getters (the setting each product saw, read by a dispatch mode at the product;
the setting after the call against the one before) and, on this machine's CPU, where oneDNN's bfloat16
products change float32 results, G under ``"highest"``.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gradsurgery import GradSurgery, amp, task_views
from gradsurgery.amp import full_precision_matmul
from gradsurgery.gram import combine, gram_matrix

aten = torch.ops.aten
PRODUCTS = {aten.mm.default, aten.bmm.default, aten.addmm.default, aten.mv.default, aten.dot.default}
#: the functions whose products run in IEEE float32
OWN = {"gram_matrix", "combine"}

SETTINGS = {
    "legacy high": lambda: torch.set_float32_matmul_precision("high"),
    "legacy medium": lambda: torch.set_float32_matmul_precision("medium"),
    "allow_tf32": lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
    "cuda tf32": lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
    "mkldnn bf16": lambda: setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16"),
    "generic tf32": lambda: setattr(torch.backends, "fp32_precision", "tf32"),
}


def precision_state() -> dict[str, object]:
    """Every getter of the setting; a getter that raises (torch refuses to read the legacy setting after
    the new API was used) is recorded by its exception type."""
    getters = {
        "legacy": torch.get_float32_matmul_precision,
        "allow_tf32": lambda: torch.backends.cuda.matmul.allow_tf32,
        "generic": lambda: torch.backends.fp32_precision,
        "cuda": lambda: torch.backends.cuda.matmul.fp32_precision,
        "mkldnn": lambda: torch.backends.mkldnn.matmul.fp32_precision,
    }
    state: dict[str, object] = {}
    for name, get in getters.items():
        try:
            state[name] = get()
        except RuntimeError as error:
            state[name] = type(error)
    return state


@pytest.fixture(autouse=True)
def default_precision():
    """Each test starts from and leaves torch's default setting."""
    yield
    torch.set_float32_matmul_precision("highest")
    torch.backends.fp32_precision = "none"
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.backends.mkldnn.matmul.fp32_precision = "none"


class ProductSpy(TorchDispatchMode):
    """Records, for each matrix product, whether a function of ``OWN`` issued it and the setting it ran
    under."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in PRODUCTS:
            own = any(frame.name in OWN for frame in traceback.extract_stack())
            device = args[0].device.type
            backend = torch.backends.cuda.matmul if device == "cuda" else torch.backends.mkldnn.matmul
            self.seen.append((own, device, backend.fp32_precision))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_inside_the_products_are_ieee_and_after_the_setting_is_as_before(setting):
    SETTINGS[setting]()
    before = precision_state()
    with full_precision_matmul("cpu"), full_precision_matmul("cuda"):
        # "none": the backend was not lowered, and inherits the default
        assert torch.backends.cuda.matmul.fp32_precision in ("ieee", "none")
        assert torch.backends.mkldnn.matmul.fp32_precision in ("ieee", "none")
    assert precision_state() == before
    with pytest.raises(KeyError), full_precision_matmul("cpu"), full_precision_matmul("cuda"):
        raise KeyError("inside")
    assert precision_state() == before


def test_the_default_setting_is_left_untouched():
    """A null context: nothing written, so the backends still read "none" (inherit), not "ieee"."""
    before = precision_state()
    with full_precision_matmul("cpu"), full_precision_matmul("cuda"):
        assert precision_state() == before
    assert torch.backends.cuda.matmul.fp32_precision == "none"


def test_other_devices_are_left_as_they_are():
    torch.set_float32_matmul_precision("medium")
    with full_precision_matmul("meta"):
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_without_the_per_backend_setting_the_global_one_is_raised_and_restored(monkeypatch):
    """A torch without ``fp32_precision`` (read here as a backend that does not exist)."""
    monkeypatch.setitem(amp._MATMUL_BACKENDS, "cpu", "no_such_backend")
    torch.set_float32_matmul_precision("medium")
    with full_precision_matmul("cpu"):
        assert torch.get_float32_matmul_precision() == "highest"
    assert torch.get_float32_matmul_precision() == "medium"
    torch.set_float32_matmul_precision("highest")
    with full_precision_matmul("cpu"):
        assert torch.get_float32_matmul_precision() == "highest"


@pytest.mark.parametrize("columns", [1000, 3 * 16384 + 5])
def test_the_gram_matrix_under_medium_is_the_one_under_highest(columns):
    """On a CPU with bfloat16 support oneDNN changes float32 products under "medium" (on this project's
    machines G moved by 10⁻⁷ relative); G and Jᵀw must not move."""
    gen = torch.Generator().manual_seed(7)
    jacobian = torch.randn(4, columns, generator=gen) + 0.1
    weights = torch.rand(4, generator=gen)
    exact = gram_matrix(jacobian), combine(weights, jacobian)
    torch.set_float32_matmul_precision("medium")
    assert torch.equal(gram_matrix(jacobian), exact[0])
    assert torch.equal(combine(weights, jacobian), exact[1])


def spied_step(kind: str, setting: str) -> ProductSpy:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    options = {}
    if kind.startswith("activations"):
        options = {"gradient_source": "activations", "model": net, "activation_form": kind.split("-")[1]}
    opt = GradSurgery(torch.optim.SGD(net.parameters(), lr=0.1), "mgda", **options)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 6, generator=gen)
    SETTINGS[setting]()
    before = precision_state()
    backward_options = {}
    if kind == "features":
        views = task_views(torch.tanh(net[0](x)), 2)
        out = [net[2](views[i])[:, i] for i in range(2)]
        backward_options = {"features": views}
    else:
        out = list(net(x).unbind(1))
    losses = [out[0].pow(2).mean(), (out[1] - 1).pow(2).mean()]
    with ProductSpy() as spy:
        opt.backward(losses, **backward_options)
    assert precision_state() == before
    return spy


@pytest.mark.parametrize("kind", ["jacobian", "activations-kernel", "activations-materialize", "features"])
@pytest.mark.parametrize("setting", ["legacy medium", "mkldnn bf16"])
def test_backward_takes_g_and_the_fusion_in_ieee_and_leaves_the_rest_to_the_user(kind, setting):
    """The activation source's kernel form does not use ``gram_matrix``: all of its products follow the
    setting; its materialised form forms the gradient rows in the setting and their Gram in IEEE."""
    spy = spied_step(kind, setting)
    own = [precision for is_own, _, precision in spy.seen if is_own]
    rest = [precision for is_own, _, precision in spy.seen if not is_own]
    assert bool(own) == (kind != "activations-kernel") and rest
    assert set(own) <= {"ieee"}
    assert set(rest) == {"bf16"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("columns", [1 << 20, 5_000_003])
def test_on_cuda_under_tf32_g_and_the_fusion_are_float32_accurate(columns):
    """With TF32 on (``"high"``), G relative to ‖g_i‖‖g_j‖ and Jᵀw relative to Σ|w_i J_i| stay within
    float32 rounding of the float64 products (TF32 alone would be off by about 10⁻⁴-10⁻³)."""
    gen = torch.Generator().manual_seed(11)
    jacobian = torch.randn(4, columns, generator=gen) * torch.rand(4, 1, generator=gen) + 0.01
    weights = torch.rand(4, generator=gen)
    exact = jacobian.double() @ jacobian.double().T
    scale = torch.outer(exact.diagonal().sqrt(), exact.diagonal().sqrt())
    exact_fused = weights.double() @ jacobian.double()
    fused_scale = weights.double() @ jacobian.double().abs()
    torch.set_float32_matmul_precision("high")
    gram = gram_matrix(jacobian.cuda()).cpu()
    fused = combine(weights.cuda(), jacobian.cuda()).cpu()
    assert float(((gram - exact).abs() / scale).max()) < 1e-6
    assert float(((fused.double() - exact_fused).abs() / fused_scale).max()) < 1e-6
    assert torch.get_float32_matmul_precision() == "high"
