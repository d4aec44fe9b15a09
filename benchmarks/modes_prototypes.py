"""Prototypes of the two λ-free card modes (the clean-set guard, L2 without λ) for the research benchmarks.

Every function here is a pure function on tensors (or a small class with an explicit state), with no
dependency on the benchmark scripts. Two families:

**Clean-set noise models** (for ``main_aux`` with a small trusted set, ``CleanBatches``), built on
``gradsurgery.clean_guard``'s ``estimate_transition`` (the gold-loss-correction estimate of the label-noise
transition matrix, Hendrycks et al. 2018: ``T[i, j]`` = the mean of p(ỹ = j | x) over the trusted x of true
class i, p(ỹ | x) from a model trained on the noisy labels only) and ``forward_corrected_nll``
(−log (softmax(logits) T)[ỹ] per sample: forward correction, Patrini et al. 2017):

- ``noisy_posterior(logits, noisy, T)``: q(y) ∝ p(y | x)·T[y, ỹ], the posterior of the true label given the
  network's belief and the noisy label (the E-step of an EM on the noise model).
- ``small_loss_mask(losses, keep)``: the ``keep`` fraction of samples with the smallest loss
  (co-teaching's selection, Han et al. 2018), with ``keep`` from the trusted estimate of the noise rate
  ``transition_keep_rate(T, prior)`` = Σ_i π_i T[i, i].
- ``CleanSetCorrection``: the mode as a training-loop object: a warm-up on the noisy loss alone (the trusted
  set untouched, so it stays held out), then ``T`` estimated once on the trusted set, then the corrected
  noisy loss plus the trusted loss.

**λ-free L2 rules** (for ``method="l2"``):

- ``l2_balanced_direction(grads, thetas, per_tensor)``: u = g + λθ with
  λ = max(relu(−⟨g, θ⟩)/‖θ‖², ‖g‖/‖θ‖) — today's rule (never let the data gradient grow ‖θ‖) plus a decay
  whose step is as long as the data step (‖λθ‖ = ‖g‖), per tensor with ``per_tensor``.
- ``l2_minnorm_direction(grads, thetas, per_tensor)``: the min-norm point u = αg + (1 − α)θ of the convex
  hull of {g, θ} (MGDA between the data loss and ½‖θ‖²); ``decoupled_minnorm_shrink`` its step-space form.
- ``heldout_radial_direction`` / ``decoupled_heldout_radial``: the norm's direction of travel (grow or
  shrink, per tensor) chosen by a held-out batch's gradient (the clean-set machinery: ``CleanBatches``),
  the rest of the step untouched; no λ.
- ``decoupled_balanced_shrink(news, olds, per_tensor)``: the decoupled (step-based) form of the balanced
  rule for Adam-like optimizers: after the step Δ, θ_new ← θ_new − ‖Δ‖·θ_old/‖θ_old‖ on top of today's
  projection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# The proposed clean-set mode moved into the package; the variants below build on its two functions.
from gradsurgery.clean_guard import estimate_transition, forward_corrected_nll

# --------------------------------------------------------------------------------------------------------
# clean-set noise models
# --------------------------------------------------------------------------------------------------------


def noisy_posterior(logits: torch.Tensor, noisy: torch.Tensor, transition: torch.Tensor) -> torch.Tensor:
    """q[b, y] ∝ softmax(logits)[b, y]·T[y, ỹ_b] (rows sum to 1), detached."""
    log_q = (
        F.log_softmax(logits.detach(), dim=1) + transition.to(logits.dtype).clamp_min(1e-12).log()[:, noisy].T
    )
    return torch.softmax(log_q, dim=1)


def transition_keep_rate(transition: torch.Tensor, prior: torch.Tensor | None = None) -> float:
    """The expected fraction of correct noisy labels, Σ_i π_i T[i, i] (π uniform by default)."""
    diag = torch.diagonal(transition).to(torch.float64)
    pi = torch.full_like(diag, 1 / len(diag)) if prior is None else prior.to(torch.float64) / prior.sum()
    return float((pi * diag).sum())


def small_loss_mask(losses: torch.Tensor, keep: float) -> torch.Tensor:
    """Boolean (B,): the ceil(keep·B) samples with the smallest loss (at least one)."""
    b = losses.numel()
    k = max(1, min(b, int(torch.ceil(torch.tensor(keep * b)).item())))
    idx = torch.topk(losses.detach().reshape(-1), k, largest=False).indices
    mask = torch.zeros(b, dtype=torch.bool, device=losses.device)
    mask[idx] = True
    return mask


class CleanSetCorrection:
    """Gold-loss correction in one training run, with the trusted set held out until T is estimated.

    Contract (a training loop calls, per step, ``loss = mode.loss(logits_noisy, y_noisy, logits_clean,
    y_clean)`` and, at each epoch end, ``mode.end_epoch(epoch, predict)``; ``predict(x)`` gives logits):

    - epochs ``< warmup``: the noisy loss alone, mean CE; the trusted logits are ignored (held out);
    - at the end of epoch ``warmup − 1``: T̂ = ``estimate_transition(softmax(predict(x_clean)), y_clean)``;
    - afterwards: ``variant`` = ``"forward"``: mean forward-corrected NLL + mean trusted CE;
      ``"posterior"``: CE against ``noisy_posterior`` targets + trusted CE;
      ``"forward_small_loss"``: forward-corrected NLL over the ``keep`` smallest-loss samples, keep = the
      trusted estimate of the clean-label rate; ``"distill"``: CE against q ∝ p_teacher(y | x)·T̂[y, ỹ], the
      posterior of the true label combining a *fixed* teacher trained on the trusted set alone (``teacher``,
      a callable x → logits) with the noisy label through T̂ (forward correction is the same with the
      current network as the teacher: its gradient p − q equals the posterior CE's).

    ``info`` after each ``loss``: ``mask`` (the samples trained on, or None), ``transition``.
    """

    VARIANTS = ("forward", "posterior", "forward_small_loss", "distill")

    def __init__(
        self,
        x_clean: torch.Tensor,
        y_clean: torch.Tensor,
        num_classes: int,
        warmup: int = 3,
        variant: str = "forward",
        teacher=None,
    ) -> None:
        if variant not in self.VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {self.VARIANTS}")
        if warmup < 1:
            raise ValueError("warmup must be >= 1 epoch (T is estimated from a noisy-only model)")
        self.x_clean, self.y_clean = x_clean, y_clean
        self.num_classes = num_classes
        self.warmup = warmup
        self.variant = variant
        self.transition: torch.Tensor | None = None
        self.keep: float | None = None
        self.mask: torch.Tensor | None = None
        if variant == "distill" and teacher is None:
            raise ValueError(
                "variant='distill' needs teacher=: a callable x -> logits trained on the trusted set"
            )
        self.teacher = teacher

    @property
    def warming_up(self) -> bool:
        return self.transition is None

    @torch.no_grad()
    def end_epoch(self, epoch: int, predict) -> None:
        if self.transition is None and epoch + 1 >= self.warmup:
            probs = torch.softmax(predict(self.x_clean), dim=1)
            self.transition = estimate_transition(probs, self.y_clean, self.num_classes)
            self.keep = transition_keep_rate(
                self.transition, torch.bincount(self.y_clean, minlength=self.num_classes)
            )

    def loss(self, logits_noisy, y_noisy, logits_clean, y_clean, x_noisy=None) -> torch.Tensor:
        self.mask = None
        if self.transition is None:
            return F.cross_entropy(logits_noisy, y_noisy)
        clean = F.cross_entropy(logits_clean, y_clean)
        if self.variant == "forward":
            return forward_corrected_nll(logits_noisy, y_noisy, self.transition).mean() + clean
        if self.variant == "posterior":
            q = noisy_posterior(logits_noisy, y_noisy, self.transition)
            return -(q * F.log_softmax(logits_noisy, 1)).sum(1).mean() + clean
        if self.variant == "distill":
            if x_noisy is None:
                raise ValueError("variant='distill' needs x_noisy= (the teacher reads the inputs)")
            with torch.no_grad():
                q = noisy_posterior(self.teacher(x_noisy), y_noisy, self.transition)
            return -(q * F.log_softmax(logits_noisy, 1)).sum(1).mean() + clean
        per = forward_corrected_nll(logits_noisy, y_noisy, self.transition)
        self.mask = small_loss_mask(per, self.keep)
        return per[self.mask].mean() + clean


def train_clean_teacher(
    model: torch.nn.Module,
    x_clean: torch.Tensor,
    y_clean: torch.Tensor,
    *,
    steps: int,
    lr: float = 0.01,
    batch: int = 32,
    generator: torch.Generator | None = None,
):
    """Train ``model`` (in place) on the trusted set alone for ``steps`` SGD steps (momentum 0.9); returns it
    in eval mode, as the ``teacher`` of ``CleanSetCorrection(variant="distill")``."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    n = len(y_clean)
    model.train()
    for _ in range(steps):
        idx = torch.randint(n, (min(batch, n),), generator=generator)
        opt.zero_grad()
        F.cross_entropy(model(x_clean[idx]), y_clean[idx]).backward()
        opt.step()
    return model.eval()


# --------------------------------------------------------------------------------------------------------
# λ-free L2 rules
# --------------------------------------------------------------------------------------------------------


def _groups(n: int, per_tensor: bool) -> list[list[int]]:
    return [[k] for k in range(n)] if per_tensor else [list(range(n))]


def _d(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.detach().reshape(-1).double(), b.detach().reshape(-1).double()))


def l2_balanced_coefficients(
    grads: Sequence[torch.Tensor],
    thetas: Sequence[torch.Tensor],
    per_tensor: bool = False,
    scale: float = 1.0,
) -> list[float]:
    """λ_k = max(relu(−⟨g, θ⟩)/‖θ‖², scale·‖g‖/‖θ‖) per group (one group, or one per tensor); 0 where
    θ = 0."""
    out = []
    for group in _groups(len(grads), per_tensor):
        dot = sum(_d(grads[k], thetas[k]) for k in group)
        sq = sum(_d(thetas[k], thetas[k]) for k in group)
        gsq = sum(_d(grads[k], grads[k]) for k in group)
        out.append(0.0 if sq <= 0 else max(max(-dot, 0.0) / sq, scale * (gsq / sq) ** 0.5))
    return out


def l2_minnorm_alphas(
    grads: Sequence[torch.Tensor], thetas: Sequence[torch.Tensor], per_tensor: bool = False
) -> list[float]:
    """α = argmin_{α∈[0,1]} ‖α g + (1 − α) θ‖ per group (MGDA between the data loss and ½‖θ‖²):
    α = clip((‖θ‖² − ⟨g, θ⟩)/‖g − θ‖², 0, 1); α = 1 (the data gradient alone) where θ = 0 or g = θ.

    For ‖θ‖ ≫ ‖g‖, u/α = g + λθ with λ = (1 − α)/α = (‖g‖² − ⟨g, θ⟩)/(‖θ‖² − ⟨g, θ⟩): today's λ
    (relu(−⟨g, θ⟩)/‖θ‖²) plus about ‖g‖²/‖θ‖², a decay that fades as the data gradient is resolved."""
    out = []
    for group in _groups(len(grads), per_tensor):
        gg = sum(_d(grads[k], grads[k]) for k in group)
        tt = sum(_d(thetas[k], thetas[k]) for k in group)
        gt = sum(_d(grads[k], thetas[k]) for k in group)
        den = gg + tt - 2 * gt
        out.append(1.0 if tt <= 0 or den <= 0 else min(max((tt - gt) / den, 0.0), 1.0))
    return out


def l2_minnorm_direction(
    grads: Sequence[torch.Tensor], thetas: Sequence[torch.Tensor], per_tensor: bool = False
) -> tuple[list[torch.Tensor], list[float]]:
    """u_k = α g_k + (1 − α) θ_k (the min-norm point itself, MGDA's common descent direction)."""
    alphas = l2_minnorm_alphas(grads, thetas, per_tensor)
    out = list(grads)
    for a, group in zip(alphas, _groups(len(grads), per_tensor), strict=True):
        for k in group:
            out[k] = a * grads[k] + (1 - a) * thetas[k].detach()
    return out, alphas


@torch.no_grad()
def decoupled_minnorm_shrink(
    news: Sequence[torch.Tensor], olds: Sequence[torch.Tensor], per_tensor: bool = False
) -> list[float]:
    """The step-space form for Adam-like optimizers. With the step's descent direction d = θ_old − θ_new:
    α from the min-norm point of {d, θ_old} (``l2_minnorm_alphas``), λ = min((1 − α)/α, 1); then today's
    decoupled correction (the growing part of the step removed, back onto the ball of radius ‖θ_old‖), and
    finally θ_new ← θ_new − λ θ_old. Returns the λ per group. In place."""
    from gradsurgery.l2 import decoupled_correction

    ds = [o - n for n, o in zip(news, olds, strict=True)]
    alphas = l2_minnorm_alphas(ds, olds, per_tensor)
    lams = [min((1 - a) / a, 1.0) if a > 0 else 1.0 for a in alphas]
    decoupled_correction(news, olds, per_tensor)
    for lam, group in zip(lams, _groups(len(news), per_tensor), strict=True):
        for k in group:
            news[k].sub_(lam * olds[k])
    return lams


def apply_coefficients(
    grads: Sequence[torch.Tensor],
    thetas: Sequence[torch.Tensor],
    lams: Sequence[float],
    per_tensor: bool = False,
) -> list[torch.Tensor]:
    """u_k = g_k + λ_(group of k)·θ_k."""
    out = list(grads)
    for lam, group in zip(lams, _groups(len(grads), per_tensor), strict=True):
        for k in group:
            out[k] = grads[k] + lam * thetas[k].detach()
    return out


@torch.no_grad()
def decoupled_balanced_shrink(
    news: Sequence[torch.Tensor], olds: Sequence[torch.Tensor], per_tensor: bool = False, scale: float = 1.0
) -> list[float]:
    """After a step θ_old → θ_new (Δ = θ_new − θ_old), per group: remove the growing component of Δ along
    θ_old (as today's decoupled rule), then move θ_new by ``scale``·‖Δ‖ towards 0 along θ_old
    (θ_new ← θ_new − scale·‖Δ‖·θ_old/‖θ_old‖). Returns the per-group shrink lengths. In place."""
    lengths = []
    for group in _groups(len(news), per_tensor):
        sq = sum(_d(olds[k], olds[k]) for k in group)
        if sq <= 0:
            lengths.append(0.0)
            continue
        delta_sq = sum(_d(news[k] - olds[k], news[k] - olds[k]) for k in group)
        grow = sum(_d(news[k] - olds[k], olds[k]) for k in group)
        c = max(grow, 0.0) / sq
        length = scale * delta_sq**0.5
        coef = c + length / sq**0.5
        for k in group:
            news[k].sub_(coef * olds[k])
        lengths.append(length)
    return lengths


def heldout_radial_direction(
    grads: Sequence[torch.Tensor],
    thetas: Sequence[torch.Tensor],
    heldout: Sequence[torch.Tensor],
    per_tensor: bool = False,
) -> list[torch.Tensor]:
    """Direct form (plain SGD): the radial component of the update (along θ, per group) is taken from the
    held-out gradient v instead of the training gradient g; the tangential part stays g's:

        u = g − (⟨g, θ⟩/‖θ‖²)·θ + (⟨v, θ⟩/‖θ‖²)·θ.

    The norm of each group then moves (to first order) the way that lowers the held-out loss, by the held-out
    gradient's own amount, and stops moving when the held-out loss no longer cares (⟨v, θ⟩ = 0). No λ.
    A group with θ = 0 keeps u = g."""
    out = list(grads)
    for group in _groups(len(grads), per_tensor):
        tt = sum(_d(thetas[k], thetas[k]) for k in group)
        if tt <= 0:
            continue
        coef = (
            sum(_d(heldout[k], thetas[k]) for k in group) - sum(_d(grads[k], thetas[k]) for k in group)
        ) / tt
        for k in group:
            out[k] = grads[k] + coef * thetas[k].detach()
    return out


@torch.no_grad()
def decoupled_heldout_radial(
    news: Sequence[torch.Tensor],
    olds: Sequence[torch.Tensor],
    heldout: Sequence[torch.Tensor],
    per_tensor: bool = False,
) -> list[float]:
    """Step-space form (Adam, momentum): keep the optimizer's step Δ = θ_new − θ_old except its radial
    component a = ⟨Δ, θ̂_old⟩, whose length |a| is kept and whose sign is chosen by the held-out gradient v:
    the norm shrinks by |a| when ⟨v, θ_old⟩ > 0 (shrinking lowers the held-out loss), grows by |a| when
    ⟨v, θ_old⟩ < 0, and the radial move is 0 when ⟨v, θ_old⟩ = 0:

        θ_new ← θ_old + (Δ − a θ̂_old) − sign(⟨v, θ_old⟩)·|a|·θ̂_old.

    Returns the signed radial move per group (negative = shrink). In place."""
    moves = []
    for group in _groups(len(news), per_tensor):
        tt = sum(_d(olds[k], olds[k]) for k in group)
        if tt <= 0:
            moves.append(0.0)
            continue
        a = sum(_d(news[k] - olds[k], olds[k]) for k in group) / tt**0.5
        vt = sum(_d(heldout[k], olds[k]) for k in group)
        move = -abs(a) if vt > 0 else (abs(a) if vt < 0 else 0.0)
        coef = (move - a) / tt**0.5
        for k in group:
            news[k].add_(coef * olds[k])
        moves.append(move)
    return moves
