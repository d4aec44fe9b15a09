"""Benchmark: training on noisy labels with a small clean set as the guard (``main_aux``) or as the mask.

scikit-learn's digits data (no download), per seed: 1000 training images, of which 40 (4 %) form the clean
set and keep their labels, while the other 960 get symmetric label noise (a fraction p of them, exactly,
relabelled to a uniformly drawn *other* class); the remaining 797 images are the test set. An MLP
(64 → 256 → 256 → 10) is trained with SGD (lr 0.01, momentum 0.9), noisy batches of 64, clean batches of 20
drawn by ``CleanBatches``, for a fixed number of epochs of the noisy set (no early stopping: that would be one
more use of the clean set). Rows:

- noisy only: the mean loss of the noisy batch;
- clean only: the mean loss of the clean batch (as many steps);
- noisy + clean summed: the sum of the two mean losses;
- clean-set guard: ``GradSurgery(opt, method="main_aux", main=0)``, ``backward([noisy_loss, clean_loss])``;
- loss masking: ``method="main_aux", main=0, mode="mask"``,
  ``backward([per_sample_noisy_losses, clean_loss])``.

Reported: the test accuracy at the end, mean ± std over the seeds, the peak test accuracy over the epochs
(an oracle: it picks the epoch on the test set), and for masking the kept fraction and how many of the kept
samples carry their true label (the mask's precision; the noisy set's own precision is 1 − p).

    python -m benchmarks.noisy_labels --seeds 0 1 2 --out results/noisy
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

from gradsurgery import GradSurgery
from gradsurgery.clean_guard import CleanBatches

try:
    from . import _digits as D
except ImportError:  # run as a script
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import _digits as D  # type: ignore[no-redef]

MODES = ["noisy only", "clean only", "noisy + clean summed", "clean-set guard", "loss masking"]
NUM_CLASSES = D.NUM_CLASSES


def prepare(seed: int, rate: float, n_train: int, n_clean: int):
    x, y = D.load_digits_tensors()
    train, test = D.split(len(y), [n_train, -1], seed)
    xtr, xte = D.standardize(x[train], x[test])
    ytr = y[train]
    clean_idx, noisy_idx = torch.arange(n_clean), torch.arange(n_clean, n_train)
    gen = torch.Generator().manual_seed(10_000 + seed)
    y_noisy = D.symmetric_noise(ytr[noisy_idx], rate, gen)
    return {
        "x_noisy": xtr[noisy_idx],
        "y_noisy": y_noisy,
        "y_true": ytr[noisy_idx],
        "x_clean": xtr[clean_idx],
        "y_clean": ytr[clean_idx],
        "x_test": xte,
        "y_test": y[test],
    }


def train_one(seed: int, mode: str, data: dict, *, epochs: int, width: int, batch=64, clean_batch=20):
    model = D.mlp([data["x_noisy"].shape[1], width, width, NUM_CLASSES], seed)
    inner = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if mode == "clean-set guard":
        opt = GradSurgery(inner, method="main_aux", main=0)
    elif mode == "loss masking":
        opt = GradSurgery(inner, method="main_aux", main=0, mode="mask")
    else:
        opt = inner
    gen = torch.Generator().manual_seed(2000 + seed)
    clean_set = torch.utils.data.TensorDataset(data["x_clean"], data["y_clean"])
    loader = torch.utils.data.DataLoader(clean_set, batch_size=clean_batch, shuffle=True, generator=gen)
    clean = CleanBatches(loader)
    xn, yn, ytrue = data["x_noisy"], data["y_noisy"], data["y_true"]
    kept = kept_true = seen = 0
    guard_active = steps = 0
    peak = 0.0
    for _ in range(epochs):
        for idx in D.batches(len(yn), batch, gen):
            xc, yc = next(clean)
            opt.zero_grad()
            if mode == "noisy only":
                F.cross_entropy(model(xn[idx]), yn[idx]).backward()
            elif mode == "clean only":
                F.cross_entropy(model(xc), yc).backward()
            elif mode == "noisy + clean summed":
                (F.cross_entropy(model(xn[idx]), yn[idx]) + F.cross_entropy(model(xc), yc)).backward()
            elif mode == "clean-set guard":
                noisy_loss = F.cross_entropy(model(xn[idx]), yn[idx])
                info = opt.backward([noisy_loss, F.cross_entropy(model(xc), yc)])
                guard_active += int(float(info.weights[1]) > 0)
            else:
                per_sample = F.cross_entropy(model(xn[idx]), yn[idx], reduction="none")
                info = opt.backward([per_sample, F.cross_entropy(model(xc), yc)])
                mask = info.sample_mask
                kept += int(mask.sum())
                kept_true += int((mask & (yn[idx] == ytrue[idx])).sum())
                seen += len(idx)
            steps += 1
            opt.step()
        peak = max(peak, D.accuracy(model, data["x_test"], data["y_test"]))
    return {
        "test_acc": D.accuracy(model, data["x_test"], data["y_test"]),
        "peak_test_acc": peak,
        "noisy_train_acc": D.accuracy(model, xn, yn),  # how much of the noise it memorised
        "kept_fraction": kept / seen if seen else float("nan"),
        "mask_precision": kept_true / kept if kept else float("nan"),
        "guard_active": guard_active / steps if mode == "clean-set guard" else float("nan"),
    }


def summarize(rows: list[dict], rates: list[float]) -> str:
    header = [
        "noise",
        "mode",
        "test acc % (end)",
        "peak test acc % (oracle)",
        "fits noisy labels %",
        "kept %",
        "kept with true label %",
    ]
    table = []
    for rate in rates:
        for mode in MODES:
            sel = [r for r in rows if r["noise"] == rate and r["mode"] == mode]
            sel.sort(key=lambda r: r["seed"])
            col = lambda k, sel=sel: [r[k] for r in sel]  # noqa: E731
            extra = ["—", "—"]
            if mode == "loss masking":
                extra = [D.pm(col("kept_fraction")), D.pm(col("mask_precision"))]
            elif mode == "clean-set guard":
                extra = [f"λ > 0 on {D.pm(col('guard_active'), digits=0)} % of steps", "—"]
            table.append(
                [
                    f"{round(100 * rate)} %",
                    mode,
                    D.pm(col("test_acc")),
                    D.pm(col("peak_test_acc")),
                    D.pm(col("noisy_train_acc")),
                    *extra,
                ]
            )
    return D.markdown_table(header, table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.noisy_labels", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/noisy"))
    D.add_size_options(parser, full=(40, 256), quick=(2, 64))
    parser.add_argument("--noise", type=float, nargs="+", default=[0.4, 0.6])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    epochs, width = D.run_size(args)
    n_train, n_clean = 1000, 40
    rows, start = [], time.perf_counter()
    for rate in args.noise:
        for seed in args.seeds:
            data = prepare(seed, rate, n_train, n_clean)
            for mode in MODES:
                t0 = time.perf_counter()
                res = train_one(seed, mode, data, epochs=epochs, width=width)
                seconds = time.perf_counter() - t0
                rows.append({"noise": rate, "mode": mode, "seed": seed, **res, "seconds": seconds})
                print(
                    f"noise {rate} seed {seed} {mode}: test {res['test_acc']:.4f} "
                    f"peak {res['peak_test_acc']:.4f} ({seconds:.1f}s)",
                    flush=True,
                )
    cmd = D.command_line("benchmarks.noisy_labels", argv)
    text = (
        f"# Noisy labels with a clean set\n\n`{cmd}` — digits, {n_train - n_clean} noisy + "
        f"{n_clean} clean training images, the rest test, MLP width {width}, {epochs} epochs, "
        f"seeds {args.seeds}, {time.perf_counter() - start:.0f} s\n\n{summarize(rows, args.noise)}\n"
    )
    D.write_report(args.out, "noisy_labels", rows, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
