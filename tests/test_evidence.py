"""The evidence λ (gradsurgery/evidence.py, ``method="l2", evidence=True``) against independent references:
the fixed point against a closed form and scipy's root finder, the Kronecker factors against per-sample
gradients taken one sample at a time (and convolution patches built by loops), the step against a numpy
loop over the full Kronecker product's spectrum."""

from __future__ import annotations

import copy
import gc
import io
import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from torch import nn
from torch.nn import functional as F

from gradsurgery import GradSurgery
from gradsurgery.evidence import EvidenceRule, evidence_lambda
from gradsurgery.sources import NonFiniteError

N_TRAIN = 500
BETA, EVERY = 0.95, 10


def ref_lambda(curvatures: np.ndarray, sq_norm: float, num_samples: int) -> float:
    """The root of N‖θ‖²λ − Σ f/(f + λ) by scipy's Brent method."""
    f = curvatures[curvatures > 0]
    return brentq(
        lambda lam: num_samples * sq_norm * lam - np.sum(f / (f + lam)), 1e-300, f.size, xtol=1e-300
    )


# -- the fixed point ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("f,count", [(1e-3, 10), (0.5, 1), (40.0, 300), (1e-40, 7), (1e30, 3)])
@pytest.mark.parametrize("sq_norm", [0.1, 25.0])
def test_equal_curvatures_have_a_closed_form(f, count, sq_norm):
    """With n equal curvatures f: N s λ (f + λ) = n f, so λ = 2nf/(Ns) / (f + √(f² + 4nf/(Ns))) (the root
    written without cancellation)."""
    n_s = N_TRAIN * sq_norm
    expected = 2 * count * f / n_s / (f + math.sqrt(f * f + 4 * count * f / n_s))
    got = evidence_lambda(torch.full((count,), f, dtype=torch.float64), sq_norm, N_TRAIN)
    assert got == pytest.approx(expected, rel=1e-11)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("log_range", [(-14, 5), (-60, 25)])
def test_random_spectra_match_a_root_finder(seed, log_range):
    rng = np.random.default_rng(seed)
    curvatures = np.exp(rng.uniform(*log_range, size=rng.integers(1, 400)))
    curvatures[rng.random(curvatures.size) < 0.3] = 0.0  # directions the data does not determine
    curvatures[0] = max(curvatures[0], 1e-3)
    sq_norm = float(rng.uniform(0.5, 50))
    got = evidence_lambda(torch.from_numpy(curvatures), sq_norm, 1000)
    assert got == pytest.approx(ref_lambda(curvatures, sq_norm, 1000), rel=1e-11)


def test_nothing_to_regularize_gives_zero():
    assert evidence_lambda(torch.ones(5, dtype=torch.float64), 0.0, 10) == 0.0
    assert evidence_lambda(torch.zeros(5, dtype=torch.float64), 3.0, 10) == 0.0
    assert evidence_lambda(torch.zeros(0, dtype=torch.float64), 3.0, 10) == 0.0


# -- the Kronecker factors ----------------------------------------------------------------------------------


class Capture:
    """A forward hook keeping a layer's last input and output (and returning None: the output stays)."""

    def __init__(self, layer: nn.Module) -> None:
        self.handle = layer.register_forward_hook(self)

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.input, self.output = inputs[0].detach(), output


def per_sample_output_grads(model, layer, x, y, loss_fn):
    """s_i = ∂ℓ_i/∂(layer output of sample i), each from a forward and backward pass of sample i alone."""
    grads = []
    capture = Capture(layer)
    for i in range(x.shape[0]):
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1])
        (g,) = torch.autograd.grad(loss, capture.output)
        grads.append(g[0].double())
    capture.handle.remove()
    return grads


def layer_inputs(model, layer, x):
    capture = Capture(layer)
    with torch.no_grad():
        model(x)
    capture.handle.remove()
    return capture.input.double()


def conv_patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """(batch·positions, c_in·k·k) rows by loops over the zero-padded image, channel-major as unfold's."""
    (kh, kw), (ph, pw), (sh, sw) = conv.kernel_size, conv.padding, conv.stride
    padded = F.pad(x, (pw, pw, ph, ph))
    rows = []
    for n in range(x.shape[0]):
        for i in range(0, padded.shape[2] - kh + 1, sh):
            for j in range(0, padded.shape[3] - kw + 1, sw):
                rows.append(padded[n, :, i : i + kh, j : j + kw].reshape(-1))
    return torch.stack(rows)


def mean_outer(rows):
    rows = torch.stack(list(rows))
    return rows.T @ rows / rows.shape[0]


def evidence_opt(model, lr=0.1, **options):
    options = {"evidence": True, "layers": model, "num_samples": N_TRAIN, **options}
    return GradSurgery(torch.optim.SGD(model.parameters(), lr=lr), "l2", **options)


def one_step(model, x, y, loss_fn):
    opt = evidence_opt(model, lr=0.0)
    opt.zero_grad()
    info = opt.backward(loss_fn(model(x), y))
    return opt, info


#: The factors' tolerance against float64 references, relative to the largest entry (a float32 sum of
#: products rounds relative to the sum of their magnitudes): a float32 layer's factors are float32 (float64
#: for a float64 layer).
FACTOR_TOL = {torch.float32: 1e-6, torch.float64: 1e-13}


def assert_factor(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype
    scale = float(expected.abs().max())
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=FACTOR_TOL[dtype] * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factors_of_linear_layers_match_per_sample_gradients(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)
    x, y = torch.randn(6, 5, dtype=dtype), torch.randint(0, 3, (6,))
    opt, _ = one_step(model, x, y, F.cross_entropy)
    factors = opt.l2.factors
    for k, layer in enumerate([model[0], model[2]]):
        a = mean_outer(layer_inputs(model, layer, x))
        s = mean_outer(per_sample_output_grads(model, layer, x, y, F.cross_entropy))
        assert_factor(factors.a[k], a, dtype)
        assert_factor(factors.s[k], s, dtype)
        assert factors.rows[k] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factors_of_a_convolution_match_patches_and_per_sample_gradients(dtype):
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)).to(dtype)
    x, y = torch.randn(4, 2, 5, 5, dtype=dtype), torch.randint(0, 4, (4,))
    opt, _ = one_step(model, x, y, F.cross_entropy)
    factors = opt.l2.factors
    a = mean_outer(conv_patches(layer_inputs(model, conv, x), conv))
    per_sample = per_sample_output_grads(model, conv, x, y, F.cross_entropy)  # each (c_out, 3, 3)
    s = mean_outer(g.permute(1, 2, 0).reshape(-1, 3)[p] for g in per_sample for p in range(9))
    assert_factor(factors.a[0], a, dtype)
    assert_factor(factors.s[0], s, dtype)
    assert factors.rows[0] == 9  # output positions per sample


def conv1d_patches(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """(batch·positions, c_in·k) rows by loops over the zero-padded signal, channel-major as unfold's."""
    (k,), (p,), (stride,), (dilation,) = conv.kernel_size, conv.padding, conv.stride, conv.dilation
    padded = F.pad(x, (p, p))
    span = dilation * (k - 1) + 1
    return torch.stack(
        [
            padded[n, :, i : i + span : dilation].reshape(-1)
            for n in range(x.shape[0])
            for i in range(0, padded.shape[2] - span + 1, stride)
        ]
    )


def test_factors_of_a_1d_convolution_match_patches_and_per_sample_gradients():
    torch.manual_seed(5)
    conv = nn.Conv1d(2, 3, 3, padding=2, stride=2, dilation=2)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4, 4))
    x, y = torch.randn(5, 2, 8, dtype=torch.float64), torch.randint(0, 4, (5,))
    model = model.double()
    opt, _ = one_step(model, x, y, F.cross_entropy)
    factors = opt.l2.factors
    a = mean_outer(conv1d_patches(layer_inputs(model, conv, x), conv))
    per_sample = per_sample_output_grads(model, conv, x, y, F.cross_entropy)  # each (c_out, 4)
    s = mean_outer(g.T[p] for g in per_sample for p in range(4))
    assert_factor(factors.a[0], a, torch.float64)
    assert_factor(factors.s[0], s, torch.float64)
    assert factors.rows[0] == 4


def test_a_layer_applied_twice_pools_its_rows():
    """A convolution applied to two images of each sample, 4×4 and 6×6: A and S the means over the rows of
    both applications (patches by loops, per-sample gradients at each application's output), t the
    positions of both."""
    torch.manual_seed(6)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    head = nn.Linear(3 * (16 + 36), 4).double()

    class TwoViews(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = conv, head
            self.outputs: list[torch.Tensor] = []

        def forward(self, views: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            self.outputs = [self.conv(v) for v in views]
            return self.head(torch.cat([torch.tanh(o).flatten(1) for o in self.outputs], 1))

    model = TwoViews()
    small, large = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (3,))
    opt, _ = one_step(model, (small, large), y, F.cross_entropy)
    factors = opt.l2.factors
    rows = torch.cat([conv_patches(small, conv), conv_patches(large, conv)])
    deltas = []
    for i in range(3):  # per sample, the gradient at each application's output
        loss = F.cross_entropy(model((small[i : i + 1], large[i : i + 1])), y[i : i + 1])
        for g in torch.autograd.grad(loss, model.outputs):
            deltas.append(g[0].permute(1, 2, 0).reshape(-1, 3))
    assert_factor(factors.a[0], mean_outer(rows), torch.float64)
    assert_factor(factors.s[0], mean_outer(torch.cat(deltas)), torch.float64)
    assert factors.rows[0] == 16 + 36


@pytest.mark.parametrize("per_layer", [True, False])
def test_a_layer_applied_twice_trains_as_one_applied_to_sequences(per_layer):
    """A linear layer applied to each of two inputs of a sample, and the same layer applied once to the
    (batch, 2, features) sequence of them: the same function, the same factors, λ and steps."""

    class Shared(nn.Module):
        def __init__(self, sequence: bool) -> None:
            super().__init__()
            torch.manual_seed(7)
            self.layer, self.head, self.sequence = nn.Linear(3, 5), nn.Linear(5, 4), sequence

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.sequence:
                return self.head(torch.tanh(self.layer(x)).sum(1))
            return self.head(torch.tanh(self.layer(x[:, 0])) + torch.tanh(self.layer(x[:, 1])))

    shared, sequence = Shared(False).double(), Shared(True).double()
    opts = [evidence_opt(m, lr=0.2, per_tensor=per_layer) for m in (shared, sequence)]
    for step in range(12):
        gen = torch.Generator().manual_seed(300 + step)
        x, y = (
            torch.randn(8, 2, 3, generator=gen, dtype=torch.float64),
            torch.randint(0, 4, (8,), generator=gen),
        )
        lams = []
        for model, opt in zip((shared, sequence), opts, strict=True):
            opt.zero_grad()
            lams.append(opt.backward(F.cross_entropy(model(x), y)).l2_coefficient)
            opt.step()
        torch.testing.assert_close(lams[0], lams[1], rtol=1e-12, atol=0)
    assert opts[0].l2.factors.rows == opts[1].l2.factors.rows == [2, 1]
    for p, q in zip(shared.parameters(), sequence.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_factors_of_a_linear_layer_on_sequences_count_positions():
    torch.manual_seed(2)
    layer = nn.Linear(4, 2)
    model = nn.Sequential(layer, nn.Tanh())
    x, y = torch.randn(3, 5, 4), torch.randn(3, 5, 2)

    def loss_fn(out, target):  # the mean over the batch of per-sample sums over positions
        return (out - target).pow(2).sum(dim=(1, 2)).mean()

    opt, _ = one_step(model, x, y, loss_fn)
    factors = opt.l2.factors
    per_sample = per_sample_output_grads(model, layer, x, y, loss_fn)  # each (5, 2)
    assert_factor(factors.a[0], mean_outer(x.double().reshape(-1, 4)), torch.float32)
    assert_factor(factors.s[0], mean_outer(torch.cat(per_sample)), torch.float32)
    assert factors.rows[0] == 5


@pytest.mark.parametrize("conv,shape,positions", [(nn.Conv2d, (2, 4, 4), 16), (nn.Conv1d, (2, 5), 5)])
def test_an_unbatched_input_is_a_batch_of_one(conv, shape, positions):
    """nn.Linear on (features,) and a convolution on (channels, *spatial): the factors of the same sample
    given as a batch of one."""
    torch.manual_seed(4)
    model = nn.Sequential(conv(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(0), nn.Linear(3 * positions, 5))
    x, y = torch.randn(*shape), torch.tensor(3)
    unbatched, _ = one_step(model, x, y, F.cross_entropy)
    factors = copy.deepcopy(unbatched.l2.factors)
    unbatched.l2.remove_hooks()
    model[2] = nn.Flatten(1)
    batched, _ = one_step(model, x.unsqueeze(0), y.unsqueeze(0), F.cross_entropy)
    for k in range(2):
        torch.testing.assert_close(factors.a[k], batched.l2.factors.a[k], rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(factors.s[k], batched.l2.factors.s[k], rtol=1e-6, atol=1e-10)
        assert factors.rows[k] == batched.l2.factors.rows[k] == (positions if k == 0 else 1)


@pytest.mark.parametrize("backward_inside", [False, True])
def test_factors_under_autocast_are_float32_products_of_what_the_layers_saw(backward_inside):
    """Under bfloat16 autocast the layers see bfloat16 inputs (after the first) and output gradients; the
    factors are their float32 second moments (a product taken under autocast would be bfloat16), with the
    backward called outside the autocast region or inside it."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    opt = evidence_opt(model)
    captures = [Capture(model[0]), Capture(model[3])]
    x, y = torch.randn(6, 1, 6, 6), torch.randint(0, 5, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
        for c in captures:
            c.output.register_hook(lambda g, c=c: setattr(c, "grad", g))
        if backward_inside:
            opt.backward(loss)
    if not backward_inside:
        opt.backward(loss)
    factors = opt.l2.factors
    conv_rows = conv_patches(captures[0].input.double(), model[0])
    conv_deltas = captures[0].grad.double().permute(0, 2, 3, 1).reshape(-1, 4) * 6
    linear_deltas = captures[1].grad.double() * 6
    assert captures[1].input.dtype == torch.bfloat16 and captures[1].grad.dtype == torch.bfloat16
    for got, rows in [
        (factors.a[0], conv_rows),
        (factors.s[0], conv_deltas),
        (factors.a[1], captures[1].input.double()),
        (factors.s[1], linear_deltas),
    ]:
        assert_factor(got, mean_outer(rows), torch.float32)


# -- the rule in training, against a numpy loop -------------------------------------------------------------


def small_net(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(dtype)


def batch(step: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 6, generator=gen).to(dtype), torch.randint(0, 4, (16,), generator=gen)


def reference_run(steps: int, per_layer: bool, dtype: torch.dtype, lr: float = 0.2, max_age: int = 100):
    """The evidence rule written out: factors by hand from per-layer inputs and B·∂L/∂out, their
    exponential averages, F's spectrum from the full Kronecker product (taken again at a solve once it is
    min(``max_age``, its step) steps old, and scaled to sum to the current tr A · tr S), λ by a root finder
    with the weights' current norms, SGD on g + λθ. Returns the parameters after each step and the λ of
    each step."""
    model = small_net(dtype=dtype)
    layers = [model[0], model[2]]
    avg_a, avg_s = [None, None], [None, None]
    lambdas, history = None, []
    spectra, taken = None, 0
    for step in range(steps):
        x, y = batch(step, dtype)
        captures = [Capture(layer) for layer in layers]
        loss = F.cross_entropy(model(x), y)
        for c in captures:
            c.handle.remove()
        grads = torch.autograd.grad(loss, [captures[0].output, captures[1].output, *model.parameters()])
        for k in range(2):
            a_rows = captures[k].input.double().numpy()
            d_rows = grads[k].double().numpy() * x.shape[0]
            a, s = a_rows.T @ a_rows / len(a_rows), d_rows.T @ d_rows / len(d_rows)
            avg_a[k] = a if avg_a[k] is None else BETA * avg_a[k] + (1 - BETA) * a
            avg_s[k] = s if avg_s[k] is None else BETA * avg_s[k] + (1 - BETA) * s
        if lambdas is None or (step + 1) % EVERY == 0:
            if step + 1 - taken >= min(max_age, taken):
                spectra = [
                    np.clip(np.linalg.eigvalsh(np.kron(avg_a[k], avg_s[k])), 0, None) for k in range(2)
                ]
                taken = step + 1
            norms = [float((layer.weight.detach().double() ** 2).sum()) for layer in layers]
            scaled = [
                spectra[k] * np.trace(avg_a[k]) * np.trace(avg_s[k]) / spectra[k].sum() for k in range(2)
            ]
            if per_layer:
                lambdas = [ref_lambda(scaled[k], norms[k], N_TRAIN) for k in range(2)]
            else:
                lambdas = [ref_lambda(np.concatenate(scaled), sum(norms), N_TRAIN)]
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads[2:], strict=True):
                lam = 0.0
                if p is layers[0].weight or p is layers[1].weight:
                    lam = lambdas[(0 if p is layers[0].weight else 1) if per_layer else 0]
                p -= lr * (g + lam * p)
        history.append(([p.detach().clone() for p in model.parameters()], list(lambdas)))
    return history


@pytest.mark.parametrize(
    "dtype,lambda_rtol,param_rtol", [(torch.float32, 1e-5, 1e-5), (torch.float64, 1e-10, 1e-10)]
)
@pytest.mark.parametrize("per_layer", [True, False])
def test_training_steps_match_the_reference(per_layer, dtype, lambda_rtol, param_rtol):
    """float64 factors and the float64 reference agree to rounding; float32 factors (a float32 model) to
    float32's."""
    steps = 12  # λ solved at steps 1 and 10
    expected = reference_run(steps, per_layer, dtype)
    model = small_net(dtype=dtype)
    opt = evidence_opt(model, lr=0.2, per_tensor=per_layer)
    for step in range(steps):
        x, y = batch(step, dtype)
        opt.zero_grad()
        info = opt.backward(F.cross_entropy(model(x), y))
        opt.step()
        params, lambdas = expected[step]
        np.testing.assert_allclose(info.l2_coefficient.numpy(), lambdas, rtol=lambda_rtol)
        for p, q in zip(model.parameters(), params, strict=True):
            torch.testing.assert_close(p.detach(), q, rtol=param_rtol, atol=param_rtol * 1e-2)
    assert opt.l2.steps == steps and len(info.l2_coefficient) == (2 if per_layer else 1)


@pytest.mark.parametrize("max_age,per_layer", [(100, True), (30, True), (0, True), (100, False)])
def test_solves_between_eigendecompositions_read_the_last_spectra(max_age, per_layer):
    """265 steps (float64): with the default age the spectra are taken at steps 1, 10, 20, 40, 80, 160 and
    260 and λ is solved from them, scaled to the factors' traces and with the weights' norms of its own
    step, at every tenth step; max age 30: 1, 10, 20, 40, 70, 100, …; 0: at every solve."""
    steps = 265
    expected = reference_run(steps, per_layer, torch.float64, max_age=max_age)
    model = small_net(dtype=torch.float64)
    opt = evidence_opt(model, lr=0.2, per_tensor=per_layer)
    opt.l2.max_spectrum_age = max_age
    taken = []
    for step in range(steps):
        x, y = batch(step, torch.float64)
        opt.zero_grad()
        info = opt.backward(F.cross_entropy(model(x), y))
        opt.step()
        if opt.l2.spectra_step == step + 1:
            taken.append(step + 1)
        params, lambdas = expected[step]
        np.testing.assert_allclose(info.l2_coefficient.numpy(), lambdas, rtol=1e-10)
        for p, q in zip(model.parameters(), params, strict=True):
            torch.testing.assert_close(p.detach(), q, rtol=1e-10, atol=1e-12)
    solves = [1, *range(10, steps + 1, 10)]
    assert taken == {100: [1, 10, 20, 40, 80, 160, 260], 30: [1, 10, 20, 40, 70, *range(100, 261, 30)]}.get(
        max_age, solves
    )


def test_a_layer_first_reached_after_the_spectra_gets_its_own_at_the_next_solve():
    """A second head used from step 25 on: at the solve of step 30, where the others keep their spectra of
    step 20, it gets its own of step 30; at 40 all are taken again, and the solve of 50 reads those. Every
    λ from the spectra it read, scaled to the factors' traces of its step, and the weights' norms then."""
    torch.manual_seed(3)
    trunk, first, second = nn.Linear(6, 8), nn.Linear(8, 4), nn.Linear(8, 4)
    model = nn.ModuleList([trunk, first, second]).double()
    opt = evidence_opt(model, lr=0.1)
    rule = opt.l2
    taken = {}
    for step in range(1, 51):
        x, y = batch(step, torch.float64)
        hidden = torch.tanh(trunk(x))
        loss = F.cross_entropy(first(hidden), y)
        if step >= 25:
            loss = loss + F.cross_entropy(second(hidden), y)
        opt.zero_grad()
        info = opt.backward(loss)
        norms = [float((w.detach() ** 2).sum()) for w in rule.weights]  # as λ read them, before the step
        opt.step()
        if step % 10:
            continue
        taken[step] = [rule.factors.spectrum(k) for k in range(3)]
        if step <= 20:
            expected = [*taken[step][:2], None]
        elif step == 30:
            expected = [*taken[20][:2], taken[30][2]]
        else:
            expected = taken[40]
        for k in range(3):
            if expected[k] is None:
                assert rule.spectra[k] is None and info.l2_coefficient[k] == 0.0
                continue
            assert torch.equal(rule.spectra[k].a, expected[k].a)
            assert torch.equal(rule.spectra[k].s, expected[k].s)
            curvatures = expected[k].curvatures().numpy()
            a, s = (f[k].double() for f in (rule.factors.a, rule.factors.s))
            curvatures *= rule.factors.rows[k] * float(a.trace() * s.trace()) / curvatures.sum()
            assert info.l2_coefficient[k].item() == pytest.approx(
                ref_lambda(curvatures, norms[k], N_TRAIN), rel=1e-10
            )
    assert not torch.equal(rule.factors.spectrum(0).a, taken[40][0].a)  # the factors moved on since


@pytest.mark.parametrize("maximize", [False, True])
def test_the_penalty_is_what_sgd_weight_decay_adds(maximize):
    """u = g + λθ on the layers' weights only: with λ known (solved at the first step, kept until the tenth),
    five steps of SGD with momentum are those of SGD(weight_decay=λ, momentum) on the same weights. With
    ``maximize=True`` (on the negated loss) the penalty still shrinks θ, as torch's weight decay does."""
    model = small_net(3)
    twin = copy.deepcopy(model)
    sign = -1.0 if maximize else 1.0
    opt = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, maximize=maximize),
        "l2",
        evidence=True,
        layers=model,
        num_samples=N_TRAIN,
    )
    lam = train(opt, model, 1, sign=sign).tolist()
    groups = [
        {"params": [twin[0].weight], "weight_decay": lam[0]},
        {"params": [twin[2].weight], "weight_decay": lam[1]},
        {"params": [twin[0].bias, twin[2].bias], "weight_decay": 0.0},
    ]
    plain = torch.optim.SGD(groups, lr=0.1, momentum=0.9, maximize=maximize)
    for step in range(5):
        x, y = batch(step)
        plain.zero_grad()
        (sign * F.cross_entropy(twin(x), y)).backward()
        plain.step()
        if step:
            assert train(opt, model, 1, start=step, sign=sign).tolist() == lam
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)


# -- options, errors and what a failure leaves ---------------------------------------------------------------


def test_defaults_and_what_the_rule_regularizes():
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Embedding(3, 2), nn.Linear(8, 4))
    opt = evidence_opt(model)
    assert opt.method.per_tensor is True and opt.method.decoupled is False
    assert len(opt.l2.weights) == 2 and all(
        w is layer.weight for w, layer in zip(opt.l2.weights, [model[0], model[3]], strict=True)
    )
    assert opt.state_dict()["gradsurgery"]["options"] == {
        "per_tensor": True,
        "decoupled": False,
        "evidence": True,
        "num_samples": N_TRAIN,
    }
    assert "evidence=True, num_samples=500" in repr(opt)
    chosen = evidence_opt(model, params=[model[3].weight])
    assert chosen.l2.weights == [model[3].weight]


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"evidence": "yes"}, TypeError, "option evidence"),
        ({"layers": "model"}, TypeError, "needs layers="),
        ({"num_samples": None}, TypeError, "needs num_samples="),
        ({"num_samples": 2.5}, TypeError, "num_samples must be an int"),
        ({"num_samples": 0}, ValueError, "num_samples must be >= 1"),
        ({"decoupled": True}, ValueError, "drop decoupled=True"),
        ({"decoupled": "no"}, TypeError, "option decoupled"),
    ],
)
def test_bad_options_are_named(options, error, match):
    with pytest.raises(error, match=match):
        evidence_opt(small_net(), **options)


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"num_samples": 0}, ValueError, "num_samples must be >= 1"),
        ({"beta": 1.0}, ValueError, "beta"),
        ({"beta": "0.9"}, TypeError, "beta"),
        ({"every": 0}, ValueError, "every must be >= 1"),
        ({"max_spectrum_age": -1}, ValueError, "max_spectrum_age must be >= 0"),
        ({"max_spectrum_age": 2.5}, TypeError, "max_spectrum_age must be an int"),
    ],
)
def test_bad_rule_options_are_named(options, error, match):
    with pytest.raises(error, match=match):
        EvidenceRule(small_net(), **{"num_samples": N_TRAIN, **options})


def test_the_rule_is_not_added_twice():
    with pytest.raises(TypeError, match="applies the L2 rule itself"):
        evidence_opt(small_net(), l2=True)


def test_evidence_options_need_evidence():
    model = small_net()
    with pytest.raises(TypeError, match="layers, num_samples given without evidence=True"):
        GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "l2", layers=model, num_samples=10)


@pytest.mark.parametrize(
    "model,params,match",
    [
        (nn.Sequential(nn.Embedding(4, 3)), None, "found no nn.Linear, nn.Conv1d or nn.Conv2d"),
        (small_net(), "bias", "params has other tensors"),
        (nn.Sequential(nn.Conv2d(1, 2, 3, padding="same")), None, "zero padding given in numbers"),
        (nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)), None, "groups=1"),
        (nn.Sequential(nn.Conv1d(1, 2, 3, padding="same")), None, "zero padding given in numbers"),
        (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")), None, "zero padding"),
        (nn.Sequential(nn.Linear(3, 2, dtype=torch.complex64)), None, "complex weights"),
    ],
)
def test_layers_without_kronecker_factors_are_refused(model, params, match):
    if params == "bias":
        params = [model[0].weight, model[0].bias]
    with pytest.raises(ValueError, match=match):
        evidence_opt(model, params=params)


def test_an_adaptive_optimizer_is_refused():
    model = small_net()
    with pytest.raises(ValueError, match="measured with torch.optim.SGD; got Adam"):
        GradSurgery(torch.optim.Adam(model.parameters()), "l2", evidence=True, layers=model, num_samples=10)


def test_an_optimizer_weight_decay_on_the_regularized_weights_is_refused():
    """The evidence λ is the weights' decay: SGD's own ``weight_decay`` on them would add to it. A decay on
    the biases alone (a group of their own) is theirs to keep."""
    model = small_net()
    with pytest.raises(ValueError, match=r"weight_decay by param group: \{0: 0.0001\}"):
        GradSurgery(
            torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4),
            "l2",
            evidence=True,
            layers=model,
            num_samples=10,
        )
    groups = [
        {"params": [model[0].weight, model[2].weight]},
        {"params": [model[0].bias, model[2].bias], "weight_decay": 1e-4},
    ]
    opt = GradSurgery(torch.optim.SGD(groups, lr=0.1), "l2", evidence=True, layers=model, num_samples=10)
    assert opt.l2.weights == [model[0].weight, model[2].weight]


def test_layers_the_optimizer_does_not_hold_are_refused():
    model = small_net()
    with pytest.raises(ValueError, match="optimizer does not hold"):
        GradSurgery(
            torch.optim.SGD(model[0].parameters(), lr=0.1), "l2", evidence=True, layers=model, num_samples=10
        )


def snapshot(model, opt):
    return (
        [p.detach().clone() for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        copy.deepcopy(opt.method.state_dict()),
    )


def assert_same(before, after):
    for a, b in zip(
        before[0] + [g for g in before[1] if g is not None],
        after[0] + [g for g in after[1] if g is not None],
        strict=True,
    ):
        assert torch.equal(a, b)
    assert [g is None for g in before[1]] == [g is None for g in after[1]]
    sa, sb = before[2], after[2]
    assert sa.keys() == sb.keys() and sa["steps"] == sb["steps"] and sa["lambdas"] == sb["lambdas"]
    assert sa["spectra_rows"] == sb["spectra_rows"] and sa["spectra_step"] == sb["spectra_step"]
    for key in ("a", "s", "spectra_a", "spectra_s"):
        for x, y in zip(sa[key], sb[key], strict=True):
            assert (x is None and y is None) or torch.equal(x, y)


def train(opt, model, steps, start=0, sign=1.0):
    """``steps`` steps on batches ``start``, ``start + 1``, … (on ``sign`` times the loss); returns the last
    step's λ (None for none)."""
    device = next(model.parameters()).device
    info = None
    for step in range(start, start + steps):
        x, y = batch(step)
        opt.zero_grad()
        info = opt.backward(sign * F.cross_entropy(model(x.to(device)), y.to(device)))
        opt.step()
    return None if info is None else info.l2_coefficient


@pytest.mark.parametrize("trained", [0, 3])
def test_a_failed_backward_leaves_everything_and_records_nothing(trained):
    """A NaN loss after the layers' gradients were recorded: parameters, .grad and the factors as they were,
    and the next step is the step of a run in which the failed one never happened."""
    model, twin = small_net(), small_net()
    opt, twin_opt = evidence_opt(model), evidence_opt(twin)
    train(opt, model, trained)
    train(twin_opt, twin, trained)
    x, y = batch(50)
    before = snapshot(model, opt)
    with pytest.raises(NonFiniteError):
        opt.backward(F.cross_entropy(model(x), y) * float("nan"))
    assert_same(before, snapshot(model, opt))
    train(opt, model, 2, start=trained)
    train(twin_opt, twin, 2, start=trained)
    assert_same(snapshot(twin, twin_opt), snapshot(model, opt))


@pytest.mark.parametrize("trained", [0, 3])
def test_a_failure_after_the_rule_ran_leaves_its_factors(monkeypatch, trained):
    """The write-back fails after the rule folded this batch into the factors and solved λ: all undone."""
    import gradsurgery.optimizer as engine

    model = small_net()
    opt = evidence_opt(model)
    train(opt, model, trained)
    before = snapshot(model, opt)

    def broken(*args, **kwargs):
        raise RuntimeError("write-back failed")

    monkeypatch.setattr(engine, "accumulate", broken)
    x, y = batch(60)
    with pytest.raises(RuntimeError, match="write-back failed"):
        opt.backward(F.cross_entropy(model(x), y))
    assert_same(before, snapshot(model, opt))
    assert opt.method.num_tasks == (None if trained == 0 else 1)


def test_a_layer_applied_to_batches_of_two_sizes_is_refused_and_changes_nothing():
    layer = nn.Linear(4, 4)
    model = nn.Sequential(layer, nn.Tanh())
    opt = evidence_opt(model)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"applied to batches of sizes \[\[2, 3\]\]"):
        opt.backward(model(torch.randn(3, 4)).sum() + model(torch.randn(2, 4)).sum())
    assert_same(before, snapshot(model, opt))


def test_an_empty_batch_is_refused_as_non_finite_and_records_nothing():
    model = small_net()
    opt = evidence_opt(model)
    train(opt, model, 2)
    before = snapshot(model, opt)
    logits = model(torch.randn(0, 6))  # the hooks let an empty forward pass through
    with pytest.raises(NonFiniteError):
        opt.backward(F.cross_entropy(logits, torch.zeros(0, dtype=torch.long)))
    assert_same(before, snapshot(model, opt))


def test_layers_sharing_a_weight_are_refused():
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    with pytest.raises(ValueError, match="share their weight with another layer"):
        evidence_opt(nn.Sequential(first, second))


def test_representation_mode_is_refused():
    model = small_net()
    opt = evidence_opt(model)
    x, y = batch(0)
    z = model[0](x)
    with pytest.raises(ValueError, match="evidence=True does not run in representation mode"):
        opt.backward(F.cross_entropy(model[2](torch.tanh(z)), y), features=z)
    assert all(p.grad is None for p in model.parameters())
    assert opt.l2.steps == 0


def test_a_grad_scaler_changes_nothing_and_an_overflow_records_nothing():
    """With a GradScaler the layers' output gradients are s·δ; the factors divide S by s², so the run is the
    unscaled one (exactly: s is a power of two); an overflowed backward (its step skipped by the scaler,
    the scale backed off) leaves the factors and λ as they were."""
    model, twin = small_net(), small_net()
    opt, twin_opt = evidence_opt(model), evidence_opt(twin)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10_000)
    for step in range(12):
        x, y = batch(step)
        if step == 5:  # an overflowed backward first
            opt.zero_grad()
            info = opt.backward(F.cross_entropy(model(x), y) * float("inf"), grad_scaler=scaler)
            assert info.overflow
            scaler.step(opt)
            scaler.update()
            assert scaler.get_scale() == 2.0**9
        opt.zero_grad()
        lam = opt.backward(F.cross_entropy(model(x), y), grad_scaler=scaler).l2_coefficient
        scaler.step(opt)
        scaler.update()
        assert torch.equal(lam, train(twin_opt, twin, 1, start=step))
    assert_same(snapshot(twin, twin_opt), snapshot(model, opt))


def test_evaluation_passes_record_nothing():
    model = small_net()
    opt = evidence_opt(model)
    train(opt, model, 2)
    before = snapshot(model, opt)
    with torch.no_grad():
        model(batch(7)[0])
    model(batch(8)[0])  # a graph that is never backpropagated: recorded at most until the next backward
    assert_same(before, snapshot(model, opt))
    train(opt, model, 1, start=2)
    twin = small_net()
    twin_opt = evidence_opt(twin)
    train(twin_opt, twin, 3)
    assert_same(snapshot(twin, twin_opt), snapshot(model, opt))


def test_a_copy_of_the_method_shares_the_layers():
    model = small_net()
    opt = evidence_opt(model)
    train(opt, model, 1)
    twin = copy.deepcopy(opt.method)
    assert not any(isinstance(v, nn.Module) for v in vars(twin).values())
    assert twin.rule.factors.layers[0] is model[0] and twin.rule.factors.handles == []
    assert twin.rule.weights[0] is model[0].weight
    assert torch.equal(twin.rule.factors.a[0], opt.l2.factors.a[0])
    assert twin.rule.factors.a[0] is not opt.l2.factors.a[0]
    twin.rule.lambdas.append(1.0)
    assert len(opt.l2.lambdas) == 2


def hooked(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_no_hook_outlives_its_optimizer():
    """Dropped, or never built (its construction refused), an optimizer leaves nothing recording on the
    model, and a new one on the same model starts from its own first step."""
    gc.collect()
    model = small_net()
    opt = evidence_opt(model)
    assert hooked(model) == 2
    train(opt, model, 2)
    del opt
    gc.collect()
    assert hooked(model) == 0
    with pytest.raises(ValueError, match="got Adam"):
        GradSurgery(torch.optim.Adam(model.parameters()), "l2", evidence=True, layers=model, num_samples=10)
    gc.collect()
    assert hooked(model) == 0
    fresh = evidence_opt(model)
    train(fresh, model, 1, start=2)
    assert fresh.l2.steps == 1 and hooked(model) == 2


# -- checkpoints --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("saved_at", [8, 25])
def test_a_resumed_run_is_the_uninterrupted_run(saved_at):
    """Saved after 8 steps (λ solved at step 1, then at 10 after the resume) or 25 (spectra taken at 20; the
    solve of step 30 reads them, that of 40 takes new ones), through torch.save and weights_only loading."""
    model = small_net()
    opt = evidence_opt(model)
    train(opt, model, saved_at)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(opt, model, 20, start=saved_at)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh = small_net(9)
    fresh.load_state_dict(saved["model"])
    fresh_opt = evidence_opt(fresh)
    fresh_opt.load_state_dict(saved["opt"])
    train(fresh_opt, fresh, 20, start=saved_at)
    assert_same(snapshot(model, opt), snapshot(fresh, fresh_opt))


def test_a_checkpoint_without_spectra_takes_them_at_its_next_solve():
    """A state saved before the spectra were kept (no ``spectra_*`` entries): the solve of step 30 takes the
    spectra from the loaded factors, as a run whose spectra are always taken afresh (max age 0) does."""
    model = small_net()
    opt = evidence_opt(model)
    train(opt, model, 25)
    state = opt.state_dict()
    old = copy.deepcopy(state)
    for key in ("spectra_a", "spectra_s", "spectra_rows", "spectra_step"):
        del old["gradsurgery"]["method_state"][key]
    runs = []
    for loaded, age in ((old, 100), (state, 0), (state, 100)):
        twin = small_net(9)
        twin.load_state_dict(model.state_dict())
        twin_opt = evidence_opt(twin)
        twin_opt.load_state_dict(copy.deepcopy(loaded))
        twin_opt.l2.max_spectrum_age = age
        runs.append(train(twin_opt, twin, 6, start=25))  # λ of step 30
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2], rtol=1e-6)  # the spectra of step 20 give another λ


def test_checkpoints_of_the_norm_rule_and_the_evidence_do_not_mix():
    model = small_net()
    norm = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "l2")
    train(norm, model, 1)
    saved = norm.state_dict()
    # a checkpoint written before the evidence options existed: without them, it still loads
    older = copy.deepcopy(saved)
    for key in ("evidence", "num_samples"):
        del older["gradsurgery"]["options"][key]
    GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "l2").load_state_dict(older)
    evidence = evidence_opt(model)
    for state in (saved, older):
        with pytest.raises(ValueError, match="different 'l2' options"):
            evidence.load_state_dict(copy.deepcopy(state))
    assert evidence.l2.steps == 0


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize("per_layer", [True, False])
def test_on_cuda_the_steps_are_the_cpu_steps(per_layer):
    """The factors and weights on the GPU, λ solved on the CPU; a checkpoint moves between the two."""
    cpu, gpu = small_net(), small_net().cuda()
    cpu_opt, gpu_opt = evidence_opt(cpu, per_tensor=per_layer), evidence_opt(gpu, per_tensor=per_layer)
    for step in range(12):
        expected = train(cpu_opt, cpu, 1, start=step)
        np.testing.assert_allclose(
            train(gpu_opt, gpu, 1, start=step).cpu().numpy(), expected.numpy(), rtol=1e-5
        )
    for p, q in zip(cpu.parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-4, atol=1e-6)
    gpu_opt.load_state_dict(cpu_opt.state_dict())
    assert gpu_opt.l2.factors.a[0].device.type == "cuda"
    train(gpu_opt, gpu, 1, start=12)
