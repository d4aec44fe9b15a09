"""Smoke tests of the two λ-free benchmarks in quick mode: they run and their result files parse."""

from __future__ import annotations

import csv
import importlib.util
import math
import pathlib
import unittest.mock

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"benchmarks.{name}", ROOT / "benchmarks" / f"{name}.py", submodule_search_locations=None
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_csv(path: pathlib.Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def table_rows(md: str) -> list[list[str]]:
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_l2_benchmark_quick(tmp_path):
    mod = load("l2_regularization")
    assert mod.main(["--quick", "--seeds", "0", "--label-noise", "0", "0.3", "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "l2_regularization.csv")
    grid = {k: v[::3] for k, v in mod.WD_GRID.items()}
    per_seed = {opt: 1 + len(grid[opt]) + len(mod.L2_MODES) for opt in grid}
    assert len(rows) == 2 * sum(per_seed.values())  # two label-noise scenarios
    assert {float(r["label_noise"]) for r in rows} == {0.0, 0.3}
    modes = {r["mode"] for r in rows}
    assert modes == {"none", "weight decay", *mod.L2_MODES}
    for r in rows:
        for key in ("train_acc", "val_acc", "test_acc"):
            assert 0.0 <= float(r[key]) <= 1.0
        assert math.isfinite(float(r["weight_norm"])) and float(r["weight_norm"]) > 0
    md = (tmp_path / "l2_regularization.md").read_text()
    assert "python -m benchmarks.l2_regularization --quick" in md
    lines = table_rows(md)
    assert any("(best on val: the tuned λ)" in r[0] for r in lines)
    # one row per variant, optimizer and scenario
    assert sum(r[0] == '`method="l2"`, the defaults' for r in lines) == 4
    assert sum(r[0] == '`method="l2"`, per_tensor=True, decoupled=False' for r in lines) == 4
    assert "**SGD, 30 % training label noise**" in md and "**ADAM, clean training labels**" in md


def test_noisy_labels_benchmark_quick(tmp_path):
    mod = load("noisy_labels")
    assert mod.main(["--quick", "--seeds", "0", "--noise", "0.4", "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "noisy_labels.csv")
    assert [r["mode"] for r in rows] == mod.MODES
    for r in rows:
        assert 0.0 <= float(r["test_acc"]) <= 1.0 and float(r["peak_test_acc"]) >= float(r["test_acc"])
    masking = next(r for r in rows if r["mode"] == "loss masking")
    assert 0.0 <= float(masking["kept_fraction"]) <= 1.0
    lines = table_rows((tmp_path / "noisy_labels.md").read_text())
    assert [r[1] for r in lines[1:]] == mod.MODES and all(r[0] == "40 %" for r in lines[1:])


def test_symmetric_noise_flips_exactly_the_stated_fraction():
    import torch

    mod = load("_digits")
    y = torch.arange(200) % 10
    noisy = mod.symmetric_noise(y, 0.4, torch.Generator().manual_seed(0))
    assert int((noisy != y).sum()) == 80
    assert int(noisy.min()) >= 0 and int(noisy.max()) <= 9


@pytest.mark.parametrize("module", ["benchmarks.l2_regularization", "benchmarks.noisy_labels"])
def test_epochs_and_width_override_the_size(module, tmp_path):
    mod = importlib.import_module(module)
    seen = []
    real = mod.train_one

    def spy(*args, **kwargs):
        seen.append((kwargs["epochs"], kwargs["width"]))
        return real(*args, **{**kwargs, "epochs": 1})

    with unittest.mock.patch.object(mod, "train_one", spy):
        noise = ["--label-noise", "0"] if "l2" in module else ["--noise", "0.4"]
        argv = ["--quick", "--seeds", "0", "--epochs", "3", "--width", "32", *noise, "--out", str(tmp_path)]
        assert mod.main(argv) == 0
    assert seen and set(seen) == {(3, 32)}


@pytest.mark.parametrize("mode", ["evb", "evb-out", "evb-out1"])
def test_evidence_modes_train_and_report_their_lambda(mode):
    mod = importlib.import_module("benchmarks.l2_lambda_free")
    data = mod.prepare(0, 64, 32, 0.3)
    row = mod.train_one(0, "mlp", "sgd", mode, None, data, epochs=1, width=16)
    assert row["mean_lambda"] > 0 and math.isfinite(row["mean_lambda"])
    assert 0.0 <= row["test_acc"] <= 1.0 and row["weight_norm"] < row["init_norm"]
    # The same run without the rule ends elsewhere: the λ reached the weights.
    plain = mod.train_one(0, "mlp", "sgd", "none", None, data, epochs=1, width=16)
    assert not math.isclose(plain["weight_norm"], row["weight_norm"], rel_tol=1e-9)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("package,prototype", [("l2-ev-pt", "evk-pt"), ("l2-ev", "evk")])
def test_the_package_evidence_rule_is_the_prototype(arch, package, prototype):
    """``method="l2", evidence=True`` through GradSurgery against the benchmark's own K-FAC evidence λ (its
    hooks, averages and curvatures written apart; the fixed point is the package's ``evidence_lambda``,
    tested against scipy in ``tests/test_evidence.py``): the same run at a cosine rate over 15 steps (λ
    solved at the first and the tenth, from averaged factors), to float32's rounding: the package keeps a
    float32 layer's factors in float32, the prototype in float64."""
    mod = importlib.import_module("benchmarks.l2_lambda_free")
    data = mod.prepare(1, 160, 32, 0.3)
    ours = mod.train_one(1, arch, "sgd", package, None, data, epochs=3, width=16, schedule="cosine")
    theirs = mod.train_one(1, arch, "sgd", prototype, None, data, epochs=3, width=16, schedule="cosine")
    assert ours["test_acc"] == theirs["test_acc"] and ours["train_acc"] == theirs["train_acc"]
    assert ours["mean_lambda"] == pytest.approx(theirs["mean_lambda"], rel=1e-5)
    assert ours["weight_norm"] == pytest.approx(theirs["weight_norm"], rel=1e-6)
    assert ours["weight_norm"] < ours["init_norm"] and ours["mean_lambda"] > 0


def test_log_product_mode_corrects_every_step_and_never_lets_the_product_grow():
    mod = importlib.import_module("benchmarks.l2_lambda_free")
    data = mod.prepare(0, 64, 32, 0.3)
    real, products, factors = mod.P.decoupled_log_product, [], []

    def spy(news, olds):
        factors.append(real(news, olds))
        products.append([math.prod(float(t.double().norm()) for t in ts) for ts in (olds, news)])
        return factors[-1]

    with unittest.mock.patch.object(mod.P, "decoupled_log_product", spy):
        mod.train_one(0, "mlp", "sgd", "lp-dec", None, data, epochs=1, width=16)
    assert len(products) == 2  # 64 images in batches of 32
    assert min(factors) < 1  # the steps grew the product: the rule acted
    # back to the product before the step, up to the weights' float32 rounding
    assert all(after <= before * (1 + 1e-6) for before, after in products)


def test_cosine_schedule_anneals_the_learning_rate_once_per_epoch():
    """With ``schedule="cosine"`` epoch e (of E) runs at LR·(1 + cos(πe/E))/2; the constant schedule at LR."""
    mod = importlib.import_module("benchmarks.l2_lambda_free")
    data = mod.prepare(0, 64, 32, 0.3)
    built, rates = [], {}
    real_optimizer, real_batches = mod.D.optimizer, mod.D.batches

    def optimizer(*args, **kwargs):
        built.append(real_optimizer(*args, **kwargs))
        return built[-1]

    def batches(*args):  # called once at the start of every epoch
        rates.setdefault(len(built), []).append(built[-1].param_groups[0]["lr"])
        return real_batches(*args)

    epochs, lr = 4, mod.LR["sgd"]
    with (
        unittest.mock.patch.object(mod.D, "optimizer", optimizer),
        unittest.mock.patch.object(mod.D, "batches", batches),
    ):
        mod.train_one(0, "mlp", "sgd", "l2-dec", None, data, epochs=epochs, width=16, schedule="cosine")
        mod.train_one(0, "mlp", "sgd", "l2-dec", None, data, epochs=epochs, width=16)
    expected = [lr * (1 + math.cos(math.pi * e / epochs)) / 2 for e in range(epochs)]
    assert rates[1] == pytest.approx(expected, rel=1e-12)
    assert rates[2] == [lr] * epochs


def test_rows_of_another_schedule_are_summarized_apart():
    mod = importlib.import_module("benchmarks.l2_lambda_free")
    rows = []
    for schedule, base in (("constant", 0.5), ("cosine", 0.7), (None, 0.5)):  # None: a row from before
        for seed in (0, 1):
            for mode, lam, acc in (("none", "", base), ("wd", 0.01, base + 0.1), ("l2-dec", "", base + 0.05)):
                row = {"arch": "mlp", "label_noise": "0.3", "optimizer": "sgd", "mode": mode, "lambda": lam}
                row |= {"seed": str(seed + (2 if schedule is None else 0)), "test_acc": str(acc)}
                row |= {"val_acc": str(acc), "weight_norm": "1.0"}
                if schedule is not None:
                    row["schedule"] = schedule
                rows.append(row)
    text = mod.overview(rows)
    header = table_rows(text)[0]
    assert header == ["mode", "MLP SGD 30 % noise", "MLP SGD, COSINE LR 30 % noise"]
    # each column's gain and share come from its own rows: 10 points, half of them recovered
    assert "50 %" in table_rows(text)[3][1] and "50 %" in table_rows(text)[3][2]
    assert "**MLP, SGD, COSINE LR, 30 % label noise**" in mod.summarize(rows)


@pytest.mark.parametrize(("arch", "mode"), [("mlp", "l2-pt-dec"), ("cnn", "evk")])  # evk: forward hooks
def test_trace_records_the_test_accuracy_of_every_epoch_and_leaves_training_alone(arch, mode):
    mod = importlib.import_module("benchmarks.l2_lambda_free")
    data = mod.prepare(0, 64, 32, 0.3)
    traced = mod.train_one(0, arch, "sgd", mode, None, data, epochs=3, width=16, trace=True)
    plain = mod.train_one(0, arch, "sgd", mode, None, data, epochs=3, width=16)
    by_epoch = [float(a) for a in traced.pop("test_acc_by_epoch").split()]
    assert len(by_epoch) == 3 and by_epoch[-1] == pytest.approx(traced["test_acc"], abs=5e-5)
    assert traced == pytest.approx(plain, nan_ok=True)
    assert traced["weight_norm"] == plain["weight_norm"]  # the same run, to the bit
    # the first epochs' accuracies are those of shorter runs
    one = mod.train_one(0, arch, "sgd", mode, None, data, epochs=1, width=16)
    assert by_epoch[0] == pytest.approx(one["test_acc"], abs=5e-5)


def test_step_times_cover_every_variant_against_the_plain_step(tmp_path):
    mod = importlib.import_module("benchmarks.l2_lambda_free")
    assert mod.main(["--step-times", "2", "--arch", "mlp", "--width", "16", "--out", str(tmp_path)]) == 0
    rows = table_rows((tmp_path / "step_times.md").read_text())[1:]
    assert [r[1] for r in rows] == ["none", "wd", "l2-dec", "l2-ev-pt", "l2-ev-pt age 0"]
    assert rows[0][3].startswith("1.00") and all(float(r[2]) > 0 for r in rows)


def test_factor_precision_compares_the_same_solves_in_other_precisions(tmp_path):
    """The float64 and TF32 factors are recorded beside the rule's on the same batches: their λ are close to
    the rule's at every solve (a shadow that recorded nothing would give λ = 0, a difference of 1), and the
    TF32 rounding keeps 10 mantissa bits."""
    mod = importlib.import_module("benchmarks.l2_lambda_free")
    x = torch.tensor([1.0 + 2**-11, 1.0 + 2**-10 + 2**-12, -3.0])
    assert mod._tf32(x).tolist() == [1.0 + 2**-10, 1.0 + 2**-10, -3.0]
    row = mod.factor_precision("cnn", 0, 0.3, epochs=2, width=16)
    assert row["solves"] == 2  # at steps 1 and 10 of 14
    assert 0 < row["float64"] < 1e-4 and 0 < row["tf32"] < 1e-2
    argv = ["--factor-precision", "--arch", "mlp", "--seeds", "1", "--label-noise", "0", "--epochs", "1"]
    assert mod.main([*argv, "--width", "16", "--out", str(tmp_path)]) == 0
    rows = table_rows((tmp_path / "factor_precision.md").read_text())
    assert rows[1][:4] == ["mlp", "1", "0.0", "1"]


def test_spectrum_age_compares_the_solves_between_eigendecompositions(tmp_path):
    """5 epochs of 7 steps: spectra taken at steps 1, 10 and 20, the solve of step 30 reads those of 20 (one
    solve, four layers); a λ from aged spectra differs from a fresh one's, scaled or not."""
    mod = importlib.import_module("benchmarks.l2_lambda_free")
    row = mod.spectrum_age("cnn", 0, 0.3, epochs=5, width=16)
    assert row["solves"] == 4
    assert 0 < row["scaled_max"] < 1 and 0 < row["unscaled_max"] < 1
    argv = ["--spectrum-age", "--arch", "mlp", "--seeds", "1", "--label-noise", "0", "--epochs", "5"]
    assert mod.main([*argv, "--width", "16", "--out", str(tmp_path)]) == 0
    rows = table_rows((tmp_path / "spectrum_age.md").read_text())
    assert rows[1][:4] == ["mlp", "1", "0.0", "3"]
