import pytest
import torch

from gradsurgery import GradSurgery, make_method
from gradsurgery.methods.gradnorm import GradNorm


class Quadratic(torch.nn.Module):
    """L_i = m_i (a_i·θ)²: gradient 2 m_i (a_i·θ) a_i, known in closed form; m_i scripted per step."""

    def __init__(self, directions):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.ones(3))
        self.a = torch.tensor(directions)

    def losses(self, multipliers):
        return [m * (a @ self.theta) ** 2 for m, a in zip(multipliers, self.a, strict=True)]


def paper_reference(model, schedule, alpha, lr, adam, initial_steps=1):
    """GradNorm as written in the paper, with autograd: G_i = ‖∇_θ w_i L_i‖, target detached, w a leaf.
    A multiplier None marks its task absent from the step: L_grad is summed over the present tasks, each
    task's L_i(0) comes from the first ``initial_steps`` steps that had it, w is renormalised over every
    task."""
    w = torch.ones(len(schedule[0]), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr) if adam else torch.optim.SGD([w], lr=lr)
    seen: dict[int, list[torch.Tensor]] = {}
    applied = []
    for multipliers in schedule:
        present = [i for i, m in enumerate(multipliers) if m is not None]
        losses = model.losses([m if m is not None else 1.0 for m in multipliers])
        for i in present:
            if len(seen.setdefault(i, [])) < initial_steps:
                seen[i].append(losses[i].detach().double())
        values = torch.stack([losses[i].detach().double() for i in present])
        initial = torch.stack([torch.stack(seen[i]).mean() for i in present])
        grads = [torch.autograd.grad(losses[i], model.theta)[0].double() for i in present]
        norms = torch.stack([(w[i] * g).norm() for i, g in zip(present, grads, strict=True)])
        ratio = values / initial
        target = (norms.mean() * (ratio / ratio.mean()) ** alpha).detach()
        applied.append(w.detach()[present].clone())
        opt.zero_grad()
        (norms - target).abs().sum().backward()
        opt.step()
        with torch.no_grad():
            w.mul_(len(w) / w.sum())
    return applied, w.detach()


def run(model, schedule, **options):
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.0), method="gradnorm", **options)
    applied = []
    for multipliers in schedule:
        opt.zero_grad()
        info = opt.backward(model.losses(multipliers))
        opt.step()
        applied.append(info.weights)
    return opt, applied


ORTHOGONAL = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


@pytest.mark.parametrize("weight_optimizer", ["sgd", "adam"])
def test_slow_task_weight_goes_up_fast_task_down(weight_optimizer):
    model = Quadratic(ORTHOGONAL)  # every ‖g_i‖ = 2 at m = 1: step 1 is balanced already
    opt, applied = run(
        model, [[1.0, 1.0, 1.0], [0.5, 1.0, 1.0]], alpha=1.5, lr=0.1, weight_optimizer=weight_optimizer
    )
    assert torch.equal(applied[1], torch.ones(3, dtype=torch.float64))  # equal norms, equal rates: no move
    w = opt.method.weights
    # Task 0's loss halved (fast, r_0 = 0.6 < 1); tasks 1, 2 kept theirs (slow, r = 1.2 > 1).
    assert w[0] < 1 < w[1]
    assert w[1] == w[2]
    assert (w > 0).all()
    torch.testing.assert_close(w.sum(), torch.tensor(3.0, dtype=torch.float64), rtol=0, atol=1e-12)
    _, expected = paper_reference(
        Quadratic(ORTHOGONAL), [[1.0, 1.0, 1.0], [0.5, 1.0, 1.0]], 1.5, 0.1, weight_optimizer == "adam"
    )
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weight_optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("initial_steps", [1, 2])
def test_trajectory_matches_the_paper_formula_with_autograd(weight_optimizer, initial_steps):
    directions = [[1.0, 0.2, 0.0], [0.6, 0.8, 0.3], [-0.5, 0.1, 1.5]]
    schedule = [[1.0, 1.0, 1.0], [0.9, 0.7, 1.1], [0.6, 0.7, 0.9], [0.5, 0.4, 0.9]]
    opt, applied = run(
        Quadratic(directions),
        schedule,
        alpha=1.2,
        lr=0.05,
        weight_optimizer=weight_optimizer,
        initial_steps=initial_steps,
    )
    ref_applied, ref_final = paper_reference(
        Quadratic(directions), schedule, 1.2, 0.05, weight_optimizer == "adam", initial_steps
    )
    # The Gram matrix is accumulated from float32 products (gradsurgery.gram): ‖g_i‖ agree to ~1e-7.
    for got, want in zip(applied, ref_applied, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(opt.method.weights, ref_final, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(ref_final, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("weight_optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("initial_steps", [1, 2])
def test_tasks_absent_follow_the_paper_formula_over_the_present_tasks(weight_optimizer, initial_steps):
    """Task 2 absent from the first step (its L(0) comes later), task 0 from the third, task 1 from the
    fourth: against autograd on L_grad over the present tasks."""
    directions = [[1.0, 0.2, 0.0], [0.6, 0.8, 0.3], [-0.5, 0.1, 1.5]]
    schedule = [[1.0, 1.0, None], [0.9, 0.7, 1.1], [None, 0.7, 0.9], [0.5, None, 0.9], [0.4, 0.35, 0.8]]
    model = Quadratic(directions)
    opt = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.0),
        method="gradnorm",
        alpha=1.2,
        lr=0.05,
        weight_optimizer=weight_optimizer,
        initial_steps=initial_steps,
    )
    applied = []
    for multipliers in schedule:
        opt.zero_grad()
        losses = model.losses([m if m is not None else 1.0 for m in multipliers])
        info = opt.backward(
            [loss if m is not None else None for loss, m in zip(losses, multipliers, strict=True)]
        )
        opt.step()
        applied.append(info.weights[[i for i, m in enumerate(multipliers) if m is not None]])
    ref_applied, ref_final = paper_reference(
        Quadratic(directions), schedule, 1.2, 0.05, weight_optimizer == "adam", initial_steps
    )
    for got, want in zip(applied, ref_applied, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(opt.method.weights, ref_final, rtol=1e-6, atol=1e-9)
    assert float(opt.method.weights.sum()) == pytest.approx(3.0)


def test_a_state_saved_with_one_initial_count_resumes_as_before():
    """A checkpoint whose ``initial_count`` is one number (every step of the window had every task)."""
    directions = [[1.0, 0.2, 0.0], [0.6, 0.8, 0.3], [-0.5, 0.1, 1.5]]
    schedule = [[1.0, 1.0, 1.0], [0.9, 0.7, 1.1], [0.6, 0.7, 0.9], [0.5, 0.4, 0.9]]
    full, _ = run(Quadratic(directions), schedule[:2], initial_steps=3)
    state = full.method.state_dict()
    assert torch.equal(state["initial_count"], torch.full((3,), 2.0, dtype=torch.float64))
    state["initial_count"] = 2
    resumed = make_method("gradnorm", initial_steps=3)
    resumed.bind(3)
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.initial_losses, full.method.initial_losses, rtol=0, atol=0)
    gram, losses = torch.eye(3, dtype=torch.float64), torch.tensor([0.5, 0.4, 0.9], dtype=torch.float64)
    assert torch.equal(resumed(gram, losses), full.method(gram, losses))
    assert torch.equal(resumed.initial_losses, full.method.initial_losses)


def test_initial_losses_average_the_first_k_steps():
    model = Quadratic(ORTHOGONAL)
    schedule = [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [9.0, 9.0, 9.0]]
    opt, _ = run(model, schedule, initial_steps=2)
    torch.testing.assert_close(opt.method.initial_losses, torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64))


def test_weights_stay_positive_and_sum_to_t_under_a_huge_step():
    model = Quadratic(ORTHOGONAL)
    opt, _ = run(model, [[1.0, 1.0, 1.0], [0.1, 1.0, 1.0]], lr=50.0, weight_optimizer="sgd", min_weight=1e-3)
    w = opt.method.weights
    assert (w > 0).all(), w
    torch.testing.assert_close(w.sum(), torch.tensor(3.0, dtype=torch.float64), rtol=0, atol=1e-12)
    # Step 2 by hand: ‖g‖ = (0.2, 2, 2), Ḡ = 1.4, r = (1, 10, 10)/7, target = Ḡ r^1.5 = (0.076, 2.39, 2.39):
    # ∂/∂w = (+0.2, −2, −2), SGD gives w = (1 − 10, 1 + 100, 1 + 100); w_0 < 0 is floored at 1e-3.
    floored = torch.tensor([1e-3, 101.0, 101.0], dtype=torch.float64)
    torch.testing.assert_close(w, floored * 3 / floored.sum(), rtol=1e-12, atol=0)


def test_weights_move_only_on_step():
    model = Quadratic([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.0), method="gradnorm")
    opt.backward(model.losses([1.0, 1.0, 1.0]))
    assert torch.equal(opt.method.weights, torch.ones(3, dtype=torch.float64))
    opt.zero_grad()
    opt.step()
    assert torch.equal(opt.method.weights, torch.ones(3, dtype=torch.float64))
    opt.backward(model.losses([1.0, 1.0, 1.0]))
    opt.step()
    assert not torch.equal(opt.method.weights, torch.ones(3, dtype=torch.float64))


def test_negative_or_zero_initial_losses_are_rejected_without_state_change():
    method = make_method("gradnorm")
    method.bind(2)
    gram = torch.eye(2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"task\(s\) \[1\]"):
        method(gram, torch.tensor([1.0, -0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="L\\(0\\)"):
        method(gram, torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert method.initial_losses is None and method.pending_grad is None
    method(gram, torch.tensor([1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(method.initial_losses, torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_options_are_validated():
    with pytest.raises(ValueError, match="alpha"):
        GradNorm(alpha=-1)
    with pytest.raises(ValueError, match="lr"):
        GradNorm(lr=float("nan"))
    with pytest.raises(ValueError, match="initial_steps"):
        GradNorm(initial_steps=0)
    with pytest.raises(ValueError, match="min_weight"):
        GradNorm(min_weight=1.0)
    with pytest.raises(ValueError, match="weight_optimizer"):
        GradNorm(weight_optimizer="lbfgs")
