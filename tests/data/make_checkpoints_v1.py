"""Writes ``checkpoints_v1.pt``: a version-1 checkpoint of every method, and what gradsurgery 0.1.0 computed
when training went on from it. Run once with gradsurgery 0.1.0 (commit 6c4b84f) from the repository root:
``python tests/data/make_checkpoints_v1.py``. ``tests/test_checkpoint_version_1.py`` loads these checkpoints
into today's version and requires the same continuation, bit for bit on a machine whose CPU kernels
reproduce ``platform_probe.pt``."""

import copy

import torch
from torch import nn

from gradsurgery import METHODS, GradSurgery

NUM_TASKS = 3
NEEDED = {"pareto": {"min_weights": [0.1, 0.2, 0.1]}, "mixed": {"main": [0, 1]}}
RANDOM = {"pcgrad", "gradvac", "rlw"}


def make(seed, method, **options):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, NUM_TASKS))
    opts = dict(NEEDED.get(method, {}), **options)
    if method in RANDOM:
        opts["seed"] = seed
    return net, GradSurgery(torch.optim.Adam(net.parameters(), lr=0.02), method, **opts)


def train(net, opt, method, steps, start):
    weights = []
    for k in range(start, start + steps):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(k))
        out = net(x)
        losses = [
            out[:, 0].pow(2).mean(),
            (out[:, 1] - out[:, 0] - 1).pow(2).mean(),
            (out[:, 2] + 2 * out[:, 0]).abs().mean(),
        ]
        if method == "l2":
            losses = [sum(losses)]
        opt.zero_grad()
        weights.append(opt.backward(losses).weights)
        opt.step()
    return torch.stack(weights)


def main():
    fixtures = {}
    for method in sorted(METHODS):
        net, opt = make(0, method)
        train(net, opt, method, 3, 0)
        model = {k: v.clone() for k, v in net.state_dict().items()}
        optimizer = copy.deepcopy(opt.state_dict())
        weights = train(net, opt, method, 4, 3)
        fixtures[method] = {
            "model": model,
            "optimizer": optimizer,
            "weights_after": weights,
            "params_after": [p.detach().clone() for p in net.parameters()],
        }
    torch.save(fixtures, "tests/data/checkpoints_v1.pt")


if __name__ == "__main__":
    main()
