"""Mixed precision: ``opt.backward(losses, grad_scaler=scaler)`` with a ``torch.amp.GradScaler``.

A GradScaler multiplies the loss by a scale s so that small float16 gradients do not flush to zero, and
expects ``.grad`` to hold s·∇L. Fusing the *scaled* task gradients directly is wrong for every method that
is not invariant to a common factor s on all gradients (GradNorm's learned weights, absolute solver
tolerances, a Gram matrix s² too large for the diagnostics in ``StepInfo``), and an overflowed task gradient
must never reach the method. So, per step:

1. each task loss is scaled, L_i·s, and its gradient taken; each task gradient is divided by s (exact when s
   is a power of two, as GradScaler's default schedule keeps it);
2. inf/NaN in any loss or task gradient marks the step as overflowed: the reached parameters' ``.grad`` are
   set to inf so the scaler sees the overflow, the method is *not* called (its RNG, moving averages and
   weights do not advance) and ``info.overflow`` is True;
3. otherwise the method fuses the true gradients, the result is multiplied back by s and written to ``.grad``.

The user's usual ``scaler.unscale_(opt)`` / clipping / ``scaler.step(opt)`` / ``scaler.update()`` then work
unchanged: on an overflowed step ``scaler.step`` skips the optimizer and ``update`` backs the scale off.
(``scaler.step(opt, losses)`` cannot do the per-task scaling: the losses must go through ``backward``.)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch


class LossScaling:
    """The loss scale s of one ``backward``: the losses are multiplied by s before their gradients are
    taken, the task gradients divided by s before the fusion, and the fused gradient multiplied by s again
    before it is written."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler
        self.factor: float | None = None

    @staticmethod
    def of(grad_scaler: Any) -> LossScaling | None:
        """The scaling of an enabled scaler; None without one (a disabled scaler means plain float32)."""
        if grad_scaler is None:
            return None
        if not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
        return LossScaling(grad_scaler) if grad_scaler.is_enabled() else None

    def scale(self, losses: list[torch.Tensor]) -> list[torch.Tensor]:
        """L_i·s for each task (``scaler.scale`` creates the scale tensor on the losses' device if needed)."""
        scaled = [self.scaler.scale(loss) for loss in losses]
        self._read_factor()
        return scaled

    def scale_one(self, loss: torch.Tensor) -> torch.Tensor:
        scaled = self.scaler.scale(loss)
        self._read_factor()
        return scaled

    def _read_factor(self) -> None:
        factor = float(self.scaler.get_scale())
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"the GradScaler's scale must be finite and positive, got {factor}")
        self.factor = factor

    def scale_factor(self) -> float:
        """s, as read when the losses were scaled."""
        if self.factor is None:
            raise RuntimeError("the loss scale is read when the losses are scaled: scale them first")
        return self.factor

    def unscale(self, jacobian: torch.Tensor, others: Iterable[torch.Tensor]) -> None:
        """Divide the task gradients by s in place (exact when s is a power of two)."""
        inv = 1.0 / self.scale_factor()
        jacobian.mul_(inv)
        for g in others:
            g.mul_(inv)

    def rescale(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.scale_factor()


def mark_overflow(params: Iterable[torch.Tensor]) -> None:
    """Make the overflow visible to ``scaler.unscale_``/``scaler.step``: the reached parameters' ``.grad``
    become inf (as an overflowed scaled gradient, added to the accumulated one, would)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.full_like(p, math.inf)
        else:
            p.grad.fill_(math.inf)


def autocast_off(*device_types: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast turned off for each of ``device_types`` where it is on (a null context where it is on for
    none of them).

    ``GradSurgery.backward`` runs inside it: its own products (the Gram matrix, the fusion, the evidence
    rule's factors) are taken in the gradients' precision when it is called inside an autocast region,
    where a float32 ``bmm`` would otherwise run in bfloat16 or float16. Autograd's backward of the forward
    pass is the same either way (its operations' dtypes were fixed by the forward)."""
    on = [device for device in dict.fromkeys(device_types) if torch.is_autocast_enabled(device)]
    if not on:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for device in on:
        stack.enter_context(torch.autocast(device, enabled=False))
    return stack


#: the backend whose float32 matrix products ``torch.set_float32_matmul_precision`` lowers, per device type
_MATMUL_BACKENDS = {"cuda": "cuda", "cpu": "mkldnn"}


def full_precision_matmul(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """float32 matrix products on ``device_type`` in IEEE precision for the duration, the setting restored
    after (a null context where it is IEEE already, the default).

    ``torch.set_float32_matmul_precision("high")`` (or a backend's ``fp32_precision = "tf32"``) makes cuBLAS
    round float32 operands to TF32, 10 mantissa bits, and ``"medium"`` lets oneDNN use bfloat16 on CPUs
    that have it: enough for a network's own products, but the Gram matrix's entries are long sums of
    same-sign products that the package promises to float32 accuracy (on an H200 under ``"high"``, G of
    random Jacobians is 1.2·10⁻⁴ off relative without the guard and 9·10⁻⁹ with it:
    ``benchmarks/matmul_precision.py``).
    The setting is process-wide, so another thread's products in the window run in IEEE float32 too;
    cuDNN's convolutions have their own setting and are not touched; devices other than the CPU and CUDA
    are left as they are. A torch without the per-backend setting gets the global one set to ``"highest"``
    and restored. While ``torch.compile`` traces, a null context: the setting cannot be changed inside a
    graph, whose products follow the setting at compile time."""
    if torch.compiler.is_compiling() or device_type not in _MATMUL_BACKENDS:
        return contextlib.nullcontext()
    backend = getattr(getattr(torch.backends, _MATMUL_BACKENDS[device_type], None), "matmul", None)
    current = getattr(backend, "fp32_precision", None)
    if current is None:
        legacy = torch.get_float32_matmul_precision()
        if legacy == "highest":
            return contextlib.nullcontext()
        return _setting(torch.set_float32_matmul_precision, "highest", legacy)
    if current in ("ieee", "none"):
        return contextlib.nullcontext()
    return _setting(lambda value: setattr(backend, "fp32_precision", value), "ieee", current)


@contextlib.contextmanager
def _setting(set_value: Callable[[str], object], inside: str, outside: str) -> Iterator[None]:
    set_value(inside)
    try:
        yield
    finally:
        set_value(outside)
