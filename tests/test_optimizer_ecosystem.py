"""GradSurgery where an optimizer was: LR schedulers, parameter groups, clipping, accumulation, copies,
bad input.

References are plain PyTorch: the bare optimizer for schedulers, and the two-task MGDA closed form written in
d-space (α = clip(⟨g₂ − g₁, g₂⟩ / ‖g₁ − g₂‖², 0, 1), u = α g₁ + (1 − α) g₂) for the fused gradient.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as sched
from torch.utils.checkpoint import checkpoint

from gradsurgery import GradSurgery
from gradsurgery.gram import CHUNK

SCHEDULERS = {
    "StepLR": lambda o: sched.StepLR(o, step_size=2, gamma=0.5),
    "LambdaLR": lambda o: sched.LambdaLR(o, lambda epoch: 0.9**epoch),
    "OneCycleLR": lambda o: sched.OneCycleLR(o, max_lr=0.2, total_steps=8),
    "CosineAnnealingLR": lambda o: sched.CosineAnnealingLR(o, T_max=5),
    "ReduceLROnPlateau": lambda o: sched.ReduceLROnPlateau(o, factor=0.5, patience=0),
    "SequentialLR": lambda o: sched.SequentialLR(
        o,
        [sched.LinearLR(o, start_factor=0.1, total_iters=2), sched.ExponentialLR(o, gamma=0.9)],
        milestones=[2],
    ),
}
INNER = {
    "SGD": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "Adam": lambda params: torch.optim.Adam(params, lr=0.1),
}


def mgda_two(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    alpha = ((g2 - g1) @ g2 / (g1 - g2).pow(2).sum()).clamp(0, 1)
    return alpha * g1 + (1 - alpha) * g2


class TwoHead(nn.Module):
    """Shared linear trunk, one head per task, plus a frozen and an unreached parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(3, 4)
        self.head_a = nn.Linear(4, 1)
        self.head_b = nn.Linear(4, 1)
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        self.unused = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        h = torch.tanh(self.trunk(x)) * self.frozen.sum()
        return self.head_a(h).squeeze(1), self.head_b(h).squeeze(1)


def make_model(seed: int = 0) -> TwoHead:
    torch.manual_seed(seed)
    return TwoHead()


def batch(seed: int, n: int = 6):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen)
    y = torch.randn(n, generator=gen)
    return x, y


def two_losses(model, x, y):
    a, b = model(x)
    return [(a - y).pow(2).mean(), (b + 2 * y).pow(2).mean()]


def per_task_grads(model, losses, params):
    return [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses]


# -- LR schedulers -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("inner", sorted(INNER))
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scheduler_matches_bare_optimizer(name, inner):
    torch.manual_seed(0)
    start = torch.randn(5)
    w_bare, w_gs = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    bare = INNER[inner]([w_bare])
    wrapped = GradSurgery(INNER[inner]([w_gs]), method="sum")
    target = torch.linspace(-1, 1, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any scheduler warning (e.g. "step() before optimizer.step()") fails
        # torch 2.6's SequentialLR steps its schedulers with an epoch, which torch itself then deprecates,
        # for the bare optimizer as for the wrapper
        warnings.filterwarnings("ignore", "The epoch parameter", UserWarning, "torch.optim.lr_scheduler")
        s_bare, s_gs = SCHEDULERS[name](bare), SCHEDULERS[name](wrapped)
        lrs_bare, lrs_gs = [], []
        for _ in range(7):
            bare.zero_grad()
            loss = (w_bare - target).pow(2).sum()
            loss.backward()
            bare.step()
            wrapped.zero_grad()
            wrapped.backward([(w_gs - target).pow(2).sum()])
            wrapped.step()
            if name == "ReduceLROnPlateau":
                s_bare.step(1.0)  # a flat metric: the LR is cut every step
                s_gs.step(1.0)
            else:
                s_bare.step()
                s_gs.step()
            lrs_bare.append(bare.param_groups[0]["lr"])
            lrs_gs.append(wrapped.param_groups[0]["lr"])
    assert lrs_gs == lrs_bare
    assert len(set(lrs_bare)) > 1  # the schedule did change the rate
    assert torch.equal(w_gs, w_bare)
    assert wrapped.optimizer.param_groups[0]["lr"] == lrs_bare[-1]  # the inner optimizer saw the schedule


# -- parameter groups ----------------------------------------------------------------------------------------
def test_per_group_learning_rates_frozen_and_unreached_parameters():
    model = make_model()
    trunk = list(model.trunk.parameters())
    heads = list(model.head_a.parameters()) + list(model.head_b.parameters())
    opt = GradSurgery(
        torch.optim.SGD(
            [{"params": trunk, "lr": 0.1}, {"params": heads + [model.frozen, model.unused], "lr": 0.01}]
        ),
        method="mgda",
    )
    x, y = batch(1)
    losses = two_losses(model, x, y)
    (ga, gb) = per_task_grads(model, losses, trunk + heads)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt.zero_grad()
    opt.backward(losses)
    # Shared trunk: MGDA's fused gradient; heads: their own task's gradient.
    fused = mgda_two(torch.cat([g.reshape(-1) for g in ga[:2]]), torch.cat([g.reshape(-1) for g in gb[:2]]))
    # float32 on both sides, summed in different orders (1.7e-5 relative on some CPUs)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in trunk]), fused, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.head_a.weight.grad, ga[2])
    torch.testing.assert_close(model.head_b.weight.grad, gb[4])
    assert model.frozen.grad is None and model.unused.grad is None
    opt.step()
    for name, p in model.named_parameters():
        if name in ("frozen", "unused"):
            assert torch.equal(p, before[name])
            continue
        lr = 0.1 if name.startswith("trunk") else 0.01
        torch.testing.assert_close(p.detach(), before[name] - lr * p.grad, rtol=0, atol=1e-7)


@pytest.mark.parametrize("collection", [list, iter])
def test_add_param_group_before_scheduler(collection):
    """A group added after a step (its parameters as a list, or as ``model.parameters()`` gives them: an
    iterator, read once) takes its own learning rate, and a scheduler then steps both groups."""
    model = make_model()
    opt = GradSurgery(
        torch.optim.SGD(list(model.trunk.parameters()) + list(model.head_a.parameters()), lr=0.1), "mgda"
    )
    x, y = batch(2)
    opt.zero_grad()
    opt.backward(two_losses(model, x, y)[:1] * 1 + [model.head_a(torch.tanh(model.trunk(x))).mean()])
    opt.step()
    # A new group after a step, then a scheduler over both groups.
    opt.add_param_group({"params": collection(model.head_b.parameters()), "lr": 0.5})
    assert opt.param_groups is opt.optimizer.param_groups and len(opt.param_groups) == 2
    assert opt.param_groups[1]["params"] == list(model.head_b.parameters())
    scheduler = sched.StepLR(opt, step_size=1, gamma=0.5)
    before = [p.detach().clone() for p in model.head_b.parameters()]
    losses = two_losses(model, x, y)
    _, gb = per_task_grads(model, losses, list(model.head_b.parameters()))
    opt.zero_grad()
    opt.backward(losses)
    opt.step()
    scheduler.step()
    for p, b, g in zip(model.head_b.parameters(), before, gb, strict=True):
        torch.testing.assert_close(
            p.detach(), b - 0.5 * g
        )  # the new group's own LR, its task's plain gradient
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.25]


def test_hooks_run_as_on_a_torch_optimizer():
    """Step and state-dict hooks registered on the wrapper run as ``torch.optim.Optimizer`` runs them, with
    the wrapper as their optimizer: what a post hook returns is the state dict, what a load pre hook returns
    is loaded."""

    def hooked(opt, calls):
        opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("step_pre", o)))
        opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("step_post", o)))
        opt.register_state_dict_pre_hook(lambda o: calls.append(("sd_pre", o)))
        opt.register_state_dict_post_hook(lambda o, sd: calls.append(("sd_post", o)) or {**sd, "tag": 1})

        def load_pre(o, sd):
            calls.append(("load_pre", o))
            sd = copy.deepcopy(sd)
            sd["param_groups"][0]["lr"] = 0.25
            return sd

        opt.register_load_state_dict_pre_hook(load_pre)
        opt.register_load_state_dict_post_hook(lambda o: calls.append(("load_post", o)))

    results = []
    for wrap in (False, True):
        model = make_model()
        inner = torch.optim.SGD(model.parameters(), lr=0.1)
        opt = GradSurgery(inner, "sum") if wrap else inner
        calls: list = []
        hooked(opt, calls)
        x, y = batch(0)
        opt.zero_grad()
        if wrap:
            opt.backward(two_losses(model, x, y))
        else:
            sum(two_losses(model, x, y)).backward()
        opt.step()
        sd = opt.state_dict()
        assert sd["tag"] == 1
        opt.load_state_dict({k: v for k, v in sd.items() if k != "tag"})
        assert opt.param_groups[0]["lr"] == 0.25
        assert all(o is opt for _, o in calls)
        results.append([name for name, _ in calls])
    assert results[1] == results[0]


# -- clipping and accumulation -------------------------------------------------------------------------------
def test_gradient_clipping_between_backward_and_step():
    model = make_model()
    params = (
        list(model.trunk.parameters()) + list(model.head_a.parameters()) + list(model.head_b.parameters())
    )
    opt = GradSurgery(torch.optim.SGD(params, lr=0.3), "mgda")
    x, y = batch(3)
    losses = two_losses(model, x, y)
    ga, gb = per_task_grads(model, losses, params)
    fused_trunk = mgda_two(
        torch.cat([g.reshape(-1) for g in ga[:2]]), torch.cat([g.reshape(-1) for g in gb[:2]])
    )
    expected = torch.cat(
        [
            fused_trunk,
            torch.cat([g.reshape(-1) for g in ga[2:4]]),
            torch.cat([g.reshape(-1) for g in gb[4:6]]),
        ]
    )
    max_norm = 0.1
    assert float(expected.norm()) > max_norm
    expected = expected * (max_norm / expected.norm())
    before = torch.cat([p.detach().reshape(-1) for p in params])
    opt.zero_grad()
    opt.backward(losses)
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    assert float(total) > max_norm
    after = torch.cat([p.detach().reshape(-1) for p in params])
    torch.testing.assert_close(after, before - 0.3 * expected, rtol=1e-5, atol=1e-6)


def test_accumulation_adds_fused_gradients_per_micro_batch():
    model = make_model()
    trunk = list(model.trunk.parameters())
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "mgda")
    expected = torch.zeros(sum(p.numel() for p in trunk))
    opt.zero_grad()
    for k in range(3):
        x, y = batch(10 + k)
        losses = two_losses(model, x, y)
        ga, gb = per_task_grads(model, losses, trunk)
        expected += mgda_two(torch.cat([g.reshape(-1) for g in ga]), torch.cat([g.reshape(-1) for g in gb]))
        opt.backward(losses)
    got = torch.cat([p.grad.reshape(-1) for p in trunk])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # Not the fusion of the summed gradients: the per-micro-batch fusion differs from fusing once.
    x = torch.cat([batch(10 + k)[0] for k in range(3)])
    y = torch.cat([batch(10 + k)[1] for k in range(3)])
    ga, gb = per_task_grads(model, two_losses(model, x, y), trunk)
    once = 3 * mgda_two(torch.cat([g.reshape(-1) for g in ga]), torch.cat([g.reshape(-1) for g in gb]))
    assert float((once - got).abs().max()) > 1e-4


# -- activation checkpointing --------------------------------------------------------------------------------
class Checkpointed(TwoHead):
    """TwoHead with its trunk under ``torch.utils.checkpoint`` (``reentrant``: which implementation), or
    plain (``reentrant=None``)."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.reentrant = reentrant

    def features(self, x):
        trunk = lambda t: torch.tanh(self.trunk(t))  # noqa: E731
        if self.reentrant is None:
            return trunk(x)
        # A reentrant checkpoint records its node only when an input requires grad (as embeddings give).
        return checkpoint(trunk, x.requires_grad_(), use_reentrant=self.reentrant)

    def heads(self, h):
        h = h * self.frozen.sum()
        return self.head_a(h).squeeze(1), self.head_b(h).squeeze(1)


CHECKPOINT_CASES = {
    "jacobian": ("mgda", False, False),
    "weighted": ("sum", False, False),
    "features": ("mgda", True, False),
    "activations": ("mgda", False, True),
}


def checkpointed_step(case: str, reentrant: bool | None, seed: int = 0):
    method, features, activations = CHECKPOINT_CASES[case]
    torch.manual_seed(seed)
    model = Checkpointed(reentrant)
    source = {"model": model, "gradient_source": "activations"} if activations else {}
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method, **source)
    x, y = batch(seed)
    h = model.features(x)
    a, b = model.heads(h)
    losses = [(a - y).pow(2).mean(), (b + 2 * y).pow(2).mean()]
    return model, opt, lambda: opt.backward(losses, **({"features": h} if features else {}))


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_a_checkpointed_trunk_trains_as_the_plain_one(case):
    """``use_reentrant=False``: every source gives the gradients of the same model without checkpointing."""
    grads = []
    for reentrant in (None, False):
        model, _, backward = checkpointed_step(case, reentrant)
        backward()
        assert model.trunk.weight.grad is not None
        grads.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
    for got, want in zip(grads[1], grads[0], strict=True):
        assert (got is None and want is None) or torch.equal(got, want)


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_a_reentrant_checkpoint_is_refused_and_changes_nothing(case):
    """``use_reentrant=True`` hides the trunk's parameters from ``autograd.grad``, which then gave them no
    gradient, silently: refused, naming the fix, before anything is written."""
    model, opt, backward = checkpointed_step(case, reentrant=True)
    state = copy.deepcopy(opt.method.state_dict())
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's advice to pass use_reentrant explicitly
        with pytest.raises(
            ValueError, match=r"use_reentrant=True.*shapes \[\(3,\), \(4, 3\), \(4,\)\] got no"
        ):
            backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert repr(opt.method.state_dict()) == repr(state)


def test_a_parameter_no_loss_reaches_is_looked_into_once(monkeypatch):
    """The graph is walked for a reentrant checkpoint only when a parameter got no gradient that no earlier
    walk cleared: here ``unused`` every step, and ``head_b`` (with ``unused``) from the fourth step on, every
    other step, as the experts a router skips."""
    import gradsurgery.optimizer as engine

    calls = []
    monkeypatch.setattr(
        engine, "holds_reentrant_checkpoint", lambda losses: calls.append(1) or engine_walk(losses)
    )
    model = make_model()
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "mgda")
    walks = []
    for step in range(8):
        x, y = batch(step)
        losses = two_losses(model, x, y)
        if step >= 3 and step % 2:
            a, _ = model(x)
            losses[1] = (a + 2 * y).pow(2).mean()  # task 1 through head a: head b gets no gradient
        opt.zero_grad()
        opt.backward(losses)
        opt.step()
        walks.append(len(calls))
    assert walks == [1, 1, 1, 2, 2, 2, 2, 2]
    assert model.unused.grad is None


@pytest.mark.parametrize(
    "method,options", [("mgda", {}), ("famo", {}), ("l2", {}), ("mgda", {"l2": True, "l2_decoupled": False})]
)
def test_steps_assign_no_attribute_of_the_wrapper(method, options):
    """Lightning's optimizer proxy calls ``backward``, ``step`` and ``zero_grad`` with itself as ``self`` and
    shares the wrapper's attribute objects, not later assignments: the calls may change those objects in
    place, never rebind them."""
    model = make_model()  # its parameter ``unused`` gets no gradient
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method, **options)
    before = {name: id(value) for name, value in vars(opt).items()}
    for step in range(3):
        x, y = batch(step)
        opt.zero_grad()
        opt.backward([sum(two_losses(model, x, y))] if method == "l2" else two_losses(model, x, y))
        opt.step()
    assert {name: id(value) for name, value in vars(opt).items()} == before


def engine_walk(losses):
    from gradsurgery.sources import holds_reentrant_checkpoint

    return holds_reentrant_checkpoint(losses)


# -- the Gram matrix's precision -----------------------------------------------------------------------------
def test_gram_accumulated_in_float64_keeps_small_inner_products():
    # Three entries in three different column chunks of the Gram product: 2²⁴, 1 and −2²⁴ against ones.
    d = 2 * CHUNK + 1
    w = nn.Parameter(torch.zeros(d))
    opt = GradSurgery(torch.optim.SGD([w], lr=0.1), "sum", diagnostics=True)
    c1 = torch.zeros(d)
    c1[0], c1[CHUNK], c1[2 * CHUNK] = 2.0**24, 1.0, -(2.0**24)
    c2 = torch.zeros(d)
    c2[0] = c2[CHUNK] = c2[2 * CHUNK] = 1.0
    # Summed in float32, 2²⁴ + 1 rounds back to 2²⁴ and ⟨c1, c2⟩ comes out 0; the exact value is 1.
    assert float((c1[0] + c1[CHUNK]) + c1[2 * CHUNK]) == 0.0
    info = opt.backward([(w * c1).sum(), (w * c2).sum()])
    assert info.gram.dtype == torch.float64
    assert float(info.gram[0, 1]) == 1.0
    assert info.gram.device == w.device and info.weights.device == w.device


# -- copies --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("method", ["mgda", "pcgrad", "gradvac"])
def test_copied_wrapper_continues_identically(method, how):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = GradSurgery(torch.optim.Adam(net.parameters(), lr=0.05), method)

    def train(model, optimizer, steps, seed):
        for k in range(steps):
            x, _ = batch(seed + k)
            out = model(x)
            losses = [
                out[:, 0].pow(2).mean(),
                (out[:, 1] - 1).pow(2).mean(),
                (out[:, 2] + out[:, 0]).abs().mean(),
            ]
            optimizer.zero_grad()
            optimizer.backward(losses)
            optimizer.step()

    train(net, opt, 2, 0)
    # Model and optimizer copied together, so the copy's optimizer holds the copy's parameters.
    net2, opt2 = copy.deepcopy((net, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((net, opt)))
    assert [id(p) for g in opt2.param_groups for p in g["params"]] == [id(p) for p in net2.parameters()]
    assert opt2.param_groups is opt2.optimizer.param_groups and opt2.state is opt2.optimizer.state
    train(net, opt, 3, 100)
    train(net2, opt2, 3, 100)
    for p, q in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(p, q)


# -- bad input -----------------------------------------------------------------------------------------------
def test_wrapping_something_that_is_not_an_optimizer():
    w = nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError, match="torch.optim.Optimizer, got list"):
        GradSurgery([w])
    with pytest.raises(TypeError, match="cannot wrap another GradSurgery"):
        GradSurgery(GradSurgery(torch.optim.SGD([w], lr=0.1)))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"distributed": "yes"}, TypeError, "distributed must be None"),
        ({"dist_strategy": "ring"}, ValueError, "unknown dist_strategy 'ring'"),
        ({"model": "net"}, TypeError, "model must be a torch.nn.Module"),
        ({"process_group": 3}, TypeError, "process_group must be a torch.distributed ProcessGroup"),
    ],
)
def test_bad_distributed_arguments(kwargs, error, match):
    w = nn.Parameter(torch.zeros(2))
    with pytest.raises(error, match=match):
        GradSurgery(torch.optim.SGD([w], lr=0.1), "mgda", **kwargs)


def test_distributed_required_but_not_initialised_changes_nothing():
    model = make_model()
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "pcgrad", distributed=True, seed=3)
    gen_state = opt.method.generator.get_state()
    x, y = batch(4)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        opt.backward(two_losses(model, x, y))
    assert all(p.grad is None for p in model.parameters())
    assert opt.method.num_tasks is None and torch.equal(opt.method.generator.get_state(), gen_state)


def test_grad_scaler_of_the_wrong_type():
    model = make_model()
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "mgda")
    x, y = batch(5)
    with pytest.raises(TypeError, match="grad_scaler must be a torch.amp.GradScaler, got float"):
        opt.backward(two_losses(model, x, y), grad_scaler=2.0)
    assert all(p.grad is None for p in model.parameters()) and opt.method.num_tasks is None
