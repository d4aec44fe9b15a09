"""The ranking problem of the benchmarks: sparse tables, shared-bottom / MMoE / PLE, SparseAdam + Adam.

Tiny tables (tens to hundreds of rows); the Gram matrix and the fused gradients are checked against dense
per-task gradients taken with plain autograd, independently of gradsurgery's sources.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks import quality, runner
from benchmarks.problems import ranking
from gradsurgery import GradSurgery, MultiOptimizer

SMALL = {"n_train": 1024, "n_test": 1024, "vocab_sizes": (400, 300, 50, 7), "emb_dim": 4}
TINY_NET = {"bottom": (16, 8), "expert": (8,), "tower": 4, "num_experts": 3}


pytestmark = pytest.mark.usefixtures("one_thread")


def make(arch="mmoe", seed=0, **extra):
    return ranking.make(seed, arch=arch, model_options=TINY_NET, **{**SMALL, **extra})


def test_labels_ids_and_power_law():
    p = ranking.make(0, n_train=20000, n_test=64, vocab_sizes=(5000, 1000, 10))
    click, conv, watch = p.y_train.T
    assert 0.17 < click.mean() < 0.23
    assert 0.02 < conv.mean() < 0.05
    assert torch.all(conv <= click)  # a conversion needs a click
    assert 2.0 < watch.mean() < 3.0 and watch.min() > 0  # minutes
    cat, dense = p.x_train
    assert cat.dtype == torch.long and dense.dtype == torch.float32
    assert all(0 <= int(cat[:, f].min()) and int(cat[:, f].max()) < v for f, v in enumerate(p.vocab_sizes))
    # a power law: the 1 % most frequent ids of the large field carry a large share of the traffic, and
    # most of the table is never seen
    counts = np.sort(np.bincount(cat[:, 0].numpy(), minlength=5000))[::-1]
    assert counts[:50].sum() > 0.25 * counts.sum()
    assert (counts == 0).sum() > 0.3 * 5000
    seconds = ranking.make(0, n_train=20000, n_test=64, vocab_sizes=(5000, 1000, 10), watch_unit="seconds")
    assert torch.allclose(seconds.y_train[:, 2], 60 * watch)


def test_power_law_ids_follow_the_stated_distribution():
    rng = np.random.default_rng(0)
    ids = ranking.power_law_ids(rng, 50, 200_000, alpha=1.1, offset=10.0)
    counts = np.sort(np.bincount(ids, minlength=50))[::-1] / ids.size
    expected = (np.arange(50) + 10.0) ** -1.1
    expected /= expected.sum()
    assert np.abs(counts - expected).max() < 0.005


@pytest.mark.parametrize("arch", ranking.ARCHS)
def test_models_have_sparse_tables_and_consistent_outputs(arch):
    p = make(arch)
    model = p.build_model()
    tables, dense = ranking.table_parameters(model)
    assert len(tables) == len(SMALL["vocab_sizes"]) and all(t.shape[1] == 4 for t in tables)
    assert all(m.sparse for m in model.tables)
    x, _ = next(iter(p.train_batches(32, 0)))
    feats, outs = model.forward_with_features(x)
    assert all(f.requires_grad for f in feats)
    again = model(x)
    assert len(outs) == 3 and all(o.shape == (32,) for o in outs)
    assert all(torch.equal(a, b) for a, b in zip(outs, again, strict=True))
    opt = p.make_optimizer(model, 1e-2)
    assert isinstance(opt, MultiOptimizer)
    assert [type(o).__name__ for o in opt.optimizers] == ["SparseAdam", "Adam"]


def _dense(g: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor:
    if g is None:
        return torch.zeros_like(p)
    return g.to_dense() if g.is_sparse else g


@pytest.mark.parametrize("arch", ranking.ARCHS)
def test_exact_full_mode_matches_dense_autograd(arch):
    """G, the fused shared gradients (sparse for the tables) and the task-specific gradients against dense
    per-task gradients from plain autograd."""
    p = make(arch)
    model = p.build_model()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = GradSurgery(p.make_optimizer(model, 1e-2), "mgda", model=model)  # before the forward it records
    x, targets = next(iter(p.train_batches(64, 0)))
    losses = p.losses(model(x), targets)
    grads = [
        [
            _dense(g, q)
            for g, q in zip(
                torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), params, strict=True
            )
        ]
        for loss in losses
    ]
    reached = [
        [
            bool(torch.autograd.grad(loss, q, retain_graph=True, allow_unused=True)[0] is not None)
            for q in params
        ]
        for loss in losses
    ]
    shared = [k for k in range(len(params)) if sum(r[k] for r in reached) >= 2]
    jac = torch.stack([torch.cat([grads[i][k].reshape(-1) for k in shared]).double() for i in range(3)])
    gram = jac @ jac.T

    opt.zero_grad()
    info = opt.backward(losses)
    assert info.source == "activations"
    scale = gram.diagonal().max()
    assert torch.allclose(info.gram, gram, rtol=0, atol=1e-5 * scale)
    w = info.weights.double()
    table_ids = {id(t) for t in ranking.table_parameters(model)[0]}
    for k, q in enumerate(params):
        if k in shared:
            want = sum(w[i] * grads[i][k].double() for i in range(3))
        else:
            owners = [i for i in range(3) if reached[i][k]]
            want = (
                sum(grads[i][k].double() for i in owners)
                if owners
                else torch.zeros_like(q, dtype=torch.float64)
            )
        if id(q) in table_ids:
            assert q.grad.is_sparse  # SparseAdam steps on it
        got = _dense(q.grad, q).double()
        # float32 gradients summed in another order: errors relative to the largest term, not to the sum
        terms = max(float((w[i] * grads[i][k]).abs().max()) for i in range(3)) + 1e-30
        assert (got - want).abs().max() <= 1e-5 * terms, (k, float((got - want).abs().max()), terms)
    opt.step()


@pytest.mark.parametrize("arch", ranking.ARCHS)
def test_every_arch_trains_in_both_modes(arch):
    p = make(arch)
    for mode in ("full", "representation"):
        r = runner.train(p, "mgda", 0, steps=3, batch_size=64, lr=1e-2, mode=mode, raise_errors=True)
        assert r.status == "ok" and all(math.isfinite(v) for v in r.metrics.values())
    single = runner.train_single_task(p, 2, 0, steps=3, batch_size=64, lr=1e-2, raise_errors=True)
    assert single.status == "ok"


def test_training_lifts_the_aucs_above_chance():
    p = ranking.make(1, arch="mmoe", n_train=8192, n_test=4096, vocab_sizes=(2000, 1000, 50, 7))
    r = runner.train(p, "mgda", 0, steps=120, batch_size=256, lr=1e-2, raise_errors=True)
    assert r.metrics["click_auc"] > 0.62 and r.metrics["cvr_auc"] > 0.62, r.metrics


def test_the_suites_hold_the_ranking_problem():
    for suite in ("quick", "full", "tiny"):
        cfg = quality.suite_configs(suite)["ranking"]
        assert cfg.module == "benchmarks.problems.ranking"
    full = quality.suite_configs("full")["ranking"]
    assert [v["arch"] for _, v in full.variants] == list(ranking.ARCHS)
    assert max(ranking.DEFAULT_VOCAB_SIZES) == 1_000_000 and "vocab_sizes" not in full.size
