"""L2 with λ from the evidence: ``GradSurgery(sgd, method="l2", evidence=True, layers=model, num_samples=N)``.

With the training loss the mean of N per-sample negative log-likelihoods and a Gaussian prior of precision α
on a layer's weights W, the evidence (the Laplace approximation of the marginal likelihood) is largest where
α = γ/‖W‖², γ = Σ_j h_j/(h_j + α) the number of well-determined directions (h_j the curvatures of the summed
loss). In the units of the mean loss, λ = α/N solves

    λ = γ(λ) / (N ‖W‖²),   γ(λ) = Σ_j f_j / (f_j + λ)   (f_j: the curvatures of the mean loss),

whose left side rises and right side falls in λ: one root, found by Newton's method (``evidence_lambda``).
No λ to tune; N, the training-set size, is an input. The step is the direct form u = g + λθ, the gradient
of the loss plus ½λ‖θ‖², which is ``torch.optim.SGD(weight_decay=λ)`` with the λ solved again as training
goes.

The curvatures come from a Kronecker-factored Fisher (K-FAC, Martens & Grosse 2015; KFC for convolutions,
Grosse & Martens 2016): per layer F ≈ t·A ⊗ S, A the mean of a aᵀ over the layer's input rows a (im2col
patches for a convolution), S the mean of δ δᵀ over the per-sample gradients δ at its outputs, t the rows per
sample (spatial positions; 1 for a linear layer on (batch, features); the rows of all its applications for a
layer applied more than once, as in the "expand" K-FAC of Eschenhagen et al., NeurIPS 2023), each an
exponential average over the steps. F's eigenvalues are t·a_i·s_j (a, s the eigenvalues of A and S), so
γ needs the two factors' eigenvalues, not F. One λ per layer (the default) or one for all of them (γ and
‖θ‖² summed over the layers).

MacKay, "A practical Bayesian framework for backpropagation networks", Neural Computation 1992; the online
marginal-likelihood λ of Immer et al., "Scalable marginal likelihood estimation for model selection in deep
learning", ICML 2021, here in MacKay's fixed-point form.

Cost per step and layer of n_in inputs, n_out outputs and r input rows: two products of r·n_in² and
r·n_out² flops (the factors, in the layer's dtype, float32 at least); every ``every`` steps 3-5 evaluations
of γ over the n_in·n_out eigenvalue products; and two float64 symmetric eigendecompositions (n_in³ and
n_out³) once the last ones are min(``max_spectrum_age``, s) steps old, s their step, whose eigenvalues the
solves in between read scaled to the factors' current traces (``EvidenceRule._scale``): a step of the
benchmark's 64-512-512-10 MLP and small CNN with SGD takes 4.5-4.6× and 3.0-3.1× a plain step (the norm rule
1.9-2.0× and 1.2×; the eigendecompositions at every solve 10.0-10.1× and 5.1×;
``docs/howto/l2-without-lambda.md``)."""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import nn

from ._dtensor import is_sharded
from ._validation import check_int, check_number
from .amp import LossScaling, autocast_off
from .l2 import is_adaptive

#: The layers whose weights the evidence λ regularizes: those with a Kronecker-factored Fisher here.
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
_LAYER_NAMES = "nn.Linear, nn.Conv1d or nn.Conv2d"


#: The largest age, in steps, of the factors' eigenvalues a solve of λ reads (``EvidenceRule``).
SPECTRUM_MAX_AGE = 100

#: A bound on evidence_lambda's steps: bisection alone would narrow a bracket of log-width 10³ to 10⁻¹² in 50.
_NEWTON_STEPS = 100


def evidence_lambda(curvatures: torch.Tensor, sq_norm: float, num_samples: int) -> float:
    """The λ > 0 with N‖θ‖²λ = γ(λ) = Σ_j f_j/(f_j + λ) (``curvatures`` f ≥ 0, ``sq_norm`` ‖θ‖², N
    ``num_samples``); 0 where θ = 0 or every f = 0.

    Newton's method on φ(μ) = μ + log(N‖θ‖²) − log γ(e^μ), μ = log λ, whose slope
    φ' = 1 + Σ_j r_j(1 − r_j)/γ (r_j = f_j/(f_j + λ)) lies in [1, 2]: φ rises, so its root is unique, and
    Newton's steps are never far off. It starts at μ = log(n/(N‖θ‖²)) (n the number of f > 0; γ ≤ n, so
    φ ≥ 0 there) and keeps the root bracketed, halving the bracket where a step would leave it; it stops
    when a step is below 10⁻¹² (λ to about 10⁻¹² relative; 3-5 evaluations of γ, each two passes over f
    into one buffer and two sums: Σ r_j(1 − r_j) = γ − Σ r_j², whose rounding only moves the slope, which
    lies near 1 where it cancels). A temporary the size of f per operation would cost more than the
    passes: 8 against 0.6 ms per evaluation over 512 × 512 curvatures, one thread."""
    if sq_norm <= 0 or curvatures.numel() == 0:
        return 0.0
    positive = curvatures if float(curvatures.min()) > 0 else curvatures[curvatures > 0]
    if positive.numel() == 0:
        return 0.0
    log_scale = math.log(num_samples * sq_norm)
    lo, hi = -math.inf, math.log(positive.numel()) - log_scale
    mu = hi
    ratios = torch.empty_like(positive)
    for _ in range(_NEWTON_STEPS):
        torch.div(positive, torch.add(positive, math.exp(mu), out=ratios), out=ratios)
        gamma = float(ratios.sum())
        phi = mu + log_scale - math.log(gamma)
        if phi > 0:
            hi = mu
        else:
            lo = mu
        step = phi / (1.0 + (gamma - float(torch.dot(ratios, ratios))) / gamma)
        if abs(step) <= 1e-12:
            return math.exp(mu - step)
        # a step from the left may pass the bracket's right end; from the right it stays above lo = -inf,
        # so a bisection always has two finite ends
        mu = mu - step if lo < mu - step < hi else 0.5 * (lo + hi)
    raise RuntimeError(
        f"evidence_lambda: no convergence in {_NEWTON_STEPS} steps (bracket [{lo}, {hi}] in log λ)"
    )


def _weight(layer: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, layer.weight)


def _sq_norm(t: torch.Tensor) -> float:
    flat = t.detach().reshape(-1).double()
    return float(torch.dot(flat, flat))


class Spectrum(NamedTuple):
    """A layer's factor eigenvalues a (of A) and s (of S), float64 on the CPU, and its rows per sample t:
    F = t·A ⊗ S has the eigenvalues t·a_i·s_j."""

    a: torch.Tensor
    s: torch.Tensor
    rows: int

    def curvatures(self) -> torch.Tensor:
        return (self.rows * torch.outer(self.a, self.s)).reshape(-1)


class KroneckerFactors:
    """The exponential averages A_l and S_l of every layer in ``layers`` (see the module docstring), recorded
    by a forward hook on each layer (A: its input rows' second moment, taken in the forward pass, so that
    the rows themselves are not kept for the backward) and a hook on its output's gradient (S).

    The factors are float32 (float64 for a float64 layer; float32 for a half-precision one and under
    autocast) and their eigenvalues are taken in float64. What a backward pass records is held apart
    (``pending``) until ``commit``, so that a step that fails after its backward pass leaves the averages as
    they were; ``discard`` drops it. The hooks hold the factors weakly and are removed with them: an
    optimizer dropped (or one whose construction failed) leaves no recording behind on the model."""

    def __init__(self, layers: Sequence[nn.Module], beta: float) -> None:
        self.layers = list(layers)
        self.beta = beta
        self.dtypes = [
            torch.float64 if _weight(layer).dtype == torch.float64 else torch.float32 for layer in self.layers
        ]
        n = len(self.layers)
        self.a: list[torch.Tensor | None] = [None] * n
        self.s: list[torch.Tensor | None] = [None] * n
        self.rows = [1] * n
        # per layer, one (A, S, rows per sample, batch size) per application in the backward pass
        self.pending: dict[int, list[tuple[torch.Tensor, torch.Tensor, int, int]]] = {}
        self.handles = [
            layer.register_forward_hook(_forward_hook(weakref.ref(self), k))
            for k, layer in enumerate(self.layers)
        ]

    @torch.no_grad()
    def input_moment(self, k: int, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Layer k's A for the input ``x`` (the mean of a aᵀ over its rows a: one per output position,
        im2col patches for a convolution), the rows per sample t and the batch size (1 for an unbatched
        input)."""
        module = self.layers[k]
        if isinstance(module, nn.Conv1d | nn.Conv2d):
            spatial = 1 if isinstance(module, nn.Conv1d) else 2
            batched = x if x.dim() == spatial + 2 else x.unsqueeze(0)
            # EvidenceRule refuses a padding by name; a Conv1d is a Conv2d of height 1
            geometry = [
                module.kernel_size,
                module.dilation,
                cast(tuple[int, ...], module.padding),
                module.stride,
            ]
            if spatial == 1:
                batched = batched.unsqueeze(2)
                geometry = [(one, *g) for one, g in zip((1, 1, 0, 1), geometry, strict=True)]
            patches = nn.functional.unfold(batched.to(self.dtypes[k]), *geometry)
            rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
            batch = batched.shape[0]
        else:
            rows = x.reshape(-1, x.shape[-1]).to(self.dtypes[k])
            batch = 1 if x.dim() == 1 else x.shape[0]
        return _second_moment(rows), rows.shape[0] // batch, batch

    @torch.no_grad()
    def record(self, k: int, a: torch.Tensor, rows: int, batch: int, grad_out: torch.Tensor) -> None:
        """Hold layer k's A and its S from the gradient ``grad_out`` at its output, until ``commit``."""
        deltas = grad_out.to(self.dtypes[k]) * batch  # per-sample gradients of the mean loss
        module = self.layers[k]
        if isinstance(module, nn.Conv1d | nn.Conv2d):  # channels last: one row per output position
            deltas = deltas.movedim(-2 if isinstance(module, nn.Conv1d) else -3, -1)
        deltas = deltas.reshape(-1, deltas.shape[-1])
        self.pending.setdefault(k, []).append((a, _second_moment(deltas), rows, batch))

    def discard(self) -> None:
        self.pending.clear()

    def commit(self, reached: Iterable[int], reduction: Any, scale: float | None = None) -> None:
        """Fold the pending records of the layers in ``reached`` into the averages (the first record of a
        layer starts its average).

        A layer applied u times in the forward pass (shared weights) has its applications' rows pooled, as
        a linear layer's positions in a sequence are: A and S the means over all rows, t = Σ_u t_u (the
        "expand" K-FAC of weight sharing, Eschenhagen et al., NeurIPS 2023); its applications must see
        batches of one size, whose samples they share. Each layer's factors are then averaged over the
        data-parallel ranks of ``reduction`` (a ``gradsurgery.distributed`` reduction: one all-reduce;
        nothing with one process), so that every rank holds the factors of the whole batch (every rank
        reaches the same layers with a batch of one size, as the average of their gradients assumes); with
        a loss ``scale`` s, S is divided by s² (the output gradients were s·δ; exact for GradScaler's
        powers of two). ValueError, with nothing folded in, for a layer applied to batches of different
        sizes."""
        records = {k: self.pending[k] for k in sorted(set(reached)) if k in self.pending}
        self.pending.clear()
        mixed = {k: sorted({batch for *_, batch in rec}) for k, rec in records.items()}
        mixed = {k: sizes for k, sizes in mixed.items() if len(sizes) > 1}
        if mixed:
            raise ValueError(
                "the evidence λ reads a layer applied more than once per forward pass as one application to "
                "longer samples, which needs one batch size; layer(s) "
                f"{[self.layers[k] for k in mixed]} were applied to batches of sizes {list(mixed.values())}"
            )
        pooled = {k: _pool(rec) for k, rec in records.items()}
        reduction.average_in_place([t for a, s, _ in pooled.values() for t in (a, s)])
        for k, (a, s, rows) in pooled.items():
            self.a[k] = self._average(self.a[k], a)
            self.s[k] = self._average(self.s[k], s if scale is None else s / (scale * scale))
            self.rows[k] = rows

    def _average(self, old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        return new if old is None else old.mul(self.beta).add_(new, alpha=1 - self.beta)

    def spectrum(self, k: int) -> Spectrum | None:
        """The eigenvalues of layer k's A and S (clamped at 0, float64 on the CPU) and its t; None before the
        layer's first record."""
        a, s = self.a[k], self.s[k]
        if a is None or s is None:
            return None
        ea = torch.linalg.eigvalsh(a.double()).clamp_min(0).cpu()
        es = torch.linalg.eigvalsh(s.double()).clamp_min(0).cpu()
        return Spectrum(ea, es, self.rows[k])

    def curvatures(self, k: int) -> torch.Tensor:
        """The eigenvalues t·a_i·s_j of layer k's t·A ⊗ S, in float64 on the CPU, where ``evidence_lambda``
        reads them (empty before the layer's first record)."""
        spectrum = self.spectrum(k)
        return torch.zeros(0, dtype=torch.float64) if spectrum is None else spectrum.curvatures()

    def state_dict(self) -> dict[str, Any]:
        return {"a": list(self.a), "s": list(self.s), "rows": list(self.rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The averages of ``state_dict``, each moved to its layer's device and factor dtype."""
        a, s, rows = list(state["a"]), list(state["s"]), [int(r) for r in state["rows"]]
        if not len(a) == len(s) == len(rows) == len(self.layers):
            raise ValueError(f"evidence factors of {len(a)} layers for {len(self.layers)} layers")
        places = [
            (_weight(layer).device, dtype) for layer, dtype in zip(self.layers, self.dtypes, strict=True)
        ]
        self.a = [None if t is None else t.to(*place) for t, place in zip(a, places, strict=True)]
        self.s = [None if t is None else t.to(*place) for t, place in zip(s, places, strict=True)]
        self.rows = rows
        self.pending.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def __del__(self) -> None:
        self.remove()

    def __deepcopy__(self, memo: dict[int, Any]) -> KroneckerFactors:
        """A copy that shares the layers (a method's copy must not copy the model) and has no hooks."""
        twin = KroneckerFactors.__new__(KroneckerFactors)
        twin.layers, twin.beta, twin.dtypes, twin.handles = self.layers, self.beta, self.dtypes, []
        twin.a = [None if t is None else t.clone() for t in self.a]
        twin.s = [None if t is None else t.clone() for t in self.s]
        twin.rows, twin.pending = list(self.rows), {}
        return twin


def _second_moment(rows: torch.Tensor) -> torch.Tensor:
    """The mean of r rᵀ over the rows of ``rows``, in their dtype: under autocast (a forward pass in
    bfloat16, or a backward called inside one) the product would otherwise be taken in half precision."""
    with autocast_off(rows.device.type):
        return rows.T @ rows / rows.shape[0]


def _pool(
    records: list[tuple[torch.Tensor, torch.Tensor, int, int]],
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One layer's applications in a backward pass, all on batches of one size, as one: A and S weighted by
    the rows per sample t_u of each (the means over all their rows), and t = Σ_u t_u."""
    if len(records) == 1:
        a, s, rows, _ = records[0]
        return a, s, rows
    total = sum(rows for _, _, rows, _ in records)
    a = sum((a * (rows / total) for a, _, rows, _ in records), torch.zeros_like(records[0][0]))
    s = sum((s * (rows / total) for _, s, rows, _ in records), torch.zeros_like(records[0][1]))
    return a, s, total


def _forward_hook(factors: weakref.ref[KroneckerFactors], k: int) -> Any:
    """Layer k's forward hook: its input's A, and a hook on its output's gradient that records it with S."""

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        owner = factors()
        if owner is None or not (
            torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad
        ):
            return  # no owner any more, or an evaluation pass: no gradient will reach this output
        if inputs[0].numel() == 0:
            return  # an empty batch: its mean loss is NaN, which the step refuses before any commit
        a, rows, batch = owner.input_moment(k, inputs[0].detach())

        def record(grad: torch.Tensor) -> None:
            if (live := factors()) is not None:
                live.record(k, a, rows, batch, grad)

        output.register_hook(record)

    return hook


class EvidenceRule:
    """The evidence λ as a post-transform of the gradient (``method="l2", evidence=True``): u = g + λ_l θ_l
    for the weight θ_l of every ``nn.Linear`` and ``nn.Conv2d`` layer of ``layers`` (``params``, if given,
    chooses among them), λ_l from ``evidence_lambda`` on that layer's K-FAC curvatures (``per_layer``) or one
    λ from all of them.

    Args:
        layers: the model (or the module holding the layers to regularize).
        num_samples: N, the number of training examples (the loss is the mean over a batch of them).
        params: the regularized weights, among the layers' weights; None: all of them.
        per_layer: one λ per layer (the default) instead of one for all.
        beta: the factors' exponential-average rate per step.
        every: λ is solved again every ``every`` steps (and at the first), with the current ‖θ_l‖².
        max_spectrum_age: the factors' eigenvalues, the rule's main cost, are taken again at a solve once
            they are min(``max_spectrum_age``, s) steps old, s the step they were taken at (early in
            training, where the factors change fastest, at steps 1, 10, 20, 40, 80, …); in between, λ is
            solved from the last ones scaled to the factors' current traces (``_scale``). 0: at every
            solve.
    """

    def __init__(
        self,
        layers: nn.Module,
        num_samples: int,
        params: Sequence[torch.Tensor] | None = None,
        per_layer: bool = True,
        beta: float = 0.95,
        every: int = 10,
        max_spectrum_age: int = SPECTRUM_MAX_AGE,
        what: str = "method 'l2'",
    ) -> None:
        num_samples = check_int(num_samples, "the evidence λ's num_samples", minimum=1)
        beta = check_number(beta, "the evidence λ's beta", minimum=0, maximum=1, exclusive_maximum=True)
        every = check_int(every, "the evidence λ's every", minimum=1)
        max_spectrum_age = check_int(max_spectrum_age, "the evidence λ's max_spectrum_age", minimum=0)
        chosen = None if params is None else {id(p) for p in params}
        found = [
            m
            for m in layers.modules()
            if isinstance(m, SUPPORTED_LAYERS)
            and _weight(m).requires_grad
            and (chosen is None or id(_weight(m)) in chosen)
        ]
        complex_layers = [m for m in found if _weight(m).is_complex()]
        if complex_layers:
            raise ValueError(
                f"{what} with evidence=True: {complex_layers} have complex weights; the Kronecker factors "
                "are those of real layers (use the norm rule, evidence=False)"
            )
        tied = [m for i, m in enumerate(found) if any(_weight(m) is _weight(o) for o in found[:i])]
        if tied:
            raise ValueError(
                f"{what} with evidence=True: {tied} share their weight with another layer; the evidence λ "
                "takes a shared weight from one layer applied more than once"
            )
        for m in found:
            if isinstance(m, nn.Conv1d | nn.Conv2d) and (
                isinstance(m.padding, str) or m.padding_mode != "zeros" or m.groups != 1
            ):
                raise ValueError(
                    f"{what} with evidence=True: the Kronecker factors of {m} need zero padding given in "
                    "numbers and groups=1"
                )
        if chosen is not None:
            weights = {id(_weight(m)) for m in found}
            strangers = [tuple(p.shape) for p in params or () if id(p) not in weights]
            if strangers:
                raise ValueError(
                    f"{what} with evidence=True regularizes the weights of {_LAYER_NAMES} layers of layers=; "
                    f"params has other tensors (shapes {strangers})"
                )
        if not found:
            raise ValueError(
                f"{what} with evidence=True found no {_LAYER_NAMES} layer with a trainable weight in layers="
            )
        self.weights = [_weight(m) for m in found]
        self._index = {id(w): k for k, w in enumerate(self.weights)}
        self.num_samples = num_samples
        self.per_layer = per_layer
        self.every = every
        self.max_spectrum_age = max_spectrum_age
        self.factors = KroneckerFactors(found, beta)
        self.steps = 0
        self.lambdas: list[float] = []
        self.spectra: list[Spectrum | None] = [None] * len(found)
        self.spectra_step = 0  # the step the spectra were taken at (0: not yet)
        # per layer, the positive curvatures of its spectrum and their sum: derived, rebuilt after a new
        # spectrum or a load
        self._curvatures: list[tuple[torch.Tensor, float]] | None = None
        # The current backward's reduction over the data-parallel ranks (``gradsurgery.distributed``, not
        # imported: it imports the methods, whose l2 imports this module), from begin_backward.
        self.reduction: Any = None
        self.scaling: LossScaling | None = None  # and its GradScaler's loss scaling

    def setup(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse an adaptive optimizer (the evidence λ is a weight decay of plain and momentum SGD),
        regularized weights the optimizer does not hold, and an optimizer ``weight_decay`` on them (it would
        add to λ)."""
        if any(is_sharded(p) for g in optimizer.param_groups for p in g["params"]):
            raise ValueError(
                "the evidence λ (method 'l2', evidence=True) does not support FSDP2 (fully_shard) "
                "parameters: its layers' factors are recorded from the unsharded layers' inputs and output "
                "gradients; use the norm rule (evidence=False)"
            )
        if is_adaptive(optimizer):
            raise ValueError(
                "the evidence λ (method 'l2', evidence=True) is an L2 penalty on the gradient, measured "
                f"with torch.optim.SGD; got {type(optimizer).__name__}: with adaptive optimizers use the "
                "norm rule (evidence=False), per tensor by default"
            )
        known = {id(p) for g in optimizer.param_groups for p in g["params"]}
        strangers = [tuple(w.shape) for w in self.weights if id(w) not in known]
        if strangers:
            raise ValueError(
                f"the evidence λ regularizes layer weights the optimizer does not hold (shapes {strangers})"
            )
        decayed = {
            k: g["weight_decay"]
            for k, g in enumerate(optimizer.param_groups)
            if g.get("weight_decay", 0) and any(id(p) in self._index for p in g["params"])
        }
        if decayed:
            raise ValueError(
                "the evidence λ is the weight decay of the layers' weights, but the optimizer adds its own "
                f"to them (weight_decay by param group: {decayed}): set weight_decay=0 for the groups that "
                "hold them (biases and other parameters may keep theirs)"
            )

    def check_representation_mode(self) -> None:
        raise ValueError(
            "method 'l2' with evidence=True does not run in representation mode (features=): its layers' "
            "factors are recorded by hooks during one backward pass over the model, which representation "
            "mode splits into passes through the heads and the trunk; call backward without features="
        )

    def begin_backward(self, *, scaling: LossScaling | None, reduction: Any) -> None:
        """Drop what an earlier, failed backward recorded; keep this backward's loss ``scaling`` (its output
        gradients are s·δ) and the ``reduction`` over whose ranks its records are averaged."""
        self.factors.discard()
        self.scaling, self.reduction = scaling, reduction

    def apply(
        self, pairs: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
        """Fold this backward's records into the factors, solve λ when due, and return the pairs with
        u = g + λθ for the regularized weights, and ``l2_coefficient`` (λ per layer, or the one λ)."""
        if self.reduction is None:
            raise RuntimeError("EvidenceRule: begin_backward(scaling=, reduction=) comes before apply")
        reached = [(k, self._index[id(p)]) for k, (p, _) in enumerate(pairs) if id(p) in self._index]
        scale = None if self.scaling is None else self.scaling.scale_factor()
        self.factors.commit((layer for _, layer in reached), self.reduction, scale)
        self.steps += 1
        if not self.lambdas or self.steps % self.every == 0:
            self.lambdas = self._solve()
        out = list(pairs)
        for k, layer in reached:
            p, g = pairs[k]
            out[k] = (p, g + self.lambdas[layer if self.per_layer else 0] * p.detach())
        return out, {"l2_coefficient": torch.tensor(self.lambdas, dtype=torch.float64)}

    def _groups(self) -> list[list[int]]:
        layers = range(len(self.weights))
        return [[k] for k in layers] if self.per_layer else [list(layers)]

    def _solve(self) -> list[float]:
        """λ per group of layers from their spectra, taken again where due (``max_spectrum_age``; a layer
        first recorded since the last ones gets its own at once) and scaled to the factors' current traces,
        and their weights' current ‖θ‖²."""
        if self.steps - self.spectra_step >= min(self.max_spectrum_age, self.spectra_step):
            self.spectra = [self.factors.spectrum(k) for k in range(len(self.weights))]
            self.spectra_step, self._curvatures = self.steps, None
        elif any(
            spectrum is None and self.factors.a[k] is not None for k, spectrum in enumerate(self.spectra)
        ):
            self.spectra = [
                self.factors.spectrum(k) if spectrum is None else spectrum
                for k, spectrum in enumerate(self.spectra)
            ]
            self._curvatures = None
        if self._curvatures is None:
            per_layer = [
                torch.zeros(0, dtype=torch.float64) if sp is None else sp.curvatures() for sp in self.spectra
            ]
            self._curvatures = [(f[f > 0], float(f.sum())) for f in per_layer]
        curvatures = [f for f, _ in self._curvatures]
        scales = [self._scale(k, total) for k, (_, total) in enumerate(self._curvatures)]
        lambdas = []
        for group in self._groups():
            sq_norm = sum((_sq_norm(self.weights[k]) for k in group), 0.0)
            if len(group) == 1:  # γ(λ; c·f) = γ(λ/c; f): the scale moves into the solve
                c = scales[group[0]]
                lambdas.append(c * evidence_lambda(curvatures[group[0]], c * sq_norm, self.num_samples))
            else:
                scaled = torch.cat([curvatures[k] * scales[k] for k in group])
                lambdas.append(evidence_lambda(scaled, sq_norm, self.num_samples))
        return lambdas

    def _scale(self, k: int, total: float) -> float:
        """c_k = tr(F_k) / Σ_j f_kj: layer k's curvatures, from the eigenvalues of its factors as they were
        at their last eigendecomposition, scaled so that they sum to the trace t·tr(A)·tr(S) of its factors
        now (exact where the factors have only been rescaled since; 1 up to rounding where they were just
        taken). Between eigendecompositions the factors shrink or grow as the network fits its data, which
        the old eigenvalues alone would miss (``benchmarks/l2_lambda_free.py --spectrum-age``, 5 seeds of both
        networks: unscaled, λ 7-18 % above a fresh eigendecomposition's on average on clean labels, up to
        88 %; scaled, within 2.1 % on average, up to 22 %). ``total``: Σ_j f_kj."""
        a, s = self.factors.a[k], self.factors.s[k]
        if total <= 0 or a is None or s is None:
            return 1.0
        trace = self.factors.rows[k] * float(a.diagonal().double().sum()) * float(s.diagonal().double().sum())
        return trace / total

    def before_step(self, params: Iterable[torch.Tensor]) -> None:
        return None

    def after_step(self, token: None) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.factors.state_dict(),
            "steps": self.steps,
            "lambdas": list(self.lambdas),
            "spectra_a": [None if sp is None else sp.a for sp in self.spectra],
            "spectra_s": [None if sp is None else sp.s for sp in self.spectra],
            "spectra_rows": [0 if sp is None else sp.rows for sp in self.spectra],
            "spectra_step": self.spectra_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The state of ``state_dict``; one saved before the spectra were kept (no ``spectra_step``) has its
        spectra taken at the next solve."""
        n = len(self.weights)
        if "spectra_step" in state:
            a, s, rows = state["spectra_a"], state["spectra_s"], state["spectra_rows"]
            if not len(a) == len(s) == len(rows) == n:
                raise ValueError(f"evidence spectra of {len(a)} layers for {n} layers")
            cpu = {"device": "cpu", "dtype": torch.float64}
            spectra = [
                None if ea is None or es is None else Spectrum(ea.to(**cpu), es.to(**cpu), int(t))
                for ea, es, t in zip(a, s, rows, strict=True)
            ]
            taken_at = int(state["spectra_step"])
        else:
            spectra, taken_at = [None] * n, 0
        self.factors.load_state_dict(state)
        self.steps = int(state["steps"])
        self.lambdas = [float(v) for v in state["lambdas"]]
        self.spectra, self.spectra_step, self._curvatures = spectra, taken_at, None

    def remove_hooks(self) -> None:
        """Detach the recording hooks from the layers (the rule stops learning its factors)."""
        self.factors.remove()

    def __deepcopy__(self, memo: dict[int, Any]) -> EvidenceRule:
        """A copy with its own state that shares the regularized weights (a method's copy must not copy the
        model's parameters)."""
        twin = EvidenceRule.__new__(EvidenceRule)
        twin.__dict__.update(self.__dict__)
        twin.factors = copy.deepcopy(self.factors, memo)
        twin.lambdas = list(self.lambdas)
        twin.spectra = list(self.spectra)  # their tensors are replaced at a refresh, never changed in place
        return twin

    def __repr__(self) -> str:
        return (
            f"EvidenceRule(layers={len(self.weights)}, num_samples={self.num_samples}, "
            f"per_layer={self.per_layer}, every={self.every}, beta={self.factors.beta})"
        )
