"""Speed and memory: the cost of a gradsurgery step relative to a plain summed-loss step, and solver times.

Step time. A multi-layer perceptron trunk (≈0.5M or ≈5M shared parameters) feeds T ∈ {2, 4, 8} linear
heads; every step draws the same batch, runs the forward pass, and then either

- ``plain``: ``sum(losses).backward()`` and the inner Adam step, or
- a method in **full** mode (``GradSurgery.backward(losses)``: T backward passes to the shared parameters),
- a method in **representation** mode (``backward(losses, features=z)``: one backward through the trunk),
- with ``torchjd`` installed, its ``mtl_backward`` + ``jac_to_grad`` with the corresponding aggregator.

For each method the group {plain, full, representation, torchjd} is measured **interleaved**: every
repetition times each member once, in a freshly shuffled order, and each member's time is divided by the
plain step of the same repetition. The table gives the median of these ratios and their spread (25th-75th
percentile), plus the median milliseconds. One thread (``--threads``) unless told otherwise.

Peak memory (Linux): in a separate pass at the end, for each configuration a fresh optimizer wrapper takes
two steps, and the peak resident set size above the resident size just before (VmHWM after resetting it
through ``/proc/self/clear_refs``; glibc's heap trimmed first and large blocks forced to ``mmap`` so that
freed memory leaves the process) is reported: everything the step and the method's own buffers allocate
beyond the model and Adam's state. On CUDA, ``torch.cuda.max_memory_allocated`` is used instead.

Solver time. Random Gram matrices (a common direction plus task-specific ones, scales spread over two
orders of magnitude, so some pairs conflict) for T ∈ {2, 4, 8, 10, 16, 32}: the closed form (T = 2),
Frank-Wolfe (``simplex_min_norm``) and the cvxpy QP (``SimplexQP.solve``, timed per call after the first
call built and solved it once), and each registered method's ``compute_weights`` on such a G.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import math
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradsurgery import GradSurgery

from .console import count_text, counted_warnings
from .runner import method_options, supports_features
from .speed_models import WORKLOADS, SpeedModel, seeded_mlp

#: name → (input width, hidden width, representation width); shared parameters ≈ 0.28M, 0.53M and 5.05M.
#: "small" is the small model (trunk 128→384→384→256), where the fixed per-step cost of a method shows most.
SIZES = {"small": (128, 384, 256), "0.5M": (256, 512, 256), "5M": (512, 1792, 512)}
TINY_SIZES = {"tiny": (16, 32, 16)}
TASK_COUNTS = (2, 4, 8)
SOLVER_TASK_COUNTS = (2, 4, 8, 10, 16, 32)
BATCH = 128
#: torchjd aggregators corresponding to gradsurgery methods (constructed with matching options)
TORCHJD = {
    "mgda": lambda A, T: A.MGDA(),
    "pcgrad": lambda A, T: A.PCGrad(),
    "gradvac": lambda A, T: A.GradVac(beta=0.01),  # gradsurgery's default β (torchjd's own default is 0.5)
    "upgrad": lambda A, T: A.UPGrad(),
    "imtl": lambda A, T: A.IMTLG(),
}


@dataclass
class Case:
    size: str
    num_tasks: int
    model: SpeedModel
    inner: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor
    device: torch.device

    @property
    def shared_params(self) -> int:
        return sum(p.numel() for p in self.model.trunk.parameters())

    def losses(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z, outs = self.model(self.x)
        return z, [nn.functional.mse_loss(o, self.y[:, i]) for i, o in enumerate(outs)]


def make_case(
    size: str, dims: tuple[int, int, int], num_tasks: int, device: torch.device, batch: int
) -> Case:
    model, x, gen = seeded_mlp(dims, num_tasks, device, batch)
    y = torch.randn(batch, num_tasks, generator=gen).to(device)
    # A small learning rate keeps hundreds of steps on random targets far from divergence.
    return Case(size, num_tasks, model, torch.optim.Adam(model.parameters(), lr=1e-5), x, y, device)


# -- step factories: each returns a fresh step closure (with its own optimizer wrapper) ---------------------
def plain_step(case: Case) -> Callable[[], None]:
    def step() -> None:
        case.inner.zero_grad(set_to_none=True)
        _, losses = case.losses()
        torch.stack(losses).sum().backward()
        case.inner.step()

    return step


def method_step(case: Case, method: str, mode: str) -> Callable[[], None]:
    # Every configuration wraps the case's one Adam, so all of them update the same optimizer state.
    opt = GradSurgery(
        case.inner, method, num_tasks=case.num_tasks, **method_options(method, case.num_tasks, 0)
    )
    if mode == "representation" and not supports_features(opt):
        raise NotImplementedError("representation mode is not available in this gradsurgery version")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        z, losses = case.losses()
        if mode == "full":
            opt.backward(losses)
        else:
            opt.backward(losses, features=z)
        opt.step()

    return step


def torchjd_available() -> bool:
    return importlib.util.find_spec("torchjd") is not None


def torchjd_step(case: Case, method: str) -> Callable[[], None]:
    import torchjd
    import torchjd.aggregation as A
    from torchjd import autojac

    aggregator = TORCHJD[method](A, case.num_tasks)
    shared = list(case.model.trunk.parameters())
    new_api = hasattr(
        autojac, "jac_to_grad"
    )  # torchjd ≥ 0.9: mtl_backward fills .jac, jac_to_grad aggregates
    mtl_backward = autojac.mtl_backward if hasattr(autojac, "mtl_backward") else torchjd.mtl_backward

    def step() -> None:
        case.inner.zero_grad(set_to_none=True)
        z, losses = case.losses()
        if new_api:
            mtl_backward(losses, features=z)
            autojac.jac_to_grad(shared, aggregator)
        else:
            mtl_backward(losses=losses, features=z, aggregator=aggregator)
        case.inner.step()

    return step


# -- timing -------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(step: Callable[[], None], inner_steps: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(inner_steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / inner_steps


def interleaved_times(
    members: dict[str, Callable[[], None]],
    reps: int,
    inner_steps: int,
    *,
    warmup: int = 3,
    around: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per step of each member: every repetition times each member once (``inner_steps`` steps), in
    an order shuffled by a fixed seed (the same on every rank of a distributed run); ``around`` runs before
    and after each measurement (a barrier)."""
    for step in members.values():
        for _ in range(warmup):
            step()
    rng = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in members}
    names = list(members)
    for _ in range(reps):
        rng.shuffle(names)
        for name in names:
            if around is not None:
                around()
            start = time.perf_counter()
            for _ in range(inner_steps):
                members[name]()
            if around is not None:
                around()
            times[name].append((time.perf_counter() - start) / inner_steps)
    return times


def write_rows_and_report(out: Path, rows: list[dict[str, Any]], text: str) -> None:
    """``rows.json`` and ``report.md`` under ``out`` (created), and the report on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    (out / "report.md").write_text(text)
    print(text)


def quantile(values: list[float], q: float) -> float:
    vals = sorted(values)
    if not vals:
        return float("nan")
    pos = q * (len(vals) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


@dataclass
class StepRow:
    size: str
    shared_params: int
    num_tasks: int
    method: str
    variant: str  # "plain", "full", "representation", "torchjd"
    status: str = "ok"
    message: str = ""
    ms: float = float("nan")
    ratio: float = float("nan")
    ratio_p25: float = float("nan")
    ratio_p75: float = float("nan")
    times: list[float] = field(default_factory=list)
    peak_mb: float = float("nan")
    #: torchjd rows: median (and quartiles) of torchjd's time over gradsurgery's full-mode time, per rep
    vs_full: float = float("nan")
    vs_full_p25: float = float("nan")
    vs_full_p75: float = float("nan")


def time_group(
    case: Case, members: dict[str, Callable[[], None]], reps: int, warmup: int, rng: random.Random
) -> dict[str, list[float]]:
    """Interleaved repetitions: each rep times every member once in a shuffled order."""
    for step in members.values():
        for _ in range(warmup):
            step()
    probe = min(time_once(members["plain"], 1, case.device) for _ in range(2))
    inner_steps = max(1, min(20, math.ceil(0.02 / max(probe, 1e-6))))  # ≥ ~20 ms per measurement
    times: dict[str, list[float]] = {name: [] for name in members}
    names = list(members)
    for _ in range(reps):
        rng.shuffle(names)
        for name in names:
            times[name].append(time_once(members[name], inner_steps, case.device))
    return times


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1))


def memory_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return sys.platform.startswith("linux") and _libc() is not None and Path("/proc/self/clear_refs").exists()


def peak_memory_mb(case: Case, factory: Callable[[], Callable[[], None]], libc: Any) -> float:
    """Peak memory of building ``factory()`` and taking two steps, above the memory just before."""
    gc.collect()
    if case.device.type == "cuda":
        torch.cuda.synchronize(case.device)
        base = torch.cuda.memory_allocated(case.device)
        torch.cuda.reset_peak_memory_stats(case.device)
        step = factory()
        step()
        step()
        torch.cuda.synchronize(case.device)
        peak = torch.cuda.max_memory_allocated(case.device) - base
    else:
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        base = _status_kb("VmRSS")
        step = factory()
        step()
        step()
        peak = (_status_kb("VmHWM") - base) * 1024
    _close(step)  # a step that hooked the model (the activation source, torchjd's autogram) unhooks it
    del step
    gc.collect()
    return peak / 2**20


# -- the step-time benchmark --------------------------------------------------------------------------------
def step_benchmark(
    methods: list[str],
    sizes: dict[str, tuple[int, int, int]],
    task_counts: tuple[int, ...],
    reps: dict[str, int],
    batch: int,
    device: torch.device,
    progress: Any,
    memory: bool = True,
    warning_counts: dict[str, dict[str, int]] | None = None,
) -> list[StepRow]:
    """Step time (and peak memory) of every method against a plain step; the warnings each method's steps
    raise are counted into ``warning_counts[method]`` instead of printed."""
    counts: dict[str, dict[str, int]] = {} if warning_counts is None else warning_counts
    rows: list[StepRow] = []
    rng = random.Random(0)
    jd = torchjd_available()
    cases = []
    for size, dims in sizes.items():
        for t in task_counts:
            case = make_case(size, dims, t, device, batch)
            cases.append(case)
            for method in methods:
                with counted_warnings(counts.setdefault(method, {})):
                    rows += _time_method(case, method, reps[size], rng, jd)
                gc.collect()
                progress.update(1)
    if memory and memory_supported(device):
        libc = _libc() if device.type == "cpu" else None
        if libc is not None:
            libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: large blocks are mmap-ed and returned on free
        for case in cases:
            measured: dict[tuple[str, str], float] = {
                ("plain", "plain"): peak_memory_mb(case, lambda c=case: plain_step(c), libc)
            }
            for row in rows:
                if row.size != case.size or row.num_tasks != case.num_tasks or row.status != "ok":
                    continue
                key = (row.method, row.variant)
                if key not in measured:
                    if row.variant in ("full", "representation"):
                        factory = lambda c=case, m=row.method, v=row.variant: method_step(c, m, v)  # noqa: E731
                    else:
                        factory = lambda c=case, m=row.method: torchjd_step(c, m)  # noqa: E731
                    with counted_warnings(counts.setdefault(row.method, {})):
                        measured[key] = peak_memory_mb(case, factory, libc)
                row.peak_mb = measured[key]
    return rows


def _time_method(case: Case, method: str, reps: int, rng: random.Random, jd: bool) -> list[StepRow]:
    """One method's rows for one case: plain, full, representation (and torchjd), timed interleaved."""
    rows: list[StepRow] = []
    size, t = case.size, case.num_tasks
    members: dict[str, Callable[[], None]] = {"plain": plain_step(case)}
    failed: dict[str, str] = {}
    for variant in ("full", "representation"):
        try:
            members[variant] = method_step(case, method, variant)
            members[variant]()  # fail here, not in the middle of the timing
        except Exception as err:
            members.pop(variant, None)
            failed[variant] = f"{type(err).__name__}: {err}"
    if jd and method in TORCHJD:
        try:
            members["torchjd"] = torchjd_step(case, method)
            members["torchjd"]()
        except Exception as err:
            members.pop("torchjd", None)
            failed["torchjd"] = f"{type(err).__name__}: {err}"
    times = time_group(case, members, reps, warmup=2, rng=rng)
    plain = times["plain"]
    for variant, ts in times.items():
        ratios = [a / b for a, b in zip(ts, plain, strict=True)]
        row = StepRow(
            size,
            case.shared_params,
            t,
            "plain" if variant == "plain" else method,
            variant,
            ms=1e3 * statistics.median(ts),
            ratio=statistics.median(ratios),
            ratio_p25=quantile(ratios, 0.25),
            ratio_p75=quantile(ratios, 0.75),
            times=ts,
        )
        if variant == "torchjd" and "full" in times:
            vs = [a / b for a, b in zip(ts, times["full"], strict=True)]
            row.vs_full, row.vs_full_p25, row.vs_full_p75 = (
                statistics.median(vs),
                quantile(vs, 0.25),
                quantile(vs, 0.75),
            )
        rows.append(row)
    for variant, message in failed.items():
        # not offered by this version (representation mode) or an optional dependency missing
        unavailable = message.startswith(("NotImplementedError", "ModuleNotFoundError", "ImportError"))
        rows.append(
            StepRow(
                size,
                case.shared_params,
                t,
                method,
                variant,
                status="n/a" if unavailable else "error",
                message=message,
            )
        )
    del members
    return rows


# -- exact full mode at scale: the activation source against the Jacobian, a plain step and torchjd ---------
#: the method of the exact rows: the gradient source's cost does not depend on it (the solve is T×T)
EXACT_METHOD = "mgda"
EXACT_VARIANTS = ("plain", "activations", "jacobian", "autogram", "autojac")
EXACT_REPS = {
    "sparse-1e5": 9,
    "sparse-1e6": 9,
    "mlp-5M": 9,
    "transformer": 7,
    "transformer-nn": 7,
    "transformer-b1": 9,
}


@dataclass
class ExactRow:
    workload: str
    description: str
    shared_params: int
    num_tasks: int
    variant: str  # one of EXACT_VARIANTS
    status: str = "ok"
    message: str = ""
    ms: float = float("nan")
    ratio: float = float("nan")  # median of the per-repetition ratios to the plain step
    ratio_p25: float = float("nan")
    ratio_p75: float = float("nan")
    vs_jacobian: float = float("nan")  # median of the per-repetition ratios to the Jacobian full mode
    vs_jacobian_p25: float = float("nan")
    vs_jacobian_p75: float = float("nan")
    peak_mb: float = float("nan")  # the median of the memory pass's repeats
    peak_mb_range: tuple[float, float] = (float("nan"), float("nan"))
    gram_rel_err: float = float("nan")  # max |G − G_ref| / max diag(G_ref), G_ref from plain autograd
    times: list[float] = field(default_factory=list)


def _close(step: Callable[[], None]) -> None:
    close = getattr(step, "close", None)
    if close is not None:
        close()


def _remove_engine_hooks(engine: Any) -> None:
    """torchjd's autogram engine removes its module hooks when it is garbage-collected (a ``weakref.finalize``
    of its hook manager); run that finalizer now, so that no hook outlives its member's measurement."""
    manager = getattr(engine, "_module_hook_manager", None)
    finalizer = getattr(manager, "_finalizer", None)
    if finalizer is not None:
        finalizer()


def exact_member(w: Any, variant: str) -> Callable[[], None]:
    """A fresh step closure of ``variant`` on workload ``w`` (all wrap ``w.inner``); ``step.close()`` removes
    whatever hooks it installed on the model."""
    inner = w.inner
    if variant == "plain":

        def step() -> None:
            inner.zero_grad(set_to_none=True)
            torch.stack(w.losses()).sum().backward()
            inner.step()

        return step
    if variant in ("activations", "jacobian") or variant.startswith("activations@"):
        # "activations@16" is the activation source with a 16 MiB budget for the δ_i (activation_memory).
        source, _, budget = variant.partition("@")
        extra: dict[str, Any] = {"model": w.model} if source == "activations" else {}
        if budget:
            extra["activation_memory"] = int(float(budget) * 2**20)
        opt = GradSurgery(inner, EXACT_METHOD, gradient_source=source, **extra)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            opt.backward(w.losses())
            opt.step()

        if source == "activations":
            step.close = opt.source.remove  # type: ignore[attr-defined]
        return step
    if variant == "autogram":
        from torchjd.aggregation import MGDAWeighting
        from torchjd.autogram import Engine

        engine = Engine(*w.shared_modules, batch_dim=None)
        weighting = MGDAWeighting()

        def step() -> None:
            inner.zero_grad(set_to_none=True)
            losses = torch.stack(w.losses())
            losses.backward(weighting(engine.compute_gramian(losses)))
            inner.step()

        step.close = lambda: _remove_engine_hooks(engine)  # type: ignore[attr-defined]
        return step
    if variant == "autojac":
        import torchjd.aggregation as A
        from torchjd import autojac

        aggregator = A.MGDA()
        shared = [p for m in w.shared_modules for p in m.parameters()]

        def step() -> None:
            inner.zero_grad(set_to_none=True)
            z, losses = w.forward()
            autojac.mtl_backward(losses, features=z)
            autojac.jac_to_grad(shared, aggregator)
            inner.step()

        return step
    raise ValueError(f"unknown variant {variant!r}")


def reference_gram(w: Any) -> torch.Tensor:
    """G over the shared parameters from one plain ``autograd.grad`` per task (sparse table gradients
    multiplied as sparse tensors), in float64: the reference every source is compared with."""
    params = [p for m in w.shared_modules for p in m.parameters()]
    losses = w.losses()
    grads = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses]
    t = len(losses)
    gram = torch.zeros(t, t, dtype=torch.float64)
    for k in range(len(params)):
        gs = [g[k] for g in grads]
        for i in range(t):
            for j in range(i, t):
                a, b = gs[i], gs[j]
                if a is None or b is None:
                    continue
                if a.is_sparse:
                    value = torch.sparse.sum(a.coalesce().double() * b.coalesce().double())
                    value = value.to_dense() if value.is_sparse else value
                else:
                    value = (a.double() * b.double()).sum()
                gram[i, j] += float(value)
                gram[j, i] = gram[i, j]
    return gram


def exact_grams(w: Any, variants: list[str]) -> dict[str, torch.Tensor]:
    """G of each Gram-producing variant on one forward (no step), to compare with ``reference_gram``."""
    out: dict[str, torch.Tensor] = {}
    act = GradSurgery(w.inner, EXACT_METHOD, model=w.model, gradient_source="activations")
    engine = None
    if "autogram" in variants:
        from torchjd.autogram import Engine

        engine = Engine(*w.shared_modules, batch_dim=None)
    try:
        losses = w.losses()
        out["activations"] = act.backward(losses, retain_graph=True).gram.double().cpu()
        if "jacobian" in variants:
            jac = GradSurgery(w.inner, EXACT_METHOD, gradient_source="jacobian")
            out["jacobian"] = jac.backward(losses, retain_graph=True).gram.double().cpu()
        if engine is not None:
            out["autogram"] = engine.compute_gramian(torch.stack(losses)).detach().double().cpu()
    finally:
        act.source.remove()
        if engine is not None:
            _remove_engine_hooks(engine)
        w.inner.zero_grad(set_to_none=True)
    return out


def exact_variants(w: Any, jd: bool) -> tuple[list[str], dict[str, str]]:
    """The variants that run on ``w`` (each tried once) and the error message of those that do not."""
    wanted = [v for v in EXACT_VARIANTS if jd or v not in ("autogram", "autojac")]
    ok, failed = [], {}
    for variant in wanted:
        step = None
        try:
            step = exact_member(w, variant)
            step()
            ok.append(variant)
        except Exception as err:  # reported in the table: e.g. the Jacobian cannot hold sparse gradients
            failed[variant] = f"{type(err).__name__}: {err}"
        finally:
            if step is not None:
                _close(step)
            w.inner.zero_grad(set_to_none=True)
    return ok, failed


def time_exact(w: Any, variants: list[str], reps: int, rng: random.Random) -> dict[str, list[float]]:
    """Interleaved repetitions: each repetition builds every variant afresh (hooks exist only while their own
    variant is measured), takes one untimed step, then times it, in a freshly shuffled order."""
    probe = []
    for _ in range(2):
        step = exact_member(w, "plain")
        step()
        probe.append(time_once(step, 1, w.device))
    inner_steps = max(1, min(20, math.ceil(0.02 / max(min(probe), 1e-6))))
    times: dict[str, list[float]] = {v: [] for v in variants}
    order = list(variants)
    for _ in range(reps):
        rng.shuffle(order)
        for variant in order:
            step = exact_member(w, variant)
            try:
                step()
                times[variant].append(time_once(step, inner_steps, w.device))
            finally:
                _close(step)
    return times


def exact_timings(
    workloads: dict[str, tuple[tuple[int, ...], Callable[..., Any]]],
    device: torch.device,
    tiny: bool,
    reps: dict[str, int],
    progress: Any,
    warning_counts: dict[str, int] | None = None,
) -> list[ExactRow]:
    """Step time of every variant on every workload (built, timed and freed one at a time) and each Gram
    source's error against ``reference_gram``. Peak memory is measured later (``exact_memory``)."""
    counts: dict[str, int] = {} if warning_counts is None else warning_counts
    rows: list[ExactRow] = []
    rng = random.Random(1)
    jd = torchjd_available()
    for name, (task_counts, build) in workloads.items():
        for t in task_counts:
            with counted_warnings(counts):
                w = build(t, device, tiny)
                w.name = name
                variants, failed = exact_variants(w, jd)
                errors = {}
                if "activations" in variants:
                    reference = reference_gram(w)
                    w.inner.zero_grad(set_to_none=True)
                    scale = float(reference.diagonal().max())
                    for variant, gram in exact_grams(w, variants).items():
                        errors[variant] = float((gram - reference).abs().max()) / scale
                times = time_exact(w, variants, reps.get(name, 7), rng)
            plain = times.get("plain", [])
            for variant in EXACT_VARIANTS:
                row = ExactRow(name, w.description, w.shared_params, t, variant)
                if variant in failed:
                    row.status, row.message = "error", failed[variant]
                elif variant not in times:
                    row.status, row.message = "n/a", "torchjd is not installed"
                else:
                    ts = times[variant]
                    ratios = [a / b for a, b in zip(ts, plain, strict=True)]
                    row.ms, row.times = 1e3 * statistics.median(ts), ts
                    row.ratio = statistics.median(ratios)
                    row.ratio_p25, row.ratio_p75 = quantile(ratios, 0.25), quantile(ratios, 0.75)
                    if "jacobian" in times:
                        vs = [a / b for a, b in zip(ts, times["jacobian"], strict=True)]
                        row.vs_jacobian = statistics.median(vs)
                        row.vs_jacobian_p25, row.vs_jacobian_p75 = quantile(vs, 0.25), quantile(vs, 0.75)
                    row.gram_rel_err = errors.get(variant, float("nan"))
                rows.append(row)
            del w
            gc.collect()
            progress.update(1)
    return rows


def exact_memory(
    workloads: dict[str, tuple[tuple[int, ...], Callable[..., Any]]],
    rows: list[ExactRow],
    device: torch.device,
    tiny: bool,
    warning_counts: dict[str, int] | None = None,
    repeats: int = 3,
) -> None:
    """Peak memory of each variant that ran (the median of ``repeats`` measurements, their range kept in
    ``peak_mb_range``), workload by workload (rebuilt: the timings freed them), after every timing of the
    suite: forcing large blocks to ``mmap`` (so that the peak is seen) slows allocation."""
    if not memory_supported(device):
        return
    counts: dict[str, int] = {} if warning_counts is None else warning_counts
    libc = _libc() if device.type == "cpu" else None
    if libc is not None:
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: large blocks are mmap-ed and returned on free
    for name, (task_counts, build) in workloads.items():
        for t in task_counts:
            mine = [r for r in rows if r.workload == name and r.num_tasks == t and r.status == "ok"]
            if not mine:
                continue
            with counted_warnings(counts):
                w = build(t, device, tiny)
                exact_member(w, "plain")()  # the optimizer's state exists before the first measurement
                w.inner.zero_grad(set_to_none=True)
                for row in mine:
                    peaks = []
                    for _ in range(repeats):
                        peaks.append(peak_memory_mb(w, lambda v=row.variant, w=w: exact_member(w, v), libc))
                        w.inner.zero_grad(set_to_none=True)
                    row.peak_mb = statistics.median(peaks)
                    row.peak_mb_range = (min(peaks), max(peaks))
            del w
            gc.collect()


# -- the solver benchmark -----------------------------------------------------------------------------------
def random_grams(num_tasks: int, count: int, seed: int = 0, dim: int = 512) -> list[np.ndarray]:
    """Gram matrices of task gradients g_i = s_i (c_i u + v_i): a shared direction u, task-specific v_i,
    signed mixing c_i (c_0 = 1 and c_1 ≤ −0.2, so tasks 0 and 1 always conflict, others at random), and
    scales s_i over two orders of magnitude."""
    rng = np.random.default_rng([seed, num_tasks])
    grams = []
    for _ in range(count):
        u = rng.standard_normal(dim)
        v = rng.standard_normal((num_tasks, dim))
        c = rng.uniform(-1.0, 1.0, num_tasks)
        c[0] = 1.0
        c[1] = -0.2 - abs(c[1])
        s = 10 ** rng.uniform(-1, 1, num_tasks)
        j = s[:, None] * (c[:, None] * u + v)
        grams.append(j @ j.T)
    return grams


@dataclass
class SolverRow:
    solver: str
    num_tasks: int
    status: str = "ok"
    message: str = ""
    us: float = float("nan")
    us_p90: float = float("nan")
    first_ms: float = float("nan")


def _time_calls(fn: Callable[[np.ndarray], Any], grams: list[np.ndarray], calls: int) -> tuple[float, float]:
    samples = []
    for k in range(calls):
        g = grams[k % len(grams)]
        start = time.perf_counter()
        fn(g)
        samples.append(time.perf_counter() - start)
    return 1e6 * statistics.median(samples), 1e6 * quantile(samples, 0.9)


def solver_benchmark(
    methods: list[str],
    task_counts: tuple[int, ...],
    calls: int,
    progress: Any,
    warning_counts: dict[str, dict[str, int]] | None = None,
) -> list[SolverRow]:
    """Per-call time of the Gram-based solvers and of each method's ``compute_weights``; the warnings of
    each entry are counted into ``warning_counts[label]`` instead of printed."""
    from gradsurgery import make_method, solvers

    counts: dict[str, dict[str, int]] = {} if warning_counts is None else warning_counts

    rows: list[SolverRow] = []
    for t in task_counts:
        grams = random_grams(t, 32)
        entries: list[tuple[str, Callable[[], Callable[[np.ndarray], Any]]]] = []
        if t == 2:
            entries.append(("closed form (min_norm_two_weights)", lambda: solvers.min_norm_two_weights))
        entries.append(("Frank-Wolfe (simplex_min_norm)", lambda: solvers.simplex_min_norm))
        entries.append(("Frank-Wolfe (main_aux_min_norm)", lambda: lambda g: solvers.main_aux_min_norm(g, 0)))

        def cvxpy_factory(t: int = t) -> Callable[[np.ndarray], Any]:
            qp = solvers.SimplexQP(t)
            return qp.solve

        entries.append(("cvxpy QP (SimplexQP.solve)", cvxpy_factory))
        for name in methods:

            def method_factory(name: str = name, t: int = t) -> Callable[[np.ndarray], Any]:
                method = make_method(name, **method_options(name, t, 0))
                method.bind(t)
                losses = torch.linspace(1.0, 2.0, t, dtype=torch.float64)
                return lambda g: method(torch.from_numpy(g), losses)

            entries.append((f"method {name}", method_factory))
        for label, factory in entries:
            row = SolverRow(label, t)
            try:
                with counted_warnings(counts.setdefault(label, {})):
                    start = time.perf_counter()
                    fn = factory()
                    fn(grams[0])  # the first call builds (cvxpy: canonicalises) the problem
                    row.first_ms = 1e3 * (time.perf_counter() - start)
                    row.us, row.us_p90 = _time_calls(fn, grams, calls)
            except Exception as err:
                row.status, row.message = "error", f"{type(err).__name__}: {err}"
            rows.append(row)
        progress.update(1)
    return rows


# -- report -------------------------------------------------------------------------------------------------
def _ratio_cell(row: StepRow | None) -> str:
    if row is None:
        return "—"
    if row.status == "n/a":
        return "n/a (not available)"
    if row.status != "ok":
        return "error"
    cell = f"{row.ratio:.2f}× ({row.ratio_p25:.2f}–{row.ratio_p75:.2f})"
    if math.isfinite(row.vs_full):
        cell += f"; {row.vs_full:.2f}× ours"
    return cell


def step_tables(rows: list[StepRow]) -> str:
    from .report import fmt_value, md_table

    parts = []
    task_counts = sorted({r.num_tasks for r in rows})
    for size in dict.fromkeys(r.size for r in rows):
        sub = [r for r in rows if r.size == size]
        params = sub[0].shared_params
        plains = {t: [r.ms for r in sub if r.num_tasks == t and r.variant == "plain"] for t in task_counts}
        plain_ms = ", ".join(f"T={t}: {statistics.median(v):.2f} ms" for t, v in plains.items() if v)
        variants = [v for v in ("full", "representation", "torchjd") if any(r.variant == v for r in sub)]
        header = ["method", *[f"{v} T={t}" for v in variants for t in task_counts]]
        table_rows = []
        for method in dict.fromkeys(r.method for r in sub if r.variant != "plain"):
            cells = [method]
            for v in variants:
                for t in task_counts:
                    match = [r for r in sub if r.method == method and r.variant == v and r.num_tasks == t]
                    cells.append(_ratio_cell(match[0]) if match else "—")
            table_rows.append(cells)
        parts.append(
            f"#### Step time relative to a plain summed-loss step: {size} model ({params:,} shared "
            f"parameters)\n\nplain step (median): {plain_ms}. Cells: median ratio to the plain step "
            f"(25th–75th percentile); torchjd cells add its time over gradsurgery's full-mode step of the "
            f"same method (× ours).\n\n" + md_table(header, table_rows)
        )
        mem_header = ["method", *[f"{v} T={t}" for v in ["plain", *variants] for t in task_counts]]
        mem_rows = []
        if any(math.isfinite(r.peak_mb) for r in sub):
            plain_cells = ["plain"]
            for v in ["plain", *variants]:
                for t in task_counts:
                    match = (
                        [r for r in sub if r.variant == "plain" and r.num_tasks == t] if v == "plain" else []
                    )
                    plain_cells.append(fmt_value(match[0].peak_mb, 3) if match else "")
            mem_rows.append(plain_cells)
            for method in dict.fromkeys(r.method for r in sub if r.variant != "plain"):
                cells = [method]
                for v in ["plain", *variants]:
                    for t in task_counts:
                        match = [r for r in sub if r.method == method and r.variant == v and r.num_tasks == t]
                        cells.append(
                            fmt_value(match[0].peak_mb, 3) if match and match[0].status == "ok" else ""
                        )
                mem_rows.append(cells)
            parts.append(
                f"#### Peak memory of a step above the model and Adam state (MiB): {size} model\n\n"
                + md_table(mem_header, mem_rows)
            )
    return "\n\n".join(parts)


def _exact_ratio(row: ExactRow | None) -> str:
    if row is None:
        return "—"
    if row.status == "n/a":
        return "n/a"
    if row.status != "ok":
        return "error (below)"
    return f"{row.ratio:.2f}× ({row.ratio_p25:.2f}–{row.ratio_p75:.2f})"


def exact_tables(rows: list[ExactRow]) -> str:
    """Step time (× the plain step, and the activation source × the Jacobian), peak memory and G's error."""
    from .report import fmt_value, md_table

    keys = list(dict.fromkeys((r.workload, r.num_tasks) for r in rows))

    def get(key: tuple[str, int], variant: str) -> ExactRow | None:
        return next((r for r in rows if (r.workload, r.num_tasks) == key and r.variant == variant), None)

    time_rows, mem_rows, err_rows = [], [], []
    for key in keys:
        plain, act, jac = get(key, "plain"), get(key, "activations"), get(key, "jacobian")
        head = [key[0], str(key[1]), f"{plain.shared_params:,}" if plain else "—"]
        vs = (
            f"{act.vs_jacobian:.2f}× ({act.vs_jacobian_p25:.2f}–{act.vs_jacobian_p75:.2f})"
            if act and math.isfinite(act.vs_jacobian)
            else "—"
        )
        time_rows.append(
            [
                *head,
                f"{plain.ms:.1f}" if plain and plain.status == "ok" else "—",
                *(_exact_ratio(get(key, v)) for v in EXACT_VARIANTS[1:]),
                vs,
            ]
        )
        peaks = {v: get(key, v) for v in EXACT_VARIANTS}
        cells = [fmt_value(r.peak_mb, 3) if r and r.status == "ok" else "—" for r in peaks.values()]
        extra = "—"
        if act and jac and plain and all(math.isfinite(r.peak_mb) for r in (act, jac, plain)):
            extra = f"{(act.peak_mb - plain.peak_mb) / (jac.peak_mb - plain.peak_mb):.2f}"
        vs_plain = "—"
        if (
            act
            and plain
            and math.isfinite(act.peak_mb)
            and math.isfinite(plain.peak_mb)
            and plain.peak_mb > 0
        ):
            vs_plain = f"{act.peak_mb / plain.peak_mb:.2f}"
        mem_rows.append([*head[:2], *cells, vs_plain, extra])
        err_rows.append(
            [
                *head[:2],
                *(
                    f"{r.gram_rel_err:.1e}" if r and math.isfinite(r.gram_rel_err) else "—"
                    for r in (act, jac, get(key, "autogram"))
                ),
            ]
        )
    descriptions = "\n".join(
        f"- `{name}`: {next(r.description for r in rows if r.workload == name)}"
        for name in dict.fromkeys(r.workload for r in rows)
    )
    errors = "\n".join(
        f"- {r.workload} T={r.num_tasks}, {r.variant}: {r.message[:300]}" for r in rows if r.status == "error"
    )
    parts = [
        f"Method `{EXACT_METHOD}` throughout (the sources' cost does not depend on it). Variants: `plain` "
        "(`sum(losses).backward()` and the step), `activations` (`GradSurgery(..., model=model, "
        "gradient_source='activations')`), `jacobian` (`gradient_source='jacobian'`, today's full mode), "
        "`autogram` (torchjd: `Engine(*shared modules, batch_dim=None)`, `compute_gramian`, `MGDAWeighting`, "
        "one backward of the weighted losses), `autojac` (torchjd: `mtl_backward` on the shared features, "
        "`jac_to_grad` with `MGDA()`).\n\n" + descriptions,
        "#### Step time relative to a plain step\n\nCells: median ratio to the plain step of the same "
        "repetition (25th–75th percentile); every repetition builds each variant afresh, takes one untimed "
        "step and times it, in a shuffled order.\n\n"
        + md_table(
            [
                "workload",
                "T",
                "shared params",
                "plain ms",
                "activations",
                "jacobian",
                "autogram",
                "autojac",
                "activations / jacobian",
            ],
            time_rows,
        ),
        "#### Peak memory of a step above the model and optimizer state (MiB)\n\nThe median of three "
        "measurements (each: a fresh variant, two steps, the peak resident memory above the memory just "
        "before); their ranges are in `speed.json` (`peak_mb_range`).\n\n"
        + md_table(
            [
                "workload",
                "T",
                *EXACT_VARIANTS,
                "activations / plain",
                "(activations − plain) / (jacobian − plain)",
            ],
            mem_rows,
        ),
        "#### The Gram matrix against plain autograd\n\nmax |G − G_ref| / max diag(G_ref), G_ref from one "
        "`autograd.grad` per task over the shared parameters (float64 products).\n\n"
        + md_table(["workload", "T", "activations", "jacobian", "autogram"], err_rows),
    ]
    if errors:
        parts.append("Errors:\n\n" + errors)
    return "\n\n".join(parts)


def exact_targets(rows: list[ExactRow]) -> str:
    """Issue 12's targets on the exact rows, met or missed, with the measured values."""

    def get(workload: str, t: int, variant: str) -> ExactRow | None:
        return next(
            (
                r
                for r in rows
                if r.workload == workload and r.num_tasks == t and r.variant == variant and r.status == "ok"
            ),
            None,
        )

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    lines = []
    sparse_extra: dict[int, dict[str, float]] = {}
    for workload in ("sparse-1e5", "sparse-1e6"):
        for t in sorted({r.num_tasks for r in rows if r.workload == workload}):
            act, plain = get(workload, t, "activations"), get(workload, t, "plain")
            if act is None:
                continue
            lines.append(
                f"- {workload} T={t}: activation source ≤ 2× a plain step: {verdict(act.ratio <= 2.0)} "
                f"({act.ratio:.2f}×, {act.ratio_p25:.2f}–{act.ratio_p75:.2f})"
            )
            if plain is not None and math.isfinite(act.peak_mb) and math.isfinite(plain.peak_mb):
                sparse_extra.setdefault(t, {})[workload] = act.peak_mb - plain.peak_mb
    # The memory the source adds must follow the batch, not the table: the same above plain for both sizes.
    for t, extra in sorted(sparse_extra.items()):
        if len(extra) == 2:
            small, large = extra["sparse-1e5"], extra["sparse-1e6"]
            rel = (large - small) / abs(small) if small else float("inf")
            lines.append(
                f"- sparse T={t}: peak memory above plain the same (within 10 %) for 10⁵ and 10⁶ rows: "
                f"{verdict(abs(rel) <= 0.10)} ({small:.2f} and {large:.2f} MiB, {rel:+.0%})"
            )
    act, jac, plain = (get("mlp-5M", 8, v) for v in ("activations", "jacobian", "plain"))
    if act is not None and jac is not None:
        lines.append(
            f"- mlp-5M T=8: activation source ≤ 0.7× the Jacobian full mode's step time: "
            f"{verdict(act.vs_jacobian <= 0.7)} ({act.vs_jacobian:.2f}×, "
            f"{act.vs_jacobian_p25:.2f}–{act.vs_jacobian_p75:.2f})"
        )
        if plain is not None and all(math.isfinite(r.peak_mb) for r in (act, jac, plain)):
            frac = (act.peak_mb - plain.peak_mb) / (jac.peak_mb - plain.peak_mb)
            lines.append(
                f"- mlp-5M T=8: peak memory above plain ≤ 1/4 of the Jacobian's: {verdict(frac <= 0.25)} "
                f"({act.peak_mb - plain.peak_mb:.1f} vs {jac.peak_mb - plain.peak_mb:.1f} MiB, {frac:.2f})"
            )
    for workload in ("transformer", "transformer-nn", "transformer-b1"):
        act, jac, plain = (get(workload, 4, v) for v in ("activations", "jacobian", "plain"))
        if None in (act, jac, plain) or not all(math.isfinite(r.peak_mb) for r in (act, jac, plain)):
            continue
        frac = (act.peak_mb - plain.peak_mb) / (jac.peak_mb - plain.peak_mb)
        lines.append(
            f"- {workload} T=4: peak memory above plain ≤ 1/2 of the Jacobian's: {verdict(frac <= 0.5)} "
            f"({act.peak_mb - plain.peak_mb:.1f} vs {jac.peak_mb - plain.peak_mb:.1f} MiB, {frac:.2f})"
        )
    return "\n".join(lines)


def solver_table(rows: list[SolverRow]) -> str:
    from .report import fmt_value, md_table

    task_counts = sorted({r.num_tasks for r in rows})
    header = ["solver / method", *[f"T={t}" for t in task_counts], "first call T=max"]
    out = []
    for name in dict.fromkeys(r.solver for r in rows):
        cells = [name]
        last = None
        for t in task_counts:
            match = [r for r in rows if r.solver == name and r.num_tasks == t]
            if not match:
                cells.append("—")
                continue
            r = match[0]
            last = r
            cells.append(
                f"{fmt_value(r.us, 3)} µs (p90 {fmt_value(r.us_p90, 3)})" if r.status == "ok" else "error"
            )
        cells.append(f"{fmt_value(last.first_ms, 3)} ms" if last and last.status == "ok" else "—")
        out.append(cells)
    errors = [f"- {r.solver} T={r.num_tasks}: {r.message}" for r in rows if r.status != "ok"]
    return md_table(header, out) + ("\n\nErrors:\n" + "\n".join(errors) if errors else "")


def _missed_line(miss: list) -> str:
    """The configurations that miss a step-time target, worst first."""
    return "  - missed (method size T: ratio): " + ", ".join(
        f"{r.method} {r.size} T={r.num_tasks}: {r.ratio:.2f}×" for r in sorted(miss, key=lambda r: -r.ratio)
    )


def _needs_gram(method: str) -> bool:
    """Whether ``method`` reads the Gram matrix (not a pure loss weighting)."""
    from gradsurgery import make_method

    try:
        return bool(make_method(method, **method_options(method, 2, 0)).needs_gram)
    except Exception:
        return True


def targets(step_rows: list[StepRow], solver_rows: list[SolverRow]) -> str:
    """The speed targets, met or missed, with the measured values."""
    lines: list[str] = []
    if not step_rows and not solver_rows:
        return ""
    rep = [r for r in step_rows if r.variant == "representation" and r.status == "ok"]
    full = [r for r in step_rows if r.variant == "full" and r.status == "ok"]
    if rep:
        miss = [r for r in rep if r.ratio > 1.2]
        worst = max(rep, key=lambda r: r.ratio)
        lines.append(
            f"- representation mode ≤ 1.2× plain: {len(rep) - len(miss)}/{len(rep)} configurations meet it "
            f"(worst {worst.ratio:.2f}×: {worst.method}, {worst.size}, T={worst.num_tasks})"
        )
        if miss:
            lines.append(_missed_line(miss))
        small = [r for r in rep if r.size == "small" and _needs_gram(r.method)]
        if small:
            miss = [r for r in small if r.ratio > 1.2]
            lines.append(
                f"- small model, Gram-based methods, representation mode ≤ 1.2× plain: "
                f"{len(small) - len(miss)}/{len(small)} configurations meet it"
            )
            if miss:
                lines.append(_missed_line(miss))
    elif step_rows:
        lines.append("- representation mode: n/a (not available in this gradsurgery version)")
    if full:
        miss = [r for r in full if r.ratio > r.num_tasks + 1]
        lines.append(
            f"- full mode ≤ (T + 1)× plain: {len(full) - len(miss)}/{len(full)} configurations meet it"
        )
        if miss:
            lines.append(_missed_line(miss))
    for prefix, limit_us, label in (
        ("Frank-Wolfe (simplex", 200, "Gram-based solver (Frank-Wolfe) ≤ 0.2 ms for T ≤ 10"),
        ("closed form", 200, "closed form ≤ 0.2 ms"),
        ("cvxpy", 3000, "cvxpy path ≤ 3 ms per step for T ≤ 10"),
    ):
        sel = [
            r for r in solver_rows if r.solver.startswith(prefix) and r.num_tasks <= 10 and r.status == "ok"
        ]
        if sel:
            worst = max(sel, key=lambda r: r.us)
            ok = worst.us <= limit_us
            lines.append(
                f"- {label}: {'met' if ok else 'MISSED'} "
                f"(slowest median {worst.us:.0f} µs at T={worst.num_tasks})"
            )
    calls = [
        r for r in solver_rows if r.solver.startswith("method ") and r.num_tasks <= 10 and r.status == "ok"
    ]
    if calls:
        slow = sorted({r.solver.removeprefix("method ") for r in calls if r.us > 200})
        worst = max(calls, key=lambda r: r.us)
        verdict = "met" if not slow else f"MISSED by {', '.join(slow)}"
        name = worst.solver.removeprefix("method ")
        lines.append(
            f"- every method's weights ≤ 0.2 ms for T ≤ 10: {verdict} "
            f"(slowest median {worst.us:.0f} µs: {name} at T={worst.num_tasks})"
        )
    return "\n".join(lines)


def write_outputs(
    out: Path,
    step_rows: list[StepRow],
    solver_rows: list[SolverRow],
    meta: dict[str, Any],
    exact_rows: list[ExactRow] | None = None,
) -> None:
    import csv

    from .report import write_json

    exact_rows = exact_rows or []
    write_json(
        out / "speed.json",
        {
            "meta": meta,
            "steps": [vars(r) for r in step_rows],
            "solvers": [vars(r) for r in solver_rows],
            "exact": [vars(r) for r in exact_rows],
        },
    )
    with open(out / "speed.csv", "w", newline="") as f:
        fields = [
            "kind",
            "size",
            "shared_params",
            "num_tasks",
            "method",
            "variant",
            "status",
            "message",
            "ms",
            "ratio",
            "ratio_p25",
            "ratio_p75",
            "vs_full",
            "vs_full_p25",
            "vs_full_p75",
            "peak_mb",
            "us",
            "us_p90",
            "first_ms",
            "vs_jacobian",
            "vs_jacobian_p25",
            "vs_jacobian_p75",
            "gram_rel_err",
        ]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in step_rows:
            writer.writerow({"kind": "step", **vars(r)})
        for r in solver_rows:
            writer.writerow({"kind": "solver", "method": r.solver, **vars(r)})
        for r in exact_rows:
            writer.writerow({"kind": "exact", "size": r.workload, "method": EXACT_METHOD, **vars(r)})


def plot(out: Path, step_rows: list[StepRow], solver_rows: list[SolverRow]) -> list[str]:
    from .report import _pyplot

    plt = _pyplot()
    if plt is None:
        return []
    files = []
    sizes = list(dict.fromkeys(r.size for r in step_rows))
    variants = [
        v
        for v in ("full", "representation", "torchjd")
        if any(r.variant == v and r.status == "ok" for r in step_rows)
    ]
    if sizes and variants:
        fig, axes = plt.subplots(
            len(sizes), len(variants), figsize=(4.8 * len(variants), 3.6 * len(sizes)), squeeze=False
        )
        for i, size in enumerate(sizes):
            for j, v in enumerate(variants):
                ax = axes[i][j]
                ax.set_prop_cycle(color=plt.cm.tab20(np.linspace(0, 1, 20)))
                for method in dict.fromkeys(r.method for r in step_rows if r.variant == v):
                    pts = sorted(
                        (r.num_tasks, r.ratio, r.ratio_p25, r.ratio_p75)
                        for r in step_rows
                        if r.size == size and r.variant == v and r.method == method and r.status == "ok"
                    )
                    if pts:
                        t, m, lo, hi = zip(*pts, strict=True)
                        ax.errorbar(
                            t,
                            m,
                            yerr=[np.subtract(m, lo), np.subtract(hi, m)],
                            marker="o",
                            ms=3,
                            capsize=2,
                            label=method,
                            linewidth=1,
                        )
                ts = sorted({r.num_tasks for r in step_rows})
                if v == "full":
                    ax.plot(ts, [t + 1 for t in ts], "k--", linewidth=0.8, label="target T+1")
                elif v == "representation":
                    ax.axhline(1.2, color="k", linestyle="--", linewidth=0.8, label="target 1.2")
                ax.set_title(f"{size}: {v} / plain", fontsize=9)
                ax.set_xlabel("tasks T", fontsize=8)
                ax.set_xticks(ts)
                ax.tick_params(labelsize=7)
                ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "speed_steps.png", dpi=110)
        plt.close(fig)
        files.append("speed_steps.png")
    ok = [r for r in solver_rows if r.status == "ok" and not r.solver.startswith("method")]
    if ok:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for name in dict.fromkeys(r.solver for r in ok):
            pts = sorted((r.num_tasks, r.us) for r in ok if r.solver == name)
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.axhline(200, color="k", linestyle=":", linewidth=0.8)
        ax.axhline(3000, color="k", linestyle="--", linewidth=0.8)
        ax.set_xlabel("tasks T")
        ax.set_ylabel("µs per call (median)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "speed_solvers.png", dpi=110)
        plt.close(fig)
        files.append("speed_solvers.png")
    return files


def run(args: argparse.Namespace, out: Path, meta: dict[str, Any]) -> list[str]:
    """``--suite speed``: returns the report's Markdown lines."""
    from .console import progress_bar, say

    device = torch.device(getattr(args, "device", "cpu"))
    selected = getattr(args, "speed_rows", None) or list(SPEED_ROWS)
    if args.tiny:
        sizes, task_counts, solver_counts, reps, calls, batch = TINY_SIZES, (2,), (2, 4), {"tiny": 2}, 5, 8
        if not any(size in selected for size in SIZES):
            sizes = {}
        exact_reps = dict.fromkeys(WORKLOADS, 2)
    else:
        sizes, task_counts, solver_counts, calls, batch = SIZES, TASK_COUNTS, SOLVER_TASK_COUNTS, 200, BATCH
        sizes = {k: v for k, v in SIZES.items() if k in selected}
        reps = {"small": 15, "0.5M": 15, "5M": 7}
        exact_reps = EXACT_REPS
    if "solvers" not in selected:
        solver_counts = ()
    workloads = {k: v for k, v in WORKLOADS.items() if k in selected}
    methods = args.methods
    meta.update(
        {
            "speed_rows": selected,
            "speed_sizes": sizes,
            "speed_task_counts": task_counts,
            "speed_batch": batch,
            "speed_reps": reps,
            "exact_workloads": {k: list(v[0]) for k, v in workloads.items()},
            "exact_reps": {k: exact_reps.get(k) for k in workloads},
            "exact_method": EXACT_METHOD,
            "torchjd": _torchjd_version(),
        }
    )
    bar = progress_bar(
        len(sizes) * len(task_counts) * len(methods)
        + len(solver_counts)
        + sum(len(v[0]) for v in workloads.values()),
        "speed",
        not args.no_progress,
    )
    start = time.perf_counter()
    solver_warnings: dict[str, dict[str, int]] = {}
    step_warnings: dict[str, dict[str, int]] = {}
    exact_warnings: dict[str, int] = {}
    try:
        solver_rows = solver_benchmark(methods, solver_counts, calls, bar, warning_counts=solver_warnings)
        # Every timing before any memory pass: the memory passes force large blocks to mmap (see
        # ``peak_memory_mb``), which slows allocation for the rest of the process.
        exact_rows = exact_timings(workloads, device, args.tiny, exact_reps, bar, exact_warnings)
        step_rows = step_benchmark(
            methods, sizes, task_counts, reps, batch, device, bar, warning_counts=step_warnings
        )
        exact_memory(workloads, exact_rows, device, args.tiny, exact_warnings, repeats=1 if args.tiny else 3)
    finally:
        bar.close()
    if exact_warnings:
        step_warnings[f"{EXACT_METHOD} (exact rows)"] = exact_warnings
    meta["speed_seconds"] = time.perf_counter() - start
    write_outputs(out, step_rows, solver_rows, meta, exact_rows)
    plots = plot(out, step_rows, solver_rows)
    jd = meta["torchjd"]
    lines = [
        "## Speed and memory",
        "",
        f"{device}, {torch.get_num_threads()} thread(s), batch {batch}, Adam; "
        f"torchjd: {jd or 'not installed'}.",
        "",
        "### Step time and peak memory",
        "",
        step_tables(step_rows) if step_rows else "(not selected: --speed-rows)",
        "",
        "### Exact full mode at scale: the activation source, the Jacobian and torchjd",
        "",
        exact_tables(exact_rows) if exact_rows else "(not selected: --speed-rows)",
        "",
        "### Solver time per call (after the first call; µs, median and 90th percentile)",
        "",
        solver_table(solver_rows) if solver_rows else "(not selected: --speed-rows)",
        "",
        "### Targets",
        "",
        "\n".join(t for t in (targets(step_rows, solver_rows), exact_targets(exact_rows)) if t),
        "",
        "Plots: " + (", ".join(f"`{p}`" for p in plots) or "none (matplotlib missing)"),
        "",
        *warning_lines(step_warnings, solver_warnings),
    ]
    say("\n".join(lines))
    return lines


def warning_lines(step: dict[str, dict[str, int]], solver: dict[str, dict[str, int]]) -> list[str]:
    """The warnings counted during the measurements (solver fallbacks, cvxpy's inaccurate-solution notices),
    per method: a note after the tables, never printed raw."""
    items = [f"steps of `{name}`: {count_text(c)}" for name, c in step.items() if c]
    items += [f"solver timing of {name}: {count_text(c)}" for name, c in solver.items() if c]
    if not items:
        return []
    return ["### Warnings counted during the measurements", "", *(f"- {item}" for item in items), ""]


def _torchjd_version() -> str | None:
    if not torchjd_available():
        return None
    try:
        from importlib.metadata import version

        return version("torchjd")
    except Exception:
        return "installed"


#: what ``--speed-rows`` selects from: the solver timings, the sizes of the step-time table, the exact rows
SPEED_ROWS = (
    "solvers",
    *SIZES,
    "sparse-1e5",
    "sparse-1e6",
    "mlp-5M",
    "transformer",
    "transformer-nn",
    "transformer-b1",
)

__all__ = [
    "SPEED_ROWS",
    "SpeedModel",
    "exact_memory",
    "exact_timings",
    "random_grams",
    "run",
    "solver_benchmark",
    "step_benchmark",
]
