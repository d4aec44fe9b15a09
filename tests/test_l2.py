"""The λ-free L2 rule (gradsurgery/l2.py, method="l2", l2=True) against hand-computed and numpy references."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from gradsurgery import GradSurgery, MultiOptimizer, task_views
from gradsurgery.l2 import L2Rule, decoupled_correction, l2_coefficients, l2_direction


def ref_rule(g: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """u = g + relu(−⟨g, θ⟩)/‖θ‖² θ on explicit vectors (0 correction for θ = 0)."""
    sq = float(theta @ theta)
    lam = max(0.0, -float(g @ theta)) / sq if sq > 0 else 0.0
    return g + lam * theta


# -- the rule on known g and θ ------------------------------------------------------------------------------


def test_growing_gradient_gets_its_theta_component_cancelled():
    theta = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g = torch.tensor([-2.0, 3.0], dtype=torch.float64)  # ⟨g, θ⟩ = −2: a step along −g would grow θ
    (u,), lam = l2_direction([g], [theta])
    assert float(lam) == 2.0
    assert u.tolist() == [0.0, 3.0]


def test_shrinking_gradient_is_left_alone():
    theta = torch.tensor([1.0, 2.0], dtype=torch.float64)
    g = torch.tensor([0.5, -0.1], dtype=torch.float64)  # ⟨g, θ⟩ = 0.3 > 0
    (u,), lam = l2_direction([g], [theta])
    assert float(lam) == 0.0
    assert torch.equal(u, g)


def test_orthogonal_gradient_is_left_alone():
    (u,), lam = l2_direction([torch.tensor([0.0, 4.0])], [torch.tensor([3.0, 0.0])])
    assert float(lam) == 0.0 and u.tolist() == [0.0, 4.0]


def test_zero_theta_changes_nothing_and_gives_no_nan():
    g = [torch.tensor([[1.0, -2.0]]), torch.tensor([3.0])]
    theta = [torch.zeros(1, 2), torch.zeros(1)]
    for per_tensor in (False, True):
        u, lam = l2_direction(g, theta, per_tensor)
        assert all(torch.equal(a, b) for a, b in zip(u, g, strict=True))
        assert torch.isfinite(lam).all() and bool((lam == 0).all())


@pytest.mark.parametrize("seed", range(5))
def test_random_vectors_match_reference_and_never_grow_theta(seed):
    rng = np.random.default_rng(seed)
    g, theta = rng.normal(size=7), rng.normal(size=7)
    (u,), _ = l2_direction([torch.from_numpy(g)], [torch.from_numpy(theta)])
    np.testing.assert_allclose(u.numpy(), ref_rule(g, theta), rtol=1e-12, atol=1e-12)
    assert float(u.numpy() @ theta) >= -1e-12  # a step along −u does not grow ½‖θ‖² to first order


@pytest.mark.parametrize("seed", range(3))
def test_complex_tensors_are_read_as_their_real_views(seed):
    """A complex tensor is its real pairs, as torch.optim reads it: ⟨g, θ⟩ = Re Σ conj(g) θ (Σ g θ, without
    the conjugate, is another number), in the rule and in the decoupled correction."""
    rng = np.random.default_rng(seed)
    g, theta = rng.normal(size=(6, 2)), rng.normal(size=(6, 2))
    if seed == 0:
        g = -theta + 0.3 * g  # a growing gradient: the rule acts
    as_complex = [torch.view_as_complex(torch.from_numpy(a)) for a in (g, theta)]
    (u,), lam = l2_direction([as_complex[0]], [as_complex[1]])
    np.testing.assert_allclose(
        torch.view_as_real(u).numpy().ravel(), ref_rule(g.ravel(), theta.ravel()), rtol=1e-12
    )
    expected = max(0.0, -float(g.ravel() @ theta.ravel())) / float(theta.ravel() @ theta.ravel())
    assert float(lam) == pytest.approx(expected, rel=1e-13, abs=1e-15)
    new_pairs = torch.from_numpy(theta + 0.4 * g + 0.5)
    new_complex = torch.view_as_complex(new_pairs.clone())
    decoupled_correction([new_pairs], [torch.from_numpy(theta)])
    decoupled_correction([new_complex], [as_complex[1]])
    torch.testing.assert_close(torch.view_as_real(new_complex), new_pairs, rtol=1e-14, atol=1e-14)


def test_complex_parameters_with_adam_step_as_their_real_pairs():
    """The default decoupled per-tensor rule with Adam: a complex weight takes, bit for bit, the steps of the
    same weight held as real pairs (torch's Adam treats a complex parameter as its real view)."""

    def run(as_pairs: bool, rule: bool = True) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        pairs = 0.1 * torch.randn(4, 3, 2, generator=gen, dtype=torch.float64)
        weight = torch.nn.Parameter(pairs.clone() if as_pairs else torch.view_as_complex(pairs.clone()))
        inner = torch.optim.Adam([weight], lr=0.1)
        opt = GradSurgery(inner, method="l2") if rule else inner
        for _ in range(5):
            x = torch.view_as_complex(torch.randn(8, 3, 2, generator=gen, dtype=torch.float64))
            w = torch.view_as_complex(weight) if as_pairs else weight
            opt.zero_grad()
            loss = (x @ w.T - 5).abs().pow(2).mean()  # far from the targets: Adam alone grows ‖w‖
            opt.backward(loss) if rule else loss.backward()
            opt.step()
        return weight.detach() if as_pairs else torch.view_as_real(weight.detach())

    start = 0.1 * torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert run(True, rule=False).norm() > 2 * start.norm()  # so the rule has growth to remove
    assert torch.equal(run(False), run(True))


def test_per_tensor_versus_global():
    # Globally ⟨g, θ⟩ = −1 + 3 = 2 > 0 (no correction); the first tensor alone has ⟨g₁, θ₁⟩ = −1 < 0.
    theta = [torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)]
    g = [torch.tensor([-1.0, 5.0], dtype=torch.float64), torch.tensor([2.0, 3.0], dtype=torch.float64)]
    u_global, lam_global = l2_direction(g, theta, per_tensor=False)
    assert float(lam_global) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(u_global, g, strict=True))
    u_per, lam_per = l2_direction(g, theta, per_tensor=True)
    assert lam_per.tolist() == [1.0, 0.0]
    assert u_per[0].tolist() == [0.0, 5.0] and torch.equal(u_per[1], g[1])


def test_global_rule_is_the_rule_on_the_concatenation():
    rng = np.random.default_rng(3)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    g = [rng.normal(size=s) for s in shapes]
    theta = [rng.normal(size=s) for s in shapes]
    g[0] = -3 * theta[0]  # make the global inner product negative
    u, lam = l2_direction([torch.from_numpy(a) for a in g], [torch.from_numpy(a) for a in theta])
    expected = ref_rule(np.concatenate([a.ravel() for a in g]), np.concatenate([a.ravel() for a in theta]))
    np.testing.assert_allclose(np.concatenate([a.numpy().ravel() for a in u]), expected, rtol=1e-12)
    assert float(lam) > 0


def test_coefficient_input_checks():
    with pytest.raises(ValueError, match="2 gradients for 1"):
        l2_coefficients([torch.ones(2), torch.ones(2)], [torch.ones(2)])
    with pytest.raises(ValueError, match="shape"):
        l2_coefficients([torch.ones(2)], [torch.ones(3)])


# -- method="l2" in GradSurgery -----------------------------------------------------------------------------


class LinearModel(torch.nn.Module):
    """L = ⟨A, W1⟩ + ⟨B, W2⟩ + ⟨c, bias⟩: the gradient is (A, B, c) whatever the parameters."""

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(3, 4, generator=gen, dtype=torch.float64))
        self.w2 = torch.nn.Parameter(torch.randn(2, 3, generator=gen, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64))
        push = torch.randn(3, 4, generator=gen, dtype=torch.float64)
        self.register_buffer("a", -2.0 * self.w1.detach() + push)
        self.register_buffer("b", torch.randn(2, 3, generator=gen, dtype=torch.float64))
        self.register_buffer("c", torch.randn(3, generator=gen, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        return (self.a * self.w1).sum() + (self.b * self.w2).sum() + (self.c * self.bias).sum()


def test_method_l2_writes_the_rule_on_weight_matrices_only():
    model = LinearModel()
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="l2", decoupled=False)
    info = opt.backward(model())
    g = np.concatenate([model.a.numpy().ravel(), model.b.numpy().ravel()])
    theta = np.concatenate([model.w1.detach().numpy().ravel(), model.w2.detach().numpy().ravel()])
    assert g @ theta < 0  # the case where the rule acts
    expected = ref_rule(g, theta)
    got = np.concatenate([model.w1.grad.numpy().ravel(), model.w2.grad.numpy().ravel()])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    torch.testing.assert_close(model.bias.grad, model.c)  # a bias (dim 1) is not regularized
    np.testing.assert_allclose(float(info.l2_coefficient), -(g @ theta) / (theta @ theta), rtol=1e-12)
    assert info.weights.tolist() == [1.0]


def test_method_l2_per_tensor_and_explicit_params():
    model = LinearModel(1)
    opt = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.1),
        method="l2",
        per_tensor=True,
        params=[model.w2, model.bias],
    )
    opt.backward(model())
    torch.testing.assert_close(model.w1.grad, model.a)  # not in params: plain gradient
    for p, g in ((model.w2, model.b), (model.bias, model.c)):
        expected = ref_rule(g.numpy().ravel(), p.detach().numpy().ravel()).reshape(p.shape)
        np.testing.assert_allclose(p.grad.numpy(), expected, rtol=1e-12)


def test_rule_applies_to_each_backwards_contribution():
    model = LinearModel(2)
    opt = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.1), method="l2", params=[model.w1], decoupled=False
    )
    theta = model.w1.detach().numpy().ravel()
    a = model.a.numpy().ravel()
    opt.backward(model())  # g = a (⟨a, θ⟩ < 0: corrected)
    opt.backward(-model())  # g = −a (⟨−a, θ⟩ > 0: left alone)
    expected = ref_rule(a, theta) + ref_rule(-a, theta)
    np.testing.assert_allclose(model.w1.grad.numpy().ravel(), expected, rtol=1e-12, atol=1e-12)
    assert np.abs(expected).max() > 1e-3  # the rule on the summed gradient would have given 0


def test_sgd_step_with_method_l2_does_not_grow_the_norm_to_first_order():
    model = LinearModel(3)
    weights = [model.w1, model.w2]
    before = float(sum((w.detach() ** 2).sum() for w in weights))
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=1e-4), method="l2")
    opt.backward(model())
    opt.step()
    after = float(sum((w.detach() ** 2).sum() for w in weights))
    plain = LinearModel(3)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=1e-4)
    plain().backward()
    plain_opt.step()
    grown = float(sum((w.detach() ** 2).sum() for w in (plain.w1, plain.w2)))
    assert grown - before > 1e-4  # the data step alone grows ‖θ‖² at first order (∝ lr)
    assert after - before < 1e-6  # with the rule only the second-order term (∝ lr²) is left


def test_a_group_that_maximizes_is_regularized_along_its_own_step():
    """SGD with ``maximize=True`` steps along +.grad: the rule acts on the descent direction −g there (and on
    g in the other group), so the one global inner product is that of the step each group takes."""
    model = LinearModel(4)
    opt = GradSurgery(
        torch.optim.SGD(
            [{"params": [model.w1], "maximize": True}, {"params": [model.w2, model.bias]}], lr=1e-4
        ),
        method="l2",
        decoupled=False,
    )
    info = opt.backward(-model())  # g = (−A, −B, −c)
    descent = np.concatenate([model.a.numpy().ravel(), -model.b.numpy().ravel()])
    theta = np.concatenate([model.w1.detach().numpy().ravel(), model.w2.detach().numpy().ravel()])
    # the rule must act, where the gradient read as a descent direction in both groups would not need it
    assert descent @ theta < 0 < -np.concatenate([model.a.numpy().ravel(), model.b.numpy().ravel()]) @ theta
    u = ref_rule(descent, theta)
    np.testing.assert_allclose(model.w1.grad.numpy().ravel(), -u[:12], rtol=1e-12)
    np.testing.assert_allclose(model.w2.grad.numpy().ravel(), u[12:], rtol=1e-12)
    torch.testing.assert_close(model.bias.grad, -model.c)
    np.testing.assert_allclose(float(info.l2_coefficient), -(descent @ theta) / (theta @ theta), rtol=1e-12)
    before = theta @ theta
    opt.step()
    after = sum(float((w.detach() ** 2).sum()) for w in (model.w1, model.w2))
    assert abs(after - before) < 1e-6  # no first-order change (the step is ∝ 1e-4, its square ∝ 1e-8)


@pytest.mark.parametrize(
    "options",
    [
        {"method": "l2", "decoupled": False},
        {"method": "l2", "decoupled": False, "per_tensor": True},
        {"method": "l2"},
        {"method": "mgda", "l2": True, "l2_decoupled": False},
    ],
)
def test_a_maximizing_optimizer_on_the_negated_losses_takes_the_minimizing_steps(options):
    """Maximizing −L is minimizing L: with the rule, five steps of SGD with momentum and ``maximize=True`` on
    the negated losses are bit for bit those of the minimizing optimizer on the losses."""

    def run(maximize: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
        opt = GradSurgery(
            torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.9, maximize=maximize), **options
        )
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            x, y = torch.randn(16, 5, generator=gen), torch.randn(16, 2, generator=gen)
            out = net(x)
            losses = [((out[:, i] - y[:, i]) ** 2).mean() for i in range(2)]
            losses = losses if options["method"] != "l2" else [losses[0] + losses[1]]
            opt.zero_grad()
            opt.backward([-loss for loss in losses] if maximize else losses)
            opt.step()
        return [p.detach().clone() for p in net.parameters()]

    minimized, maximized = run(False), run(True)
    assert all(torch.equal(p, q) for p, q in zip(minimized, maximized, strict=True))


# -- l2=True on a multi-task method ------------------------------------------------------------------------


class TwoTasks(torch.nn.Module):
    """L_i = ⟨A_i, W⟩ + ⟨H_i, V_i⟩ + ⟨c_i, b⟩: W and b shared, V_i task-specific (2-D, so regularized)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.w = torch.nn.Parameter(torch.randn(3, 3, generator=gen, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64))
        self.v = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(2, 2, generator=gen, dtype=torch.float64)) for _ in range(2)]
        )
        w = self.w.detach()
        noise = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64)
        self.register_buffer("a", torch.stack([-w + 0.3 * noise[0], -0.5 * w + noise[1]]))
        self.register_buffer("h", torch.randn(2, 2, 2, generator=gen, dtype=torch.float64))
        self.register_buffer("c", torch.randn(2, 3, generator=gen, dtype=torch.float64))

    def forward(self):
        return [
            (self.a[i] * self.w).sum() + (self.h[i] * self.v[i]).sum() + (self.c[i] * self.b).sum()
            for i in range(2)
        ]


def test_l2_true_applies_the_rule_to_the_fused_gradient():
    model = TwoTasks()
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="mgda", l2=True, l2_decoupled=False)
    info = opt.backward(model())
    # MGDA for T = 2 in closed form on the shared (W, b) gradients.
    g1 = np.concatenate([model.a[0].numpy().ravel(), model.c[0].numpy()])
    g2 = np.concatenate([model.a[1].numpy().ravel(), model.c[1].numpy()])
    alpha = np.clip((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0, 1)
    fused = alpha * g1 + (1 - alpha) * g2
    np.testing.assert_allclose(info.weights.numpy(), [alpha, 1 - alpha], atol=1e-6)
    # The rule acts on the regularized (dim ≥ 2) reached params: W (fused) and V_1, V_2 (their own gradient).
    g = np.concatenate([fused[:9], model.h[0].numpy().ravel(), model.h[1].numpy().ravel()])
    theta = np.concatenate([model.w.detach().numpy().ravel(), *(v.detach().numpy().ravel() for v in model.v)])
    assert g @ theta < 0
    u = ref_rule(g, theta)
    got = np.concatenate([p.grad.numpy().ravel() for p in (model.w, model.v[0], model.v[1])])
    np.testing.assert_allclose(got, u, rtol=1e-6, atol=1e-9)
    # the bias (dim 1) keeps the plain fused gradient
    np.testing.assert_allclose(model.b.grad.numpy(), fused[9:], rtol=1e-6, atol=1e-9)


def test_l2_true_on_the_one_backward_path_of_loss_weightings():
    """rlw takes one backward of Σ w_i L_i; the rule then acts on that gradient, with the weights it
    reports."""
    model = TwoTasks()
    opt = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.1), method="rlw", seed=3, l2=True, l2_decoupled=False
    )
    info = opt.backward(model())
    w = info.weights.numpy()
    g_shared = w[0] * np.concatenate([model.a[0].numpy().ravel(), model.c[0].numpy()]) + w[
        1
    ] * np.concatenate([model.a[1].numpy().ravel(), model.c[1].numpy()])
    g = np.concatenate([g_shared[:9], w[0] * model.h[0].numpy().ravel(), w[1] * model.h[1].numpy().ravel()])
    theta = np.concatenate([model.w.detach().numpy().ravel(), *(v.detach().numpy().ravel() for v in model.v)])
    assert g @ theta < 0  # the rule has something to remove
    got = np.concatenate([p.grad.numpy().ravel() for p in (model.w, model.v[0], model.v[1])])
    np.testing.assert_allclose(got, ref_rule(g, theta), rtol=1e-6, atol=1e-9)
    assert info.l2_coefficient is not None


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("path", ["z", "task views"])
def test_representation_mode_applies_the_direct_rule_to_the_gradients_it_writes(path, per_tensor):
    """z = W (so ∇_z L_i = A_i): the trunk W gets MGDA's fused A-gradient, each V_i its own H_i, and the
    direct rule acts on those, globally or per tensor, as on explicit vectors."""
    model = TwoTasks()
    opt = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.1),
        method="mgda",
        l2=True,
        l2_decoupled=False,
        l2_per_tensor=per_tensor,
    )
    z = model.w * 1.0
    features = task_views(z, 2) if path == "task views" else z
    inputs = list(features) if path == "task views" else [z, z]
    losses = [(model.a[i] * inputs[i]).sum() + (model.h[i] * model.v[i]).sum() for i in range(2)]
    info = opt.backward(losses, features=features)
    assert info.mode == "representation"
    g1, g2 = model.a[0].numpy().ravel(), model.a[1].numpy().ravel()
    alpha = np.clip((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0, 1)
    grads = [alpha * g1 + (1 - alpha) * g2, model.h[0].numpy().ravel(), model.h[1].numpy().ravel()]
    thetas = [p.detach().numpy().ravel() for p in (model.w, model.v[0], model.v[1])]
    assert np.concatenate(grads) @ np.concatenate(thetas) < 0 and grads[0] @ thetas[0] < 0  # the rule acts
    if per_tensor:
        expected = np.concatenate([ref_rule(g, t) for g, t in zip(grads, thetas, strict=True)])
    else:
        expected = ref_rule(np.concatenate(grads), np.concatenate(thetas))
    got = np.concatenate([p.grad.numpy().ravel() for p in (model.w, model.v[0], model.v[1])])
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert model.b.grad is None and info.l2_coefficient is not None


# -- decoupled form ----------------------------------------------------------------------------------------


def test_decoupled_correction_on_known_vectors():
    old = [torch.tensor([1.0, 0.0], dtype=torch.float64)]
    # ⟨Δ, θ_old⟩ = 0.5 > 0: Δ = (0.5, 1) → (0, 1); then |(1, 1)| = √2 > 1: back onto the unit ball.
    new = [torch.tensor([1.5, 1.0], dtype=torch.float64)]
    decoupled_correction(new, old)
    torch.testing.assert_close(new[0], torch.tensor([1.0, 1.0], dtype=torch.float64) / 2**0.5)
    # Shrinking update: untouched.
    new = [torch.tensor([0.5, 0.1], dtype=torch.float64)]
    decoupled_correction(new, old)
    assert new[0].tolist() == [0.5, 0.1]
    # ⟨Δ, θ_old⟩ < 0 but the second-order term grows the norm: only the rescaling acts.
    new = [torch.tensor([0.9, 1.0], dtype=torch.float64)]
    decoupled_correction(new, old)
    torch.testing.assert_close(new[0], torch.tensor([0.9, 1.0], dtype=torch.float64) / 1.81**0.5)
    # Zero θ_old: free to move.
    new = [torch.tensor([3.0, 4.0], dtype=torch.float64)]
    decoupled_correction(new, [torch.zeros(2, dtype=torch.float64)])
    assert new[0].tolist() == [3.0, 4.0]


def test_decoupled_correction_per_tensor_versus_global():
    old = [torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)]
    # Tensor 1 grows, tensor 2 shrinks enough that the global norm shrinks.
    new = [torch.tensor([1.1, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.5], dtype=torch.float64)]
    glob = [t.clone() for t in new]
    decoupled_correction(glob, old, per_tensor=False)
    assert all(torch.equal(a, b) for a, b in zip(glob, new, strict=True))
    per = [t.clone() for t in new]
    decoupled_correction(per, old, per_tensor=True)
    assert per[0].tolist() == [1.0, 0.0] and per[1].tolist() == [0.0, 1.5]


def norms(params, per_tensor):
    sq = [float((p.detach() ** 2).sum()) for p in params]
    return sq if per_tensor else [sum(sq)]


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("inner", ["adam", "sgd_momentum"])
def test_decoupled_steps_never_increase_the_norm(per_tensor, inner):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    params = list(model.parameters())
    if inner == "adam":
        base = torch.optim.Adam(params, lr=0.05)
    else:
        base = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    opt = GradSurgery(base, method="l2", decoupled=True, per_tensor=per_tensor)
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    weights = [p for p in params if p.dim() >= 2]
    biases = [p for p in params if p.dim() < 2]
    bias_moved = False
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        plain = torch.autograd.grad(loss, params, retain_graph=True)
        opt.backward(loss)
        # decoupled: backward writes the plain gradient, the rule acts in step()
        for p, g in zip(params, plain, strict=True):
            torch.testing.assert_close(p.grad, g)
        before = norms(weights, per_tensor)
        bias_before = [b.detach().clone() for b in biases]
        opt.step()
        after = norms(weights, per_tensor)
        for a, b in zip(after, before, strict=True):
            assert a <= b * (1 + 1e-12)
        bias_moved |= any(not torch.equal(b, c) for b, c in zip(biases, bias_before, strict=True))
    assert bias_moved  # biases are stepped normally (not regularized)


def test_decoupled_first_step_matches_reference_correction():
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 3, bias=False).double()
    opt = GradSurgery(torch.optim.Adam(model.parameters(), lr=0.1), method="l2", decoupled=True)
    ref = torch.nn.Linear(4, 3, bias=False).double()
    ref.load_state_dict(model.state_dict())
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.1)
    x = torch.randn(8, 4, dtype=torch.float64)
    old = model.weight.detach().numpy().ravel().copy()
    # A loss that pushes the weights outwards: −‖Wx‖², so the Adam step grows θ.
    opt.zero_grad()
    opt.backward(-(model(x) ** 2).mean())
    opt.step()
    (-(ref(x) ** 2).mean()).backward()
    ref_opt.step()
    new = ref.weight.detach().numpy().ravel()
    delta = new - old
    assert delta @ old > 0
    delta = delta - (delta @ old) / (old @ old) * old
    expected = old + delta
    expected *= min(1.0, np.linalg.norm(old) / np.linalg.norm(expected))
    np.testing.assert_allclose(model.weight.detach().numpy().ravel(), expected, rtol=1e-12)


def test_l2_true_decoupled_options():
    model = TwoTasks()
    opt = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.5),
        method="sum",
        l2=True,
        l2_decoupled=True,
        l2_params=[model.w],
    )
    before = float((model.w.detach() ** 2).sum())
    for _ in range(5):
        opt.zero_grad()
        info = opt.backward(model())
        assert info.l2_coefficient is None
        opt.step()
        now = float((model.w.detach() ** 2).sum())
        assert now <= before * (1 + 1e-12)
        before = now


# -- options, errors, checkpoints --------------------------------------------------------------------------


def test_bad_input_raises_and_changes_nothing():
    model = LinearModel()
    sgd = lambda: torch.optim.SGD(model.parameters(), lr=0.1)  # noqa: E731
    opt = GradSurgery(sgd(), method="l2")
    with pytest.raises(ValueError, match="one loss"):
        opt.backward([model(), model()])
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(TypeError, match="params=, per_tensor=, decoupled="):
        GradSurgery(sgd(), method="l2", l2=True)
    with pytest.raises(TypeError, match="l2_per_tensor given without l2=True"):
        GradSurgery(sgd(), method="mgda", l2_per_tensor=True)
    with pytest.raises(ValueError, match="does not hold"):
        GradSurgery(sgd(), method="mgda", l2=True, l2_params=[torch.nn.Parameter(torch.ones(2, 2))])
    with pytest.raises(ValueError, match="does not hold"):
        GradSurgery(sgd(), method="l2", params=[torch.nn.Parameter(torch.ones(5, 5))])
    with pytest.raises(TypeError, match="per_tensor must be a bool"):
        GradSurgery(sgd(), method="l2", per_tensor="yes")
    with pytest.raises(TypeError, match="l2 must be a bool"):
        GradSurgery(sgd(), method="mgda", l2="yes")
    with pytest.raises(ValueError, match="empty"):
        GradSurgery(sgd(), method="l2", params=[])
    with pytest.raises(TypeError, match="tensors only"):
        GradSurgery(sgd(), method="l2", params=[1.0])


def test_state_dict_holds_no_tensors_from_params():
    model = LinearModel()
    make = lambda: GradSurgery(  # noqa: E731
        torch.optim.SGD(model.parameters(), lr=0.1), method="l2", params=[model.w1], per_tensor=True
    )
    opt = make()
    opt.backward(model())
    opt.step()
    sd = opt.state_dict()
    assert sd["gradsurgery"]["options"] == {
        "per_tensor": True,
        "decoupled": True,
        "evidence": False,
        "num_samples": None,
    }
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    opt2 = make()
    opt2.load_state_dict(loaded)
    assert "params=<1 tensors>" in repr(opt2)


@pytest.mark.parametrize(
    "make_optimizer,per_tensor",
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), False),
        (lambda ps: torch.optim.Adam(ps, lr=0.1), True),
        (lambda ps: torch.optim.RMSprop(ps, lr=0.1), True),
        (lambda ps: MultiOptimizer(torch.optim.SGD(ps[:1], lr=0.1), torch.optim.Adam(ps[1:], lr=0.1)), True),
    ],
)
def test_defaults_follow_the_optimizer(make_optimizer, per_tensor):
    """Decoupled by default; per tensor for adaptive optimizers, one global rule for SGD (the benchmarks'
    evidence, docs/howto/l2-without-lambda.md). Explicit options win."""
    model = LinearModel()
    for opt in (
        GradSurgery(make_optimizer(list(model.parameters())), method="l2"),
        GradSurgery(make_optimizer(list(model.parameters())), method="mgda", l2=True),
    ):
        assert opt.l2.decoupled and opt.l2.per_tensor is per_tensor
    explicit = GradSurgery(make_optimizer(list(model.parameters())), method="l2", per_tensor=not per_tensor)
    assert explicit.l2.per_tensor is (not per_tensor)
    assert explicit.method.options["per_tensor"] is (not per_tensor)
    assert GradSurgery(make_optimizer(list(model.parameters())), method="l2").method.options == {
        "per_tensor": None,
        "decoupled": True,
        "evidence": False,
        "num_samples": None,
    }


def test_a_rule_that_was_not_set_up_says_so():
    theta = torch.ones(2, 2)
    with pytest.raises(RuntimeError, match="setup"):
        L2Rule(decoupled=False).apply([(theta, -torch.ones(2, 2))])
    with pytest.raises(RuntimeError, match="setup"):
        L2Rule().after_step([(theta, theta.clone())])
    assert (
        L2Rule(per_tensor=False, decoupled=False).apply([(theta, -torch.ones(2, 2))])[1]["l2_coefficient"]
        == 1.0
    )
