"""What the activation source records in a supported module's forward hook.

One ``Record`` per call of a supported module with grad enabled and an output that requires grad. It holds
what the Gram contribution of the module's parameters needs besides the per-task output gradients: the
input (``x`` of Linear/Conv/LayerNorm/BatchNorm, the indices of Embedding/EmbeddingBag), the statistics a
BatchNorm in eval mode normalised with, the module's configuration, the version counters of the input and of
the parameters (an in-place change between forward and ``collect`` is refused instead of giving a wrong Gram
matrix), and the gradient edge of the output.

Lifetime. The record is stored in the ``metadata`` dict of the autograd node its output edge points to, so it
lives exactly as long as that node: when the graph is freed (``backward`` without ``retain_graph``, or the
outputs going out of scope) the record and the input it holds go with it. The record never references its
own node or output tensor (that would be a reference cycle through C++ that Python's collector cannot see);
the source finds records by the node's sequence number (a weak registry) and confirms them through the
node's metadata.

Output edge. ``get_gradient_edge(y)`` captured here stays the gradient edge of the module's output even when
``y`` is later modified in place (``ReLU(inplace=True)``): the in-place op gives ``y`` a new ``grad_fn`` but
feeds the old node. When ``y`` is a full view of a fresh tensor (a Linear on 3-D input returns
``addmm(...).view(B, S, out)``), an in-place op on ``y`` rebases the *base's* history and bypasses the view
node, so the edge of the base is recorded instead and the gradient reshaped to ``y``'s shape.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

#: key of the list of records in an autograd node's ``metadata`` dict
METADATA_KEY = "gradsurgery.activation"

#: exact module types (subclasses may change ``forward``: e.g. MultiheadAttention's out_proj is a Linear
#: subclass whose weight is used functionally) → the kind of Gram contribution
SUPPORTED: dict[type[nn.Module], str] = {
    nn.Linear: "linear",
    nn.Embedding: "embedding",
    nn.EmbeddingBag: "embedding_bag",
    nn.Conv1d: "conv",
    nn.Conv2d: "conv",
    nn.Conv3d: "conv",
    nn.LayerNorm: "norm",
    nn.BatchNorm1d: "norm",
    nn.BatchNorm2d: "norm",
    nn.BatchNorm3d: "norm",
}

#: the families whose contributions can be summed into one group (several calls, tied parameters)
FAMILY = {
    "linear": "linear",
    "embedding": "lookup",
    "embedding_bag": "lookup",
    "conv": "conv",
    "norm": "norm",
}


@dataclass(eq=False)
class Record:
    """One recorded call of a supported module (see the module docstring)."""

    module: nn.Module
    kind: str
    params: dict[str, torch.Tensor]  # role ("weight"/"bias") → the tensor the call used
    param_versions: dict[str, int]
    inputs: dict[str, torch.Tensor]  # what the contribution reads (never the output)
    input_versions: dict[str, int]
    config: dict[str, Any]
    out_shape: torch.Size = torch.Size()
    output_nr: int = 0
    # autograd nodes of the call's differentiable inputs: the call's graph ends there
    stops: tuple[Node, ...] = ()
    __weakref__: Any = field(default=None, init=False, repr=False)

    @property
    def family(self) -> str:
        return FAMILY[self.kind]

    def check_versions(self, name_of: Callable[[nn.Module], str]) -> None:
        """Refuse inputs changed in place after the forward (the Gram contribution reads them)."""
        for key, tensor in self.inputs.items():
            if tensor._version != self.input_versions[key]:
                name = name_of(self.module)
                raise ValueError(
                    f"the {key} recorded in the forward of module {name!r} was modified in place before "
                    f"backward (version {self.input_versions[key]} -> {tensor._version}); the activation "
                    "source would form a wrong Gram matrix from it. Avoid in-place changes of a module's "
                    "input after its call, or compute the losses again."
                )


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _trainable(module: nn.Module, roles: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for role in roles:
        p = module._parameters.get(role)
        if p is not None and p.requires_grad:
            out[role] = p
    return out


def build_record(
    module: nn.Module, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Record | None:
    """The record of one call, or None when the call needs none (no trainable parameter) or is a variant
    the activation source does not support (its parameters then take the exact per-parameter path).

    ``kind`` is ``SUPPORTED[type(module)]``: the module is of the class the kind names."""
    params = _trainable(module, ("weight", "bias"))
    if not params:
        return None
    config: dict[str, Any] = {}
    if kind == "linear":
        x = _arg(args, kwargs, 0, "input")
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            return None
        inputs = {"input": x}
    elif kind == "embedding":
        idx = _arg(args, kwargs, 0, "input")
        if not isinstance(idx, torch.Tensor):
            return None
        inputs = {"indices": idx}
        config.update(
            padding_idx=module.padding_idx,
            scale_grad_by_freq=module.scale_grad_by_freq,
            bag=False,
            sparse=module.sparse,
        )
    elif kind == "embedding_bag":
        idx = _arg(args, kwargs, 0, "input")
        offsets = _arg(args, kwargs, 1, "offsets")
        psw = _arg(args, kwargs, 2, "per_sample_weights")
        if not isinstance(idx, torch.Tensor) or module.mode not in ("sum", "mean", "max"):
            return None
        if module.mode == "max" and module.scale_grad_by_freq:
            return None
        inputs = {"indices": idx}
        if offsets is not None:
            inputs["offsets"] = offsets
        if psw is not None:
            inputs["per_sample_weights"] = psw
        config.update(
            padding_idx=module.padding_idx,
            scale_grad_by_freq=module.scale_grad_by_freq,
            mode=module.mode,
            include_last_offset=module.include_last_offset,
            bag=True,
            sparse=module.sparse,
        )
    elif kind == "conv":
        conv = cast(_ConvNd, module)
        x = _arg(args, kwargs, 0, "input")
        if not isinstance(x, torch.Tensor) or conv.transposed:
            return None
        inputs = {"input": x}
        config.update(
            dims=len(conv.kernel_size),
            stride=tuple(conv.stride),
            padding=conv.padding,
            dilation=tuple(conv.dilation),
            groups=conv.groups,
            padding_mode=conv.padding_mode,
            reversed_padding=tuple(conv._reversed_padding_repeated_twice),
            kernel_size=tuple(conv.kernel_size),
        )
    else:  # norm
        x = _arg(args, kwargs, 0, "input")
        if not isinstance(x, torch.Tensor):
            return None
        inputs = {"input": x}
        if isinstance(module, nn.LayerNorm):
            config.update(layer=True, normalized_shape=tuple(module.normalized_shape), eps=module.eps)
        else:
            norm = cast(_NormBase, module)
            running_mean, running_var = norm.running_mean, norm.running_var
            # BatchNorm.forward: batch statistics in training mode or without running statistics.
            batch_stats = norm.training or (running_mean is None and running_var is None)
            config.update(layer=False, eps=norm.eps, batch_stats=batch_stats)
            if not batch_stats:
                if running_mean is None or running_var is None:
                    return None  # one running statistic without the other: no state BatchNorm creates
                # Eval mode normalises with the running statistics of this moment; a later training-mode
                # forward would change them before backward, so a copy (C values) is kept.
                config["running_mean"] = running_mean.detach().clone()
                config["running_var"] = running_var.detach().clone()
    return Record(
        module=module,
        kind=kind,
        params=params,
        param_versions={role: p._version for role, p in params.items()},
        inputs=inputs,
        input_versions={k: t._version for k, t in inputs.items()},
        config=config,
    )


def output_edge(output: torch.Tensor) -> GradientEdge:
    """(gradient edge of the call's output, whether it is the edge of ``output``'s base) — see above."""
    base = output._base
    if (
        base is not None
        and base.requires_grad
        and base.numel() == output.numel()
        and base.is_contiguous()
        and output.is_contiguous()
        and base.storage_offset() == output.storage_offset()
    ):
        return get_gradient_edge(base)
    return get_gradient_edge(output)


def input_stops(tensors: list[Any]) -> tuple[Node, ...]:
    """The autograd nodes of the differentiable inputs: the graph of the call is what lies between its
    output edge and these nodes (and the parameters' AccumulateGrad nodes)."""
    stops: list[Node] = []
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            stops.append(get_gradient_edge(t).node)
    return tuple(stops)


class Registry:
    """Sequence number of an output node → weak references to its records.

    The strong reference lives in the node's metadata; this index only lets ``collect`` look records up by
    ``node._sequence_nr()`` (a fraction of a microsecond) instead of reading every node's metadata (about
    11 µs each: the dict is created on first access). Dead entries are pruned every ``PRUNE_EVERY`` inserts.
    """

    PRUNE_EVERY = 4096

    def __init__(self) -> None:
        self._by_seq: dict[int, list[weakref.ref[Record]]] = {}
        self._inserts = 0

    def add(self, seq: int, record: Record) -> None:
        self._by_seq.setdefault(seq, []).append(weakref.ref(record))
        self._inserts += 1
        if self._inserts >= self.PRUNE_EVERY:
            self.prune()

    def prune(self) -> None:
        self._inserts = 0
        for seq in list(self._by_seq):
            alive = [r for r in self._by_seq[seq] if r() is not None]
            if alive:
                self._by_seq[seq] = alive
            else:
                del self._by_seq[seq]

    def find(self, node: Any) -> list[Record]:
        """The live records whose output edge is ``node`` (confirmed through the node's metadata)."""
        refs = self._by_seq.get(node._sequence_nr())
        if not refs:
            return []
        candidates = [record for r in refs if (record := r()) is not None]
        if not candidates:
            return []
        stored = node.metadata.get(METADATA_KEY, ())
        return [r for r in candidates if any(r is s for s in stored)]

    def __len__(self) -> int:
        return sum(1 for refs in self._by_seq.values() for r in refs if r() is not None)
