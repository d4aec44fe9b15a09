"""L2 regularization without λ: ½‖θ‖² read as an *auxiliary* task of the data loss (``docs/maths.md``).

The main task (the data loss, gradient g) descends as fast as it can while the auxiliary ½‖θ‖² (gradient θ)
may not rise to first order. That is the main/auxiliary problem of Su (2022) with g_aux = θ:

    max_u ⟨u, g⟩ − ½‖u‖²  s.t.  ⟨u, θ⟩ ≥ 0   ⟹   u = g + λθ,   λ = relu(−⟨g, θ⟩) / ‖θ‖².

Stepping along −u changes ½‖θ‖² by −η·max(⟨g, θ⟩, 0) ≤ 0 to first order: when the data gradient already
shrinks θ (⟨g, θ⟩ ≥ 0) it is left alone (λ = 0); when it would grow θ, exactly the growing component along θ
is cancelled (⟨u, θ⟩ = 0). There is no coefficient to tune. A zero θ gives λ = 0 (nothing to protect).

``per_tensor=False`` takes one inner product over all regularized tensors (θ is their concatenation);
``per_tensor=True`` applies the rule to every tensor on its own (each tensor's norm is protected).

**Direct form** (``transform``): the rule acts on the new gradient of each ``backward``, before it is added
to ``.grad``. It bounds the step of an optimizer that steps along the gradient: plain SGD.

**Decoupled form** (``snapshot``/``correct``, in the spirit of AdamW, Loshchilov & Hutter 2019): momentum and
adaptive preconditioning (Adam, RMSProp, SGD with momentum) turn u into an update whose inner product with θ
has no fixed sign, so the rule is applied to the update the optimizer actually made instead. With
θ_old before and θ_new after the inner step, Δ = θ_new − θ_old:

1. if ⟨Δ, θ_old⟩ > 0, the component along θ_old is removed: Δ ← Δ − ⟨Δ, θ_old⟩/‖θ_old‖² · θ_old;
2. removing it leaves ‖θ_old + Δ‖² = ‖θ_old‖² + ‖Δ‖² (a second-order growth), and an update that was not
   growing to first order can still grow by its second-order term, so θ_new = θ_old + Δ is finally scaled
   back onto the ball of radius ‖θ_old‖ when it lies outside it. Since the update is known here, this makes
   ‖θ‖ non-increasing exactly (up to rounding), not only to first order. A zero θ_old is left free to move.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ._collective import sum_in_place
from ._dtensor import is_sharded, local, shard_group, sharded_like
from ._validation import check_bool, check_tensors
from .gram import real_view

_ACC = torch.float64  # inner products and squared norms are accumulated in float64


#: Optimizers that step along the (momentum) gradient itself; every other ``torch.optim`` optimizer rescales
#: it per coordinate.
NON_ADAPTIVE: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.SGD, torch.optim.ASGD)


def is_adaptive(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` (or a member of a ``MultiOptimizer``) preconditions the gradient per
    coordinate."""
    members = getattr(optimizer, "optimizers", None) or [optimizer]
    return any(not isinstance(m, NON_ADAPTIVE) for m in members)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⟨a, b⟩ as a float64 scalar, computed in the tensors' own precision (float32 at least): a float64 copy
    of every d-sized tensor would cost more than the rest of the rule, and λ needs no more digits. Complex
    tensors are read as their real views (Re Σ conj(a) b), as ``torch.optim`` reads a complex parameter."""
    a, b = real_view(a.detach()).reshape(-1), real_view(b.detach()).reshape(-1)
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return torch.dot(a.to(dtype), b.to(dtype)).to(_ACC)


def _on(device: torch.device, values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([v.to(device) for v in values])


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter (sharing its storage), a plain tensor itself."""
    return local(t) if is_sharded(t) else t


def _shard_group(params: Sequence[torch.Tensor]) -> Any:
    """The process group over which FSDP2 parameters are sharded (``distributed.fsdp_mesh``: one mesh for
    all of them, never mixed with plain tensors), None for plain tensors."""
    return shard_group(params[0]) if params and is_sharded(params[0]) else None


def l2_coefficients(
    grads: Sequence[torch.Tensor],
    thetas: Sequence[torch.Tensor],
    per_tensor: bool = False,
    group: Any = None,
) -> torch.Tensor:
    """λ = relu(−⟨g, θ⟩)/‖θ‖² (float64): a 0-d tensor for the global rule, shape (n,) per tensor.

    λ = 0 where ‖θ‖ = 0. No blow-up for tiny θ: ‖λθ‖ = relu(−⟨g, θ⟩)/‖θ‖ ≤ ‖g‖ (Cauchy-Schwarz).
    With ``group``, the tensors are this rank's shards of tensors sharded over that process group (FSDP2), and
    each inner product is summed over the ranks.
    """
    if len(grads) != len(thetas):
        raise ValueError(f"{len(grads)} gradients for {len(thetas)} tensors")
    if not grads:
        return torch.zeros((0,) if per_tensor else (), dtype=_ACC)
    for g, t in zip(grads, thetas, strict=True):
        if g.shape != t.shape:
            raise ValueError(f"gradient of shape {tuple(g.shape)} for a tensor of shape {tuple(t.shape)}")
    device = thetas[0].device
    dots = _on(device, [_dot(g, t) for g, t in zip(grads, thetas, strict=True)])
    sq = _on(device, [_dot(t, t) for t in thetas])
    if group is not None:  # this rank's shards: the inner products summed over the ranks holding the others
        sum_in_place([dots, sq], group)
    if not per_tensor:
        dots, sq = dots.sum(), sq.sum()
    return torch.where(sq > 0, torch.relu(-dots) / torch.where(sq > 0, sq, 1.0), 0.0)


def l2_direction(
    grads: Sequence[torch.Tensor],
    thetas: Sequence[torch.Tensor],
    per_tensor: bool = False,
    group: Any = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(u, λ) with u_k = g_k + λ_k θ_k (λ_k = λ for the global rule); u_k has g_k's dtype and device. With
    ``group``, shards as in ``l2_coefficients``."""
    lam = l2_coefficients(grads, thetas, per_tensor, group)
    out = []
    for k, (g, t) in enumerate(zip(grads, thetas, strict=True)):
        coef = lam[k] if per_tensor else lam
        out.append(g + coef.to(device=g.device, dtype=g.dtype) * t.detach().to(g.dtype))
    return out, lam


@torch.no_grad()
def decoupled_correction(
    news: Sequence[torch.Tensor],
    olds: Sequence[torch.Tensor],
    per_tensor: bool = False,
    group: Any = None,
) -> None:
    """Correct θ_new (``news``, in place) after a step from θ_old (``olds``); see the module docstring.

    Afterwards ‖θ_new‖ ≤ ‖θ_old‖ (globally, or for each tensor with ``per_tensor``) wherever θ_old ≠ 0.
    With ``group``, shards as in ``l2_coefficients``.
    """
    if len(news) != len(olds):
        raise ValueError(f"{len(news)} tensors after the step for {len(olds)} before it")
    if not news:
        return
    device = olds[0].device
    pairs = list(zip(news, olds, strict=True))
    sq_olds = _on(device, [_dot(old, old) for _, old in pairs])
    crosses = _on(device, [_dot(new, old) for new, old in pairs])
    sq_news = _on(device, [_dot(new, new) for new, _ in pairs])
    if group is not None:  # as in ``l2_coefficients``
        sum_in_place([sq_olds, crosses, sq_news], group)
    if per_tensor:
        sums = [([k], sq_olds[k], crosses[k], sq_news[k]) for k in range(len(news))]
    else:
        sums = [(list(range(len(news))), sq_olds.sum(), crosses.sum(), sq_news.sum())]
    for ks, sq_old, cross, sq_new in sums:
        live = sq_old > 0
        # 1. first order: drop the growing component of Δ along θ_old (⟨Δ, θ_old⟩ = cross − sq_old).
        growing = cross - sq_old
        c = torch.where((growing > 0) & live, growing / torch.where(live, sq_old, 1.0), 0.0)
        # 2. second order: back onto the ball of radius ‖θ_old‖; ‖θ_new − cθ_old‖² from the three products.
        sq_proj = sq_new - 2 * c * cross + c * c * sq_old
        ratio = (sq_old / torch.where(live, sq_proj, 1.0)).sqrt()
        shrink = torch.where((sq_proj > sq_old) & live, ratio, 1.0)
        for k in ks:
            new, old = news[k], olds[k]
            new.sub_(c.to(device=new.device, dtype=new.dtype) * old)
            new.mul_(shrink.to(device=new.device, dtype=new.dtype))


class L2Rule:
    """The λ-free L2 auxiliary as a post-transform: ``method="l2"`` and ``GradSurgery(..., l2=True)`` both
    apply this one rule.

    Args:
        params: the regularized tensors; ``None`` means every trainable parameter with ``dim() >= 2`` (weight
            matrices and kernels; biases and norm scales are left out, as is usual for weight decay).
        per_tensor: one rule per tensor instead of one global inner product; ``None`` (the default) chooses
            by the optimizer: per tensor for adaptive ones (Adam, AdamW, RMSprop, Adagrad, …), one global
            rule for SGD.
        decoupled: act on the optimizer's actual update in ``step`` (the default) instead of on the gradient
            in ``backward``.

    The defaults are those the benchmarks support (``docs/howto/l2-without-lambda.md``): under 30 % label
    noise the decoupled per-tensor rule recovered 76-163 % of a tuned weight decay's gain with Adam (MLP and
    CNN), and with SGD the global rule kept clean-label accuracy where the per-tensor one lost 0.3-0.8 point;
    with SGD, a cosine-annealed learning rate and noisy labels, the per-tensor rule recovered 105-108 %. With
    SGD the evidence λ (``method="l2", evidence=True``, ``gradsurgery/evidence.py``) met both.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | None = None,
        per_tensor: bool | None = None,
        decoupled: bool = True,
        what: str = "l2",
    ) -> None:
        self.per_tensor = None if per_tensor is None else check_bool(per_tensor, f"{what} per_tensor")
        self.decoupled = check_bool(decoupled, f"{what} decoupled")
        self.params = None if params is None else check_tensors(params, f"{what} params")
        self._ids = None if self.params is None else {id(p) for p in self.params}

    def check_representation_mode(self) -> None:
        """Both forms act on whatever gradients a backward writes: in representation mode the heads' own and
        the trunk's fused through z."""

    def setup(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse regularized tensors that the optimizer does not hold (they would never be stepped); choose
        ``per_tensor`` by the optimizer when it was left to the default."""
        if self.per_tensor is None:
            self.per_tensor = is_adaptive(optimizer)
        if self.params is None:
            return
        known = {id(p) for g in optimizer.param_groups for p in g["params"]}
        strangers = [tuple(p.shape) for p in self.params if id(p) not in known]
        if strangers:
            raise ValueError(
                f"the L2 params include tensors the optimizer does not hold (shapes {strangers})"
            )

    def begin_backward(self, *, scaling: Any, reduction: Any) -> None:
        """The rule keeps nothing between calls and runs under loss scaling and data parallelism (its inner
        products are those of the rank-averaged gradient)."""

    def is_regularized(self, p: torch.Tensor) -> bool:
        return p.dim() >= 2 if self._ids is None else id(p) in self._ids

    def apply(
        self, pairs: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
        """The direct rule u = g + λθ on this backward's (param, new gradient) pairs of the regularized
        params (θ: the regularized parameters this backward reaches); the decoupled rule leaves them alone.
        Returns the pairs and the ``StepInfo`` fields it sets (``l2_coefficient``)."""
        if self.decoupled:
            return pairs, {}
        idx = [k for k, (p, _) in enumerate(pairs) if self.is_regularized(p)]
        params = [pairs[k][0] for k in idx]
        group = _shard_group(params)
        new, lam = l2_direction(
            [_local(pairs[k][1]) for k in idx], [_local(p) for p in params], self._per_tensor(), group
        )
        out = list(pairs)
        for k, p, u in zip(idx, params, new, strict=True):
            out[k] = (p, u if group is None else sharded_like(p, u))
        return out, {"l2_coefficient": lam}

    def before_step(self, params: Iterable[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """θ_old of the regularized params the inner step will move (those with a ``.grad``); decoupled rule
        only."""
        if not self.decoupled:
            return None
        return [(p, p.detach().clone()) for p in params if p.grad is not None and self.is_regularized(p)]

    def after_step(self, snapshot: list[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        if snapshot is not None:
            decoupled_correction(
                [_local(p.data) for p, _ in snapshot],
                [_local(old) for _, old in snapshot],
                self._per_tensor(),
                _shard_group([p for p, _ in snapshot]),
            )

    def _per_tensor(self) -> bool:
        if self.per_tensor is None:
            raise RuntimeError(
                "L2Rule: setup(optimizer) chooses per_tensor; call it first, or pass per_tensor="
            )
        return self.per_tensor

    def __repr__(self) -> str:
        which = "dim>=2" if self.params is None else f"{len(self.params)} tensors"
        return f"L2Rule(params={which}, per_tensor={self.per_tensor}, decoupled={self.decoupled})"
