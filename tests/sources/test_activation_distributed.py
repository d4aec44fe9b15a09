"""The activation source under data parallelism: 2 gloo ranks on 127.0.0.1, each with half of the batch,
must give the G and the fused / task-specific gradients of one process on the concatenated batch (the
rank-averaged Jacobian), with a sparse table whose touched rows differ between the ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_harness import WORLD, run_on_ranks
from torch import nn

from gradsurgery.sources.activation import ActivationSource

pytestmark = pytest.mark.distributed

BATCH = 6  # per rank
TASKS = 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 4, sparse=True)
        self.lin = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.gain = nn.Parameter(torch.tensor(1.5))  # a bare parameter: the per-parameter path
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(TASKS))

    def forward(self, idx, x):
        h = self.emb(idx).mean(1) + x
        h = self.norm(torch.relu(self.lin(h))) * self.gain
        return [head(h).squeeze(1) for head in self.heads]


def make_net() -> Net:
    torch.manual_seed(0)
    return Net().double()


def make_data():
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 40, (WORLD * BATCH, 3), generator=gen)
    idx[BATCH:] = idx[BATCH:] % 20 + 20  # rank 1 touches other rows than rank 0 (mostly)
    x = torch.randn(WORLD * BATCH, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(WORLD * BATCH, TASKS, generator=gen, dtype=torch.float64)
    return idx, x, y


def losses_of(out, y):
    return [(o - y[:, i]).pow(2).mean() for i, o in enumerate(out)]


WEIGHTS = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)


def dense(g):
    return g.to_dense() if g.is_sparse else g


def run(rank, form, fused="backward", memory=None):
    model = make_net()
    source = ActivationSource(model, form=form, fused=fused, memory=memory)
    idx, x, y = make_data()
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    losses = losses_of(model(idx[mine], x[mine]), y[mine])
    res = source.gradients(
        losses,
        list(model.parameters()),
        shared_ids=None,
        retain_graph=False,
        gram_dtype=torch.float64,
        group=dist.group.WORLD,
    )
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        "gram": res.gram,
        "forms": res.forms,
        "shared": [names[id(p)] for p in res.shared],
        "fused": {names[id(p)]: (g.is_sparse, dense(g)) for p, g in res.fused(WEIGHTS)},
        "specific": {names[id(p)]: [(i, dense(g)) for i, g in e] for p, e in res.task_specific},
    }


def mismatch(rank):
    model = make_net()
    source = ActivationSource(model)
    idx, x, y = make_data()
    out = model(idx[:BATCH], x[:BATCH])
    losses = losses_of(out, y[:BATCH])
    if rank == 1:  # task 2 through head 0: another layout
        losses[2] = (out[0] - y[:BATCH, 2]).pow(2).mean()
    try:
        source.gradients(
            losses,
            list(model.parameters()),
            shared_ids=None,
            retain_graph=False,
            gram_dtype=torch.float64,
            group=dist.group.WORLD,
        )
    except ValueError as err:
        return str(err), all(p.grad is None for p in model.parameters())
    return None, None


def scenarios(rank: int) -> dict:
    results = {form: run(rank, form) for form in ("auto", "kernel")}
    results["activations"] = run(rank, "auto", fused="activations")
    results["budget"] = run(rank, "auto", memory=1)  # every record's δ_i in passes of its own
    results["mismatch"] = mismatch(rank)
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_on_ranks(scenarios, str(tmp_path_factory.mktemp("activation_dist")))


@pytest.fixture(scope="module")
def single():
    """One process, the whole batch, the dense path."""
    model = make_net()
    idx, x, y = make_data()
    losses = losses_of(model(idx, x), y)
    named = list(model.named_parameters())
    params = [p for _, p in named]
    grads = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses]
    reach = [sum(g[k] is not None for g in grads) for k in range(len(params))]
    shared = [k for k in range(len(params)) if reach[k] >= 2]
    jac = torch.stack([torch.cat([dense(g[k]).reshape(-1) for k in shared]) for g in grads])
    total = sum(w * loss for w, loss in zip(WEIGHTS, losses, strict=True))
    fused = torch.autograd.grad(total, [params[k] for k in shared], retain_graph=True)
    specific = {
        named[k][0]: [(i, dense(g[k])) for i, g in enumerate(grads) if g[k] is not None]
        for k in range(len(params))
        if k not in shared and reach[k]
    }
    return {
        "gram": jac @ jac.T,
        "shared": [named[k][0] for k in shared],
        "fused": {named[k][0]: dense(f) for k, f in zip(shared, fused, strict=True)},
        "specific": specific,
    }


# "activations": auto with fused="activations"; "budget": auto with a 1-byte memory budget.
@pytest.mark.parametrize("form", ["auto", "kernel", "activations", "budget"])
def test_equals_one_process_on_the_concatenated_batch(ranks, single, form):
    for res in ranks:
        run_ = res[form]
        assert run_["shared"] == single["shared"]
        torch.testing.assert_close(run_["gram"], single["gram"], rtol=1e-10, atol=1e-14)
        assert run_["fused"].keys() == single["fused"].keys()
        for name, (is_sparse, g) in run_["fused"].items():
            assert is_sparse == (name == "emb.weight")
            torch.testing.assert_close(g, single["fused"][name], rtol=1e-10, atol=1e-14)
        assert run_["specific"].keys() == single["specific"].keys()
        for name, entries in run_["specific"].items():
            want = single["specific"][name]
            assert [i for i, _ in entries] == [i for i, _ in want]
            for (_, g), (_, w) in zip(entries, want, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)
        # Data parallel: every group materialised (and all-reduced), whatever the form asked for.
        assert run_["forms"] == {
            "emb": "materialize",
            "lin": "materialize",
            "norm": "materialize",
            "gain": "per-parameter",
        }
    assert torch.equal(ranks[0][form]["gram"], ranks[1][form]["gram"])


def test_rank_touched_rows_differ(ranks):
    # sanity of the set-up: the ranks' sparse fused gradients cover the union of both ranks' rows
    idx, _, _ = make_data()
    g = ranks[0]["auto"]["fused"]["emb.weight"][1]
    rows = set(g.abs().sum(1).nonzero().reshape(-1).tolist())
    assert rows == set(idx.reshape(-1).tolist())


def test_layout_mismatch_fails_on_every_rank(ranks):
    for res in ranks:
        message, untouched = res["mismatch"]
        assert message is not None and "layout differs between ranks" in message
        assert untouched
