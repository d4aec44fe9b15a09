"""The chunked Gram matrix against a float64 reference."""

import pytest
import torch

from gradsurgery import gram_matrix


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 1000, 16384])
def test_matches_float64_product(dtype, chunk):
    gen = torch.Generator().manual_seed(0)
    jac = torch.randn(5, 3001, generator=gen).to(dtype)
    exact = jac.double() @ jac.double().T
    got = gram_matrix(jac, chunk=chunk)
    assert got.dtype == torch.float64 and got.shape == (5, 5)
    scale = torch.outer(exact.diagonal().sqrt(), exact.diagonal().sqrt())
    assert ((got - exact).abs() / scale).max() < (1e-12 if dtype == torch.float64 else 1e-5)


def test_small_inner_product_survives_large_dimension():
    """Nearly orthogonal float32 gradients over d = 2M entries: the chunked float64 accumulation keeps the
    small inner product to 1e-4 of its value, where a single float32 product is far worse."""
    gen = torch.Generator().manual_seed(1)
    d = 2_000_000
    a = torch.randn(d, generator=gen, dtype=torch.float64)
    b = torch.randn(d, generator=gen, dtype=torch.float64)
    b = b - (a @ b) / (a @ a) * a + 1e-3 * a
    jac = torch.stack([a, b]).float()
    exact = jac.double() @ jac.double().T
    got = gram_matrix(jac)
    assert abs(got[0, 1] - exact[0, 1]) <= 1e-4 * abs(exact[0, 1])


def test_float64_dtype_requested_lower():
    jac = torch.randn(3, 10, dtype=torch.float64)
    assert gram_matrix(jac, dtype=torch.float32).dtype == torch.float32
