"""One main task, the others auxiliaries that may not get worse (Su 2022; ``docs/maths.md``).

    max_u ⟨u, g_main⟩ − ½‖u‖²  s.t.  ⟨u, g_j⟩ ≥ 0 for every auxiliary j.

Dual: λ* = argmin_{λ ≥ 0} ‖g_main + Σ_j λ_j g_j‖², u = g_main + Σ_j λ*_j g_j. The main loss descends as fast
as it can while no auxiliary loss rises to first order. With one auxiliary the closed form is
λ = relu(−⟨g_main, g_aux⟩)/‖g_aux‖². Uses: a clean validation set as the auxiliary of a noisy training set;
a regularizer as the auxiliary of the data loss.

``mode="mask"`` (one auxiliary, the clean-set loss): the main loss is given per sample and the samples whose
gradient conflicts with the auxiliary's are dropped before the rule is applied (gradient-guided loss masking,
Wang et al. 2021; see ``gradsurgery/losses.py``). ``mode="guard"`` (the default) is the plain rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .._validation import check_choice, check_task_ref, resolve_task
from ..solvers import MainAuxQP, main_aux_min_norm, main_aux_one_weights
from .base import Method, bound_state, check_solver, gram_to_numpy, require_gram, solver_for


class MainAux(Method):
    name = "main_aux"
    interchangeable_options = ("solver",)
    min_tasks = 2
    no_conflict = True
    skips_absent_tasks = True  # an auxiliary, in the guard mode: see __init__ and compute_present

    def __init__(self, *, main: int | str = 0, solver: str = "auto", mode: str = "guard") -> None:
        super().__init__()
        self.solver = check_solver(solver, ("auto", "closed_form", "frank_wolfe", "cvxpy"), self.name)
        self.main = check_task_ref(main, "main")
        self._main = 0
        self.mode = check_choice(mode, ("guard", "mask"), "main_aux mode")
        # The masking stage reads the main loss and its one auxiliary per sample.
        self.skips_absent_tasks = self.mode == "guard"
        self._solver = solver
        self._qp: MainAuxQP | None = None

    @property
    def per_sample_task(self) -> int | str | None:
        return self.main if self.mode == "mask" else None

    def check_num_tasks(self, num_tasks: int, task_names: Sequence[str] | None = None) -> None:
        if num_tasks < 2:
            raise ValueError(
                f"main_aux needs a main loss and at least one auxiliary loss, got {num_tasks} loss; pass a "
                "list, e.g. opt.backward([noisy_loss, clean_loss]) for the clean-set guard"
            )
        resolve_task(self.main, num_tasks, task_names, "main")
        if self.mode == "mask" and num_tasks != 2:
            raise ValueError(
                f"main_aux mode='mask' takes one auxiliary (the clean-set loss), got {num_tasks - 1}"
            )
        if self.solver == "closed_form" and num_tasks != 2:
            raise ValueError(f"main_aux solver='closed_form' needs exactly 1 auxiliary, got {num_tasks - 1}")

    def _init_state(self, num_tasks: int) -> None:
        self._main = resolve_task(self.main, num_tasks, self.task_names, "main")
        self._solver = solver_for(self.solver, num_tasks)
        if self._solver == "cvxpy":
            self._qp = MainAuxQP(num_tasks, self._main)

    def compute_weights(self, gram: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        g = gram_to_numpy(require_gram(gram, self.name))
        return self._weights(g, self._solver, self._main, lambda: bound_state(self._qp, self.name))

    @staticmethod
    def _weights(g: np.ndarray, solver: str, main: int, qp: Callable[[], MainAuxQP]) -> torch.Tensor:
        if solver == "closed_form":
            w = main_aux_one_weights(g, main)
        elif solver == "cvxpy":
            w = qp().solve(g)
        else:
            w = main_aux_min_norm(g, main)
        return torch.from_numpy(w)

    def compute_present(
        self, present: list[int], gram: torch.Tensor | None, losses: torch.Tensor
    ) -> torch.Tensor:
        if self._main not in present:
            name = self.task_names[self._main] if self.task_names else self._main
            raise ValueError(
                f"main_aux: the main task {name!r} is absent from this step (only an auxiliary may be)"
            )
        t, main = len(present), present.index(self._main)
        if t == 1:  # the main task alone
            return torch.ones(1, dtype=torch.float64)
        g = gram_to_numpy(require_gram(gram, self.name))
        return self._weights(g, solver_for(self.solver, t), main, lambda: MainAuxQP(t, main))
