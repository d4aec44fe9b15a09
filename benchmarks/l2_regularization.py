"""Benchmark: L2 regularization without λ versus weight decay tuned over a log grid.

An over-parameterised MLP (64 → 512 → 512 → 10, ≈ 300k weights) is trained on 200 images of scikit-learn's
digits data (no download); 300 more are the validation set that picks λ, the remaining 1297 are the test set.
Two scenarios: clean training labels, and 30 % symmetric label noise on the training labels only (validation
and test labels stay clean), where regularization matters more because the network can memorise the noise.
For plain SGD and for Adam, the rows are: no regularization; weight decay (SGD's ``weight_decay``, AdamW's
decoupled decay) on the weight matrices over a log grid of λ, the best λ chosen on the validation set (the
oracle choice on the test set is reported too); ``method="l2"`` (the rule on the gradient, global and per
tensor); ``method="l2", decoupled=True`` (the rule on the optimizer's step). Every mode regularizes the same
tensors (dim ≥ 2). Accuracies are mean ± std over the seeds; each seed draws its own split and initialisation,
so the gap to the tuned λ is also given paired by seed (mean ± std of the per-seed differences).

    python -m benchmarks.l2_regularization --seeds 0 1 2 3 4 --label-noise 0 0.3 --out results/l2
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

from gradsurgery import GradSurgery

try:
    from . import _digits as D
except ImportError:  # run as a script
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import _digits as D  # type: ignore[no-redef]

LR = {"sgd": 0.05, "adam": 1e-3}
WD_GRID = {
    "sgd": [1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
    "adam": [1e-3, 1e-2, 1e-1, 3e-1, 1.0, 3.0],
}
# Every variant spelled out (the labels name what 0.1.0 called them), and the package's default beside them:
# decoupled, per tensor for Adam, global for SGD.
L2_MODES = {
    "l2": dict(per_tensor=False, decoupled=False),
    "l2 per-tensor": dict(per_tensor=True, decoupled=False),
    "l2 decoupled": dict(per_tensor=False, decoupled=True),
    "l2 default": dict(),
}


def prepare(seed: int, n_train: int, n_val: int, label_noise: float = 0.0):
    x, y = D.load_digits_tensors()
    tr, va, te = D.split(len(y), [n_train, n_val, -1], seed)
    xtr, xva, xte = D.standardize(x[tr], x[va], x[te])
    ytr = y[tr]
    if label_noise:
        ytr = D.symmetric_noise(ytr, label_noise, torch.Generator().manual_seed(20_000 + seed))
    return (xtr, ytr), (xva, y[va]), (xte, y[te])


def train_one(seed, opt_name, mode, lam, data, *, epochs, width, batch_size=32):
    (xtr, ytr), (xva, yva), (xte, yte) = data
    model = D.mlp([xtr.shape[1], width, width, 10], seed)
    weights = D.weight_matrices(model)
    inner = D.optimizer(model, opt_name, LR[opt_name], lam if mode == "weight decay" else None)
    opt = GradSurgery(inner, method="l2", **L2_MODES[mode]) if mode in L2_MODES else inner
    with torch.no_grad():
        init_norm = float(torch.sqrt(sum((p.double() ** 2).sum() for p in weights)))
    gen = torch.Generator().manual_seed(1000 + seed)
    for _ in range(epochs):
        for idx in D.batches(len(ytr), batch_size, gen):
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            if opt is inner:
                loss.backward()
            else:
                opt.backward(loss)
            opt.step()
    with torch.no_grad():
        norm = float(torch.sqrt(sum((p.double() ** 2).sum() for p in weights)))
        train_loss = float(F.cross_entropy(model(xtr), ytr))
    return {
        "train_acc": D.accuracy(model, xtr, ytr),
        "val_acc": D.accuracy(model, xva, yva),
        "test_acc": D.accuracy(model, xte, yte),
        "train_loss": train_loss,
        "weight_norm": norm,
        "init_norm": init_norm,
    }


def configs(opt_name: str, grid: list[float]) -> list[tuple[str, float | None]]:
    return [("none", None)] + [("weight decay", lam) for lam in grid] + [(m, None) for m in L2_MODES]


def summarize(rows: list[dict], optimizers: list[str], grids: dict[str, list[float]], noise: float) -> str:
    def pick(opt_name, mode, lam=None):
        sel = [
            r
            for r in rows
            if r["optimizer"] == opt_name
            and r["mode"] == mode
            and r["lambda"] == lam
            and r["label_noise"] == noise
        ]
        return sorted(sel, key=lambda r: r["seed"])

    def col(sel, key):
        return [r[key] for r in sel]

    out = []
    for opt_name in optimizers:
        curve = [(lam, pick(opt_name, "weight decay", lam)) for lam in grids[opt_name]]
        best_val = max(curve, key=lambda c: D.mean_std(col(c[1], "val_acc"))[0])
        best_test = max(curve, key=lambda c: D.mean_std(col(c[1], "test_acc"))[0])
        tuned = col(best_val[1], "test_acc")
        wd = "SGD weight_decay" if opt_name == "sgd" else "AdamW weight_decay"
        header = [
            "mode",
            "test acc %",
            "val acc %",
            "train acc %",
            "‖W‖ at the end",
            "test gap to tuned λ (pts, paired)",
        ]
        table = []

        def line(name, sel, tuned=tuned, table=table):
            gaps = [a - b for a, b in zip(col(sel, "test_acc"), tuned, strict=True)]
            table.append(
                [
                    name,
                    D.pm(col(sel, "test_acc")),
                    D.pm(col(sel, "val_acc")),
                    D.pm(col(sel, "train_acc")),
                    D.pm(col(sel, "weight_norm"), scale=1.0),
                    D.pm(gaps, digits=2),
                ]
            )

        line("no regularization", pick(opt_name, "none"))
        line(f"{wd}, λ={best_val[0]:g} (best on val: the tuned λ)", best_val[1])
        line(f"{wd}, λ={best_test[0]:g} (best on test: oracle)", best_test[1])
        for mode, options in L2_MODES.items():
            spelled = ", ".join(f"{k}={v}" for k, v in options.items()) or "the defaults"
            line(f'`method="l2"`, {spelled}', pick(opt_name, mode))
        init = D.mean_std(col(pick(opt_name, "none"), "init_norm"))[0]
        scenario = "clean training labels" if not noise else f"{round(100 * noise)} % training label noise"
        title = f"**{opt_name.upper()}, {scenario}** (lr {LR[opt_name]:g}; ‖W‖ at initialisation {init:.1f})"
        out.append(title + "\n\n" + D.markdown_table(header, table))
        curve_rows = [
            [
                f"{lam:g}",
                D.pm(col(sel, "val_acc")),
                D.pm(col(sel, "test_acc")),
                D.pm(col(sel, "weight_norm"), scale=1.0),
            ]
            for lam, sel in curve
        ]
        out.append(
            f"{wd} over the grid ({opt_name.upper()}, {scenario}):\n\n"
            + D.markdown_table(["λ", "val acc %", "test acc %", "‖W‖ at the end"], curve_rows)
        )
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.l2_regularization", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/l2"))
    D.add_size_options(parser, full=(80, 512), quick=(4, 64))
    parser.add_argument("--optimizers", nargs="+", choices=sorted(LR), default=["sgd", "adam"])
    parser.add_argument(
        "--label-noise",
        type=float,
        nargs="+",
        default=[0.0, 0.3],
        help="fractions of training labels flipped, one scenario each",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    epochs, width = D.run_size(args)
    grids = {k: (v[::3] if args.quick else v) for k, v in WD_GRID.items()}
    n_train, n_val = 200, 300
    rows, start = [], time.perf_counter()
    for noise in args.label_noise:
        for seed in args.seeds:
            data = prepare(seed, n_train, n_val, noise)
            for opt_name in args.optimizers:
                for mode, lam in configs(opt_name, grids[opt_name]):
                    t0 = time.perf_counter()
                    res = train_one(seed, opt_name, mode, lam, data, epochs=epochs, width=width)
                    rows.append(
                        {
                            "label_noise": noise,
                            "optimizer": opt_name,
                            "mode": mode,
                            "lambda": lam,
                            "seed": seed,
                            **res,
                            "seconds": time.perf_counter() - t0,
                        }
                    )
                    print(
                        f"noise {noise} seed {seed} {opt_name} {mode} {'' if lam is None else lam}: "
                        f"test {res['test_acc']:.4f} val {res['val_acc']:.4f} ‖W‖ {res['weight_norm']:.2f} "
                        f"({rows[-1]['seconds']:.1f}s)",
                        flush=True,
                    )
    cmd = D.command_line("benchmarks.l2_regularization", argv)
    tables = "\n\n".join(summarize(rows, args.optimizers, grids, noise) for noise in args.label_noise)
    text = (
        f"# L2 without λ vs tuned weight decay\n\n`{cmd}` — digits, {n_train} train / {n_val} val / "
        f"rest test, MLP width {width}, {epochs} epochs, batch 32, seeds {args.seeds}, "
        f"{time.perf_counter() - start:.0f} s\n\n{tables}\n"
    )
    D.write_report(args.out, "l2_regularization", rows, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
