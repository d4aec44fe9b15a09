"""The models of the speed suite's "exact full mode at scale" rows (``benchmarks.speed``).

Each workload is a model whose ``forward(inputs)`` returns ``(features, outputs)`` (features: the shared
representation every head reads, for torchjd's ``mtl_backward``), its fixed batch, the T losses, the
optimizer a user would step it with, and the modules that hold its shared parameters (for torchjd's
autogram engine):

- ``sparse-<rows>``: 8 fields of ``nn.Embedding(rows, 64, sparse=True)``, batch 512, one small tower
  (512-64-1) per task on the concatenated fields, BCE losses; ``MultiOptimizer(SparseAdam(tables),
  Adam(towers))``. The shared parameters are the tables.
- ``mlp-5M``: the speed suite's 5M-parameter MLP (512-1792-1792-512, ReLU) with T linear heads, batch 128,
  MSE losses, Adam.
- ``transformer``: a pre-norm encoder written with ``nn.Linear`` / ``nn.LayerNorm`` / ``nn.Embedding`` (3
  layers, d_model 256, 4 heads, feed-forward 1024, sequence length 128, batch 4, token and position
  embeddings), with two token-level heads (16-way tagging, a per-token regression) and two sequence-level
  heads (mean-pooled: 4-way classification, a regression); T = 4, Adam.
- ``transformer-nn``: the same shapes with ``nn.TransformerEncoder`` (``batch_first``, ``norm_first``,
  dropout 0): its attention keeps a bare ``in_proj_weight``, which the activation source handles per
  parameter.
- ``transformer-b1``: ``transformer`` with batch 1 (128 tokens instead of 512): the activation source keeps
  T output gradients of every layer, T × (tokens × Σ layer widths) numbers, against T × (parameters) for the
  Jacobian; 512 tokens hold more numbers than the parameters, 128 fewer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradsurgery import MultiOptimizer

from .problems.ranking import table_parameters


class SparseTowers(nn.Module):
    def __init__(self, fields: int, rows: int, dim: int, num_tasks: int, tower: int = 64) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(rows, dim, sparse=True) for _ in range(fields))
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(fields * dim, tower), nn.ReLU(), nn.Linear(tower, 1))
            for _ in range(num_tasks)
        )

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = torch.cat([table(idx[:, f]) for f, table in enumerate(self.tables)], dim=1)
        return z, [tower(z).squeeze(1) for tower in self.towers]


class SpeedModel(nn.Module):
    """Trunk Linear-ReLU-Linear-ReLU-Linear-ReLU, then T single-output heads; returns (z, outputs)."""

    def __init__(self, d_in: int, hidden: int, d_z: int, num_tasks: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(d_in, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, d_z),
            nn.ReLU(),
        )
        self.heads = nn.ModuleList(nn.Linear(d_z, 1) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.trunk(x)
        return z, [head(z).squeeze(1) for head in self.heads]


def seeded_mlp(
    dims: tuple[int, int, int], num_tasks: int, device: torch.device, batch: int
) -> tuple[SpeedModel, torch.Tensor, torch.Generator]:
    """The speed MLP and a batch of inputs, seeded by T and the width so that every benchmark times the same
    ones; the returned generator then draws the targets."""
    gen = torch.Generator().manual_seed(1000 * num_tasks + dims[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(num_tasks)
        model = SpeedModel(*dims, num_tasks).to(device)
    return model, torch.randn(batch, dims[0], generator=gen).to(device), gen


class Block(nn.Module):
    """Pre-norm transformer block from ``nn.Linear`` layers (q, k, v, o and the feed-forward pair)."""

    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.ln1(x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        x = x + self.o(a.transpose(1, 2).reshape(b, s, d))
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))


class Encoder(nn.Module):
    """Token + position embeddings, ``layers`` blocks, a final LayerNorm; four heads (see the module
    docstring). ``torch_layers=True`` uses ``nn.TransformerEncoder`` instead of ``Block``."""

    def __init__(
        self,
        vocab: int = 1000,
        seq: int = 128,
        d: int = 256,
        heads: int = 4,
        ff: int = 1024,
        layers: int = 3,
        torch_layers: bool = False,
    ) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        if torch_layers:
            layer = nn.TransformerEncoderLayer(
                d, heads, ff, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        else:
            self.blocks = nn.Sequential(*(Block(d, heads, ff) for _ in range(layers)))
        self.norm = nn.LayerNorm(d)
        self.tag = nn.Linear(d, 16)
        self.token_value = nn.Linear(d, 1)
        self.seq_class = nn.Linear(d, 4)
        self.seq_value = nn.Linear(d, 1)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        positions = torch.arange(ids.shape[1], device=ids.device)
        z = self.norm(self.blocks(self.tok(ids) + self.pos(positions)))
        pooled = z.mean(1)
        return z, [
            self.tag(z),
            self.token_value(z).squeeze(-1),
            self.seq_class(pooled),
            self.seq_value(pooled).squeeze(-1),
        ]

    def shared_modules(self) -> list[nn.Module]:
        return [self.tok, self.pos, self.blocks, self.norm]


@dataclass
class Workload:
    """One model with its fixed batch (see the module docstring)."""

    name: str
    num_tasks: int
    model: nn.Module
    inputs: Any
    targets: list[torch.Tensor]
    loss_fns: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    shared_modules: list[nn.Module]
    description: str
    device: torch.device
    inner: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        self.inner = self.make_optimizer(self.model)

    @property
    def shared_params(self) -> int:
        return sum(p.numel() for m in self.shared_modules for p in m.parameters())

    def forward(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z, outs = self.model(self.inputs)
        return z, [fn(o, t) for fn, o, t in zip(self.loss_fns, outs, self.targets, strict=True)]

    def losses(self) -> list[torch.Tensor]:
        return self.forward()[1]


def _adam(model: nn.Module) -> torch.optim.Optimizer:
    # A small learning rate keeps hundreds of steps on random targets far from divergence.
    return torch.optim.Adam(model.parameters(), lr=1e-5)


def _sparse_adam(model: nn.Module) -> torch.optim.Optimizer:
    tables, dense = table_parameters(model)
    return MultiOptimizer(torch.optim.SparseAdam(tables, lr=1e-5), torch.optim.Adam(dense, lr=1e-5))


def _bce(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(o, t)


def _ce_tokens(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(o.reshape(-1, o.shape[-1]), t.reshape(-1))


def sparse_workload(
    rows: int, num_tasks: int, device: torch.device, *, fields: int = 8, dim: int = 64, batch: int = 512
) -> Workload:
    gen = torch.Generator().manual_seed(rows + num_tasks)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(num_tasks)
        model = SparseTowers(fields, rows, dim, num_tasks).to(device)
    idx = torch.randint(0, rows, (batch, fields), generator=gen).to(device)
    targets = [torch.randint(0, 2, (batch,), generator=gen).float().to(device) for _ in range(num_tasks)]
    label = f"{rows:.0e}".replace("e+0", "e").replace("e+", "e")
    return Workload(
        f"sparse-{label}",
        num_tasks,
        model,
        idx,
        targets,
        [_bce] * num_tasks,
        _sparse_adam,
        list(model.tables),
        f"{fields} × Embedding({rows:,}, {dim}, sparse=True), towers {fields * dim}-64-1, batch {batch}, "
        "SparseAdam + Adam",
        device,
    )


def mlp_workload(
    num_tasks: int, device: torch.device, dims: tuple[int, int, int] = (512, 1792, 512), batch: int = 128
) -> Workload:
    model, x, gen = seeded_mlp(dims, num_tasks, device, batch)
    y = [torch.randn(batch, generator=gen).to(device) for _ in range(num_tasks)]
    return Workload(
        "mlp-5M" if dims == (512, 1792, 512) else f"mlp-{dims[1]}",
        num_tasks,
        model,
        x,
        y,
        [F.mse_loss] * num_tasks,
        _adam,
        [model.trunk],
        f"MLP {dims[0]}-{dims[1]}-{dims[1]}-{dims[2]}, {num_tasks} linear heads, batch {batch}, Adam",
        device,
    )


def transformer_workload(
    device: torch.device,
    *,
    torch_layers: bool = False,
    batch: int = 4,
    seq: int = 128,
    d: int = 256,
    heads: int = 4,
    ff: int = 1024,
    layers: int = 3,
    vocab: int = 1000,
) -> Workload:
    gen = torch.Generator().manual_seed(7)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        model = Encoder(vocab, seq, d, heads, ff, layers, torch_layers).to(device)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    targets = [
        torch.randint(0, 16, (batch, seq), generator=gen).to(device),
        torch.randn(batch, seq, generator=gen).to(device),
        torch.randint(0, 4, (batch,), generator=gen).to(device),
        torch.randn(batch, generator=gen).to(device),
    ]
    kind = "nn.TransformerEncoder" if torch_layers else "nn.Linear blocks"
    return Workload(
        "transformer-nn" if torch_layers else "transformer",
        4,
        model,
        ids,
        targets,
        [_ce_tokens, F.mse_loss, F.cross_entropy, F.mse_loss],
        _adam,
        model.shared_modules(),
        f"encoder ({kind}): {layers} layers, d_model {d}, {heads} heads, ff {ff}, seq {seq}, batch {batch}; "
        "2 token-level + 2 sequence-level heads, Adam",
        device,
    )


#: name → (task counts, builder(T, device, tiny)) of the "exact full mode at scale" rows
def _sparse(rows: int) -> Callable[[int, torch.device, bool], Workload]:
    def build(t: int, device: torch.device, tiny: bool) -> Workload:
        if tiny:
            return sparse_workload(rows // 1000, t, device, fields=2, dim=4, batch=16)
        return sparse_workload(rows, t, device)

    return build


def _mlp(t: int, device: torch.device, tiny: bool) -> Workload:
    return mlp_workload(t, device, (16, 32, 16), 8) if tiny else mlp_workload(t, device)


def _transformer(torch_layers: bool, batch: int = 4) -> Callable[[int, torch.device, bool], Workload]:
    def build(t: int, device: torch.device, tiny: bool) -> Workload:
        if tiny:
            return transformer_workload(
                device, torch_layers=torch_layers, batch=2, seq=8, d=16, heads=2, ff=32, layers=1, vocab=50
            )
        workload = transformer_workload(device, torch_layers=torch_layers, batch=batch)
        if batch != 4:
            workload.name = f"transformer-b{batch}"
        return workload

    return build


WORKLOADS: dict[str, tuple[tuple[int, ...], Callable[[int, torch.device, bool], Workload]]] = {
    "sparse-1e5": ((2, 4), _sparse(100_000)),
    "sparse-1e6": ((2, 4), _sparse(1_000_000)),
    "mlp-5M": ((8,), _mlp),
    "transformer": ((4,), _transformer(False)),
    "transformer-nn": ((4,), _transformer(True)),
    "transformer-b1": ((4,), _transformer(False, batch=1)),
}
