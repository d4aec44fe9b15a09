import math

import pytest
import torch
from weighting_helpers import TwoHeads, make_data, roundtrip

from gradsurgery import GradSurgery, make_method
from gradsurgery.methods.dwa import DWA

GRAM = torch.eye(3, dtype=torch.float64)
SEQUENCE = [
    [1.0, 2.0, 3.0],
    [0.9, 1.0, 3.3],
    [0.5, 0.9, 2.0],
    [0.45, 0.3, 1.9],
    [0.40, 0.25, 1.0],
    [0.35, 0.24, 0.9],
    [0.3, 0.2, 0.8],
    [0.2, 0.19, 0.7],
]


def formula(prev, prev2, temperature):
    """λ_k = T exp(w_k/τ) / Σ_i exp(w_i/τ), w_k = L̄_k(t−1)/L̄_k(t−2), written out in plain Python."""
    rates = [a / b for a, b in zip(prev, prev2, strict=True)]
    exps = [math.exp(r / temperature) for r in rates]
    return [len(rates) * e / sum(exps) for e in exps]


def expected_weights(sequence, period, temperature):
    means = []  # complete period means, oldest first
    out = []
    for n in range(len(sequence)):
        out.append(
            formula(means[-1], means[-2], temperature) if len(means) >= 2 else [1.0] * len(sequence[0])
        )
        if (n + 1) % period == 0:
            block = sequence[n + 1 - period : n + 1]
            means.append([sum(col) / period for col in zip(*block, strict=True)])
    return out


@pytest.mark.parametrize("period,temperature", [(1, 2.0), (1, 0.5), (2, 2.0), (3, 1.0)])
def test_weights_follow_the_formula_on_a_scripted_loss_sequence(period, temperature):
    method = make_method("dwa", temperature=temperature, period=period)
    method.bind(3)
    expected = expected_weights(SEQUENCE, period, temperature)
    for n, losses in enumerate(SEQUENCE):
        got = method(GRAM, torch.tensor(losses, dtype=torch.float64))
        torch.testing.assert_close(
            got, torch.tensor(expected[n], dtype=torch.float64), rtol=1e-13, atol=1e-13
        )
        if n < 2 * period:
            assert torch.equal(got, torch.ones(3, dtype=torch.float64)), n
    assert any(abs(w - 1.0) > 1e-3 for w in expected[-1])


# Per call, the tasks present: task 2 absent for calls 2 and 3 (a whole period of 2), task 0 once, then
# task 1 twice in a row.
ABSENT_PATTERN = [[0, 1, 2], [0, 1, 2], [0, 1], [0, 1], [1, 2], [0, 1, 2], [0, 2], [0, 2]]


def expected_with_absent(sequence, pattern, period, temperature):
    """DWA on the present tasks, written out in plain Python: a period mean per task over the calls that
    had it (none when it had none), rate 1 where a mean is missing, λ = P exp(w/τ)/Σ over the P present."""
    means: list[list[float | None]] = []
    out = []
    for n, present in enumerate(pattern):
        if len(means) >= 2:
            rates = []
            for k in present:
                prev, prev2 = means[-1][k], means[-2][k]
                rates.append(prev / prev2 if prev is not None and prev2 is not None and prev2 > 0 else 1.0)
            exps = [math.exp(r / temperature) for r in rates]
            out.append([len(present) * e / sum(exps) for e in exps])
        else:
            out.append([1.0] * len(present))
        if (n + 1) % period == 0:
            calls = range(n + 1 - period, n + 1)
            mean: list[float | None] = []
            for k in range(3):
                seen = [sequence[c][k] for c in calls if k in pattern[c]]
                mean.append(sum(seen) / len(seen) if seen else None)
            means.append(mean)
    return out


@pytest.mark.parametrize("period", [1, 2, 3])
def test_tasks_absent_follow_the_formula_over_the_present_tasks(period):
    method = DWA(temperature=2.0, period=period)
    method.bind(3)
    expected = expected_with_absent(SEQUENCE, ABSENT_PATTERN, period, 2.0)
    for n, present in enumerate(ABSENT_PATTERN):
        losses = torch.tensor([SEQUENCE[n][k] for k in present], dtype=torch.float64)
        got = method.weights_of(present, None, losses)
        torch.testing.assert_close(got, torch.tensor(expected[n], dtype=torch.float64), rtol=1e-14, atol=0)


def test_a_state_saved_before_block_counts_resumes_with_every_task_counted():
    """A checkpoint without ``block_count`` (every call had every task) resumes as the state it came from."""
    full, resumed = DWA(period=3), DWA(period=3)
    full.bind(3)
    resumed.bind(3)
    for losses in SEQUENCE[:4]:
        full(GRAM, torch.tensor(losses, dtype=torch.float64))
    state = full.state_dict()
    del state["block_count"]
    resumed.load_state_dict(state)
    for losses in SEQUENCE[4:]:
        values = torch.tensor(losses, dtype=torch.float64)
        assert torch.equal(resumed(GRAM, values), full(GRAM, values))


def test_period_one_by_hand():
    method = DWA(temperature=2.0)
    method.bind(2)
    method(GRAM[:2, :2], torch.tensor([2.0, 4.0], dtype=torch.float64))
    method(GRAM[:2, :2], torch.tensor([1.0, 4.0], dtype=torch.float64))
    got = method(GRAM[:2, :2], torch.tensor([7.0, 7.0], dtype=torch.float64))
    # w = (1/2, 4/4): the task whose loss did not fall gets the larger weight.
    e0, e1 = math.exp(0.25), math.exp(0.5)
    torch.testing.assert_close(
        got, torch.tensor([2 * e0 / (e0 + e1), 2 * e1 / (e0 + e1)], dtype=torch.float64)
    )
    assert got[1] > got[0]


def test_wrapper_reports_and_applies_the_weights():
    model = TwoHeads(2)
    xs, ys = make_data(2, 4)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.0), method="dwa", temperature=2.0)
    seen = []
    for t in range(3):
        opt.zero_grad()
        info = opt.backward(model.losses(xs[t], ys[t]))
        opt.step()
        seen.append(info.losses.tolist())
    expected = formula(seen[1], seen[0], 2.0)
    torch.testing.assert_close(info.weights, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    per_task = [
        torch.autograd.grad(loss, list(model.parameters()), allow_unused=True, retain_graph=True)
        for loss in model.losses(xs[2], ys[2])
    ]
    w = [float(v) for v in expected]
    for k, p in enumerate(model.trunk.parameters()):
        torch.testing.assert_close(p.grad, w[0] * per_task[0][k] + w[1] * per_task[1][k])
    offset = len(list(model.trunk.parameters()))
    for i, head in enumerate(model.heads):
        for k, p in enumerate(head.parameters()):
            torch.testing.assert_close(p.grad, w[i] * per_task[i][offset + 2 * i + k])


def test_state_round_trip_in_the_middle_of_a_period():
    a = DWA(period=3)
    a.bind(3)
    for losses in SEQUENCE[:7]:
        a(GRAM, torch.tensor(losses, dtype=torch.float64))
    b = DWA(period=3)
    b.bind(3)
    b.load_state_dict(roundtrip(a.state_dict()))
    for losses in SEQUENCE[7:] + SEQUENCE[:5]:
        wa = a(GRAM, torch.tensor(losses, dtype=torch.float64))
        wb = b(GRAM, torch.tensor(losses, dtype=torch.float64))
        assert torch.equal(wa, wb)


def test_zero_mean_two_periods_ago_counts_as_rate_one():
    method = DWA(temperature=1.0)
    method.bind(2)
    for losses in ([0.0, 1.0], [3.0, 2.0]):
        method(GRAM[:2, :2], torch.tensor(losses, dtype=torch.float64))
    got = method(GRAM[:2, :2], torch.tensor([1.0, 1.0], dtype=torch.float64))
    e1, e2 = math.exp(1.0), math.exp(2.0)
    torch.testing.assert_close(
        got, torch.tensor([2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)], dtype=torch.float64)
    )


def test_negative_loss_is_rejected_and_not_recorded():
    method = DWA()
    method.bind(2)
    method(GRAM[:2, :2], torch.tensor([1.0, 1.0], dtype=torch.float64))
    before = method.state_dict()
    with pytest.raises(ValueError, match=r"task\(s\) \[0\]"):
        method(GRAM[:2, :2], torch.tensor([-1.0, 1.0], dtype=torch.float64))
    after = method.state_dict()
    assert after["calls"] == before["calls"] == 1
    assert torch.equal(after["last_mean"], before["last_mean"])


def test_options_are_validated():
    with pytest.raises(ValueError, match="temperature"):
        DWA(temperature=0)
    with pytest.raises(ValueError, match="period"):
        DWA(period=0)
    with pytest.raises(TypeError, match="period"):
        DWA(period=2.0)
