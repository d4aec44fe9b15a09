"""The clean-set guard (main_aux on [noisy, clean]), per-sample loss masking and CleanBatches, against
references computed by hand or by one autograd call per sample."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradsurgery import GradSurgery
from gradsurgery.clean_guard import (
    CleanBatches,
    NoiseCorrection,
    estimate_transition,
    forward_corrected_nll,
    mask_noisy_samples,
    per_sample_clean_products,
    sample_clean_products,
)

# torch's forward-mode AD (backend="jvp") scripts its decompositions on first use: torch's own warning.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

# -- a model whose per-sample gradients are known ----------------------------------------------------------


class Bilinear(torch.nn.Module):
    """score(x) = ⟨w, x⟩; the per-sample loss ℓ_s = y_s·score(x_s) has gradient y_s·x_s (any w)."""

    def __init__(self, dim: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(dim, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


def linear_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return out * y


def known_problem():
    """Clean gradient c = e_0 + 0.5 e_1; samples with a positive, negative and exactly zero inner product."""
    torch.manual_seed(0)
    model = Bilinear(3)
    c = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    x = torch.tensor(
        [
            [1.0, 0.0, 2.0],
            [-1.0, 0.0, 1.0],
            [0.0, 0.0, 5.0],
            [1.0, -2.0, 0.0],
            [2.0, -1.0, 1.0],
            [-0.5, 2.0, 0.0],
        ],
        dtype=torch.float64,
    )
    y = torch.tensor([1.0, 1.0, -1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    # ⟨y_s x_s, c⟩ = 1, −1, 0, 0, −1.5, −0.5: kept exactly where ≥ 0 (zeros included).
    expected = torch.tensor([True, False, True, True, False, False])
    return model, c, x, y, expected


def clean_loss_of(model: Bilinear, c: torch.Tensor) -> torch.Tensor:
    return model.w @ c  # gradient c


@pytest.mark.parametrize("backend", ["vmap", "jvp"])
@pytest.mark.parametrize("clean_as", ["loss", "list", "dict"])
def test_mask_keeps_exactly_the_non_negative_samples(backend, clean_as):
    model, c, x, y, expected = known_problem()
    clean = {"loss": clean_loss_of(model, c), "list": [c], "dict": {"w": c}}[clean_as]
    keep = mask_noisy_samples(model, linear_loss, x, y, clean, backend=backend)
    assert keep.tolist() == expected.tolist()
    products = per_sample_clean_products(model, linear_loss, x, y, clean, backend=backend)
    torch.testing.assert_close(products, (y[:, None] * x) @ c)


@pytest.mark.parametrize("how", ["double_backward", "batched", "auto"])
def test_products_from_the_graph(how):
    model, c, x, y, expected = known_problem()
    products = sample_clean_products(linear_loss(model(x), y), clean_loss_of(model, c), [model.w], how=how)
    torch.testing.assert_close(products, (y[:, None] * x) @ c)
    assert (products >= 0).tolist() == expected.tolist()


def brute_force_products(model, x, y, clean_x, clean_y, params):
    """One autograd call per sample: the plain definition of ⟨∇ℓ_s, ∇L_clean⟩."""
    g_clean = torch.autograd.grad(F.cross_entropy(model(clean_x), clean_y), params)
    out = []
    for s in range(len(y)):
        g = torch.autograd.grad(F.cross_entropy(model(x[s : s + 1]), y[s : s + 1]), params)
        out.append(sum((a * b).sum() for a, b in zip(g, g_clean, strict=True)))
    return torch.stack(out).double()


def mlp():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 4)).double()


def mlp_data():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (12,), generator=gen)
    xc = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    yc = torch.randint(0, 4, (6,), generator=gen)
    return x, y, xc, yc


def test_all_product_routes_agree_with_brute_force_on_an_mlp():
    model = mlp()
    x, y, xc, yc = mlp_data()
    params = list(model.parameters())
    ref = brute_force_products(model, x, y, xc, yc, params)
    assert (ref > 0).any() and (ref < 0).any()
    per_sample = lambda out, t: F.cross_entropy(out, t, reduction="none")  # noqa: E731
    for backend in ("vmap", "jvp"):
        clean = F.cross_entropy(model(xc), yc)
        got = per_sample_clean_products(model, per_sample, x, y, clean, backend=backend)
        torch.testing.assert_close(got, ref)
    for how in ("double_backward", "batched"):
        # per-sample losses: the batch mean's graph would scale them by 1/B, reduction="none" does not
        got = sample_clean_products(per_sample(model(x), y), F.cross_entropy(model(xc), yc), params, how=how)
        torch.testing.assert_close(got, ref)


def test_params_subset_by_name():
    model = mlp()
    x, y, xc, yc = mlp_data()
    last = [model[2].weight, model[2].bias]
    ref = brute_force_products(model, x, y, xc, yc, last)
    per_sample = lambda out, t: F.cross_entropy(out, t, reduction="none")  # noqa: E731
    clean = F.cross_entropy(model(xc), yc)
    got = per_sample_clean_products(model, per_sample, x, y, clean, params=["2.weight", "2.bias"])
    torch.testing.assert_close(got, ref)
    got = per_sample_clean_products(model, per_sample, x, y, F.cross_entropy(model(xc), yc), params=last)
    torch.testing.assert_close(got, ref)


# -- mode="mask" inside GradSurgery ------------------------------------------------------------------------


@pytest.mark.parametrize("main", [0, 1])
def test_gradsurgery_mask_mode_trains_on_the_kept_samples(main):
    model, c, x, y, expected = known_problem()
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="main_aux", main=main, mode="mask")
    noisy, clean = linear_loss(model(x), y), clean_loss_of(model, c)
    info = opt.backward([noisy, clean] if main == 0 else [clean, noisy])
    assert info.sample_mask.tolist() == expected.tolist()
    kept = expected.nonzero().reshape(-1)
    mean_kept = (y[kept, None] * x[kept]).mean(0)  # the gradient of the mean loss of the kept samples
    torch.testing.assert_close(model.w.grad, mean_kept)
    # the kept mean never conflicts with the clean gradient, so the auxiliary gets weight 0
    assert float(info.weights[main]) == 1.0 and float(info.weights[1 - main]) == 0.0
    torch.testing.assert_close(info.losses[main], (y * (x @ model.w.detach()))[kept].mean())


def test_mask_mode_on_an_mlp_matches_brute_force():
    model = mlp()
    x, y, xc, yc = mlp_data()
    params = list(model.parameters())
    keep = brute_force_products(model, x, y, xc, yc, params) >= 0
    ref_grads = torch.autograd.grad(F.cross_entropy(model(x[keep]), y[keep]), params)
    opt = GradSurgery(torch.optim.SGD(params, lr=0.1), method="main_aux", main=0, mode="mask")
    info = opt.backward([F.cross_entropy(model(x), y, reduction="none"), F.cross_entropy(model(xc), yc)])
    assert info.sample_mask.tolist() == keep.tolist()
    for p, g in zip(params, ref_grads, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_every_sample_dropped_gives_a_zero_step_without_nan():
    model, c, x, y, _ = known_problem()
    y = -torch.ones_like(y)
    x = x.clone()
    x[:, 0] = 1.0  # ⟨−x_s, c⟩ = −1 − 0.5 x_s1 < 0 for every row here
    x[:, 1] = 0.0
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="main_aux", main=0, mode="mask")
    info = opt.backward([linear_loss(model(x), y), clean_loss_of(model, c)])
    assert not info.sample_mask.any()
    assert torch.equal(model.w.grad, torch.zeros(3, dtype=torch.float64))


# -- the guard ---------------------------------------------------------------------------------------------


def test_guard_keeps_the_clean_loss_from_rising_to_first_order():
    model = mlp()
    _, _, xc, yc = mlp_data()
    x, y = xc, (yc + 1) % 4  # the clean images with wrong labels: the two gradients conflict
    params = list(model.parameters())
    g_noisy = torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(model(x), y), params)])
    g_clean = torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(model(xc), yc), params)])
    assert float(g_noisy @ g_clean) < 0
    opt = GradSurgery(torch.optim.SGD(params, lr=0.1), method="main_aux", main=0)
    info = opt.backward([F.cross_entropy(model(x), y), F.cross_entropy(model(xc), yc)])
    u = torch.cat([p.grad.reshape(-1) for p in params])
    lam = -(g_noisy @ g_clean) / (g_clean @ g_clean)
    torch.testing.assert_close(u, g_noisy + lam * g_clean)
    assert abs(float(u @ g_clean)) < 1e-10
    torch.testing.assert_close(info.weights, torch.stack([torch.tensor(1.0, dtype=torch.float64), lam]))


def test_guard_recipe_with_clean_batches_runs():
    model = mlp()
    x, y, xc, yc = mlp_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xc, yc), batch_size=4)
    clean = CleanBatches(loader)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="main_aux", main=0)
    for _ in range(5):
        cx, cy = next(clean)
        opt.zero_grad()
        opt.backward([F.cross_entropy(model(x), y), F.cross_entropy(model(cx), cy)])
        opt.step()
    assert clean.epoch == 2  # 2 batches a pass: passes 0, 1 done, the 5th draw opens pass 2


# -- CleanBatches ------------------------------------------------------------------------------------------


def test_clean_batches_cycles_a_list_and_a_dataloader():
    clean = CleanBatches(["a", "b", "c"])
    assert [next(clean) for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]
    assert clean.epoch == 2
    data = torch.arange(5.0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=2)
    clean = CleanBatches(loader)
    got = [next(clean)[0].tolist() for _ in range(4)]
    assert got == [[0.0, 1.0], [2.0, 3.0], [4.0], [0.0, 1.0]]


class Stream(torch.utils.data.IterableDataset):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(self.n))


def test_clean_batches_without_length():
    clean = CleanBatches(torch.utils.data.DataLoader(Stream(3), batch_size=2))
    assert [next(clean).tolist() for _ in range(3)] == [[0, 1], [2], [0, 1]]


def test_clean_batches_moves_nested_batches():
    batch = {"x": torch.ones(2), "pair": (torch.zeros(1), "label")}
    out = next(CleanBatches([batch], device="cpu"))
    assert torch.equal(out["x"], batch["x"]) and out["pair"][1] == "label"


def test_empty_clean_loader_is_refused_at_construction():
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 2)), batch_size=4)
    with pytest.raises(ValueError, match="empty"):
        CleanBatches(empty)
    with pytest.raises(ValueError, match="empty"):
        CleanBatches([])
    with pytest.raises(ValueError, match="no batch"):
        CleanBatches(torch.utils.data.DataLoader(Stream(0), batch_size=2))
    short = torch.utils.data.TensorDataset(torch.zeros(3, 2))
    dropped = torch.utils.data.DataLoader(short, batch_size=4, drop_last=True)
    with pytest.raises(ValueError, match="empty"):
        CleanBatches(dropped)


def test_clean_batches_refuses_one_shot_iterators_and_non_iterables():
    with pytest.raises(TypeError, match="re-iterable"):
        CleanBatches(iter([1, 2]))
    with pytest.raises(TypeError, match="iterable of batches"):
        CleanBatches(3)


def test_clean_batches_that_stop_yielding_raise_instead_of_ending_the_loop():
    class Once:
        def __init__(self):
            self.used = False

        def __iter__(self):
            items = [] if self.used else [1]
            self.used = True
            return iter(items)

    clean = CleanBatches(Once())
    assert next(clean) == 1
    with pytest.raises(RuntimeError, match="no batch"):
        next(clean)


# -- bad input ---------------------------------------------------------------------------------------------


def test_main_aux_with_a_single_loss_is_a_clear_error():
    model = mlp()
    x, y, _, _ = mlp_data()
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="main_aux", main=0)
    with pytest.raises(ValueError, match=r"main loss and at least one auxiliary.*\[noisy_loss, clean_loss\]"):
        opt.backward(F.cross_entropy(model(x), y))
    with pytest.raises(ValueError, match="at least one auxiliary"):
        opt.backward([F.cross_entropy(model(x), y)])
    assert all(p.grad is None for p in model.parameters())


def test_mask_mode_input_errors_leave_everything_untouched():
    model = mlp()
    x, y, xc, yc = mlp_data()
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="main_aux", main=0, mode="mask")
    clean = lambda: F.cross_entropy(model(xc), yc)  # noqa: E731
    per_sample = lambda: F.cross_entropy(model(x), y, reduction="none")  # noqa: E731
    with pytest.raises(ValueError, match="per sample"):
        opt.backward([F.cross_entropy(model(x), y), clean()])
    with pytest.raises(TypeError, match=r"list \[per_sample_noisy_losses, clean_loss\]"):
        opt.backward(per_sample())
    with pytest.raises(ValueError, match="exactly 2 losses"):
        opt.backward([per_sample(), clean(), clean()])
    with pytest.raises(ValueError, match="clean loss must be a scalar"):
        opt.backward([per_sample(), F.cross_entropy(model(xc), yc, reduction="none")])
    bad = per_sample().clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite per-sample noisy loss.*\[3\]"):
        opt.backward([bad, clean()])
    with pytest.raises(ValueError, match="non-finite clean loss"):
        opt.backward([per_sample(), clean() * float("inf")])
    with pytest.raises(ValueError, match="does not require grad"):
        opt.backward([per_sample().detach(), clean()])
    other = torch.nn.Linear(5, 4).double()
    with pytest.raises(ValueError, match="reaches none"):
        opt.backward([per_sample(), F.cross_entropy(other(xc), yc)])
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="unknown main_aux mode"):
        GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="main_aux", mode="drop")
    with pytest.raises(TypeError, match="unknown option"):
        GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="mgda", mode="mask")


def test_mask_function_input_errors():
    model, c, x, y, _ = known_problem()
    with pytest.raises(ValueError, match="backend"):
        mask_noisy_samples(model, linear_loss, x, y, [c], backend="loop")
    with pytest.raises(ValueError, match="same B"):
        mask_noisy_samples(model, linear_loss, x, y[:2], [c])
    with pytest.raises(ValueError, match="no parameter named"):
        mask_noisy_samples(model, linear_loss, x, y, [c], params=["v"])
    with pytest.raises(ValueError, match="2 clean gradients for 1"):
        mask_noisy_samples(model, linear_loss, x, y, [c, c])
    with pytest.raises(ValueError, match="one loss per sample"):
        mask_noisy_samples(model, lambda out, t: (out * t).sum(), x, y, [c], backend="jvp")
    with pytest.raises(TypeError, match="clean must be"):
        mask_noisy_samples(model, linear_loss, x, y, c)  # a bare tensor that is not a loss


# -- noise correction (gold loss correction in one run) ----------------------------------------------------


def test_estimate_transition_is_the_per_class_mean_of_the_predictions():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(40, 4, generator=gen), 1)
    labels = torch.randint(0, 3, (40,), generator=gen)  # class 3 has no clean sample: identity row
    t = estimate_transition(probs, labels, 4)
    for i in range(3):
        mean = probs[labels == i].double().mean(0)
        torch.testing.assert_close(
            t[i], mean / mean.sum(), rtol=1e-12, atol=1e-15
        )  # float32 rows sum to 1 ± ulp
    torch.testing.assert_close(t[3], torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(t.sum(1), torch.ones(4, dtype=torch.float64))


def test_forward_corrected_nll_and_its_gradient():
    """−log (softmax(z) T)[ỹ] written out directly; its gradient is p − q with q ∝ p(y) T[y, ỹ]."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    noisy = torch.tensor([0, 1, 2, 2, 1, 0])
    t = torch.softmax(torch.randn(3, 3, generator=gen, dtype=torch.float64), 1)
    got = forward_corrected_nll(logits, noisy, t)
    p = torch.softmax(logits, 1)
    expected = -torch.log((p @ t)[torch.arange(6), noisy])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(got.sum(), logits)
    q = p.detach() * t[:, noisy].T
    q = q / q.sum(1, keepdim=True)
    torch.testing.assert_close(grad, p.detach() - q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_give_the_float64_loss_in_float32(dtype):
    """The loss of half-precision logits is the float64 one of the same (rounded) logits to float32
    accuracy, T's small entries included, and its gradient reaches the logits."""
    gen = torch.Generator().manual_seed(4)
    logits = (4 * torch.randn(64, 10, generator=gen)).to(dtype).requires_grad_()
    noisy = torch.randint(0, 10, (64,), generator=gen)
    t = torch.softmax(3 * torch.randn(10, 10, generator=gen, dtype=torch.float64), 1)
    t[:, 3] = 1e-9  # entries below float16's smallest subnormal
    t = t / t.sum(1, keepdim=True)
    got = forward_corrected_nll(logits, noisy, t)
    assert got.dtype == torch.float32
    expected = forward_corrected_nll(logits.detach().double(), noisy, t)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-5)
    (grad,) = torch.autograd.grad(got.sum(), logits)
    assert grad.dtype == dtype and torch.isfinite(grad).all()


def test_noise_correction_holds_the_clean_set_out_until_the_estimate():
    gen = torch.Generator().manual_seed(2)
    logits, labels = torch.randn(8, 5, generator=gen), torch.randint(0, 5, (8,), generator=gen)
    clean_logits, clean_labels = torch.randn(4, 5, generator=gen), torch.randint(0, 5, (4,), generator=gen)
    correction = NoiseCorrection(5)
    assert correction.warming_up
    torch.testing.assert_close(
        correction.loss(logits, labels, clean_logits, clean_labels), F.cross_entropy(logits, labels)
    )
    all_clean, all_labels = torch.randn(30, 5, generator=gen), torch.arange(30) % 5
    t = correction.estimate(all_clean, all_labels)
    torch.testing.assert_close(t, estimate_transition(torch.softmax(all_clean, 1), all_labels, 5))
    expected = forward_corrected_nll(logits, labels, t).mean() + F.cross_entropy(clean_logits, clean_labels)
    torch.testing.assert_close(correction.loss(logits, labels, clean_logits, clean_labels), expected)
    with pytest.raises(ValueError, match="takes the clean batch too"):
        correction.loss(logits, labels)
    resumed = NoiseCorrection(5)
    resumed.load_state_dict(correction.state_dict())
    torch.testing.assert_close(resumed.loss(logits, labels, clean_logits, clean_labels), expected)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda c: c.loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long)), ValueError, r"\(B, 5\)"),
        (lambda c: c.loss(torch.randn(4, 5), torch.full((4,), 5)), ValueError, r"lie in \[0, 5\)"),
        (lambda c: c.loss(torch.randn(4, 5), torch.zeros(4)), TypeError, "integer class indices"),
        (lambda c: c.load_state_dict({"num_classes": 3, "transition": None}), ValueError, "3 classes"),
        (lambda c: NoiseCorrection(1), ValueError, "num_classes must be >= 2"),
    ],
)
def test_noise_correction_refuses_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(NoiseCorrection(5))
