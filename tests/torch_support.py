"""What the installed torch offers, for the tests of features that torch gained after the package's lower
bound (``setup.cfg``: torch >= 2.6). These flags let a test check the behaviour the package promises on an
older torch (its fallback), or skip with a reason where the feature under test is torch's own and that torch
lacks it. The suite was run under every torch release from 2.6.0 to 2.12.0 (docs/getting-started.md).

A flag reads torch itself wherever torch offers a probe; the version is read only where the gap lies inside
torch's code (found by those runs: 2.6.0 fails where 2.7.0 passes, and so on)."""

from __future__ import annotations

import torch

#: ``torch.backends.fp32_precision`` and the backends' own ``matmul.fp32_precision``; without them a
#: float32 product's precision is the legacy ``torch.set_float32_matmul_precision`` alone.
PER_BACKEND_MATMUL_PRECISION = hasattr(torch.backends, "fp32_precision")

#: ``torch.compiler.is_exporting``, which ``optimizer._run_eagerly`` needs to call a method directly outside
#: compiled code; without it every call takes ``torch.compiler.disable``'s wrapper.
COMPILER_IS_EXPORTING = hasattr(torch.compiler, "is_exporting")

#: FSDP2 (``fully_shard``) on CPU tensors over gloo: torch 2.6 records a stream event on the CPU, which its
#: CPU stream does not have (``AttributeError: 'Stream' object has no attribute 'record_event'``).
FSDP2_ON_CPU = torch.__version__ >= (2, 7)  # a TorchVersion: compares as a release, local label aside
FSDP2_ON_CPU_REASON = "torch < 2.7: FSDP2 (fully_shard) does not run on CPU tensors"

#: HSDP (``fully_shard`` over a 2-D mesh) on CPU tensors: torch 2.7 asserts that its all-reduce across the
#: replicas recorded a stream event, which it does not on the CPU (``assert all_reduce_event is not None``).
HSDP_ON_CPU = torch.__version__ >= (2, 8)
HSDP_ON_CPU_REASON = "torch < 2.8: HSDP (fully_shard over a 2-D mesh) does not run on CPU tensors"

#: Why the complex scenarios of the data-parallel tests skip where ``dist_harness.gloo_carries_complex``
#: (which asks a process group) says no.
GLOO_COMPLEX_REASON = (
    "this torch's gloo backend cannot broadcast or reduce-scatter complex tensors (Invalid scalar type)"
)
