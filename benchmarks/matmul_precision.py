"""The Gram matrix and the fusion under a lowered float32 matrix-product precision: TF32 on a GPU
(``torch.set_float32_matmul_precision("high")``), oneDNN's bfloat16 on a CPU that has it (``"medium"``).

* **products**: G = J Jᵀ (relative to ‖g_i‖‖g_j‖) and Jᵀw (relative to Σ_i |w_i J_i|), max error against
  float64 products, for ``gram_matrix``/``combine`` (IEEE float32 whatever the setting) and for the same
  chunked products left to the setting (``gradsurgery.gram._chunked_gram``, ``w @ J``), on random Jacobians;
  their times, interleaved (median and range of the ratio).
* **steps**: one MGDA step (T = 4 linear heads on a two-layer trunk) under the setting against the same step
  under ``"highest"``: G and the weights, for the Jacobian and the activation sources. This is what the
  lowered backward of the model itself changes (and, for the activation source, its own gradient-row and
  kernel products, which follow the setting): the part of the error the package leaves to the user.

Writes ``report.md`` and ``rows.json``.

    python -m benchmarks.matmul_precision --device cuda --out results/matmul_precision_cuda
    python -m benchmarks.matmul_precision --device cpu --out results/matmul_precision_cpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradsurgery import GradSurgery
from gradsurgery.gram import CHUNK, _chunked_gram, combine, gram_matrix

try:
    from . import speed
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import speed  # type: ignore[no-redef]

LOWERED = {"cuda": "high", "cpu": "medium"}


def jacobians(tiny: bool) -> dict[str, torch.Tensor]:
    """Random T×d Jacobians: rows of different scales sharing a small common component (long same-sign
    sums in G), and rows of positive entries only."""
    gen = torch.Generator().manual_seed(0)
    d1, d5 = (5000, 20000) if tiny else (1 << 20, 5_000_000)
    return {
        f"T=4 d={d1} spread": torch.randn(4, d1, generator=gen) * torch.rand(4, 1, generator=gen) + 0.01,
        f"T=8 d={d5} spread": torch.randn(8, d5, generator=gen) * torch.rand(8, 1, generator=gen) + 0.01,
        f"T=4 d={d1} positive": torch.rand(4, d1, generator=gen),
    }


def product_errors(jacobian: torch.Tensor, weights: torch.Tensor, device: torch.device) -> dict[str, float]:
    exact = jacobian.double() @ jacobian.double().T
    scale = torch.outer(exact.diagonal().sqrt(), exact.diagonal().sqrt())
    exact_fused = weights.double() @ jacobian.double()
    fused_scale = weights.double() @ jacobian.double().abs()
    j, w = jacobian.to(device), weights.to(device)

    def g_error(gram: torch.Tensor) -> float:
        return float(((gram.cpu() - exact).abs() / scale).max())

    def fused_error(fused: torch.Tensor) -> float:
        return float(((fused.cpu().double() - exact_fused).abs() / fused_scale).max())

    return {
        "gram_package": g_error(gram_matrix(j)),
        "gram_setting": g_error(_chunked_gram(j, torch.float64, CHUNK)),
        "fused_package": fused_error(combine(w, j)),
        "fused_setting": fused_error(w @ j),
    }


def time_products(j: torch.Tensor, w: torch.Tensor, reps: int, device: torch.device) -> dict[str, Any]:
    """The package's G and Jᵀw: milliseconds, and the ratio to the same products left to the setting."""
    times = speed.interleaved_times(
        {
            "gram_package": lambda: gram_matrix(j),
            "gram_setting": lambda: _chunked_gram(j, torch.float64, CHUNK),
            "fused_package": lambda: combine(w, j),
            "fused_setting": lambda: w @ j,
        },
        reps,
        1,
        around=lambda: speed._sync(device),
    )
    timing: dict[str, Any] = {}
    for what in ("gram", "fused"):
        ratios = [a / b for a, b in zip(times[f"{what}_package"], times[f"{what}_setting"], strict=True)]
        timing[f"{what}_ms"] = 1e3 * statistics.median(times[f"{what}_package"])
        timing[f"{what}_ratio"] = [statistics.median(ratios), min(ratios), max(ratios)]
    return timing


def step_gram(source: str, device: torch.device, tiny: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """G and the weights of one MGDA step of a fresh trunk with four heads."""
    batch, width = (64, 32) if tiny else (4096, 1024)
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()).to(device)
    heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(4)).to(device)
    options: dict[str, Any] = (
        {"gradient_source": "activations", "model": trunk} if source == "activations" else {}
    )
    opt = GradSurgery(torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.01), "mgda", **options)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 256, generator=gen).to(device), torch.randn(batch, 4, generator=gen).to(device)
    z = trunk(x)
    info = opt.backward([(head(z).squeeze(1) - y[:, i]).pow(2).mean() for i, head in enumerate(heads)])
    return info.gram.cpu(), info.weights.cpu()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--precision", choices=["high", "medium"], help="default: high on cuda, medium on cpu"
    )
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default="results/matmul_precision")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    device = torch.device(args.device)
    lowered = args.precision or LOWERED[device.type]
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    try:
        gen = torch.Generator().manual_seed(2)
        for name, jacobian in jacobians(args.tiny).items():
            weights = torch.rand(jacobian.shape[0], generator=gen)
            torch.set_float32_matmul_precision("highest")
            rows.append(
                {
                    "part": "products",
                    "case": name,
                    "setting": "highest",
                    **product_errors(jacobian, weights, device),
                }
            )
            torch.set_float32_matmul_precision(lowered)
            errors = product_errors(jacobian, weights, device)
            timing = time_products(jacobian.to(device), weights.to(device), args.reps, device)
            rows.append({"part": "products", "case": name, "setting": lowered, **errors, **timing})
            print(f"{name} done", file=sys.stderr)
        for source in ("jacobian", "activations"):
            torch.set_float32_matmul_precision("highest")
            gram, weights = step_gram(source, device, args.tiny)
            torch.set_float32_matmul_precision(lowered)
            low_gram, low_weights = step_gram(source, device, args.tiny)
            scale = torch.outer(gram.diagonal().sqrt(), gram.diagonal().sqrt())
            rows.append(
                {
                    "part": "steps",
                    "case": source,
                    "setting": lowered,
                    "gram_change": float(((low_gram - gram).abs() / scale).max()),
                    "weights_change": float((low_weights - weights).abs().max()),
                }
            )
    finally:
        torch.set_float32_matmul_precision("highest")
    speed.write_rows_and_report(Path(args.out), rows, report(rows, device, lowered, args.reps))
    return 0


def report(rows: list[dict[str, Any]], device: torch.device, lowered: str, reps: int) -> str:
    where = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu, one thread"
    lines = [
        f'# G and Jᵀw under set_float32_matmul_precision("{lowered}") ({where}, torch {torch.__version__})',
        "",
        "Max error against float64 products: G relative to ‖g_i‖‖g_j‖, Jᵀw relative to Σ|w_i J_i|. "
        "`package`: gram_matrix / combine; `setting`: the same products left to the setting. Time: the "
        f"package's, and its ratio to the setting's (median, range; {reps} calls each, in shuffled order).",
        "",
        "| case | setting | G package | G setting | Jᵀw package | Jᵀw setting | G ms (ratio) "
        "| Jᵀw ms (ratio) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["part"] == "products"):
        cells = [r["case"], r["setting"]] + [
            f"{r[k]:.1e}" for k in ("gram_package", "gram_setting", "fused_package", "fused_setting")
        ]
        for what in ("gram", "fused"):
            if f"{what}_ms" in r:
                median, low, high = r[f"{what}_ratio"]
                cells.append(f"{r[f'{what}_ms']:.3f} ({median:.2f}, {low:.2f}-{high:.2f})")
            else:
                cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f'One MGDA step (T = 4) under "{lowered}" against the same step under "highest": the change of G '
        "(relative to ‖g_i‖‖g_j‖) and of the weights.",
        "",
        "| source | G change | weights change |",
        "|---|---|---|",
    ]
    for r in (r for r in rows if r["part"] == "steps"):
        lines.append(f"| {r['case']} | {r['gram_change']:.1e} | {r['weights_change']:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
