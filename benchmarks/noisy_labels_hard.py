"""Benchmark: noisy labels with a small trusted set on a larger, harder digit task.

Data (``_hard_digits``): 16×16 distorted renderings of scikit-learn's digits, ``--n-train`` training images
(default 10 000) from a pool of source images disjoint from the 3 000 test images' pool. Per seed, a
fraction ``--clean`` of the training images keeps its labels (the trusted set); the others get label noise
at rate p ∈ ``--noise``: ``sym`` (exactly round(p·n) labels moved to a uniformly drawn other class) or
``flip`` (class-dependent: exactly round(p·n) labels moved to the next class, y → y + 1 mod 10, Han et
al. 2018's pair flip; above 50 % the wrong label is the majority one). Model: MLP 256 → 256 → 256 → 10,
SGD lr 0.01 momentum 0.9, noisy batches of 64, trusted batches of 32 (``CleanBatches``), ``--epochs``
epochs of the noisy set. **Test accuracy at the end of training**; the peak over epochs (chosen on the test
set, an oracle) is printed as information only.

Methods (``--methods``; names below):

- ``noisy``: mean CE on the noisy batch; ``clean``: mean CE on the trusted batch (as many steps);
  ``sum``: the two summed;
- ``guard``: ``GradSurgery(opt, method="main_aux", main=0)`` on [noisy CE, trusted CE];
- ``mask``: ``mode="mask"`` on [per-sample noisy CE, trusted CE];
- ``l2rw``: learning to reweight (Ren et al. 2018): per step, weights w = relu(−∂L_clean(θ − α∇Σε_iℓ_i)/∂ε)
  at ε = 0, normalised to sum 1, then a step on Σ w_i ℓ_i (α = the learning rate);
- ``mwnet``: meta-weight net (Shu et al. 2019): w_i = V(ℓ_i; φ), V an MLP 1 → 100 → 1 (sigmoid), φ updated
  by Adam (1e-3) on the trusted loss after a virtual step, then a step on mean w_i ℓ_i;
- ``glc``: gold loss correction (Hendrycks et al. 2018): a first network trained on the noisy set alone for
  the same epochs; T̂ from its softmax on the trusted set; a second network from scratch on
  forward-corrected noisy NLL + trusted CE (twice the cost);
- prototypes (``modes_prototypes.CleanSetCorrection``): ``fwd-warm`` (T̂ from the same network after
  ``--warmup`` noisy-only epochs, the trusted set held out until then, then forward correction + trusted
  CE), ``post-warm`` (soft posterior targets q ∝ p(y|x)T̂[y, ỹ] instead), ``sel-warm`` (forward correction
  on the small-loss fraction Σπ_iT̂_ii of each batch), ``glc-sel`` (GLC's two runs, small-loss selection in
  the second), ``fwd-guard`` (as ``fwd-warm``, the two losses combined by ``main_aux``'s guard instead of
  summed), ``fwd-mask`` (the forward-corrected per-sample losses under ``mode="mask"``), ``distill`` (soft
  targets q ∝ p_teacher(y|x)·T̂[y, ỹ], the teacher a second network trained on the trusted set alone),
  ``fwd-oracle`` (information only: forward correction with the true T from the first step).

    python -m benchmarks.noisy_labels_hard --seeds 0 1 2 3 4 --clean 0.02 --epochs 15 --out results/noisy_hard
    python -m benchmarks.noisy_labels_hard --shard 3/16 ...   # one of 16 disjoint parts of the job list
    python -m benchmarks.noisy_labels_hard --summarize results/noisy_hard   # tables from the CSVs there
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import sys
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from gradsurgery import GradSurgery
from gradsurgery.clean_guard import CleanBatches, NoiseCorrection

try:
    from . import _digits as D
    from . import modes_prototypes as P
    from ._hard_digits import hard_digits
except ImportError:  # run as a script
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import _digits as D  # type: ignore[no-redef]
    import modes_prototypes as P  # type: ignore[no-redef]
    from _hard_digits import hard_digits  # type: ignore[no-redef]

C = 10
BASELINES = ["noisy", "clean", "sum", "guard", "mask", "l2rw", "mwnet", "glc"]
PROTOTYPES = [
    "fwd-warm",
    "fwd-guard",
    "fwd-mask",
    "distill",
    "post-warm",
    "sel-warm",
    "glc-sel",
    "fwd-oracle",
]
LABELS = {
    "noisy": "noisy only",
    "clean": "clean only",
    "sum": "noisy + clean summed",
    "guard": "guard (`main_aux`)",
    "mask": 'masking (`mode="mask"`)',
    "l2rw": "learning to reweight (Ren 2018)",
    "mwnet": "meta-weight net (Shu 2019)",
    "glc": "gold loss correction (Hendrycks 2018)",
    "fwd-warm": "**proto: warm-up T̂ + forward correction**",
    "fwd-guard": "proto: warm-up T̂ + forward correction under the guard (`main_aux`)",
    "fwd-mask": 'proto: warm-up T̂ + forward correction, masked (`mode="mask"`)',
    "distill": "proto: warm-up T̂ + clean-teacher posterior targets",
    "post-warm": "proto: warm-up T̂ + posterior targets",
    "sel-warm": "proto: warm-up T̂ + forward + small-loss",
    "glc-sel": "proto: GLC + small-loss",
    "fwd-oracle": "(information: forward correction with the true T)",
}


def corrupt(y: torch.Tensor, kind: str, rate: float, gen: torch.Generator) -> torch.Tensor:
    if kind == "sym":
        return D.symmetric_noise(y, rate, gen)
    if kind == "flip":
        flip = torch.randperm(len(y), generator=gen)[: round(rate * len(y))]
        out = y.clone()
        out[flip] = (y[flip] + 1) % C
        return out
    raise ValueError(kind)


def prepare(seed: int, kind: str, rate: float, clean_frac: float, n_train: int):
    x, y, xt, yt = hard_digits(seed, n_train=n_train)
    x, xt = x.flatten(1), xt.flatten(1)
    n_clean = round(clean_frac * n_train)
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(30_000 + seed))
    ci, ni = perm[:n_clean], perm[n_clean:]
    gen = torch.Generator().manual_seed(40_000 + seed + round(1000 * rate) + (0 if kind == "sym" else 7))
    return {
        "x_noisy": x[ni],
        "y_noisy": corrupt(y[ni], kind, rate, gen),
        "y_true": y[ni],
        "x_clean": x[ci],
        "y_clean": y[ci],
        "x_test": xt,
        "y_test": yt,
        "kind": kind,
        "rate": rate,
    }


def new_model(seed: int, width: int) -> torch.nn.Module:
    return D.mlp([256, width, width, C], seed)


class PackageCorrection:
    """``gradsurgery.NoiseCorrection`` in this loop's terms (the prototypes' ``loss``/``end_epoch``): the
    clean set held out for ``warmup`` epochs, then the transition estimated from the network on all of it."""

    mask = None

    def __init__(self, x_clean, y_clean, num_classes, warmup):
        self.correction = NoiseCorrection(num_classes)
        self.x_clean, self.y_clean, self.warmup = x_clean, y_clean, warmup

    @property
    def transition(self):
        return self.correction.transition

    def loss(self, logits_noisy, y_noisy, logits_clean, y_clean, x_noisy=None):
        return self.correction.loss(logits_noisy, y_noisy, logits_clean, y_clean)

    @torch.no_grad()
    def end_epoch(self, epoch, predict):
        if self.correction.warming_up and epoch + 1 >= self.warmup:
            self.correction.estimate(predict(self.x_clean), self.y_clean)


def _virtual_step(model, params, loss, lr):
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    return {k: v - lr * g for (k, v), g in zip(params.items(), grads, strict=True)}


class MetaWeightNet(torch.nn.Module):
    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(1, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)
        )

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(losses.reshape(-1, 1))).reshape(-1)


def train(
    seed: int,
    method: str,
    data: dict,
    *,
    epochs: int,
    width: int,
    warmup: int,
    lr=0.01,
    batch=64,
    clean_batch=32,
    transition=None,
    teacher_steps=1000,
) -> dict:
    """One run; returns end-of-training metrics (and ``transition`` for GLC's first phase)."""
    torch.manual_seed(seed)
    model = new_model(seed, width)
    inner = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    opt = inner
    if method == "guard":
        opt = GradSurgery(inner, method="main_aux", main=0)
    elif method in ("mask", "fwd-mask"):
        opt = GradSurgery(inner, method="main_aux", main=0, mode="mask")
    elif method == "fwd-guard":
        opt = GradSurgery(inner, method="main_aux", main=0)
    gen = torch.Generator().manual_seed(2000 + seed)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data["x_clean"], data["y_clean"]),
        batch_size=min(clean_batch, len(data["y_clean"])),
        shuffle=True,
        generator=gen,
    )
    clean = CleanBatches(loader)
    xn, yn, ytrue = data["x_noisy"], data["y_noisy"], data["y_true"]
    corr = None
    if method in ("fwd-mask", "fwd-guard"):
        corr = P.CleanSetCorrection(data["x_clean"], data["y_clean"], C, warmup=warmup, variant="forward")
    if method == "fwd-warm":  # the package's mode: gradsurgery.NoiseCorrection
        corr = PackageCorrection(data["x_clean"], data["y_clean"], C, warmup)
    elif method in ("post-warm", "sel-warm", "distill"):
        variant = {
            "post-warm": "posterior",
            "sel-warm": "forward_small_loss",
            "distill": "distill",
        }[method]
        teacher = None
        if method == "distill":  # same architecture, trained on the trusted set for one epoch's steps
            teacher = P.train_clean_teacher(
                new_model(seed + 500, width),
                data["x_clean"],
                data["y_clean"],
                steps=teacher_steps,
                lr=lr,
                batch=clean_batch,
                generator=torch.Generator().manual_seed(3000 + seed),
            )
        corr = P.CleanSetCorrection(
            data["x_clean"], data["y_clean"], C, warmup=warmup, variant=variant, teacher=teacher
        )
    elif method == "fwd-oracle":  # information only: forward correction with the true T from the first step
        corr = P.CleanSetCorrection(data["x_clean"], data["y_clean"], C, warmup=1, variant="forward")
        corr.transition = true_transition(data["kind"], data["rate"])
    elif method in ("glc2", "glc-sel2"):  # GLC's second phase, T given
        corr = P.CleanSetCorrection(
            data["x_clean"],
            data["y_clean"],
            C,
            warmup=1,
            variant="forward" if method == "glc2" else "forward_small_loss",
        )
        corr.transition = transition
        corr.keep = P.transition_keep_rate(transition, torch.bincount(data["y_clean"], minlength=C))
    vnet = vopt = None
    if method == "mwnet":
        torch.manual_seed(10_000 + seed)
        vnet = MetaWeightNet()
        vopt = torch.optim.Adam(vnet.parameters(), lr=1e-3, weight_decay=1e-4)
    kept = kept_true = seen = 0
    wsum_true = wsum = 0.0
    peak = 0.0
    curve = []
    for epoch in range(epochs):
        for idx in D.batches(len(yn), batch, gen):
            xc, yc = next(clean)
            xb, yb = xn[idx], yn[idx]
            opt.zero_grad()
            if method in ("noisy", "glc1"):
                F.cross_entropy(model(xb), yb).backward()
            elif method == "clean":
                F.cross_entropy(model(xc), yc).backward()
            elif method == "sum":
                (F.cross_entropy(model(xb), yb) + F.cross_entropy(model(xc), yc)).backward()
            elif method == "guard":
                opt.backward([F.cross_entropy(model(xb), yb), F.cross_entropy(model(xc), yc)])
            elif method == "mask":
                info = opt.backward(
                    [F.cross_entropy(model(xb), yb, reduction="none"), F.cross_entropy(model(xc), yc)]
                )
                m = info.sample_mask
                kept += int(m.sum())
                kept_true += int((m & (yb == ytrue[idx])).sum())
                seen += len(idx)  # noqa: E702
            elif method == "fwd-guard":
                if corr.warming_up:
                    F.cross_entropy(model(xb), yb).backward()
                else:
                    fwd = P.forward_corrected_nll(model(xb), yb, corr.transition).mean()
                    opt.backward([fwd, F.cross_entropy(model(xc), yc)])
            elif method == "fwd-mask":
                if corr.warming_up:
                    F.cross_entropy(model(xb), yb).backward()
                else:
                    per = P.forward_corrected_nll(model(xb), yb, corr.transition)
                    info = opt.backward([per, F.cross_entropy(model(xc), yc)])
                    m = info.sample_mask
                    kept += int(m.sum())
                    kept_true += int((m & (yb == ytrue[idx])).sum())
                    seen += len(idx)  # noqa: E702
            elif method in ("l2rw", "mwnet"):
                params = dict(model.named_parameters())
                if method == "l2rw":
                    eps = torch.zeros(len(idx), requires_grad=True)
                    per = F.cross_entropy(functional_call(model, params, (xb,)), yb, reduction="none")
                    fast = _virtual_step(model, params, (eps * per).sum(), lr)
                    lc = F.cross_entropy(functional_call(model, fast, (xc,)), yc)
                    (g_eps,) = torch.autograd.grad(lc, eps)
                    w = torch.clamp(-g_eps, min=0)
                    w = w / w.sum() if float(w.sum()) > 0 else w
                    w = w.detach()
                else:
                    per = F.cross_entropy(functional_call(model, params, (xb,)), yb, reduction="none")
                    wv = vnet(per.detach())
                    fast = _virtual_step(model, params, (wv * per).mean(), lr)
                    lc = F.cross_entropy(functional_call(model, fast, (xc,)), yc)
                    vopt.zero_grad()
                    lc.backward(inputs=list(vnet.parameters()))
                    vopt.step()
                    with torch.no_grad():
                        w = vnet(per.detach())
                opt.zero_grad()
                per = F.cross_entropy(model(xb), yb, reduction="none")
                loss = (w * per).sum() if method == "l2rw" else (w * per).mean()
                loss.backward()
                wsum += float(w.sum())
                wsum_true += float(w[yb == ytrue[idx]].sum())  # noqa: E702
            else:  # CleanSetCorrection-based
                loss = corr.loss(model(xb), yb, model(xc), yc, x_noisy=xb)
                loss.backward()
                if corr.mask is not None:
                    m = corr.mask
                    kept += int(m.sum())
                    kept_true += int((m & (yb == ytrue[idx])).sum())
                    seen += len(idx)  # noqa: E702
            opt.step()
        if corr is not None:
            model.eval()
            corr.end_epoch(epoch, model)
            model.train()
        acc = D.accuracy(model, data["x_test"], data["y_test"])
        curve.append(acc)
        peak = max(peak, acc)
    out = {
        "test_acc": curve[-1],
        "peak_test_acc": peak,
        "peak_epoch": curve.index(peak) + 1,
        "noisy_train_acc": D.accuracy(model, xn, yn),
        "true_train_acc": D.accuracy(model, xn, ytrue),
        "kept_fraction": kept / seen if seen else float("nan"),
        "kept_precision": kept_true / kept if kept else float("nan"),
        "weight_on_true": wsum_true / wsum if wsum else float("nan"),
    }
    if corr is not None and corr.transition is not None:
        t = corr.transition
        out["T_diag_mean"] = float(torch.diagonal(t).mean())
    if method == "glc1":
        with torch.no_grad():
            model.eval()
            out["transition"] = P.estimate_transition(
                torch.softmax(model(data["x_clean"]), 1), data["y_clean"], C
            )
    return out


def run_method(seed, method, data, **kw) -> dict:
    if method in ("glc", "glc-sel"):
        first = train(seed, "glc1", data, **kw)
        res = train(
            seed, "glc2" if method == "glc" else "glc-sel2", data, transition=first["transition"], **kw
        )
        res["T_diag_mean"] = float(torch.diagonal(first["transition"]).mean())
        return res
    return train(seed, method, data, **kw)


def true_transition(kind: str, rate: float) -> torch.Tensor:
    eye = torch.eye(C, dtype=torch.float64)
    if kind == "sym":
        return (1 - rate) * eye + rate / (C - 1) * (1 - eye)
    return (1 - rate) * eye + rate * eye.roll(1, dims=1)


def true_diag(kind: str, rate: float) -> float:
    return 1 - rate


def summarize(rows: list[dict], methods: list[str]) -> str:
    points = sorted({(r["noise_kind"], float(r["noise"]), float(r["clean_frac"])) for r in rows})
    parts = []
    for kind, rate, cf in points:
        sel_all = [
            r
            for r in rows
            if r["noise_kind"] == kind and float(r["noise"]) == rate and float(r["clean_frac"]) == cf
        ]
        header = [
            "method",
            "test acc % (end)",
            "peak % (oracle, info)",
            "fits noisy labels %",
            "kept % / weight on true %",
            "kept precision %",
            "mean T̂_ii",
            "s/run",
        ]
        table = []
        base = {}
        for m in methods:
            sel = sorted([r for r in sel_all if r["method"] == m], key=lambda r: int(r["seed"]))
            if not sel:
                continue
            col = lambda k, sel=sel: [float(r[k]) for r in sel if r.get(k) not in (None, "")]  # noqa: E731
            base[m] = col("test_acc")
            extra = "—"
            if m in ("l2rw", "mwnet"):
                extra = "w on true: " + D.pm(col("weight_on_true"))
            elif (
                col("kept_fraction")
                and D.mean_std(col("kept_fraction"))[0] == D.mean_std(col("kept_fraction"))[0]
            ):
                extra = D.pm(col("kept_fraction"))
            prec = D.pm(col("kept_precision")) if m not in ("l2rw", "mwnet") else "—"
            tdiag = D.pm(col("T_diag_mean"), scale=1.0, digits=2) if col("T_diag_mean") else "—"
            table.append(
                [
                    LABELS.get(m, m),
                    D.pm(col("test_acc")),
                    D.pm(col("peak_test_acc")),
                    D.pm(col("noisy_train_acc")),
                    extra if "nan" not in extra else "—",
                    prec if "nan" not in prec else "—",
                    tdiag,
                    f"{D.mean_std(col('seconds'))[0]:.0f}",
                ]
            )
        n = max((len(v) for v in base.values()), default=0)
        title = (
            f"**{kind} noise {round(100 * rate)} %, {round(100 * cf)} % clean** ({n} seeds; true mean "
            f"T_ii = {true_diag(kind, rate):.2f})"
        )
        parts.append(title + "\n\n" + D.markdown_table(header, table))
    return "\n\n".join(parts)


def compact(rows: list[dict], methods: list[str], key: str = "test_acc") -> str:
    """One table: a row per method, a column per (noise kind, rate, clean fraction), mean ± std of ``key``."""
    points = sorted({(r["noise_kind"], float(r["noise"]), float(r["clean_frac"])) for r in rows})
    header = ["method"] + [f"{k} {round(100 * p)} % ({round(100 * c)} % clean)" for k, p, c in points]
    table = []
    for m in methods:
        line = [LABELS.get(m, m)]
        for k, p, c in points:
            vals = [
                float(r[key])
                for r in rows
                if r["method"] == m
                and r["noise_kind"] == k
                and float(r["noise"]) == p
                and float(r["clean_frac"]) == c
            ]
            line.append(D.pm(vals) if vals else "—")
        table.append(line)
    return D.markdown_table(header, table)


def verdict(rows: list[dict], method: str) -> str:
    """Per point: does ``method`` beat clean-only and noisy-only beyond the seed spread (mean − std of the
    paired difference > 0), and how far is it from noisy-only's peak."""
    points = sorted({(r["noise_kind"], float(r["noise"]), float(r["clean_frac"])) for r in rows})
    out = []
    for kind, rate, cf in points:

        def get(m, key="test_acc", kind=kind, rate=rate, cf=cf):
            sel = sorted(
                [
                    r
                    for r in rows
                    if r["noise_kind"] == kind
                    and float(r["noise"]) == rate
                    and float(r["clean_frac"]) == cf
                    and r["method"] == m
                ],
                key=lambda r: int(r["seed"]),
            )
            return [float(r[key]) for r in sel]

        mine = get(method)
        if not mine:
            continue
        cells = [f"{kind} {round(100 * rate)} %, {round(100 * cf)} % clean"]
        for other in ("clean", "noisy"):
            o = get(other)
            if len(o) != len(mine):
                cells.append("—")
                continue
            d = [a - b for a, b in zip(mine, o, strict=True)]
            m, s = D.mean_std(d)
            cells.append(f"{100 * m:+.1f} ± {100 * s:.1f} {'✓' if m - s > 0 else '✗'}")
        peak = get("noisy", "peak_test_acc")
        cells.append(f"{100 * D.mean_std(mine)[0]:.1f} vs {100 * D.mean_std(peak)[0]:.1f}" if peak else "—")
        out.append(cells)
    return D.markdown_table(
        [
            f"point ({LABELS.get(method, method)})",
            "vs clean only (paired)",
            "vs noisy only (paired)",
            "end vs noisy-only peak",
        ],
        out,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.4, 0.6, 0.8])
    parser.add_argument("--kinds", nargs="+", default=["sym", "flip"], choices=["sym", "flip"])
    parser.add_argument("--clean", type=float, nargs="+", default=[0.02])
    parser.add_argument(
        "--methods", nargs="+", default=[*BASELINES, "fwd-warm"], choices=BASELINES + PROTOTYPES
    )
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--shard", default="0/1", help="i/n: run the i-th of n interleaved parts of the jobs")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/noisy_hard"))
    parser.add_argument("--summarize", type=pathlib.Path, help="only write the tables from rows*.csv there")
    parser.add_argument("--verdict", default="fwd-warm", help="the method the verdict table judges")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cmd = D.command_line("benchmarks.noisy_labels_hard", argv)
    if args.summarize:
        rows = D.read_rows(args.summarize)
        D.write_csv(args.summarize / "all_rows.csv", rows)
        methods = [m for m in BASELINES + PROTOTYPES if any(r["method"] == m for r in rows)]
        text = (
            f"# Noisy labels, hard digits\n\nTest accuracy % at the end of training:\n\n"
            f"{compact(rows, methods)}\n\nPeak over epochs (oracle, information only):\n\n"
            f"{compact(rows, methods, 'peak_test_acc')}\n\n{verdict(rows, args.verdict)}\n\n"
            f"{summarize(rows, methods)}\n"
        )
        (args.summarize / "noisy_labels_hard.md").write_text(text)
        print(text)
        return 0
    i, n = (int(v) for v in args.shard.split("/"))
    # seed-major: a run cut short still has every point for its first seeds
    jobs = [
        (k, r, c, sd, m)
        for sd, c, k, r, m in itertools.product(args.seeds, args.clean, args.kinds, args.noise, args.methods)
    ]
    jobs = jobs[i::n]
    rows, start = [], time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    for kind, rate, cf, seed, method in jobs:
        data = prepare(seed, kind, rate, cf, args.n_train)
        t0 = time.perf_counter()
        res = run_method(seed, method, data, epochs=args.epochs, width=args.width, warmup=args.warmup)
        res.pop("transition", None)
        sec = time.perf_counter() - t0
        rows.append(
            {
                "noise_kind": kind,
                "noise": rate,
                "clean_frac": cf,
                "seed": seed,
                "method": method,
                **res,
                "seconds": sec,
            }
        )
        print(
            f"{kind} {rate} clean {cf} seed {seed} {method}: end {res['test_acc']:.4f} "
            f"peak {res['peak_test_acc']:.4f}@{res['peak_epoch']} fits {res['noisy_train_acc']:.3f} "
            f"({sec:.1f}s)",
            flush=True,
        )
        D.write_csv(args.out / f"rows-{i}-of-{n}.csv", rows)
    if n == 1:
        methods = [m for m in args.methods]
        text = (
            f"# Noisy labels, hard digits\n\n`{cmd}` — {time.perf_counter() - start:.0f} s\n\n"
            f"{summarize(rows, methods)}\n\n{verdict(rows, args.verdict)}\n"
        )
        (args.out / "noisy_labels_hard.md").write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
