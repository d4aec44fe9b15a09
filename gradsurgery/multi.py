"""Several optimizers stepped as one: the usual recommendation-model setup of ``SparseAdam`` for the sparse
embedding tables and ``Adam`` for the dense part, behind the single optimizer ``GradSurgery`` wraps.

    tables = [p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()]
    dense = [p for p in model.parameters() if all(p is not t for t in tables)]
    opt = GradSurgery(MultiOptimizer(SparseAdam(tables, lr=1e-2), Adam(dense, lr=1e-3)), "mgda", model=model)

``param_groups`` lists the members' own group dicts (an LR scheduler on the whole changes each member's
rates), ``state`` reads every member's state, ``step``/``zero_grad`` run every member, and the state dict
holds each member's state dict in order.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any, cast

import torch

from .optimizer import GradSurgery


class MultiOptimizer(torch.optim.Optimizer):
    """Steps each of ``optimizers`` on its own parameters (which no two of them may share)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        if not optimizers:
            raise ValueError("MultiOptimizer needs at least one optimizer")
        seen: set[int] = set()
        for k, opt in enumerate(optimizers):
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"optimizer {k} is a {type(opt).__name__}, not a torch.optim.Optimizer")
            if isinstance(opt, MultiOptimizer | GradSurgery):
                raise TypeError(
                    f"optimizer {k} ({type(opt).__name__}) cannot be a member of a MultiOptimizer"
                )
            params = {id(p) for g in opt.param_groups for p in g["params"]}
            if params & seen:
                raise ValueError(f"optimizer {k} holds parameters another member holds already")
            seen |= params
        # The base initialiser creates the hook registries; groups and state are then the members' own.
        super().__init__([{"params": g["params"]} for opt in optimizers for g in opt.param_groups], {})
        self.optimizers = list(optimizers)
        self.param_groups = [g for opt in optimizers for g in opt.param_groups]
        self.state = collections.ChainMap(*(opt.state for opt in optimizers))  # type: ignore[assignment]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Called by the base initialiser before ``self.optimizers`` exists: the groups are the members' own.
        if "optimizers" in self.__dict__:
            raise TypeError("add the parameter group to one of the MultiOptimizer's members instead")

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        members = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(members, list) or len(members) != len(self.optimizers):
            raise ValueError(
                f"expected the state dict of a MultiOptimizer of {len(self.optimizers)} optimizers, got "
                f"{type(state_dict).__name__}"
                + (f" with {len(members)} members" if isinstance(members, list) else "")
            )
        for opt, member in zip(self.optimizers, members, strict=True):
            opt.load_state_dict(member)
        # The members' loaders replace their group lists: refill ours in place, so holders keep seeing them.
        self.param_groups[:] = [g for opt in self.optimizers for g in opt.param_groups]
        chain = cast(collections.ChainMap[torch.Tensor, Any], self.state)  # as __init__ set it
        chain.maps[:] = [opt.state for opt in self.optimizers]

    def __repr__(self) -> str:
        return "MultiOptimizer(" + ", ".join(type(opt).__name__ for opt in self.optimizers) + ")"
