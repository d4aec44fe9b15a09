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
- ``evidence_lambda(curvatures, ‖θ‖², N)`` (the package's, ``gradsurgery/evidence.py``): MacKay's evidence
  fixed point λ = γ(λ)/(N‖θ‖²), γ(λ) = Σ_j f_j/(f_j + λ), with the curvatures f from ``EvidenceL2`` (an
  average of per-sample squared gradients: the empirical Fisher's diagonal), ``KroneckerEvidence`` (K-FAC
  factors from module hooks, written apart from the package's ``KroneckerFactors``) or
  ``evidence_lambdas_spectral`` (the exact empirical-Fisher spectrum over a data set, from the Gram matrix of
  ``per_sample_grads``) or ``evidence_lambdas_ggn`` (the exact Gauss-Newton spectrum, from the Gram matrix of
  the per-sample output Jacobians).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# The proposed clean-set mode moved into the package; the variants below build on its two functions.
from gradsurgery.clean_guard import estimate_transition, forward_corrected_nll
from gradsurgery.evidence import evidence_lambda

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


def decoupled_log_product(news: Sequence[torch.Tensor], olds: Sequence[torch.Tensor]) -> float:
    """The decoupled rule on Σ_l log‖W_l‖ instead of ½‖θ‖²: the product of the layers' norms, which bounds a
    ReLU network's output scale, may not grow, while the layers trade norm among themselves. After a step
    θ_old → θ_new, where Σ_l log(‖W_l,new‖/‖W_l,old‖) = e > 0 over the L tensors, every tensor is scaled by
    c = exp(−e/L), which brings the sum back to its value before the step and keeps every direction.
    Returns c (1 where the sum did not grow). In place."""
    excess = 0.0
    for new, old in zip(news, olds, strict=True):
        a, b = _d(old, old), _d(new, new)
        if a > 0 and b > 0:
            excess += 0.5 * (math.log(b) - math.log(a))
    if excess <= 0:
        return 1.0
    c = math.exp(-excess / len(news))
    for new in news:
        new.mul_(c)
    return c


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


class EvidenceL2:
    """The evidence λ per group (one group, or one per tensor) from an exponential average of the per-sample
    squared gradients (the empirical Fisher's diagonal), bias-corrected as Adam's second moment."""

    def __init__(
        self, thetas: Sequence[torch.Tensor], num_samples: int, per_tensor: bool, beta: float = 0.99
    ):
        self.moments = [torch.zeros_like(t, dtype=torch.float64) for t in thetas]
        self.num_samples = num_samples
        self.per_tensor = per_tensor
        self.beta = beta
        self.count = 0

    @torch.no_grad()
    def update(self, sample_sq_grads: Sequence[torch.Tensor]) -> None:
        self.count += 1
        for m, s in zip(self.moments, sample_sq_grads, strict=True):
            m.mul_(self.beta).add_(s.double(), alpha=1 - self.beta)

    @torch.no_grad()
    def lambdas(self, thetas: Sequence[torch.Tensor]) -> list[float]:
        correction = 1 - self.beta**self.count
        out = []
        for group in _groups(len(thetas), self.per_tensor):
            fisher = torch.cat([self.moments[k].reshape(-1) for k in group]) / correction
            sq = sum(_d(thetas[k], thetas[k]) for k in group)
            out.append(evidence_lambda(fisher, sq, self.num_samples))
        return out


def _functional_params(
    model: torch.nn.Module, params: Sequence[torch.Tensor]
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The names of ``params`` in ``model`` and every parameter detached, by name (for ``torch.func``)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in params], {n: p.detach() for n, p in model.named_parameters()}


def per_sample_grads(
    model: torch.nn.Module, params: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> list[torch.Tensor]:
    """Each sample's cross-entropy gradient for ``params`` (stacked over the batch: one tensor per parameter,
    the batch first), exact, by ``torch.func.vmap`` over ``torch.func.grad``."""
    from torch.func import functional_call, grad, vmap

    keys, frozen = _functional_params(model, params)

    def loss(chosen, xi, yi):
        out = functional_call(model, {**frozen, **chosen}, (xi.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(out, yi.unsqueeze(0))

    per = vmap(grad(loss), in_dims=(None, 0, 0))({k: frozen[k] for k in keys}, x, y)
    return [per[k] for k in keys]


def per_sample_sq_grads(
    model: torch.nn.Module, params: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> list[torch.Tensor]:
    """The mean over the batch of each sample's squared cross-entropy gradient, for ``params``."""
    return [(g**2).mean(0) for g in per_sample_grads(model, params, x, y)]


@torch.no_grad()
def evidence_lambdas_spectral(
    model: torch.nn.Module,
    thetas: Sequence[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    per_tensor: bool,
    chunk: int = 50,
) -> list[float]:
    """The evidence λ per group with γ from the exact spectrum of the empirical Fisher over the whole training
    set (x, y): with G the N×D matrix of per-sample gradients, the Fisher GᵀG/N has the nonzero eigenvalues
    of the N×N Gram matrix GGᵀ/N, so γ(λ) = Σ_i κ_i/(κ_i + λ) over those N eigenvalues (no diagonal
    approximation, which over-counts γ: the diagonal is majorized by the spectrum, x/(x + λ) is concave)."""
    n = len(y)
    rows = []
    for start in range(0, n, chunk):
        per = per_sample_grads(model, thetas, x[start : start + chunk], y[start : start + chunk])
        rows.append([g.reshape(g.shape[0], -1).double() for g in per])
    return _gram_evidence(rows, thetas, per_tensor, n)


def per_sample_output_jacobians(
    model: torch.nn.Module, params: Sequence[torch.Tensor], x: torch.Tensor
) -> list[torch.Tensor]:
    """Each sample's Jacobian of the C outputs with respect to ``params``: one tensor per parameter, of shape
    (batch, C, *param.shape), by ``torch.func.vmap`` over ``torch.func.jacrev``."""
    from torch.func import functional_call, jacrev, vmap

    keys, frozen = _functional_params(model, params)

    def outputs(chosen, xi):
        return functional_call(model, {**frozen, **chosen}, (xi.unsqueeze(0),)).squeeze(0)

    per = vmap(jacrev(outputs), in_dims=(None, 0))({k: frozen[k] for k in keys}, x)
    return [per[k] for k in keys]


@torch.no_grad()
def evidence_lambdas_ggn(
    model: torch.nn.Module,
    thetas: Sequence[torch.Tensor],
    x: torch.Tensor,
    per_tensor: bool,
    chunk: int = 25,
) -> list[float]:
    """The evidence λ per group with γ from the exact spectrum of the generalized Gauss-Newton matrix of the
    mean cross-entropy over the data set x: H = (1/N) Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n, with
    diag p − p pᵀ = L Lᵀ, L = diag(√p) − p √pᵀ, so H = MᵀM/N for the N·C rows M_n = Lᵀ J_n and its nonzero
    eigenvalues are those of the (N·C)×(N·C) Gram matrix M Mᵀ/N (M kept in float32 to bound the memory,
    N·C·D values; the Gram accumulated in float64). The labels do not enter (rank ≤ N(C − 1))."""
    n = len(x)
    rows = []
    for start in range(0, n, chunk):
        xs = x[start : start + chunk]
        probs = torch.softmax(model(xs).double(), dim=1)
        root = probs.sqrt()
        factor = torch.diag_embed(root) - probs.unsqueeze(2) * root.unsqueeze(1)  # L per sample, C×C
        jacs = per_sample_output_jacobians(model, thetas, xs)
        rows.append(
            [
                torch.einsum("bcd,bce->bde", factor, j.reshape(*j.shape[:2], -1).double())
                .reshape(-1, j[0, 0].numel())
                .float()
                for j in jacs
            ]
        )
    return _gram_evidence(rows, thetas, per_tensor, n)


def _gram_evidence(
    rows: list[list[torch.Tensor]], thetas: Sequence[torch.Tensor], per_tensor: bool, n: int
) -> list[float]:
    """The evidence λ per group from the eigenvalues of M Mᵀ/N, M the rows (``rows[chunk][tensor]``: a
    chunk's rows restricted to one tensor's columns) over the group's tensors; M Mᵀ accumulated in float64
    over blocks of columns, so that float32 rows are never converted whole."""
    out = []
    for group in _groups(len(thetas), per_tensor):
        mat = torch.cat([torch.cat([r[k] for k in group], dim=1) for r in rows])
        gram = torch.zeros(mat.shape[0], mat.shape[0], dtype=torch.float64)
        for block in torch.split(mat, 8192, dim=1):
            block = block.double()
            gram += block @ block.T
        eigs = torch.linalg.eigvalsh(gram / n).clamp_min(0)
        sq = sum(_d(thetas[k], thetas[k]) for k in group)
        out.append(evidence_lambda(eigs, sq, n))
    return out


class KroneckerEvidence:
    """The evidence λ with γ from a Kronecker-factored Fisher (K-FAC, Martens & Grosse 2015; KFC for
    convolutions, Grosse & Martens 2016): per layer F ≈ |T|·A ⊗ S with A the mean of a aᵀ over the layer's
    inputs a (im2col patches for a convolution, |T| spatial positions) and S the mean of δ δᵀ over the
    per-sample gradients δ at its outputs, each an exponential average over steps. F's eigenvalues are
    |T|·a_i·s_j, so γ_l(λ) = Σ_ij |T| a_i s_j / (|T| a_i s_j + λ) without forming F; γ and ‖θ‖² are summed
    over the layers of a group (all, or one per layer). The online marginal-likelihood λ of Immer et al. 2021
    ("Scalable marginal likelihood estimation for model selection in deep learning") in MacKay's fixed-point
    form. Hooks on the ``nn.Linear`` and ``nn.Conv2d`` modules whose weights are ``thetas``."""

    def __init__(
        self,
        model: torch.nn.Module,
        thetas: Sequence[torch.Tensor],
        num_samples: int,
        per_tensor: bool,
        beta: float = 0.95,
        every: int = 10,
    ):
        ids = {id(t): k for k, t in enumerate(thetas)}
        self.layers = [None] * len(thetas)
        for mod in model.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and id(mod.weight) in ids:
                self.layers[ids[id(mod.weight)]] = mod
        if any(m is None for m in self.layers):
            raise ValueError("every regularized tensor must be a Linear or Conv2d weight")
        self.a = [None] * len(thetas)
        self.s = [None] * len(thetas)
        self.positions = [1] * len(thetas)
        self.num_samples = num_samples
        self.per_tensor = per_tensor
        self.beta, self.every, self.count = beta, every, 0
        self.current: list[float] | None = None
        self.recording = True  # False: backward passes leave the factors alone
        self.handles = [
            mod.register_forward_hook(lambda m, i, o, k=k: self._forward(k, m, i[0], o))
            for k, mod in enumerate(self.layers)
        ]

    def _ema(self, store, k, value):
        store[k] = value if store[k] is None else store[k].mul_(self.beta).add_(value, alpha=1 - self.beta)

    def _forward(self, k, mod, x, out):
        if not out.requires_grad:  # an evaluation pass
            return
        x = x.detach()
        if isinstance(mod, torch.nn.Conv2d):
            patches = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # n, in·kk, t
            self.positions[k] = patches.shape[2]
            x = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        x = x.double()
        out.register_hook(lambda grad: self._backward(k, mod, x, grad))

    @torch.no_grad()
    def _backward(self, k, mod, x, grad_out):
        if not self.recording:
            return
        batch = grad_out.shape[0]
        d = grad_out.double() * batch  # per-sample gradients of the mean loss
        if isinstance(mod, torch.nn.Conv2d):
            d = d.permute(0, 2, 3, 1).reshape(-1, d.shape[1])
        self._ema(self.a, k, x.T @ x / x.shape[0])
        self._ema(self.s, k, d.T @ d / d.shape[0])

    def lambdas(self, thetas: Sequence[torch.Tensor]) -> list[float]:
        self.count += 1
        if self.current is None or self.count % self.every == 0:
            spectra = []
            for k in range(len(thetas)):
                ea = torch.linalg.eigvalsh(self.a[k]).clamp_min(0)
                es = torch.linalg.eigvalsh(self.s[k]).clamp_min(0)
                spectra.append((self.positions[k] * torch.outer(ea, es)).reshape(-1))
            self.current = []
            for group in _groups(len(thetas), self.per_tensor):
                curv = torch.cat([spectra[k] for k in group])
                sq = sum(_d(thetas[k], thetas[k]) for k in group)
                self.current.append(evidence_lambda(curv, sq, self.num_samples))
        return self.current

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class HypergradientL2:
    """λ tuned online from held-out batches by its hypergradient (Luketina et al. 2016, "T1-T2"): after the
    direct step θ' = θ − η(g + λθ), ∂L_v(θ')/∂λ = −η⟨∇L_v(θ'), θ⟩, so λ should grow when the held-out
    gradient points along θ. The step is taken in log λ with the cosine as its size, free of the scales of
    v and θ:

        log λ ← log λ + rate · ⟨v, θ⟩ / (‖v‖ ‖θ‖),

    per group (all tensors, or one per tensor), v the held-out gradient at the current θ (one step late: the
    T1-T2 approximation). ``lam0`` and ``rate`` replace λ by a start and a speed; the held-out batches are the
    validation split that tunes λ for the baseline."""

    def __init__(self, num_groups: int, lam0: float = 1e-3, rate: float = 0.03) -> None:
        if lam0 <= 0 or rate <= 0:
            raise ValueError(f"lam0 and rate must be > 0, got {lam0}, {rate}")
        self.log_lams = [math.log(lam0)] * num_groups
        self.rate = rate

    def update(
        self, heldout: Sequence[torch.Tensor], thetas: Sequence[torch.Tensor], per_tensor: bool
    ) -> None:
        for n, group in enumerate(_groups(len(thetas), per_tensor)):
            vt = sum(_d(heldout[k], thetas[k]) for k in group)
            vv = sum(_d(heldout[k], heldout[k]) for k in group)
            tt = sum(_d(thetas[k], thetas[k]) for k in group)
            if vv > 0 and tt > 0:
                self.log_lams[n] += self.rate * vt / math.sqrt(vv * tt)

    def lambdas(self) -> list[float]:
        return [math.exp(v) for v in self.log_lams]
