"""Data-parallel GradSurgery: 2 gloo processes on 127.0.0.1 must fuse exactly what one process fuses on the
concatenated batch, and stay bit-identical to each other.

One pair of workers runs every scenario (starting them costs seconds; the scenarios milliseconds) and saves
what each rank saw; the tests below compare it with closed-form d-space references and across ranks.
"""

from __future__ import annotations

import pytest
import torch
from dist_harness import WORLD, catch, gloo_carries_complex, run_on_ranks
from method_checks import registered
from torch import nn
from torch_support import GLOO_COMPLEX_REASON

import gradsurgery
from gradsurgery import GradSurgery, task_views

pytestmark = pytest.mark.distributed

BATCH = 4  # per rank
STEPS = 3


METHODS = registered(2)
CLOSED_FORM = ["sum", "mgda", "pcgrad", "main_aux", "gradvac"]
# How the rank-averaged task gradients are formed: the Jacobian all-reduced or sharded, or the activation
# source (every layer's contribution materialised and all-reduced chunk by chunk).
STRATEGIES = ["allreduce", "sharded", "activations"]


class Net(nn.Module):
    """A shared trunk and one linear head per task."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 7), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(7, 1) for _ in range(num_tasks))
        # The 3-task net has one more shared scalar: d = 43 is odd, so the sharded path pads its blocks
        # (the 2-task net's d = 42 splits evenly).
        self.gain = nn.Parameter(torch.ones(1)) if num_tasks == 3 else None

    def forward(self, x: torch.Tensor, features_only: bool = False) -> tuple[torch.Tensor, ...]:
        # One output per head (not one concatenated tensor, whose backward would reach every head).
        h = self.trunk(x)
        if self.gain is not None:
            h = h * self.gain
        if features_only:
            return (h,)
        return tuple(head(h).squeeze(1) for head in self.heads)


def make_net(num_tasks: int, dtype: torch.dtype = torch.float64) -> Net:
    torch.manual_seed(0)
    net = Net(num_tasks).to(dtype)
    with torch.no_grad():  # all heads alike and targets opposed: the trunk gradients conflict
        for head in net.heads[1:]:
            head.load_state_dict(net.heads[0].state_dict())
    return net


def make_data(num_tasks: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(WORLD * BATCH, 5, generator=gen, dtype=dtype)
    y = torch.randn(WORLD * BATCH, num_tasks, generator=gen, dtype=dtype)
    y[:, 1] = -2 * y[:, 0] + 0.3 * y[:, 1]  # tasks 0 and 1 conflict
    if num_tasks == 3:  # task 2 conflicts with task 0 too: PCGrad's order for task 0 matters
        y[:, 2] = -1.5 * y[:, 0] + 0.3 * y[:, 2]
    return x, y


def task_losses(out: tuple[torch.Tensor, ...], y: torch.Tensor) -> list[torch.Tensor]:
    if y.is_complex():
        return [(o - y[:, i]).abs().pow(2).mean() for i, o in enumerate(out)]
    return [(o - y[:, i]).pow(2).mean() for i, o in enumerate(out)]


def run_method(rank, method, options, strategy, num_tasks=2, rank_options=None, dtype=torch.float64):
    """Train the DDP model on this rank's half and a local reference on the whole batch, side by side."""
    model, ref = make_net(num_tasks, dtype), make_net(num_tasks, dtype)
    ddp = nn.parallel.DistributedDataParallel(model)
    opts = dict(options, **(rank_options or {}))
    source = {"gradient_source": "activations"} if strategy == "activations" else {"dist_strategy": strategy}
    opt = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), method, model=ddp, **source, **opts
    )
    ref_opt = GradSurgery(
        torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), method, distributed=False, **options
    )
    x, y = make_data(num_tasks, dtype)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    out = {"grads": [], "ref_grads": [], "weights": [], "ref_weights": [], "task_grads": []}
    for _ in range(STEPS):
        # The per-task gradients over the whole batch, for the closed-form checks.
        full = task_losses(ref(x), y)
        out["task_grads"].append(
            [
                flat(
                    torch.autograd.grad(
                        loss, list(ref.parameters()), retain_graph=True, materialize_grads=True
                    )
                )
                for loss in full
            ]
        )
        opt.zero_grad()
        info = opt.backward(task_losses(ddp(x[mine]), y[mine]))
        ref_opt.zero_grad()
        ref_info = ref_opt.backward(task_losses(ref(x), y))
        out["grads"].append([p.grad.clone() for p in model.parameters()])
        out["ref_grads"].append([p.grad.clone() for p in ref.parameters()])
        out["weights"].append(info.weights.clone())
        out["ref_weights"].append(ref_info.weights.clone())
        opt.step()
        ref_opt.step()
    out["params"] = [p.detach().clone() for p in model.parameters()]
    out["ref_params"] = [p.detach().clone() for p in ref.parameters()]
    return out


def representation_losses(model, net, x, y, layout):
    """The task losses and the ``features=`` argument of representation mode: the heads on z itself (their
    graph split at z: one pass), on task views (one pass), or on a node both heads read (T + 1 passes)."""
    (z,) = model(x, features_only=True)
    num_tasks = len(net.heads)
    if layout == "views":
        features = task_views(z, num_tasks)
        inputs = list(features)
    else:
        features = z
        inputs = [z * 1.0] * num_tasks if layout == "shared" else [z] * num_tasks
    outs = tuple(head(h).squeeze(1) for head, h in zip(net.heads, inputs, strict=True))
    return task_losses(outs, y), features


def step_both(scalers, optimizers):
    """Each optimizer's step through its GradScaler (a disabled scaler steps it as it is)."""
    for scaler, optimizer in zip(scalers, optimizers, strict=True):
        scaler.step(optimizer)
        scaler.update()


def with_params(out, model, ref):
    """``out`` with the parameters of the data-parallel model and of the reference after the run."""
    out["params"] = [p.detach().clone() for p in model.parameters()]
    out["ref_params"] = [p.detach().clone() for p in ref.parameters()]
    return out


def run_representation(rank, method, layout, num_tasks=2, scaled=False):
    """Representation mode on the DDP model's half of the batch against one process on the whole batch (both
    under a GradScaler with ``scaled``). ``"<method> diagnostics"``: the method with ``diagnostics=True``."""
    model, ref = make_net(num_tasks), make_net(num_tasks)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scaled) for _ in range(2)]
    ddp = nn.parallel.DistributedDataParallel(model)
    method, _, variant = method.partition(" ")
    options = {"diagnostics": True} if variant else {}
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), method, model=ddp, **options)
    ref_opt = GradSurgery(
        torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), method, distributed=False, **options
    )
    x, y = make_data(num_tasks)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    out = {"grads": [], "ref_grads": [], "weights": [], "ref_weights": [], "gram": [], "ref_gram": []}
    for _ in range(STEPS):
        opt.zero_grad()
        losses, features = representation_losses(ddp, model, x[mine], y[mine], layout)
        info = opt.backward(losses, features=features, grad_scaler=scalers[0])
        ref_opt.zero_grad()
        losses, features = representation_losses(ref, ref, x, y, layout)
        ref_info = ref_opt.backward(losses, features=features, grad_scaler=scalers[1])
        assert info.source == ref_info.source == ("features" if opt.method.needs_gram else "weighted")
        out["grads"].append([p.grad.clone() for p in model.parameters()])
        out["ref_grads"].append([p.grad.clone() for p in ref.parameters()])
        for key, got in (("weights", info.weights), ("ref_weights", ref_info.weights)):
            out[key].append(got.clone())
        for key, got in (("gram", info.gram), ("ref_gram", ref_info.gram)):
            out[key].append(None if got is None else got.clone())
        step_both(scalers, (opt, ref_opt))
    return with_params(out, model, ref)


class SparseNet(nn.Module):
    """A sparse embedding table (its gradient a sparse COO tensor) under a linear trunk, one head per task."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 5, sparse=True, dtype=torch.float64)
        self.trunk = nn.Sequential(nn.Linear(5, 7), nn.Tanh()).double()
        self.heads = nn.ModuleList(nn.Linear(7, 1) for _ in range(2)).double()

    def forward(self, idx: torch.Tensor, features_only: bool = False) -> tuple[torch.Tensor, ...]:
        h = self.trunk(self.emb(idx))
        return (h,) if features_only else tuple(head(h).squeeze(1) for head in self.heads)


def run_sparse(rank, method, features):
    """A sparse table under DDP (the weighted source's single backward, or representation mode): the
    ranks' sparse gradients are gathered, their mean is one process's on the concatenated batch."""
    model, ref = SparseNet(), SparseNet()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), method, model=ddp)
    ref_opt = GradSurgery(torch.optim.SGD(ref.parameters(), lr=0.1), method, distributed=False)
    idx = torch.randint(0, 20, (WORLD * BATCH,), generator=torch.Generator().manual_seed(7))
    _, y = make_data(2)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    out: dict = {"grads": [], "ref_grads": [], "sources": []}
    for _ in range(STEPS):
        for optimizer, module, net, rows in ((opt, ddp, model, mine), (ref_opt, ref, ref, slice(None))):
            optimizer.zero_grad()
            if features:
                (z,) = module(idx[rows], features_only=True)
                outs = tuple(head(z).squeeze(1) for head in net.heads)
                info = optimizer.backward(task_losses(outs, y[rows]), features=z)
            else:
                info = optimizer.backward(task_losses(module(idx[rows]), y[rows]))
            grads = [p.grad.to_dense() if p.grad.is_sparse else p.grad.clone() for p in net.parameters()]
            out["grads" if optimizer is opt else "ref_grads"].append(grads)
            out["sources"].append(info.source)
            optimizer.step()
    out["params"] = [p.detach().clone() for p in model.parameters()]
    out["ref_params"] = [p.detach().clone() for p in ref.parameters()]
    out["sparse"] = model.emb.weight.grad.is_sparse
    return out


class HeadsInside(Net):
    """The heads computed inside the forward, which returns z as well."""

    def forward(self, x: torch.Tensor, features_only: bool = False) -> tuple[torch.Tensor, ...]:
        h = self.trunk(x)
        return (h, *(head(h).squeeze(1) for head in self.heads))


def sink_scenario(rank):
    """DDP with find_unused_parameters=True returns every output of the forward through a node of its own:
    the heads inside the forward read z before it, so ``features=`` (the returned z) is on no loss's path.
    Refused, naming the cause; the heads on the returned z, outside the forward, train."""
    torch.manual_seed(0)
    model = HeadsInside(2).double()
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", model=ddp)
    x, y = make_data(2)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    z, *outs = ddp(x[mine])
    res = {"inside": catch(lambda: opt.backward(task_losses(outs, y[mine]), features=z))}
    z, *_ = ddp(x[mine])
    outside = tuple(head(z).squeeze(1) for head in model.heads)
    res["outside"] = catch(lambda: opt.backward(task_losses(outside, y[mine]), features=z))
    res["trunk_grad"] = model.trunk[0].weight.grad is not None
    return res


def local_run(method, options, num_tasks):
    """The single-process run on the whole batch alone (no collective)."""
    ref = make_net(num_tasks)
    opt = GradSurgery(
        torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), method, distributed=False, **options
    )
    x, y = make_data(num_tasks)
    grads = []
    for _ in range(STEPS):
        opt.zero_grad()
        opt.backward(task_losses(ref(x), y))
        grads.append([p.grad.clone() for p in ref.parameters()])
        opt.step()
    return grads


def bad_input_scenarios(rank):
    res = {}
    model = make_net(3)
    opt = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.1), "mgda", model=nn.parallel.DistributedDataParallel(model)
    )
    x, y = make_data(3)
    before = [p.detach().clone() for p in model.parameters()]

    # Rank 0 passes 2 losses, rank 1 passes 3.
    res["task_count"] = catch(lambda: opt.backward(task_losses(model(x), y)[: 2 + rank]))
    res["task_count_bound"] = opt.method.num_tasks

    # Rank 1 passes a loss that does not require grad: rank 1 raises its ValueError, rank 0 stops too.
    def one_bad():
        losses = task_losses(model(x), y)
        if rank == 1:
            losses[2] = losses[2].detach()
        opt.backward(losses)

    res["local_failure"] = catch(one_bad)

    # Rank 1 routes task 2 through head 0: the gradient layouts differ.
    def other_layout():
        out = model(x)
        losses = task_losses(out, y)
        if rank == 1:
            losses[2] = (out[0] - y[:, 2]).pow(2).mean()
        opt.backward(losses)

    res["layout"] = catch(other_layout)

    # Rank 1 has no loss for task 2 (None): refused there, and rank 0 stops too.
    def absent():
        losses = task_losses(model(x), y)
        if rank == 1:
            losses[2] = None
        opt.backward(losses)

    res["absent"] = catch(absent)
    res["untouched"] = all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    res["grads_none"] = all(p.grad is None for p in model.parameters())

    return res


def evidence_run(rank: int | None) -> dict:
    """12 SGD steps of ``method="l2", evidence=True`` (λ solved at the first and the tenth) on rank ``rank``'s
    half of each batch, or on the whole batch in one process (``rank=None``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.2), "l2", evidence=True, layers=model, num_samples=100
    )
    gen = torch.Generator().manual_seed(11)
    lambdas = []
    for _ in range(12):
        x, y = (
            torch.randn(WORLD * BATCH, 5, generator=gen),
            torch.randint(0, 3, (WORLD * BATCH,), generator=gen),
        )
        if rank is not None:
            x, y = x[rank * BATCH : (rank + 1) * BATCH], y[rank * BATCH : (rank + 1) * BATCH]
        opt.zero_grad()
        lambdas.append(opt.backward(nn.functional.cross_entropy(model(x), y)).l2_coefficient.clone())
        opt.step()
    return {"params": [p.detach().clone() for p in model.parameters()], "lambdas": lambdas}


# The tasks each rank has a loss for, per step: task 1 on rank 1 only, then tasks 0 and 2 on rank 0 only,
# then task 2 on neither (absent from the step).
ABSENCE = [([0, 2], [0, 1, 2]), ([0, 1, 2], [1]), ([0, 1], [0, 1])]
# The loss weightings (one backward pass), which take a task absent on a rank.
ABSENT_ON_A_RANK = [("uncertainty", {}), ("sum", {"weights": [1.0, 2.0, 0.5]}), ("rlw", {"seed": 3})]
ABSENT_ON_A_RANK += [("dwa", {}), ("famo", {})]
ABSENT_SCALED = [("uncertainty", "full"), ("sum", "views")]  # under a GradScaler


def absent_losses(ddp, rows, x, y, layout, present):
    """The DDP model's task losses on ``rows`` (None for the tasks not in ``present``) and the ``features=``
    argument of ``layout``."""
    if layout == "full":
        losses, features = task_losses(ddp(x[rows]), y[rows]), None
    else:
        losses, features = representation_losses(ddp, ddp.module, x[rows], y[rows], layout)
    return [loss if i in present else None for i, loss in enumerate(losses)], features


def run_absent(rank, method, options, layout, scaled=False):
    """Tasks absent on one rank (``ABSENCE``): each rank's step against one process whose loss i is the
    mean of the ranks' losses i where they have one (None where neither has), in full mode; both under a
    GradScaler with ``scaled``."""
    model, ref = make_net(3), make_net(3)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scaled) for _ in range(2)]
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), method, model=ddp, **options)
    ref_opt = GradSurgery(
        torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), method, distributed=False, **options
    )
    x, y = make_data(3)
    halves = [slice(r * BATCH, (r + 1) * BATCH) for r in range(WORLD)]
    steps = ABSENCE if gradsurgery.make_method(method, **options).skips_absent_tasks else ABSENCE[:2]
    out: dict = {
        "grads": [],
        "ref_grads": [],
        "weights": [],
        "ref_weights": [],
        "losses": [],
        "ref_losses": [],
    }
    for presence in steps:
        opt.zero_grad()
        losses, features = absent_losses(ddp, halves[rank], x, y, layout, presence[rank])
        info = opt.backward(losses, features=features, grad_scaler=scalers[0])
        ref_opt.zero_grad()
        per_rank = [task_losses(ref(x[rows]), y[rows]) for rows in halves]
        means = []
        for i in range(3):
            have = [per_rank[r][i] for r in range(WORLD) if i in presence[r]]
            means.append(sum(have) / len(have) if have else None)
        ref_info = ref_opt.backward(means, grad_scaler=scalers[1])
        out["grads"].append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
        out["ref_grads"].append([None if p.grad is None else p.grad.clone() for p in ref.parameters()])
        for key, got in (("weights", info.weights), ("ref_weights", ref_info.weights)):
            out[key].append(got.clone())
        for key, got in (("losses", info.losses), ("ref_losses", ref_info.losses)):
            out[key].append(got.clone())
        step_both(scalers, (opt, ref_opt))
    return with_params(out, model, ref)


def absent_on_every_rank(rank):
    """A loss weighting that cannot take a step with a task absent (every built-in one can: ``dwa`` told
    otherwise, as a method whose options name every task would be) with task 2 on no rank: refused on both
    ranks, with ``.grad`` and its state as they were."""
    res = {}
    model = make_net(3)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "dwa", model=ddp)
    opt.method.skips_absent_tasks = False
    x, y = make_data(3)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    opt.backward(task_losses(ddp(x[rows]), y[rows]))
    before = [p.grad.clone() for p in model.parameters()]
    state = dict(opt.method.state_dict())
    res["dwa"] = catch(lambda: opt.backward(absent_losses(ddp, rows, x, y, "full", [0, 1])[0]))
    res["dwa_grads_kept"] = all(
        torch.equal(p.grad, b) for p, b in zip(model.parameters(), before, strict=True)
    )
    res["dwa_state_kept"] = all(
        torch.equal(torch.as_tensor(v), torch.as_tensor(state[k]))
        for k, v in opt.method.state_dict().items()
        if v is not None
    )
    return res


def scenarios(rank: int) -> dict:
    results = {}
    for method, options in METHODS:
        for strategy in STRATEGIES:
            results[(method, strategy)] = run_method(rank, method, options, strategy)
    # Three tasks, PCGrad: rank r is seeded r; rank 0's generator (seed 0) must win everywhere.
    results[("pcgrad3", "allreduce")] = run_method(
        rank, "pcgrad", {"seed": 0}, "allreduce", num_tasks=3, rank_options={"seed": rank}
    )
    # Three tasks, main_aux with two auxiliaries (iterative solver) on the sharded path.
    results[("main_aux3", "sharded")] = run_method(rank, "main_aux", {}, "sharded", num_tasks=3)
    results["pcgrad3_seed1"] = local_run("pcgrad", {"seed": 1}, 3)
    # Random loss weights: rank r seeded r, rank 0's generator must win (single-backward path).
    results[("rlw_rank_seeds", "allreduce")] = run_method(
        rank, "rlw", {"seed": 0}, "allreduce", rank_options={"seed": rank}
    )
    # Complex parameters, read as real pairs (the Jacobian source: the activation source refuses them).
    results["gloo complex"] = gloo_carries_complex()
    for method, strategy in COMPLEX if results["gloo complex"] else ():
        results[("complex", method, strategy)] = run_method(
            rank, method, {}, strategy, dtype=torch.complex128
        )
    for method, layout in REPRESENTATION:
        results[("features", method, layout)] = run_representation(rank, method, layout)
    results[("features", "mgda", "views3")] = run_representation(rank, "mgda", "views", num_tasks=3)
    for method in ("uncertainty", "uncertainty diagnostics"):
        results[("features", method, "scaled")] = run_representation(rank, method, "z", scaled=True)
    results[("sparse", "sum")] = run_sparse(rank, "sum", features=False)
    results[("sparse", "features")] = run_sparse(rank, "mgda", features=True)
    results["sink"] = sink_scenario(rank)
    results["bad"] = bad_input_scenarios(rank)
    for method, options in ABSENT_ON_A_RANK:
        for layout in ("full", "z", "views"):
            results[("absent", method, layout)] = run_absent(rank, method, options, layout)
    for method, layout in ABSENT_SCALED:
        options = dict(ABSENT_ON_A_RANK)[method]
        results[("absent", method, layout, "scaled")] = run_absent(rank, method, options, layout, scaled=True)
    results["absent everywhere"] = absent_on_every_rank(rank)
    results["evidence"] = evidence_run(rank)
    return results


# Representation mode: a Gram-based method, a loss weighting (its heads scaled by w_i) with G_z and without
# (one backward of Σ w_i L_i) and a method with a generator, over the three ways through the heads.
REPRESENTATION = [
    (method, layout)
    for method in ("mgda", "uncertainty", "uncertainty diagnostics", "pcgrad")
    for layout in ("z", "views", "shared")
]


COMPLEX = [("mgda", "allreduce"), ("mgda", "sharded"), ("uncertainty", "allreduce")]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_on_ranks(scenarios, str(tmp_path_factory.mktemp("dist")))


def closed_form(method: str, g0: torch.Tensor, g1: torch.Tensor) -> torch.Tensor:
    """The fused shared gradient for two tasks, written directly in d-space (step 1: GradVac = PCGrad)."""
    if method == "sum":
        return g0 + g1
    if method == "mgda":
        alpha = ((g1 - g0) @ g1 / (g0 - g1).pow(2).sum()).clamp(0, 1)
        return alpha * g0 + (1 - alpha) * g1
    if method in ("pcgrad", "gradvac"):
        p0 = g0 - min(float(g0 @ g1), 0.0) / float(g1 @ g1) * g1
        p1 = g1 - min(float(g1 @ g0), 0.0) / float(g0 @ g0) * g0
        return p0 + p1
    if method == "main_aux":
        return g0 + max(-float(g0 @ g1), 0.0) / float(g1 @ g1) * g1
    raise KeyError(method)


def assert_matches_single_process(run: dict, weights: bool = True) -> None:
    """Every step's ``.grad`` (and weights), and the parameters at the end, are those of the single process
    on the concatenated batch."""
    for step in range(STEPS):
        torch.testing.assert_close(
            flat(run["grads"][step]), flat(run["ref_grads"][step]), rtol=1e-10, atol=1e-12
        )
        if weights:
            torch.testing.assert_close(run["weights"][step], run["ref_weights"][step], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(flat(run["params"]), flat(run["ref_params"]), rtol=1e-10, atol=1e-12)


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


TRUNK = 5 * 7 + 7  # trunk weight + bias: the shared parameters come first


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("method", [m for m, _ in METHODS])
def test_fused_gradient_equals_single_process_on_concatenated_batch(ranks, method, strategy):
    for res in ranks:
        run = res[(method, strategy)]
        assert_matches_single_process(run)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("method", CLOSED_FORM)
def test_first_step_matches_closed_form(ranks, method, strategy):
    run = ranks[0][(method, strategy)]
    g0, g1 = run["task_grads"][0]
    assert float(g0[:TRUNK] @ g1[:TRUNK]) < 0, "the data must make the tasks conflict"
    fused = closed_form(method, g0[:TRUNK], g1[:TRUNK])
    got = flat(run["grads"][0])
    torch.testing.assert_close(got[:TRUNK], fused, rtol=1e-9, atol=1e-12)
    # Heads: each task's own plain gradient (head 0 then head 1; the other task's gradient there is zero).
    assert float(g0[TRUNK + 8 :].abs().sum()) == 0.0 and float(g1[TRUNK : TRUNK + 8].abs().sum()) == 0.0
    torch.testing.assert_close(got[TRUNK:], g0[TRUNK:] + g1[TRUNK:], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "key",
    [(m, s) for m, _ in METHODS for s in STRATEGIES]
    + [("pcgrad3", "allreduce"), ("main_aux3", "sharded"), ("rlw_rank_seeds", "allreduce")],
)
def test_ranks_stay_bit_identical(ranks, key):
    a, b = ranks[0][key], ranks[1][key]
    assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"], strict=True))
    for step in range(STEPS):
        assert all(torch.equal(p, q) for p, q in zip(a["grads"][step], b["grads"][step], strict=True))
        assert torch.equal(a["weights"][step], b["weights"][step])


def test_rng_methods_use_rank_zero_generator(ranks):
    # Rank r was seeded r; the single-process reference was seeded 0. After the broadcast every rank draws
    # rank 0's task orders, so both ranks follow the seed-0 reference, not their own seed.
    for res in ranks:
        run = res[("pcgrad3", "allreduce")]
        rlw = res[("rlw_rank_seeds", "allreduce")]
        for step in range(STEPS):
            torch.testing.assert_close(rlw["weights"][step], rlw["ref_weights"][step], rtol=0, atol=0)
            torch.testing.assert_close(
                flat(run["grads"][step]), flat(run["ref_grads"][step]), rtol=1e-10, atol=1e-12
            )
    # The orders matter on these data: seed 1 (rank 1's own) gives another fused gradient.
    seed0 = [flat(g) for g in ranks[0][("pcgrad3", "allreduce")]["ref_grads"]]
    seed1 = [flat(g) for g in ranks[0]["pcgrad3_seed1"]]
    assert max(float((a - b).abs().max()) for a, b in zip(seed0, seed1, strict=True)) > 1e-3


@pytest.mark.parametrize(
    "method,layout",
    REPRESENTATION + [("mgda", "views3"), ("uncertainty", "scaled"), ("uncertainty diagnostics", "scaled")],
    ids=[f"{m}-{v}" for m, v in REPRESENTATION] + ["views3", "scaled", "scaled diagnostics"],
)
def test_representation_mode_matches_the_single_process_on_the_concatenated_batch(ranks, method, layout):
    """G_z is the sum of the ranks' Gram matrices over their own samples' features (÷ n²), the parameter
    gradients are averaged: G_z, the weights, every .grad and the parameters after three steps with momentum
    are those of one process on the whole batch, and the ranks stay bit-identical."""
    for res in ranks:
        run = res[("features", method, layout)]
        assert_matches_single_process(run)
        for got, want in zip(run["gram"], run["ref_gram"], strict=True):
            assert (got is None) == (want is None)
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    a, b = ranks[0][("features", method, layout)], ranks[1][("features", method, layout)]
    assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"], strict=True))


def test_features_behind_the_ddp_output_node_are_refused_naming_it(ranks):
    for res in ranks:
        name, message = res["sink"]["inside"]
        assert name == "ValueError" and "do not depend on the features" in message
        assert "find_unused_parameters=True or static_graph=True" in message
        assert res["sink"]["outside"] == (None, "") and res["sink"]["trunk_grad"]


@pytest.mark.parametrize("case", ["sum", "features"])
def test_a_sparse_table_matches_the_single_process(ranks, case):
    """The single backward of ``sum`` and representation mode average a sparse gradient by gathering the
    ranks' rows (each rank touches its own); it stays sparse, and every step is one process's."""
    for res in ranks:
        run = res[("sparse", case)]
        assert run["sparse"] and set(run["sources"]) == {"weighted" if case == "sum" else "features"}
        assert_matches_single_process(run, weights=False)


@pytest.mark.parametrize("method,strategy", COMPLEX)
def test_complex_parameters_match_the_single_process(ranks, method, strategy):
    if not ranks[0]["gloo complex"]:
        pytest.skip(GLOO_COMPLEX_REASON)
    for res in ranks:
        run = res[("complex", method, strategy)]
        assert_matches_single_process(run)


def test_three_task_main_aux_sharded_matches_reference(ranks):
    for res in ranks:
        run = res[("main_aux3", "sharded")]
        for step in range(STEPS):
            torch.testing.assert_close(
                flat(run["grads"][step]), flat(run["ref_grads"][step]), rtol=1e-8, atol=1e-10
            )


def test_different_task_counts_fail_on_every_rank(ranks):
    for rank, res in enumerate(ranks):
        name, msg = res["bad"]["task_count"]
        assert name == "ValueError" and "different task counts" in msg and "between 2 and 3" in msg
        assert f"this rank passed {2 + rank}" in msg
        assert res["bad"]["task_count_bound"] is None  # the method was not bound to a wrong count


def test_local_failure_stops_every_rank(ranks):
    name0, msg0 = ranks[0]["bad"]["local_failure"]
    name1, msg1 = ranks[1]["bad"]["local_failure"]
    assert name1 == "ValueError" and "does not require grad" in msg1
    assert name0 == "RuntimeError" and "rank 1" in msg0


def test_a_task_absent_on_one_rank_stops_every_rank(ranks):
    name0, msg0 = ranks[0]["bad"]["absent"]
    name1, msg1 = ranks[1]["bad"]["absent"]
    assert name1 == "ValueError" and "every rank passes every task's loss" in msg1
    assert name0 == "RuntimeError" and "rank 1" in msg0
    for res in ranks:
        assert res["bad"]["untouched"] and res["bad"]["grads_none"]


ABSENT_RUNS = [(m, layout) for m, _ in ABSENT_ON_A_RANK for layout in ("full", "z", "views")]
ABSENT_RUNS += [(m, layout, "scaled") for m, layout in ABSENT_SCALED]


@pytest.mark.parametrize("key", ABSENT_RUNS, ids=" ".join)
def test_a_loss_weighting_with_a_task_absent_on_a_rank_is_one_process_on_the_ranks_that_have_it(ranks, key):
    """Each task's loss and gradient averaged over the ranks that have it: one process whose loss i is the
    mean of the ranks' losses i (under a GradScaler too); a task no rank has is absent from the step
    (weight 0, NaN loss)."""
    for res in ranks:
        run = res[("absent", *key)]
        for step in range(len(run["grads"])):
            for got, want in zip(run["grads"][step], run["ref_grads"][step], strict=True):
                assert (got is None) == (want is None)  # a head no rank reached keeps None
                if got is not None:
                    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(run["weights"][step], run["ref_weights"][step], rtol=1e-12, atol=0)
            torch.testing.assert_close(
                run["losses"][step], run["ref_losses"][step], rtol=1e-12, atol=0, equal_nan=True
            )
        torch.testing.assert_close(flat(run["params"]), flat(run["ref_params"]), rtol=1e-10, atol=1e-12)
    first, second = (res[("absent", *key)] for res in ranks)
    if len(first["weights"]) == 3:  # the step without task 2: its weight 0
        assert first["weights"][2][2] == 0
    for a, b in zip(first["params"], second["params"], strict=True):
        assert torch.equal(a, b)


def test_a_task_no_rank_has_is_refused_by_a_loss_weighting_that_cannot_skip_it(ranks):
    for res in ranks:
        name, msg = res["absent everywhere"]["dwa"]
        assert name == "ValueError" and "no rank has a loss for task(s) [2]" in msg
        assert res["absent everywhere"]["dwa_grads_kept"] and res["absent everywhere"]["dwa_state_kept"]


def test_different_layouts_fail_on_every_rank(ranks):
    for res in ranks:
        name, msg = res["bad"]["layout"]
        assert name == "ValueError" and "different parameters" in msg
        assert res["bad"]["untouched"] and res["bad"]["grads_none"]


def test_evidence_lambda_sees_the_whole_batch(ranks):
    """The evidence λ's factors averaged over the ranks: the steps and λ of one process on the whole batch,
    and the ranks bit-identical."""
    local = evidence_run(None)
    for key in ("params", "lambdas"):
        for a, b in zip(ranks[0]["evidence"][key], ranks[1]["evidence"][key], strict=True):
            assert torch.equal(a, b)
        for a, b in zip(ranks[0]["evidence"][key], local[key], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
