"""The contract every combination method follows.

A method turns the T×T Gram matrix of the task gradients (G_ij = ⟨g_i, g_j⟩ on the shared parameters) and
the current loss values into task weights w, so that the fused shared gradient is u = Σ_i w_i g_i. Because it
sees only G, its cost does not grow with the model size.

Life cycle: constructed with its options (validated at once, before any training), then bound to a task
count on the first ``backward`` (options that depend on T, such as ``main`` or ``min_weights``, are checked
there), then called once per ``backward``. A method commits its state (RNG, moving averages) only at the end
of a successful call, so a failed or skipped step leaves it as it was.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch


class Method:
    """Base class: subclasses set ``name`` and implement ``compute_weights``."""

    name: ClassVar[str] = ""
    #: Loss-weighting methods scale task-specific gradients by w_i too (the weight is a loss weight);
    #: gradient-surgery methods leave a task's own parameters with that task's plain gradient.
    scales_task_specific: ClassVar[bool] = False
    #: False for loss weightings whose weights depend on the loss values only (FAMO, RLW): ``GradSurgery``
    #: then skips the per-task gradients and the Gram matrix (``compute_weights`` gets ``gram=None``) and
    #: takes a single backward pass of Σ_i w_i L_i. Only valid together with ``scales_task_specific = True``.
    needs_gram: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.needs_gram and not cls.scales_task_specific:
            raise TypeError(
                f"{cls.__name__}: needs_gram = False needs scales_task_specific = True "
                "(one backward of Σ w_i L_i scales the task-specific gradients too)"
            )

    def __init__(self, **options: Any) -> None:
        self.options: dict[str, Any] = dict(options)
        self.num_tasks: int | None = None

    # -- life cycle -------------------------------------------------------------------------------------
    def bind(self, num_tasks: int) -> None:
        """Fix the task count; validates T-dependent options and creates T-sized state."""
        if self.num_tasks is not None and self.num_tasks != num_tasks:
            raise ValueError(
                f"method {self.name!r} was set up for {self.num_tasks} tasks, got {num_tasks} losses"
            )
        if self.num_tasks is None:
            self._check_num_tasks(num_tasks)
            self.num_tasks = num_tasks
            self._init_state(num_tasks)

    def _check_num_tasks(self, num_tasks: int) -> None:
        """Raise ValueError when the options do not fit ``num_tasks`` tasks."""

    def _init_state(self, num_tasks: int) -> None:
        """Create the method's T-dependent state."""

    # -- the computation ---------------------------------------------------------------------------------
    def __call__(self, gram: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        like = gram if gram is not None else losses
        if self.num_tasks is None:
            self.bind(like.shape[0])
        weights = self.compute_weights(gram, losses)
        return weights.to(device=like.device, dtype=like.dtype)

    def compute_weights(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """Weights w (shape (T,)) from the float64 Gram matrix and the detached losses."""
        raise NotImplementedError

    # -- around the optimizer step ----------------------------------------------------------------------
    def after_step(self) -> None:
        """Called by ``GradSurgery.step`` once the wrapped optimizer has stepped. Methods with learnable
        weights apply here the update prepared by ``backward``, so a step that never happens (skipped by a
        ``GradScaler``, or ``backward`` failed) does not advance them. No-op by default."""

    def zero_grad(self) -> None:
        """Called by ``GradSurgery.zero_grad``: drop updates prepared by ``backward`` calls not stepped yet,
        as the parameters' ``.grad`` are dropped. No-op by default."""

    def info_extras(self) -> dict[str, Any]:
        """Method-specific diagnostics of the last call, copied into ``StepInfo.extras`` (e.g. solver
        failures)."""
        return {}

    # -- checkpoints -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Method state: tensors and Python primitives only (``torch.load(weights_only=True)`` reads it)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


def check_index(value: Any, num_tasks: int, what: str) -> int:
    """A task index given by the user: an int in [0, T)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int task index, got {value!r}")
    if not 0 <= value < num_tasks:
        raise ValueError(f"{what}={value} is out of range for {num_tasks} tasks")
    return value


def check_solver(solver: Any, allowed: tuple[str, ...], method: str) -> str:
    if solver not in allowed:
        raise ValueError(f"unknown solver {solver!r} for method {method!r}; choose one of {allowed}")
    return solver


def gram_to_numpy(gram: torch.Tensor):
    """The T×T matrix is all that crosses to the host: T² numbers, one synchronisation."""
    return gram.detach().to("cpu", torch.float64).numpy()


def new_generator(seed: int | None) -> torch.Generator:
    """A CPU generator; ``seed=None`` draws one from torch's global RNG so ``torch.manual_seed``
    governs it."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


def non_negative_losses(losses: torch.Tensor, method: str, why: str) -> torch.Tensor:
    """The losses as a float64 CPU tensor; ValueError naming the tasks when any is negative (methods that
    compare loss ratios or take logarithms of losses)."""
    values = losses.detach().to("cpu", torch.float64)
    negative = [i for i, v in enumerate(values.tolist()) if v < 0]
    if negative:
        raise ValueError(
            f"{method} needs non-negative losses ({why}); task(s) {negative} have {values.tolist()}"
        )
    return values
