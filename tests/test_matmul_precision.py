"""``torch.set_float32_matmul_precision`` and the backends' ``fp32_precision``: ``amp.full_precision_matmul``
makes float32 products IEEE for its duration and restores the setting exactly; ``gram_matrix`` and
``combine`` (the fusion Jᵀw) take their products under it. Which products of a whole ``backward`` run under
it: tests/test_backward_context.py.

References: the backends' own getters (the setting inside, and after against before), G and Jᵀw under
``"highest"`` (on this machine's CPU oneDNN's ``"medium"`` path changes float32 products) and, on a GPU under
TF32, float64 products. A torch without the per-backend setting (2.6 to 2.8) has the legacy one only: the
tests of the per-backend setting skip there, the others check what the legacy setting reads.
"""

from __future__ import annotations

import pytest
import torch
from torch_support import PER_BACKEND_MATMUL_PRECISION

from gradsurgery import amp
from gradsurgery.amp import full_precision_matmul
from gradsurgery.gram import combine, gram_matrix

PER_BACKEND_SETTINGS = {"cuda tf32", "mkldnn bf16", "generic tf32"}
SETTINGS = {
    "legacy high": lambda: torch.set_float32_matmul_precision("high"),
    "legacy medium": lambda: torch.set_float32_matmul_precision("medium"),
    "allow_tf32": lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
    "cuda tf32": lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
    "mkldnn bf16": lambda: setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16"),
    "generic tf32": lambda: setattr(torch.backends, "fp32_precision", "tf32"),
}
needs_per_backend = pytest.mark.skipif(
    not PER_BACKEND_MATMUL_PRECISION, reason="this torch has no per-backend fp32_precision setting"
)


def precision_state() -> dict[str, object]:
    """Every getter of the setting this torch has; a getter that raises (torch refuses to read the legacy
    setting after the new API was used) is recorded by its exception type."""
    getters = {
        "legacy": torch.get_float32_matmul_precision,
        "allow_tf32": lambda: torch.backends.cuda.matmul.allow_tf32,
    }
    if PER_BACKEND_MATMUL_PRECISION:
        getters |= {
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
    if PER_BACKEND_MATMUL_PRECISION:
        torch.backends.fp32_precision = "none"
        torch.backends.cuda.matmul.fp32_precision = "none"
        torch.backends.mkldnn.matmul.fp32_precision = "none"


def assert_ieee() -> None:
    if PER_BACKEND_MATMUL_PRECISION:
        # "none": the backend was not lowered, and inherits the default
        assert torch.backends.cuda.matmul.fp32_precision in ("ieee", "none")
        assert torch.backends.mkldnn.matmul.fp32_precision in ("ieee", "none")
    else:
        assert torch.get_float32_matmul_precision() == "highest"
        assert not torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize(
    "setting",
    [pytest.param(s, marks=needs_per_backend) if s in PER_BACKEND_SETTINGS else s for s in sorted(SETTINGS)],
)
def test_inside_the_products_are_ieee_and_after_the_setting_is_as_before(setting):
    SETTINGS[setting]()
    before = precision_state()
    if not PER_BACKEND_MATMUL_PRECISION:
        assert before["legacy"] != "highest"  # the setting lowered the precision
    with full_precision_matmul("cpu"), full_precision_matmul("cuda"):
        assert_ieee()
    assert precision_state() == before
    with pytest.raises(KeyError), full_precision_matmul("cpu"), full_precision_matmul("cuda"):
        raise KeyError("inside")
    assert precision_state() == before


def test_the_default_setting_is_left_untouched():
    """A null context: nothing written, so the backends still read "none" (inherit), not "ieee"."""
    before = precision_state()
    with full_precision_matmul("cpu"), full_precision_matmul("cuda"):
        assert precision_state() == before
    if PER_BACKEND_MATMUL_PRECISION:
        assert torch.backends.cuda.matmul.fp32_precision == "none"


def test_other_devices_are_left_as_they_are():
    torch.set_float32_matmul_precision("medium")
    with full_precision_matmul("meta"):
        assert torch.get_float32_matmul_precision() == "medium"
        if PER_BACKEND_MATMUL_PRECISION:
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("columns", [1 << 20, 5_000_003])
def test_on_cuda_under_tf32_g_and_the_fusion_are_float32_accurate(columns):
    """With TF32 on (``"high"``), G relative to ‖g_i‖‖g_j‖ and Jᵀw relative to Σ|w_i J_i| stay within
    float32 rounding of the float64 products (in TF32, G was 1.2·10⁻⁴ and 6.5·10⁻⁶ off on an H200)."""
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
