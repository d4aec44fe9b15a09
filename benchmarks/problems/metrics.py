"""Metrics shared by the benchmark problems: ROC AUC, accuracy, MSE and Maninis et al.'s Δm%."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

__all__ = ["accuracy", "average_ranks", "delta_m", "mse", "roc_auc"]


def _to_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().double().numpy().ravel()
    return np.asarray(a, dtype=np.float64).ravel()


def average_ranks(values) -> np.ndarray:
    """1-based ranks of ``values`` (ascending), tied values sharing the mean of their ranks."""
    v = _to_numpy(values)
    n = v.size
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    # start of every run of equal values in the sorted array
    new_run = np.empty(n, dtype=bool)
    if n:
        new_run[0] = True
        new_run[1:] = sorted_v[1:] != sorted_v[:-1]
    starts = np.flatnonzero(new_run)
    ends = np.append(starts[1:], n)  # exclusive
    # ranks start..end-1 (0-based) -> mean 1-based rank (start + end + 1) / 2
    run_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve, by the rank-sum (Mann-Whitney U) formula with tied scores averaged.

    AUC = (Σ_{positives} rank − P(P+1)/2) / (P·N); a tie between a positive and a negative counts 1/2.
    ``labels`` are 0/1 (anything > 0.5 is a positive).  Raises ``ValueError`` when one class is absent.
    """
    y = _to_numpy(labels) > 0.5
    s = _to_numpy(scores)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in size: {y.shape} vs {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative labels")
    ranks = average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max logit equals the label."""
    return float((logits.argmax(dim=-1) == labels).double().mean())


def mse(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared error, accumulated in float64."""
    return float(((pred.double() - target.double()) ** 2).mean())


def delta_m(
    metrics: Mapping[str, float],
    single_task_metrics: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
) -> float:
    """Δm% of Maninis et al. (CVPR 2019, "Attentive single-tasking of multiple tasks"), as in CAGrad etc.

    Δm = (1/T) Σ_i (−1)^{l_i} (M_m,i − M_b,i) / M_b,i × 100, l_i = 1 if higher is better for metric i, else 0,

    where M_m are the multi-task model's metrics and M_b the single-task baselines'.  It is the average
    relative *drop* in performance: **negative Δm = better than the single-task baselines**, positive = worse.
    The T metrics are the keys of ``higher_is_better``; each must be in both dicts.

    Example: accuracy 0.9 vs baseline 0.8 (higher better) and MSE 2.0 vs 1.6 (lower better):
    Δm = (−12.5 + 25) / 2 = 6.25 (worse on average).
    """
    if not higher_is_better:
        raise ValueError("higher_is_better must name at least one metric")
    total = 0.0
    for key, hib in higher_is_better.items():
        if key not in metrics or key not in single_task_metrics:
            raise KeyError(f"metric {key!r} missing from metrics or single_task_metrics")
        base = float(single_task_metrics[key])
        if base == 0.0:
            raise ValueError(f"single-task metric {key!r} is 0: relative change undefined")
        sign = -1.0 if hib else 1.0
        total += sign * (float(metrics[key]) - base) / base
    return 100.0 * total / len(higher_is_better)
