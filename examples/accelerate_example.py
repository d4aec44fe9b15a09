"""GradSurgery with Hugging Face Accelerate. Needs ``pip install accelerate`` (not a gradsurgery dependency).

The pattern: let ``accelerator.prepare`` wrap the *inner* optimizer, then wrap that in ``GradSurgery``.
``AcceleratedOptimizer.step``/``zero_grad`` then keep their behaviour (they do nothing on the micro-batches
of ``accelerator.accumulate`` that do not sync), and ``GradSurgery.backward`` replaces
``accelerator.backward(loss)``:

* gradient accumulation: each ``opt.backward(losses)`` adds its micro-batch's fused gradient to ``.grad``;
* multi-process (``accelerate launch``): pass the prepared (DDP) model as ``GradSurgery(..., model=model)``;
  GradSurgery averages the task gradients over the ranks itself (see docs/howto/ddp.md);
* fp16 mixed precision: pass ``grad_scaler=accelerator.scaler`` to ``opt.backward``; the accelerated
  optimizer's step unscales and skips overflowed steps as usual.

Run: ``python examples/accelerate_example.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradsurgery import GradSurgery


def toy_data(n: int = 256, seed: int = 0) -> TensorDataset:
    """Two regression tasks on one input; their targets pull the shared trunk in opposite directions."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    w = torch.randn(8, generator=gen)
    return TensorDataset(x, x @ w, -(x @ w) + 0.1 * torch.randn(n, generator=gen))


class TwoTaskNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head_a = nn.Linear(16, 1)
        self.head_b = nn.Linear(16, 1)

    def forward(self, x):
        h = self.trunk(x)
        return self.head_a(h).squeeze(1), self.head_b(h).squeeze(1)


def task_losses(net: nn.Module, x, ya, yb) -> list[torch.Tensor]:
    a, b = net(x)
    return [nn.functional.mse_loss(a, ya), nn.functional.mse_loss(b, yb)]


def main(epochs: int = 3, accumulation: int = 2, method: str = "pcgrad") -> list[float]:
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    data = toy_data()
    model = TwoTaskNet()
    inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    model, inner, loader = accelerator.prepare(model, inner, DataLoader(data, batch_size=16, shuffle=True))
    ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
    opt = GradSurgery(inner, method=method, model=ddp, seed=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader) // accumulation)
    scaler = getattr(accelerator, "scaler", None)  # set with mixed_precision="fp16"
    steps = 0
    with torch.no_grad():
        before = [float(v) for v in task_losses(model, *data.tensors)]
    for _ in range(epochs):
        for x, ya, yb in loader:
            with accelerator.accumulate(model):
                info = opt.backward(task_losses(model, x, ya, yb), grad_scaler=scaler)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 5.0)
                opt.step()  # AcceleratedOptimizer.step: a no-op on the micro-batches that only accumulate
                opt.zero_grad()
                if accelerator.sync_gradients:
                    scheduler.step()
                    steps += 1
    with torch.no_grad():
        after = [float(v) for v in task_losses(model, *data.tensors)]
    accelerator.print(
        f"{steps} optimizer steps; losses {before} -> {after}; last weights {info.weights.tolist()}"
    )
    return after


if __name__ == "__main__":
    main()
