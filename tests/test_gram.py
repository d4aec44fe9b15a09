"""The chunked Gram matrix against a float64 reference."""

import numpy as np
import pytest
import torch

import gradsurgery.gram as gram_module
from gradsurgery import gram_matrix
from gradsurgery.gram import combine


def relative_error(got: torch.Tensor, jac: torch.Tensor) -> float:
    """max |G − J Jᵀ| / (‖g_i‖ ‖g_j‖), J Jᵀ the float64 product of J's values."""
    exact = jac.double() @ jac.double().T
    scale = torch.outer(exact.diagonal().sqrt(), exact.diagonal().sqrt())
    return float(((got.double().cpu() - exact).abs() / scale).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 1000, 16384])
def test_matches_float64_product(dtype, chunk):
    gen = torch.Generator().manual_seed(0)
    jac = torch.randn(5, 3001, generator=gen).to(dtype)
    got = gram_matrix(jac, chunk=chunk)
    assert got.dtype == torch.float64 and got.shape == (5, 5)
    assert relative_error(got, jac) < (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_a_complex_jacobian_gives_the_real_part_of_j_jh(dtype):
    """G_ij = Re Σ conj(J_ik) J_jk, the Gram matrix of the real view (J J^T of a complex J is not one)."""
    gen = torch.Generator().manual_seed(2)
    jac = torch.view_as_complex(torch.randn(4, 3001, 2, generator=gen, dtype=torch.float64)).to(dtype)
    exact = jac.to(torch.complex128)
    expected = (exact @ exact.conj().T).real
    got = gram_matrix(jac, chunk=1000)
    assert got.dtype == torch.float64
    norms = expected.diagonal().sqrt()
    error = float(((got - expected).abs() / torch.outer(norms, norms)).max())
    assert error < (1e-14 if dtype == torch.complex128 else 1e-6)


@pytest.mark.parametrize("gram_dtype", [torch.float64, torch.float32])
def test_long_same_sign_sums_keep_their_precision(gram_dtype):
    """Gradients with a common component (so ‖g‖² and ⟨g_i, g_j⟩ are long sums of same-sign terms), d = 2M,
    float32: one float32 accumulator loses ~1e-4 of ‖g_i‖² here (how much a float32 product loses depends on
    how the BLAS blocks its sums); the chunked sum must stay within 1e-6, in a float32 G too (one float32
    product puts it 1.9e-4 off)."""
    gen = torch.Generator().manual_seed(1)
    jac = torch.randn(4, 2_000_000, generator=gen) * torch.tensor([[1.0], [1e-3], [1.0], [10.0]]) + 0.01
    got = gram_matrix(jac, dtype=gram_dtype)
    assert got.dtype == gram_dtype
    assert relative_error(got, jac) <= 1e-6
    # the case is a real test: summed in order in one float32 accumulator, ‖g_0‖² is off by ~1e-3
    one_accumulator = float(np.add.accumulate((jac[0] * jac[0]).numpy(), dtype=np.float32)[-1])
    sq_norm = float(jac[0].double().square().sum())
    assert abs(one_accumulator - sq_norm) / sq_norm > 1e-5


def test_float64_dtype_requested_lower():
    """A float64 J is multiplied in float64 and only the result rounded to the requested float32."""
    gen = torch.Generator().manual_seed(4)
    jac = torch.randn(3, 100_000, generator=gen, dtype=torch.float64) + 0.01
    got = gram_matrix(jac, dtype=torch.float32)
    assert got.dtype == torch.float32
    assert torch.equal(got, (jac @ jac.T).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_no_columns_give_a_zero_matrix(dtype):
    got = gram_matrix(torch.ones(3, 0, dtype=dtype))
    assert got.dtype == torch.float64 and torch.equal(got, torch.zeros(3, 3, dtype=torch.float64))


def test_float16_jacobian_with_a_float32_gram_sums_its_chunks():
    """float16 columns are multiplied in float32 and the chunks summed in the requested float32."""
    gen = torch.Generator().manual_seed(2)
    jac = torch.randn(3, 50, generator=gen).half()
    exact = jac.double() @ jac.double().T
    got = gram_matrix(jac, dtype=torch.float32, chunk=7)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("chunks_per_group", [1, 2, 3, 50])
@pytest.mark.parametrize("columns", [6 * 7, 6 * 7 + 3, 7 * 7 + 1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_groups_of_chunks_give_the_float64_product(chunks_per_group, columns, dtype, monkeypatch):
    """Chunks multiplied a group at a time (groups of 1, 2, 3 or all chunks; columns filling whole chunks,
    with a remainder, or fewer than one chunk) give the float64 product to float32 rounding: a chunk lost or
    counted twice would be off by a sixth of G or more."""
    t, chunk = 4, 7
    monkeypatch.setattr(gram_module, "GROUP_ELEMENTS", chunks_per_group * t * chunk)
    gen = torch.Generator().manual_seed(columns)
    jac = (torch.randn(t, columns, generator=gen) + 0.5).to(dtype)
    # a non-contiguous J (the transpose of a column-major buffer) is read in place just the same
    strided = jac.T.contiguous().T
    assert not strided.is_contiguous()
    for got in (gram_matrix(jac, chunk=chunk), gram_matrix(strided, chunk=chunk)):
        assert got.dtype == torch.float64
        assert relative_error(got, jac) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("columns", [3001, 16384 * 70 + 5])
def test_on_cuda_matches_the_float64_product(columns, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    gen = torch.Generator().manual_seed(3)
    jac = torch.randn(6, columns, generator=gen) * torch.tensor([[1.0], [1e-3], [1.0], [10.0], [2.0], [0.5]])
    got = gram_matrix(jac.cuda())
    assert got.device.type == "cuda" and got.dtype == torch.float64
    assert relative_error(got, jac) <= 1e-6


@pytest.mark.parametrize(
    ("chunk", "error", "message"),
    [
        (0, ValueError, "chunk must be >= 1, got 0"),
        (-5, ValueError, "chunk must be >= 1, got -5"),
        (2.0, TypeError, "chunk must be an int, got 2.0"),
        (True, TypeError, "chunk must be an int, got True"),
    ],
)
def test_a_chunk_that_is_not_a_positive_int_is_refused(chunk, error, message):
    with pytest.raises(error, match=message):
        gram_matrix(torch.ones(2, 5), chunk=chunk)


@pytest.mark.parametrize("columns", [1000, 3 * 16384 + 5])
def test_inside_an_autocast_region_is_the_product_outside_it(columns):
    """A float32 J inside a bfloat16 autocast region: the chunks' products are still float32 (autocast is
    turned off for them), so G is the one computed outside the region, bit for bit."""
    jacobian = torch.randn(3, columns, generator=torch.Generator().manual_seed(5))
    outside = gram_matrix(jacobian)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = gram_matrix(jacobian)
        assert torch.is_autocast_enabled("cpu")
    assert torch.equal(inside, outside)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("columns", [1000, 3 * (1 << 20) + 7])
def test_a_half_precision_fusion_is_rounded_once(dtype, columns, device):
    """Σ_i w_i J_i of a half-precision J: the float64 result rounded to J's dtype in all but ties of the
    double rounding (float32, then J's dtype), within one rounding of it everywhere."""
    gen = torch.Generator().manual_seed(9)
    jac = torch.randn(4, columns, generator=gen).to(dtype)
    weights = torch.tensor([0.123456789, 0.234567891, 0.345678912, 0.296296408], dtype=torch.float64)
    exact = weights @ jac.double()
    got = combine(weights, jac.to(device)).cpu()
    assert got.dtype == dtype and got.shape == (columns,)
    assert float((got == exact.to(dtype)).double().mean()) >= 0.999
    error = (got.double() - exact).abs() / (weights @ jac.double().abs())
    assert float(error.max()) <= torch.finfo(dtype).eps
