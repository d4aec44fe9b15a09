"""Writes ``platform_probe.pt``: a few Adam steps of plain torch (no gradsurgery) on the network and losses of
``make_checkpoints_v1.py``, computed on the machine that recorded ``checkpoints_v1.pt``. A machine that
reproduces it bit for bit sums in the same order as that machine (the same CPU kernels), so the recorded
continuations can be required bit for bit there. Run from the repository root:
``python tests/data/make_platform_probe.py``."""

import pathlib

import torch
from torch import nn

HERE = pathlib.Path(__file__).resolve().parent


def probe() -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for k in range(4):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(k))
        out = net(x)
        losses = [
            out[:, 0].pow(2).mean(),
            (out[:, 1] - out[:, 0] - 1).pow(2).mean(),
            (out[:, 2] + 2 * out[:, 0]).abs().mean(),
        ]
        grads = [torch.autograd.grad(loss, list(net.parameters()), retain_graph=True) for loss in losses]
        jac = torch.stack([torch.cat([g.reshape(-1) for g in gs]) for gs in grads])
        gram = jac @ jac.T
        opt.zero_grad()
        (losses[0] + 0.5 * losses[1] + 0.25 * losses[2]).backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()] + [gram]


if __name__ == "__main__":
    torch.save(probe(), HERE / "platform_probe.pt")
