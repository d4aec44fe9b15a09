"""The Gram matrix G = J Jᵀ of the task gradients: the only d-sized reduction the methods need.

Converting the whole T×d Jacobian to float64 costs more than the backward passes (measured: 32 ms against a
58 ms gradient loop, T = 8, d = 0.66M, one thread). Instead the columns are taken in chunks: each chunk's
product runs in the Jacobian's precision (float32 at least) and the chunk results are summed in float64, so
rounding error grows only within a chunk. Measured on d = 5M, nearly orthogonal gradients: error
4.7e-7·‖g_i‖‖g_j‖ for 64K-column chunks against 2.6e-4 for one float32 product, at the float32 speed.
"""

from __future__ import annotations

import torch

CHUNK = 16384


def gram_matrix(jacobian: torch.Tensor, dtype: torch.dtype = torch.float64, chunk: int = CHUNK) -> torch.Tensor:
    """G = J Jᵀ (T×T) in ``dtype``, accumulated chunk by chunk over the d columns of J (T×d)."""
    if jacobian.dtype == dtype or torch.finfo(jacobian.dtype).bits >= torch.finfo(dtype).bits:
        j = jacobian.to(dtype)
        return j @ j.T
    work = torch.promote_types(jacobian.dtype, torch.float32)
    num_tasks = jacobian.shape[0]
    gram = torch.zeros(num_tasks, num_tasks, dtype=dtype, device=jacobian.device)
    for block in jacobian.split(chunk, dim=1):
        block = block.to(work)
        gram += (block @ block.T).to(dtype)
    return gram
