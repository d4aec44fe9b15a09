"""The representation-overhead benchmark: its hand-written floor, in two backward calls or in one, is the
algorithm GradSurgery runs (the same .grad as ``mgda`` with task views, through z, and through z one pass per
task), and a tiny run writes its table."""

from __future__ import annotations

import json

import pytest
import torch

import gradsurgery.solvers.closed_form as closed_form
import gradsurgery.solvers.frank_wolfe as fw
from benchmarks import representation_overhead as ro


def grads_after(make_step, case):
    case.inner.step = lambda *args, **kwargs: None  # the gradients only, parameters unchanged
    make_step(case)()
    return [p.grad.clone() for p in case.model.parameters()]


def test_floor_gives_the_gradients_of_mgda_with_task_views_and_through_z():
    dims = ro.TINY_SIZES["tiny"]
    floor = grads_after(ro.floor_step, ro.Case(dims, 3))
    one_pass = grads_after(ro.floor_one_pass_step, ro.Case(dims, 3))
    ours = grads_after(lambda case: ro.method_step(case, "mgda", views=True), ro.Case(dims, 3))
    through_z = grads_after(lambda case: ro.method_step(case, "mgda", views=False), ro.Case(dims, 3))
    per_task = grads_after(
        lambda case: ro.method_step(case, "mgda", views=False, per_task=True), ro.Case(dims, 3)
    )
    plain = grads_after(ro.plain_step, ro.Case(dims, 3))
    for other in (one_pass, ours, through_z, per_task):
        for a, b in zip(floor, other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # The trunk's fused gradient is not the summed loss's: the comparison above has teeth.
    assert max(float((a - b).abs().max()) for a, b in zip(floor[:2], plain[:2], strict=True)) > 1e-4


def test_tiny_run_writes_rows_and_report(tmp_path):
    ro.main(
        [
            "--sizes",
            "tiny",
            "--tasks",
            "2",
            "--methods",
            "upgrad",
            "--reps",
            "2",
            "--inner-steps",
            "1",
            "--batch",
            "7",
            "--out",
            str(tmp_path),
        ]
    )
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["variant"] for r in rows] == ["plain", "floor", "floor one pass", "upgrad", "z", "z per task"]
    assert {r["batch"] for r in rows} == {7}
    upgrad = rows[3]
    assert upgrad["ratio_p25"] <= upgrad["ratio"] <= upgrad["ratio_p75"]
    text = (tmp_path / "report.md").read_text()
    assert "(1 thread, batch 7, linear heads, 2 repetitions × 1 steps" in text
    assert f"| upgrad | {upgrad['ratio']:.2f} ({upgrad['ratio_p25']:.2f}-{upgrad['ratio_p75']:.2f}) |" in text


@pytest.mark.parametrize("method", ro.loss_value_weightings())
def test_loss_weighting_variants_give_the_per_task_full_modes_gradients(method):
    """Every timed way of a loss weighting writes the gradient that full mode's T per-task passes give it
    (``diagnostics=True`` in full mode: the Jacobian source, another path)."""
    dims = ro.TINY_SIZES["tiny"]
    reference = grads_after(lambda case: ro.loss_weighting_step(case, method, None, True), ro.Case(dims, 3))
    for features in (None, "z", "views"):
        for diagnostics in (False, True):
            got = grads_after(
                lambda case, f=features, d=diagnostics: ro.loss_weighting_step(case, method, f, d),
                ro.Case(dims, 3),
            )
            for a, b in zip(got, reference, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_tiny_loss_weightings_run_writes_its_variants(tmp_path):
    ro.main(
        ["--sizes", "tiny", "--tasks", "2", "--loss-weightings", "dwa", "--reps", "2", "--inner-steps", "1"]
        + ["--out", str(tmp_path)]
    )
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["variant"] for r in rows] == [
        "plain",
        "dwa full",
        "dwa z",
        "dwa z, G_z",
        "dwa views",
        "dwa views, G_z",
    ]
    assert "`<m> full`: full mode" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--loss-weightings", "mgda"], "--loss-weightings: ['mgda'] are not among"),
        (["--loss-weightings", "--methods", "mgda"], "not with --methods or --numpy-twins"),
        (["--loss-weightings", "dwa", "--numpy-twins"], "not with --methods or --numpy-twins"),
    ],
)
def test_loss_weightings_option_rejects_what_it_does_not_time(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        ro.main(argv + ["--sizes", "tiny", "--tasks", "2"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("device", "message"),
    [("gpu", "expected cpu or cuda[:N], got 'gpu'"), ("xla", "expected cpu or cuda[:N], got 'xla'")]
    + ([] if torch.cuda.is_available() else [("cuda", "--device cuda: CUDA is not available")]),
)
def test_device_option_rejects_what_it_cannot_run_on(device, message, capsys):
    with pytest.raises(SystemExit) as exc:
        ro.main(["--device", device, "--sizes", "tiny", "--tasks", "2"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_case_draws_a_batch_of_the_size_asked_for():
    case = ro.Case(ro.TINY_SIZES["tiny"], 3, batch=5)
    assert case.x.shape[0] == case.y.shape[0] == 5
    assert [loss.shape for loss in case.head_losses([case.model.trunk(case.x)] * 3)] == [torch.Size([])] * 3


@pytest.mark.parametrize("batch", ["0", "-3"])
def test_batch_option_rejects_a_batch_without_examples(batch, capsys):
    with pytest.raises(SystemExit) as exc:
        ro.main(["--batch", batch, "--sizes", "tiny", "--tasks", "2"])
    assert exc.value.code == 2
    assert f"--batch: expected a positive number of examples, got {batch}" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_floor_and_method_give_the_cpu_gradients(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    dims, cuda = ro.TINY_SIZES["tiny"], torch.device("cuda")
    on_cpu = grads_after(ro.floor_step, ro.Case(dims, 3))
    floor = grads_after(ro.floor_step, ro.Case(dims, 3, device=cuda))
    one_pass = grads_after(ro.floor_one_pass_step, ro.Case(dims, 3, device=cuda))
    ours = grads_after(lambda case: ro.method_step(case, "mgda", views=True), ro.Case(dims, 3, device=cuda))
    for other in (floor, one_pass, ours):
        for a, b in zip(on_cpu, other, strict=True):
            assert b.device.type == "cuda"
            torch.testing.assert_close(a, b.cpu(), rtol=1e-4, atol=1e-6)


def test_the_numpy_twin_runs_mgda_without_the_python_float_paths(monkeypatch):
    answered, limits = [], (fw.FULL_FACE_MAX_TASKS, closed_form.SMALL_GRAM_MAX_TASKS)
    full_face = fw._full_face
    monkeypatch.setattr(
        fw, "_full_face", lambda sym, tol: answered.append(full_face(sym, tol)) or answered[-1]
    )
    dims = ro.TINY_SIZES["tiny"]
    fast = grads_after(lambda case: ro.method_step(case, "mgda", views=True), ro.Case(dims, 3))
    assert answered and answered[-1] is not None  # the full face answered this step
    answered.clear()
    numpy_only = grads_after(
        lambda case: ro.numpy_only_step(ro.method_step(case, "mgda", views=True)), ro.Case(dims, 3)
    )
    assert answered == []  # G read by NumPy only: the full face is not reached
    assert (fw.FULL_FACE_MAX_TASKS, closed_form.SMALL_GRAM_MAX_TASKS) == limits  # restored
    for a, b in zip(fast, numpy_only, strict=True):  # weights equal to rounding, gradients to float32's
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
