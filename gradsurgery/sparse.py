"""Sparse gradients: an ``nn.Embedding(sparse=True)`` or ``nn.EmbeddingBag(sparse=True)`` table gets a sparse
``.grad``, which only some optimizers step on. The check runs when the optimizer is built, so a mismatch is
an error before training instead of an optimizer failure after a backward."""

from __future__ import annotations

import torch
from torch import nn

#: Optimizers of ``torch.optim`` that accept sparse gradients (their subclasses too).
SPARSE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.SparseAdam,
    torch.optim.Adagrad,
)


def sparse_tables(model: nn.Module) -> dict[int, str]:
    """id(weight) → module name of every embedding table with ``sparse=True`` in ``model``."""
    out: dict[int, str] = {}
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.Embedding | nn.EmbeddingBag)
            and module.sparse
            and module.weight.requires_grad
        ):
            out.setdefault(id(module.weight), name or type(module).__name__)
    return out


def holder_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.optim.Optimizer:
    """The optimizer that steps ``param``: ``optimizer`` itself, or the member of a ``MultiOptimizer``."""
    members = getattr(optimizer, "optimizers", None)
    if members is None:
        return optimizer
    holder: torch.optim.Optimizer = next(
        m for m in members if any(p is param for g in m.param_groups for p in g["params"])
    )
    return holder


def check_sparse_support(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """ValueError naming the table when a sparse table is stepped by an optimizer that refuses sparse
    gradients (Adam, AdamW, RMSprop, …)."""
    tables = sparse_tables(model)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in tables:
                continue
            holder = holder_of(optimizer, p)
            if not isinstance(holder, SPARSE_OPTIMIZERS):
                raise ValueError(
                    f"module {tables[id(p)]!r} has sparse=True, so its weight gets sparse gradients, but the "
                    f"optimizer stepping it ({type(holder).__name__}) does not accept sparse gradients: step "
                    "the tables with torch.optim.SparseAdam, Adagrad or SGD and the rest with your optimizer "
                    "(gradsurgery.MultiOptimizer(SparseAdam(tables), Adam(rest))), or use sparse=False"
                )
