"""MMoE over sparse embedding tables, balanced by MGDA or Nash-MTL, checkpointed half-way and resumed.

The usual ranking-model setup: categorical fields looked up in ``nn.Embedding(..., sparse=True)`` tables, a
multi-gate mixture of experts (MMoE, Ma et al. KDD 2018) and three towers: click, conversion (only after a
click) and watch time. The tables get sparse gradients, so they step with ``torch.optim.SparseAdam`` and the
dense part with ``Adam``, joined by ``gradsurgery.MultiOptimizer``. ``GradSurgery(..., model=model)`` takes
the exact Gram matrix of the task gradients from the layers' activations, over the rows the batch touched:
its cost follows the batch, not the size of the tables.

Half-way, the model's and the optimizer's state dicts are saved with ``torch.save`` (the optimizer's holds
SparseAdam's and Adam's states and the method's own state, e.g. Nash-MTL's last solution). ``--resume``
loads them into a freshly built model and optimizer and continues: the resumed run is bit-identical to the
uninterrupted one, because every batch is drawn from a generator seeded by (seed, step), not from a stream
whose position would have to be saved too.

    python examples/mmoe_sparse.py                                   # MGDA, 40 steps; checkpoint at 20
    python examples/mmoe_sparse.py --method nash_mtl --checkpoint ckpt.pt
    python examples/mmoe_sparse.py --method nash_mtl --resume ckpt.pt  # steps 21-40 again, from the file

A few seconds on one CPU core with the default sizes (tables of 50 000 and 20 000 rows).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gradsurgery import GradSurgery, MultiOptimizer

#: rows of the tables: user, item, category, hour of day
VOCAB_SIZES = (50_000, 20_000, 1000, 24)
TASKS = ("click", "conversion", "watch")


class MMoE(nn.Module):
    """Sparse tables → ``num_experts`` MLP experts → one softmax gate and one tower per task."""

    def __init__(
        self,
        vocab_sizes=VOCAB_SIZES,
        emb_dim: int = 16,
        num_experts: int = 4,
        expert_dim: int = 32,
        num_tasks: int = 3,
    ) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(v, emb_dim, sparse=True) for v in vocab_sizes)
        width = emb_dim * len(vocab_sizes)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, expert_dim), nn.ReLU())
            for _ in range(num_experts)
        )
        self.gates = nn.ModuleList(nn.Linear(width, num_experts) for _ in range(num_tasks))
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(expert_dim, 16), nn.ReLU(), nn.Linear(16, 1)) for _ in range(num_tasks)
        )

    def forward(self, ids: torch.Tensor) -> list[torch.Tensor]:
        x = torch.cat([table(ids[:, f]) for f, table in enumerate(self.tables)], dim=1)
        experts = torch.stack([expert(x) for expert in self.experts], dim=1)  # (B, E, expert_dim)
        outputs = []
        for gate, tower in zip(self.gates, self.towers, strict=True):
            mix = torch.softmax(gate(x), dim=1).unsqueeze(-1)
            outputs.append(tower((mix * experts).sum(1)).squeeze(1))
        return outputs


def make_data(n: int = 20_000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (n, fields), targets (n, 3)): skewed ids, labels from a hidden per-id score."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([(torch.rand(n, generator=gen) ** 3 * v).long() for v in VOCAB_SIZES], dim=1)
    score = sum(torch.randn(v, generator=gen)[ids[:, f]] for f, v in enumerate(VOCAB_SIZES)) / 2
    click = (torch.rand(n, generator=gen) < torch.sigmoid(score - 1.5)).float()
    conversion = click * (torch.rand(n, generator=gen) < torch.sigmoid(0.8 * score - 2.0)).float()
    watch = torch.exp(0.3 * score + 0.3 * torch.randn(n, generator=gen)) + click  # minutes
    return ids, torch.stack([click, conversion, watch], dim=1)


def batch(data, step: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step``: a function of (seed, step) only, so a resumed run draws the same batches."""
    ids, targets = data
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    rows = torch.randint(0, len(ids), (batch_size,), generator=gen)
    return ids[rows], targets[rows]


def task_losses(outputs: list[torch.Tensor], targets: torch.Tensor) -> list[torch.Tensor]:
    click, conversion, watch = outputs
    return [
        F.binary_cross_entropy_with_logits(click, targets[:, 0]),
        F.binary_cross_entropy_with_logits(conversion, targets[:, 1]),
        F.mse_loss(watch, targets[:, 2]),
    ]


def build(method: str, seed: int, lr: float = 1e-2) -> tuple[MMoE, GradSurgery]:
    """The model and its optimizer: SparseAdam for the tables, Adam for the rest, GradSurgery around both."""
    torch.manual_seed(seed)
    model = MMoE()
    tables = [table.weight for table in model.tables]
    dense = [p for name, p in model.named_parameters() if not name.startswith("tables.")]
    inner = MultiOptimizer(torch.optim.SparseAdam(tables, lr=lr), torch.optim.Adam(dense, lr=lr))
    return model, GradSurgery(inner, method, model=model)


def train(
    method: str = "mgda",
    steps: int = 40,
    *,
    batch_size: int = 256,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    checkpoint_at: int | None = None,
    resume: str | Path | None = None,
    log_every: int = 0,
) -> dict:
    """Train for ``steps`` steps (from the checkpoint's step with ``resume``); with ``checkpoint``, save the
    model's and the optimizer's state dicts after step ``checkpoint_at`` (default: half-way).

    Returns ``{"losses": {step: [3 floats]}, "weights": {step: [3 floats]}, "model": state_dict, "source":
    info.source}`` for the steps this call ran."""
    data = make_data(seed=seed)
    model, opt = build(method, seed)
    start = 0
    if resume is not None:
        saved = torch.load(resume, weights_only=True)  # tensors and Python primitives only
        if saved["method"] != method:
            raise ValueError(f"{resume} was written by method {saved['method']!r}, not {method!r}")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        start = saved["step"]
    at = steps // 2 if checkpoint_at is None else checkpoint_at
    history: dict = {"losses": {}, "weights": {}, "source": None}
    for step in range(start, steps):
        ids, targets = batch(data, step, batch_size, seed)
        losses = task_losses(model(ids), targets)
        opt.zero_grad()
        info = opt.backward(losses)
        opt.step()
        history["losses"][step] = [float(v) for v in info.losses]
        history["weights"][step] = [float(w) for w in info.weights]
        history["source"] = info.source
        if log_every and (step + 1) % log_every == 0:
            values = ", ".join(f"{t} {v:.4f}" for t, v in zip(TASKS, history["losses"][step], strict=True))
            weights = ", ".join(f"{w:.3f}" for w in history["weights"][step])
            print(f"step {step + 1:3d}: {values}; weights {weights}")
        if checkpoint is not None and step + 1 == at:
            state = {"method": method, "step": step + 1}
            torch.save({**state, "model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint)
            if log_every:
                print(f"saved {checkpoint} after step {step + 1}")
    history["model"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("mgda", "nash_mtl"), default="mgda")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default="mmoe_sparse.pt", help="where to save the half-way state")
    parser.add_argument(
        "--resume", default=None, help="a checkpoint written by this script: continue from it"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    history = train(
        args.method,
        args.steps,
        seed=args.seed,
        checkpoint=None if args.resume else args.checkpoint,
        resume=args.resume,
        log_every=10,
    )
    print(f"gradient source: {history['source']}; last losses: {history['losses'][args.steps - 1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
