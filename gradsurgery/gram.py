"""The Gram matrix G = J Jᵀ of the task gradients, the only d-sized reduction the methods need, and the
fused gradient Jᵀw, the only d-sized product the write-back needs.

Converting the whole T×d Jacobian to float64 costs more than the backward passes (measured: 32 ms against a
58 ms gradient loop, T = 8, d = 0.66M, one thread). Instead the columns are taken in chunks: each chunk's
product runs in the Jacobian's precision (float32 at least) and the chunk results are summed in G's dtype
(float64 by default, float32 at least), so rounding error grows only within a chunk; only a float64
Jacobian is multiplied in one product. Measured (4 float32 gradients sharing a small common component,
so ‖g‖² and ⟨g_i, g_j⟩ are long same-sign sums; max error over G relative to ‖g_i‖‖g_j‖, 3 seeds):
d = 0.66M: one float32 product 3.5e-5 to 4.0e-5, chunked 1.9e-7 to 2.4e-7; d = 5M: 7.4e-4 against
1.4e-7 to 1.7e-7; the chunked product runs at float32 speed (8.6 ms against 147 ms for float64, T = 3,
d = 5M). A float32 G is chunked too: one float32 product would be both less accurate (7.3e-4 against 1.5e-7 at
d = 5M, T = 4) and slower (12.0 against 6.3 ms, one thread).

The full chunks are multiplied a group at a time by one batched product over a (chunks × T × chunk) view of
J, ⌊2²² / (T·chunk)⌋ chunks per group, instead of one product per chunk: a kernel launch per chunk costs host
time whatever its size, which on a GPU made representation-mode steps with large batches several times
slower (batch 32768 × 256 features is 512 chunks). The group bounds the memory of converting a
low-precision J to float32. On the CPU, with the default chunk, G came out bit-identical to the
chunk-by-chunk loop's on every case tried (float32, float16 and bfloat16 J, T = 1-16, d up to 1M) in
0.47-0.89× its time (T = 2-8, d = 33k-8.4M, one thread); a float32 G sums the chunks in another order. On an
H100, 0.02-0.09× its time for d = 1M-34M.
"""

from __future__ import annotations

import torch

from ._validation import check_int
from .amp import autocast_off, full_precision_matmul

CHUNK = 16384
GROUP_ELEMENTS = 1 << 22


_REAL_DTYPES = {
    torch.complex32: torch.float16,
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
}


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``real_view`` of a tensor of ``dtype``."""
    return _REAL_DTYPES.get(dtype, dtype)


def real_view(tensor: torch.Tensor) -> torch.Tensor:
    """A complex tensor as its real and imaginary parts (``torch.view_as_real``, a view), how ``torch.optim``
    reads a complex parameter; a real tensor as it is."""
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def gram_matrix(
    jacobian: torch.Tensor, dtype: torch.dtype = torch.float64, chunk: int = CHUNK
) -> torch.Tensor:
    """G = J Jᵀ (T×T) in ``dtype``, accumulated chunk by chunk over the d columns of J (T×d); for a complex J,
    G = Re(J Jᴴ), the Gram matrix of its real view (two real columns per entry).

    Cost: T²·d multiply-adds in J's precision (float32 at least; inside an autocast region too, which is
    turned off for them; IEEE float32 whatever ``torch.set_float32_matmul_precision`` says, see
    ``gradsurgery.amp.full_precision_matmul``), T×T sums in ``dtype`` per chunk, and about three kernels per
    group of chunks (see the module docstring).
    """
    chunk = check_int(chunk, "chunk", minimum=1)
    if jacobian.is_complex():
        jacobian = real_view(jacobian).reshape(jacobian.shape[0], -1)
    device_type = jacobian.device.type
    with autocast_off(device_type), full_precision_matmul(device_type):
        return _chunked_gram(jacobian, dtype, chunk)


def _chunked_gram(jacobian: torch.Tensor, dtype: torch.dtype, chunk: int) -> torch.Tensor:
    if torch.finfo(jacobian.dtype).bits >= 64:  # float64 products: nothing for the chunks to keep
        return (jacobian @ jacobian.T).to(dtype)
    work = torch.promote_types(jacobian.dtype, torch.float32)
    accumulate = torch.promote_types(dtype, torch.float32)

    t, d = jacobian.shape
    full = d // chunk
    gram: torch.Tensor | None = None
    if full:
        blocks = jacobian.unfold(1, chunk, chunk).transpose(0, 1)
        per_group = max(1, GROUP_ELEMENTS // max(1, t * chunk))
        for start in range(0, full, per_group):
            group = blocks[start : start + per_group].to(work)
            part = torch.bmm(group, group.transpose(1, 2)).to(accumulate).sum(0)
            gram = part if gram is None else gram.add_(part)
    if gram is None or d > full * chunk:
        last = jacobian[:, full * chunk :].to(work)
        part = (last @ last.T).to(accumulate)
        gram = part if gram is None else gram.add_(part)
    return gram.to(dtype)


def combine(weights: torch.Tensor, jacobian: torch.Tensor) -> torch.Tensor:
    """u = Jᵀw = Σ_i w_i J_i (d) for the T weights and the T×d rows of J, in J's dtype and on its device.

    Cost: T·d multiply-adds in IEEE float32 (or J's wider precision) whatever
    ``torch.set_float32_matmul_precision`` says: one product for a float32 or float64 J. cuBLAS on an H200
    and oneDNN on the CPU measured take this one-row product in full precision under ``"high"``/``"medium"``
    anyway (the same error either way, ``benchmarks/matmul_precision.py``), but neither library promises it;
    the guard costs 7-16 µs of host time on that GPU where the setting is lowered, and one read of the
    setting where it is not. A float16 or bfloat16 J is taken in float32 a group of columns at a time (at
    most ``GROUP_ELEMENTS`` converted at once) and rounded once: in J's own dtype the weights are rounded and
    the T terms summed with rounding, and a third of the entries missed the correctly rounded u (the worst
    by 1.4-1.5× the rounding error, T = 4).
    """
    work = torch.promote_types(jacobian.dtype, torch.float32)
    w = weights.to(device=jacobian.device, dtype=work)
    with full_precision_matmul(jacobian.device.type):
        if work == jacobian.dtype:
            return w @ jacobian
        t, d = jacobian.shape
        fused = jacobian.new_empty(d)
        width = max(1, GROUP_ELEMENTS // max(1, t))
        for start in range(0, d, width):
            fused[start : start + width] = w @ jacobian[:, start : start + width].to(work)
        return fused
