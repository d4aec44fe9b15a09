"""A recommendation-style three-task problem: click, conversion, watch time.

Modelled on the industrial multi-task ranking setting of ESMM (Ma et al., SIGIR 2018), MMoE (Ma et al.,
KDD 2018) and PE-LTR (Lin et al., RecSys 2019): one impression, a click (≈ 20 % of impressions), a conversion
that can only follow a click (≈ 3.5 % of all impressions), and a regression target, the watch time in
seconds (values in the hundreds).  The data are synthetic, drawn from a hidden ground-truth model, so that
the three tasks share structure without being identical:

* features: ``num_fields`` categorical fields (default vocabularies 100, 50, 20, 8: user bucket, item bucket,
  category, device) and ``num_dense`` Gaussian dense features;
* hidden state: h = Σ_f E_f[cat_f] + P·dense (E_f random per-value latent vectors), z = tanh(A·h);
  below, std(·) standardises a score over the generated impressions;
* click:      P(click) = σ(1.2·std(a_cᵀz) + 0.8·std(⟨E_user, E_item⟩) + b_c), b_c set by the click rate;
* conversion: P(conv | click) = σ(1.5·std(a_vᵀz) + b_v), a_v = 0.6·a_c + 0.8·r, b_v calibrated so that
  P(conv) = conversion rate; conv = click · Bernoulli(P(conv | click));
* watch time: s · exp(0.5·std(a_wᵀz) + 0.3·ε) + 40·click seconds, a_w = 0.5·a_c + 0.87·r', with s set so
  that the mean is ``watch_mean`` (default 150 s; the standard deviation is then about 100 s).

The losses are the raw BCE, BCE and MSE (in seconds², no normalisation): the watch-time loss is 4-5 orders of
magnitude larger than the two BCEs, which is the imbalance this benchmark is about.  The conversion head is
trained on the conversion label of *every* impression (its score is P(click ∧ conversion)).

Metrics (``evaluate``): ``click_auc``, ``cvr_auc`` (the conversion head's AUC over all test impressions) and
``watch_mse`` (seconds²).  The model is a shared-bottom network: one embedding table per field, an MLP trunk
on [embeddings, dense], and one linear head per task.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import MultiHeadModel, Problem, iterate_minibatches, numpy_rng
from .metrics import mse, roc_auc

__all__ = ["RecsysProblem", "RecsysTrunk", "make"]


def _sigmoid(a: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * a))


def _calibrate_bias(logit: np.ndarray, target_mean: float, weight: np.ndarray | None = None) -> float:
    """b such that mean(weight · σ(logit + b)) = target_mean (bisection; the mean is increasing in b)."""
    w = np.ones_like(logit) if weight is None else weight
    lo, hi = -40.0, 40.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if (w * _sigmoid(logit + mid)).mean() < target_mean:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _standardize(a: np.ndarray) -> np.ndarray:
    return (a - a.mean()) / a.std()


class RecsysTrunk(nn.Module):
    """``forward((cat (B, F) int64, dense (B, D) float32)) -> (B, hidden[-1])``."""

    def __init__(self, vocab_sizes, num_dense: int, emb_dim: int = 8, hidden=(64, 32)):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(v, emb_dim) for v in vocab_sizes)
        for e in self.embeddings:
            nn.init.normal_(e.weight, std=0.1)
        layers: list[nn.Module] = []
        width = emb_dim * len(vocab_sizes) + num_dense
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.mlp = nn.Sequential(*layers)
        self.out_dim = width

    def forward(self, x):
        cat, dense = x
        embs = [emb(cat[:, f]) for f, emb in enumerate(self.embeddings)]
        return self.mlp(torch.cat([*embs, dense], dim=1))


class ClickConversionWatch(Problem):
    """The three recommendation tasks (click, conversion after a click, watch time): their batches, losses
    (two BCEs and an MSE) and metrics (two AUCs and the MSE). Subclasses hold ``x_train``/``y_train`` and
    ``x_test``/``y_test`` (targets as columns in that order) and a model returning the three outputs."""

    task_names = ("click", "conversion", "watch")
    metric_names = ("click_auc", "cvr_auc", "watch_mse")
    higher_is_better = {"click_auc": True, "cvr_auc": True, "watch_mse": False}
    default_batch_size = 256

    def train_batches(self, batch_size: int | None = None, generator=None, num_steps: int | None = None):
        """``x = (cat (B, F) int64, dense (B, D) float32)``, targets ``(click, conversion, watch)``."""
        y = self.y_train
        batch_size = self.default_batch_size if batch_size is None else batch_size
        return iterate_minibatches(
            self.x_train, (y[:, 0], y[:, 1], y[:, 2]), len(y), batch_size, generator, num_steps
        )

    def losses(self, outputs, targets) -> list[torch.Tensor]:
        click_logit, conv_logit, watch = outputs
        click, conv, watch_target = targets
        return [
            F.binary_cross_entropy_with_logits(click_logit, click),
            F.binary_cross_entropy_with_logits(conv_logit, conv),
            F.mse_loss(watch, watch_target),
        ]

    def _set_data(
        self,
        cat: np.ndarray,
        dense: np.ndarray,
        p_click: np.ndarray,
        click: np.ndarray,
        conv: np.ndarray,
        watch: np.ndarray,
        n_train: int,
    ) -> None:
        """The generated impressions as tensors: the first ``n_train`` for training, the rest for testing."""
        self.p_click = torch.from_numpy(p_click).float()
        cat_t = torch.from_numpy(cat).long()
        dense_t = torch.from_numpy(dense).float()
        y = torch.from_numpy(np.stack([click, conv, watch], axis=1)).float()
        tr, te = slice(0, n_train), slice(n_train, len(y))
        self.x_train, self.y_train = (cat_t[tr], dense_t[tr]), y[tr]
        self.x_test, self.y_test = (cat_t[te], dense_t[te]), y[te]

    def _evaluate(self, model: nn.Module) -> dict[str, float]:
        click_logit, conv_logit, watch = model(self.x_test)
        y = self.y_test
        return {
            "click_auc": roc_auc(y[:, 0], click_logit),
            "cvr_auc": roc_auc(y[:, 1], conv_logit),
            "watch_mse": mse(watch, y[:, 2]),
        }


class RecsysProblem(ClickConversionWatch):
    name = "recsys"

    def __init__(
        self,
        seed,
        n_train=8192,
        n_test=8192,
        vocab_sizes=(100, 50, 20, 8),
        num_dense=8,
        click_rate=0.2,
        conversion_rate=0.035,
        watch_mean=150.0,
        latent_dim=8,
        emb_dim=8,
        hidden=(64, 32),
    ):
        super().__init__(seed)
        if not 0 < conversion_rate < click_rate < 1:
            raise ValueError("need 0 < conversion_rate < click_rate < 1")
        self.vocab_sizes = tuple(int(v) for v in vocab_sizes)
        if len(self.vocab_sizes) < 2:
            raise ValueError("need at least two categorical fields (user and item)")
        self.num_dense = int(num_dense)
        self.emb_dim = int(emb_dim)
        self.hidden = tuple(int(h) for h in hidden)
        k = int(latent_dim)

        # hidden ground truth (stream 1), then the samples (stream 2)
        rng = numpy_rng(seed, 1)
        nf = len(self.vocab_sizes)
        tables = [rng.standard_normal((v, k)) / np.sqrt(nf) for v in self.vocab_sizes]
        proj = rng.standard_normal((k, self.num_dense)) / np.sqrt(self.num_dense)
        mix = rng.standard_normal((k, k)) / np.sqrt(k)
        a_click = rng.standard_normal(k)
        a_conv = 0.6 * a_click + 0.8 * rng.standard_normal(k)
        a_watch = 0.5 * a_click + 0.87 * rng.standard_normal(k)

        rng = numpy_rng(seed, 2)
        n = int(n_train) + int(n_test)
        cat = np.stack([rng.integers(0, v, n) for v in self.vocab_sizes], axis=1)
        dense = rng.standard_normal((n, self.num_dense))
        h = sum(t[cat[:, f]] for f, t in enumerate(tables)) + dense @ proj.T
        z = np.tanh(h @ mix.T)
        inter = (tables[0][cat[:, 0]] * tables[1][cat[:, 1]]).sum(1) * nf  # user x item affinity
        click_logit = 1.2 * _standardize(z @ a_click) + 0.8 * _standardize(inter)
        click_logit = click_logit + _calibrate_bias(click_logit, click_rate)
        p_click = _sigmoid(click_logit)
        cvr_logit = 1.5 * _standardize(z @ a_conv)
        cvr_logit = cvr_logit + _calibrate_bias(cvr_logit, conversion_rate, weight=p_click)
        click = (rng.random(n) < p_click).astype(np.float64)
        conv = click * (rng.random(n) < _sigmoid(cvr_logit))
        raw_watch = np.exp(0.5 * _standardize(z @ a_watch) + 0.3 * rng.standard_normal(n))
        watch = raw_watch * (watch_mean - 40.0 * click_rate) / raw_watch.mean() + 40.0 * click

        self._set_data(cat, dense, p_click, click, conv, watch, int(n_train))

    def _build_model(self) -> nn.Module:
        trunk = RecsysTrunk(self.vocab_sizes, self.num_dense, self.emb_dim, self.hidden)
        heads = [nn.Linear(trunk.out_dim, 1) for _ in range(3)]
        return MultiHeadModel(trunk, heads)


def make(
    seed: int = 0,
    n_train: int = 8192,
    n_test: int = 8192,
    vocab_sizes=(100, 50, 20, 8),
    num_dense: int = 8,
    click_rate: float = 0.2,
    conversion_rate: float = 0.035,
    watch_mean: float = 150.0,
    latent_dim: int = 8,
    emb_dim: int = 8,
    hidden=(64, 32),
) -> RecsysProblem:
    """Click / conversion / watch-time problem; metrics ``click_auc``, ``cvr_auc``, ``watch_mse``."""
    return RecsysProblem(
        seed,
        n_train=n_train,
        n_test=n_test,
        vocab_sizes=vocab_sizes,
        num_dense=num_dense,
        click_rate=click_rate,
        conversion_rate=conversion_rate,
        watch_mean=watch_mean,
        latent_dim=latent_dim,
        emb_dim=emb_dim,
        hidden=hidden,
    )
