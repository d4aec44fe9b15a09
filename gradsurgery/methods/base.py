"""The contract every combination method follows.

A method turns the T×T Gram matrix of the task gradients (G_ij = ⟨g_i, g_j⟩ on the shared parameters) and
the current loss values into task weights w, so that the fused shared gradient is u = Σ_i w_i g_i. Because it
sees only G, its cost does not grow with the model size. The maths of every method is in ``docs/maths.md``.

What a method declares (class attributes), and the engine reads nothing else:

- ``needs_gram``: False for loss weightings whose weights come from the loss values alone; the engine then
  takes one backward pass of Σ w_i L_i instead of T per-task ones (``compute_weights`` gets ``gram=None``).
  An instance may set it from its options (``LossValueWeighting``: G only with ``diagnostics=True``);
- ``scales_task_specific``: True for loss weightings: a task's own parameters receive w_i g_i, not g_i;
- ``per_sample_task`` (a property): the index of a loss given per sample (a 1-D tensor) that the engine's
  masking stage reduces before anything else, or None;
- ``transforms()``: post-transforms of the fused gradient the method brings (the λ-free L2 rule);
- ``skips_absent_tasks``: True when a step with some tasks absent (their loss ``None``) is the method's step
  on the present tasks alone: weights from their G and losses, and any state per task updated as the
  method's objective over the present tasks says (``uncertainty``: gradient 0 for an absent task's s_i)
  (``weights_of``; a method whose options or state name tasks overrides ``compute_present``, a loss
  weighting implements ``loss_weights``); an instance may set it from its options;
- ``tracks_loss_decrease``: True when the weights follow how fast each loss falls from step to step (DWA,
  FAMO, GradNorm). The engine refuses such a method under an optimizer that maximizes (``maximize=True``):
  it raises the losses, which inverts that reading. Weights from G alone need no such flag: negating every
  loss negates every g_i and leaves G, the weights and the step of a maximizing optimizer as they were;
- its random generators, created with ``new_generator`` (saved once in checkpoints, shared over ranks);
- for the contract tests and the benchmarks: ``example_options(T)``, ``min_tasks``/``max_tasks``,
  ``no_conflict`` (⟨u, g_i⟩ ≥ 0 for every task: no loss rises to first order), ``scale_exponent``
  (w(c²G) = c^k · w(G)) and ``task_scale_invariant`` (u is unchanged in direction when one task's gradient
  is rescaled).

Life cycle: constructed with its options (validated at once, before any training; they are the keyword-only
arguments of ``__init__`` and are kept as attributes of the same names), bound to a task count on the first
``backward`` (T-dependent options are checked there), then called once per ``backward``. A method may change
its state freely inside ``compute_weights``: the engine runs each ``backward`` inside ``transaction()``,
which restores the state (and the binding, and the generators) unless the whole call succeeds. Everything a
method changes while computing weights must therefore be in its ``state_dict`` (which ``snapshot`` copies by
default; a method may override ``snapshot`` and ``restore`` with a cheaper copy of what it changes).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import torch

from .._validation import check_bool, check_choice

_T = TypeVar("_T")


class Transform(Protocol):
    """What the engine calls on a post-transform of the fused gradient (``gradsurgery.l2.L2Rule``,
    ``gradsurgery.evidence.EvidenceRule``)."""

    def check_representation_mode(self) -> None:
        """Raise ``ValueError`` when the transform cannot act on representation mode's gradients (the heads'
        own, the trunk's fused through z)."""

    def setup(self, optimizer: torch.optim.Optimizer) -> None: ...

    def begin_backward(self, *, scaling: Any, reduction: Any) -> None:
        """Called first in every ``backward``, with its loss scaling (``gradsurgery.amp.LossScaling``, None
        without a GradScaler) and its reduction over the data-parallel ranks (``gradsurgery.distributed``;
        local with one process): drop what a failed earlier ``backward`` left."""

    def apply(
        self, pairs: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
        """The new (parameter, gradient) pairs of this ``backward``, each gradient the direction the optimizer
        descends along (the engine negates it for a parameter in a group with ``maximize=True``, and negates
        the result back), and the ``StepInfo`` fields the transform sets."""
        ...

    def before_step(self, params: Iterable[torch.Tensor]) -> Any: ...

    def after_step(self, token: Any) -> None: ...


class Method:
    """Base class: subclasses set ``name`` and implement ``compute_weights``."""

    name: ClassVar[str] = ""
    scales_task_specific: ClassVar[bool] = False
    needs_gram: bool = True  # a class attribute that an instance may override from its options
    min_tasks: ClassVar[int] = 1
    max_tasks: ClassVar[int | None] = None
    no_conflict: ClassVar[bool] = False
    tracks_loss_decrease: ClassVar[bool] = False
    skips_absent_tasks: bool = False  # a class attribute that an instance may override from its options
    scale_exponent: ClassVar[int] = 0
    task_scale_invariant: ClassVar[bool] = False
    #: Options that are not written into checkpoints (tensors, e.g. the parameters the L2 rule regularizes).
    unsaved_options: ClassVar[tuple[str, ...]] = ()
    #: Options a checkpoint may be resumed under with another value: they choose how the weights are computed
    #: (a solver backend), not the state they evolve (``seed`` always: the saved generator replaces it).
    interchangeable_options: ClassVar[tuple[str, ...]] = ()
    _checks_names: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.needs_gram and not cls.scales_task_specific:
            raise TypeError(
                f"{cls.__name__}: needs_gram = False needs scales_task_specific = True "
                "(one backward of Σ w_i L_i scales the task-specific gradients too)"
            )
        # Extensions written for gradsurgery 0.1 override _check_num_tasks(self, num_tasks) without names.
        cls._checks_names = len(inspect.signature(cls._check_num_tasks).parameters) >= 3

    def __init__(self) -> None:
        self.num_tasks: int | None = None
        self.task_names: list[str] | None = None
        self._generators: dict[str, torch.Generator] = {}

    @classmethod
    def option_names(cls) -> list[str]:
        """The method's options: the keyword-only arguments of its ``__init__``."""
        params = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in params if p.kind is p.KEYWORD_ONLY]

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        parameters = inspect.signature(cls.__init__).parameters
        return {
            n: parameters[n].default
            for n in cls.option_names()
            if parameters[n].default is not parameters[n].empty
        }

    @property
    def options(self) -> dict[str, Any]:
        """The options as configured (those written into checkpoints)."""
        return {n: getattr(self, n) for n in self.option_names() if n not in self.unsaved_options}

    @classmethod
    def example_options(cls, num_tasks: int) -> dict[str, Any]:
        """Options that make the method run on ``num_tasks`` tasks (for the contract tests and the
        benchmarks): empty unless an option has no default that fits every T."""
        return {}

    @property
    def per_sample_task(self) -> int | str | None:
        return None

    def transforms(self) -> list[Transform]:
        return []

    # -- life cycle -------------------------------------------------------------------------------------
    def check_num_tasks(self, num_tasks: int, task_names: Sequence[str] | None = None) -> None:
        """Raise ValueError when the method cannot run ``num_tasks`` tasks (named ``task_names``, if given)
        with its options."""
        if num_tasks < self.min_tasks or (self.max_tasks is not None and num_tasks > self.max_tasks):
            bounds = f"at least {self.min_tasks}" if self.max_tasks is None else f"{self.max_tasks}"
            if self.max_tasks is not None and self.max_tasks != self.min_tasks:
                bounds = f"{self.min_tasks} to {self.max_tasks}"
            raise ValueError(f"method {self.name!r} takes {bounds} losses, got {num_tasks}")
        if self._checks_names:
            self._check_num_tasks(num_tasks, task_names)
        else:
            self._check_num_tasks(num_tasks)  # type: ignore[call-arg]

    def _check_num_tasks(self, num_tasks: int, task_names: Sequence[str] | None) -> None:
        """Raise ValueError when the options do not fit the tasks (options may name tasks)."""

    def bind(self, num_tasks: int, task_names: Sequence[str] | None = None) -> None:
        """Fix the task count (and names); validates T-dependent options and creates T-sized state."""
        if self.num_tasks is not None:
            if self.num_tasks != num_tasks:
                raise ValueError(
                    f"method {self.name!r} was set up for {self.num_tasks} tasks, got {num_tasks} losses"
                )
            return
        names = None if task_names is None else list(task_names)
        if names is not None and len(names) != num_tasks:
            raise ValueError(f"{len(names)} task names for {num_tasks} tasks: {names}")
        self.check_num_tasks(num_tasks, names)
        self.num_tasks = num_tasks
        self.task_names = names
        self._init_state(num_tasks)

    def _init_state(self, num_tasks: int) -> None:
        """Create the method's T-dependent state (``self.task_names`` is set: options may name tasks)."""

    # -- the computation ---------------------------------------------------------------------------------
    def __call__(self, gram: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        like = gram if gram is not None else losses
        self.bind(like.shape[0])
        weights = self.compute_weights(gram, losses)
        return weights.to(device=like.device, dtype=like.dtype)

    def compute_weights(self, gram: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        """Weights w (shape (T,)) from the Gram matrix (float64 by default) and the detached losses."""
        raise NotImplementedError

    def weights_of(
        self, present: Sequence[int], gram: torch.Tensor | None, losses: torch.Tensor
    ) -> torch.Tensor:
        """The weights of the tasks ``present`` in a step whose other tasks passed no loss, from the present
        tasks' Gram matrix and losses (one weight each): the method's weights for those tasks alone. The
        method is bound to all T tasks; only for ``skips_absent_tasks``."""
        if not self.skips_absent_tasks:
            raise ValueError(f"method {self.name!r} cannot take a step with tasks absent")
        like = gram if gram is not None else losses
        weights = self.compute_present(list(present), gram, losses)
        return weights.to(device=like.device, dtype=like.dtype)

    def compute_present(
        self, present: list[int], gram: torch.Tensor | None, losses: torch.Tensor
    ) -> torch.Tensor:
        """``compute_weights`` on the present tasks: right as it is for a method whose weights depend on
        nothing per task but G and the losses."""
        return self.compute_weights(gram, losses)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything inside either succeeds or leaves the method as it was: its state, its task count
        (a first call that fails leaves it unbound) and its generators."""
        generators = {n: g.get_state() for n, g in self._generators.items()}
        unbound: dict[str, Any] | None = None
        saved: Any = None
        if self.num_tasks is None:
            unbound = dict(self.__dict__)
        else:
            saved = self.snapshot()
        try:
            yield
        except BaseException:
            if unbound is not None:
                self.__dict__.clear()
                self.__dict__.update(unbound)
            else:
                self.restore(saved)
            for n, state in generators.items():
                self._generators[n].set_state(state)
            raise

    def snapshot(self) -> Any:
        """What ``transaction`` gives back to ``restore`` when the call fails: a copy of ``state_dict()``. A
        method may keep a cheaper copy of what a ``backward`` can change (the learned weights do)."""
        return clone_state(self.state_dict())

    def restore(self, snapshot: Any) -> None:
        """The method as it was when ``snapshot`` was taken."""
        self.load_state_dict(snapshot)

    # -- around the optimizer step ----------------------------------------------------------------------
    def after_step(self) -> None:
        """Called by ``GradSurgery.step`` once the wrapped optimizer has stepped. Methods with learnable
        weights apply here the update prepared by ``backward``, so a step that never happens (skipped by a
        ``GradScaler``, or ``backward`` failed) does not advance them. No-op by default."""

    def zero_grad(self) -> None:
        """Called by ``GradSurgery.zero_grad``: drop updates prepared by ``backward`` calls not stepped yet,
        as the parameters' ``.grad`` are dropped. No-op by default."""

    def info_extras(self) -> dict[str, Any]:
        """Method-specific diagnostics of the last call, copied into ``StepInfo.extras``."""
        return {}

    # -- randomness --------------------------------------------------------------------------------------
    def new_generator(self, seed: int | None, name: str = "generator") -> torch.Generator:
        """A CPU generator owned by the method; ``seed=None`` draws one from torch's global RNG so
        ``torch.manual_seed`` governs it. The engine saves its state in checkpoints and gives every rank
        rank 0's state."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        self._generators[name] = gen
        return gen

    def generators(self) -> dict[str, torch.Generator]:
        """The method's random generators by name (sorted, so every rank lists them in one order)."""
        return dict(sorted(self._generators.items()))

    # -- checkpoints -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Method state: tensors and Python primitives only (``torch.load(weights_only=True)`` reads it).
        Generators are saved by the engine, not here."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class LossValueWeighting(Method):
    """A loss weighting whose weights come from the loss values alone (``sum``, ``dwa``, ``uncertainty``,
    ``rlw``, ``famo``). Its gradient is Σ_i w_i g_i for every parameter, task-specific ones included
    (w_i g_i), which one backward pass of Σ_i w_i L_i gives: the engine takes that pass instead of T per-task
    ones (``needs_gram = False``; T× fewer backward passes in full mode) and forms no Gram matrix, so the
    Gram diagnostics of ``StepInfo`` read NaN. ``diagnostics=True`` takes the T per-task passes instead, for
    the same gradients (up to the rounding of another order of summation) plus G in ``StepInfo`` (norms,
    cosines, conflicts, shares). In representation mode (``features=``) the same holds: one backward of
    Σ_i w_i L_i, or G over the features with ``diagnostics=True``. A loss weighting implements
    ``loss_weights``, which serves a step with every task and one with some absent alike."""

    scales_task_specific = True
    needs_gram = False
    #: The same gradients and the same state either way: a checkpoint resumes under the other value.
    interchangeable_options: ClassVar[tuple[str, ...]] = ("diagnostics",)

    def __init__(self, *, diagnostics: bool = False) -> None:
        super().__init__()
        self.diagnostics = check_bool(diagnostics, "diagnostics")
        self.needs_gram = self.diagnostics

    def compute_weights(self, gram: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        return self.loss_weights(None, losses)

    def compute_present(
        self, present: list[int], gram: torch.Tensor | None, losses: torch.Tensor
    ) -> torch.Tensor:
        return self.loss_weights(present, losses)

    def loss_weights(self, present: list[int] | None, losses: torch.Tensor) -> torch.Tensor:
        """The weights of the tasks ``present`` (None: every task), one per value in ``losses``, with the
        method's state updated as its rule says for those tasks. What a loss weighting implements: G is not
        read (with ``diagnostics=True`` it is formed for ``StepInfo`` alone)."""
        raise NotImplementedError


def clone_state(state: Any) -> Any:
    """An independent copy of a state dict: nested dicts, lists and tuples rebuilt, plain tensors cloned,
    immutable leaves (numbers, strings, None, dtypes, devices) shared, anything else deep-copied. The values
    ``copy.deepcopy`` gives (without its memo, so two entries holding one tensor get a copy each), at a
    quarter to an eighth of its cost on the methods' states (19 against 75 µs for ``uncertainty``'s), which
    are copied on every ``backward``."""
    if isinstance(state, dict):
        return {key: clone_state(value) for key, value in state.items()}
    if isinstance(state, list):
        return [clone_state(value) for value in state]
    if isinstance(state, tuple):
        return tuple(clone_state(value) for value in state)
    if isinstance(state, torch.Tensor) and not state.requires_grad and type(state) is torch.Tensor:
        return state.clone()
    if state is None or isinstance(state, bool | int | float | str | torch.dtype | torch.device):
        return state
    return copy.deepcopy(state)


def check_solver(solver: Any, allowed: tuple[str, ...], method: str) -> str:
    return check_choice(solver, allowed, "solver", f" for method {method!r}")


def solver_for(solver: str, num_tasks: int) -> str:
    """The solver a method with a two-task closed form runs for ``num_tasks`` tasks: ``"auto"`` (and
    ``"closed_form"``, which binding allows for two tasks only, while a step with tasks absent may have
    fewer) the closed form for two and the active set otherwise; any other choice as it is."""
    if solver in ("auto", "closed_form"):
        return "closed_form" if num_tasks == 2 else "frank_wolfe"
    return solver


def require_gram(gram: torch.Tensor | None, method: str) -> torch.Tensor:
    """The Gram matrix of a method that needs it (``needs_gram``): the engine always passes it to those."""
    if gram is None:
        raise TypeError(f"method {method!r} needs the Gram matrix of the task gradients, got gram=None")
    return gram


def bound_state(state: _T | None, method: str) -> _T:
    """State that ``bind`` creates (``_init_state``): RuntimeError when the method is not bound yet."""
    if state is None:
        raise RuntimeError(
            f"method {method!r} is not bound to its tasks yet: its state is created by the first backward"
        )
    return state


def of_present(vector: torch.Tensor, present: list[int] | None) -> torch.Tensor:
    """The entries of a per-task vector for the tasks ``present``; the vector itself when every task is
    (None): a step with every task, the common one, takes no indexing."""
    return vector if present is None else vector[present]


def on_every_task(
    values: torch.Tensor, present: list[int] | None, fill: float, num_tasks: int
) -> torch.Tensor:
    """A per-task vector with ``values`` at the tasks ``present`` and ``fill`` at the others; ``values``
    itself when every task is present (None)."""
    if present is None:
        return values
    spread = values.new_full((num_tasks,), fill)
    spread[present] = values
    return spread


def added_at(total: torch.Tensor, present: list[int] | None, values: torch.Tensor | float) -> torch.Tensor:
    """A new per-task vector: ``total`` with ``values`` (one per task of ``present``, or one number) added at
    the tasks ``present`` (None: every task)."""
    if present is None:
        return total + values
    out = total.clone()
    out[present] += values
    return out


def gram_to_numpy(gram: torch.Tensor) -> np.ndarray:
    """The T×T matrix is all that crosses to the host: T² numbers, one synchronisation."""
    return gram.detach().to("cpu", torch.float64).numpy()


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
