"""FSDP2 (``fully_shard``): 2 gloo ranks, each with half of the batch and a dim-0 shard of every parameter,
must fuse exactly what one process fuses on the concatenated batch with plain parameters, for every method,
and refuse what is not supported with a clear error that leaves ``.grad`` and the method state untouched.

One pair of workers runs every scenario and saves what each rank saw (the full gradients, gathered from the
shards); the tests compare it with the single-process run of the same method on the same data. FSDP2 runs
on CPU tensors from torch 2.7 on, HSDP from torch 2.8 on (``torch_support``); on an older torch these tests
skip.
"""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch
from dist_harness import WORLD, catch, gloo_carries_complex, run_on_ranks
from method_checks import registered
from torch import nn
from torch_support import (
    FSDP2_ON_CPU,
    FSDP2_ON_CPU_REASON,
    GLOO_COMPLEX_REASON,
    HSDP_ON_CPU,
    HSDP_ON_CPU_REASON,
)

from gradsurgery import GradSurgery, task_views
from gradsurgery.distributed import DistributedSync
from gradsurgery.sources.features import split_at_features

pytestmark = [pytest.mark.distributed, pytest.mark.skipif(not FSDP2_ON_CPU, reason=FSDP2_ON_CPU_REASON)]

BATCH = 4  # per rank
STEPS = 3
# The mesh the workers shard over and their number: plain FSDP over the 2 ranks, or (in ``hsdp_scenarios``)
# HSDP's 2 × 2 mesh over 4 (replicated over the first dimension, sharded over the second).
LAYOUT = {"mesh": (WORLD,), "world": WORLD}
METHODS = registered(2)


class Net(nn.Module):
    """A trunk of odd widths (uneven shards; a 1-row head weight leaves rank 1 an empty shard), a scalar
    gain and one head per task."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh())
        self.gain = nn.Parameter(torch.ones(1))
        self.heads = nn.ModuleList(nn.Linear(3, 1) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.trunk(x) * self.gain
        return [head(h).squeeze(1) for head in self.heads]


class RepresentationNet(Net):
    """The same net, its forward also returning the trunk's output z and h = gain·z, which the heads read."""

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:  # type: ignore[override]
        z = self.trunk(x)
        h = z * self.gain
        return [head(h).squeeze(1) for head in self.heads], z, h


def make_net(num_tasks: int, dtype: torch.dtype = torch.float64, cls: type[Net] = Net) -> Net:
    torch.manual_seed(0)
    net = cls(num_tasks).to(dtype)
    with torch.no_grad():  # all heads alike and targets opposed: the trunk gradients conflict
        for head in net.heads[1:]:
            head.load_state_dict(net.heads[0].state_dict())
    return net


def shard(net: Net, **options) -> Net:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # The ranks talk over gloo on the CPU; without a mesh, fully_shard moves the shards to CUDA wherever it
    # is present.
    shape = LAYOUT["mesh"]
    names = ("replicate", "shard") if len(shape) == 2 else None
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    fully_shard(net.trunk, mesh=mesh, **options)
    for head in net.heads:
        fully_shard(head, mesh=mesh, **options)
    fully_shard(net, mesh=mesh, **options)
    return net


def make_data(num_tasks: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    world = LAYOUT["world"]
    x = torch.randn(world * BATCH, 5, generator=gen, dtype=dtype)
    y = torch.randn(world * BATCH, num_tasks, generator=gen, dtype=dtype)
    y[:, 1] = -2 * y[:, 0] + 0.3 * y[:, 1]
    if num_tasks == 3:
        y[:, 2] = -1.5 * y[:, 0] + 0.3 * y[:, 2]
    return x, y


def task_losses(out: list[torch.Tensor], y: torch.Tensor) -> list[torch.Tensor]:
    if y.is_complex():
        return [(o - y[:, i]).abs().pow(2).mean() for i, o in enumerate(out)]
    return [(o - y[:, i]).pow(2).mean() for i, o in enumerate(out)]


def full_grads(model: nn.Module) -> list[torch.Tensor | None]:
    # full_tensor() is a collective: every rank calls it for the same parameters in the same order.
    return [None if p.grad is None else p.grad.full_tensor().clone() for p in model.parameters()]


def full_params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().full_tensor().clone() for p in model.parameters()]


def run_method(rank, method, options, num_tasks=2, rank_options=None, micro_batches=1, dtype=torch.float64):
    """The sharded model on this rank's half, the plain reference on the whole batch, side by side. With
    ``micro_batches`` = 2 each step accumulates two ``backward`` calls (the two halves of the batch)."""
    model, ref = shard(make_net(num_tasks, dtype)), make_net(num_tasks, dtype)
    opt = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        method,
        **dict(options, **(rank_options or {})),
    )
    ref_opt = GradSurgery(
        torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), method, distributed=False, **options
    )
    x, y = make_data(num_tasks, dtype)
    mine = torch.arange(rank * BATCH, (rank + 1) * BATCH)
    out: dict = {"grads": [], "ref_grads": [], "weights": [], "ref_weights": [], "sources": []}
    for _ in range(STEPS):
        opt.zero_grad()
        ref_opt.zero_grad()
        for part in mine.chunk(micro_batches):
            info = opt.backward(task_losses(model(x[part]), y[part]))
        whole = torch.arange(LAYOUT["world"] * BATCH).view(LAYOUT["world"], BATCH)
        for part in whole.chunk(micro_batches, dim=1):
            ref_info = ref_opt.backward(task_losses(ref(x[part.reshape(-1)]), y[part.reshape(-1)]))
        out["grads"].append(full_grads(model))
        out["ref_grads"].append([None if p.grad is None else p.grad.clone() for p in ref.parameters()])
        out["weights"].append(info.weights.clone())
        out["ref_weights"].append(ref_info.weights.clone())
        out["sources"].append(info.source)
        out.setdefault("l2_coefficients", []).append((info.l2_coefficient, ref_info.l2_coefficient))
        opt.step()
        ref_opt.step()
    out["params"] = full_params(model)
    out["ref_params"] = [p.detach().clone() for p in ref.parameters()]
    return out


def run_representation(rank, method, options, at, micro_batches=1):
    """Representation mode, ``features=`` the trunk's output z (the gain between z and the heads serves both
    tasks: one pass per task for J_z) or h (the heads read it directly: one pass through the heads, split at
    h), on the sharded model with this rank's half and on the plain one with the whole batch. With
    ``micro_batches`` = 2 each step accumulates two ``backward`` calls (the two halves)."""
    model, ref = shard(make_net(2, cls=RepresentationNet)), make_net(2, cls=RepresentationNet)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), method, **options)
    ref_opt = GradSurgery(
        torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), method, distributed=False, **options
    )
    x, y = make_data(2)
    out: dict = {"grads": [], "ref_grads": [], "weights": [], "ref_weights": [], "gram": [], "ref_gram": []}
    mine_rows = torch.arange(rank * BATCH, (rank + 1) * BATCH)
    whole = torch.arange(LAYOUT["world"] * BATCH).view(LAYOUT["world"], BATCH)
    for _ in range(STEPS):
        opt.zero_grad()
        ref_opt.zero_grad()
        for part in mine_rows.chunk(micro_batches):
            outs, z, h = model(x[part])
            losses = task_losses(outs, y[part])
            out["sharded_split"] = split_at_features(losses, [z if at == "z" else h]) is not None
            info = opt.backward(losses, features=z if at == "z" else h)
        for part in whole.chunk(micro_batches, dim=1):
            outs, z, h = ref(x[part.reshape(-1)])
            losses = task_losses(outs, y[part.reshape(-1)])
            out["split"] = split_at_features(losses, [z if at == "z" else h]) is not None
            ref_info = ref_opt.backward(losses, features=z if at == "z" else h)
        assert info.mode == ref_info.mode == "representation"
        assert info.source == "fsdp"  # FSDP's source, with G_z or by one backward of Σ w_i L_i
        assert ref_info.source == ("features" if opt.method.needs_gram else "weighted")
        out["grads"].append(full_grads(model))
        out["ref_grads"].append([None if p.grad is None else p.grad.clone() for p in ref.parameters()])
        for key, value in (("weights", info.weights), ("ref_weights", ref_info.weights)):
            out[key].append(value.clone())
        out["gram"].append(None if info.gram is None else info.gram.clone())
        out["ref_gram"].append(None if ref_info.gram is None else ref_info.gram.clone())
        opt.step()
        ref_opt.step()
    out["params"] = full_params(model)
    out["ref_params"] = [p.detach().clone() for p in ref.parameters()]
    return out


def representation_scaler(rank, diagnostics):
    """Representation mode under a GradScaler (scale 2¹⁰, exact in binary) next to the same sharded model
    without one: every ``.grad`` s times the unscaled one, and the same parameters after ``scaler.step``
    (a loss weighting, through G_z with ``diagnostics``, else by one backward of Σ w_i L_i)."""
    plain_model, model = (shard(make_net(2, cls=RepresentationNet)) for _ in range(2))
    plain = GradSurgery(
        torch.optim.SGD(plain_model.parameters(), lr=0.1), "uncertainty", diagnostics=diagnostics
    )
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "uncertainty", diagnostics=diagnostics)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = make_data(2)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    out: dict = {"ratios_exact": []}
    for _ in range(STEPS):
        plain.zero_grad()
        opt.zero_grad()
        outs, z, _ = plain_model(x[mine])
        plain.backward(task_losses(outs, y[mine]), features=z)
        outs, z, _ = model(x[mine])
        info = opt.backward(task_losses(outs, y[mine]), features=z, grad_scaler=scaler)
        assert not info.overflow
        scaled, unscaled = full_grads(model), full_grads(plain_model)
        out["ratios_exact"].append(
            all(torch.equal(a, 2.0**10 * b) for a, b in zip(scaled, unscaled, strict=True))
        )
        plain.step()
        scaler.step(opt)
        scaler.update()
    out["same_params"] = all(
        torch.equal(p, q) for p, q in zip(full_params(model), full_params(plain_model), strict=True)
    )
    return out


class NaNBackward(torch.autograd.Function):
    """The identity forward; a backward with NaN in column 0, so that of the layer before only row 0 of the
    weight (and entry 0 of the bias) gets a NaN gradient: after FSDP's reduce-scatter, rank 0's shard."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[:, 0] = math.nan
        return grad


# Per case, each rank's shards: finite entries whose sum overflows (float32, float16) are finite; a NaN or an
# inf on one rank only, beside an empty shard on the other, is not.
FINITENESS_CASES = {
    "float32 sum overflows": ([[3e38, 3e38]], [[1.0]], torch.float32, True),
    "float16 sum overflows": ([[6e4, 6e4, 6e4]], [[-1.0]], torch.float16, True),
    "NaN on rank 1": ([[1.0, 2.0]], [[math.nan]], torch.float32, False),
    "inf on rank 1, rank 0 empty": ([[]], [[math.inf]], torch.float64, False),
}


def finiteness(rank):
    """``finite_on_every_rank`` on each case's shards: the same verdict on both ranks."""
    from gradsurgery.sources.fsdp import finite_on_every_rank

    reduction = DistributedSync().reduction(torch.device("cpu"))
    out = {}
    for name, (first, second, dtype, _) in FINITENESS_CASES.items():
        shards = [torch.tensor(v, dtype=dtype) for v in (first if rank == 0 else second)]
        out[name] = catch(lambda shards=shards: finite_on_every_rank(shards, reduction, [], "gradient"))
    return out


def mixed_precision(rank):
    """FSDP2's usual recipe, ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``: full and
    representation mode (``mgda``) next to the same float32 model without the policy."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    x, y = make_data(2, torch.float32)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    out = {}
    for name, options in (("float32", {}), ("bfloat16", {"mp_policy": policy})):
        model = shard(make_net(2, torch.float32, cls=RepresentationNet), **options)
        for mode in ("full", "representation"):
            opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "mgda")
            opt.zero_grad()
            outs, _, h = model(x[mine])
            losses = task_losses([o.float() for o in outs], y[mine])
            info = opt.backward(losses, features=h if mode == "representation" else None)
            out[name, mode] = (full_grads(model), info.weights.clone())
    return out


def representation_failures(rank):
    """After one good step's ``backward`` (its gradient left in ``.grad``): a NaN loss on rank 1, a loss that
    does not reach the features, then a NaN in rank 1's pass through the trunk (the features' gradients
    finite) that FSDP's reduce-scatter puts in rank 0's shards only. Every rank raises, and ``.grad`` and the
    method's state are as they were."""
    model = shard(make_net(2, cls=RepresentationNet))
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "pcgrad", seed=0)
    x, y = make_data(2)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    outs, z, _ = model(x[mine])
    opt.backward(task_losses(outs, y[mine]), features=z)
    held = opt.param_groups[0]["params"]
    before = [p.grad.to_local().clone() for p in held]
    generator = opt.method.generator.get_state()
    res = {}

    def nan_loss():
        outs, z, _ = model(x[mine])
        losses = task_losses(outs, y[mine])
        if rank == 1:
            losses[1] = losses[1] * math.nan
        opt.backward(losses, features=z)

    res["loss"] = catch(nan_loss)

    def loss_off_the_features():
        # At h the heads' pass splits; a loss that sends nothing into h is refused before it.
        outs, _, h = model(x[mine])
        other = torch.ones(2, dtype=h.dtype, requires_grad=True)
        opt.backward([task_losses(outs, y[mine])[0], (other * 2).sum()], features=h)

    res["lost"] = catch(loss_off_the_features)
    if rank == 1:
        model.trunk[0].register_forward_hook(lambda _module, _inputs, output: NaNBackward.apply(output))

    def nan_in_the_trunk():
        outs, z, _ = model(x[mine])
        opt.backward(task_losses(outs, y[mine]), features=z)

    res["trunk"] = catch(nan_in_the_trunk)
    res["grads_untouched"] = all(torch.equal(p.grad.to_local(), g) for p, g in zip(held, before, strict=True))
    res["generator_untouched"] = torch.equal(opt.method.generator.get_state(), generator)
    return res


def representation_key(method, options, at, micro):
    return f"{method}{' diagnostics' if options.get('diagnostics') else ''} {at}" + (
        " accumulated" if micro > 1 else ""
    )


REPRESENTATION_RUNS = [
    ("mgda", {}, "z", 1),
    ("mgda", {}, "h", 1),
    ("uncertainty", {}, "h", 1),
    ("uncertainty", {"diagnostics": True}, "h", 1),
    ("pcgrad", {"seed": 0}, "z", 1),
    ("nash_mtl", {}, "h", 2),
]


def scaler_scenario(rank):
    """A GradScaler with scale 2^10: the fused gradient is written scaled; ``scaler.step`` unscales it."""
    model, ref = shard(make_net(2)), make_net(2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "mgda")
    ref_opt = GradSurgery(torch.optim.SGD(ref.parameters(), lr=0.1), "mgda", distributed=False)
    x, y = make_data(2)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    info = opt.backward(task_losses(model(x[mine]), y[mine]), grad_scaler=scaler)
    ref_opt.backward(task_losses(ref(x), y))
    res = {"scaled": full_grads(model), "ref": [p.grad.clone() for p in ref.parameters()]}
    res["overflow"] = info.overflow
    res["step"] = catch(lambda: scaler.step(opt))
    res["after_step"] = full_params(model)
    ref_opt.step()
    res["ref_after_step"] = [p.detach().clone() for p in ref.parameters()]

    # A NaN loss on rank 1 only: every rank sees the overflow, .grad becomes inf, the method is not called.
    opt.zero_grad()
    losses = task_losses(model(x[mine]), y[mine])
    if rank == 1:
        losses[0] = losses[0] * math.nan
    info = opt.backward(losses, grad_scaler=scaler)
    res["nan_overflow"] = info.overflow
    res["nan_grads_inf"] = all(
        bool(torch.isinf(p.grad.to_local()).all()) for p in model.parameters() if p.grad is not None
    )
    return res


def retain_scenario(rank):
    """``retain_graph=True`` keeps the graph for another backward; False frees it."""
    model = shard(make_net(2))
    opt = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "upgrad")
    x, y = make_data(2)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    losses = task_losses(model(x[mine]), y[mine])
    opt.backward(losses, retain_graph=True)
    first = full_grads(model)
    opt.backward(losses)
    res = {"first": first, "twice": full_grads(model)}
    res["freed"] = catch(lambda: opt.backward(losses))
    return res


def outside_scenario(rank):
    """A parameter FSDP manages but the optimizer does not hold: the T backward passes leave Σ_i g_i."""
    model, ref = shard(make_net(2)), make_net(2)
    held = [p for p in model.parameters() if p is not model.trunk[0].bias]
    opt = GradSurgery(torch.optim.SGD(held, lr=0.1), "mgda")
    x, y = make_data(2)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    opt.backward(task_losses(model(x[mine]), y[mine]))
    sum(task_losses(ref(x), y)).backward()
    return {"outside": model.trunk[0].bias.grad.full_tensor(), "summed": ref.trunk[0].bias.grad.clone()}


def checkpoint_scenario(rank):
    """One sharded run trains 4 steps straight; another trains 2, its state dict goes through torch.save and
    torch.load into a fresh wrapper around a fresh Adam (the parameters copied over), and trains 2 more."""
    x, y = make_data(2)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)

    def fresh():
        model = shard(make_net(2))
        return model, GradSurgery(torch.optim.Adam(model.parameters(), lr=0.01), "nash_mtl")

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            opt.backward(task_losses(model(x[mine]), y[mine]))
            opt.step()

    straight, straight_opt = fresh()
    train(straight, straight_opt, 4)
    first, first_opt = fresh()
    train(first, first_opt, 2)
    buffer = io.BytesIO()
    torch.save(first_opt.state_dict(), buffer)
    resumed, resumed_opt = fresh()
    with torch.no_grad():
        for p, q in zip(resumed.parameters(), first.parameters(), strict=True):
            p.copy_(q)
    buffer.seek(0)
    resumed_opt.load_state_dict(torch.load(buffer, weights_only=False))
    train(resumed, resumed_opt, 2)
    return {
        "straight": full_params(straight),
        "resumed": full_params(resumed),
        "after_two": full_params(first),
        "state": [straight_opt.method.state_dict(), resumed_opt.method.state_dict()],
    }


def bad_input_scenarios(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    res = {}
    model = shard(make_net(2))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    res["no_distributed"] = catch(lambda: GradSurgery(sgd, "mgda", distributed=False))
    res["evidence"] = catch(lambda: GradSurgery(sgd, "l2", evidence=True, layers=model, num_samples=8))
    res["dist_strategy"] = catch(lambda: GradSurgery(sgd, "mgda", dist_strategy="sharded"))
    res["activations"] = catch(lambda: GradSurgery(sgd, "mgda", model=model, gradient_source="activations"))
    plain = nn.Linear(2, 2).double()
    res["mixed"] = catch(lambda: GradSurgery(torch.optim.SGD([*model.parameters(), plain.weight], lr=0.1)))
    opt = GradSurgery(sgd, "nash_mtl")  # its state (the last solution) must survive a failed call
    res["add_plain_group"] = catch(lambda: opt.add_param_group({"params": [plain.bias]}))

    # Sharded on dim 1 (what tensor parallelism does), not FSDP2's dim 0.
    columns = nn.Linear(4, 4).double()
    fully_shard(
        columns, mesh=init_device_mesh("cpu", (WORLD,)), shard_placement_fn=lambda p: Shard(p.dim() - 1)
    )
    res["dim_1"] = catch(lambda: GradSurgery(torch.optim.SGD(columns.parameters(), lr=0.1), "mgda"))
    # An HSDP mesh over some of the ranks only (a stand-in: only its shape and size are read).
    part = SimpleNamespace(ndim=2, size=lambda: 1)
    res["partial_hsdp"] = catch(lambda: DistributedSync().use_mesh(part))

    x, y = make_data(2)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    res["views"] = catch(
        lambda: opt.backward(
            task_losses(model(x[mine]), y[mine]), features=task_views(x[mine].requires_grad_(), 2)
        )
    )

    # A loss weighting takes a task absent on one rank under DDP, not under FSDP2: refused on that rank, and
    # the other stops with it.
    weighting = GradSurgery(torch.optim.SGD(sgd.param_groups[0]["params"], lr=0.1), "uncertainty")

    def absent_on_rank_one():
        losses = task_losses(model(x[mine]), y[mine])
        if rank == 1:
            losses[1] = None
        weighting.backward(losses)

    res["absent"] = catch(absent_on_rank_one)

    # A gradient already in .grad (accumulation) must survive a failed call unchanged.
    opt.zero_grad()
    opt.backward(task_losses(model(x[mine]), y[mine]))
    # The optimizer's parameters are the shards (after a forward without backward, model.parameters() of
    # the root module are FSDP's unsharded copies).
    held = opt.param_groups[0]["params"]
    before = [p.grad.to_local().clone() for p in held]
    state = dict(opt.method.state_dict())
    res["state_nonempty"] = bool(state)

    def nan_on_rank_one():
        losses = task_losses(model(x[mine]), y[mine])
        if rank == 1:
            losses[1] = losses[1] * math.nan
        opt.backward(losses)

    res["nan"] = catch(nan_on_rank_one)
    fresh = GradSurgery(torch.optim.SGD(model.parameters(), lr=0.1), "mgda")  # not bound to a task count

    def one_more_on_rank_one():
        losses = task_losses(model(x[mine]), y[mine])
        fresh.backward(losses + [2 * losses[0]] * rank)

    res["task_count"] = catch(one_more_on_rank_one)
    res["detached"] = catch(
        lambda: opt.backward(
            [loss.detach() if rank == 0 else loss for loss in task_losses(model(x[mine]), y[mine])]
        )
    )
    after = [None if p.grad is None else p.grad.to_local() for p in held]
    res["grads_untouched"] = all(
        a is not None and torch.equal(a, b) for a, b in zip(before, after, strict=True)
    )
    res["state_untouched"] = repr(state) == repr(dict(opt.method.state_dict()))
    return res


# The λ-free L2 rule on the shards: its inner products summed over the ranks (global, per tensor; the direct
# form on the fused gradient, the decoupled one on SGD-with-momentum's step; FAMO's one weighted backward).
L2_RUNS = [
    ("l2_direct", "mgda", {"l2": True, "l2_decoupled": False}),
    ("l2_direct_per_tensor", "mgda", {"l2": True, "l2_decoupled": False, "l2_per_tensor": True}),
    ("l2_decoupled", "mgda", {"l2": True}),
    ("l2_decoupled_per_tensor", "mgda", {"l2": True, "l2_per_tensor": True}),
    ("l2_weighted", "famo", {"l2": True, "l2_decoupled": False}),
]


def scenarios(rank: int) -> dict:
    results = {}
    for method, options in METHODS:
        results[method] = run_method(rank, method, options)
    results["main_aux3"] = run_method(rank, "main_aux", {}, num_tasks=3)
    # Rank r is seeded r: rank 0's generator must win everywhere (the reference is seeded 0).
    results["pcgrad3"] = run_method(rank, "pcgrad", {"seed": 0}, num_tasks=3, rank_options={"seed": rank})
    results["accumulate"] = run_method(rank, "nash_mtl", {}, micro_batches=2)
    results["accumulate_weighted"] = run_method(rank, "famo", {}, micro_batches=2)
    # Complex parameters, read as real pairs: the Gram matrix of the shards, and the one weighted backward.
    results["gloo complex"] = gloo_carries_complex()
    if results["gloo complex"]:
        results["complex"] = run_method(rank, "mgda", {}, dtype=torch.complex128)
        results["complex_weighted"] = run_method(rank, "uncertainty", {}, dtype=torch.complex128)
    for key, method, options in L2_RUNS:
        results[key] = run_method(rank, method, options)
    for method, options, at, micro in REPRESENTATION_RUNS:
        results[representation_key(method, options, at, micro)] = run_representation(
            rank, method, options, at, micro
        )
    results["representation failures"] = representation_failures(rank)
    results["mixed precision"] = mixed_precision(rank)
    results["finiteness"] = finiteness(rank)
    for diagnostics in (False, True):
        results["representation scaler", diagnostics] = representation_scaler(rank, diagnostics)
    results["shared_override"] = run_method_shared(rank)
    results["scaler"] = scaler_scenario(rank)
    results["retain"] = retain_scenario(rank)
    results["checkpoint"] = checkpoint_scenario(rank)
    results["outside"] = outside_scenario(rank)
    results["bad"] = bad_input_scenarios(rank)
    return results


def run_method_shared(rank):
    """``shared_params`` = the trunk only: the gain, reached by both tasks, gets the plain sum Σ_i g_i."""
    model, ref = shard(make_net(2)), make_net(2)
    opt = GradSurgery(
        torch.optim.SGD(model.parameters(), lr=0.1), "mgda", shared_params=model.trunk.parameters()
    )
    ref_opt = GradSurgery(
        torch.optim.SGD(ref.parameters(), lr=0.1),
        "mgda",
        shared_params=ref.trunk.parameters(),
        distributed=False,
    )
    x, y = make_data(2)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    opt.backward(task_losses(model(x[mine]), y[mine]))
    ref_opt.backward(task_losses(ref(x), y))
    return {"grads": full_grads(model), "ref_grads": [p.grad.clone() for p in ref.parameters()]}


HSDP_RUNS = [
    ("mgda", "mgda", {}),
    ("nash_mtl", "nash_mtl", {}),
    ("uncertainty", "uncertainty", {}),
    ("famo", "famo", {}),
    ("l2_direct", "mgda", {"l2": True, "l2_decoupled": False}),
    ("l2_decoupled_per_tensor", "mgda", {"l2": True, "l2_per_tensor": True}),
]


def hsdp_scenarios(rank: int) -> dict:
    """HSDP over 4 ranks (2 replicas × 2 shards): full mode, the L2 rule and representation mode."""
    LAYOUT.update(mesh=(2, 2), world=4)
    results = {key: run_method(rank, method, options) for key, method, options in HSDP_RUNS}
    results["representation"] = run_representation(rank, "mgda", {}, "h")
    return results


@pytest.fixture(scope="module")
def hsdp_ranks(tmp_path_factory):
    return run_on_ranks(hsdp_scenarios, str(tmp_path_factory.mktemp("hsdp")), world=4)


@pytest.mark.skipif(not HSDP_ON_CPU, reason=HSDP_ON_CPU_REASON)
@pytest.mark.parametrize("key", [key for key, _, _ in HSDP_RUNS] + ["representation"])
def test_hsdp_matches_single_process_on_concatenated_batch(hsdp_ranks, key):
    """Each replica holds every shard: G summed over one replica's shards (not over all four ranks), the
    losses and G_z over all four; the gradients, weights and parameters after three steps as one process's
    on the whole batch."""
    for res in hsdp_ranks:
        run = res[key]
        for step in range(STEPS):
            assert_grads_close(run["grads"][step], run["ref_grads"][step])
            torch.testing.assert_close(run["weights"][step], run["ref_weights"][step], rtol=1e-9, atol=1e-12)
        for p, q in zip(run["params"], run["ref_params"], strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_on_ranks(scenarios, str(tmp_path_factory.mktemp("fsdp")))


def assert_grads_close(got, want, rtol=1e-10, atol=1e-12):
    assert [g is None for g in got] == [g is None for g in want]
    for a, b in zip(got, want, strict=True):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "key",
    [m for m, _ in METHODS]
    + ["main_aux3", "pcgrad3", "accumulate", "accumulate_weighted", "complex", "complex_weighted"],
)
def test_matches_single_process_on_concatenated_batch(ranks, key):
    if key.startswith("complex") and not ranks[0]["gloo complex"]:
        pytest.skip(GLOO_COMPLEX_REASON)
    for res in ranks:
        run = res[key]
        assert set(run["sources"]) == {"fsdp"}
        for step in range(STEPS):
            assert_grads_close(run["grads"][step], run["ref_grads"][step])
            torch.testing.assert_close(run["weights"][step], run["ref_weights"][step], rtol=1e-9, atol=1e-12)
        assert_grads_close(run["params"], run["ref_params"])


@pytest.mark.parametrize("key", [m for m, _ in METHODS] + ["pcgrad3"])
def test_ranks_stay_bit_identical(ranks, key):
    a, b = ranks[0][key], ranks[1][key]
    assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"], strict=True))
    for step in range(STEPS):
        assert torch.equal(a["weights"][step], b["weights"][step])


def test_methods_fuse_differently_here(ranks):
    # The data make the tasks conflict, so the methods' gradients differ: the comparison above has teeth.
    grads = {
        m: torch.cat([g.reshape(-1) for g in ranks[0][m]["grads"][0]]) for m in ("sum", "mgda", "pcgrad")
    }
    assert float((grads["sum"] - grads["mgda"]).abs().max()) > 1e-3
    assert float((grads["sum"] - grads["pcgrad"]).abs().max()) > 1e-3


def test_shared_params_override(ranks):
    for res in ranks:
        assert_grads_close(res["shared_override"]["grads"], res["shared_override"]["ref_grads"])


def test_grad_scaler_scales_and_steps(ranks):
    for res in ranks:
        run = res["scaler"]
        assert run["overflow"] is False
        assert_grads_close(run["scaled"], [g * 2.0**10 for g in run["ref"]])
        assert run["step"] == (None, "")
        assert_grads_close(run["after_step"], run["ref_after_step"])
        assert run["nan_overflow"] is True and run["nan_grads_inf"]


def test_checkpoint_resumes_bit_for_bit(ranks):
    for res in ranks:
        run = res["checkpoint"]
        assert all(torch.equal(a, b) for a, b in zip(run["straight"], run["resumed"], strict=True))
        assert not all(torch.equal(a, b) for a, b in zip(run["straight"], run["after_two"], strict=True))
        straight, resumed = run["state"]
        assert straight.keys() == resumed.keys() and straight
        for key, value in straight.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, resumed[key]), key
            else:
                assert value == resumed[key], key


def test_a_parameter_outside_the_optimizer_gets_the_summed_gradient(ranks):
    for res in ranks:
        torch.testing.assert_close(
            res["outside"]["outside"], res["outside"]["summed"], rtol=1e-10, atol=1e-12
        )


def test_retain_graph(ranks):
    for res in ranks:
        run = res["retain"]
        assert_grads_close(run["twice"], [2 * g for g in run["first"]])
        name, msg = run["freed"]
        assert name == "RuntimeError" and "second time" in msg


@pytest.mark.parametrize("key,method,options", L2_RUNS, ids=[key for key, _, _ in L2_RUNS])
def test_the_l2_rule_on_the_shards_matches_the_single_process(ranks, key, method, options):
    for res in ranks:
        run = res[key]
        for step in range(STEPS):
            assert_grads_close(run["grads"][step], run["ref_grads"][step])
            got, want = run["l2_coefficients"][step]
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
        for p, q in zip(run["params"], run["ref_params"], strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        # The rule acted: the single process ends elsewhere without it.
        assert any(
            not torch.allclose(p, q)
            for p, q in zip(run["ref_params"], res[method]["ref_params"], strict=True)
        )


@pytest.mark.parametrize(
    "method,options,at,micro",
    REPRESENTATION_RUNS,
    ids=[representation_key(*run) for run in REPRESENTATION_RUNS],
)
def test_representation_mode_matches_the_single_process(ranks, method, options, at, micro):
    """G_z = Σ_r G_r / n², the weights, every gradient (the trunk's the mean of the ranks' passes of u_z,
    each head's its task's mean gradient times s_i; summed over two ``backward`` calls when accumulated) and
    the parameters after three steps with momentum."""
    for res in ranks:
        run = res[representation_key(method, options, at, micro)]
        # One pass through the heads split at h (FSDP's hook on the features it returns passes the gradient
        # through); at z the gain serves both tasks: one pass per task, sharded and plain alike.
        assert run["split"] == run["sharded_split"] == (at == "h")
        for step in range(STEPS):
            assert (run["gram"][step] is None) == (run["ref_gram"][step] is None)
            if run["gram"][step] is not None:  # a loss weighting without diagnostics forms no G_z
                torch.testing.assert_close(run["gram"][step], run["ref_gram"][step], rtol=1e-10, atol=1e-14)
            torch.testing.assert_close(run["weights"][step], run["ref_weights"][step], rtol=1e-9, atol=1e-12)
            assert_grads_close(run["grads"][step], run["ref_grads"][step])
        for p, q in zip(run["params"], run["ref_params"], strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("diagnostics", [False, True], ids=["weighted loss", "G_z"])
def test_representation_mode_under_a_grad_scaler(ranks, diagnostics):
    for res in ranks:
        run = res["representation scaler", diagnostics]
        assert run["ratios_exact"] == [True] * STEPS and run["same_params"]


@pytest.mark.parametrize("case", sorted(FINITENESS_CASES))
def test_finiteness_of_shards_is_agreed_over_the_ranks(ranks, case):
    finite = FINITENESS_CASES[case][3]
    for res in ranks:
        name, msg = res["finiteness"][case]
        assert (name is None) if finite else (name == "NonFiniteError" and "non-finite" in msg)


@pytest.mark.parametrize("mode", ["full", "representation"])
def test_a_bfloat16_mixed_precision_policy_matches_float32(ranks, mode):
    for res in ranks:
        grads, weights = res["mixed precision"]["bfloat16", mode]
        ref_grads, ref_weights = res["mixed precision"]["float32", mode]
        assert all(g.dtype == torch.float32 for g in grads)  # reduce_dtype: the shards stay float32
        torch.testing.assert_close(weights, ref_weights, rtol=0, atol=1e-2)
        for g, ref in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, ref, rtol=0, atol=3e-2 * float(ref.abs().max()))


def test_representation_mode_failures_stop_every_rank_and_write_nothing(ranks):
    for res in ranks:
        run = res["representation failures"]
        name, msg = run["loss"]
        assert name == "NonFiniteError" and "loss value(s) for task(s) [1]" in msg
        name, msg = run["trunk"]
        assert name == "NonFiniteError" and "pass through the heads or the trunk" in msg
        name, msg = run["lost"]
        assert name == "ValueError" and "loss(es) [1] do not depend on the features" in msg
        assert run["grads_untouched"] and run["generator_untouched"]


def test_unsupported_combinations_are_refused(ranks):
    for res in ranks:
        bad = res["bad"]
        for key, words in [
            ("no_distributed", "distributed=False"),
            ("evidence", "evidence"),
            ("dist_strategy", "dist_strategy='sharded'"),
            ("activations", "gradient_source='activations'"),
            ("mixed", "plain tensors"),
            ("add_plain_group", "plain tensors"),
            ("dim_1", "Shard(dim=1)"),
            ("partial_hsdp", "spans every rank"),
            ("views", "task_views"),
        ]:
            name, msg = bad[key]
            assert name == "ValueError" and words in msg and ("FSDP2" in msg or "fully_shard" in msg), (
                key,
                msg,
            )


def test_a_task_absent_on_a_rank_is_refused_under_fsdp2(ranks):
    name, msg = ranks[1]["bad"]["absent"]
    assert name == "ValueError" and "under FSDP2 (fully_shard) every rank passes every task's loss" in msg
    name, msg = ranks[0]["bad"]["absent"]
    assert name == "RuntimeError" and "rank 1" in msg


def test_failures_stop_every_rank_and_leave_everything_untouched(ranks):
    for rank, res in enumerate(ranks):
        bad = res["bad"]
        name, msg = bad["nan"]
        assert name == "NonFiniteError" and "task(s) [1]" in msg
        name, msg = bad["task_count"]
        assert (
            name == "ValueError" and "different task counts" in msg and f"this rank passed {2 + rank}" in msg
        )
        name, msg = bad["detached"]
        if rank == 0:
            assert name == "ValueError" and "does not require grad" in msg
        else:
            assert name == "RuntimeError" and "rank 0" in msg
        assert bad["grads_untouched"] and bad["state_untouched"] and bad["state_nonempty"]
