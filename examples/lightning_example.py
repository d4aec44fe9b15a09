"""GradSurgery inside PyTorch Lightning, two ways.

Needs ``pip install lightning`` (not a gradsurgery dependency).

1. Manual optimization: ``automatic_optimization = False`` and the training step calls
   ``opt.backward(losses)`` / ``opt.step()`` itself.
2. Automatic optimization: the training step returns the T losses as one 1-D tensor and the module overrides
   ``LightningModule.backward`` to hand them to ``GradSurgery.backward``; Lightning still owns zero_grad,
   step, schedulers and checkpoints.

In both, ``self.optimizers()`` is Lightning's ``LightningOptimizer`` proxy around the ``GradSurgery`` object:
``GradSurgery.backward`` runs with the proxy as ``self`` and reads the wrapper's state through it, which is
why GradSurgery keeps all its state in objects it mutates in place and never assigns attributes on ``self``
after construction (an assignment would land on the proxy, not on the optimizer).

Run: ``python examples/lightning_example.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import lightning as L  # noqa: N812
import torch
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


def task_losses(net: nn.Module, batch) -> list[torch.Tensor]:
    x, ya, yb = batch
    a, b = net(x)
    return [nn.functional.mse_loss(a, ya), nn.functional.mse_loss(b, yb)]


class ManualGradSurgery(L.LightningModule):
    """Manual optimization: the step is written out, as in plain PyTorch."""

    def __init__(self, method: str = "mgda") -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = TwoTaskNet()
        self.method = method
        self.weights_seen: list[list[float]] = []

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        losses = task_losses(self.net, batch)
        opt.zero_grad()
        info = opt.backward(losses)
        opt.step()
        self.weights_seen.append(info.weights.tolist())
        self.log_dict({"loss_a": losses[0].detach(), "loss_b": losses[1].detach()})

    def on_train_epoch_end(self):
        self.lr_schedulers().step()

    def configure_optimizers(self):
        opt = GradSurgery(torch.optim.Adam(self.net.parameters(), lr=1e-2), method=self.method)
        return {
            "optimizer": opt,
            "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9),
        }


class HookGradSurgery(L.LightningModule):
    """Automatic optimization: ``training_step`` returns the losses, ``backward`` fuses them."""

    def __init__(self, method: str = "mgda") -> None:
        super().__init__()
        self.net = TwoTaskNet()
        self.method = method
        self.weights_seen: list[list[float]] = []

    def training_step(self, batch, batch_idx):
        losses = task_losses(self.net, batch)
        self.log("loss_sum", sum(loss.detach() for loss in losses))
        return torch.stack(losses)  # shape (T,): GradSurgery.backward takes a 1-D tensor of losses

    def backward(self, loss, *args, **kwargs):
        info = self.optimizers().backward(loss)
        self.weights_seen.append(info.weights.tolist())

    def configure_optimizers(self):
        opt = GradSurgery(torch.optim.Adam(self.net.parameters(), lr=1e-2), method=self.method)
        return {
            "optimizer": opt,
            "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9),
        }


def evaluate(net: nn.Module, data: TensorDataset) -> list[float]:
    with torch.no_grad():
        return [float(loss) for loss in task_losses(net, data.tensors)]


def fit(
    module: L.LightningModule, epochs: int = 3, ckpt_path: str | None = None, **trainer_kwargs
) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(module, DataLoader(toy_data(), batch_size=32), ckpt_path=ckpt_path)
    return trainer


def main(workdir: str | None = None) -> dict[str, list[float]]:
    import os
    import tempfile

    torch.manual_seed(0)
    data = toy_data()
    results = {}
    for cls in (ManualGradSurgery, HookGradSurgery):
        module = cls()
        before = evaluate(module.net, data)
        trainer = fit(module)
        after = evaluate(module.net, data)
        results[cls.__name__] = after
        print(f"{cls.__name__}: losses {before} -> {after}; last MGDA weights {module.weights_seen[-1]}")
    # Checkpoints go through GradSurgery.state_dict / load_state_dict (the "gradsurgery" entry included).
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = os.path.join(tmp, "last.ckpt")
        trainer.save_checkpoint(path)
        saved = torch.load(path, weights_only=True)["optimizer_states"][0]["gradsurgery"]
        resumed = HookGradSurgery()
        fit(resumed, epochs=4, ckpt_path=path)
        results["resumed"] = evaluate(resumed.net, data)
        print(f"resumed from a checkpoint of method {saved['method']!r}: losses {results['resumed']}")
    return results


if __name__ == "__main__":
    main()
