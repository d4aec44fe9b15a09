"""Closed forms for two gradients, and the input checks every solver shares.

All solvers see only the T×T Gram matrix G = J Jᵀ (G_ij = ⟨g_i, g_j⟩) as a float64 numpy array.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .._validation import check_task_index as _check_task_index
from ..errors import SolverError

EPS = float(np.finfo(np.float64).eps)
TINY = float(np.finfo(np.float64).tiny)
# A Gram matrix formed in float32 (J @ J.T on an accelerator) can be asymmetric by a few float32 ulps of
# its largest entry; anything beyond this is a caller bug, not round-off.
SYMMETRY_RTOL = 1e-5
# Σc may exceed 1 by this much (bounds that were themselves computed in floating point).
SUM_SLACK = 1e-12


#: The largest T whose Gram matrix ``check_gram`` reads in Python floats (``symmetric_rows``).
SMALL_GRAM_MAX_TASKS = 8


def check_gram(gram: ArrayLike, name: str = "G") -> np.ndarray:
    """A validated, symmetrised float64 copy of a Gram matrix: square, non-empty, finite, symmetric
    within ``SYMMETRY_RTOL`` of its largest entry, non-negative diagonal. Raises ValueError otherwise."""
    rows = symmetric_rows(gram) if isinstance(gram, np.ndarray) else None
    if rows is not None:
        return np.array(rows)
    try:
        g = np.array(gram, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a T×T array of real numbers, got {gram!r}") from exc
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square T×T matrix, got shape {g.shape}")
    finite = np.isfinite(g)
    if not finite.all():
        i, j = np.argwhere(~finite)[0]
        raise ValueError(f"{name} has a non-finite entry {g[i, j]!r} at ({i}, {j})")
    _check_symmetric(g, name)
    g = 0.5 * (g + g.T)
    limit = -SYMMETRY_RTOL * float(np.abs(g).max())
    neg = (g.diagonal() < limit).nonzero()[0]
    if neg.size:
        i = neg[0]
        raise ValueError(f"{name}[{i}, {i}] = {g[i, i]!r} is negative; a Gram matrix has ‖g_i‖² ≥ 0 there")
    return g


def symmetric_rows(gram: np.ndarray) -> list[list[float]] | None:
    """The rows of what ``check_gram`` returns, ½(G + Gᵀ), as Python floats (equal bit for bit: the same
    float64 operations) when ``gram`` is a real T×T array with 1 ≤ T ≤ ``SMALL_GRAM_MAX_TASKS`` that passes
    its tests; None otherwise, and ``check_gram``'s NumPy path decides (and names what is wrong).

    The tests in Python floats take two NumPy calls instead of about ten, which within a training step (whose
    kernels evict NumPy's code and data from the caches) costs more than their arithmetic: ``mgda`` at T = 2
    (its closed form) took 0.02-0.04× of a plain step less in representation mode on the speed suite's
    ``small`` (``benchmarks/representation_overhead.py --numpy-twins``, two runs)."""
    t = gram.shape[0] if gram.ndim == 2 else 0
    if not 1 <= t <= SMALL_GRAM_MAX_TASKS or gram.shape[1] != t or gram.dtype.kind != "f":
        return None
    rows: list[list[float]] = gram.tolist()
    largest = 0.0
    for row in rows:
        for value in row:
            if not math.isfinite(value):
                return None
            largest = max(largest, abs(value))
    if any(abs(rows[i][j] - rows[j][i]) > SYMMETRY_RTOL * largest for i in range(t) for j in range(i)):
        return None
    sym = [[0.5 * (rows[i][j] + rows[j][i]) for j in range(t)] for i in range(t)]
    limit = -SYMMETRY_RTOL * max(abs(value) for row in sym for value in row)
    if any(sym[i][i] < limit for i in range(t)):
        return None
    return sym


def _check_symmetric(g: np.ndarray, name: str) -> None:
    asym = np.abs(g - g.T)
    limit = SYMMETRY_RTOL * float(np.abs(g).max())
    if asym.max() > limit:
        i, j = np.unravel_index(int(np.argmax(asym)), asym.shape)
        raise ValueError(
            f"{name} is not symmetric: {name}[{i}, {j}] = {g[i, j]!r} but {name}[{j}, {i}] = {g[j, i]!r} "
            f"(tolerance {limit:.3g})"
        )


def psd_projection(gram: np.ndarray) -> np.ndarray:
    """G with its negative curvature removed, clipped in correlation space.

    A Gram matrix accumulated in float32 is indefinite at the ~1e-7 level whenever gradients are (nearly)
    linearly dependent. With auxiliary tasks the feasible set is unbounded, so even that much negative
    curvature makes min wᵀGw unbounded below; every solver therefore works on this projection.

    The clipping is done on C = D G D, D = diag(1/√G_ii), then undone: the perturbation of G_ij is then
    relative to ‖g_i‖‖g_j‖, so a task 1e-8 times smaller than the others keeps its own digits (clipping G
    itself would spread eps·max G_ii of noise into its row). Rows with G_ii ≤ 0 are zero gradients (up to
    round-off) and become exactly zero.
    """
    on = np.diag(gram) > 0.0
    if not on.any():
        return np.zeros_like(gram)
    inv = 1.0 / np.sqrt(np.diag(gram)[on])
    corr = gram[np.ix_(on, on)] * np.outer(inv, inv)
    e, v = np.linalg.eigh(corr)
    if e[0] >= 0.0 and on.all():
        return gram
    if e[0] < 0.0:
        corr = (v * np.maximum(e, 0.0)) @ v.T
        corr = 0.5 * (corr + corr.T)
    out = np.zeros_like(gram)
    out[np.ix_(on, on)] = corr / np.outer(inv, inv)
    return out


def gram_factor(gram: np.ndarray) -> np.ndarray:
    """A square F = diag(√e) Vᵀ from G = V diag(e) Vᵀ (symmetrised first), negative round-off eigenvalues
    clipped to 0: FᵀF = G for a PSD G."""
    e, v = np.linalg.eigh((gram + gram.T) / 2)
    factor: np.ndarray = np.sqrt(np.maximum(e, 0.0))[:, None] * v.T
    return factor


def check_task_index(value: Any, num_tasks: int, what: str = "main") -> int:
    """A task index in [0, T): TypeError for a non-integer, ValueError out of range."""
    return _check_task_index(value, num_tasks, what)


def check_main_indices(main: Sequence[int], num_tasks: int) -> np.ndarray:
    """The main-task indices of the mixed problem: at least one, each in range, no duplicates."""
    if isinstance(main, numbers.Integral | str | bytes) or not isinstance(main, Sequence | np.ndarray):
        raise TypeError(f"main must be a sequence of task indices, got {main!r}")
    idx = [check_task_index(m, num_tasks, "main index") for m in main]
    if not idx:
        raise ValueError(f"main must name at least one main task, got {main!r}")
    seen: set[int] = set()
    for m in idx:
        if m in seen:
            raise ValueError(f"main index {m} appears more than once in main={list(main)!r}")
        seen.add(m)
    return np.asarray(idx, dtype=np.intp)


def check_min_weights(min_weights: ArrayLike, num_tasks: int) -> np.ndarray:
    """PE-LTR lower bounds c: T finite entries, each ≥ 0, Σc ≤ 1 (+``SUM_SLACK``)."""
    try:
        c = np.array(min_weights, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        msg = f"min_weights must be a sequence of {num_tasks} numbers, got {min_weights!r}"
        raise ValueError(msg) from exc
    if c.ndim != 1 or c.shape[0] != num_tasks:
        raise ValueError(f"min_weights must have length {num_tasks} (one per task), got {min_weights!r}")
    bad = np.flatnonzero(~np.isfinite(c) | (c < 0))
    if bad.size:  # the first offending entry, as an entry-by-entry check would name it
        i = int(bad[0])
        if not np.isfinite(c[i]):
            raise ValueError(f"min_weights[{i}] = {c[i]!r} is not finite")
        raise ValueError(f"min_weights[{i}] = {c[i]!r} is negative; lower bounds must be ≥ 0")
    total = float(c.sum())
    if total > 1.0 + SUM_SLACK:
        raise ValueError(f"min_weights sum to {total!r} > 1, so no weights on the simplex satisfy them")
    return c


def _finite_scalars(**values: float) -> list[float]:
    out = []
    for key, val in values.items():
        x = float(val)
        if not np.isfinite(x):
            raise ValueError(f"{key} = {val!r} is not finite")
        out.append(x)
    return out


def min_norm_two(g11: float, g12: float, g22: float) -> float:
    """Weight α ∈ [0, 1] on g_1 minimising ‖α g_1 + (1 − α) g_2‖² (MGDA for two tasks, Sener & Koltun 2018):

        α = clip((g22 − g12) / (g11 − 2 g12 + g22), 0, 1),    g_ij = ⟨g_i, g_j⟩.

    When g_1 = g_2 (the denominator ‖g_1 − g_2‖² is zero up to round-off) every α is optimal: 0.5.
    """
    g11, g12, g22 = _finite_scalars(g11=g11, g12=g12, g22=g22)
    denom = g11 - 2.0 * g12 + g22
    # Below this, denom is the cancellation error of two nearly equal vectors, not their distance.
    if denom <= max(TINY, 4.0 * EPS * (abs(g11) + abs(g22))):
        return 0.5
    return float(min(max((g22 - g12) / denom, 0.0), 1.0))


def main_aux_one(g00: float, g01: float, g11: float) -> float:
    """Coefficient λ ≥ 0 of one auxiliary g_1 minimising ‖g_0 + λ g_1‖² (main/auxiliary, ``docs/maths.md``):

        λ = max(0, −g01) / g11,

    i.e. add just enough of g_1 to make ⟨u, g_1⟩ ≥ 0; 0 when g_1 = 0 (g11 ≤ tiny).
    """
    g00, g01, g11 = _finite_scalars(g00=g00, g01=g01, g11=g11)
    if g11 <= TINY or g01 >= 0.0:
        return 0.0
    lam = -g01 / g11
    if not np.isfinite(lam):
        raise SolverError(f"main_aux closed form: λ = {-g01!r}/{g11!r} overflows")
    return float(lam)


def min_norm_two_weights(gram: ArrayLike) -> np.ndarray:
    """MGDA weights (α, 1 − α) for T = 2 from the 2×2 Gram matrix; see ``min_norm_two``."""
    g = check_gram(gram)
    if g.shape != (2, 2):
        raise ValueError(f"min_norm_two_weights needs a 2×2 Gram matrix, got shape {g.shape}")
    a = min_norm_two(g[0, 0], g[0, 1], g[1, 1])
    return np.array([a, 1.0 - a])


def main_aux_one_weights(gram: ArrayLike, main: int) -> np.ndarray:
    """Main/auxiliary weights for T = 2: weights[main] = 1, the other λ from ``main_aux_one``."""
    g = check_gram(gram)
    if g.shape != (2, 2):
        raise ValueError(f"main_aux_one_weights needs a 2×2 Gram matrix, got shape {g.shape}")
    m = check_task_index(main, 2)
    a = 1 - m
    w = np.zeros(2)
    w[m] = 1.0
    w[a] = main_aux_one(g[m, m], g[m, a], g[a, a])
    return w
