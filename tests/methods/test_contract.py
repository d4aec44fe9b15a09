"""Properties every registered method must have, tested once over the registry (``gradsurgery.METHODS``).

Each method describes itself (``example_options``, ``min_tasks``/``max_tasks``, ``no_conflict``,
``scale_exponent``, ``task_scale_invariant``, ``scales_task_specific``, its generators); this suite checks
each property that applies. A method's own file under ``tests/methods/`` tests its own maths.
"""

from __future__ import annotations

import inspect
import itertools

import numpy as np
import pytest
import torch
from method_checks import check_resume_is_bit_identical, make_linear_problem, random_jacobian
from state_checks import same_state, snapshot

from gradsurgery import METHODS, GradSurgery, make_method

TASK_COUNTS = (1, 2, 3, 5)
DIM = 12
SEEDS = range(8)


def fits(cls, num_tasks: int) -> bool:
    return cls.min_tasks <= num_tasks and (cls.max_tasks is None or num_tasks <= cls.max_tasks)


def options_for(name: str, num_tasks: int) -> dict:
    """Every option spelled out: the defaults, then the method's example options for T tasks."""
    cls = METHODS[name]
    parameters = inspect.signature(cls.__init__).parameters
    options = {
        n: parameters[n].default
        for n in cls.option_names()
        if parameters[n].default is not parameters[n].empty
    }
    options.update(cls.example_options(num_tasks))
    if "seed" in options:
        options["seed"] = 3
    return options


def build(name: str, num_tasks: int):
    return make_method(name, **options_for(name, num_tasks))


CASES = [(name, t) for name in sorted(METHODS) for t in TASK_COUNTS if fits(METHODS[name], t)]


def problem(seed: int, num_tasks: int, conflict: bool = True):
    jac = random_jacobian(seed, num_tasks, DIM, conflict=conflict)
    losses = np.random.default_rng(seed + 100).uniform(0.5, 2.0, size=num_tasks)
    return jac, torch.from_numpy(losses)


def weights_of(method, jac: np.ndarray, losses: torch.Tensor) -> np.ndarray:
    gram = torch.from_numpy(jac @ jac.T) if method.needs_gram else None
    w = method(gram, losses)
    assert isinstance(w, torch.Tensor) and w.dtype == torch.float64 and w.shape == (jac.shape[0],)
    return w.numpy()


def fused(jac: np.ndarray, w: np.ndarray) -> np.ndarray:
    return jac.T @ w


def permuted_options(options: dict, perm: list[int]) -> dict:
    """The options of the same problem with its tasks reordered: task perm[i] becomes task i. Options
    that name tasks (an index, a list of indices, one value per task) follow the order."""
    out = {}
    for key, value in options.items():
        if key == "main" and isinstance(value, int):
            out[key] = perm.index(value)
        elif key == "main":
            out[key] = sorted(perm.index(m) for m in value)
        elif isinstance(value, list) and len(value) == len(perm):
            out[key] = [value[p] for p in perm]
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("name,num_tasks", CASES)
def test_weights_are_finite_float64_of_shape_t(name, num_tasks):
    for seed in SEEDS:
        jac, losses = problem(seed, num_tasks)
        w = weights_of(build(name, num_tasks), jac, losses)
        assert np.all(np.isfinite(w))


@pytest.mark.parametrize("name,num_tasks", [c for c in CASES if c[1] >= 2])
def test_task_order_does_not_matter(name, num_tasks):
    cls = METHODS[name]
    if build(name, num_tasks).generators():
        pytest.skip("random task orders or weights: the draws depend on the order by design")
    for seed, perm in zip(SEEDS, itertools.cycle(itertools.permutations(range(num_tasks))), strict=False):
        perm = list(perm)
        jac, losses = problem(seed, num_tasks)
        u = fused(jac, weights_of(build(name, num_tasks), jac, losses))
        options = permuted_options(options_for(name, num_tasks), perm)
        other = make_method(name, **options)
        assert type(other) is cls
        u_perm = fused(jac[perm], weights_of(other, jac[perm], losses[perm]))
        scale = np.abs(jac).sum(axis=1).max()
        np.testing.assert_allclose(u_perm, u, rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("name,num_tasks", CASES)
@pytest.mark.parametrize("factor", [4.0, 2.0**-10])
def test_a_common_scale_of_the_gradients_scales_the_weights_as_declared(name, num_tasks, factor):
    """w(c²G) = c^k w(G) with k = ``scale_exponent`` (powers of two: the scaled problem is exact)."""
    exponent = METHODS[name].scale_exponent
    for seed in SEEDS:
        jac, losses = problem(seed, num_tasks)
        w = weights_of(build(name, num_tasks), jac, losses)
        w_scaled = weights_of(build(name, num_tasks), factor * jac, losses)
        np.testing.assert_allclose(w_scaled, factor**exponent * w, rtol=1e-7, atol=1e-12 * np.abs(w).max())


@pytest.mark.parametrize("name,num_tasks", [c for c in CASES if c[1] >= 2])
def test_a_task_1e4_times_smaller_keeps_the_declared_guarantees(name, num_tasks):
    """One task's gradient 1e-4 times the others' (a click loss beside a watch-time MSE): the weights stay
    finite, a method that promises no conflict still gives the small task ⟨u, g⟩ ≥ 0, and a method declared
    invariant to per-task scales steps in the same direction as without the imbalance."""
    cls = METHODS[name]
    for seed in SEEDS:
        jac, losses = problem(seed, num_tasks)
        small = jac.copy()
        small[0] *= 1e-4
        w = weights_of(build(name, num_tasks), small, losses)
        assert np.all(np.isfinite(w))
        u = fused(small, w)
        if cls.no_conflict:
            dots = small @ u
            norms = np.linalg.norm(small, axis=1) * np.linalg.norm(u)
            assert np.all(dots >= -1e-9 * norms), dots / norms
        if cls.task_scale_invariant:
            u_plain = fused(jac, weights_of(build(name, num_tasks), jac, losses))
            cos = u @ u_plain / (np.linalg.norm(u) * np.linalg.norm(u_plain))
            assert cos >= 1 - 1e-6


@pytest.mark.parametrize("name,num_tasks", [c for c in CASES if METHODS[c[0]].no_conflict])
def test_no_loss_rises_to_first_order_where_promised(name, num_tasks):
    for seed in range(40):
        jac, losses = problem(seed, num_tasks)
        u = fused(jac, weights_of(build(name, num_tasks), jac, losses))
        dots = jac @ u
        norms = np.linalg.norm(jac, axis=1) * max(np.linalg.norm(u), 1e-300)
        assert np.all(dots >= -1e-9 * norms), (seed, dots / norms)


def test_the_no_conflict_guarantee_is_not_claimed_where_it_fails():
    """Methods without the flag do raise a loss on some problems (a tiny task nearly opposite to another):
    the flag marks a real difference. (IMTL-G does not here: its equal projections are positive whenever
    its weights are, but it has no guarantee when a weight turns negative.)"""
    raisers = set()
    for name, num_tasks in CASES:
        cls = METHODS[name]
        if cls.no_conflict or num_tasks < 2 or not cls.needs_gram or cls.scales_task_specific:
            continue
        for seed in range(20):
            jac, losses = problem(seed, num_tasks)
            jac[0] = -0.05 * jac[1] + 0.01 * jac[0]  # small and nearly opposite to task 1
            u = fused(jac, weights_of(build(name, num_tasks), jac, losses))
            if np.any(jac @ u < -1e-9 * np.linalg.norm(jac, axis=1) * np.linalg.norm(u)):
                raisers.add(name)
                break
    assert {"pareto", "pcgrad", "gradvac", "cagrad", "aligned_mtl"} <= raisers


# -- the transaction -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,num_tasks", CASES)
@pytest.mark.parametrize("bound", [False, True])
def test_a_call_that_fails_after_the_weights_changes_nothing(name, num_tasks, bound):
    """Whatever a method changed while computing weights (moving averages, loss history, learned vectors,
    generator draws, the binding itself) is undone when the step fails later."""
    method = build(name, num_tasks)
    jac, losses = problem(0, num_tasks)
    if bound:
        for seed in range(3):
            weights_of(method, *problem(seed, num_tasks))
    before = snapshot(method.state_dict())
    generators = {n: g.get_state() for n, g in method.generators().items()}
    with pytest.raises(RuntimeError, match="later stage"):
        with method.transaction():
            weights_of(method, jac, losses)
            raise RuntimeError("a later stage failed")
    assert method.num_tasks == (num_tasks if bound else None)
    assert same_state(method.state_dict(), before)
    assert all(torch.equal(g.get_state(), generators[n]) for n, g in method.generators().items())
    if bound:  # and the next call computes what an untouched method computes
        twin = build(name, num_tasks)
        for seed in range(3):
            weights_of(twin, *problem(seed, num_tasks))
        np.testing.assert_array_equal(weights_of(method, jac, losses), weights_of(twin, jac, losses))


# -- through GradSurgery: resume, failed calls ------------------------------------------------------------


class NaNGradient(torch.autograd.Function):
    """Zero forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def losses_for(name: str, model) -> list[torch.Tensor]:
    losses = [loss * loss + 0.1 for loss in model()]  # positive: loss-ratio methods accept them
    return [sum(losses)] if METHODS[name].max_tasks == 1 else losses


@pytest.mark.parametrize("name", sorted(METHODS))
def test_resume_from_a_checkpoint_is_bit_identical(name):
    num_tasks = 1 if METHODS[name].max_tasks == 1 else 3
    check_resume_is_bit_identical(name, num_losses=num_tasks, **options_for(name, num_tasks))


def optimizer_for(name: str, seed: int = 0):
    model, _, _ = make_linear_problem(seed)
    num_tasks = 1 if METHODS[name].max_tasks == 1 else 3
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), name, **options_for(name, num_tasks))
    return model, opt


def everything(model, opt):
    """What a failed call must leave as it was: parameters, .grad, the optimizer's state dict."""
    return (
        [p.detach().clone() for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        snapshot(opt.state_dict()),
    )


def unchanged(model, opt, before) -> bool:
    params, grads, state = before
    return (
        all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
        and all(
            (p.grad is None and g is None) or (None not in (p.grad, g) and torch.equal(p.grad, g))
            for p, g in zip(model.parameters(), grads, strict=True)
        )
        and same_state(opt.state_dict(), state)
    )


def bad_calls(name: str, model):
    """Calls that must fail: (description, callable that builds the losses and calls backward)."""

    def nan_loss():
        losses = losses_for(name, model)
        losses[0] = losses[0] * float("nan")
        return losses

    def nan_gradient():
        losses = losses_for(name, model)
        losses[-1] = losses[-1] + NaNGradient.apply(model.theta).sum()  # finite loss, NaN gradient
        return losses

    def detached():
        losses = losses_for(name, model)
        losses[0] = losses[0].detach()
        return losses

    def too_many():
        return losses_for(name, model) + [model()[0] ** 2]

    return [("NaN loss", nan_loss), ("NaN gradient", nan_gradient), ("detached", detached), ("T", too_many)]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_failed_call_changes_nothing(name):
    model, opt = optimizer_for(name)
    for _ in range(2):  # some state first: moving averages, loss history, generator draws
        opt.backward(losses_for(name, model))
        opt.step()
    for what, losses in bad_calls(name, model):
        before = everything(model, opt)
        with pytest.raises(ValueError):
            opt.backward(losses())
        assert unchanged(model, opt, before), what


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("case", range(3))
def test_a_failed_first_call_leaves_a_fresh_optimizer(name, case):
    """Even the first call: a refused one does not bind the task count or create any state."""
    model, opt = optimizer_for(name)
    fresh = snapshot(optimizer_for(name)[1].state_dict())
    what, losses = bad_calls(name, model)[case]
    with pytest.raises(ValueError):
        opt.backward(losses())
    assert opt.method.num_tasks is None, what
    assert same_state(opt.state_dict(), fresh), what
    assert all(p.grad is None for p in model.parameters()), what


@pytest.mark.parametrize("name", sorted(METHODS))
def test_generators_are_the_only_randomness_and_are_declared(name):
    """Two optimizers built with the same options give the same weights, whatever the global RNG does in
    between: every random draw comes from a generator the method declared (and so checkpoints)."""
    torch.manual_seed(0)
    model_a, opt_a = optimizer_for(name)
    torch.manual_seed(0)
    model_b, opt_b = optimizer_for(name)
    for step in range(3):
        torch.manual_seed(100 + step)
        wa = opt_a.backward(losses_for(name, model_a)).weights
        torch.manual_seed(200 + step)
        wb = opt_b.backward(losses_for(name, model_b)).weights
        assert torch.equal(wa, wb)
    assert set(opt_a.state_dict()["gradsurgery"]["rng_state"]) == set(opt_a.method.generators())


# -- an optimizer that maximizes ----------------------------------------------------------------------------

#: Weights that read the loss values and not only G: negating the losses changes them (uncertainty's
#: 1/(2σ²) follows the losses' size), or the method refuses a maximizing optimizer (``tracks_loss_decrease``).
READS_LOSS_VALUES = {"uncertainty"} | {n for n, cls in METHODS.items() if cls.tracks_loss_decrease}


def steps_of(name: str, maximize: bool, steps: int = 3) -> list[torch.Tensor]:
    model, _, _ = make_linear_problem(0)
    num_tasks = 1 if METHODS[name].max_tasks == 1 else 3
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, maximize=maximize)
    opt = GradSurgery(inner, name, **options_for(name, num_tasks))
    for _ in range(steps):
        opt.zero_grad()
        losses = losses_for(name, model)
        opt.backward([-loss for loss in losses] if maximize else losses)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", sorted(set(METHODS) - READS_LOSS_VALUES))
def test_a_maximizing_optimizer_on_the_negated_losses_takes_the_minimizing_steps(name):
    """Negating every loss negates every g_i and leaves G and the weights as they were: the fused gradient is
    negated, and an optimizer with ``maximize=True`` takes the step the minimizing one takes."""
    minimized, maximized = steps_of(name, False), steps_of(name, True)
    assert all(torch.equal(p, q) for p, q in zip(minimized, maximized, strict=True))


@pytest.mark.parametrize("name", sorted(n for n, cls in METHODS.items() if cls.tracks_loss_decrease))
def test_a_method_that_tracks_the_loss_decrease_refuses_a_maximizing_optimizer(name):
    """Under ``maximize=True`` the optimizer raises the losses, which inverts how fast they fall: refused when
    built, and by a backward once a group maximizes, which then changes nothing."""
    model, _, _ = make_linear_problem(0)
    with pytest.raises(ValueError, match=rf"method '{name}' .*maximize=True in param group\(s\) \[0\]"):
        GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1, maximize=True), name, **options_for(name, 3))
    model, opt = optimizer_for(name)
    for _ in range(2):
        opt.backward(losses_for(name, model))
        opt.step()
    opt.param_groups[0]["maximize"] = True
    before = everything(model, opt)
    with pytest.raises(ValueError, match="maximize=True"):
        opt.backward(losses_for(name, model))
    assert unchanged(model, opt, before)
