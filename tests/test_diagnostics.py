import csv
import math
import sys

import pytest
import torch
from weighting_helpers import CountBackward, TwoHeads, make_data

from gradsurgery import GradSurgery, StepInfo
from gradsurgery.diagnostics import (
    CSVLogger,
    TensorBoardLogger,
    history_columns,
    info_row,
    plot_history,
    read_csv,
)


def independent_diagnostics(model, x, ys, weights):
    """Per-task gradients on the trunk (the shared parameters) with plain autograd, and what follows."""
    losses = model.losses(x, ys)
    trunk = list(model.trunk.parameters())
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, trunk, retain_graph=True)]).double()
        for loss in losses
    ]
    num_tasks = len(rows)
    norms = [float(r.norm()) for r in rows]
    cos = [
        [float(torch.nn.functional.cosine_similarity(rows[i], rows[j], dim=0)) for j in range(num_tasks)]
        for i in range(num_tasks)
    ]
    conflicts = sum(1 for i in range(num_tasks) for j in range(i + 1, num_tasks) if cos[i][j] < 0)
    fused = sum(float(weights[i]) * rows[i] for i in range(num_tasks))
    return [float(v.detach()) for v in losses], norms, cos, conflicts, float(fused.norm())


def step_infos(method="mgda", steps=3, num_tasks=3, **options):
    model = TwoHeads(num_tasks)
    xs, ys = make_data(num_tasks, steps)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method=method, **options)
    infos = []
    for t in range(steps):
        opt.zero_grad()
        infos.append(opt.backward(model.losses(xs[t], ys[t])))
        opt.step()
    return infos


def test_info_diagnostics_match_plain_autograd():
    model = TwoHeads(3)
    xs, ys = make_data(3, 1)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="mgda")
    info = opt.backward(model.losses(xs[0], ys[0]))
    losses, norms, cos, conflicts, fused = independent_diagnostics(model, xs[0], ys[0], info.weights)
    torch.testing.assert_close(info.losses, torch.tensor(losses, dtype=torch.float64))
    torch.testing.assert_close(
        info.grad_norms, torch.tensor(norms, dtype=torch.float64), rtol=1e-6, atol=1e-9
    )
    torch.testing.assert_close(info.cosines, torch.tensor(cos, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert info.num_conflicts == conflicts
    assert 0 < conflicts < 3  # the data is such that some but not all pairs conflict
    torch.testing.assert_close(float(info.fused_norm), fused, rtol=1e-5, atol=1e-8)
    # The fused gradient is what was written to the trunk's .grad.
    written = torch.cat([p.grad.reshape(-1) for p in model.trunk.parameters()]).double().norm()
    torch.testing.assert_close(float(info.fused_norm), float(written), rtol=1e-5, atol=1e-8)


def test_diagnostics_cost_no_backward():
    model = TwoHeads(2)
    model.counted = True
    xs, ys = make_data(2, 1)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method="pcgrad", seed=0)
    CountBackward.calls = 0
    info = opt.backward(model.losses(xs[0], ys[0]))
    assert CountBackward.calls == 2
    info_row(info, 0)
    _ = (info.cosines, info.grad_norms, info.num_conflicts, info.fused_norm)
    assert CountBackward.calls == 2


def test_csv_logger_writes_exact_values(tmp_path):
    infos = step_infos()
    path = tmp_path / "sub" / "diag.csv"
    with CSVLogger(path, task_names=["a", "b", "c"]) as log:
        for t, info in enumerate(infos):
            log.log(info, 10 * t, lr=0.1)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert list(rows[0])[:4] == ["step", "weight/a", "loss/a", "grad_norm/a"]
    assert {"cos/a,b", "cos/a,c", "cos/b,c", "num_conflicts", "fused_norm", "lr"} <= set(rows[0])
    for t, (row, info) in enumerate(zip(rows, infos, strict=True)):
        assert int(row["step"]) == 10 * t
        assert float(row["weight/b"]) == info.weights[1].item()
        assert float(row["loss/c"]) == info.losses[2].item()
        assert float(row["grad_norm/a"]) == info.grad_norms[0].item()
        assert float(row["cos/a,c"]) == info.cosines[0, 2].item()
        assert float(row["num_conflicts"]) == info.num_conflicts
        assert float(row["fused_norm"]) == float(info.fused_norm)
        assert float(row["lr"]) == 0.1
    columns = read_csv(path)
    assert columns["step"] == [0, 10, 20]
    assert columns["weight/a"] == [info.weights[0].item() for info in infos]


def test_csv_logger_default_steps_append_and_column_check(tmp_path):
    infos = step_infos(steps=3)
    path = tmp_path / "diag.csv"
    with CSVLogger(path) as log:
        log.log(infos[0])
        log.log(infos[1])
        with pytest.raises(ValueError, match="differ from the file's header"):
            log.log(infos[2], lr=1.0)
    with CSVLogger(path, append=True) as log:
        log.log(infos[2], 2)
    columns = read_csv(path)
    assert columns["step"] == [0, 1, 2]
    assert columns["weight/0"] == [info.weights[0].item() for info in infos]
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.log(infos[0])


def test_info_row_rejects_bad_input():
    info = step_infos(steps=1)[0]
    with pytest.raises(TypeError, match="StepInfo"):
        info_row({"weights": 1})
    with pytest.raises(ValueError, match="2 task names for 3 tasks"):
        info_row(info, 0, ["a", "b"])
    with pytest.raises(ValueError, match="collides"):
        info_row(info, 0, fused_norm=1.0)


class FakeWriter:
    def __init__(self):
        self.scalars = []
        self.flushed = self.closed = False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        self.flushed = True

    def close(self):
        self.closed = True


def test_tensorboard_logger_tags_and_values_with_a_given_writer():
    infos = step_infos(steps=2, num_tasks=2)
    writer = FakeWriter()
    with TensorBoardLogger(task_names=["seg", "depth"], writer=writer) as log:
        log.log(infos[0])
        log.log(infos[1], step=7)
    tags = {tag for tag, _, _ in writer.scalars}
    assert "gradsurgery/weight/seg" in tags and "gradsurgery/cos/seg,depth" in tags
    assert "gradsurgery/num_conflicts" in tags and "gradsurgery/step" not in tags
    got = {(tag, step): value for tag, value, step in writer.scalars}
    assert got[("gradsurgery/weight/depth", 0)] == infos[0].weights[1].item()
    assert got[("gradsurgery/cos/seg,depth", 7)] == infos[1].cosines[0, 1].item()
    assert len(writer.scalars) == 2 * len(infos[0].as_dict())
    assert writer.flushed and not writer.closed  # a writer we were given is the caller's to close
    with pytest.raises(TypeError, match="add_scalar"):
        TensorBoardLogger(writer=object())


def test_tensorboard_missing_gives_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        TensorBoardLogger("runs/never")


def test_tensorboard_logger_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    infos = step_infos(steps=2, num_tasks=2)
    with TensorBoardLogger(tmp_path / "tb", task_names=["a", "b"]) as log:
        for info in infos:
            log.log(info)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert "gradsurgery/cos/a,b" in events.Tags()["scalars"]
    got = [(e.step, e.value) for e in events.Scalars("gradsurgery/weight/b")]
    assert [step for step, _ in got] == [0, 1]
    for (_, value), info in zip(got, infos, strict=True):  # TensorBoard stores float32
        assert value == pytest.approx(info.weights[1].item(), rel=1e-6)


def test_history_columns_from_infos_and_rows():
    infos = step_infos(steps=2, num_tasks=2)
    columns = history_columns(infos, ["x", "y"])
    assert columns["step"] == [0, 1]
    assert columns["weight/y"] == [info.weights[1].item() for info in infos]
    rows = [{"weight/0": 1.0}, {"weight/0": 2.0, "extra": 5.0}]
    columns = history_columns(rows)
    assert columns["weight/0"] == [1.0, 2.0]
    assert math.isnan(columns["extra"][0]) and columns["extra"][1] == 5.0
    with pytest.raises(TypeError, match=r"history\[0\]"):
        history_columns([3])


def test_plot_history_draws_weights_shares_and_cosines(tmp_path):
    pytest.importorskip("matplotlib")
    infos = step_infos(steps=3, num_tasks=3)
    path = tmp_path / "diag.csv"
    with CSVLogger(path) as log:
        for info in infos:
            log.log(info)
    for source in (path, infos):
        fig = plot_history(source, path=tmp_path / "diag.png")
        ax_w, ax_s, ax_c = fig.axes
        assert [line.get_label() for line in ax_w.lines] == ["0", "1", "2"]
        assert list(ax_w.lines[1].get_ydata()) == [info.weights[1].item() for info in infos]
        # The share of task i: w_i (Gw)_i / wᵀGw, from the Gram matrix written out here.
        for info, value in zip(infos, ax_s.lines[2].get_ydata(), strict=True):
            g, w = info.gram, info.weights.to(info.gram.dtype)
            assert value == pytest.approx(float(w[2] * (g @ w)[2] / (w @ g @ w)), rel=1e-12)
        cos_lines = [line for line in ax_c.lines if line.get_label() in {"0,1", "0,2", "1,2"}]
        assert len(cos_lines) == 3
        assert list(cos_lines[2].get_ydata()) == [info.cosines[1, 2].item() for info in infos]
        assert (tmp_path / "diag.png").stat().st_size > 0
    with pytest.raises(ValueError, match="weight"):
        plot_history({"loss/0": [1.0]})


def test_shares_sum_to_one_and_match_the_explicit_vectors():
    """s_i = ⟨w_i g_i, u⟩ / ‖u‖², computed from the explicit gradients; Σ s_i = 1."""
    gen = torch.Generator().manual_seed(3)
    jac = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    weights = torch.tensor([0.5, 2.0, 1.0, 30.0], dtype=torch.float64)
    info = StepInfo(weights=weights, losses=torch.ones(4, dtype=torch.float64), gram=jac @ jac.T)
    u = weights @ jac
    expected = torch.stack([(weights[i] * jac[i]) @ u for i in range(4)]) / (u @ u)
    torch.testing.assert_close(info.shares, expected, rtol=1e-12, atol=0)
    assert float(info.shares.sum()) == pytest.approx(1.0, rel=1e-12)
    assert torch.isnan(StepInfo(weights=weights, losses=weights, gram=None).shares).all()
