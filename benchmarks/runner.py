"""One benchmark run: a method of ``gradsurgery.METHODS`` trains a problem's model, which is then evaluated.

The method list is read from the registry at run time, so methods added by extensions (or by later versions
of the package) are benchmarked without touching this file. Methods whose options have no usable default
get them from ``METHOD_OPTIONS``; a method that needs an option nobody filled in still runs, and its row
records the error message instead of numbers.

Fairness between methods: for a given seed every method starts from the same initial weights
(``problem.build_model(seed=seed)``), sees the same batches in the same order (a
``torch.Generator`` seeded with ``seed``), and uses the same inner optimizer (Adam, or what the problem's
``make_optimizer`` builds: SparseAdam + Adam for sparse tables) and learning rate.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import gradsurgery
from gradsurgery import GradSurgery
from gradsurgery.methods import option_names

#: The baseline every table compares with: the plain summed loss (all weights 1).
BASELINE = "sum"

#: Options for methods whose defaults cannot fit every problem, as functions of the task count T. Everything
#: not listed here runs with the method's own defaults.
#:
#: - ``pareto``: each task keeps at least half of its equal share, c_i = 0.5 / T.
#: - ``main_aux``: task 0 is the main task, the others auxiliaries that may not get worse.
#: - ``mixed``: tasks 0 and 1 are main tasks (with T = 2 there is no auxiliary and it coincides with MGDA).
METHOD_OPTIONS: dict[str, Callable[[int], dict[str, Any]]] = {
    "pareto": lambda t: {"min_weights": [0.5 / t] * t},
    "main_aux": lambda t: {"main": 0},
    "mixed": lambda t: {"main": [0, 1] if t >= 2 else [0]},
}


def available_methods() -> list[str]:
    """Every registered method that can combine two or more losses, the baseline first, then in
    registration order (see ``single_loss_methods`` for the others)."""
    names = [n for n in gradsurgery.METHODS if n not in single_loss_methods()]
    return [BASELINE] + [n for n in names if n != BASELINE] if BASELINE in names else names


def single_loss_methods() -> dict[str, str]:
    """Registered methods that refuse a two-task problem (e.g. ``l2``, a rule for one data loss), with the
    reason they give. They are left out of the default method list; named in ``--methods`` they still run
    and their rows carry the refusal."""
    out = {}
    for name in gradsurgery.METHODS:
        try:
            gradsurgery.make_method(name, **method_options(name, 2, 0)).bind(2)
        except ValueError as err:
            out[name] = str(err)
    return out


def parse_methods(text: str | Sequence[str] | None) -> list[str]:
    """``"mgda,pcgrad"`` (or a list) → validated names, baseline included first; ``None``/``"all"`` → all."""
    known = available_methods()
    if text is None or text == "all":
        return known
    known = known + [n for n in gradsurgery.METHODS if n not in known]
    items = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip() for n in items if n.strip()]
    if not names:
        raise ValueError(f"--methods is empty; choose from {known} (or 'all')")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; registered methods are {known}")
    ordered = list(dict.fromkeys(names))
    if BASELINE in known and BASELINE not in ordered:
        ordered.insert(0, BASELINE)  # every table is read against equal weights
    return ordered


def method_options(method: str, num_tasks: int, seed: int | None = None) -> dict[str, Any]:
    """The options the benchmark uses for ``method`` on a ``num_tasks``-task problem.

    Methods with a ``seed`` option (random task orders, random weights) get the run's seed, so a run is
    reproducible and seeds differ in the method's randomness too.
    """
    opts = dict(METHOD_OPTIONS[method](num_tasks)) if method in METHOD_OPTIONS else {}
    cls = gradsurgery.METHODS.get(method)
    if cls is not None and seed is not None and "seed" in option_names(cls) and "seed" not in opts:
        opts["seed"] = int(seed)
    return opts


def method_note(method: str, task_names: Sequence[str]) -> str:
    """What a reader must know to read the method's row (main tasks of main/auxiliary methods)."""
    opts = METHOD_OPTIONS[method](len(task_names)) if method in METHOD_OPTIONS else {}
    if method == "main_aux":
        return f"main task: {task_names[opts['main']]}"
    if method == "mixed":
        mains = [task_names[i] for i in opts["main"]]
        extra = " (no auxiliary task: same problem as mgda)" if len(mains) == len(task_names) else ""
        return "main tasks: " + ", ".join(mains) + extra
    if method == "pareto":
        return f"min weight {opts['min_weights'][0]:.3g} per task"
    return ""


def supports_features(optimizer: GradSurgery) -> bool:
    """Whether this version of ``GradSurgery.backward`` offers representation mode (``features=``)."""
    return "features" in inspect.signature(optimizer.backward).parameters


@dataclass
class RunResult:
    """One (problem, method, seed) run. ``status`` is ``"ok"``, ``"diverged"`` (a non-finite loss or
    gradient stopped training) or ``"error"`` (the method could not run; ``message`` says why)."""

    problem: str
    method: str
    seed: int
    status: str = "ok"
    message: str = ""
    steps: int = 0
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    final_losses: list[float] = field(default_factory=list)
    mean_weights: list[float] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.seconds / self.steps if self.steps else float("nan")

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ms_per_step"] = self.ms_per_step
        return out


def batches(problem: Any, batch_size: int, generator: torch.Generator, steps: int) -> Iterator[Any]:
    """Exactly ``steps`` training batches (``train_batches(..., num_steps=steps)`` reshuffles each epoch)."""
    produced = 0
    for batch in problem.train_batches(batch_size, generator, num_steps=steps):
        produced += 1
        yield batch
    if produced < steps:
        raise ValueError(f"problem {problem.name!r} gave {produced} training batches, {steps} were asked for")


def split_batch(batch: Any) -> tuple[Any, Any]:
    """A batch is ``(inputs, targets)``."""
    if isinstance(batch, Sequence) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(f"a training batch must be a pair (inputs, targets), got {type(batch).__name__}")


def forward_with_features(
    model: torch.nn.Module, inputs: Any
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``(z, outputs)`` of a trunk-and-heads model (``model.trunk``, ``model.heads``): z is the shared
    representation every head reads, which representation mode needs. Outputs are shaped as ``model(x)``
    shapes them (single-unit heads squeezed to (B,) when the model squeezes)."""
    trunk, heads = getattr(model, "trunk", None), getattr(model, "heads", None)
    own = getattr(model, "forward_with_features", None)
    if own is not None:  # models without one trunk (MMoE, PLE) say themselves what the heads read
        return own(inputs)
    if trunk is None or heads is None:
        raise TypeError(
            f"representation mode needs a model with .trunk and .heads, got {type(model).__name__}"
        )
    z = trunk(inputs)
    squeeze = getattr(model, "squeeze", False)
    outputs = []
    for head in heads:
        out = head(z)
        if squeeze and out.dim() == 2 and out.shape[1] == 1:
            out = out[:, 0]
        outputs.append(out)
    return z, tuple(outputs)


def inner_optimizer(problem: Any, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """The optimizer every run of ``problem`` steps: ``problem.make_optimizer(model, lr)`` where the problem
    has one (sparse embedding tables: ``MultiOptimizer(SparseAdam(tables), Adam(rest))``), else Adam."""
    make = getattr(problem, "make_optimizer", None)
    return make(model, lr) if make is not None else torch.optim.Adam(model.parameters(), lr=lr)


def surgery_options(problem: Any, model: torch.nn.Module) -> dict[str, Any]:
    """Extra ``GradSurgery`` arguments a problem asks for (``model=model`` for the activation source)."""
    options = getattr(problem, "surgery_options", None)
    return dict(options(model)) if options is not None else {}


def evaluate(problem: Any, model: torch.nn.Module) -> dict[str, float]:
    """The problem's test metrics (``Problem.evaluate`` runs under ``no_grad`` in eval mode)."""
    return {str(k): float(v) for k, v in problem.evaluate(model).items()}


def _finite(values: Sequence[float]) -> bool:
    return all(math.isfinite(v) for v in values)


StepHook = Callable[[int, torch.nn.Module, Any], None]


def _train(
    problem: Any,
    method: str,
    seed: int,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    mode: str = "full",
    options: dict[str, Any] | None = None,
    on_step: StepHook | None = None,
    raise_errors: bool = False,
) -> RunResult:
    """Train ``problem.build_model(seed)`` for ``steps`` steps with ``method`` (Adam inside), then evaluate.

    ``mode="representation"`` passes the trunk's output as ``features=`` (MGDA-UB style weights from the
    gradients with respect to the shared representation); it needs a trunk-and-heads model and a
    ``GradSurgery.backward`` that accepts ``features``. ``options`` replace the benchmark's defaults for the
    method. ``on_step(step, model, info)`` is called after every optimizer step (trajectories). Exceptions
    during training are recorded in the result; ``raise_errors=True`` re-raises them (tests).
    """
    if mode not in ("full", "representation"):
        raise ValueError(f"mode must be 'full' or 'representation', got {mode!r}")
    num_tasks = int(problem.num_tasks)
    opts = method_options(method, num_tasks, seed)
    opts.update(options or {})
    result = RunResult(
        problem=problem.name,
        method=method,
        seed=seed,
        options=opts,
        note=method_note(method, problem.task_names),
    )
    result.extra["mode"] = mode
    model = problem.build_model(seed=seed)
    weight_sum: torch.Tensor | None = None
    averaged = 0
    tail_start = steps - max(1, steps // 5)  # weights are averaged over the last fifth of training
    start = time.perf_counter()
    try:
        opt = GradSurgery(
            inner_optimizer(problem, model, lr),
            method,
            num_tasks=num_tasks,
            **surgery_options(problem, model),
            **opts,
        )
        if mode == "representation" and not supports_features(opt):
            raise NotImplementedError("representation mode is not available in this gradsurgery version")
        for step, batch in enumerate(
            batches(problem, batch_size, torch.Generator().manual_seed(seed), steps)
        ):
            inputs, targets = split_batch(batch)
            if mode == "full":
                losses = problem.losses(model(inputs), targets)
                features = None
            else:
                features, outputs = forward_with_features(model, inputs)
                losses = problem.losses(outputs, targets)
            values = [float(loss.detach()) for loss in losses]
            if not _finite(values):
                result.status, result.message = "diverged", f"non-finite loss at step {step}: {values}"
                break
            opt.zero_grad()
            info = opt.backward(losses) if features is None else opt.backward(losses, features=features)
            opt.step()
            result.steps = step + 1
            result.final_losses = values
            if step >= tail_start:
                w = info.weights.detach().double().cpu()
                weight_sum = w if weight_sum is None else weight_sum + w
                averaged += 1
            if on_step is not None:
                on_step(step, model, info)
    except Exception as err:  # a method that cannot run a problem is a result, not a crash of the suite
        if raise_errors:
            raise
        result.status = "diverged" if "non-finite" in str(err) else "error"
        result.message = f"{type(err).__name__}: {err}"
    result.seconds = time.perf_counter() - start
    if weight_sum is not None:
        result.mean_weights = (weight_sum / averaged).tolist()
    if result.status == "ok":
        result.metrics = evaluate(problem, model)
    return result


def _train_single_task(
    problem: Any, task: int, seed: int, *, steps: int, batch_size: int, lr: float, raise_errors: bool = False
) -> RunResult:
    """The single-task baseline of Δm: the same model, initial weights, batches and Adam, trained on
    ``losses[task]`` alone (plain ``backward``, no gradsurgery); the other heads never receive a gradient."""
    name = problem.task_names[task]
    result = RunResult(
        problem=problem.name, method=f"single:{name}", seed=seed, note=f"trained on {name} only"
    )
    model = problem.build_model(seed=seed)
    start = time.perf_counter()
    try:
        opt = inner_optimizer(problem, model, lr)
        for step, batch in enumerate(
            batches(problem, batch_size, torch.Generator().manual_seed(seed), steps)
        ):
            inputs, targets = split_batch(batch)
            losses = problem.losses(model(inputs), targets)
            loss = losses[task]
            if not math.isfinite(float(loss.detach())):
                result.status, result.message = "diverged", f"non-finite loss at step {step}"
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            result.steps = step + 1
            result.final_losses = [float(v.detach()) for v in losses]
    except Exception as err:
        if raise_errors:
            raise
        result.status, result.message = "error", f"{type(err).__name__}: {err}"
    result.seconds = time.perf_counter() - start
    if result.status == "ok":
        result.metrics = evaluate(problem, model)
    return result


def _recording_warnings(fn: Callable[..., RunResult]) -> Callable[..., RunResult]:
    """Warnings of a run (solver fallbacks, ...) are counted into ``extra["warnings"]`` instead of printed:
    a suite of hundreds of runs would otherwise bury its tables."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> RunResult:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fn(*args, **kwargs)
        if caught:
            counts: dict[str, int] = {}
            for w in caught:
                counts[w.category.__name__] = counts.get(w.category.__name__, 0) + 1
            result.extra["warnings"] = counts
            result.extra["first_warning"] = str(caught[0].message)[:300]
        return result

    wrapper.__name__ = wrapper.__qualname__ = fn.__name__.lstrip("_")
    return wrapper


train = _recording_warnings(_train)
train_single_task = _recording_warnings(_train_single_task)
