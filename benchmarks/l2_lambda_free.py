"""Benchmark: λ-free L2 rules (today's four variants and the prototypes) against weight decay tuned on a
validation split, on the MLP of ``l2_regularization.py`` and on a small convolutional network.

Same data as ``l2_regularization.py`` (scikit-learn digits, per seed 200 training / 300 validation / 1297
test images, 0 or 30 % symmetric noise on the training labels only), same optimizers (SGD lr 0.05, Adam lr
1e-3, constant; ``--schedule cosine``: annealed to 0 over the run, a step per epoch), batch 32, ``--epochs``
epochs (``--trace``: the test accuracy after each one, as information). Architectures (``--arch``): ``mlp``
64 → 512 → 512 → 10 (as today) and ``cnn``: conv 3×3 (1 → 32) – ReLU – conv 3×3 (32 → 64) – ReLU – max-pool
2 – linear (1024 → 128) – ReLU – linear (128 → 10) on the 8×8 images (≈ 150k weights). Every mode
regularizes the tensors with dim ≥ 2.

Modes (``--modes``), all applied by hand in the training loop (no ``GradSurgery``), using the package's own
functions for today's rule so that the comparison runs the same maths:

- ``none``; ``wd``: SGD ``weight_decay`` / AdamW over the grid of ``l2_regularization.WD_GRID``; the tuned
  λ is   the one with the best mean validation accuracy (reported on test);
- today's rule: ``l2`` (global, direct: u = g + relu(−⟨g,θ⟩)/‖θ‖²·θ), ``l2-pt`` (per tensor), ``l2-dec``
  (global, decoupled: the step's growing component removed, then back onto the ball), ``l2-pt-dec``;
- prototypes (``modes_prototypes``): ``bal`` / ``bal-pt`` (direct: λ = max(today's λ, ‖g‖/‖θ‖), the decay
  step as long as the data step), ``bal-dec`` / ``bal-pt-dec`` (decoupled: today's projection of the step Δ,
  then θ moved ‖Δ‖ towards 0), ``mn`` / ``mn-pt`` (direct: the step along the min-norm point
  αg + (1 − α)θ of {g, θ}), ``mn-dec`` /
  ``mn-pt-dec`` (decoupled: λ = (1 − α)/α from the min-norm point of {step, θ}, on top of today's decoupled
  correction); ``val`` / ``val-pt`` (direct) and ``val-dec`` / ``val-pt-dec`` (decoupled): the radial part of
  the step (grow or shrink ‖θ‖, globally or per tensor) decided by the gradient of a batch of the validation
  split, the data that tunes λ (``heldout_radial_direction``, ``decoupled_heldout_radial``); ``l2-last-dec``:
  today's decoupled rule per tensor on the output layer's weight only, globally on the others (which tensor
  the per-tensor rule's effect comes from); ``lp-dec``: the decoupled rule on Σ_l log‖W_l‖ instead of ½‖θ‖²
  (the product of the layers' norms may not grow, the layers may trade norm; ``decoupled_log_product``);
  the evidence λ (MacKay 1992: u = g + λθ with λ = γ/(N‖θ‖²),
  direct form, run with SGD), γ from the empirical Fisher's diagonal estimated from the batch gradient
  (``evb``, ``evb-pt``: B·g²) or from exact per-sample gradients (``ev``, ``ev-pt``), from the true
  Fisher's diagonal (``evg``, ``evg-pt``: B·g² of the gradient for labels drawn from the model), from a
  Kronecker-factored Fisher (``evk``, ``evk-pt``; ``evkg``, ``evkg-pt`` with labels drawn from the model) or
  from the exact spectrum of the empirical Fisher over the training set, once per epoch (``evs``,
  ``evs-pt``); the output layer's own diagonal evidence λ on every weight (``evb-out``) or on the output
  layer only (``evb-out1``); λ tuned online by its hypergradient on batches of the validation split
  (``hg``, ``hg-pt``: ``HypergradientL2``). ``--evidence-at-init`` prints the evidence λ of every estimate at
  initialisation instead.

    python -m benchmarks.l2_lambda_free --arch mlp cnn --seeds 0 1 2 3 4 --out results/l2_free
    python -m benchmarks.l2_lambda_free --summarize results/l2_free
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gradsurgery import GradSurgery
from gradsurgery.distributed import LocalReduction
from gradsurgery.evidence import KroneckerFactors, evidence_lambda
from gradsurgery.l2 import decoupled_correction, l2_direction

try:
    from . import _digits as D
    from . import modes_prototypes as P
    from .l2_regularization import LR, WD_GRID, prepare
except ImportError:  # run as a script
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import _digits as D  # type: ignore[no-redef]
    import modes_prototypes as P  # type: ignore[no-redef]
    from l2_regularization import LR, WD_GRID, prepare  # type: ignore[no-redef]

TODAY = ["l2", "l2-pt", "l2-dec", "l2-pt-dec"]
# the package's evidence λ (method="l2", evidence=True): one λ for all layers, one per layer (its default)
EVIDENCE = ["l2-ev", "l2-ev-pt"]
PROTO = [
    "bal",
    "bal-pt",
    "bal-dec",
    "bal-pt-dec",
    "mn",
    "mn-pt",
    "mn-dec",
    "mn-pt-dec",
    "val",
    "val-pt",
    "val-dec",
    "val-pt-dec",
    "l2-last-dec",
    "lp-dec",
    "ev",
    "ev-pt",
    "evs",
    "evs-pt",
    "evb",
    "evb-pt",
    "evg",
    "evg-pt",
    "evk",
    "evk-pt",
    "evkg",
    "evkg-pt",
    "evb-out",
    "evb-out1",
    "hg",
    "hg-pt",
]


def cnn(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8, 8)),
        torch.nn.Conv2d(1, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(64 * 16, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )


def build(arch: str, seed: int, width: int) -> torch.nn.Module:
    return D.mlp([64, width, width, 10], seed) if arch == "mlp" else cnn(seed)


def set_grads(weights: list[torch.Tensor], new: list[torch.Tensor]) -> None:
    """Each weight's ``.grad`` replaced by the rule's direction, before the optimizer's step."""
    for p, u in zip(weights, new, strict=True):
        p.grad = u


def train_one(
    seed, arch, opt_name, mode, lam, data, *, epochs, width, batch_size=32, schedule="constant", trace=False
):
    (xtr, ytr), (xva, yva), (xte, yte) = data
    model = build(arch, seed, width)
    weights = D.weight_matrices(model)
    opt = D.optimizer(model, opt_name, LR[opt_name], lam if mode == "wd" else None)
    # "cosine": the learning rate annealed from LR to 0 over the run, stepped once per epoch
    annealing = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs) if schedule == "cosine" else None
    per_tensor = "-pt" in mode
    decoupled = mode.endswith("-dec")
    with torch.no_grad():
        init_norm = float(torch.sqrt(sum((p.double() ** 2).sum() for p in weights)))
    gen = torch.Generator().manual_seed(1000 + seed)
    vgen = torch.Generator().manual_seed(5000 + seed)
    lam_sum = lam_n = 0.0
    by_epoch: list[float] = []
    hyper = P.HypergradientL2(len(weights) if per_tensor else 1) if mode.startswith("hg") else None
    evidence: P.EvidenceL2 | P.KroneckerEvidence | None = None
    surgery = None
    if mode in EVIDENCE:  # the package's rule: the gradient through GradSurgery.backward
        surgery = GradSurgery(
            opt, "l2", evidence=True, layers=model, num_samples=len(ytr), per_tensor=per_tensor
        )
    elif mode.startswith("evk"):
        evidence = P.KroneckerEvidence(model, weights, len(ytr), per_tensor)
    elif mode.startswith("evb-out"):  # the output layer's own evidence λ
        evidence = P.EvidenceL2(weights, len(ytr), True)
    elif mode.startswith(("ev-", "evb", "evg")) or mode == "ev":
        evidence = P.EvidenceL2(weights, len(ytr), per_tensor)
    for _ in range(epochs):
        if mode.startswith("evs"):  # once per epoch, from the whole training set
            lams = P.evidence_lambdas_spectral(model, weights, xtr, ytr, per_tensor)
        for idx in D.batches(len(ytr), batch_size, gen):
            logits = model(xtr[idx])
            loss = F.cross_entropy(logits, ytr[idx])
            opt.zero_grad()
            sampled = None
            if mode.startswith(("evg", "evkg")):  # labels drawn from the model: the gradient has mean 0
                draw = torch.multinomial(torch.softmax(logits.detach(), 1), 1, generator=vgen).squeeze(1)
                sampled = torch.autograd.grad(F.cross_entropy(logits, draw), weights, retain_graph=True)
                if isinstance(evidence, P.KroneckerEvidence):
                    evidence.recording = False  # the factors came from the drawn labels' pass
            if surgery is not None:
                info = surgery.backward(loss)
                lams = info.l2_coefficient.tolist()
                lam_sum += sum(lams) / len(lams)
                lam_n += 1  # noqa: E702
            else:
                loss.backward()
            if isinstance(evidence, P.KroneckerEvidence):
                evidence.recording = True
            grads = [p.grad for p in weights]
            vgrads = None
            # a held-out batch of the validation split (the data that tunes λ)
            if mode.startswith(("val", "hg")):
                vidx = torch.randint(len(yva), (batch_size,), generator=vgen)
                vgrads = torch.autograd.grad(F.cross_entropy(model(xva[vidx]), yva[vidx]), weights)
            if hyper is not None or mode in ("bal", "bal-pt"):  # direct: u = g + λθ
                if hyper is not None:  # λ moved by the held-out gradient first
                    hyper.update(vgrads, weights, per_tensor)
                    lams = hyper.lambdas()
                else:
                    lams = P.l2_balanced_coefficients(grads, weights, per_tensor)
                set_grads(weights, P.apply_coefficients(grads, weights, lams, per_tensor))
                lam_sum += sum(lams) / len(lams)
                lam_n += 1  # noqa: E702
            elif mode in ("val", "val-pt"):
                set_grads(weights, P.heldout_radial_direction(grads, weights, vgrads, per_tensor))
            elif mode.startswith("ev"):  # direct: u = g + λθ
                if isinstance(evidence, P.EvidenceL2):  # the Kronecker factors come from hooks
                    if sampled is not None:  # B·g² of a mean-0 batch gradient: the Fisher's diagonal
                        evidence.update([len(idx) * g.double() ** 2 for g in sampled])
                    elif mode.startswith("evb"):  # the batch gradient's square times the batch size
                        evidence.update([len(idx) * g.double() ** 2 for g in grads])
                    else:
                        evidence.update(P.per_sample_sq_grads(model, weights, xtr[idx], ytr[idx]))
                if evidence is not None:
                    lams = evidence.lambdas(weights)
                if mode == "evb-out":  # the output layer's λ on every weight
                    lams = lams[-1:]
                elif mode == "evb-out1":  # ... on the output layer's weight only
                    lams = [0.0] * (len(lams) - 1) + lams[-1:]
                set_grads(
                    weights, P.apply_coefficients(grads, weights, lams, per_tensor or mode == "evb-out1")
                )
                lam_sum += lams[-1] if mode.startswith("evb-out") else sum(lams) / len(lams)
                lam_n += 1  # noqa: E702
            elif mode in ("l2", "l2-pt"):
                new, lam_t = l2_direction(grads, weights, per_tensor)
                set_grads(weights, new)
                lam_sum += float(lam_t.mean())
                lam_n += 1  # noqa: E702
            elif mode in ("mn", "mn-pt"):
                new, alphas = P.l2_minnorm_direction(grads, weights, per_tensor)
                set_grads(weights, new)
                lam_sum += sum((1 - a) / max(a, 1e-12) for a in alphas) / len(alphas)
                lam_n += 1  # noqa: E702
            olds = [p.detach().clone() for p in weights] if decoupled else None
            opt.step()
            if decoupled:
                news = [p.data for p in weights]
                if mode == "l2-last-dec":  # the output layer's weight on its own, one global rule elsewhere
                    decoupled_correction(news[:-1], olds[:-1], False)
                    decoupled_correction(news[-1:], olds[-1:], True)
                elif mode == "lp-dec":
                    P.decoupled_log_product(news, olds)
                elif mode.startswith("l2"):
                    decoupled_correction(news, olds, per_tensor)
                elif mode.startswith("val"):
                    P.decoupled_heldout_radial(news, olds, vgrads, per_tensor)
                elif mode.startswith("mn"):
                    lams = P.decoupled_minnorm_shrink(news, olds, per_tensor)
                    lam_sum += sum(lams) / len(lams)
                    lam_n += 1  # noqa: E702
                else:
                    P.decoupled_balanced_shrink(news, olds, per_tensor)
        if annealing is not None:
            annealing.step()
        if trace:  # without a graph, so that no training hook (the K-FAC factors') sees the test images
            with torch.no_grad():
                by_epoch.append(D.accuracy(model, xte, yte))
    with torch.no_grad():
        norm = float(torch.sqrt(sum((p.double() ** 2).sum() for p in weights)))
    return {
        "train_acc": D.accuracy(model, xtr, ytr),
        "val_acc": D.accuracy(model, xva, yva),
        "test_acc": D.accuracy(model, xte, yte),
        "weight_norm": norm,
        "init_norm": init_norm,
        "mean_lambda": lam_sum / lam_n if lam_n else float("nan"),
        **({"test_acc_by_epoch": " ".join(f"{a:.4f}" for a in by_epoch)} if trace else {}),
    }


def step_times(archs: list[str], reps: int, width: int, steps: int = 100, warmup: int = 300) -> list[dict]:
    """The time of a training step (forward, backward, the rule, SGD's step) with no regularization, weight
    decay, the norm rule (global, decoupled: SGD's default) and the evidence λ (``method="l2",
    evidence=True``; ``age 0``: its spectra taken at every solve), ``reps`` interleaved repetitions of
    ``steps`` steps each on batches of 32, after ``warmup`` steps (past the evidence λ's early spectra, at
    steps 1, 10, 20, 40, 80, 160 and 260: each repetition then holds one eigendecomposition and ten
    solves); medians and quartiles of each variant's time over its plain step's (the same repetition)."""
    data = prepare(0, 200, 300, 0.3)
    (xtr, ytr), _, _ = data
    rows = []
    for arch in archs:
        variants = {}
        for name in ("none", "wd", "l2-dec", "l2-ev-pt", "l2-ev-pt age 0"):
            model = build(arch, 0, width)
            opt = D.optimizer(model, "sgd", LR["sgd"], 1e-3 if name == "wd" else None)
            if name == "l2-dec":
                opt = GradSurgery(opt, "l2")
            elif name.startswith("l2-ev-pt"):
                opt = GradSurgery(opt, "l2", evidence=True, layers=model, num_samples=len(ytr))
                if name.endswith("age 0"):  # the spectra taken at every solve
                    opt.l2.max_spectrum_age = 0
            variants[name] = (model, opt)
        gen = torch.Generator().manual_seed(7)
        batches = [D.batches(len(ytr), 32, gen)[0] for _ in range(steps)]
        early = [D.batches(len(ytr), 32, gen)[0] for _ in range(warmup)]

        def run(model, opt, batches=batches) -> float:
            t0 = time.perf_counter()
            for idx in batches:
                opt.zero_grad()
                loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
                opt.backward(loss) if isinstance(opt, GradSurgery) else loss.backward()
                opt.step()
            return (time.perf_counter() - t0) / len(batches)

        for model, opt in variants.values():
            run(model, opt, early)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(reps):
            for name, (model, opt) in variants.items():
                times[name].append(run(model, opt))
        for name, values in times.items():
            ratios = sorted(v / p for v, p in zip(values, times["none"], strict=True))
            quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            rows.append(
                {
                    "arch": arch,
                    "mode": name,
                    "step_ms": 1e3 * statistics.median(values),
                    "ratio": statistics.median(ratios),
                    "ratio_q1": quartiles[0],
                    "ratio_q3": quartiles[-1],
                }
            )
    return rows


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """A float32 copy of ``t`` with its mantissa rounded to TF32's 10 bits (to nearest, ties away from zero),
    what a GPU's TF32 matrix product reads of its inputs before accumulating in float32."""
    bits = t.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


class _TF32Factors(KroneckerFactors):
    """The evidence rule's factors with their products' inputs rounded to TF32 (the layers' inputs and
    output gradients; unfold only moves them, and B·∂L/∂out scales by a power of two here)."""

    def input_moment(self, k: int, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        return super().input_moment(k, _tf32(x))

    def record(self, k: int, a: torch.Tensor, rows: int, batch: int, grad_out: torch.Tensor) -> None:
        super().record(k, a, rows, batch, _tf32(grad_out))


def factor_precision(arch: str, seed: int, noise: float, epochs: int, width: int) -> dict:
    """Along one SGD run of ``method="l2", evidence=True`` (float32 factors), the largest relative
    difference between each λ it solves from spectra taken at that step and the λ of the same solve from
    factors recorded beside it in float64 and with TF32 products (the same batches and weights: a
    difference of precision only)."""
    (xtr, ytr), _, _ = prepare(seed, 200, 300, noise)
    model = build(arch, seed, width)
    opt = GradSurgery(
        D.optimizer(model, "sgd", LR["sgd"]), "l2", evidence=True, layers=model, num_samples=len(ytr)
    )
    rule = opt.l2
    layers, beta = rule.factors.layers, rule.factors.beta
    shadows = {"float64": KroneckerFactors(layers, beta), "tf32": _TF32Factors(layers, beta)}
    shadows["float64"].dtypes = [torch.float64] * len(layers)
    local = LocalReduction(contextlib.nullcontext)
    worst = dict.fromkeys(shadows, 0.0)
    solves = 0
    gen = torch.Generator().manual_seed(1000 + seed)
    for _ in range(epochs):
        for idx in D.batches(len(ytr), 32, gen):
            opt.zero_grad()
            opt.backward(F.cross_entropy(model(xtr[idx]), ytr[idx]))
            for factors in shadows.values():
                factors.commit(range(len(layers)), local)
            if rule.spectra_step == rule.steps:  # the rule took its spectra and solved in this backward
                solves += 1
                for name, factors in shadows.items():
                    for k, weight in enumerate(rule.weights):
                        sq_norm = float((weight.detach().double() ** 2).sum())
                        lam = evidence_lambda(factors.curvatures(k), sq_norm, rule.num_samples)
                        worst[name] = max(worst[name], abs(lam / rule.lambdas[k] - 1))
            opt.step()
    for factors in shadows.values():
        factors.remove()
    return {"arch": arch, "seed": seed, "label_noise": noise, "solves": solves, **worst}


def spectrum_age(arch: str, seed: int, noise: float, epochs: int, width: int) -> dict:
    """Along one SGD run of ``method="l2", evidence=True``, at each solve that reads spectra taken at an
    earlier step: the rule's λ (those spectra scaled to the factors' current traces) and the λ of the same
    spectra unscaled, each against the λ of a fresh eigendecomposition of the same factors; the relative
    differences' mean (signed) and largest magnitude over the run's solves and layers."""
    (xtr, ytr), _, _ = prepare(seed, 200, 300, noise)
    model = build(arch, seed, width)
    opt = GradSurgery(
        D.optimizer(model, "sgd", LR["sgd"]), "l2", evidence=True, layers=model, num_samples=len(ytr)
    )
    rule = opt.l2
    diffs: dict[str, list[float]] = {"scaled": [], "unscaled": []}
    gen = torch.Generator().manual_seed(1000 + seed)
    for _ in range(epochs):
        for idx in D.batches(len(ytr), 32, gen):
            opt.zero_grad()
            opt.backward(F.cross_entropy(model(xtr[idx]), ytr[idx]))
            if rule.steps % rule.every == 0 and rule.spectra_step < rule.steps:
                for k, weight in enumerate(rule.weights):
                    sq_norm = float((weight.detach().double() ** 2).sum())
                    fresh = evidence_lambda(rule.factors.curvatures(k), sq_norm, rule.num_samples)
                    unscaled = evidence_lambda(rule.spectra[k].curvatures(), sq_norm, rule.num_samples)
                    if fresh > 0:
                        diffs["scaled"].append(rule.lambdas[k] / fresh - 1)
                        diffs["unscaled"].append(unscaled / fresh - 1)
            opt.step()
    row: dict = {"arch": arch, "seed": seed, "label_noise": noise, "solves": len(diffs["scaled"])}
    for name, values in diffs.items():
        row[f"{name}_mean"] = statistics.mean(values) if values else 0.0
        row[f"{name}_max"] = max((abs(v) for v in values), default=0.0)
    return row


def training(row: dict) -> str:
    """The optimizer and, when not constant, the learning-rate schedule of a row (rows written before the
    schedule was recorded ran at a constant rate)."""
    schedule = row.get("schedule") or "constant"
    return row["optimizer"] if schedule == "constant" else f"{row['optimizer']}, {schedule} lr"


def summarize(rows: list[dict]) -> str:
    out = []
    keyset = sorted({(r["arch"], float(r["label_noise"]), training(r)) for r in rows})
    for arch, noise, opt_name in keyset:
        sel = [
            r
            for r in rows
            if r["arch"] == arch and float(r["label_noise"]) == noise and training(r) == opt_name
        ]

        def pick(mode, lam="", sel=sel):
            return sorted(
                [r for r in sel if r["mode"] == mode and (lam == "" or float(r["lambda"]) == lam)],
                key=lambda r: int(r["seed"]),
            )

        def col(s, k):
            return [float(r[k]) for r in s]

        lams = sorted({float(r["lambda"]) for r in sel if r["mode"] == "wd"})
        if not lams:
            continue
        curve = [(lam, pick("wd", lam)) for lam in lams]
        best = max(curve, key=lambda c: D.mean_std(col(c[1], "val_acc"))[0])
        tuned = col(best[1], "test_acc")
        none = col(pick("none"), "test_acc")
        gain = D.mean_std(tuned)[0] - D.mean_std(none)[0]
        header = [
            "mode",
            "test acc %",
            "‖W‖ end",
            "gap to tuned λ (pts, paired)",
            "recovered of the tuned gain",
        ]
        table = []
        for name, s in [
            ("no regularization", pick("none")),
            (f"weight decay λ={best[0]:g} (tuned on val)", best[1]),
        ] + [(m, pick(m)) for m in TODAY + PROTO]:
            if not s:
                continue
            acc = col(s, "test_acc")
            gaps = [a - b for a, b in zip(acc, tuned, strict=True)] if len(acc) == len(tuned) else []
            rec = (D.mean_std(acc)[0] - D.mean_std(none)[0]) / gain if abs(gain) > 1e-9 else float("nan")
            table.append(
                [
                    name,
                    D.pm(acc),
                    D.pm(col(s, "weight_norm"), scale=1.0),
                    D.pm(gaps, digits=2),
                    f"{100 * rec:.0f} %" if rec == rec else "—",
                ]
            )
        wd_curve = ", ".join(f"{lam:g}: {100 * D.mean_std(col(s, 'test_acc'))[0]:.1f}" for lam, s in curve)
        scenario = "clean labels" if not noise else f"{round(100 * noise)} % label noise"
        title = (
            f"**{arch.upper()}, {opt_name.upper()}, {scenario}**"
            f" — tuned gain {100 * gain:+.2f} pts; weight-decay curve (test %): {wd_curve}"
        )
        out.append(title + "\n\n" + D.markdown_table(header, table))
    return "\n\n".join(out)


def overview(rows: list[dict]) -> str:
    """One table: a row per mode, a column per (architecture, optimizer, scenario), each cell the paired gap
    to the tuned λ (mean ± std, points) and, under noise, the share of the tuned gain recovered."""
    keys = sorted({(r["arch"], training(r), float(r["label_noise"])) for r in rows})
    modes = [m for m in ["none", *TODAY, *PROTO] if any(r["mode"] == m for r in rows)]
    header = ["mode"] + [
        f"{a.upper()} {o.upper()} {'clean' if not n else f'{round(100 * n)} % noise'}" for a, o, n in keys
    ]
    cells = {m: [m if m != "none" else "no regularization"] for m in modes}
    tuned_row = ["tuned λ (test %, λ)"]
    for arch, opt_name, noise in keys:
        sel = [
            r
            for r in rows
            if r["arch"] == arch and training(r) == opt_name and float(r["label_noise"]) == noise
        ]

        def accs(mode, lam=None, sel=sel):
            picked = [r for r in sel if r["mode"] == mode and (lam is None or float(r["lambda"]) == lam)]
            return [float(r["test_acc"]) for r in sorted(picked, key=lambda r: int(r["seed"]))]

        lams = sorted({float(r["lambda"]) for r in sel if r["mode"] == "wd"})
        if not lams:
            for m in modes:
                cells[m].append("—")
            tuned_row.append("—")
            continue
        best = max(
            lams,
            key=lambda lam: D.mean_std(
                [float(r["val_acc"]) for r in sel if r["mode"] == "wd" and float(r["lambda"]) == lam]
            )[0],
        )
        tuned, none = accs("wd", best), accs("none")
        gain = D.mean_std(tuned)[0] - D.mean_std(none)[0]
        tuned_row.append(f"{D.pm(tuned)} (λ={best:g}; gain {100 * gain:+.1f})")
        for m in modes:
            a = accs(m)
            if len(a) != len(tuned):
                cells[m].append("—")
                continue
            gaps = [x - y for x, y in zip(a, tuned, strict=True)]
            cell = D.pm(gaps, digits=2)
            if noise and gain > 0.005:
                cell += f" ({100 * (D.mean_std(a)[0] - D.mean_std(none)[0]) / gain:.0f} %)"
            cells[m].append(cell)
    return D.markdown_table(header, [tuned_row] + [cells[m] for m in modes])


def evidence_at_init(arch: str, seed: int, noise: float, width: int) -> dict:
    """The evidence λ of every γ estimate at initialisation, over the whole training set: the empirical
    Fisher's diagonal (exact per-sample squares), its exact spectrum, the Kronecker factors of one pass,
    and the exact Gauss-Newton spectrum (``evidence_lambdas_ggn``; about a minute for the MLP)."""
    (xtr, ytr), _, _ = prepare(seed, 200, 300, noise)
    model = build(arch, seed, width)
    weights = D.weight_matrices(model)
    n = len(ytr)
    sq_norm = float(sum((p.detach().double() ** 2).sum() for p in weights))
    squares = P.per_sample_sq_grads(model, weights, xtr, ytr)
    diagonal = P.evidence_lambda(torch.cat([q.reshape(-1).double() for q in squares]), sq_norm, n)
    kron = P.KroneckerEvidence(model, weights, n, per_tensor=False)
    F.cross_entropy(model(xtr), ytr).backward()
    (kronecker,) = kron.lambdas(weights)
    kron.remove()
    (spectral,) = P.evidence_lambdas_spectral(model, weights, xtr, ytr, per_tensor=False)
    (ggn,) = P.evidence_lambdas_ggn(model, weights, xtr, per_tensor=False)
    return {
        "arch": arch,
        "seed": seed,
        "label_noise": noise,
        "weight_sq_norm": sq_norm,
        "diagonal": diagonal,
        "kronecker": kronecker,
        "fisher_spectrum": spectral,
        "gauss_newton_spectrum": ggn,
    }


def write_run_table(
    args: argparse.Namespace,
    measure: Callable[[str, int, float, int, int], dict],
    columns: list[str],
    cells: Callable[[dict], list[str]],
    heading: str,
    filename: str,
) -> None:
    """One row per architecture, seed and label noise of ``args``: ``cells`` of what ``measure`` returns
    for that run, printed as it comes; the table under ``heading`` written to ``args.out / filename``."""
    lines = [
        "| arch | seed | label noise | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for arch, seed, noise in itertools.product(args.arch, args.seeds, args.label_noise):
        row = measure(arch, seed, noise, args.epochs, args.width)
        lines.append(f"| {arch} | {seed} | {noise} | " + " | ".join(cells(row)) + " |")
        print(lines[-1], flush=True)
    text = heading + "\n\n" + "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / filename).write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--arch", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "adam"], choices=["sgd", "adam"])
    parser.add_argument("--label-noise", type=float, nargs="+", default=[0.0, 0.3])
    parser.add_argument("--modes", nargs="+", default=["none", "wd"] + TODAY + PROTO)
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument(
        "--schedule",
        choices=["constant", "cosine"],
        default="constant",
        help="the learning rate: constant, or annealed to 0 over the run by a cosine (stepped per epoch)",
    )
    parser.add_argument(
        "--trace", action="store_true", help="record the test accuracy after every epoch (test_acc_by_epoch)"
    )
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--sgd-only", nargs="*", default=[], help="modes run with SGD only")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/l2_free"))
    parser.add_argument("--summarize", type=pathlib.Path)
    parser.add_argument(
        "--evidence-at-init", action="store_true", help="print the evidence λ of every γ estimate at init"
    )
    parser.add_argument(
        "--factor-precision",
        action="store_true",
        help="along one run per arch, seed and noise: the evidence λ from float64 and TF32 factors instead",
    )
    parser.add_argument(
        "--spectrum-age",
        action="store_true",
        help="along one run per arch, seed and noise: the evidence λ between eigendecompositions against the "
        "λ of a fresh one",
    )
    parser.add_argument(
        "--step-times",
        type=int,
        metavar="REPS",
        help="time a step of none, wd, l2-dec and l2-ev-pt with SGD instead (REPS interleaved repetitions of "
        "100 steps, after 300)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.evidence_at_init:
        keys = ["diagonal", "kronecker", "fisher_spectrum", "gauss_newton_spectrum"]
        print("| arch | seed | label noise | ‖θ‖² | " + " | ".join(keys) + " |")
        print("|---|---|---|---|" + "---|" * len(keys))
        for arch, seed, noise in itertools.product(args.arch, args.seeds, args.label_noise):
            row = evidence_at_init(arch, seed, noise, args.width)
            cells = " | ".join(f"{row[k]:.4g}" for k in keys)
            print(f"| {arch} | {seed} | {noise} | {row['weight_sq_norm']:.1f} | {cells} |", flush=True)
        return 0
    if args.step_times:
        lines = ["| arch | mode | step ms | / plain step (25th-75th percentile) |", "|---|---|---|---|"]
        for row in step_times(args.arch, args.step_times, args.width):
            lines.append(
                f"| {row['arch']} | {row['mode']} | {row['step_ms']:.2f} | {row['ratio']:.2f} "
                f"({row['ratio_q1']:.2f}-{row['ratio_q3']:.2f}) |"
            )
        text = "# Step time, SGD, one thread, batch 32\n\n" + "\n".join(lines) + "\n"
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "step_times.md").write_text(text)
        print(text)
        return 0
    if args.spectrum_age:
        write_run_table(
            args,
            spectrum_age,
            ["solves", "scaled: mean", "scaled: largest", "unscaled: mean", "unscaled: largest"],
            lambda r: [
                str(r["solves"]),
                f"{r['scaled_mean']:+.3f}",
                f"{r['scaled_max']:.3f}",
                f"{r['unscaled_mean']:+.3f}",
                f"{r['unscaled_max']:.3f}",
            ],
            "# The evidence λ between eigendecompositions\n\nRelative difference of each λ solved from "
            "older spectra (scaled to the factors' current traces, as the rule does, and unscaled) against "
            "the λ of a fresh eigendecomposition (SGD, batch 32).",
            "spectrum_age.md",
        )
        return 0
    if args.factor_precision:
        write_run_table(
            args,
            factor_precision,
            ["solves", "float64 factors", "TF32 products"],
            lambda r: [str(r["solves"]), f"{r['float64']:.1e}", f"{r['tf32']:.1e}"],
            "# The evidence λ's float32 factors against float64 and TF32 ones\n\nLargest relative difference "
            "of a solved λ along the run (SGD, batch 32).",
            "factor_precision.md",
        )
        return 0
    if args.summarize:
        rows = D.read_rows(args.summarize)
        text = f"# λ-free L2 rules\n\n{overview(rows)}\n\n{summarize(rows)}\n"
        (args.summarize / "l2_lambda_free.md").write_text(text)
        print(text)
        return 0
    jobs = []
    for seed, arch, noise, opt_name, mode in itertools.product(
        args.seeds, args.arch, args.label_noise, args.optimizers, args.modes
    ):
        if opt_name == "adam" and mode in args.sgd_only:
            continue
        for lam in WD_GRID[opt_name] if mode == "wd" else [None]:
            jobs.append((arch, noise, seed, opt_name, mode, lam))
    i, n = (int(v) for v in args.shard.split("/"))
    jobs = jobs[i::n]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for arch, noise, seed, opt_name, mode, lam in jobs:
        data = prepare(seed, 200, 300, noise)
        t0 = time.perf_counter()
        res = train_one(
            seed,
            arch,
            opt_name,
            mode,
            lam,
            data,
            epochs=args.epochs,
            width=args.width,
            schedule=args.schedule,
            trace=args.trace,
        )
        rows.append(
            {
                "arch": arch,
                "label_noise": noise,
                "optimizer": opt_name,
                "schedule": args.schedule,
                "mode": mode,
                "lambda": "" if lam is None else lam,
                "seed": seed,
                **res,
                "seconds": time.perf_counter() - t0,
            }
        )
        print(
            f"{arch} noise {noise} seed {seed} {training(rows[-1])} {mode} {'' if lam is None else lam}: "
            f"test {res['test_acc']:.4f} val {res['val_acc']:.4f} ‖W‖ {res['weight_norm']:.2f} "
            f"λ̄ {res['mean_lambda']:.2g} ({rows[-1]['seconds']:.1f}s)",
            flush=True,
        )
        D.write_csv(args.out / f"rows-{i}-of-{n}.csv", rows)
    if n == 1:
        text = "# λ-free L2 rules\n\n" + summarize(rows) + "\n"
        (args.out / "l2_lambda_free.md").write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
