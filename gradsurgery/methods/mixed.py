"""Several main tasks and several auxiliaries (``docs/maths.md``).

    min_{α ∈ Δ^n, λ ≥ 0} ‖Σ_{i ∈ main} α_i g_i + Σ_{j ∈ aux} λ_j g_j‖²,   u the minimiser.

The main tasks share progress as in MGDA (⟨u, g_i⟩ ≥ ‖u‖² for each main i) and no auxiliary rises to first
order (⟨u, g_j⟩ ≥ 0). One main task gives ``main_aux``; no auxiliary gives ``mgda``.

Solvers: ``"frank_wolfe"`` (the default: the active-set solver on G of ``solvers.frank_wolfe``) or ``"cvxpy"``
(the reference QP with Clarabel).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._validation import check_task_ref, resolve_task
from ..solvers import MixedQP, mixed_min_norm
from .base import Method, bound_state, check_solver, gram_to_numpy, require_gram


class Mixed(Method):
    name = "mixed"
    interchangeable_options = ("solver",)
    no_conflict = True
    skips_absent_tasks = True  # while a main task is present: see compute_present

    def __init__(self, *, main: Sequence[int | str], solver: str = "frank_wolfe") -> None:
        super().__init__()
        self.solver = check_solver(solver, ("cvxpy", "frank_wolfe"), self.name)
        if isinstance(main, int | str) or not isinstance(main, Sequence | torch.Tensor):
            raise TypeError(f"main must be a sequence of task indices or names, got {main!r}")
        main = [check_task_ref(i, "main") for i in main]
        if not main:
            raise ValueError("mixed needs at least one main task, got main=[]")
        if len(set(main)) != len(main):
            raise ValueError(f"main has duplicate task indices: {main}")
        self.main = main
        self._main: list[int] = []
        self._qp: MixedQP | None = None

    @classmethod
    def example_options(cls, num_tasks: int) -> dict[str, Any]:
        return {"main": [0, 1] if num_tasks >= 2 else [0]}

    def _check_num_tasks(self, num_tasks: int, task_names: Sequence[str] | None) -> None:
        main = [resolve_task(i, num_tasks, task_names, "main") for i in self.main]
        if len(set(main)) != len(main):
            raise ValueError(f"main names a task twice: {self.main}")

    def _init_state(self, num_tasks: int) -> None:
        self._main = [resolve_task(i, num_tasks, self.task_names, "main") for i in self.main]
        if self.solver == "cvxpy":
            self._qp = MixedQP(num_tasks, self._main)

    def compute_weights(self, gram: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        gram = require_gram(gram, self.name)
        g = gram_to_numpy(gram)
        w = (
            bound_state(self._qp, self.name).solve(g)
            if self.solver == "cvxpy"
            else mixed_min_norm(g, self._main)
        )
        return torch.from_numpy(w)

    def compute_present(
        self, present: list[int], gram: torch.Tensor | None, losses: torch.Tensor
    ) -> torch.Tensor:
        main = [present.index(i) for i in self._main if i in present]
        if not main:
            names = [self.task_names[i] for i in self._main] if self.task_names else self._main
            raise ValueError(f"mixed: every main task ({names}) is absent from this step; keep one present")
        g = gram_to_numpy(require_gram(gram, self.name))
        if self.solver == "cvxpy":
            return torch.from_numpy(MixedQP(len(present), main).solve(g))
        return torch.from_numpy(mixed_min_norm(g, main))
