"""The activation source against the dense path: plain ``torch.autograd.grad`` per task (the per-task
gradients, the shared / task-specific split, J Jᵀ) and ``autograd.grad(Σ w_i L_i)`` for the fused gradient.

Every case builds a small multi-task model around the module under test, computes the T losses once, and
compares G (relative to √(G_ii G_jj)), the split, the task-specific gradients and the fused gradient at
1e-5 (float32) or 1e-9 (float64), in the forms ``auto``, ``kernel`` and ``materialize``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradsurgery.gram import gram_matrix
from gradsurgery.sources.activation import ActivationSource
from gradsurgery.sources.jacobian import GradientCollector


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add hand-off latency (tens of ms per op on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FORMS = ["auto", "kernel", "materialize"]
#: the CUDA cases run where a GPU is present (the same comparisons, on the device)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOL = {torch.float64: 1e-9, torch.float32: 1e-5}
#: float32 on a GPU: cuBLAS and the atomic adds of embedding backward sum in other orders than the float64
#: reference's (3.3e-5 measured for the fused gradient on an H200 with TF32 off)
CUDA_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


# -- the reference ------------------------------------------------------------------------------------------
def dense(g: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor:
    if g is None:
        return torch.zeros_like(p)
    return g.to_dense() if g.is_sparse else g


def reference(losses, params, weights, shared_ids=None):
    params = [p for p in params if p.requires_grad]
    grads = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses]
    reach = [[i for i, gs in enumerate(grads) if gs[k] is not None] for k in range(len(params))]
    if shared_ids is None:
        shared = [k for k in range(len(params)) if len(reach[k]) >= 2]
    else:
        shared = [k for k, p in enumerate(params) if id(p) in shared_ids]
    jac = torch.stack(
        [
            torch.cat([dense(gs[k], params[k]).reshape(-1).double() for k in shared])
            if shared
            else torch.zeros(0, dtype=torch.float64)
            for gs in grads
        ]
    )
    specific = {
        k: [(i, dense(grads[i][k], params[k])) for i in reach[k]]
        for k in range(len(params))
        if k not in shared and reach[k]
    }
    total = sum(w * loss for w, loss in zip(weights, losses, strict=True))
    fused = torch.autograd.grad(total, [params[k] for k in shared], retain_graph=True, allow_unused=True)
    return {
        "params": params,
        "shared": [params[k] for k in shared],
        "gram": jac @ jac.T,
        "specific": specific,
        "fused": [dense(g, params[k]) for g, k in zip(fused, shared, strict=True)],
        "fused_sparse": [g is not None and g.is_sparse for g in fused],
        "reached": [sum(1 for k in range(len(params)) if i in reach[k]) for i in range(len(losses))],
    }


def assert_gram_close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    scale = torch.sqrt(torch.outer(want.diagonal(), want.diagonal())).clamp(min=1e-30)
    err = float(((got.double() - want) / scale).abs().max()) if want.numel() else 0.0
    assert err <= tol, f"Gram relative error {err:.3g} > {tol}"


def assert_close_rel(
    got: torch.Tensor, want: torch.Tensor, tol: float, what: str, scale: float = 0.0
) -> None:
    """Relative to ``want``, or to ``scale`` (the whole gradient's norm) where ``want`` is far smaller: a
    gradient that cancels to rounding level (a bias before batch norm) has no relative digits to compare."""
    got, want = got.double(), want.double()
    denom = max(float(want.norm()), 1e-3 * scale) or 1.0
    err = float((got - want).norm()) / denom
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def check(
    source, losses, params, *, weights=None, shared_ids=None, tol=None, dtype=None, fallback=(), **collect_kw
):
    """Run ``collect`` + ``fused`` and compare everything with the reference; returns the result.

    ``fallback``: the names (modules, or owners of bare parameters) expected on the per-parameter path;
    every other shared parameter must have been covered by recorded calls."""
    dtype = dtype or losses[0].dtype
    tol = tol if tol is not None else TOL[dtype]
    if weights is None:
        weights = torch.linspace(0.5, 1.5, len(losses), dtype=torch.float64)
    ref = reference(losses, params, [float(w) for w in weights], shared_ids)
    res = source.gradients(
        losses,
        params,
        shared_ids=shared_ids,
        retain_graph=True,
        gram_dtype=torch.float64,
        **collect_kw,
    )
    assert [id(p) for p in res.shared] == [id(p) for p in ref["shared"]]
    assert res.reached == ref["reached"]
    assert {name for name, form in res.forms.items() if "per-parameter" in form} == set(fallback)
    assert_gram_close(res.gram, ref["gram"], tol)
    got_specific = {id(p): entries for p, entries in res.task_specific}
    want_specific = {id(ref["params"][k]): e for k, e in ref["specific"].items()}
    assert set(got_specific) == set(want_specific)
    for key, entries in want_specific.items():
        got = got_specific[key]
        assert [i for i, _ in got] == [i for i, _ in entries]
        for (_, g), (_, w) in zip(got, entries, strict=True):
            assert_close_rel(dense(g, w), w, tol, "task-specific gradient")
    fused = res.fused(weights)
    assert [id(p) for p, _ in fused] == [id(p) for p in ref["shared"]]
    whole = float(torch.cat([w.reshape(-1).double() for w in ref["fused"]]).norm()) if ref["fused"] else 0.0
    for (p, g), w, sparse in zip(fused, ref["fused"], ref["fused_sparse"], strict=True):
        assert g.is_sparse == sparse, "the fused gradient's layout differs from autograd's"
        assert_close_rel(dense(g, p), w, tol, "fused gradient", scale=whole)
    return res


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_hooks_with_kwargs for m in model.modules())


# -- models --------------------------------------------------------------------------------------------------
class Heads(nn.Module):
    """A trunk, then one small head per task on its (rows × features) output; losses are MSE to targets."""

    def __init__(self, trunk: nn.Module, features: int, num_tasks: int = 3) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(features, 1) for _ in range(num_tasks))

    def forward(self, *inputs):
        h = self.trunk(*inputs)
        h = h.reshape(h.shape[0], -1)
        return [head(h).squeeze(-1) for head in self.heads]


def mse_losses(outputs, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for i, out in enumerate(outputs):
        target = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
        losses.append((out - target * (1 + i)).pow(2).mean())
    return losses


def build(trunk_fn, features, dtype, seed=0, num_tasks=3):
    torch.manual_seed(seed)
    return Heads(trunk_fn(), features, num_tasks).to(dtype)


def run_case(trunk_fn, features, inputs_fn, dtype, form, seed=0, device="cpu", **kw):
    """Both ways of fusing (``fused="backward"`` and ``"activations"``), from one forward: two sources
    record the same calls."""
    model = build(trunk_fn, features, dtype, seed).to(device)
    sources = [ActivationSource(model, form=form, fused=f) for f in ("backward", "activations")]
    inputs = [t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs_fn(dtype)]
    losses = mse_losses(model(*inputs))
    results = [check(source, losses, list(model.parameters()), **kw) for source in sources]
    assert results[0].forms == results[1].forms
    if device == "cpu":
        torch.testing.assert_close(results[0].gram, results[1].gram, rtol=0, atol=0)
    else:  # CUDA's atomic adds (embedding, index_add backward) sum in no fixed order
        assert_gram_close(results[0].gram, results[1].gram, kw.get("tol") or TOL[dtype])
    for source in sources:
        source.remove()
    assert no_hooks(model)
    return results[0]


def randn(*shape):
    def make(dtype):
        gen = torch.Generator().manual_seed(123)
        return (torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype),)

    return make


def indices(*shape, high=30, with_offsets=None):
    def make(dtype):
        gen = torch.Generator().manual_seed(5)
        idx = torch.randint(0, high, shape, generator=gen)
        return (idx,) if with_offsets is None else (idx, with_offsets)

    return make


# -- Linear --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_2d(dtype, form, bias):
    trunk = lambda: nn.Sequential(nn.Linear(7, 9, bias=bias), nn.Tanh(), nn.Linear(9, 5, bias=bias))  # noqa: E731
    res = run_case(trunk, 5, randn(6, 7), dtype, form)
    if form != "auto":  # (auto's choice on layers this small is a near tie; test_forms_auto_picks_cheaper)
        assert res.forms["trunk.0"] == form and res.forms["trunk.2"] == form


@pytest.mark.parametrize("form", ["kernel", "materialize"])
def test_linear_wide_layer_is_float32_accurate(form):
    """A 1024 × 1024 layer in float32: a materialised chunk holds about 2²²/T gradient entries per task, and
    G must still be the float64 Gram of autograd's gradients to float32 rounding (one float32 product over
    the chunk would be off by 6·10⁻⁵ here; the kernel form, whose sums are shorter, is off by 3·10⁻⁷)."""
    trunk = lambda: nn.Sequential(nn.Linear(1024, 1024), nn.Tanh())  # noqa: E731
    res = run_case(trunk, 1024, randn(8, 1024), torch.float32, form, tol=1e-6)
    assert res.forms["trunk.0"] == form


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_3d_tokens(dtype, form, bias):
    trunk = lambda: nn.Sequential(nn.Linear(6, 8, bias=bias), nn.GELU(), nn.Linear(8, 4, bias=bias))  # noqa: E731
    run_case(trunk, 5 * 4, randn(3, 5, 6), dtype, form)


@pytest.mark.parametrize("form", FORMS)
def test_inplace_relu_after_linear(form):
    # 2-D: the output node is fed by ReluBackward; 3-D: the output is a view whose base gets rebased.
    for shape in [(6, 7), (2, 3, 7)]:
        trunk = lambda: nn.Sequential(  # noqa: E731
            nn.Linear(7, 9), nn.ReLU(inplace=True), nn.Linear(9, 4), nn.ReLU(inplace=True)
        )
        res = run_case(trunk, math.prod(shape[1:-1]) * 4, randn(*shape), torch.float64, form)
        assert "per-parameter" not in res.forms.values()


def test_forms_auto_picks_cheaper():
    # few rows against a wide layer: kernel; many rows against a narrow layer: materialise
    run = lambda rows, width: run_case(  # noqa: E731
        lambda: nn.Sequential(nn.Linear(width, width), nn.Tanh()),
        width,
        randn(rows, width),
        torch.float64,
        "auto",
    )
    assert run(4, 64).forms["trunk.0"] == "kernel"
    assert run(256, 3).forms["trunk.0"] == "materialize"


# -- Embedding / EmbeddingBag --------------------------------------------------------------------------------
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("options", [{}, {"padding_idx": 3}, {"max_norm": 1.0}, {"scale_grad_by_freq": True}])
def test_embedding(form, sparse, options):
    if sparse and options.get("scale_grad_by_freq"):
        pytest.skip("torch has no sparse gradient with scale_grad_by_freq")

    class Trunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, 5, sparse=sparse, **options)
            self.lin = nn.Linear(5, 4)

        def forward(self, idx):
            return torch.tanh(self.lin(self.emb(idx))).mean(1)

    res = run_case(Trunk, 4, indices(8, 6, high=12), torch.float64, form)
    assert res.forms["trunk.emb"] == ("kernel" if form == "kernel" else "materialize")


@pytest.mark.parametrize("fused", ["backward", "activations"])
def test_sparse_embedding_fused_is_sparse_and_sparse_adam_steps(fused):
    torch.manual_seed(0)
    emb = nn.Embedding(1000, 4, sparse=True)
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(2))
    model = nn.ModuleDict({"emb": emb, "heads": heads})
    source = ActivationSource(model, fused=fused)
    idx = torch.randint(0, 1000, (16,))
    h = emb(idx)
    losses = [heads[0](h).pow(2).mean(), (heads[1](h) - 1).pow(2).mean()]
    res = source.gradients(
        losses, list(model.parameters()), shared_ids=None, retain_graph=False, gram_dtype=torch.float64
    )
    ((p, g),) = res.fused(torch.tensor([0.5, 0.5]))
    assert p is emb.weight and g.is_sparse
    assert g.coalesce().indices().numel() <= 16
    before = emb.weight.detach().clone()
    emb.weight.grad = g
    torch.optim.SparseAdam([emb.weight], lr=0.1).step()
    changed = (emb.weight.detach() != before).any(1).nonzero().reshape(-1)
    assert set(changed.tolist()) <= set(idx.tolist()) and changed.numel() > 0


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("layout", ["2d", "offsets", "last_offset"])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_bag(form, mode, layout, padding_idx):
    sparse = mode != "max"  # torch offers no sparse gradient for max bags

    class Trunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(
                12,
                5,
                mode=mode,
                sparse=sparse,
                padding_idx=padding_idx,
                include_last_offset=layout == "last_offset",
            )

        def forward(self, idx, offsets=None):
            return torch.tanh(self.bag(idx, offsets))

    if layout == "2d":
        make = indices(6, 4, high=12)
    else:
        offsets = torch.tensor([0, 3, 3, 7, 10, 16] + ([20] if layout == "last_offset" else []))
        make = indices(20, high=12, with_offsets=offsets)  # bag 1 is empty
    run_case(Trunk, 5, make, torch.float64, form)


@pytest.mark.parametrize("form", FORMS)
def test_embedding_bag_per_sample_weights(form):
    class Trunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(12, 5, mode="sum", sparse=True)
            self.psw = nn.Parameter(torch.rand(20) + 0.5)  # a weight per sample that is itself learnt

        def forward(self, idx):
            return self.bag(idx, torch.tensor([0, 4, 9, 15]), per_sample_weights=self.psw)

    res = run_case(Trunk, 5, indices(20, high=12), torch.float64, form, fallback={"trunk"})
    if form != "auto":
        assert res.forms["trunk.bag"] == form


# -- Convolutions --------------------------------------------------------------------------------------------
CONVS = [
    ("conv1d", lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (5, 4, 11)),
    ("conv1d_groups_dilation", lambda: nn.Conv1d(4, 6, 3, groups=2, dilation=2, bias=False), (5, 4, 11)),
    ("conv1d_unbatched", lambda: nn.Conv1d(4, 6, 3), (4, 11)),
    ("conv2d", lambda: nn.Conv2d(3, 4, 3, padding=1), (4, 3, 6, 5)),
    (
        "conv2d_groups_stride",
        lambda: nn.Conv2d(4, 8, (3, 2), stride=(2, 1), padding=(1, 0), groups=4),
        (4, 4, 7, 6),
    ),
    ("conv2d_same_even", lambda: nn.Conv2d(3, 4, 4, padding="same"), (3, 3, 6, 6)),
    ("conv2d_reflect", lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (3, 3, 6, 6)),
    ("conv2d_circular_valid", lambda: nn.Conv2d(3, 2, 3, padding=2, padding_mode="circular"), (3, 3, 5, 5)),
    ("conv3d", lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=(0, 1, 1)), (2, 2, 3, 4, 3)),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name,conv,shape", CONVS, ids=[c[0] for c in CONVS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv(name, conv, shape, dtype):
    class Trunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv()
            self.pre = nn.Linear(shape[-1], shape[-1])  # so that the conv input requires grad

        def forward(self, x):
            out = torch.tanh(self.conv(self.pre(x)))
            return out.unsqueeze(0) if len(shape) == 2 else out

    model_probe = Trunk().to(dtype)(randn(*shape)(dtype)[0])
    res = run_case(Trunk, model_probe[0].numel(), randn(*shape), dtype, "auto")
    assert res.forms["trunk.conv"] == "materialize"


def test_conv_chunks_by_channel_group(monkeypatch):
    import gradsurgery.sources._activation_gram as gram_mod

    monkeypatch.setattr(gram_mod, "CHUNK_ELEMENTS", 40)  # several chunks of whole channel groups
    trunk = lambda: nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Tanh())  # noqa: E731
    run_case(trunk, 8 * 2 * 2, randn(3, 4, 4, 4), torch.float64, "auto")


# -- Norms ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "norm,shape",
    [
        (lambda: nn.LayerNorm(6), (5, 6)),
        (lambda: nn.LayerNorm((3, 4)), (5, 2, 3, 4)),
        (lambda: nn.LayerNorm(6, bias=False), (5, 6)),
        (lambda: nn.BatchNorm1d(6), (5, 6)),
        (lambda: nn.BatchNorm1d(6), (5, 6, 3)),
        (lambda: nn.BatchNorm2d(3), (4, 3, 2, 2)),
    ],
)
@pytest.mark.parametrize("train", [True, False])
def test_norms(norm, shape, dtype, train):
    class Trunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Linear(shape[-1], shape[-1])
            self.norm = norm()

        def forward(self, x):
            return torch.tanh(self.norm(self.pre(x)))

    torch.manual_seed(1)
    model = Heads(Trunk(), math.prod(shape[1:]), 3).to(dtype)
    x = randn(*shape)(dtype)[0]
    if isinstance(model.trunk.norm, nn.modules.batchnorm._BatchNorm):
        with torch.no_grad():  # non-trivial running statistics for eval mode
            model.trunk(x * 2 + 1)
    model.train(train)
    source = ActivationSource(model)
    losses = mse_losses(model(x))
    res = check(source, losses, list(model.parameters()))
    assert res.forms["trunk.norm"] == "materialize"
    source.remove()


# -- Graph structure traps -----------------------------------------------------------------------------------
@pytest.mark.parametrize("form", FORMS)
def test_module_applied_twice(form):
    class Trunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 5)
            self.emb = nn.Embedding(10, 5, sparse=True)

        def forward(self, x):
            idx = (x.abs() * 7).long().clamp(max=9)[:, :2]
            h = self.lin(torch.tanh(self.lin(x)))  # cross terms between the two calls
            return h + self.emb(idx).sum(1) + self.emb(idx.flip(1)).prod(1)

    run_case(Trunk, 5, randn(6, 5), torch.float64, form)


@pytest.mark.parametrize("fused", ["backward", "activations"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("way", ["module", "functional"])
@pytest.mark.parametrize("sparse", [False, True])
def test_tied_embeddings(form, way, sparse, fused):
    """Input embedding and output layer share one weight (a language model)."""
    vocab, dim = 11, 4

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(vocab, dim, sparse=sparse and way == "module")
            self.body = nn.Linear(dim, dim)
            self.out = nn.Linear(dim, vocab)
            if way == "module":
                self.out.weight = self.emb.weight

        def forward(self, idx):
            h = torch.tanh(self.body(self.emb(idx)))
            logits = self.out(h) if way == "module" else F.linear(h, self.emb.weight)
            return logits.log_softmax(-1)

    torch.manual_seed(0)
    model = LM().double()
    source = ActivationSource(model, form=form, fused=fused)
    idx = torch.randint(0, vocab, (3, 5))
    logp = model(idx)
    losses = [
        -logp[:, :-1].gather(-1, idx[:, 1:, None]).mean(),  # next token
        -logp[..., :3].mean(),  # a second task on the same logits
        logp.exp()[..., 5].mean(),
    ]
    res = check(source, losses, list(model.parameters()), fallback={"emb"} if way == "functional" else ())
    if way == "module":
        assert res.forms["emb"] == "materialize" and "per-parameter" not in res.forms.values()
    else:  # the weight's use in F.linear is outside every recorded call: exact per-parameter path
        assert res.forms["emb"] == "per-parameter"
    source.remove()
    assert no_hooks(model)


def test_frozen_and_partial_reach():
    torch.manual_seed(0)
    a, b, c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight.requires_grad_(False)
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(3))
    model = nn.ModuleDict({"a": a, "b": b, "c": c, "heads": heads}).double()
    source = ActivationSource(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    ha = torch.tanh(a(x))
    hb = torch.tanh(b(ha))
    hc = torch.tanh(c(ha))
    losses = [heads[0](hb).pow(2).mean(), heads[1](hb + hc).pow(2).mean(), heads[2](hc).sum()]
    res = check(source, losses, list(model.parameters()))
    assert all(p is not b.weight for p in res.shared)
    # c is reached by tasks 1 and 2 only, b.bias by 0 and 1: both shared
    assert any(p is c.weight for p in res.shared) and any(p is b.bias for p in res.shared)


def test_shared_ids_override():
    torch.manual_seed(0)
    trunk, h0, h1 = nn.Linear(4, 4), nn.Linear(4, 1), nn.Linear(4, 1)
    unused = nn.Linear(2, 2)
    model = nn.ModuleList([trunk, h0, h1, unused]).double()
    source = ActivationSource(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    z = torch.tanh(trunk(x))
    losses = [h0(z).pow(2).mean(), h1(z).sum()]
    ids = {id(trunk.weight), id(h0.weight), id(unused.weight)}
    res = check(source, losses, list(model.parameters()), shared_ids=ids)
    # trunk.bias is reached by both tasks but not in shared_ids: task-specific with two entries
    entries = dict((id(p), e) for p, e in res.task_specific)[id(trunk.bias)]
    assert [i for i, _ in entries] == [0, 1]


@pytest.mark.parametrize("fused", ["backward", "activations"])
def test_retain_graph_twice_and_loss_scale(fused):
    torch.manual_seed(0)
    model = Heads(nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 4)), 4).double()
    source = ActivationSource(model, fused=fused)
    losses = mse_losses(model(torch.randn(7, 5, dtype=torch.float64)))
    first = check(source, losses, list(model.parameters()))
    second = check(source, losses, list(model.parameters()))
    torch.testing.assert_close(first.gram, second.gram, rtol=0, atol=0)
    # With a loss scale s the Gram and task-specific gradients come back unscaled, fused is s·Σ w_i g_i.
    s = 1024.0
    res = source.gradients(
        losses,
        list(model.parameters()),
        shared_ids=None,
        retain_graph=True,
        gram_dtype=torch.float64,
        loss_scale=s,
    )
    torch.testing.assert_close(res.gram, first.gram, rtol=1e-12, atol=0)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    fused = res.fused(w)
    ref = torch.autograd.grad(
        sum(wi * loss for wi, loss in zip(w, losses, strict=True)), [p for p, _ in fused], retain_graph=True
    )
    for (_, g), r in zip(fused, ref, strict=True):
        torch.testing.assert_close(g, s * r, rtol=1e-12, atol=1e-12)
    head_grads = {id(p): e for p, e in res.task_specific}
    want = torch.autograd.grad(losses[0], model.heads[0].weight, retain_graph=True)[0]
    torch.testing.assert_close(head_grads[id(model.heads[0].weight)][0][1], want, rtol=1e-12, atol=1e-14)


def test_matches_full_mode_collector():
    """The engine's own dense path (GradientCollector + gram_matrix) on a float32 model."""
    torch.manual_seed(3)
    model = Heads(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.LayerNorm(8)), 8, 4)
    source = ActivationSource(model)
    losses = mse_losses(model(torch.randn(10, 16)))
    params = list(model.parameters())
    grads = GradientCollector().collect(losses, params, retain_graph=True)
    res = source.gradients(losses, params, shared_ids=None, retain_graph=True, gram_dtype=torch.float64)
    assert_gram_close(res.gram, gram_matrix(grads.jacobian), 1e-5)
    assert [id(p) for p in res.shared] == [id(params[k]) for k in grads.layout.shared]


def test_unsupported_module_takes_per_parameter_path():
    class Trunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.bil = nn.Bilinear(4, 4, 3)
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(torch.tanh(self.bil(x, x)))

    res = run_case(Trunk, 3, randn(5, 4), torch.float64, "auto", fallback={"trunk.bil"})
    assert res.forms["trunk.bil"] == "per-parameter" and res.forms["trunk.lin"] != "per-parameter"


def test_checkpointed_block_and_no_grad_forward():
    from torch.utils.checkpoint import checkpoint

    class Trunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            with torch.no_grad():  # a call under no_grad builds no graph and is not recorded
                self.a(x)
            return checkpoint(lambda t: self.b(torch.tanh(self.a(t))), x, use_reentrant=False)

    run_case(Trunk, 3, randn(5, 4), torch.float64, "auto")


# -- Errors: nothing written, nothing left behind ------------------------------------------------------------
def _error_setup():
    torch.manual_seed(0)
    model = Heads(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), 3).double()
    return model, torch.randn(6, 4, dtype=torch.float64)


def _collect(source, losses, model):
    return source.gradients(
        losses, list(model.parameters()), shared_ids=None, retain_graph=True, gram_dtype=torch.float64
    )


def _assert_untouched(model, before):
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_forward_before_attach_is_refused():
    model, x = _error_setup()
    losses = mse_losses(model(x))
    source = ActivationSource(model)
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"of module 'trunk\.0' .*before the source was attached"):
        _collect(source, losses, model)
    _assert_untouched(model, before)
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks
    source.remove()
    assert no_hooks(model)


def test_inplace_change_of_recorded_input_is_refused():
    model, x = _error_setup()
    source = ActivationSource(model)
    x = x.clone()
    losses = mse_losses(model(x))
    x.mul_(2)  # the first Linear's recorded input
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"module 'trunk\.0'.*modified in place"):
        _collect(source, losses, model)
    _assert_untouched(model, before)
    source.remove()
    assert no_hooks(model)


def test_parameter_changed_between_forward_and_backward_is_refused():
    model, x = _error_setup()
    source = ActivationSource(model)
    losses = mse_losses(model(x))
    with torch.no_grad():
        model.trunk[0].weight.add_(0.1)  # as an optimizer step would
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"trunk\.0\.weight.*module 'trunk\.0'.*changed after the forward"):
        _collect(source, losses, model)
    _assert_untouched(model, before)
    source.remove()
    assert no_hooks(model)


def test_bad_form_installs_nothing_and_remove_is_idempotent():
    model, x = _error_setup()
    with pytest.raises(ValueError, match="unknown form"):
        ActivationSource(model, form="dense")
    assert no_hooks(model)
    source = ActivationSource(model)
    assert not no_hooks(model)
    source.remove()
    source.remove()
    assert no_hooks(model)
    with pytest.raises(ValueError, match="removed"):
        _collect(source, mse_losses(model(x)), model)


def test_no_recording_without_grad():
    model, x = _error_setup()
    source = ActivationSource(model)
    with torch.no_grad():
        model(x)
    model.eval()
    with torch.inference_mode():
        model(x)
    assert len(source._registry) == 0
    losses = mse_losses(model(x))
    assert len(source._registry) == 5  # the two trunk Linears and the three heads
    del losses
    assert len(source._registry) == 0  # the records die with their graph
    source.remove()


@pytest.mark.parametrize("fused", ["backward", "activations"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_small_transformer(form, dtype, fused):
    """Token embedding, pre-norm attention and MLP with residuals, tied output layer: every kind at once."""
    vocab, dim, heads = 13, 8, 2

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(vocab, dim)
            self.pos = nn.Embedding(6, dim)
            self.ln1, self.ln2, self.ln_f = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)
            self.fc = nn.Linear(dim, 4 * dim)
            self.fc2 = nn.Linear(4 * dim, dim)
            self.head = nn.Linear(dim, vocab, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            b, s = idx.shape
            h = self.emb(idx) + self.pos(torch.arange(s))
            q, k, v = self.qkv(self.ln1(h)).view(b, s, 3, heads, dim // heads).unbind(2)
            att = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            )
            h = h + self.proj(att.transpose(1, 2).reshape(b, s, dim))
            h = h + self.fc2(F.relu(self.fc(self.ln2(h)), inplace=True))
            return self.head(self.ln_f(h)).log_softmax(-1)

    torch.manual_seed(0)
    model = Block().to(dtype)
    source = ActivationSource(model, form=form, fused=fused)
    idx = torch.randint(0, vocab, (3, 6))
    logp = model(idx)
    losses = [
        -logp[:, :-1].gather(-1, idx[:, 1:, None]).mean(),
        -logp[:, :, :4].logsumexp(-1).mean(),
        logp[:, -1].exp().pow(2).sum(),
    ]
    res = check(source, losses, list(model.parameters()))
    assert res.forms["emb"] == "materialize"  # tied with the output layer: one mixed group
    if form != "auto":
        assert res.forms["qkv"] == form and res.forms["fc2"] == form
    source.remove()
    assert no_hooks(model)


@CUDA
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_all_kinds(form, dtype, monkeypatch):
    """One model with every supported kind (sparse tables, max bags, conv, batch norm, 3-D Linear with an
    in-place ReLU) on the GPU."""
    # TF32 (cuDNN's default for convolutions) rounds float32 products to 10 mantissa bits: the comparison
    # with the float64 reference is then about TF32, not about the source.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)

    class Trunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 4, sparse=True, padding_idx=0)
            self.bag = nn.EmbeddingBag(50, 4, mode="max")
            self.mean_bag = nn.EmbeddingBag(50, 4, mode="mean", sparse=True)
            self.conv = nn.Conv2d(1, 3, 3, padding=1, groups=1)
            self.bn = nn.BatchNorm2d(3)
            self.lin = nn.Linear(12, 6)
            self.act = nn.ReLU(inplace=True)
            self.ln = nn.LayerNorm(6)

        def forward(self, idx):
            e = self.emb(idx) + self.bag(idx).unsqueeze(1) + self.mean_bag(idx).unsqueeze(1)  # B × L × 4
            img = torch.tanh(self.bn(self.conv(e.unsqueeze(1))))  # B × 3 × L × 4
            tokens = img.permute(0, 2, 1, 3).reshape(e.shape[0], e.shape[1], 12)
            return self.ln(self.act(self.lin(tokens))).mean(1)

    run_case(Trunk, 6, indices(5, 7, high=50), dtype, form, device="cuda", tol=CUDA_TOL[dtype])


def test_fused_from_activations_frees_the_graph():
    """``fused="activations"`` needs no second backward: without ``retain_graph`` the graph is freed by
    the last task's pass, and ``fused`` still gives autograd's gradient."""
    torch.manual_seed(0)
    model = Heads(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)), 4).double()
    source = ActivationSource(model, fused="activations")
    losses = mse_losses(model(torch.randn(7, 5, dtype=torch.float64)))
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    shared = list(model.trunk.parameters())
    want = torch.autograd.grad(
        sum(wi * loss for wi, loss in zip(w, losses, strict=True)), shared, retain_graph=True
    )
    res = source.gradients(
        losses, list(model.parameters()), shared_ids=None, retain_graph=False, gram_dtype=torch.float64
    )
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(losses[0], shared)
    for (_, g), r in zip(res.fused(w), want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError, match="already ran"):
        res.fused(w)
    with pytest.raises(ValueError, match="unknown fused"):
        ActivationSource(model, fused="twice")


@pytest.mark.parametrize("sparse", [False, True])
def test_embedding_rows_looked_up_once(sparse, monkeypatch):
    """Distinct ids in a large table: G from the entries' values directly (no row buffer)."""
    import gradsurgery.sources._activation_gram as gram_mod

    taken = []
    original = gram_mod.LookupGroup.direct_gram

    def spy(self, gram_dtype):
        out = original(self, gram_dtype)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(gram_mod.LookupGroup, "direct_gram", spy)

    class Trunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10_000, 4, sparse=sparse)
            self.bag = nn.EmbeddingBag(10_000, 4, mode="mean", sparse=sparse)

        def forward(self, idx):
            return torch.tanh(self.emb(idx).sum(1) + self.bag(idx + 1))

    def distinct(dtype):
        return (torch.randperm(10_000 - 1, generator=torch.Generator().manual_seed(2))[:24].view(6, 4),)

    run_case(Trunk, 4, distinct, torch.float64, "materialize")
    assert taken and all(taken)


@pytest.mark.parametrize("mode", ["sum", "max"])
def test_lookup_row_chunks(mode, monkeypatch):
    """Tables whose touched rows span several chunks (the row-sorted path)."""
    import gradsurgery.sources._activation_gram as gram_mod

    monkeypatch.setattr(gram_mod, "CHUNK_ELEMENTS", 3 * 4 * 3)  # 3 rows per chunk (T = 3, dim 4)

    class Trunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, 4, padding_idx=5)
            self.bag = nn.EmbeddingBag(30, 4, mode=mode)

        def forward(self, idx):
            return torch.tanh(self.emb(idx).sum(1) + self.bag(idx))

    run_case(Trunk, 4, indices(8, 5, high=30), torch.float64, "materialize")
