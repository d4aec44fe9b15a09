"""Ranking models over large sparse embedding tables: shared-bottom, MMoE and PLE with click, conversion and
watch-time towers.

The recommendation models the package's users train (MMoE, Ma et al. KDD 2018; PLE, Tang et al. RecSys 2020;
the shared-bottom baseline of both) on the three tasks of ``benchmarks.problems.recsys``: a click, a
conversion that can only follow a click, and the watch time. What differs from ``recsys`` is the scale of
the inputs: several categorical fields with 10⁵-10⁶ ids each, looked up in ``nn.Embedding(...,
sparse=True)`` tables and stepped by ``SparseAdam`` while the dense part steps with ``Adam``
(``MultiOptimizer``), and the exact full mode takes its Gram matrix from the layers' activations
(``GradSurgery(..., model=model)``), which is the only exact source that can hold sparse table gradients.

Data (offline, seeded like ``recsys``: numpy streams of the seed, never the global RNGs):

* fields: ``vocab_sizes`` (default five large fields of 10⁶, 5·10⁵, 2·10⁵, 10⁵, 10⁵ ids, e.g. user, item,
  author, query, context, and three small ones of 1000, 100 and 10: category, hour, device). Ids are drawn
  from a power law, P(rank r) ∝ (r + 10)^-1.1, over a random permutation of each field's ids: a few ids are
  frequent (their embeddings can be learnt) and most of a large table is never seen, as in real traffic;
  plus ``num_dense`` Gaussian dense features;
* ground truth: per-field latent vectors E_f[id] ∈ R^k (the hidden counterpart of the model's tables),
  h = Σ_f E_f[cat_f] + P·dense, z = tanh(A·h); with std(·) standardising a score over the impressions,
  click logit = 1.2·std(a_cᵀz) + 0.8·std(⟨E_user, E_item⟩) + b_c (b_c set by ``click_rate``); conversion
  given a click: σ(1.5·std(a_vᵀz) + b_v), a_v = 0.6·a_c + 0.8·r, calibrated so that P(conversion) =
  ``conversion_rate``; conv = click · Bernoulli; watch time (minutes, ``watch_unit``) =
  s·exp(0.5·std(a_wᵀz) + 0.3·ε) + 0.67·click with mean ``watch_mean`` (2.5 min).

Unlike ``recsys`` the watch time is in minutes by default (its MSE is of the order of the BCEs, not 10⁴
times larger): the loss-scale imbalance is ``recsys``'s subject; this problem is about the models and the
tables. ``watch_unit="seconds"`` restores the imbalance.

Metrics: ``click_auc``, ``cvr_auc`` (the conversion tower over all test impressions, P(click ∧ conversion))
and ``watch_mse`` (in the chosen unit). Variants (``arch``): ``shared_bottom``, ``mmoe`` (``num_experts``
experts, one softmax gate per task), ``ple`` (``ple_levels`` extraction levels, each with
``ple_shared`` shared experts and ``ple_specific`` experts per task, gates per task and a shared gate
between levels).

Representation mode (``--mode representation``) reads ``model.forward_with_features``: the bottom's output
(shared-bottom), the stacked expert outputs (MMoE) or the last level's expert outputs (PLE); the gates read
the embeddings directly, a path that bypasses these features (see ``gradsurgery.sources.features``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from gradsurgery import MultiOptimizer

from . import numpy_rng
from .recsys import ClickConversionWatch, _calibrate_bias, _sigmoid, _standardize

__all__ = [
    "ARCHS",
    "DEFAULT_VOCAB_SIZES",
    "RankingModel",
    "RankingProblem",
    "make",
    "power_law_ids",
    "sparse_optimizer",
]

ARCHS = ("shared_bottom", "mmoe", "ple")
DEFAULT_VOCAB_SIZES = (1_000_000, 500_000, 200_000, 100_000, 100_000, 1000, 100, 10)
WATCH_UNITS = {"minutes": 1.0, "seconds": 60.0}


def power_law_ids(rng: np.random.Generator, vocab: int, n: int, alpha: float = 1.1, offset: float = 10.0):
    """``n`` ids in [0, vocab): rank r drawn with P(r) ∝ (r + offset)^-alpha, then mapped through a random
    permutation (the frequent ids are spread over the table)."""
    weights = (np.arange(vocab, dtype=np.float64) + offset) ** -alpha
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ranks = np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), vocab - 1)
    return rng.permutation(vocab)[ranks]


def _mlp(widths: Sequence[int], last_relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if last_relu or i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _SharedBottom(nn.Module):
    def __init__(self, d_in: int, num_tasks: int, bottom: Sequence[int], tower: int) -> None:
        super().__init__()
        self.bottom = _mlp([d_in, *bottom])
        self.towers = nn.ModuleList(_mlp([bottom[-1], tower, 1], last_relu=False) for _ in range(num_tasks))

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        z = self.bottom(x)
        return [z], [z] * len(self.towers)


class _MMoE(nn.Module):
    def __init__(self, d_in: int, num_tasks: int, experts: int, expert: Sequence[int], tower: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(_mlp([d_in, *expert]) for _ in range(experts))
        self.gates = nn.ModuleList(nn.Linear(d_in, experts) for _ in range(num_tasks))
        self.towers = nn.ModuleList(_mlp([expert[-1], tower, 1], last_relu=False) for _ in range(num_tasks))

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        e = torch.stack([ex(x) for ex in self.experts], dim=1)  # (B, E, d)
        mixed = []
        for gate in self.gates:
            g = torch.softmax(gate(x), dim=1).unsqueeze(-1)
            mixed.append((g * e).sum(1))
        return [e], mixed


class _PLE(nn.Module):
    """Progressive layered extraction: per level, shared and task-specific experts; task t's gate mixes its
    own and the shared experts, the shared gate (between levels) all of them."""

    def __init__(
        self,
        d_in: int,
        num_tasks: int,
        levels: int,
        shared: int,
        specific: int,
        expert: Sequence[int],
        tower: int,
    ) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.levels = nn.ModuleList()
        width = d_in
        for level in range(levels):
            last = level == levels - 1
            mod = nn.Module()
            mod.shared = nn.ModuleList(_mlp([width, *expert]) for _ in range(shared))
            mod.specific = nn.ModuleList(
                nn.ModuleList(_mlp([width, *expert]) for _ in range(specific)) for _ in range(num_tasks)
            )
            mod.task_gates = nn.ModuleList(nn.Linear(width, specific + shared) for _ in range(num_tasks))
            mod.shared_gate = None if last else nn.Linear(width, num_tasks * specific + shared)
            self.levels.append(mod)
            width = expert[-1]
        self.towers = nn.ModuleList(_mlp([width, tower, 1], last_relu=False) for _ in range(num_tasks))

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        task_in = [x] * self.num_tasks
        shared_in = x
        for mod in self.levels:
            shared_out = [ex(shared_in) for ex in mod.shared]
            specific_out = [[ex(task_in[t]) for ex in mod.specific[t]] for t in range(self.num_tasks)]
            if mod.shared_gate is None:  # the last level: its experts' outputs are the features
                feats = shared_out + [e for outs in specific_out for e in outs]
            new_task_in = []
            for t in range(self.num_tasks):
                e = torch.stack(specific_out[t] + shared_out, dim=1)
                g = torch.softmax(mod.task_gates[t](task_in[t]), dim=1).unsqueeze(-1)
                new_task_in.append((g * e).sum(1))
            if mod.shared_gate is not None:
                e = torch.stack([e for outs in specific_out for e in outs] + shared_out, dim=1)
                g = torch.softmax(mod.shared_gate(shared_in), dim=1).unsqueeze(-1)
                shared_in = (g * e).sum(1)
            task_in = new_task_in
        return feats, task_in


class RankingModel(nn.Module):
    """Sparse tables (one ``nn.Embedding(vocab, emb_dim, sparse=True)`` per field) and dense features, then
    a shared-bottom, MMoE or PLE network with one tower per task. ``model((cat, dense))`` returns the task
    outputs as a tuple of (B,) tensors; ``forward_with_features`` also returns the shared representation."""

    def __init__(
        self,
        vocab_sizes: Sequence[int],
        num_dense: int,
        *,
        num_tasks: int = 3,
        arch: str = "mmoe",
        emb_dim: int = 16,
        sparse: bool = True,
        bottom: Sequence[int] = (128, 64),
        expert: Sequence[int] = (64, 32),
        num_experts: int = 4,
        ple_levels: int = 2,
        ple_shared: int = 2,
        ple_specific: int = 1,
        tower: int = 16,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        self.arch = arch
        self.tables = nn.ModuleList(nn.Embedding(int(v), emb_dim, sparse=sparse) for v in vocab_sizes)
        for table in self.tables:
            nn.init.normal_(table.weight, std=0.05)
        d_in = emb_dim * len(vocab_sizes) + num_dense
        if arch == "shared_bottom":
            self.net = _SharedBottom(d_in, num_tasks, bottom, tower)
        elif arch == "mmoe":
            self.net = _MMoE(d_in, num_tasks, num_experts, expert, tower)
        else:
            self.net = _PLE(d_in, num_tasks, ple_levels, ple_shared, ple_specific, expert, tower)

    def embed(self, x) -> torch.Tensor:
        cat, dense = x
        return torch.cat([*(table(cat[:, f]) for f, table in enumerate(self.tables)), dense], dim=1)

    def forward_with_features(self, x) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
        feats, tower_inputs = self.net.features(self.embed(x))
        outs = tuple(tower(h)[:, 0] for tower, h in zip(self.net.towers, tower_inputs, strict=True))
        return feats, outs

    def forward(self, x) -> tuple[torch.Tensor, ...]:
        return self.forward_with_features(x)[1]


def table_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights of the sparse embedding tables, every other parameter)."""
    tables = [
        m.weight
        for m in model.modules()
        if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.sparse and m.weight.requires_grad
    ]
    ids = {id(p) for p in tables}
    return tables, [p for p in model.parameters() if id(p) not in ids and p.requires_grad]


def sparse_optimizer(model: nn.Module, lr: float, table_lr: float | None = None) -> torch.optim.Optimizer:
    """``MultiOptimizer(SparseAdam(tables), Adam(rest))``: the usual two-optimizer recipe."""
    tables, dense = table_parameters(model)
    members: list[torch.optim.Optimizer] = []
    if tables:
        members.append(torch.optim.SparseAdam(tables, lr=lr if table_lr is None else table_lr))
    if dense:
        members.append(torch.optim.Adam(dense, lr=lr))
    return MultiOptimizer(*members)


class RankingProblem(ClickConversionWatch):
    name = "ranking"
    default_batch_size = 512

    def __init__(
        self,
        seed: int,
        arch: str = "mmoe",
        n_train: int = 65536,
        n_test: int = 16384,
        vocab_sizes: Sequence[int] = DEFAULT_VOCAB_SIZES,
        num_dense: int = 8,
        click_rate: float = 0.2,
        conversion_rate: float = 0.035,
        watch_mean: float = 2.5,
        watch_unit: str = "minutes",
        latent_dim: int = 8,
        emb_dim: int = 16,
        sparse: bool = True,
        model_options: dict | None = None,
    ) -> None:
        super().__init__(seed)
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        if not 0 < conversion_rate < click_rate < 1:
            raise ValueError("need 0 < conversion_rate < click_rate < 1")
        if watch_unit not in WATCH_UNITS:
            raise ValueError(f"watch_unit must be one of {tuple(WATCH_UNITS)}, got {watch_unit!r}")
        self.vocab_sizes = tuple(int(v) for v in vocab_sizes)
        if len(self.vocab_sizes) < 2:
            raise ValueError("need at least two categorical fields (user and item)")
        self.arch = arch
        self.num_dense = int(num_dense)
        self.emb_dim = int(emb_dim)
        self.sparse = bool(sparse)
        self.model_options = dict(model_options or {})
        k = int(latent_dim)
        nf = len(self.vocab_sizes)

        # The samples' ids first (stream 2), then the ground truth of the ids that occur (stream 1): a latent
        # vector per id, drawn for every id of the table so that it does not depend on the sample size.
        n = int(n_train) + int(n_test)
        rng = numpy_rng(seed, 2)
        cat = np.stack([power_law_ids(rng, v, n) for v in self.vocab_sizes], axis=1)
        dense = rng.standard_normal((n, self.num_dense))
        noise_click, noise_conv, noise_watch = rng.random(n), rng.random(n), rng.standard_normal(n)

        truth = numpy_rng(seed, 1)
        proj = truth.standard_normal((k, self.num_dense)) / np.sqrt(self.num_dense)
        mix = truth.standard_normal((k, k)) / np.sqrt(k)
        a_click = truth.standard_normal(k)
        a_conv = 0.6 * a_click + 0.8 * truth.standard_normal(k)
        a_watch = 0.5 * a_click + 0.87 * truth.standard_normal(k)
        h = dense @ proj.T
        rows = []
        for f, v in enumerate(self.vocab_sizes):
            table = truth.standard_normal((v, k), dtype=np.float32) / np.float32(np.sqrt(nf))
            rows.append(table[cat[:, f]].astype(np.float64))
            h = h + rows[-1]
            del table
        z = np.tanh(h @ mix.T)
        inter = (rows[0] * rows[1]).sum(1) * nf  # user x item affinity
        click_logit = 1.2 * _standardize(z @ a_click) + 0.8 * _standardize(inter)
        click_logit = click_logit + _calibrate_bias(click_logit, click_rate)
        p_click = _sigmoid(click_logit)
        cvr_logit = 1.5 * _standardize(z @ a_conv)
        cvr_logit = cvr_logit + _calibrate_bias(cvr_logit, conversion_rate, weight=p_click)
        click = (noise_click < p_click).astype(np.float64)
        conv = click * (noise_conv < _sigmoid(cvr_logit))
        raw_watch = np.exp(0.5 * _standardize(z @ a_watch) + 0.3 * noise_watch)
        bonus = 0.67 * click  # clicked impressions are watched ~40 s longer
        watch = raw_watch * (watch_mean - 0.67 * click_rate) / raw_watch.mean() + bonus
        watch = watch * WATCH_UNITS[watch_unit]

        self._set_data(cat, dense, p_click, click, conv, watch, int(n_train))

    # -- what the benchmark runner asks of a problem with sparse tables ------------------------------------
    def _build_model(self) -> nn.Module:
        return RankingModel(
            self.vocab_sizes,
            self.num_dense,
            num_tasks=3,
            arch=self.arch,
            emb_dim=self.emb_dim,
            sparse=self.sparse,
            **self.model_options,
        )

    def make_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """SparseAdam for the sparse tables, Adam for the rest (``MultiOptimizer``)."""
        return sparse_optimizer(model, lr)

    def surgery_options(self, model: nn.Module) -> dict:
        """``GradSurgery(..., model=model)``: the exact full mode from the activations (sparse tables)."""
        return {"model": model}


def make(seed: int = 0, **options) -> RankingProblem:
    """Click / conversion / watch-time ranking over sparse tables (see the module docstring for options)."""
    return RankingProblem(seed, **options)
