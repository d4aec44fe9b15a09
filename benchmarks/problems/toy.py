"""The 2-D two-objective toy problem of CAGrad (Liu et al., NeurIPS 2021) and Nash-MTL (Navon et al., 2022).

The "model" is a single parameter x = (x1, x2) ∈ R² shared by both tasks, so every step is pure gradient
surgery: no heads, no data.  The two objectives blend two regimes with tanh gates,

    a = 0.5(−x1 − 7) − tanh(−x2),          b = 0.5(−x1 + 3) + tanh(−x2) + 2
    L1 = log(max(|a|, 5e-6)) + 6,          L2 = log(max(|b|, 5e-6)) + 6        (narrow log valleys, x2 > 0)
    Q1 = ((x1 − 7)² + 0.1(x2 + 8)²)/10 − 20,  Q2 = ((x1 + 7)² + 0.1(x2 + 8)²)/10 − 20   (bowls, x2 < 0)
    c1 = max(tanh(x2/2), 0),               c2 = max(tanh(−x2/2), 0)
    f1 = c1·L1 + c2·Q1,                    f2 = c1·L2 + c2·Q2,

and the training losses are ``scales[0]·f1`` and ``scales[1]·f2`` (default ``scales=(0.1, 1.0)``: the first
loss is 10× smaller, the magnitude imbalance under which plain gradient descent and MGDA-style methods
behave very differently; Nash-MTL's version of the figure scales one objective the same way).

Provenance, honestly stated: the formulas above were written from memory of the toy code released with
CAGrad, not copied; the constants may differ slightly from the original.  What the benchmark relies on is
checked numerically here and in the tests rather than assumed: the problem is non-convex, the gradients
conflict, and the Pareto set is a curved arc in the lower half-plane (x1 ∈ [−7, 7], x2 ≈ −8.7 … −8)
between the minimisers of f1 and f2, computed by :func:`pareto_set`.  The starting points of the papers'
figures are in :data:`START_POINTS`.

What it measures: whether an optimizer reaches the Pareto set (``pareto_distance``, in parameter space) and
where on it it lands (``f1``, ``f2``), from each starting point.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from . import Problem, as_generator

__all__ = [
    "DOMAIN",
    "START_POINTS",
    "ToyModel",
    "ToyProblem",
    "contour_grid",
    "losses_at",
    "make",
    "pareto_distance",
    "pareto_front",
    "pareto_set",
    "raw_objectives",
]

#: plotting box ((x1_min, x1_max), (x2_min, x2_max))
DOMAIN = ((-10.0, 10.0), (-10.0, 10.0))

#: starting points used in the CAGrad / Nash-MTL trajectory figures
START_POINTS = torch.tensor(
    [
        [-8.5, 7.5],
        [-8.5, -5.0],
        [9.0, 9.0],
        [-7.5, -0.5],
        [9.0, -1.0],
    ]
)

_LOWER = 5e-6


def raw_objectives(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled (f1, f2) at ``x[..., 0:2]``; any leading batch shape, differentiable."""
    x1, x2 = x[..., 0], x[..., 1]
    a = 0.5 * (-x1 - 7.0) - torch.tanh(-x2)
    b = 0.5 * (-x1 + 3.0) + torch.tanh(-x2) + 2.0
    log1 = torch.clamp(a.abs(), _LOWER).log() + 6.0
    log2 = torch.clamp(b.abs(), _LOWER).log() + 6.0
    sq1 = ((x1 - 7.0) ** 2 + 0.1 * (x2 + 8.0) ** 2) / 10.0 - 20.0
    sq2 = ((x1 + 7.0) ** 2 + 0.1 * (x2 + 8.0) ** 2) / 10.0 - 20.0
    c1 = torch.clamp(torch.tanh(0.5 * x2), min=0.0)
    c2 = torch.clamp(torch.tanh(-0.5 * x2), min=0.0)
    return log1 * c1 + sq1 * c2, log2 * c1 + sq2 * c2


def losses_at(x: torch.Tensor, scales: tuple[float, float] = (0.1, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """The two training losses (``scales[i]·f_i``) at ``x`` (shape (2,) or (..., 2))."""
    f1, f2 = raw_objectives(x)
    return scales[0] * f1, scales[1] * f2


def contour_grid(n: int = 200, domain=DOMAIN) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(X1, X2, F1, F2)``, each (n, n), of the unscaled objectives on an n×n grid (for ``plt.contour``)."""
    (a0, a1), (b0, b1) = domain
    g1 = torch.linspace(a0, a1, n, dtype=torch.float64)
    g2 = torch.linspace(b0, b1, n, dtype=torch.float64)
    X1, X2 = torch.meshgrid(g1, g2, indexing="xy")
    with torch.no_grad():
        F1, F2 = raw_objectives(torch.stack([X1, X2], dim=-1))
    return X1.numpy(), X2.numpy(), F1.numpy(), F2.numpy()


# --------------------------------------------------------------------------------------------------------
# Pareto set, computed numerically
# --------------------------------------------------------------------------------------------------------
def _nondominated(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """Indices of the points not dominated by another one (minimisation of both), ordered by f1."""
    order = torch.from_numpy(np.lexsort((f2.numpy(), f1.numpy())))  # by f1, ties by f2
    f2_sorted = f2[order]
    prev_min = torch.cummin(f2_sorted, dim=0).values
    keep = torch.ones_like(f2_sorted, dtype=torch.bool)
    keep[1:] = f2_sorted[1:] < prev_min[:-1]
    return order[keep]


def _grads(x: torch.Tensor):
    """Per-point gradients and Hessians of f1, f2 at a batch of points x (N, 2), float64."""
    x = x.detach().clone().requires_grad_(True)
    f1, f2 = raw_objectives(x)
    g1 = torch.autograd.grad(f1.sum(), x, create_graph=True)[0]
    g2 = torch.autograd.grad(f2.sum(), x, create_graph=True)[0]
    h1 = torch.stack([torch.autograd.grad(g1[:, k].sum(), x, retain_graph=True)[0] for k in range(2)], dim=1)
    h2 = torch.stack([torch.autograd.grad(g2[:, k].sum(), x, retain_graph=True)[0] for k in range(2)], dim=1)
    return f1.detach(), f2.detach(), g1.detach(), g2.detach(), h1.detach(), h2.detach()


@functools.lru_cache(maxsize=4)
def _pareto_set_cached(grid: int, newton_steps: int) -> tuple[np.ndarray, np.ndarray]:
    # tiny tensors: one thread is the fastest, and it avoids thread-pool contention on busy machines
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            return _compute_pareto_set(grid, newton_steps)
    finally:
        torch.set_num_threads(threads)


def _compute_pareto_set(grid: int, newton_steps: int) -> tuple[np.ndarray, np.ndarray]:
    # 1. non-dominated points of a dense grid over a box that contains the Pareto set with a margin
    lo, hi = -12.0, 12.0
    g = torch.linspace(lo, hi, grid, dtype=torch.float64)
    X1, X2 = torch.meshgrid(g, g, indexing="xy")
    pts = torch.stack([X1.reshape(-1), X2.reshape(-1)], dim=1)
    with torch.no_grad():
        f1, f2 = raw_objectives(pts)
    cand = pts[_nondominated(f1, f2)]
    # 2. refine each candidate p to the nearby Pareto-stationary point on its own f2 level set:
    #    solve  F(x) = [g1 × g2, f2(x) − f2(p)] = 0  by Newton's method (cross product zero <=> gradients
    #    parallel; anti-parallel checked below).
    with torch.no_grad():
        level = raw_objectives(cand)[1]
    x = cand.clone()
    for _ in range(newton_steps):
        _, f2x, g1, g2, h1, h2 = _grads(x)
        cross = g1[:, 0] * g2[:, 1] - g1[:, 1] * g2[:, 0]
        # d cross / dx = H1[:,0]·g2_1 + g1_0·H2[:,1] − H1[:,1]·g2_0 − g1_1·H2[:,0]   (H rows = d g_k / dx)
        dcross = h1[:, 0] * g2[:, 1:2] + g1[:, 0:1] * h2[:, 1] - h1[:, 1] * g2[:, 0:1] - g1[:, 1:2] * h2[:, 0]
        J = torch.stack([dcross, g2], dim=1)  # (N, 2, 2)
        F = torch.stack([cross, f2x - level], dim=1)
        det = torch.linalg.det(J)
        ok = det.abs() > 1e-300
        step = torch.zeros_like(x)
        step[ok] = torch.linalg.solve(J[ok], F[ok].unsqueeze(-1)).squeeze(-1)
        # damp steps so that a bad linearisation cannot throw a point across the plane
        norm = step.norm(dim=1, keepdim=True)
        step = step * torch.clamp(0.5 / norm.clamp_min(1e-300), max=1.0)
        x = x - step
    f1x, f2x, g1, g2, _, _ = _grads(x)
    n1, n2 = g1.norm(dim=1), g2.norm(dim=1)
    cos = (g1 * g2).sum(1) / (n1 * n2).clamp_min(1e-300)
    good = (cos < -1 + 1e-9) & (n1 > 1e-8) & (n2 > 1e-8) & (x.abs() < hi).all(dim=1)
    x, f1x, f2x = x[good], f1x[good], f2x[good]
    # 3. the two end points: the minimisers of f1 and of f2 (one gradient vanishes there), by Newton on ∇f_k
    ends = []
    for k, fk in enumerate((f1, f2)):
        e = pts[int(torch.argmin(fk))].reshape(1, 2).clone()
        for _ in range(newton_steps):
            _, _, g1e, g2e, h1e, h2e = _grads(e)
            ge, he = (g1e, h1e) if k == 0 else (g2e, h2e)
            e = e - torch.linalg.solve(he, ge.unsqueeze(-1)).squeeze(-1)
        ends.append(e)
    x = torch.cat([ends[0], x, ends[1]])
    with torch.no_grad():
        f1x, f2x = raw_objectives(x)
    keep = _nondominated(f1x, f2x)
    x, f1x, f2x = x[keep], f1x[keep], f2x[keep]
    # drop near-duplicates (several grid candidates converge to the same point)
    xs = x.numpy()
    sel = [0]
    for i in range(1, len(xs)):
        if np.linalg.norm(xs[i] - xs[sel[-1]]) > 1e-6:
            sel.append(i)
    sel = np.asarray(sel)
    return xs[sel], torch.stack([f1x, f2x], dim=1).numpy()[sel]


def pareto_set(grid: int = 401, newton_steps: int = 10) -> torch.Tensor:
    """Points (N, 2) of the Pareto set, ordered by increasing f1, in float64.

    Computed numerically: the non-dominated points of a ``grid``×``grid`` sweep of [−12, 12]² are refined by
    Newton's method to Pareto-stationary points (∇f1 and ∇f2 anti-parallel, cosine = −1 to 1e-9) on the same
    f2 level; the minimisers of f1 and of f2 (found by Newton from the grid's best points) are added as the
    two end points (there one gradient is zero, so only the interior points ``[1:-1]`` are anti-parallel);
    then everything is filtered again for non-domination.  Cached; the default takes ~0.5 s once and gives
    ~950 points, at most 0.06 apart (a finer ``grid`` changes distances by < 1e-7).
    The scales of the losses do not change the Pareto set.
    """
    return torch.from_numpy(_pareto_set_cached(int(grid), int(newton_steps))[0].copy())


def pareto_front(grid: int = 401, newton_steps: int = 10) -> torch.Tensor:
    """Unscaled objective values (N, 2) = (f1, f2) at :func:`pareto_set`'s points."""
    return torch.from_numpy(_pareto_set_cached(int(grid), int(newton_steps))[1].copy())


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-300), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[:, None] * ab), axis=-1)


def pareto_distance(x, grid: int = 401, newton_steps: int = 10) -> float:
    """Euclidean distance in parameter space from ``x`` (2,) to the Pareto set of :func:`pareto_set`.

    The set is treated as the polyline through its ordered points, except across gaps larger than 0.25
    (where the set could be disconnected) where only the points count.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().double().cpu()
    p = np.asarray(x, dtype=np.float64).reshape(2)
    pts = _pareto_set_cached(int(grid), int(newton_steps))[0]
    d = np.linalg.norm(pts - p, axis=1).min()
    if len(pts) > 1:
        a, b = pts[:-1], pts[1:]
        close = np.linalg.norm(b - a, axis=1) <= 0.25
        if close.any():
            d = min(d, _segment_distance(p, a[close], b[close]).min())
    return float(d)


# --------------------------------------------------------------------------------------------------------
# Problem interface
# --------------------------------------------------------------------------------------------------------
class ToyModel(nn.Module):
    """A single shared parameter ``x`` (2,); ``forward(_=None)`` returns the two scaled losses."""

    def __init__(self, start: torch.Tensor, scales: tuple[float, float]):
        super().__init__()
        self.x = nn.Parameter(start.detach().clone().float())
        self.scales = tuple(float(s) for s in scales)

    def forward(self, _=None) -> tuple[torch.Tensor, torch.Tensor]:
        return losses_at(self.x, self.scales)


class ToyProblem(Problem):
    """See the module docstring.  ``start`` picks the starting point (an index into :data:`START_POINTS` or
    a pair); ``build_model()`` always starts there (the seed does not move it)."""

    name = "toy"
    task_names = ("f1", "f2")
    metric_names = ("f1", "f2", "pareto_distance")
    higher_is_better = {"f1": False, "f2": False, "pareto_distance": False}

    def __init__(self, seed: int, start=0, scales=(0.1, 1.0)):
        super().__init__(seed)
        if isinstance(start, int):
            start = START_POINTS[start]
        self.start = torch.as_tensor(start, dtype=torch.float32).reshape(2)
        self.scales = (float(scales[0]), float(scales[1]))
        if min(self.scales) <= 0:
            raise ValueError("scales must be positive")

    def _build_model(self) -> nn.Module:
        return ToyModel(self.start, self.scales)

    def train_batches(self, batch_size: int = 1, generator=None, num_steps: int | None = None):
        """No data: yields ``(None, ())`` once (one "epoch") or ``num_steps`` times."""
        as_generator(generator)
        for _ in range(1 if num_steps is None else int(num_steps)):
            yield None, ()

    def losses(self, outputs, targets=()) -> list[torch.Tensor]:
        return list(outputs)

    def _evaluate(self, model: nn.Module) -> dict[str, float]:
        x = model.x.detach().double()
        f1, f2 = raw_objectives(x)
        return {"f1": float(f1), "f2": float(f2), "pareto_distance": pareto_distance(x)}


def make(seed: int = 0, start=0, scales=(0.1, 1.0)) -> ToyProblem:
    """The toy problem from starting point ``start`` (index into ``START_POINTS`` or an (x1, x2) pair).

    ``evaluate`` reports the *unscaled* objectives ``f1``, ``f2`` and ``pareto_distance``.
    """
    return ToyProblem(seed, start=start, scales=scales)
