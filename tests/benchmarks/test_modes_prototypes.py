"""The maths of the λ-free mode prototypes (``benchmarks/modes_prototypes.py``) against independent
references: loops, explicit formulas, brute force. No accuracy thresholds."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location(
        "modes_prototypes", ROOT / "benchmarks" / "modes_prototypes.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


P = _load()


def test_forward_correction_gradient_is_p_minus_the_noisy_posterior():
    """d/dz −log Σ_y softmax(z)_y T[y, ỹ] = softmax(z) − q, q ∝ softmax(z)·T[:, ỹ]: forward correction and
    the posterior-target CE take the same step (the reason the benchmark's two rows coincide)."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.softmax(torch.randn(4, 4, generator=gen, dtype=torch.float64), 1)
    noisy = torch.randint(0, 4, (7,), generator=gen)
    (grad,) = torch.autograd.grad(P.forward_corrected_nll(logits, noisy, t).sum(), logits)
    p = torch.softmax(logits.detach(), 1)
    q = p * t[:, noisy].T
    q = q / q.sum(1, keepdim=True)
    torch.testing.assert_close(P.noisy_posterior(logits, noisy, t), q)
    torch.testing.assert_close(grad, p - q)


def test_keep_rate_and_small_loss_mask():
    rate, c = 0.6, 10
    eye = torch.eye(c, dtype=torch.float64)
    t = (1 - rate) * eye + rate / (c - 1) * (1 - eye)
    assert P.transition_keep_rate(t) == pytest.approx(0.4)
    assert P.transition_keep_rate(t, torch.arange(1.0, c + 1)) == pytest.approx(0.4)
    losses = torch.tensor([3.0, 0.1, 2.0, 0.5, 9.0])
    assert P.small_loss_mask(losses, 0.4).tolist() == [False, True, False, True, False]
    assert P.small_loss_mask(losses, 0.0).sum() == 1  # at least one sample


def test_clean_set_correction_holds_the_trusted_set_out_until_the_estimate():
    gen = torch.Generator().manual_seed(3)
    xc, yc = torch.randn(12, 3, generator=gen), torch.arange(12) % 3
    model = torch.nn.Linear(3, 3)
    mode = P.CleanSetCorrection(xc, yc, 3, warmup=2)
    ln, yn = torch.randn(5, 3, generator=gen), torch.randint(0, 3, (5,), generator=gen)
    lc = torch.randn(4, 3, generator=gen)
    torch.testing.assert_close(mode.loss(ln, yn, lc, yc[:4]), F.cross_entropy(ln, yn))
    mode.end_epoch(0, model)
    assert mode.warming_up
    mode.end_epoch(1, model)
    with torch.no_grad():
        ref = P.estimate_transition(torch.softmax(model(xc), 1), yc, 3)
    torch.testing.assert_close(mode.transition, ref)
    expected = P.forward_corrected_nll(ln, yn, ref).mean() + F.cross_entropy(lc, yc[:4])
    torch.testing.assert_close(mode.loss(ln, yn, lc, yc[:4]), expected)


def _vecs(seed, shapes):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


@pytest.mark.parametrize("per_tensor", [False, True])
def test_minnorm_alpha_is_the_brute_force_minimum(per_tensor):
    shapes = [(3, 4), (5,), (2, 2)]
    g, th = _vecs(4, shapes), _vecs(5, shapes)
    g = [0.3 * x for x in g]
    alphas = P.l2_minnorm_alphas(g, th, per_tensor)
    groups = [[k] for k in range(3)] if per_tensor else [[0, 1, 2]]
    grid = np.linspace(0, 1, 100_001)
    for a, group in zip(alphas, groups, strict=True):
        gv = np.concatenate([g[k].reshape(-1).numpy() for k in group])
        tv = np.concatenate([th[k].reshape(-1).numpy() for k in group])
        norms = [np.linalg.norm(x * gv + (1 - x) * tv) for x in grid]
        assert a == pytest.approx(grid[int(np.argmin(norms))], abs=2e-5)
    u, _ = P.l2_minnorm_direction(g, th, per_tensor)
    for a, group in zip(alphas, groups, strict=True):
        for k in group:
            torch.testing.assert_close(u[k], a * g[k] + (1 - a) * th[k])


@pytest.mark.parametrize("per_tensor", [False, True])
def test_heldout_radial_direction_swaps_the_radial_component(per_tensor):
    shapes = [(3, 4), (6,)]
    g, th, v = _vecs(6, shapes), _vecs(7, shapes), _vecs(8, shapes)
    u = P.heldout_radial_direction(g, th, v, per_tensor)
    groups = [[0], [1]] if per_tensor else [[0, 1]]
    for group in groups:
        cat = lambda xs, group=group: torch.cat([xs[k].reshape(-1) for k in group])  # noqa: E731
        t_hat = cat(th) / cat(th).norm()
        tangential = lambda x, t_hat=t_hat: x - (x @ t_hat) * t_hat  # noqa: E731
        torch.testing.assert_close(tangential(cat(u)), tangential(cat(g)))
        torch.testing.assert_close(cat(u) @ t_hat, cat(v) @ t_hat)


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_decoupled_heldout_radial_keeps_the_length_and_takes_the_sign(per_tensor, sign):
    shapes = [(3, 4), (6,)]
    olds, delta = _vecs(9, shapes), [0.1 * d for d in _vecs(10, shapes)]
    news = [o + d for o, d in zip(olds, delta, strict=True)]
    v = [sign * o for o in olds]  # ⟨v, θ⟩ has the sign of `sign` in every group
    P.decoupled_heldout_radial(news, olds, v, per_tensor)
    groups = [[0], [1]] if per_tensor else [[0, 1]]
    for group in groups:
        cat = lambda xs, group=group: torch.cat([xs[k].reshape(-1) for k in group])  # noqa: E731
        t_hat = cat(olds) / cat(olds).norm()
        step, d = cat(news) - cat(olds), cat(delta)
        torch.testing.assert_close(step - (step @ t_hat) * t_hat, d - (d @ t_hat) * t_hat)
        torch.testing.assert_close(step @ t_hat, -sign * abs(d @ t_hat))


@pytest.mark.parametrize("per_tensor", [False, True])
def test_decoupled_minnorm_shrink_is_todays_correction_then_a_decay(per_tensor):
    from gradsurgery.l2 import decoupled_correction

    shapes = [(3, 4), (6,)]
    olds, delta = _vecs(11, shapes), [0.2 * d for d in _vecs(12, shapes)]
    news = [o + d for o, d in zip(olds, delta, strict=True)]
    ref = [n.clone() for n in news]
    alphas = P.l2_minnorm_alphas([-d for d in delta], olds, per_tensor)
    lams = P.decoupled_minnorm_shrink(news, olds, per_tensor)
    decoupled_correction(ref, olds, per_tensor)
    groups = [[0], [1]] if per_tensor else [[0, 1]]
    for a, lam, group in zip(alphas, lams, groups, strict=True):
        assert lam == pytest.approx(min((1 - a) / a, 1.0) if a > 0 else 1.0)
        for k in group:
            torch.testing.assert_close(news[k], ref[k] - lam * olds[k])


def test_balanced_coefficients_formula():
    g, th = _vecs(13, [(4,)]), _vecs(14, [(4,)])
    (lam,) = P.l2_balanced_coefficients(g, th)
    dot, sq = float(g[0] @ th[0]), float(th[0] @ th[0])
    assert lam == pytest.approx(max(max(-dot, 0) / sq, float(g[0].norm() / th[0].norm())))


def _tiny_net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(3 * 16, 4)
    ).double()


def test_per_sample_grads_match_one_backward_per_sample():
    net = _tiny_net(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=gen)
    weights = [net[0].weight, net[3].weight]
    per = P.per_sample_grads(net, weights, x, y)
    for i in range(6):
        ref = torch.autograd.grad(F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]), weights)
        for g, r in zip(per, ref, strict=True):
            torch.testing.assert_close(g[i], r)
    for sq, g in zip(P.per_sample_sq_grads(net, weights, x, y), per, strict=True):
        torch.testing.assert_close(sq, (g**2).mean(0))


@pytest.mark.parametrize("per_tensor", [False, True])
def test_spectral_evidence_uses_the_fisher_spectrum(per_tensor):
    """The N×N Gram's eigenvalues are the D×D empirical Fisher's nonzero ones: γ from the Fisher itself."""
    net = _tiny_net(2)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 1, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (9,), generator=gen)
    weights = [net[0].weight, net[3].weight]
    lams = P.evidence_lambdas_spectral(net, weights, x, y, per_tensor, chunk=4)
    rows = [torch.autograd.grad(F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]), weights) for i in range(9)]
    groups = [[0], [1]] if per_tensor else [[0, 1]]
    for lam, group in zip(lams, groups, strict=True):
        g = torch.stack([torch.cat([r[k].reshape(-1) for k in group]) for r in rows])
        fisher = torch.linalg.eigvalsh(g.T @ g / 9).clamp_min(0)
        sq = sum(float((weights[k].detach() ** 2).sum()) for k in group)
        assert lam * 9 * sq == pytest.approx(float((fisher / (fisher + lam)).sum()), rel=1e-7)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_ggn_evidence_uses_the_gauss_newton_spectrum(per_tensor):
    """γ from the (N·C)×(N·C) Gram matrix equals γ from the D×D matrix (1/N) Σ J_nᵀ (diag p − p pᵀ) J_n,
    J_n taken by one backward pass per output."""
    net = _tiny_net(7)
    x = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    weights = [net[0].weight, net[3].weight]
    lams = P.evidence_lambdas_ggn(net, weights, x, per_tensor, chunk=2)
    groups = [[0], [1]] if per_tensor else [[0, 1]]
    for lam, group in zip(lams, groups, strict=True):
        size = sum(weights[k].numel() for k in group)
        ggn = torch.zeros(size, size, dtype=torch.float64)
        for i in range(5):
            out = net(x[i : i + 1]).squeeze(0)
            jac = torch.stack(
                [
                    torch.cat(
                        [
                            g.reshape(-1)
                            for g in torch.autograd.grad(
                                out[c], [weights[k] for k in group], retain_graph=True
                            )
                        ]
                    )
                    for c in range(4)
                ]
            )
            p = torch.softmax(out.detach(), 0)
            ggn += jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac / 5
        curv = torch.linalg.eigvalsh(ggn).clamp_min(0)
        sq = sum(float((weights[k].detach() ** 2).sum()) for k in group)
        assert lam * 5 * sq == pytest.approx(float((curv / (curv + lam)).sum()), rel=1e-5)


def test_kronecker_factors_are_the_input_and_output_gradient_moments():
    """One step, no averaging yet: A = mean of a aᵀ over inputs (pixels of a 1×1 convolution), S = mean of
    δ δᵀ with δ the per-sample gradient at the outputs; γ from the eigenvalues of |T|·A ⊗ S."""
    torch.manual_seed(4)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(3 * 9, 4)
    ).double()
    weights = [net[0].weight, net[3].weight]
    kron = P.KroneckerEvidence(net, weights, num_samples=50, per_tensor=True)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 2, 3, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (5,), generator=gen)
    hidden = net[0](x)
    hidden.retain_grad()
    logits = net[3](net[2](net[1](hidden)))
    logits.retain_grad()
    F.cross_entropy(logits, y).backward()
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 2)
    torch.testing.assert_close(kron.a[0], pixels.T @ pixels / 45)
    deltas = 5 * hidden.grad.permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(kron.s[0], deltas.T @ deltas / 45)
    inputs = net[2](net[1](hidden)).detach()
    torch.testing.assert_close(kron.a[1], inputs.T @ inputs / 5)
    torch.testing.assert_close(kron.s[1], (5 * logits.grad).T @ (5 * logits.grad) / 5)
    lams = kron.lambdas(weights)
    for k, lam in enumerate(lams):
        curv = torch.linalg.eigvalsh(kron.positions[k] * torch.kron(kron.a[k], kron.s[k])).clamp_min(0)
        sq = float((weights[k].detach() ** 2).sum())
        assert lam * 50 * sq == pytest.approx(float((curv / (curv + lam)).sum()), rel=1e-7)
    kron.remove()


def test_hard_digits_are_seeded_and_standardised():
    spec = importlib.util.spec_from_file_location("_hard_digits", ROOT / "benchmarks" / "_hard_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    x, y, xt, yt = module.hard_digits(3, n_train=300, n_test=100)
    assert x.shape == (300, 1, 16, 16) and xt.shape == (100, 1, 16, 16)
    assert y.shape == (300,) and int(y.min()) >= 0 and int(y.max()) <= 9
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-4
    x2, y2, _, _ = module.hard_digits(3, n_train=300, n_test=100)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, module.hard_digits(4, n_train=300, n_test=100)[0])


@pytest.mark.parametrize("per_tensor", [False, True])
def test_hypergradient_step_follows_the_held_out_loss_derivative_in_lambda(per_tensor):
    # Reference: the finite-difference derivative of L_v(θ − η(g + λθ)) in λ for a small step η, which tends
    # to −η⟨∇L_v(θ), θ⟩; the rule moves log λ by rate·⟨v, θ⟩/(‖v‖‖θ‖) per group.
    gen = torch.Generator().manual_seed(3)
    thetas = [torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen).double()]
    grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in thetas]
    centers = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in thetas]
    scales = [torch.rand(t.shape, generator=gen, dtype=torch.float64) + 0.5 for t in thetas]

    def heldout_loss(params):
        return sum((s * (p - c) ** 2).sum() for p, c, s in zip(params, centers, scales, strict=True))

    heldout = [2 * s * (t - c) for t, c, s in zip(thetas, centers, scales, strict=True)]  # ∇L_v(θ)
    rule = P.HypergradientL2(2 if per_tensor else 1, lam0=0.01, rate=0.1)
    before = list(rule.log_lams)
    rule.update(heldout, thetas, per_tensor)
    groups = [[0], [1]] if per_tensor else [[0, 1]]
    eta, lam, h = 1e-6, 0.01, 1e-3
    for n, group in enumerate(groups):

        def after_step(lam_g, group=group):
            return heldout_loss(
                [
                    t - eta * (g + lam_g * t) if k in group else t
                    for k, (t, g) in enumerate(zip(thetas, grads, strict=True))
                ]
            )

        dlam = float(after_step(lam + h) - after_step(lam - h)) / (2 * h)
        vt = -dlam / eta  # ⟨∇L_v, θ⟩ over the group, to O(η)
        norm = math.sqrt(
            sum(float((heldout[k] ** 2).sum()) for k in group)
            * sum(float((thetas[k] ** 2).sum()) for k in group)
        )
        assert rule.log_lams[n] - before[n] == pytest.approx(0.1 * vt / norm, rel=1e-4)
    assert rule.lambdas() == pytest.approx([math.exp(v) for v in rule.log_lams])


def test_decoupled_log_product_brings_the_product_of_norms_back_and_keeps_directions():
    gen = torch.Generator().manual_seed(7)
    olds = [torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randn(3, 5, generator=gen).double()]
    grown = [olds[0] * 1.5, olds[1] * 0.9 + 0.01]  # the product of the norms grows
    news = [t.clone() for t in grown]

    def product(ts):
        return float(torch.prod(torch.stack([t.norm() for t in ts])))

    assert product(grown) > product(olds)
    c = P.decoupled_log_product(news, olds)
    assert abs(product(news) - product(olds)) < 1e-12 * product(olds)
    # one factor for every tensor: c^L = ∏‖W_old‖ / ∏‖W_grown‖
    assert abs(c**2 - product(olds) / product(grown)) < 1e-12
    for new, before in zip(news, grown, strict=True):
        torch.testing.assert_close(new, c * before, rtol=1e-15, atol=0)
    # a step that shrinks the product is left alone
    shrunk = [olds[0] * 0.5, olds[1] * 1.2]
    kept = [t.clone() for t in shrunk]
    assert P.decoupled_log_product(kept, olds) == 1.0
    assert all(torch.equal(a, b) for a, b in zip(kept, shrunk, strict=True))
