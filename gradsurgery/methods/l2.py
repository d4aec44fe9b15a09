"""``method="l2"``: one data loss, with ½‖θ‖² as its λ-free auxiliary (``gradsurgery/l2.py``).

    u = g + relu(−⟨g, θ⟩)/‖θ‖² · θ

θ is not a task gradient, so the rule is not a weighting of the Gram matrix: the method takes the single
task with weight 1 and brings the rule as a post-transform of the gradient (or, with ``decoupled=True``, a
correction of the optimizer's step), the same transform that ``GradSurgery(..., l2=True)`` adds to any other
method. With ``evidence=True`` the post-transform is instead u = g + λ_l θ_l, λ_l from the evidence of each
layer (``gradsurgery/evidence.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .._validation import check_bool, check_int, check_tensors
from ..evidence import EvidenceRule
from ..l2 import L2Rule
from .base import Method, Transform, require_gram


class L2(Method):
    """Options: ``params`` (the regularized tensors; default every parameter with dim ≥ 2), ``per_tensor``
    (the rule per tensor instead of one global inner product; default: per tensor for adaptive optimizers,
    global for SGD), ``decoupled`` (correct the optimizer's step instead of the gradient; default True).

    ``evidence=True`` (with ``layers``, the model, and ``num_samples``, the training-set size N) replaces the
    norm rule by MacKay's evidence λ for the weights of the ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``
    layers of ``layers`` (``params`` chooses among them): u = g + λ_l θ_l, λ_l = γ_l/(N‖θ_l‖²) from a
    Kronecker-factored Fisher, one λ per layer (``per_tensor``, default True; False: one for all), on the
    gradient (it is not a decoupled rule), with SGD only (``gradsurgery/evidence.py``)."""

    name = "l2"
    max_tasks = 1
    unsaved_options = ("params", "layers")

    def __init__(
        self,
        *,
        params: Iterable[torch.Tensor] | None = None,
        per_tensor: bool | None = None,
        decoupled: bool | None = None,
        evidence: bool = False,
        layers: nn.Module | None = None,
        num_samples: int | None = None,
    ) -> None:
        super().__init__()
        what = "method 'l2'"
        self.per_tensor = None if per_tensor is None else check_bool(per_tensor, f"{what} option per_tensor")
        self.evidence = check_bool(evidence, f"{what} option evidence")
        if decoupled is not None:
            check_bool(decoupled, f"{what} option decoupled")
        self.rule: L2Rule | EvidenceRule
        if not self.evidence:
            given = [n for n, v in (("layers", layers), ("num_samples", num_samples)) if v is not None]
            if given:
                raise TypeError(f"{what}: {', '.join(given)} given without evidence=True")
            self.decoupled = True if decoupled is None else decoupled
            self.rule = L2Rule(params, per_tensor=self.per_tensor, decoupled=self.decoupled, what=what)
            self.params = self.rule.params
            self.num_samples = None
            return
        if not isinstance(layers, nn.Module):
            raise TypeError(
                f"{what} with evidence=True needs layers=, the model whose nn.Linear, nn.Conv1d and "
                f"nn.Conv2d layers it regularizes; got {type(layers).__name__}"
            )
        if num_samples is None:
            raise TypeError(f"{what} with evidence=True needs num_samples=, the number of training examples")
        self.num_samples = check_int(num_samples, f"{what} option num_samples", minimum=1)
        if decoupled:
            raise ValueError(
                f"{what}: the evidence λ acts on the gradient (u = g + λθ), not on the step; "
                "drop decoupled=True"
            )
        self.decoupled = False
        # the layers live in the rule only: a copy of the method (a checkpoint's rehearsal) must not copy them
        self.params = None if params is None else check_tensors(params, f"{what} params")
        if self.per_tensor is None:
            self.per_tensor = True
        self.rule = EvidenceRule(layers, self.num_samples, self.params, per_layer=self.per_tensor, what=what)

    def transforms(self) -> list[Transform]:
        return [self.rule]

    def state_dict(self) -> dict[str, Any]:
        return self.rule.state_dict() if isinstance(self.rule, EvidenceRule) else {}

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """``Method.transaction`` with the evidence λ's state held by reference instead of cloned (a copy of
        the factors would cost a few ms a step): the rule replaces its averages, never changes them in place,
        so the ones its ``state_dict`` returned stay as they were."""
        if not isinstance(self.rule, EvidenceRule):
            with super().transaction():
                yield
            return
        attributes = dict(self.__dict__)
        saved = self.rule.state_dict()
        try:
            yield
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(attributes)
            self.rule.load_state_dict(saved)
            raise

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(self.rule, EvidenceRule):
            self.rule.load_state_dict(state)

    def check_num_tasks(self, num_tasks: int, task_names: Sequence[str] | None = None) -> None:
        if num_tasks != 1:
            raise ValueError(
                f"method 'l2' takes one loss (the data loss), got {num_tasks}; for several losses combine a "
                "multi-task method with the rule, e.g. GradSurgery(opt, method='mgda', l2=True)"
            )

    def compute_weights(self, gram: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        gram = require_gram(gram, self.name)
        return torch.ones(1, dtype=gram.dtype, device=gram.device)

    def extra_repr(self) -> str:
        which = "dim>=2" if self.params is None else f"<{len(self.params)} tensors>"
        if self.evidence:
            which = "Linear/Conv weights" if self.params is None else which
            return (
                f"params={which}, per_tensor={self.per_tensor}, evidence=True, num_samples={self.num_samples}"
            )
        return f"params={which}, per_tensor={self.per_tensor}, decoupled={self.decoupled}"
