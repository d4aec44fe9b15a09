"""torch.compile: a compiled model trains through GradSurgery, and a branch-free fusion compiles whole.

The tests use the ``aot_eager`` / ``eager`` backends: they run Dynamo and AOTAutograd (where graph breaks and
``autograd.grad`` through compiled graphs would fail) without Inductor's C++ build, which takes about a minute
on a CPU-only CI machine. The numbers were also checked with Inductor by hand (README).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch_support import COMPILER_IS_EXPORTING

from gradsurgery import GradSurgery, gram_matrix
from gradsurgery.optimizer import _run_eagerly

pytestmark = pytest.mark.slow


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def train(model, forward, steps=3):
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "mgda")
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)
    weights = []
    for _ in range(steps):
        out = forward(x)
        losses = [(out[:, 0] - y[:, 0]).pow(2).mean(), (out[:, 1] + y[:, 0]).pow(2).mean()]
        opt.zero_grad()
        weights.append(opt.backward(losses).weights)
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), torch.stack(weights)


def test_compiled_model_trains_like_the_eager_one():
    torch._dynamo.reset()
    eager = make()
    compiled = make()
    p_eager, w_eager = train(eager, eager)
    p_comp, w_comp = train(compiled, torch.compile(compiled, backend="aot_eager"))
    torch.testing.assert_close(p_comp, p_eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w_comp, w_eager, rtol=1e-6, atol=1e-9)
    assert not torch.equal(p_eager, torch.cat([p.detach().reshape(-1) for p in make().parameters()]))


def mgda_two_fusion(jac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-task MGDA as a branch-free function of the Gram matrix:
    α = clip((G₂₂ − G₁₂)/(G₁₁ − 2G₁₂ + G₂₂), 0, 1)."""
    gram = gram_matrix(jac)
    denom = gram[0, 0] - 2 * gram[0, 1] + gram[1, 1]
    alpha = torch.where(denom > 0, (gram[1, 1] - gram[0, 1]) / denom.clamp_min(1e-300), 0.5).clamp(0, 1)
    weights = torch.stack([alpha, 1 - alpha])
    return weights, weights.to(jac.dtype) @ jac


def test_branch_free_fusion_compiles_without_graph_breaks():
    torch._dynamo.reset()
    fused_fn = torch.compile(
        mgda_two_fusion, fullgraph=True, backend="eager"
    )  # fullgraph: a break is an error
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        jac = torch.randn(2, 50, generator=gen)
        g1, g2 = jac[0].double(), jac[1].double()
        alpha = ((g2 - g1) @ g2 / (g1 - g2).pow(2).sum()).clamp(0, 1)  # the d-space closed form
        weights, fused = fused_fn(jac)
        torch.testing.assert_close(weights, torch.stack([alpha, 1 - alpha]))
        torch.testing.assert_close(fused, (alpha * g1 + (1 - alpha) * g2).float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["mgda", "pcgrad"])
def test_compiled_training_step_around_backward(method):
    # The whole step (forward, GradSurgery.backward, step) under torch.compile: backward runs eagerly.
    torch._dynamo.reset()
    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(3)), torch.randn(16, 2)
    results = []
    for compiled in (False, True):
        model = make()
        opt = GradSurgery(
            torch.optim.SGD(model.parameters(), lr=0.1), method, **({"seed": 0} if method == "pcgrad" else {})
        )

        def step(model=model, opt=opt):
            out = model(x)
            losses = [(out[:, 0] - y[:, 0]).pow(2).mean(), (out[:, 1] + y[:, 0]).pow(2).mean()]
            opt.zero_grad()
            info = opt.backward(losses)
            opt.step()
            return info.weights

        run = torch.compile(step, backend="eager") if compiled else step
        weights = torch.stack([run() for _ in range(3)])
        results.append((torch.cat([p.detach().reshape(-1) for p in model.parameters()]), weights))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-6, atol=1e-9)


def test_run_eagerly_wraps_only_where_a_compiled_frame_runs(monkeypatch):
    # GradSurgery.backward's guard (_run_eagerly): called directly in eager code (no disabling wrapper to
    # pay for), and run eagerly, not traced, from inside a compiled function. A torch without
    # torch.compiler.is_exporting takes the wrapper at every call, eager code included.
    torch._dynamo.reset()
    built = []
    disable = torch.compiler.disable
    monkeypatch.setattr(torch.compiler, "disable", lambda fn: built.append(fn) or disable(fn))
    seen = []

    def body(x):
        seen.append(torch.compiler.is_compiling())  # True only if Dynamo traced this function
        return x + 1

    guarded = _run_eagerly(body)
    x = torch.ones(3)
    torch.testing.assert_close(guarded(x), x + 1)
    assert seen == [False] and built == ([] if COMPILER_IS_EXPORTING else [body])
    out = torch.compile(lambda t: guarded(t) * 2, backend="eager")(x)
    torch.testing.assert_close(out, (x + 1) * 2)
    assert seen == [False, False] and built == [body]


class TrunkAndHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))

    def forward(self, x):
        z = self.trunk(x)
        return z, [head(z).squeeze(-1) for head in self.heads]


@pytest.mark.parametrize("compiled", ["trunk", "trunk and each head"])
def test_representation_mode_through_compiled_graphs_matches_eager(compiled):
    # Compiled separately, the trunk and the heads stay separate autograd nodes: one pass through the heads,
    # the eager step's gradients.
    import gradsurgery.sources.features as features_module

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 4, generator=gen), torch.randn(3, 16, generator=gen)
    grads = {}
    for variant in ("eager", compiled):
        model = TrunkAndHeads()
        opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "mgda")
        trunk, heads = model.trunk, list(model.heads)
        if variant != "eager":
            trunk = torch.compile(trunk, backend="aot_eager")
        if variant == "trunk and each head":
            heads = [torch.compile(head, backend="aot_eager") for head in heads]
        z = trunk(x)
        losses = [(head(z).squeeze(-1) - y[i]).pow(2).mean() for i, head in enumerate(heads)]
        assert features_module.split_at_features(losses, [z]) is not None
        info = opt.backward(losses, features=z)
        assert 0.05 < float(info.weights.min())  # every task matters
        grads[variant] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads[compiled], grads["eager"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_representation_mode_refuses_a_model_compiled_whole():
    # z and the heads' outputs then come out of one compiled node: on the autograd graph no loss reads z.
    torch._dynamo.reset()
    model = TrunkAndHeads()
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "mgda")
    z, outs = torch.compile(model, backend="aot_eager")(torch.randn(16, 4))
    with pytest.raises(ValueError, match=r"loss\(es\) \[0, 1, 2\] do not depend on the features"):
        opt.backward([o.pow(2).mean() for o in outs], features=z)
    assert all(p.grad is None for p in model.parameters())


def test_evidence_lambda_through_a_compiled_model_is_the_eager_run():
    """``method="l2", evidence=True`` records its factors with forward hooks on the layers and hooks on their
    outputs' gradients; through a compiled model (Dynamo traces the hooks) the λ of every step, the factors
    and the parameters are the eager run's, across a solve (steps 1 and 10)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    twin = copy.deepcopy(model)

    def evidence(net):
        return GradSurgery(
            torch.optim.SGD(net.parameters(), lr=0.1), "l2", evidence=True, layers=net, num_samples=100
        )

    opt, twin_opt = evidence(model), evidence(twin)
    compiled = torch.compile(model, backend="aot_eager")
    for step in range(11):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 1, 6, 6, generator=gen), torch.randint(0, 5, (8,), generator=gen)
        lams = []
        for forward, o in ((compiled, opt), (twin, twin_opt)):
            o.zero_grad()
            lams.append(o.backward(nn.functional.cross_entropy(forward(x), y)).l2_coefficient)
            o.step()
        assert torch.equal(lams[0], lams[1])
    for got, expected in zip(
        opt.l2.factors.a + opt.l2.factors.s, twin_opt.l2.factors.a + twin_opt.l2.factors.s, strict=True
    ):
        assert torch.equal(got, expected)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_activation_source_through_a_compiled_model_is_the_eager_run():
    """The activation source records each layer's input with forward hooks, which Dynamo traces: through a
    compiled model G (from the activations) and the steps are the eager model's, to float32 rounding, and G
    is that of the task gradients written out by autograd."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 2))
    twin = copy.deepcopy(model)

    def activations(net):
        return GradSurgery(
            torch.optim.SGD(net.parameters(), lr=0.1), "mgda", model=net, gradient_source="activations"
        )

    opt, twin_opt = activations(model), activations(twin)
    compiled = torch.compile(model, backend="aot_eager")
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=gen), torch.randn(32, generator=gen)
    for _ in range(3):
        grams = []
        for forward, o, net in ((compiled, opt, model), (twin, twin_opt, twin)):
            out = forward(x)
            losses = [(out[:, 0] - y).pow(2).mean(), (out[:, 1] + y).pow(2).mean()]
            params = list(net.parameters())
            rows = [
                torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
                for loss in losses
            ]
            o.zero_grad()
            info = o.backward(losses)
            assert info.source == "activations"
            torch.testing.assert_close(info.gram, gram_matrix(torch.stack(rows)), rtol=1e-5, atol=1e-9)
            grams.append(info.gram)
            o.step()
        torch.testing.assert_close(grams[0], grams[1], rtol=1e-5, atol=1e-9)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
