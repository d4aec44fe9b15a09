"""Tests of the benchmark data generators in ``benchmarks.problems`` (small sizes; runs in seconds)."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from benchmarks import problems
from benchmarks.problems import metrics, recsys, synthetic, toy

# problems needing scikit-learn's shipped digits get skipped where scikit-learn is not installed
needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None, reason="scikit-learn (bench extra) not installed"
)

SMALL = {
    "toy": {},
    "synthetic": {"n_train": 256, "n_test": 128, "dim": 20},
    "recsys": {"n_train": 1024, "n_test": 2048},
    "multidigit": {"n_train": 256, "n_test": 128},
    "tabular": {"n_train": 120, "n_test": 200, "noise_rate": 0.2, "clean_fraction": 0.05},
    "ranking": {"n_train": 512, "n_test": 512, "vocab_sizes": (300, 200, 10), "emb_dim": 4},
}
PROBLEM_PARAMS = [
    pytest.param(name, marks=needs_sklearn) if name in ("multidigit", "tabular") else name for name in SMALL
]


pytestmark = pytest.mark.usefixtures("one_thread")


def make(name: str, seed: int):
    return problems.make(name, seed, **SMALL[name])


def _flatten(obj) -> list[torch.Tensor]:
    if obj is None:
        return []
    if isinstance(obj, torch.Tensor):
        return [obj]
    out = []
    for o in obj:
        out += _flatten(o)
    return out


def _data_tensors(p) -> list[torch.Tensor]:
    names = ["x_train", "y_train", "x_test", "y_test", "x_clean", "y_clean"]
    return [t for n in names if hasattr(p, n) for t in _flatten(getattr(p, n))]


def _first_batch(p, seed=0, batch_size=32):
    g = torch.Generator().manual_seed(seed)
    return next(iter(p.train_batches(batch_size, g)))


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    if len(a) != len(b):
        return False
    return all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------------------------------------
# the common interface
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PROBLEM_PARAMS)
def test_same_seed_same_data_and_model(name):
    p1, p2 = make(name, 3), make(name, 3)
    assert _same(_data_tensors(p1), _data_tensors(p2))
    assert _same(_flatten(_first_batch(p1)), _flatten(_first_batch(p2)))
    m1, m2 = p1.build_model(), p2.build_model()
    assert _same(list(m1.parameters()), list(m2.parameters()))
    # model init seeded without touching the global RNG
    state = torch.random.get_rng_state()
    p1.build_model()
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize("name", [n for n in PROBLEM_PARAMS if n != "toy"])
def test_different_seed_different_data(name):
    p1, p2 = make(name, 3), make(name, 4)
    assert not _same(_data_tensors(p1), _data_tensors(p2))
    assert not _same(list(p1.build_model().parameters()), list(p2.build_model().parameters()))
    # the batch order depends on the generator, not on the problem seed
    assert not _same(_flatten(_first_batch(p1, seed=0)), _flatten(_first_batch(p1, seed=1)))


def test_toy_has_no_data_but_starts_where_asked():
    p0, p1 = toy.make(0, start=0), toy.make(0, start=1)
    assert torch.equal(p0.build_model().x.data, toy.START_POINTS[0])
    assert not torch.equal(p0.build_model().x.data, p1.build_model().x.data)
    assert torch.equal(toy.make(0, start=(1.0, -2.0)).build_model().x.data, torch.tensor([1.0, -2.0]))


@pytest.mark.parametrize("name", PROBLEM_PARAMS)
def test_shapes_losses_evaluate_and_one_adam_step(name):
    p = make(name, 0)
    assert p.num_tasks == len(p.task_names) >= 1
    assert set(p.higher_is_better) == set(p.metric_names)
    model = p.build_model()
    x, targets = _first_batch(p, batch_size=16)
    assert isinstance(targets, tuple) and len(targets) == (0 if name == "toy" else p.num_tasks)
    outputs = model(x)
    assert isinstance(outputs, tuple) and len(outputs) == p.num_tasks
    if name != "toy":
        for o, t in zip(outputs, targets, strict=True):
            assert o.shape[0] == t.shape[0] == 16
    losses = p.losses(outputs, targets)
    assert len(losses) == p.num_tasks
    for loss in losses:
        assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    before = [q.detach().clone() for q in model.parameters()]
    # the problem's own optimizer where it has one (sparse tables: SparseAdam + Adam), else Adam
    make_optimizer = getattr(p, "make_optimizer", None)
    opt = make_optimizer(model, 1e-2) if make_optimizer else torch.optim.Adam(model.parameters(), lr=1e-2)
    opt.zero_grad()
    sum(losses).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    model.train()
    metrics_ = p.evaluate(model)
    assert model.training  # restored
    assert tuple(metrics_) == p.metric_names
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics_.values())


@pytest.mark.parametrize("name", [n for n in PROBLEM_PARAMS if n != "toy"])
def test_epoch_and_step_modes(name):
    p = make(name, 0)
    n = len(_flatten(p.y_train)[0])
    batches = list(p.train_batches(50, 0))
    assert sum(len(_flatten(t)[0]) for _, t in batches) == n
    assert len(batches) == math.ceil(n / 50)
    steps = list(p.train_batches(50, 0, num_steps=2 * math.ceil(n / 50) + 1))
    assert len(steps) == 2 * math.ceil(n / 50) + 1
    assert all(len(_flatten(t)[0]) == 50 for _, t in steps)


def test_iterate_minibatches_epoch_covers_every_row_once():
    x = torch.arange(10)
    seen = torch.cat([b for b, _ in problems.iterate_minibatches(x, (x,), 10, 3, 0)])
    assert sorted(seen.tolist()) == list(range(10))
    assert len(list(problems.iterate_minibatches(x, (x,), 10, 3, 0, num_steps=7))) == 7


def test_unknown_problem_name():
    with pytest.raises(ValueError, match="unknown problem"):
        problems.make("nope")


# --------------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------------
@needs_sklearn
@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn_with_ties(seed):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    n = 500
    labels = rng.random(n) < 0.3
    scores = rng.integers(0, 8, n) + 0.7 * labels  # few distinct values: many ties, some signal
    scores = np.round(scores)
    assert len(np.unique(scores)) < 20
    ours = metrics.roc_auc(torch.from_numpy(labels.astype(np.float32)), torch.from_numpy(scores))
    assert ours == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    cont = rng.standard_normal(n)
    assert metrics.roc_auc(labels, cont) == pytest.approx(roc_auc_score(labels, cont), abs=1e-12)


def test_auc_hand_cases():
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert metrics.roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert metrics.roc_auc([0, 1, 0, 1], [1.0, 1.0, 1.0, 1.0]) == 0.5
    # one tie between a positive and a negative counts 1/2: pairs (p=.5 vs n=.5, n=.1) -> (0.5 + 1) / 2
    assert metrics.roc_auc([1, 0, 0], [0.5, 0.5, 0.1]) == 0.75
    np.testing.assert_array_equal(metrics.average_ranks([3, 1, 3, 2]), [3.5, 1, 3.5, 2])
    with pytest.raises(ValueError):
        metrics.roc_auc([1, 1], [0.1, 0.2])


def test_delta_m_hand_example():
    hib = {"acc": True, "mse": False}
    single = {"acc": 0.8, "mse": 1.6}
    # acc 0.8 -> 0.9: (-1)^1 (0.1 / 0.8) = -12.5 %; mse 1.6 -> 2.0: (+1)(0.4 / 1.6) = +25 %; mean 6.25 (worse)
    assert metrics.delta_m({"acc": 0.9, "mse": 2.0}, single, hib) == pytest.approx(6.25)
    # better on both -> negative
    assert metrics.delta_m({"acc": 0.88, "mse": 1.2}, single, hib) == pytest.approx((-10.0 - 25.0) / 2)
    assert metrics.delta_m(single, single, hib) == 0.0
    with pytest.raises(KeyError):
        metrics.delta_m({"acc": 0.9}, single, hib)


# --------------------------------------------------------------------------------------------------------
# toy
# --------------------------------------------------------------------------------------------------------
def _grads_at(x: torch.Tensor):
    x = x.detach().double().clone().requires_grad_(True)
    f1, f2 = toy.raw_objectives(x)
    g1 = torch.autograd.grad(f1.sum(), x, retain_graph=True)[0]
    g2 = torch.autograd.grad(f2.sum(), x)[0]
    return g1, g2


def test_toy_pareto_set_is_anti_parallel_and_at_distance_zero():
    P = toy.pareto_set()
    assert P.shape[0] > 500 and P.dtype == torch.float64
    interior = P[1:-1]
    g1, g2 = _grads_at(interior)
    cos = (g1 * g2).sum(1) / (g1.norm(dim=1) * g2.norm(dim=1))
    assert torch.all(cos < -1 + 1e-8)
    for p in interior[:: max(1, len(interior) // 40)]:
        assert toy.pareto_distance(p) < 1e-12
    # end points are the single-task minimisers: their own gradient vanishes
    assert _grads_at(P[:1])[0].norm() < 1e-8 and _grads_at(P[-1:])[1].norm() < 1e-8
    # a front: f1 increasing, f2 decreasing
    F = toy.pareto_front()
    assert torch.all(torch.diff(F[:, 0]) > 0) and torch.all(torch.diff(F[:, 1]) < 0)


def test_toy_pareto_distance_off_the_set():
    P = toy.pareto_set()
    mid = P[len(P) // 2]
    # the set is nearly horizontal: one unit straight up is about one unit away
    up = mid + torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert toy.pareto_distance(up) == pytest.approx(1.0, abs=0.02)
    assert toy.pareto_distance(torch.tensor([0.0, 5.0])) > 13


def test_toy_pareto_set_is_not_dominated_by_a_dense_grid():
    P = toy.pareto_set()[::10]
    with torch.no_grad():
        F = torch.stack(toy.raw_objectives(P), dim=1)
    X1, X2, G1, G2 = toy.contour_grid(301, domain=((-10.0, 10.0), (-10.0, -6.0)))
    g1, g2 = torch.from_numpy(G1.ravel()), torch.from_numpy(G2.ravel())
    dominated = (g1[None, :] < F[:, :1] - 1e-9) & (g2[None, :] < F[:, 1:] - 1e-9)
    assert not dominated.any()


@pytest.mark.parametrize("weight", [0.05, 0.3, 1.0, 3.0, 20.0])
def test_toy_weighted_sum_minimisers_lie_on_the_set(weight):
    # a minimiser of f1 + w f2 is Pareto optimal, whatever the sweep found
    x = torch.tensor([0.0, -8.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [x], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        f1, f2 = toy.raw_objectives(x)
        loss = f1 + weight * f2
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    assert toy.pareto_distance(x) < 1e-4


def test_toy_single_task_descent_ends_on_the_set_and_scales():
    # Adam on f1 alone converges to f1's minimiser, an end point of the Pareto set
    p = toy.make(0, start=1)
    model = p.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        model()[0].backward()
        opt.step()
    assert p.evaluate(model)["pareto_distance"] < 0.05
    x = torch.tensor([1.0, -3.0])
    l1, l2 = toy.losses_at(x)
    f1, f2 = toy.raw_objectives(x)
    assert l1 == pytest.approx(0.1 * f1) and l2 == pytest.approx(f2)
    X1, X2, F1, F2 = toy.contour_grid(7)
    assert X1.shape == X2.shape == F1.shape == F2.shape == (7, 7)


# --------------------------------------------------------------------------------------------------------
# synthetic, recsys
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_synthetic_weight_correlation(rho):
    p = synthetic.make(1, rho=rho, n_train=64, n_test=16, dim=30)
    w = p.params["w"]
    assert np.linalg.norm(w, axis=0) == pytest.approx([1.0, 1.0])
    assert w[:, 0] @ w[:, 1] == pytest.approx(rho, abs=1e-12)


def test_synthetic_label_correlation_grows_with_rho():
    corr = [
        synthetic.make(2, rho=r, n_train=4000, n_test=16, dim=20).label_correlation() for r in (0.0, 0.5, 0.9)
    ]
    assert abs(corr[0]) < 0.1 and corr[0] < corr[1] < corr[2]


def test_recsys_label_statistics():
    p = recsys.make(0, n_train=8192, n_test=64)
    click, conv, watch = p.y_train.T
    assert 0.17 < click.mean() < 0.23
    assert 0.02 < conv.mean() < 0.05
    assert torch.all(conv <= click)  # a conversion needs a click
    assert 100 < watch.mean() < 300 and watch.min() > 0
    # raw watch-time MSE is orders of magnitude above the BCEs of an untrained model
    model = p.build_model()
    x, t = _first_batch(p, batch_size=512)
    l_click, l_conv, l_watch = p.losses(model(x), t)
    assert l_watch > 1000 * max(l_click, l_conv)
    cat, dense = p.x_train
    assert cat.dtype == torch.long and dense.dtype == torch.float32
    assert all(int(cat[:, f].max()) < v for f, v in enumerate(p.vocab_sizes))


# --------------------------------------------------------------------------------------------------------
# multidigit, tabular
# --------------------------------------------------------------------------------------------------------
@needs_sklearn
def test_multidigit_images_and_pools():
    from benchmarks.problems import multidigit

    p = multidigit.make(0, n_train=64, n_test=32)
    assert p.x_train.shape == (64, 1, 14, 14) and p.y_train.shape == (64, 2)
    assert 0.0 <= p.x_train.min() and p.x_train.max() <= 1.0
    assert set(p.train_pool).isdisjoint(p.test_pool)
    assert len(p.train_pool) + len(p.test_pool) == 1797
    # left digit lives in the top-left corner, right digit in the bottom-right: both corners have ink
    assert p.x_train[:, 0, :2, :2].sum() > 0 and p.x_train[:, 0, -2:, -2:].sum() > 0
    assert p.x_train[:, 0, 10:, :4].sum() == 0  # bottom-left 4x4 corner is never reached
    # overlay of one known pair
    rng = np.random.default_rng(0)
    imgs = np.zeros((2, 8, 8), dtype=np.float32)
    imgs[0, 0, 0], imgs[1, 7, 7] = 1.0, 0.5
    x, yl, yr = multidigit.overlay(rng, imgs, np.array([3, 4]), 50, canvas=12, max_shift=1)
    value = {3: 1.0, 4: 0.5}  # the two single-pixel images cannot land on the same pixel
    assert x.shape == (50, 12, 12)
    np.testing.assert_allclose(x.sum(axis=(1, 2)), [value[a] + value[b] for a, b in zip(yl, yr, strict=True)])
    assert np.all(x[yl == 3][:, :2, :2].sum(axis=(1, 2)) == 1.0)  # left image's pixel in the top-left 2x2
    mt = p.higher_is_better
    dm = multidigit.delta_m({"left_acc": 0.9, "right_acc": 0.9}, {"left_acc": 0.9, "right_acc": 1.0}, mt)
    assert dm == pytest.approx(5.0)
    for trunk in ("conv", "mlp"):
        m = multidigit.make(0, n_train=8, n_test=8, trunk=trunk).build_model()
        out = m(p.x_train[:4])
        assert [o.shape for o in out] == [(4, 10), (4, 10)]


@needs_sklearn
@pytest.mark.parametrize("rate", [0.0, 0.2, 0.45, 0.8])
def test_symmetric_noise_rate_and_uniformity(rate):
    from benchmarks.problems.tabular import add_symmetric_noise

    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 10, (20000,), generator=g)
    noisy, flipped = add_symmetric_noise(labels, rate, 10, g)
    assert torch.equal(flipped, noisy != labels)  # every flip changes the label
    assert flipped.sum().item() == round(rate * 20000)
    assert torch.equal(labels[~flipped], noisy[~flipped])
    if rate > 0:
        shift = (noisy[flipped] - labels[flipped]) % 10
        counts = torch.bincount(shift, minlength=10).double()
        assert counts[0] == 0
        expected = flipped.sum() / 9
        assert torch.all((counts[1:] - expected).abs() < 5 * expected.sqrt())


@needs_sklearn
def test_clean_split_disjoint_balanced_and_problem_noise():
    from benchmarks.problems import tabular

    labels = torch.arange(400) % 10
    clean, rest = tabular.split_clean(labels, 0.05, torch.Generator().manual_seed(0))
    assert len(clean) == 20 and len(rest) == 380
    assert set(clean.tolist()).isdisjoint(rest.tolist())
    assert sorted(clean.tolist() + rest.tolist()) == list(range(400))
    assert torch.bincount(labels[clean], minlength=10).tolist() == [2] * 10

    p = tabular.make(1, n_train=300, noise_rate=0.4, clean_fraction=0.03)
    assert len(p.y_clean) == 9 and len(p.y_train) == 291
    assert p.noise_mask.sum().item() == round(0.4 * 291)
    assert torch.equal(p.noise_mask, p.y_train != p.y_train_true)
    ids = [set(t.tolist()) for t in (p.train_indices, p.clean_indices, p.test_indices)]
    assert ids[0].isdisjoint(ids[1]) and ids[0].isdisjoint(ids[2]) and ids[1].isdisjoint(ids[2])
    x, y = tabular.load_dataset()
    assert torch.equal(torch.from_numpy(y)[p.clean_indices], p.y_clean)  # clean labels are the true ones
    assert torch.equal(torch.from_numpy(x)[p.train_indices], p.x_train)
    assert len(list(p.clean_batches(4, 0))) == 3
    net = tabular.build_classifier()
    assert sum(q.numel() for q in net.parameters()) > 100 * 300 // 2  # over-parameterised for 300 samples
    assert net(p.x_test[:3]).shape == (3, 10)
    # same test set whatever the training size or noise
    q = tabular.make(1, n_train=100)
    assert torch.equal(q.test_indices, p.test_indices)
