"""The activation source through ``GradSurgery``: the same weights and ``.grad`` as the Jacobian source for
every method, sparse tables with ``MultiOptimizer``, checkpoints, and the errors a user can run into."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from method_checks import registered
from state_checks import same_state, snapshot
from torch import nn

from gradsurgery import GradSurgery, MultiOptimizer
from gradsurgery.optimizer import activations_pay_off


class Ranker(nn.Module):
    """Two embedding tables (one sparse), a shared bottom with a LayerNorm, one tower per task."""

    def __init__(self, num_tasks: int = 3, sparse: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.user = nn.Embedding(50, 6, sparse=sparse)
        self.item = nn.EmbeddingBag(40, 6, mode="mean")
        self.bottom = nn.Sequential(
            nn.Linear(12, 16), nn.LayerNorm(16), nn.ReLU(inplace=True), nn.Linear(16, 8)
        )
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 1)) for _ in range(num_tasks)
        )

    def forward(self, users, items):
        h = torch.relu(self.bottom(torch.cat([self.user(users), self.item(items)], dim=1)))
        return [tower(h).squeeze(-1) for tower in self.towers]


def batch(step: int, n: int = 16):
    gen = torch.Generator().manual_seed(step)
    users = torch.randint(0, 50, (n,), generator=gen)
    items = torch.randint(0, 40, (n, 3), generator=gen)
    targets = torch.randn(3, n, generator=gen)
    return users, items, targets


def task_losses(model, step, num_tasks=3, n=16):
    users, items, targets = batch(step, n)
    out = model(users, items)
    losses = [(o - targets[i]).pow(2).mean() + 0.1 for i, o in enumerate(out)]
    losses[1] = (out[1] + out[0] - targets[1]).pow(2).mean() + 0.1  # conflicts with task 0
    return losses[:num_tasks]


def train(source: str, method: str, options: dict, steps: int = 3, **extra):
    model = Ranker().double()
    opt = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.05),
        method,
        model=model,
        gradient_source=source,
        **options,
        **extra,
    )
    infos, grads = [], []
    for step in range(steps):
        opt.zero_grad()
        infos.append(opt.backward(task_losses(model, step)))
        grads.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
        opt.step()
    return infos, grads, model


@pytest.mark.parametrize("method,options", registered(3), ids=[m for m, _ in registered(3)])
def test_every_method_gets_what_the_jacobian_source_gives(method, options):
    infos_a, grads_a, _ = train("activations", method, options)
    infos_j, grads_j, _ = train("jacobian", method, options)
    for a, j, ga, gj in zip(infos_a, infos_j, grads_a, grads_j, strict=True):
        if a.gram is not None:
            assert a.source == "activations" and j.source == "jacobian"
            torch.testing.assert_close(a.gram, j.gram, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(a.weights, j.weights, rtol=1e-7, atol=1e-10)
        for x, y in zip(ga, gj, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-11)


def test_the_loss_scale_is_undone_exactly():
    """A GradScaler (here on float64, so no overflow): G, weights and .grad/s as without it."""
    plain, grads_plain, _ = train("activations", "mgda", {}, steps=1)
    model = Ranker().double()
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.05), "mgda", model=model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    info = opt.backward(task_losses(model, 0), grad_scaler=scaler)
    torch.testing.assert_close(info.gram, plain[0].gram, rtol=1e-12, atol=0)
    for p, g in zip(model.parameters(), grads_plain[0], strict=True):
        torch.testing.assert_close(p.grad / 2.0**10, g, rtol=1e-12, atol=0)


def sparse_setup(seed=0):
    model = Ranker(sparse=True, seed=seed)
    tables = [model.user.weight]
    dense = [p for p in model.parameters() if p is not model.user.weight]
    inner = MultiOptimizer(torch.optim.SparseAdam(tables, lr=0.01), torch.optim.Adam(dense, lr=0.01))
    return model, GradSurgery(inner, "nash_mtl", model=model)


def test_sparse_tables_train_with_multi_optimizer_and_resume_bit_identically():
    model, opt = sparse_setup()
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for step in range(3):
        opt.zero_grad()
        info = opt.backward(task_losses(model, step))
        assert model.user.weight.grad.is_sparse and info.source == "activations"
        opt.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    for step in range(3, 6):
        opt.zero_grad()
        opt.backward(task_losses(model, step))
        opt.step()
    resumed, resumed_opt = sparse_setup(seed=1)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    assert resumed_opt.param_groups[0]["lr"] == pytest.approx(0.005)  # the scheduler's decay came along
    for step in range(3, 6):
        resumed_opt.zero_grad()
        resumed_opt.backward(task_losses(resumed, step))
        resumed_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters(), strict=True))


def test_a_sparse_table_with_an_optimizer_that_refuses_sparse_gradients_is_refused():
    model = Ranker(sparse=True)
    with pytest.raises(ValueError, match=r"module 'user' has sparse=True.*\(Adam\)"):
        GradSurgery(torch.optim.Adam(model.parameters()), "mgda", model=model)


def test_activations_need_the_model():
    model = Ranker()
    with pytest.raises(ValueError, match="needs the model"):
        GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", gradient_source="activations")
    with pytest.raises(ValueError, match="unknown gradient_source 'tape'"):
        GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", model=model, gradient_source="tape")


def test_a_forward_before_the_optimizer_existed_is_refused_and_changes_nothing():
    model = Ranker()
    losses = task_losses(model, 0)  # no hooks yet: these calls were not recorded
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "pcgrad", model=model, seed=0)
    before = snapshot(opt.state_dict())
    with pytest.raises(ValueError, match="did not record"):
        opt.backward(losses)
    assert all(p.grad is None for p in model.parameters())
    assert same_state(opt.state_dict(), before) and opt.method.num_tasks is None


def test_a_dropped_optimizer_leaves_no_hook_on_the_model():
    model = Ranker()
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", model=model)
    assert model.bottom[0]._forward_hooks
    twin = copy.deepcopy(opt)  # a copy shares the recorder and the model
    assert twin.source is opt.source
    del opt, twin
    import gc

    gc.collect()
    assert not any(m._forward_hooks for m in model.modules())


def test_auto_takes_the_activations_where_they_pay_off():
    assert activations_pay_off(Ranker())
    assert activations_pay_off(Ranker(sparse=True))
    assert not activations_pay_off(nn.Sequential(nn.Conv2d(3, 32, 3), nn.Conv2d(32, 32, 3), nn.Linear(4, 2)))
    model = Ranker()
    info = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", model=model).backward(
        task_losses(model, 0)
    )
    assert info.source == "activations"
    assert (
        GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "mgda")
        .backward(task_losses(model, 0))
        .source
        == "jacobian"
    )


def test_auto_takes_the_jacobian_for_a_step_whose_activations_outnumber_the_parameters():
    # Batch 16: the layer outputs G needs hold 16 × 52 = 832 numbers per task, the shared parameters 916;
    # batch 200: 10400 against 916, so the Jacobian is the smaller (and here the faster) exact source.
    model, reference = Ranker().double(), Ranker().double()
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", model=model)
    ref = GradSurgery(torch.optim.SGD(reference.parameters(), lr=0.1), "mgda", gradient_source="jacobian")
    forced = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.1), "mgda", model=model, gradient_source="activations"
    )
    for step, n, source in [(0, 16, "activations"), (1, 200, "jacobian"), (2, 16, "activations")]:
        opt.zero_grad()
        ref.zero_grad()
        info = opt.backward(task_losses(model, step, n=n))
        assert info.source == source
        ref_info = ref.backward(task_losses(reference, step, n=n))
        torch.testing.assert_close(info.weights, ref_info.weights, rtol=1e-9, atol=1e-12)
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
        opt.step()
        ref.step()
    assert forced.backward(task_losses(model, 3, n=200)).source == "activations"
    sparse = Ranker(sparse=True)
    tables = [sparse.user.weight]
    dense = [p for p in sparse.parameters() if p is not sparse.user.weight]
    on_tables = GradSurgery(
        MultiOptimizer(torch.optim.SparseAdam(tables), torch.optim.SGD(dense, lr=0.1)), "mgda", model=sparse
    )
    assert on_tables.backward(task_losses(sparse, 0, n=200)).source == "activations"


@pytest.mark.parametrize("sparse", [False, True], ids=["dense tables", "a sparse table"])
@pytest.mark.parametrize(
    "budget", [1, 3000, 10**9], ids=["a record per chunk", "a few per chunk", "one chunk"]
)
def test_a_memory_budget_gives_the_jacobian_answer(budget, sparse):
    # Against the Jacobian source (an independent path): G, the weights and every .grad, over three steps;
    # budget 1 takes each layer's δ_i in passes of their own.
    model, reference = Ranker(sparse=sparse).double(), Ranker(sparse=sparse).double()

    def optimizer(net, **extra):
        tables = [net.user.weight]
        dense = [p for p in net.parameters() if p is not net.user.weight]
        inner = MultiOptimizer(torch.optim.SGD(tables, lr=0.1), torch.optim.SGD(dense, lr=0.1, momentum=0.9))
        return GradSurgery(inner, "upgrad", **extra)

    opt = optimizer(model, model=model, gradient_source="activations", activation_memory=budget)
    if (
        sparse
    ):  # the Jacobian cannot hold a sparse table's gradient: the budget-free activations are the reference
        ref = optimizer(reference, model=reference, gradient_source="activations")
    else:
        ref = optimizer(reference, gradient_source="jacobian")
    for step in range(3):
        opt.zero_grad()
        ref.zero_grad()
        info = opt.backward(task_losses(model, step, n=40))
        ref_info = ref.backward(task_losses(reference, step, n=40))
        assert info.source == "activations"
        torch.testing.assert_close(info.gram, ref_info.gram, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(info.weights, ref_info.weights, rtol=1e-9, atol=1e-12)
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(dense_grad(p), dense_grad(q), rtol=1e-9, atol=1e-12)
        opt.step()
        ref.step()


def dense_grad(p):
    return p.grad.to_dense() if p.grad.is_sparse else p.grad


def test_a_memory_budget_takes_more_shorter_passes():
    from gradsurgery.sources.activation import ActivationSource

    model = Ranker().double()
    counts = {}
    for budget in (None, 1):
        source = ActivationSource(model, memory=budget)
        calls = []
        original = source._task_passes
        source._task_passes = lambda *args, calls=calls, original=original: (
            calls.append(len(args[2])) or original(*args)
        )
        params = list(model.parameters())
        result = source.prepare(
            task_losses(model, 0, n=40), params, shared_ids=None, retain_graph=False, gram_dtype=torch.float64
        )
        result.reduce()
        counts[budget] = calls
        source.remove()
    # Without a budget one call takes every used record's δ_i: the two tables, the bottom's Linear, LayerNorm
    # and Linear, and tower 0's two Linear layers (task 1 reads tower 0 too, so they are shared).
    assert counts[None] == [7]
    assert counts[1] == [0] + [1] * 7  # the direct parameters only, then one record per call


def test_complex_parameters_take_the_jacobian_source():
    """The activation source's contractions are those of real layers: with complex parameters "auto" takes
    the Jacobian (which reads them as real pairs), "activations" and a memory budget are refused, and so is
    a complex group added to an optimizer that records activations."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6, dtype=torch.complex128), nn.Linear(6, 2, dtype=torch.complex128))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    assert activations_pay_off(model)  # a real model of this shape would take the activations
    with pytest.raises(
        ValueError, match=r"takes real layers; the optimizer holds complex parameters \(shapes \[\(6, 4\)"
    ):
        GradSurgery(sgd, "mgda", model=model, gradient_source="activations")
    with pytest.raises(ValueError, match="complex parameters, which the Jacobian source takes"):
        GradSurgery(sgd, "mgda", model=model, activation_memory=10**6)
    out = model(torch.randn(3, 4, dtype=torch.complex128))
    info = GradSurgery(sgd, "mgda", model=model).backward([out[:, 0].abs().sum(), out[:, 1].abs().sum()])
    assert info.source == "jacobian"
    real = Ranker()
    opt = GradSurgery(torch.optim.SGD(real.parameters(), lr=0.1), "mgda", model=real)
    extra = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="takes real layers"):
        opt.add_param_group({"params": [extra]})
    assert len(opt.param_groups) == 1


def test_a_memory_budget_is_checked():
    model = Ranker()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="activation_memory must be an int"):
        GradSurgery(sgd, "mgda", model=model, activation_memory=1.5)
    with pytest.raises(ValueError, match="activation_memory must be >= 1"):
        GradSurgery(sgd, "mgda", model=model, activation_memory=0)
    with pytest.raises(ValueError, match="gradient_source='jacobian'"):
        GradSurgery(sgd, "mgda", model=model, gradient_source="jacobian", activation_memory=10**6)
    with pytest.raises(ValueError, match="no model was given"):
        GradSurgery(sgd, "mgda", activation_memory=10**6)
    from gradsurgery.sources.activation import ActivationSource

    with pytest.raises(ValueError, match="fused='activations'"):
        ActivationSource(model, fused="activations", memory=10**6)
    assert not any(m._forward_hooks for m in model.modules())


def test_the_sharded_strategy_is_for_the_jacobian():
    model = Ranker()
    with pytest.raises(ValueError, match="shards the Jacobian"):
        GradSurgery(
            torch.optim.SGD(model.parameters(), lr=0.1),
            "mgda",
            model=model,
            gradient_source="activations",
            dist_strategy="sharded",
        )
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("method", ["famo", "rlw", "sum"])
def test_one_backward_methods_step_sparse_tables(method):
    """The loss weightings' single backward writes the sparse table gradient as it is."""
    model = Ranker(sparse=True)
    tables = [model.user.weight]
    dense = [p for p in model.parameters() if p is not model.user.weight]
    opt = GradSurgery(
        MultiOptimizer(torch.optim.SparseAdam(tables), torch.optim.Adam(dense)), method, model=model
    )
    info = opt.backward(task_losses(model, 0))
    assert info.source == "weighted" and model.user.weight.grad.is_sparse
    reference = Ranker(sparse=True)
    (info.weights.float() * torch.stack(task_losses(reference, 0))).sum().backward()
    torch.testing.assert_close(model.user.weight.grad.to_dense(), reference.user.weight.grad.to_dense())
    opt.step()


def test_a_shared_sparse_table_without_the_model_names_the_fix():
    model = Ranker(sparse=True)
    tables = [model.user.weight]
    dense = [p for p in model.parameters() if p is not model.user.weight]
    opt = GradSurgery(MultiOptimizer(torch.optim.SparseAdam(tables), torch.optim.Adam(dense)), "mgda")
    with pytest.raises(ValueError, match=r"sparse gradient .* model=model"):
        opt.backward(task_losses(model, 0))
    assert all(p.grad is None for p in model.parameters())
    assert opt.method.num_tasks is None
