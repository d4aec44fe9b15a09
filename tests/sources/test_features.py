import contextlib
import copy

import numpy as np
import pytest
import torch
from method_checks import registered
from state_checks import same_state
from torch.utils._python_dispatch import TorchDispatchMode
from weighting_helpers import CountBackward, TwoHeads, make_data

import gradsurgery
import gradsurgery.sources.features as features_module
from gradsurgery import GradSurgery


class IdentityTrunk(torch.nn.Module):
    """The trunk is the identity: the representation z the heads read is the shared matrix W itself."""

    def __init__(self, num_tasks=3, d_in=4, k=5, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(d_in, k, generator=gen))
        self.heads = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(k, generator=gen)) for _ in range(num_tasks)
        )

    def losses(self, x, ys, z):
        hidden = torch.tanh(x @ z)
        return [(hidden @ h - ys[i]).pow(2).mean() for i, h in enumerate(self.heads)]


# The loss weightings that read only the losses take one backward of Σ w_i L_i in representation mode too
# (no G_z); with diagnostics=True they form G_z as the other methods do, a path these variants keep covering.
METHODS = registered(3)
METHODS += [
    (m, {**o, "diagnostics": True})
    for m, o in METHODS
    if "diagnostics" in gradsurgery.METHODS[m].option_names()
]
IDS = [m + (" diagnostics" if o.get("diagnostics") else "") for m, o in METHODS]


def grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("leaf", [True, False], ids=["z=W", "z=W.clone()"])
@pytest.mark.parametrize("method,options", METHODS, ids=IDS)
def test_identity_trunk_representation_mode_equals_full_mode(method, options, leaf):
    xs, ys = make_data(3, 3)
    full_model = IdentityTrunk()
    rep_model = copy.deepcopy(full_model)
    full = GradSurgery(torch.optim.SGD(full_model.parameters(), lr=0.1), method=method, **options)
    rep = GradSurgery(torch.optim.SGD(rep_model.parameters(), lr=0.1), method=method, **options)
    for t in range(3):
        full.zero_grad()
        rep.zero_grad()
        info_full = full.backward(full_model.losses(xs[t], ys[t], full_model.W))
        z = rep_model.W if leaf else rep_model.W.clone()
        info_rep = rep.backward(rep_model.losses(xs[t], ys[t], z), features=z)
        assert info_full.mode == "full" and info_rep.mode == "representation"
        assert info_rep.source == ("features" if rep.method.needs_gram else "weighted")
        if info_full.gram is not None:  # methods that need no Gram take one backward in both modes
            torch.testing.assert_close(info_rep.gram, info_full.gram, rtol=1e-12, atol=1e-15)
        else:
            assert info_rep.gram is None
        torch.testing.assert_close(info_rep.weights, info_full.weights, rtol=1e-9, atol=1e-12)
        g_full, g_rep = grads(full_model), grads(rep_model)
        if info_full.gram is not None:  # the shared matrix gets Jᵀw in both modes, from the same rows
            assert torch.equal(g_full[0], g_rep[0]), (t, g_full[0], g_rep[0])
        else:  # one backward of Σ w_i L_i in full mode: the same sum in another order
            torch.testing.assert_close(g_rep[0], g_full[0], rtol=1e-6, atol=1e-7)
        for a, b in zip(g_full[1:], g_rep[1:], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        full.step()
        rep.step()
        # Heads scaled by w_i may differ in the last bit (the seed is scaled, not the result): restart each
        # step from the same parameters so that only one step's equality is tested, with the method state
        # carried along in both.
        with torch.no_grad():
            for pf, pr in zip(full_model.parameters(), rep_model.parameters(), strict=True):
                pr.copy_(pf)


def test_one_backward_pass_through_the_trunk():
    xs, ys = make_data(3, 1)
    model = TwoHeads(3)
    model.counted = True
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="mgda")
    CountBackward.calls = 0
    opt.backward(model.losses(xs[0], ys[0]))
    assert CountBackward.calls == 3  # full mode: one backward through the trunk per task
    CountBackward.calls = 0
    z = model.features(xs[0])
    info = opt.backward(model.losses(xs[0], ys[0], z), features=z)
    assert CountBackward.calls == 1
    info.as_dict()  # the diagnostics come from the Gram matrix: no further pass
    assert CountBackward.calls == 1


def reference(model, x, ys, weights_of):
    """The representation-mode gradients written out with plain autograd."""
    z = model.features(x)
    losses = model.losses(x, ys, z)
    gz = [torch.autograd.grad(loss, z, retain_graph=True)[0] for loss in losses]
    w = weights_of([g.reshape(-1).double() for g in gz], [loss.item() for loss in losses])
    u = sum(float(w[i]) * gz[i] for i in range(len(gz)))
    trunk = torch.autograd.grad(z, list(model.trunk.parameters()), grad_outputs=u, retain_graph=True)
    heads = [
        torch.autograd.grad(loss, list(model.heads[i].parameters()), retain_graph=True)
        for i, loss in enumerate(losses)
    ]
    return w, trunk, heads


def mgda_two(gs, _losses):
    g1, g2 = gs
    a = float(torch.clamp((g2 - g1) @ g2 / (g1 - g2).pow(2).sum(), 0, 1))
    return [a, 1 - a]


def test_real_trunk_mgda_matches_the_written_out_algorithm():
    xs, ys = make_data(2, 1)
    model = TwoHeads(2)
    w, trunk, heads = reference(model, xs[0], ys[0], mgda_two)
    assert 0.05 < w[0] < 0.95  # an interior solution: both tasks matter
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="mgda")
    z = model.features(xs[0])
    info = opt.backward(model.losses(xs[0], ys[0], z), features=z)
    torch.testing.assert_close(info.weights, torch.tensor(w, dtype=torch.float64), rtol=1e-6, atol=1e-9)
    for p, g in zip(model.trunk.parameters(), trunk, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    for head, hg in zip(model.heads, heads, strict=True):  # heads keep their own, unweighted gradient
        for p, g in zip(head.parameters(), hg, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("diagnostics", [False, True], ids=["weighted loss", "G_z"])
def test_real_trunk_loss_weighting_scales_the_heads(diagnostics):
    xs, ys = make_data(2, 1)
    model = TwoHeads(2)
    import math

    w = [math.exp(-0.3), math.exp(0.4)]
    _, trunk, heads = reference(model, xs[0], ys[0], lambda gs, losses: w)
    opt = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.1),
        method="uncertainty",
        init_log_var=[0.3, -0.4],
        diagnostics=diagnostics,
    )
    z = model.features(xs[0])
    opt.backward(model.losses(xs[0], ys[0], z), features=z)
    for p, g in zip(model.trunk.parameters(), trunk, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    for i, (head, hg) in enumerate(zip(model.heads, heads, strict=True)):
        for p, g in zip(head.parameters(), hg, strict=True):
            torch.testing.assert_close(p.grad, w[i] * g, rtol=1e-6, atol=1e-7)


def test_features_split_in_pieces_equal_the_whole():
    xs, ys = make_data(2, 1)
    a, b = TwoHeads(2), TwoHeads(2)
    opt_a = GradSurgery(torch.optim.SGD(a.parameters(), lr=0.1), method="mgda")
    opt_b = GradSurgery(torch.optim.SGD(b.parameters(), lr=0.1), method="mgda")
    z = a.features(xs[0])
    info_a = opt_a.backward(a.losses(xs[0], ys[0], z), features=z)
    z = b.features(xs[0])
    z1, z2 = z[:, :2], z[:, 2:]
    info_b = opt_b.backward(b.losses(xs[0], ys[0], torch.cat([z1, z2], dim=1)), features=[z1, z2])
    torch.testing.assert_close(info_b.gram, info_a.gram, rtol=1e-6, atol=1e-9)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-6, atol=1e-8)


def test_gradients_are_added_to_existing_grad():
    xs, ys = make_data(2, 1)
    a, b = TwoHeads(2), TwoHeads(2)
    opt_a = GradSurgery(torch.optim.SGD(a.parameters(), lr=0.1), method="mgda")
    opt_b = GradSurgery(torch.optim.SGD(b.parameters(), lr=0.1), method="mgda")
    for p in b.parameters():
        p.grad = torch.full_like(p, 0.5)
    for model, opt in ((a, opt_a), (b, opt_b)):
        z = model.features(xs[0])
        opt.backward(model.losses(xs[0], ys[0], z), features=z)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad + 0.5)


def test_retain_graph_is_honoured():
    xs, ys = make_data(2, 1)
    model = TwoHeads(2)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="sum")
    z = model.features(xs[0])
    losses = model.losses(xs[0], ys[0], z)
    opt.backward(losses, features=z, retain_graph=True)
    opt.backward(losses, features=z)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        opt.backward(losses, features=z)


def step_in_lockstep(opts, model, reference):
    """Step and clear both optimizers, then restart ``model`` from ``reference``'s parameters, so that each
    step compares one step's gradients (a loss weighting's heads may differ in the last bit between paths)."""
    for opt in opts:
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            p.copy_(q)


def assert_untouched(model, opt, calls=0):
    assert all(p.grad is None for p in model.parameters())
    assert opt.method.calls == calls


def test_features_that_do_not_require_grad_are_rejected():
    xs, ys = make_data(2, 1)
    model = TwoHeads(2)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="dwa")
    z = model.features(xs[0])
    with pytest.raises(ValueError, match=r"features\[0\].*does not require grad"):
        opt.backward(model.losses(xs[0], ys[0], z), features=z.detach())
    with torch.no_grad():
        z0 = model.features(xs[0])
    with pytest.raises(ValueError, match="does not require grad"):
        opt.backward(model.losses(xs[0], ys[0], z), features=[z, z0])
    assert_untouched(model, opt)


@pytest.mark.parametrize(
    "method,options", [("mgda", {}), ("dwa", {"diagnostics": True})], ids=["mgda", "dwa"]
)
def test_a_loss_off_the_features_path_is_rejected(method, options):
    xs, ys = make_data(2, 1)
    model = TwoHeads(2)
    extra = torch.nn.Linear(4, 1)
    params = [*model.parameters(), *extra.parameters()]
    opt = GradSurgery(torch.optim.SGD(params, lr=0.1), method=method, **options)
    state = copy.deepcopy(opt.method.state_dict())
    z = model.features(xs[0])
    losses = model.losses(xs[0], ys[0], z) + [extra(xs[0]).pow(2).mean()]  # reads x, not z
    with pytest.raises(ValueError, match=r"loss\(es\) \[2\] do not depend on the features"):
        opt.backward(losses, features=z)
    assert all(p.grad is None for p in params)
    assert same_state(opt.method.state_dict(), state)


@pytest.mark.parametrize(
    "method,options", [("mgda", {}), ("dwa", {"diagnostics": True})], ids=["mgda", "dwa"]
)
def test_a_feature_no_loss_reads_is_rejected(method, options):
    xs, ys = make_data(2, 1)
    model = TwoHeads(2)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method=method, **options)
    state = copy.deepcopy(opt.method.state_dict())
    z = model.features(xs[0])
    stray = model.features(xs[0] + 1)
    with pytest.raises(ValueError, match=r"features \[1\] are on the path of no loss"):
        opt.backward(model.losses(xs[0], ys[0], z), features=[z, stray])
    assert all(p.grad is None for p in model.parameters())
    assert same_state(opt.method.state_dict(), state)


def test_a_loss_weighting_without_g_z_takes_the_gradient_of_the_weighted_loss_whatever_the_features():
    """Its weights read the losses only, and Σ_i w_i ∇_θ L_i is exact however the losses reach z: a loss
    off the features' path and a feature no loss reads change nothing (they would leave a zero row or
    column in G_z, which it does not form)."""
    xs, ys = make_data(2, 1)
    model = TwoHeads(2)
    extra = torch.nn.Linear(4, 1)
    params = [*model.parameters(), *extra.parameters()]
    opt = GradSurgery(torch.optim.SGD(params, lr=0.1), method="uncertainty", init_log_var=[0.3, -0.4, 0.2])
    z = model.features(xs[0])
    stray = model.features(xs[0] + 1)
    losses = model.losses(xs[0], ys[0], z) + [extra(xs[0]).pow(2).mean()]
    info = opt.backward(losses, features=[z, stray], retain_graph=True)
    assert info.gram is None and (info.mode, info.source) == ("representation", "weighted")
    w = torch.exp(-torch.tensor([0.3, -0.4, 0.2]))
    torch.testing.assert_close(info.weights, w.double())
    expected = torch.autograd.grad(sum(wi * loss for wi, loss in zip(w, losses, strict=True)), params)
    for p, g in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-8)


def test_malformed_features_are_rejected():
    xs, ys = make_data(2, 1)
    model = TwoHeads(2)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="dwa")
    z = model.features(xs[0])
    losses = model.losses(xs[0], ys[0], z)
    with pytest.raises(TypeError, match="features must be a tensor"):
        opt.backward(losses, features=3.0)
    with pytest.raises(TypeError, match=r"features\[1\] is a list"):
        opt.backward(losses, features=[z, [1.0]])
    with pytest.raises(ValueError, match="empty"):
        opt.backward(losses, features=[])
    with pytest.raises(ValueError, match=r"features\[1\] is the same tensor as features\[0\]"):
        opt.backward(losses, features=[z, z])
    with pytest.raises(TypeError, match="dtype"):
        opt.backward(losses, features=torch.ones(3, dtype=torch.long))
    assert_untouched(model, opt)


def test_non_finite_loss_writes_nothing():
    xs, ys = make_data(2, 1)
    model = TwoHeads(2)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="dwa")
    z = model.features(xs[0])
    losses = model.losses(xs[0], ys[0], z)
    with pytest.raises(ValueError, match="non-finite"):
        opt.backward([losses[0], losses[1] * float("inf")], features=z)
    assert_untouched(model, opt)


class NonFiniteBackward(torch.autograd.Function):
    """Zero forward, ``value`` everywhere in the backward: a finite step whose gradient is not."""

    @staticmethod
    def forward(x, value):
        return torch.zeros((), dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, ctx.value), None

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.shape, ctx.value = inputs[0].shape, inputs[1]


@pytest.mark.parametrize("path", ["views", "split", "per task"])
@pytest.mark.parametrize("where", ["head", "trunk"])
@pytest.mark.parametrize("method", ["mgda", "uncertainty", "uncertainty diagnostics"])
def test_a_non_finite_parameter_gradient_beside_finite_feature_gradients_writes_nothing(path, where, method):
    """G_z and the losses are finite; a head parameter's gradient (NaN, from the loss directly) or a trunk
    parameter's (inf, from a finite u_z) is not. The step must refuse, as full mode does, and leave the
    parameters, ``.grad`` and the method state as they were. (A loss weighting without G_z takes the
    gradient of Σ w_i L_i, where the same check names that gradient.)"""
    xs, ys = make_data(3, 3)
    model = CountedHeads()
    name, options = uncertainty_variant(method)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method=name, **options)
    what = "a parameter" if opt.method.needs_gram else "the weighted loss"

    def step(t, bad):
        z = model.trunk(xs[t])
        if bad and where == "trunk":
            z = z + NonFiniteBackward.apply(model.trunk[0].bias, float("inf"))
        features = gradsurgery.task_views(z, 3) if path == "views" else z
        losses = model.losses(xs[t], ys[t], list(features) if path == "views" else [z] * 3)
        if bad and where == "head":
            losses[1] = losses[1] + NonFiniteBackward.apply(model.heads[1][2].weight, float("nan"))
        with one_pass_per_task() if path == "per task" else contextlib.nullcontext():
            return opt.backward(losses, features=features)

    step(0, bad=False)
    opt.step()
    step(1, bad=False)  # .grad holds a step's gradients, the method state two steps
    params = [p.detach().clone() for p in model.parameters()]
    grads_before = grads(model)
    state = copy.deepcopy(opt.method.state_dict())
    with pytest.raises(ValueError, match=rf"non-finite \(NaN/inf\) gradient of {what}"):
        step(2, bad=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(grads(model), grads_before, strict=True))
    assert same_state(opt.method.state_dict(), state)


# -- task views: one pass through the heads -----------------------------------------------------------------


class CountedHeads(torch.nn.Module):
    """A tanh trunk and T two-layer heads whose backward passes are counted."""

    def __init__(self, num_tasks=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh())
        self.heads = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
            for _ in range(num_tasks)
        )

    def losses(self, x, ys, views):
        return [
            (head(CountBackward.apply(v)).squeeze(-1) - ys[i]).pow(2).mean()
            for i, (head, v) in enumerate(zip(self.heads, views, strict=True))
        ]


@pytest.mark.parametrize("method,options", METHODS, ids=IDS)
def test_task_views_give_what_representation_mode_gives(method, options):
    xs, ys = make_data(3, 3)
    with_views, plain = CountedHeads(), CountedHeads()
    opt_v = GradSurgery(torch.optim.SGD(with_views.parameters(), lr=0.1), method=method, **options)
    opt_p = GradSurgery(torch.optim.SGD(plain.parameters(), lr=0.1), method=method, **options)
    for t in range(3):
        z = with_views.trunk(xs[t])
        views = gradsurgery.task_views(z, 3)
        CountBackward.calls = 0
        info_v = opt_v.backward(with_views.losses(xs[t], ys[t], views), features=views)
        head_passes = CountBackward.calls
        z_plain = plain.trunk(xs[t])
        info_p = opt_p.backward(plain.losses(xs[t], ys[t], [z_plain] * 3), features=z_plain)
        # One gradient reaches each view: one pass through each head for G (without views, T + 1). (A loss
        # weighting goes through its heads once more for their w_i-seeded gradients, not to the views.)
        assert head_passes == 3
        assert (info_v.gram is None) == (info_p.gram is None) == (not opt_v.method.needs_gram)
        if info_v.gram is not None:
            torch.testing.assert_close(info_v.gram, info_p.gram, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(info_v.weights, info_p.weights, rtol=1e-9, atol=1e-12)
        # A loss weighting's heads get w_i·g_i here and the w_i-seeded backward there: equal up to float32
        # rounding, which cancellation in the batch sums lifts to ~4e-7 of the tensor's largest entry.
        for a, b in zip(grads(with_views), grads(plain), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))
        step_in_lockstep((opt_v, opt_p), with_views, plain)


class SharedGainHeads(CountedHeads):
    """CountedHeads whose head outputs are counted, optionally all multiplied by one shared gain (a parameter
    that every task reaches through its head, outside the features)."""

    def __init__(self, shared_gain: bool) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(1.3)) if shared_gain else None

    def losses(self, x, ys, views):
        outs = [CountBackward.apply(head(v).squeeze(-1)) for head, v in zip(self.heads, views, strict=True)]
        if self.gain is not None:
            outs = [o * self.gain for o in outs]
        return [(o - ys[i]).pow(2).mean() for i, o in enumerate(outs)]


# The loss weightings that form G_z (gradnorm always, the others with diagnostics=True) and scale their heads.
LOSS_WEIGHTINGS = [
    (m, o) for m, o in METHODS if m == "gradnorm" or (m in ("uncertainty", "dwa") and o.get("diagnostics"))
]


@pytest.mark.parametrize("shared_gain", [False, True], ids=["own heads", "a gain shared by the heads"])
@pytest.mark.parametrize("method,options", LOSS_WEIGHTINGS, ids=[m for m, _ in LOSS_WEIGHTINGS])
def test_loss_weightings_take_one_pass_through_heads_they_own(method, options, shared_gain):
    # The heads' gradients are w_i g_i: with one task per head parameter the first pass's g_i scaled by w_i
    # (the heads once); a parameter several tasks reach there needs w_i-seeded gradients (a second pass).
    # Either way the gradients are those of representation mode through z (T + 1 passes).
    xs, ys = make_data(3, 3)
    xs, ys = [x.double() for x in xs], [y.double() for y in ys]  # float64: exact up to 1e-15
    with_views, plain = SharedGainHeads(shared_gain).double(), SharedGainHeads(shared_gain).double()
    opt_v = GradSurgery(torch.optim.SGD(with_views.parameters(), lr=0.1), method=method, **options)
    opt_p = GradSurgery(torch.optim.SGD(plain.parameters(), lr=0.1), method=method, **options)
    moved = False
    for t in range(3):
        views = gradsurgery.task_views(with_views.trunk(xs[t]), 3)
        losses = with_views.losses(xs[t], ys[t], views)
        CountBackward.calls = 0
        info_v = opt_v.backward(losses, features=views)
        assert CountBackward.calls == (6 if shared_gain else 3)
        z_plain = plain.trunk(xs[t])
        info_p = opt_p.backward(plain.losses(xs[t], ys[t], [z_plain] * 3), features=z_plain)
        torch.testing.assert_close(info_v.weights, info_p.weights, rtol=1e-9, atol=1e-12)
        moved = moved or not torch.allclose(info_v.weights, torch.ones(3, dtype=info_v.weights.dtype))
        for a, b in zip(grads(with_views), grads(plain), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        step_in_lockstep((opt_v, opt_p), with_views, plain)
    assert moved, "the weights must leave 1 for the scaling to be checked"


WITHOUT_G_Z = [(m, o) for m, o in METHODS if not gradsurgery.make_method(m, **o).needs_gram]


@pytest.mark.parametrize("shared_gain", [False, True], ids=["own heads", "a gain shared by the heads"])
@pytest.mark.parametrize("path", ["task views", "z"])
@pytest.mark.parametrize("method,options", WITHOUT_G_Z, ids=[m for m, _ in WITHOUT_G_Z])
def test_loss_weightings_without_g_z_pass_the_heads_once_with_the_gradient_of_the_weighted_loss(
    method, options, path, shared_gain
):
    """One pass through each head, seeded w_i (a shared gain included), and every gradient that of
    Σ_i w_i L_i written out by plain autograd; no G_z."""
    xs, ys = make_data(3, 3)
    xs, ys = [x.double() for x in xs], [y.double() for y in ys]
    model = SharedGainHeads(shared_gain).double()
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method=method, **options)
    params = list(model.parameters())
    weights = []
    for t in range(3):
        z = model.trunk(xs[t])
        features = gradsurgery.task_views(z, 3) if path == "task views" else z
        losses = model.losses(xs[t], ys[t], list(features) if path == "task views" else [z] * 3)
        CountBackward.calls = 0
        info = opt.backward(losses, features=features, retain_graph=True)  # the trunk's, for the reference
        assert CountBackward.calls == 3
        assert info.gram is None and (info.mode, info.source) == ("representation", "weighted")
        again = model.losses(xs[t], ys[t], [z] * 3)
        expected = torch.autograd.grad(
            sum(float(w) * loss for w, loss in zip(info.weights, again, strict=True)), params
        )
        for p, g in zip(params, expected, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
        weights.append(info.weights)
        opt.step()
        opt.zero_grad()
    if method not in ("sum", "dwa"):  # the others move from the first step (dwa after two periods)
        assert not torch.allclose(weights[-1], torch.ones(3, dtype=torch.float64)), weights


@pytest.mark.parametrize("method", ["mgda", "dwa"])
def test_a_head_reading_another_tasks_view_is_refused(method):
    xs, ys = make_data(3, 1)
    model = CountedHeads()
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method=method)
    views = gradsurgery.task_views(model.trunk(xs[0]), 3)
    losses = model.losses(xs[0], ys[0], [views[0], views[0], views[2]])
    with pytest.raises(
        ValueError, match=r"loss 0 reads the views of tasks \[0, 1\]|loss 1 reads the views of tasks \[0\]"
    ):
        opt.backward(losses, features=views)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="2 task views for 3 losses"):
        two = gradsurgery.task_views(model.trunk(xs[0]), 2)
        opt.backward(model.losses(xs[0], ys[0], [two[0], two[1], two[1]]), features=two)


# -- features=z: one pass through the heads when their graph splits at z ----------------------------------


def written_out(losses, features, params, weights, seeds_are_weights):
    """The representation-mode gradients by plain autograd: rows r_i = ∇_z L_i (one pass per loss), and every
    parameter's gradient of Σ_i s_i L_i with the Σ_i s_i r_i reaching z replaced by u = Σ_i w_i r_i (added
    through z as the VJP of u − Σ_i s_i r_i), s_i = w_i for a loss weighting, 1 otherwise."""
    w = [float(v) for v in weights]
    s = w if seeds_are_weights else [1.0] * len(losses)
    rows = [torch.autograd.grad(loss, features, retain_graph=True) for loss in losses]
    total = torch.autograd.grad(
        sum(si * loss for si, loss in zip(s, losses, strict=True)),
        params,
        retain_graph=True,
        allow_unused=True,
    )
    delta = [
        sum((wi - si) * r[j] for wi, si, r in zip(w, s, rows, strict=True)) for j in range(len(features))
    ]
    through_z = torch.autograd.grad(
        features, params, grad_outputs=delta, retain_graph=True, allow_unused=True
    )
    grads = []
    for a, b in zip(total, through_z, strict=True):
        grads.append(a if b is None else b if a is None else a + b)
    gram = torch.stack([torch.cat([g.reshape(-1) for g in r]).double() for r in rows])
    return grads, gram @ gram.T


@contextlib.contextmanager
def one_pass_per_task():
    """Representation mode through z as if the heads' graph never split at z: one pass per task."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features_module, "split_at_features", lambda losses, features: None)
        yield


def counted_head_losses(model, ys, z):
    return [
        (head(CountBackward.apply(z)).squeeze(-1) - ys[i]).pow(2).mean() for i, head in enumerate(model.heads)
    ]


@pytest.mark.parametrize("method,options", METHODS, ids=IDS)
def test_features_z_go_through_each_head_once_with_the_per_task_result(method, options):
    xs, ys = make_data(3, 3)
    xs, ys = [x.double() for x in xs], [y.double() for y in ys]
    split, per_task = CountedHeads().double(), CountedHeads().double()
    opt_s = GradSurgery(torch.optim.SGD(split.parameters(), lr=0.1), method=method, **options)
    opt_p = GradSurgery(torch.optim.SGD(per_task.parameters(), lr=0.1), method=method, **options)
    loss_weighting = opt_s.method.scales_task_specific
    for t in range(3):
        z = split.trunk(xs[t])
        losses = counted_head_losses(split, ys[t], z)
        params = list(split.parameters())
        CountBackward.calls = 0
        info_s = opt_s.backward(losses, features=z, retain_graph=True)
        assert CountBackward.calls == 3  # each head once (one per task before: T + 1 passes in all)
        expected, gram = written_out(losses, [z], params, info_s.weights, loss_weighting)
        if opt_s.method.needs_gram:
            torch.testing.assert_close(info_s.gram, gram, rtol=1e-12, atol=1e-15)
        else:  # one backward of the weighted loss, which does not look for a split
            assert info_s.gram is None
        for p, g in zip(params, expected, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
        z_p = per_task.trunk(xs[t])
        CountBackward.calls = 0
        with one_pass_per_task():
            info_p = opt_p.backward(counted_head_losses(per_task, ys[t], z_p), features=z_p)
        assert CountBackward.calls == (6 if opt_p.method.needs_gram else 3)
        torch.testing.assert_close(info_s.weights, info_p.weights, rtol=1e-12, atol=1e-15)
        for a, b in zip(grads(split), grads(per_task), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        step_in_lockstep((opt_s, opt_p), split, per_task)


@pytest.mark.parametrize("shared_gain", [False, True], ids=["own heads", "a gain shared by the heads"])
@pytest.mark.parametrize("method,options", LOSS_WEIGHTINGS, ids=[m for m, _ in LOSS_WEIGHTINGS])
def test_features_z_loss_weightings_pass_the_heads_again_only_for_shared_parameters(
    method, options, shared_gain
):
    xs, ys = make_data(3, 2)
    xs, ys = [x.double() for x in xs], [y.double() for y in ys]
    model = SharedGainHeads(shared_gain).double()
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method=method, **options)
    for t in range(2):
        z = model.trunk(xs[t])
        losses = model.losses(xs[t], ys[t], [z] * 3)
        CountBackward.calls = 0
        info = opt.backward(losses, features=z, retain_graph=True)
        assert CountBackward.calls == (6 if shared_gain else 3)
        expected, _ = written_out(losses, [z], list(model.parameters()), info.weights, True)
        for p, g in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
        opt.step()
        opt.zero_grad()


class ReadsTwice(CountedHeads):
    """Head 0 reads z twice (z and z²), head 1 the last three columns of z only, head 2 z; ``whole()`` gives
    each head its own z (a cat of the pieces when z is passed in pieces)."""

    def losses(self, x, ys, whole):
        z0, z1, z2 = whole(), whole(), whole()
        outs = [
            self.heads[0](z0 + 0.3 * z0 * z0),
            self.heads[1](torch.cat([torch.zeros_like(z1[:, :3]), z1[:, 3:]], dim=1)),
            self.heads[2](z2),
        ]
        return [(o.squeeze(-1) - ys[i]).pow(2).mean() for i, o in enumerate(outs)]


PIECES = ["one", "two slices", "chunk outputs"]


def read_in_pieces(model, x, y, pieces):
    """``ReadsTwice``'s features passed as z itself, two slices of z, or the two outputs of one ``chunk``
    node, and its losses, each head reading the features put back together."""
    z = model.trunk(x)
    if pieces == "one":
        features = [z]
    elif pieces == "two slices":
        features = [z[:, :2], z[:, 2:]]
    else:
        features = list(z.chunk(2, dim=1))  # one node, outputs 0 and 1
    return features, model.losses(x, y, lambda: torch.cat(features, dim=1) if len(features) > 1 else z)


@pytest.mark.parametrize("pieces", PIECES)
def test_features_z_split_where_heads_read_z_several_times_or_in_pieces(pieces):
    xs, ys = make_data(3, 1)
    x, y = xs[0].double(), ys[0].double()
    model = ReadsTwice().double()
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="mgda")
    features, losses = read_in_pieces(model, x, y, pieces)
    assert features_module.split_at_features(losses, features) is not None
    info = opt.backward(losses, features=features, retain_graph=True)
    expected, gram = written_out(losses, features, list(model.parameters()), info.weights, False)
    torch.testing.assert_close(info.gram, gram, rtol=1e-12, atol=1e-15)
    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


class AddsOfShapes(TorchDispatchMode):
    """Counts the additions whose result has one of ``shapes``."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes = {tuple(s) for s in shapes}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (
            func.overloadpacket in (torch.ops.aten.add, torch.ops.aten.add_)
            and tuple(out.shape) in self.shapes
        ):
            self.count += 1
        return out


@pytest.mark.parametrize("pieces", PIECES)
def test_features_z_split_pass_forms_no_sum_at_the_features(pieces):
    """Each head's gradient is taken out of the pass once it is in its row of J_z: autograd adds nothing of a
    feature's shape (the heads' sum at z, which nothing reads), and the rows are the per-task gradients."""
    xs, ys = make_data(3, 1)
    x, y = xs[0].double(), ys[0].double()
    model = ReadsTwice().double()
    features, losses = read_in_pieces(model, x, y, pieces)
    split = features_module.split_at_features(losses, features)
    heads = list(model.heads.parameters())
    with AddsOfShapes(f.shape for f in features) as adds:
        jac, head_grads = features_module.split_jacobian(losses, features, split, heads, keep=True)
    assert adds.count == 0
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, features, retain_graph=True)])
        for loss in losses
    ]
    torch.testing.assert_close(jac, torch.stack(rows), rtol=1e-13, atol=1e-15)
    expected = torch.autograd.grad(sum(losses), heads, retain_graph=True)
    for got, want in zip(head_grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)


class Entangled(CountedHeads):
    """Two heads whose graph does not split at z: ``kind`` says how."""

    def __init__(self, kind):
        super().__init__(num_tasks=2)
        self.kind = kind
        self.neck = torch.nn.Linear(6, 6)

    def losses(self, x, ys, z):
        if self.kind == "shared neck":  # one node between z and both heads
            h = torch.tanh(self.neck(z))
            outs = [head(h) for head in self.heads]
        elif self.kind == "tied weight":  # head 1 multiplies z by the trunk's weight too
            tied = (z @ self.trunk[0].weight).sum(1, keepdim=True)
            outs = [self.heads[0](z), self.heads[1](z) + 0.1 * tied]
        else:  # "trunk penalty": loss 0 reads a trunk parameter directly
            outs = [head(z) for head in self.heads]
        losses = [(o.squeeze(-1) - ys[i]).pow(2).mean() for i, o in enumerate(outs)]
        if self.kind == "trunk penalty":
            losses[0] = losses[0] + 0.1 * self.trunk[0].weight.pow(2).sum()
        return losses


@pytest.mark.parametrize("kind", ["shared neck", "tied weight", "trunk penalty"])
def test_features_z_take_one_pass_per_task_where_the_graph_does_not_split(kind):
    xs, ys = make_data(2, 1)
    x, y = xs[0].double(), ys[0].double()
    model = Entangled(kind).double()
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="mgda")
    z = model.trunk(x)
    losses = model.losses(x, y, z)
    assert features_module.split_at_features(losses, [z]) is None
    info = opt.backward(losses, features=z, retain_graph=True)
    assert 0.05 < float(info.weights[0]) < 0.95  # both tasks matter
    expected, gram = written_out(losses, [z], list(model.parameters()), info.weights, False)
    torch.testing.assert_close(info.gram, gram, rtol=1e-12, atol=1e-15)
    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


class RandomHeads(torch.nn.Module):
    """A tanh trunk and T heads of a shape drawn from ``seed``: 0-2 hidden layers, reading z once or twice or
    in part, some behind a neck shared with the next head, some adding a trunk penalty or a tied weight."""

    def __init__(self, seed, num_tasks=3):
        super().__init__()
        self.rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        self.trunk = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh())
        self.heads = torch.nn.ModuleList()
        self.kinds = []
        for _ in range(num_tasks):
            depth = int(self.rng.integers(0, 3))
            layers = []
            for _ in range(depth):
                layers += [torch.nn.Linear(6, 6), torch.nn.Tanh()]
            self.heads.append(torch.nn.Sequential(*layers, torch.nn.Linear(6, 1)))
            read = ["once", "twice", "part", "neck", "penalty", "tied"]
            self.kinds.append(read[int(self.rng.choice(6, p=[0.35, 0.2, 0.2, 0.15, 0.05, 0.05]))])
        self.neck = torch.nn.Linear(6, 6)

    def losses(self, ys, z):
        out = []
        necked = torch.tanh(self.neck(z))  # computed once: one node for every head behind the neck
        for i, (head, kind) in enumerate(zip(self.heads, self.kinds, strict=True)):
            if kind == "twice":
                h = head(z + 0.2 * z * z)
            elif kind == "part":
                h = head(torch.cat([z[:, :3], torch.zeros_like(z[:, 3:])], dim=1))
            elif kind == "neck":
                h = head(necked)
            else:
                h = head(z)
            loss = (h.squeeze(-1) - ys[i]).pow(2).mean()
            if kind == "penalty":
                loss = loss + 0.05 * self.trunk[0].weight.pow(2).sum()
            elif kind == "tied":
                loss = loss + 0.05 * (z @ self.trunk[0].weight).mean()
            out.append(loss)
        return out


def uncertainty_variant(method):
    """``"mgda"``, ``"uncertainty"`` (no G_z) or ``"uncertainty diagnostics"`` (G_z): the name and options,
    the log-variances set apart so that the weights differ from task to task."""
    name, _, variant = method.partition(" ")
    options = {"init_log_var": [0.2, -0.3, 0.1]} if name == "uncertainty" else {}
    return name, options | ({"diagnostics": True} if variant else {})


def assert_gram(info, gram, needs_gram, **tolerances):
    if needs_gram:
        torch.testing.assert_close(info.gram, gram, **tolerances)
    else:
        assert info.gram is None


@pytest.mark.parametrize("seed", range(16))
@pytest.mark.parametrize("method", ["mgda", "uncertainty", "uncertainty diagnostics"])
def test_features_z_on_random_head_graphs_match_the_written_out_gradients(seed, method):
    xs, ys = make_data(3, 1, seed=seed)
    x, y = xs[0].double(), ys[0].double()
    model = RandomHeads(seed).double()
    name, options = uncertainty_variant(method)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method=name, **options)
    z = model.trunk(x)
    losses = model.losses(y, z)
    # The graph splits at z unless a loss reads the trunk other than through z or two heads share the neck.
    shared = bool({"penalty", "tied"} & set(model.kinds)) or model.kinds.count("neck") > 1
    assert (features_module.split_at_features(losses, [z]) is None) == shared, model.kinds
    info = opt.backward(losses, features=z, retain_graph=True)
    expected, gram = written_out(
        losses, [z], list(model.parameters()), info.weights, opt.method.scales_task_specific
    )
    assert_gram(info, gram, opt.method.needs_gram, rtol=1e-12, atol=1e-15)
    for p, g in zip(model.parameters(), expected, strict=True):
        if g is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("path", ["task views", "z", "z, one pass per task"])
@pytest.mark.parametrize("method", ["mgda", "uncertainty", "uncertainty diagnostics"])
def test_losses_of_different_dtypes_match_the_written_out_gradients(path, method):
    """A float64 loss beside float32 ones: G and every gradient equal those written out by plain autograd on
    a twin model."""
    xs, ys = make_data(3, 3)
    model, twin = CountedHeads(), CountedHeads()
    name, options = uncertainty_variant(method)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method=name, **options)

    def losses_of(net, inputs):
        losses = [
            (head(v).squeeze(-1) - ys[0][i]).pow(2).mean()
            for i, (head, v) in enumerate(zip(net.heads, inputs, strict=True))
        ]
        losses[1] = losses[1].double()
        return losses

    z = model.trunk(xs[0])
    features = gradsurgery.task_views(z, 3) if path == "task views" else z
    losses = losses_of(model, list(features) if path == "task views" else [z] * 3)
    with one_pass_per_task() if path.endswith("per task") else contextlib.nullcontext():
        info = opt.backward(losses, features=features)
    z_twin = twin.trunk(xs[0])
    expected, gram = written_out(
        losses_of(twin, [z_twin] * 3),
        [z_twin],
        list(twin.parameters()),
        info.weights,
        opt.method.scales_task_specific,
    )
    assert_gram(info, gram, opt.method.needs_gram, rtol=1e-6, atol=1e-9)
    for p, g in zip(model.parameters(), expected, strict=True):  # float32 rounding, lifted by cancellation
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-6 * float(g.abs().max()))
