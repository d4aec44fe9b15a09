"""Representation mode on small models: each method's step with task views against a plain step and against
the same algorithm written by hand (the floor any implementation of it pays).

The speed suite's MLP (``small``: trunk 128→384→384→256, ``0.5M``: 256→512→512→256; T linear heads, batch
128 (``--batch N``), Adam, one thread; ``--tower N``: heads d_z → N → N → 1 with ReLU instead; ``--device
cuda``: the model and the batch on a GPU, the clock read after ``torch.cuda.synchronize``). Variants, timed
interleaved (every repetition times each variant once in a shuffled order and divides by the plain step of the
same repetition):

- ``plain``: ``sum(losses).backward()`` and the Adam step;
- ``floor``: representation mode with task views written directly in torch, without gradsurgery: the heads
  on T detached copies of z, one ``autograd.grad`` of Σ_i L_i to the copies and the heads' parameters, the
  T×(n·d_z) matrix of the copies' gradients, G in float64, MGDA's weights (``simplex_min_norm``), one
  ``autograd.grad`` of z with the fused gradient to the trunk's parameters, ``.grad`` set, the Adam step;
- ``floor one pass``: the same algorithm in one ``autograd.grad`` over every parameter: the heads read T
  outputs of one autograd function of z, whose backward receives the T gradients together, solves and
  returns the fused gradient, so that the engine carries on through the trunk (whether one engine run for
  the heads and the trunk costs less than two);
- ``z``: ``GradSurgery(adam, "mgda").backward(losses, features=z)`` (the heads once: their graph splits at z);
- ``z per task``: the same as if the graph did not split (one ``autograd.grad`` per task, then the heads
  again in the pass that fills ``.grad``: T + 1 passes through the heads);
- each method: ``backward(losses, features=task_views(z, T))`` (the heads once, the trunk once);
- with ``--numpy-twins``, ``<method>, NumPy only`` for each method: the method again with the solvers' NumPy
  and LAPACK paths only (not ``check_gram``'s reading of G in Python floats, nor ``simplex_min_norm``'s full
  face, for 8 tasks or fewer).

With ``--loss-weightings`` the variants are instead the loss weightings that read only the losses (``sum``,
``dwa``, ``uncertainty``, ``rlw``, ``famo``; or those named), each five ways: ``<m> full`` (full mode: one
backward of Σ w_i L_i), ``<m> z`` and ``<m> views`` (``features=z`` and task views, which take that one
backward too: through the views, the heads and then the trunk), and ``<m> z, G_z`` and ``<m> views, G_z``
(``diagnostics=True``: G_z over the features, as the Gram-based methods form it).

Rank statistics: the median ratio and its 25th-75th percentiles. Writes ``report.md`` and ``rows.json``.

    python -m benchmarks.representation_overhead --out results/representation
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradsurgery
import gradsurgery.solvers.closed_form as closed_form
import gradsurgery.solvers.frank_wolfe as frank_wolfe
import gradsurgery.sources.features as feature_source
from gradsurgery import GradSurgery
from gradsurgery.solvers import simplex_min_norm

try:
    from .runner import method_options
    from .speed import SIZES, TINY_SIZES, interleaved_times, quantile, write_rows_and_report
    from .speed_models import seeded_mlp
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from runner import method_options  # type: ignore[no-redef]
    from speed import (  # type: ignore[no-redef]
        SIZES,
        TINY_SIZES,
        interleaved_times,
        quantile,
        write_rows_and_report,
    )
    from speed_models import seeded_mlp  # type: ignore[no-redef]

BATCH = 128


def loss_value_weightings() -> list[str]:
    """The registered methods whose weights read the losses only (``needs_gram`` False by default)."""
    return [name for name, cls in sorted(gradsurgery.METHODS.items()) if not cls.needs_gram]


def gram_methods(num_tasks: int) -> list[str]:
    """The registered methods that read the Gram matrix and run ``num_tasks`` tasks."""
    out = []
    for name, cls in sorted(gradsurgery.METHODS.items()):
        runs = cls.min_tasks <= num_tasks and (cls.max_tasks is None or num_tasks <= cls.max_tasks)
        if runs and cls.needs_gram and name != "sum":
            out.append(name)
    return out


class Case:
    def __init__(
        self,
        dims: tuple[int, int, int],
        num_tasks: int,
        tower: int = 0,
        device: torch.device | None = None,
        batch: int = BATCH,
    ) -> None:
        device = torch.device("cpu") if device is None else device
        self.model, self.x, gen = seeded_mlp(dims, num_tasks, device, batch)
        if tower:  # towers d_z → tower → tower → 1 (ReLU) instead of linear heads
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(num_tasks + 7 * tower)
                d_z = dims[2]
                self.model.heads = nn.ModuleList(
                    nn.Sequential(
                        nn.Linear(d_z, tower),
                        nn.ReLU(),
                        nn.Linear(tower, tower),
                        nn.ReLU(),
                        nn.Linear(tower, 1),
                    )
                    for _ in range(num_tasks)
                ).to(device)
        self.y = torch.randn(batch, num_tasks, generator=gen).to(device)
        self.device = device
        self.num_tasks = num_tasks
        # A small learning rate keeps hundreds of steps on random targets far from divergence.
        self.inner = torch.optim.Adam(self.model.parameters(), lr=1e-5)

    def head_losses(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        heads = self.model.heads
        return [
            nn.functional.mse_loss(head(z).squeeze(1), self.y[:, i])
            for i, (head, z) in enumerate(zip(heads, inputs, strict=True))
        ]


def plain_step(case: Case) -> Callable[[], None]:
    def step() -> None:
        case.inner.zero_grad(set_to_none=True)
        z = case.model.trunk(case.x)
        torch.stack(case.head_losses([z] * case.num_tasks)).sum().backward()
        case.inner.step()

    return step


def _no_lap(stage: str) -> None:
    pass


def floor_step(case: Case, lap: Callable[[str], None] = _no_lap) -> Callable[[], None]:
    """The floor's step; ``lap(stage)`` is called as each of its stages ends (``representation_stages``)."""
    trunk = list(case.model.trunk.parameters())
    heads = list(case.model.heads.parameters())
    t = case.num_tasks

    def step() -> None:
        case.inner.zero_grad(set_to_none=True)
        lap("zero_grad")
        z = case.model.trunk(case.x)
        copies = [z.detach().requires_grad_() for _ in range(t)]
        losses = case.head_losses(copies)
        lap("forward")
        grads = torch.autograd.grad(torch.stack(losses).sum(), copies + heads)
        jac = torch.stack([g.reshape(-1) for g in grads[:t]])
        lap("heads pass")
        gram = (jac @ jac.T).double().cpu().numpy()
        lap("gram")
        weights = torch.from_numpy(simplex_min_norm(gram))
        lap("solve")
        fused = (weights.to(jac) @ jac).view_as(z)
        lap("fused targets")
        trunk_grads = torch.autograd.grad(z, trunk, fused)
        lap("trunk pass")
        for p, g in zip(trunk + heads, trunk_grads + grads[t:], strict=True):
            p.grad = g
        lap("write-back")
        case.inner.step()
        lap("optimizer step")

    return step


class _SolvingViews(torch.autograd.Function):
    """T views of z whose backward fuses their T gradients with MGDA's weights (the floor's algorithm)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, num_tasks: int) -> tuple[torch.Tensor, ...]:
        return tuple(z.view_as(z) for _ in range(num_tasks))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, None]:
        jac = torch.stack([g.reshape(-1) for g in grads])
        weights = torch.from_numpy(simplex_min_norm((jac @ jac.T).double().cpu().numpy()))
        return (weights.to(jac) @ jac).view_as(grads[0]), None


def floor_one_pass_step(case: Case) -> Callable[[], None]:
    params = list(case.model.trunk.parameters()) + list(case.model.heads.parameters())
    t = case.num_tasks

    def step() -> None:
        case.inner.zero_grad(set_to_none=True)
        views = _SolvingViews.apply(case.model.trunk(case.x), t)
        losses = case.head_losses(list(views))
        seeds = [torch.ones_like(loss) for loss in losses]
        for p, g in zip(params, torch.autograd.grad(losses, params, seeds), strict=True):
            p.grad = g
        case.inner.step()

    return step


def method_step(case: Case, method: str, views: bool, per_task: bool = False) -> Callable[[], None]:
    """One step of ``method`` in representation mode: over task views, or over z (with ``per_task``, as if
    the heads' graph did not split at z: one ``autograd.grad`` per task, then the heads again)."""
    t = case.num_tasks
    opt = GradSurgery(case.inner, method, num_tasks=t, **method_options(method, t, 0))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        z = case.model.trunk(case.x)
        if views:
            features = gradsurgery.task_views(z, t)
            opt.backward(case.head_losses(list(features)), features=features)
        elif per_task:
            split = feature_source.split_at_features
            feature_source.split_at_features = lambda losses, features: None
            try:
                opt.backward(case.head_losses([z] * t), features=z)
            finally:
                feature_source.split_at_features = split
        else:
            opt.backward(case.head_losses([z] * t), features=z)
        opt.step()

    return step


def loss_weighting_step(
    case: Case, method: str, features: str | None, diagnostics: bool
) -> Callable[[], None]:
    """One step of a loss weighting that reads only the losses: full mode (``features`` None), ``"z"`` or
    ``"views"``; ``diagnostics=True`` forms G_z (G in full mode)."""
    t = case.num_tasks
    opt = GradSurgery(
        case.inner, method, num_tasks=t, diagnostics=diagnostics, **method_options(method, t, 0)
    )

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        z = case.model.trunk(case.x)
        if features == "views":
            views = gradsurgery.task_views(z, t)
            opt.backward(case.head_losses(list(views)), features=views)
        else:
            opt.backward(case.head_losses([z] * t), features=z if features == "z" else None)
        opt.step()

    return step


def numpy_only_step(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with the solvers' paths in Python floats turned off (``check_gram``'s reading of small G and
    ``simplex_min_norm``'s full face): NumPy and LAPACK only."""

    def numpy_only() -> None:
        limits = closed_form.SMALL_GRAM_MAX_TASKS, frank_wolfe.FULL_FACE_MAX_TASKS
        closed_form.SMALL_GRAM_MAX_TASKS = frank_wolfe.FULL_FACE_MAX_TASKS = 0
        try:
            step()
        finally:
            closed_form.SMALL_GRAM_MAX_TASKS, frank_wolfe.FULL_FACE_MAX_TASKS = limits

    return numpy_only


def measure(
    size: str,
    num_tasks: int,
    methods: list[str],
    reps: int,
    inner_steps: int,
    tower: int = 0,
    device: torch.device | None = None,
    batch: int = BATCH,
    numpy_twins: bool = False,
    loss_weightings: bool = False,
) -> list[dict]:
    dims = {**SIZES, **TINY_SIZES}[size]
    case = Case(dims, num_tasks, tower, device, batch)
    members = {"plain": plain_step(case)}
    if loss_weightings:
        for method in methods:
            members[f"{method} full"] = loss_weighting_step(case, method, None, False)
            for features in ("z", "views"):
                members[f"{method} {features}"] = loss_weighting_step(case, method, features, False)
                members[f"{method} {features}, G_z"] = loss_weighting_step(case, method, features, True)
    else:
        members["floor"] = floor_step(case)
        members["floor one pass"] = floor_one_pass_step(case)
        for method in methods:
            members[method] = method_step(case, method, views=True)
            if numpy_twins:
                members[f"{method}, NumPy only"] = numpy_only_step(method_step(case, method, views=True))
        members["z"] = method_step(case, "mgda", views=False)
        members["z per task"] = method_step(case, "mgda", views=False, per_task=True)
    # On a GPU the clock must wait for the queued kernels of each measurement.
    around = (lambda: torch.cuda.synchronize(case.device)) if case.device.type == "cuda" else None
    times = interleaved_times(members, reps, inner_steps, warmup=5, around=around)
    rows = []
    for name, values in times.items():
        ratios = [v / p for v, p in zip(values, times["plain"], strict=True)]
        rows.append(
            {
                "size": size,
                "num_tasks": num_tasks,
                "batch": batch,
                "variant": name,
                "ms": 1e3 * statistics.median(values),
                "ratio": statistics.median(ratios),
                "ratio_p25": quantile(ratios, 0.25),
                "ratio_p75": quantile(ratios, 0.75),
            }
        )
    return rows


def report(rows: list[dict], args: argparse.Namespace) -> str:
    configs = sorted(
        {(r["size"], r["num_tasks"]) for r in rows}, key=lambda c: (args.sizes.index(c[0]), c[1])
    )
    variants = list(dict.fromkeys(r["variant"] for r in rows if r["variant"] != "plain"))
    cell = {(r["size"], r["num_tasks"], r["variant"]): r for r in rows}
    heads = f"towers d_z→{args.tower}→{args.tower}→1" if args.tower else "linear heads"
    threads = f"{args.threads} thread" + ("s" if args.threads > 1 else "")
    where = threads if args.device == "cpu" else f"{args.device} ({_device_name(args.device)}), {threads}"
    lines = [
        f"# Representation mode on small models ({where}, batch {args.batch}, {heads}, {args.reps} "
        f"repetitions × {args.inner_steps} steps, torch {torch.__version__})",
        "",
        "Step time / plain step, median (25th-75th percentile). `floor`: the task-views algorithm written "
        "directly in torch with MGDA's solver; `floor one pass`: the same in one `autograd.grad` (an "
        "autograd function of z solves inside its backward); `z`: `mgda` with `features=z` (the heads once: "
        "their graph splits at z); `z per task`: the same, one pass per task as where the graph does not "
        "split (T + 1 passes through the heads); `<method>, NumPy only` (`--numpy-twins`): that method "
        "with the solvers' NumPy paths only; every other row: that method with `features=task_views(z, T)`."
        if not args.loss_weightings_only
        else "`<m> full`: full mode (one backward of Σ w_i L_i); `<m> z`, `<m> views`: `features=z` and "
        "`features=task_views(z, T)`, which take that one backward too; `, G_z`: with `diagnostics=True` "
        "(G_z over the features).",
        "",
        "| variant | " + " | ".join(f"{s} T={t}" for s, t in configs) + " |",
        "|---|" + "---|" * len(configs),
        "| plain ms | " + " | ".join(f"{cell[(s, t, 'plain')]['ms']:.2f}" for s, t in configs) + " |",
    ]
    for variant in variants:
        cells = []
        for s, t in configs:
            r = cell.get((s, t, variant))
            cells.append(
                "—" if r is None else f"{r['ratio']:.2f} ({r['ratio_p25']:.2f}-{r['ratio_p75']:.2f})"
            )
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/representation")
    parser.add_argument(
        "--sizes", nargs="+", default=["small", "0.5M"], choices=sorted({**SIZES, **TINY_SIZES})
    )
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--methods", nargs="+", default=None, help="default: every Gram-based method")
    parser.add_argument(
        "--loss-weightings",
        nargs="*",
        default=None,
        metavar="METHOD",
        help="time the loss weightings that read only the losses instead (default with the flag: all of "
        "them), in full mode, through z and task views, each with and without G_z",
    )
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--inner-steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=BATCH, help=f"examples per step (default {BATCH})")
    parser.add_argument(
        "--tower",
        type=int,
        default=0,
        help="heads d_z → N → N → 1 (ReLU) instead of linear (default 0: linear)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the model and the batch live: cpu (default) or cuda[:N]; the solves run on the CPU",
    )
    parser.add_argument(
        "--numpy-twins",
        action="store_true",
        help="also time each method with the solvers' NumPy and LAPACK paths only (none in Python floats)",
    )
    args = parser.parse_args(argv)
    unknown = f"--device: expected cpu or cuda[:N], got {args.device!r}"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(unknown)
    if device.type not in ("cpu", "cuda"):
        parser.error(unknown)
    if args.batch < 1:
        parser.error(f"--batch: expected a positive number of examples, got {args.batch}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    args.loss_weightings_only = args.loss_weightings is not None
    if args.loss_weightings_only:
        known = loss_value_weightings()
        strangers = sorted(set(args.loss_weightings) - set(known))
        if strangers:
            parser.error(f"--loss-weightings: {strangers} are not among {known}")
        if args.methods is not None or args.numpy_twins:
            parser.error(
                "--loss-weightings replaces the Gram-based methods: not with --methods or --numpy-twins"
            )
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        for num_tasks in args.tasks:
            if args.loss_weightings_only:
                methods = args.loss_weightings or loss_value_weightings()
            else:
                methods = args.methods or gram_methods(num_tasks)
            rows += measure(
                size,
                num_tasks,
                methods,
                args.reps,
                args.inner_steps,
                args.tower,
                device,
                args.batch,
                args.numpy_twins,
                args.loss_weightings_only,
            )
            print(f"{size} T={num_tasks} done", file=sys.stderr)
    write_rows_and_report(Path(args.out), rows, report(rows, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
