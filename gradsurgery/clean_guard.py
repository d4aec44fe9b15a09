"""Noisy labels with a small clean set: the clean loss as the *auxiliary* of the noisy loss.

**Guard** (``GradSurgery(opt, method="main_aux", main=0)``, ``opt.backward([noisy_loss, clean_loss])``): the
loss on the large noisy set descends as fast as it can while the loss on the small clean set may not rise to
first order (Su 2022): u = g_noisy + λ g_clean, λ = relu(−⟨g_noisy, g_clean⟩)/‖g_clean‖².

**Mask** (``mode="mask"``; gradient-guided loss masking, Wang et al. 2021): per noisy sample s, keep it iff
its gradient does not conflict with the clean-set gradient,

    m_s = [⟨∇_θ ℓ_s, g_clean⟩ ≥ 0],   main loss = Σ_s m_s ℓ_s / max(Σ_s m_s, 1),

θ the parameters both losses reach (the shared ones). Every kept sample has a non-negative inner product
with g_clean, so their mean does too and the main/auxiliary rule then adds nothing (λ = 0): the clean set
only chooses which noisy samples are trained on. If every sample is dropped the step is zero.

**Noise correction** (``NoiseCorrection``; gold loss correction, Hendrycks et al. 2018, in one run): the clean
set is held out for a short warm-up on the noisy loss alone; then the noise of the labels is estimated once,
T̂[i, j] = mean over the clean samples of class i of the network's p(ỹ = j | x), and training goes on with the
forward-corrected noisy loss −log Σ_y p(y | x) T̂[y, ỹ] plus the clean loss. It acts on the loss (it needs
logits and labels), not on gradients, and is the mode the benchmarks support at high noise
(``docs/howto/clean-set-guard.md``): at 40-80 % label noise with a 1-5 % clean set it ended above both
training on the clean set alone and on the noisy set alone at every point measured, where the guard ends with
the noisy-only model and masking below the clean set alone.

``CleanBatches`` draws clean batches from a DataLoader for ever, so a training loop needs no second loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ._validation import check_differentiable, check_int


class CleanBatches:
    """An endless iterator over a clean loader: ``next(clean)`` gives the next batch, restarting the loader
    (a new epoch, reshuffled if the loader shuffles) whenever it runs out.

    Args:
        loader: a re-iterable source of batches (a ``DataLoader``, a list of batches). A one-shot iterator
            (a generator) cannot be restarted and is refused.
        device: when given, tensors in each batch (also inside tuples, lists and dicts) are moved there.

    Raises ``ValueError`` at construction when the loader yields no batch, so a mistake shows before
    training rather than as a hang. ``epoch`` counts the completed passes.
    """

    def __init__(self, loader: Iterable[Any], device: torch.device | str | None = None) -> None:
        try:
            it = iter(loader)
        except TypeError:
            raise TypeError(
                f"CleanBatches needs an iterable of batches, got {type(loader).__name__}"
            ) from None
        if it is loader:
            raise TypeError(
                "CleanBatches needs a re-iterable loader (a DataLoader or a list of batches), got the "
                f"one-shot iterator {type(loader).__name__}, which cannot be restarted"
            )
        try:
            size = len(loader)  # type: ignore[arg-type]
        except TypeError:
            size = None  # e.g. a DataLoader over an IterableDataset
        if size == 0:
            raise ValueError(
                "the clean loader is empty (len 0): the clean-set guard needs at least one clean batch"
            )
        self.loader = loader
        self.device = None if device is None else torch.device(device)
        self.epoch = 0
        self._it = it
        self._pending: list[Any] = []
        if size is None:
            # No length to check: draw the first batch now, so an empty loader fails here and not in training.
            try:
                self._pending.append(next(it))
            except StopIteration:
                raise ValueError(
                    "the clean loader yielded no batch: the clean-set guard needs at least one"
                ) from None

    def __iter__(self) -> CleanBatches:
        return self

    def __next__(self) -> Any:
        if self._pending:
            return self._move(self._pending.pop())
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch += 1
            self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                # Raising StopIteration here would silently end the caller's loop.
                raise RuntimeError(f"the clean loader yielded no batch in pass {self.epoch + 1}") from None
        return self._move(batch)

    def _move(self, batch: Any) -> Any:
        return batch if self.device is None else _to_device(batch, self.device)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    # The container's own type rebuilds it (a Mapping subclass, a namedtuple): its constructor is not
    # the abstract one the isinstance checks narrow to.
    rebuild: Callable[..., Any] = type(batch)
    if isinstance(batch, Mapping):
        return rebuild({k: _to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return rebuild(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return rebuild(_to_device(v, device) for v in batch)
    return batch


# -- noise correction ----------------------------------------------------------------------------------------


def estimate_transition(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """T̂ (C×C, float64, rows summing to 1): T̂[i] = the mean of ``probs[s]`` over the samples s of true class
    ``labels[s] == i``; a class with no sample gets the identity row.

    ``probs`` (n, C): p(ỹ | x) of a network trained on the noisy labels only, on clean samples it did not
    train on; ``labels`` (n,): their true classes."""
    check_int(num_classes, "num_classes", minimum=2)
    if not isinstance(probs, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("probs and labels must be tensors")
    if probs.dim() != 2 or probs.shape[1] != num_classes or labels.shape != probs.shape[:1]:
        raise ValueError(
            f"probs (n, {num_classes}) and labels (n,) expected, got {tuple(probs.shape)} and "
            f"{tuple(labels.shape)}"
        )
    _check_labels(labels, num_classes, "labels")
    probs = probs.detach().to(torch.float64)
    sums = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=probs.device)
    sums.index_add_(0, labels, probs)
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    eye = torch.eye(num_classes, dtype=torch.float64, device=probs.device)
    t = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], eye)
    return t / t.sum(1, keepdim=True)


def forward_corrected_nll(
    logits: torch.Tensor, noisy_labels: torch.Tensor, transition: torch.Tensor
) -> torch.Tensor:
    """−log Σ_y softmax(logits)[y] · T[y, ỹ] per sample (shape (B,)), in log space (no underflow when the
    network is confident). Its gradient with respect to the logits is p − q, q ∝ p(y | x) T[y, ỹ] the
    posterior of the true class given the noisy label.

    Computed in float32 at least (float16 or bfloat16 logits give a float32 loss, as ``cross_entropy`` under
    autocast): in float16, T's small entries flush to zero and log T to −∞, and the loss was up to 56 % off
    the float64 one on the same logits (a 10-class T with a column of 10⁻⁹)."""
    work = torch.promote_types(logits.dtype, torch.float32)
    log_p = F.log_softmax(logits, dim=1, dtype=work)
    log_t = transition.to(device=logits.device, dtype=work).clamp_min(1e-12).log()
    return -torch.logsumexp(log_p + log_t[:, noisy_labels].T, dim=1)


class NoiseCorrection:
    """Gold loss correction in one training run (module docstring):

        correction = NoiseCorrection(num_classes=10)
        for epoch in range(epochs):
            if epoch == warmup:  # e.g. 3 of 15 epochs: the noisy loss alone until then
                correction.estimate(model(x_clean_all), y_clean_all)
            for (x, y), (xc, yc) in zip(noisy_loader, clean_batches):
                loss = correction.loss(model(x), y, model(xc), yc)
                ...

    ``loss`` is the mean cross-entropy of the noisy batch while no transition has been estimated (the clean
    batch is held out: the estimate must come from clean samples the network never trained on), then the
    mean forward-corrected noisy loss plus the mean clean cross-entropy. The transition is in
    ``state_dict()``, so a resumed run continues with it.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = check_int(num_classes, "num_classes", minimum=2)
        self.transition: torch.Tensor | None = None

    @property
    def warming_up(self) -> bool:
        return self.transition is None

    @torch.no_grad()
    def estimate(self, clean_logits: torch.Tensor, clean_labels: torch.Tensor) -> torch.Tensor:
        """Estimate T̂ from the network's logits on the clean set (every clean sample, none trained on yet)."""
        self.transition = estimate_transition(
            torch.softmax(clean_logits.float(), 1), clean_labels, self.num_classes
        )
        return self.transition

    def loss(
        self,
        noisy_logits: torch.Tensor,
        noisy_labels: torch.Tensor,
        clean_logits: torch.Tensor | None = None,
        clean_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_batch(noisy_logits, noisy_labels, "noisy")
        if self.transition is None:
            return F.cross_entropy(noisy_logits, noisy_labels)
        corrected = forward_corrected_nll(noisy_logits, noisy_labels, self.transition).mean()
        if clean_logits is None or clean_labels is None:
            raise ValueError(
                "after the estimate, loss() takes the clean batch too: loss(logits, y, clean_logits, clean_y)"
            )
        self._check_batch(clean_logits, clean_labels, "clean")
        return corrected + F.cross_entropy(clean_logits, clean_labels)

    def _check_batch(self, logits: torch.Tensor, labels: torch.Tensor, what: str) -> None:
        if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise TypeError(f"{what} logits and labels must be tensors")
        if logits.dim() != 2 or logits.shape[1] != self.num_classes or labels.shape != logits.shape[:1]:
            raise ValueError(
                f"{what} logits (B, {self.num_classes}) and labels (B,) expected, got "
                f"{tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        _check_labels(labels, self.num_classes, f"{what} labels")

    def state_dict(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "transition": self.transition}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_classes") != self.num_classes:
            raise ValueError(
                f"state is for {state.get('num_classes')} classes, this correction has {self.num_classes}"
            )
        transition = state.get("transition")
        if transition is not None and tuple(transition.shape) != (self.num_classes, self.num_classes):
            raise ValueError(f"state has a transition of shape {tuple(transition.shape)}")
        self.transition = None if transition is None else transition.detach().to(torch.float64).clone()


def _check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{what} must be integer class indices, got dtype {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{what} must lie in [0, {num_classes}), got values from {int(labels.min())} to "
            f"{int(labels.max())}"
        )


# -- masking inside GradSurgery.backward (mode="mask") -------------------------------------------------------


def sample_clean_products(
    per_sample_losses: torch.Tensor,
    clean_loss: torch.Tensor,
    params: Sequence[torch.Tensor],
    shared_ids: set[int] | None = None,
    how: str = "auto",
) -> torch.Tensor:
    """⟨∇_θ ℓ_s, ∇_θ L_clean⟩ for every sample s (float64, shape (B,)), θ the parameters both reach.

    From the existing graphs (both are retained), without a functional model:

    - ``"double_backward"``: with v a B-vector, ∇_θ(vᵀℓ) = Σ_s v_s ∇_θ ℓ_s, so ∂/∂v ⟨∇_θ(vᵀℓ), g_clean⟩ is
      the vector of the B inner products: one backward with ``create_graph`` and one more backward, no
      per-sample gradient is formed (memory of the graph, not B × d). Needs double-backward support.
    - ``"batched"``: the per-sample gradients themselves, ``autograd.grad(..., is_grads_batched=True)``
      (the backward vmapped over the B one-hot output gradients; B × d memory, and slower).
    - ``"auto"``: double backward, falling back to batched when an operation has no double backward.

    ``shared_ids`` restricts θ further (``GradSurgery(shared_params=...)``).
    """
    if how not in ("auto", "double_backward", "batched"):
        raise ValueError(f"unknown how={how!r}; choose 'auto', 'double_backward' or 'batched'")
    candidates = [p for p in params if shared_ids is None or id(p) in shared_ids]
    grads = torch.autograd.grad(clean_loss, candidates, retain_graph=True, allow_unused=True)
    reached = [k for k, g in enumerate(grads) if g is not None]
    if not reached:
        raise ValueError("the clean loss reaches none of the (shared) parameters: nothing to guard")
    theta = [candidates[k] for k in reached]
    g_clean = [grads[k].detach() for k in reached]
    flat = per_sample_losses.reshape(-1)
    if how != "batched":
        try:
            return _products_double_backward(flat, theta, g_clean)
        except RuntimeError:
            if how == "double_backward":
                raise
    return _products_batched(flat, theta, g_clean)


def _no_shared() -> ValueError:
    return ValueError(
        "the noisy and the clean loss share no parameter: per-sample masking has nothing to compare"
    )


def _products_double_backward(
    flat: torch.Tensor, theta: list[torch.Tensor], g_clean: list[torch.Tensor]
) -> torch.Tensor:
    v = torch.ones_like(flat, requires_grad=True)
    mixed = torch.autograd.grad(
        flat, theta, grad_outputs=v, retain_graph=True, create_graph=True, allow_unused=True
    )
    terms = [(g * c.to(g.dtype)).sum() for g, c in zip(mixed, g_clean, strict=True) if g is not None]
    if not terms:
        raise _no_shared()
    (products,) = torch.autograd.grad(torch.stack(terms).sum(), v, allow_unused=True)
    # None: every per-sample gradient is constant in v's direction, i.e. all inner products are 0.
    if products is None:
        return torch.zeros_like(flat, dtype=torch.float64)
    return products.detach().to(torch.float64)


def _products_batched(
    flat: torch.Tensor, theta: list[torch.Tensor], g_clean: list[torch.Tensor]
) -> torch.Tensor:
    n = flat.numel()
    eye = torch.eye(n, dtype=flat.dtype, device=flat.device)
    per_sample = torch.autograd.grad(
        flat, theta, grad_outputs=eye, retain_graph=True, allow_unused=True, is_grads_batched=True
    )
    products: torch.Tensor | None = None
    for g, c in zip(per_sample, g_clean, strict=True):
        if g is None:
            continue
        part = (g.reshape(n, -1) @ c.reshape(-1).to(g.dtype)).to(torch.float64)
        products = part if products is None else products + part
    if products is None:
        raise _no_shared()
    return products


def masked_main_loss(
    losses: Any, main: int, params: Sequence[torch.Tensor], shared_ids: set[int] | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """For ``mode="mask"``: ``[per_sample_noisy_losses, clean_loss]`` → (the same list with the noisy entry
    replaced by the mean loss of the kept samples, the boolean keep-mask of shape (B,))."""
    if isinstance(losses, torch.Tensor) or not isinstance(losses, Sequence) or isinstance(losses, str):
        raise TypeError(
            "mode='mask' takes a list [per_sample_noisy_losses, clean_loss] (the noisy losses with "
            f"reduction='none'), got {type(losses).__name__}"
        )
    losses = list(losses)
    if len(losses) != 2:
        raise ValueError(
            f"mode='mask' takes exactly 2 losses [per_sample_noisy_losses, clean_loss], got {len(losses)}"
        )
    for i, loss in enumerate(losses):
        check_differentiable(loss, i)
    if main not in (0, 1):
        raise ValueError(f"main={main!r} is out of range for mode='mask' with 2 losses")
    noisy, clean = losses[main], losses[1 - main]
    if noisy.dim() != 1 or noisy.numel() == 0:
        raise ValueError(
            f"mode='mask' needs the main (noisy) loss per sample, a non-empty 1-D tensor such as "
            f"F.cross_entropy(out, y, reduction='none'); got shape {tuple(noisy.shape)}"
        )
    if clean.numel() != 1:
        raise ValueError(f"the clean loss must be a scalar, got shape {tuple(clean.shape)}")
    finite = torch.isfinite(noisy.detach())
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).reshape(-1).tolist()
        raise ValueError(f"non-finite per-sample noisy loss(es) at sample(s) {bad[:20]}; nothing was written")
    if not bool(torch.isfinite(clean.detach()).all()):
        raise ValueError(f"non-finite clean loss {float(clean.detach().reshape(()))}; nothing was written")
    products = sample_clean_products(noisy, clean.reshape(()), params, shared_ids)
    if not bool(torch.isfinite(products).all()):
        bad = torch.nonzero(~torch.isfinite(products)).reshape(-1).tolist()
        raise ValueError(
            f"non-finite (NaN/inf) per-sample gradient for sample(s) {bad[:20]}; nothing was written"
        )
    mask = products >= 0
    kept = mask.to(noisy.dtype)
    masked = torch.where(mask, noisy, torch.zeros_like(noisy)).sum() / kept.sum().clamp_min(1)
    out = list(losses)
    out[main] = masked
    return out, mask


# -- masking as a stand-alone function (torch.func) ----------------------------------------------------------


def _select_params(
    model: torch.nn.Module, params: Iterable[str | torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    named: dict[str, torch.Tensor] = dict(model.named_parameters())
    chosen: dict[str, torch.Tensor]
    if params is None:
        chosen = {n: p for n, p in named.items() if p.requires_grad}
    else:
        by_id = {id(p): n for n, p in named.items()}
        chosen = {}
        for p in params:
            if isinstance(p, str):
                if p not in named:
                    raise ValueError(f"the model has no parameter named {p!r}")
                chosen[p] = named[p]
            elif isinstance(p, torch.Tensor):
                if id(p) not in by_id:
                    raise ValueError(
                        f"a tensor of shape {tuple(p.shape)} in params is not a parameter of the model"
                    )
                chosen[by_id[id(p)]] = p
            else:
                raise TypeError(f"params must hold parameter names or tensors, got {type(p).__name__}")
    if not chosen:
        raise ValueError("no parameter to compare the per-sample gradients on")
    return chosen


def per_sample_clean_products(
    model: torch.nn.Module,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    clean: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    *,
    params: Iterable[str | torch.Tensor] | None = None,
    backend: str = "vmap",
) -> torch.Tensor:
    """⟨∇_θ ℓ(model(x_s), y_s), g_clean⟩ for every sample s, with ``torch.func`` (shape (B,), float64).

    Args:
        model: the network; it is called functionally (``functional_call``) with θ, its buffers unchanged.
        loss_fn: ``loss_fn(outputs, targets)`` returning one loss per sample (``reduction="none"``).
        inputs, targets: the noisy batch (first dimension B).
        clean: the clean-set loss (a scalar with a graph; its gradient is taken, the graph retained), or
            g_clean itself: a sequence aligned with ``params`` or a dict from parameter name to gradient.
        params: θ, as parameter names or tensors (default: every parameter that requires grad).
        backend: ``"vmap"`` computes each per-sample gradient as ``vmap(grad(ℓ_s))`` over batches of one
            (B × d memory; the per-sample gradient of the paper; use ``model.eval()`` when the model has
            batch statistics); ``"jvp"`` gets all B inner products at once as the forward-mode derivative of
            the per-sample loss vector along g_clean (one forward pass, no B × d memory; with batch
            statistics it differentiates through the whole batch).
    """
    from torch.func import functional_call, grad, jvp, vmap  # torch.func loads torch._functorch: slow

    if backend not in ("vmap", "jvp"):
        raise ValueError(f"unknown backend {backend!r}; choose 'vmap' or 'jvp'")
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("inputs and targets must be tensors")
    if inputs.shape[0] != targets.shape[0] or inputs.shape[0] == 0:
        raise ValueError(
            f"inputs ({tuple(inputs.shape)}) and targets ({tuple(targets.shape)}) need the same B >= 1"
        )
    theta = _select_params(model, params)
    names = list(theta)
    if isinstance(clean, torch.Tensor) and clean.numel() == 1 and clean.requires_grad:
        got = torch.autograd.grad(
            clean.reshape(()), [theta[n] for n in names], retain_graph=True, allow_unused=True
        )
        g_clean = {n: torch.zeros_like(theta[n]) if g is None else g for n, g in zip(names, got, strict=True)}
    elif isinstance(clean, Mapping):
        missing = [n for n in names if n not in clean]
        if missing:
            raise ValueError(f"clean gradients missing for parameter(s) {missing}")
        g_clean = {n: clean[n] for n in names}
    elif isinstance(clean, Sequence) and not isinstance(clean, torch.Tensor):
        if len(clean) != len(names):
            raise ValueError(f"{len(clean)} clean gradients for {len(names)} parameters")
        g_clean = dict(zip(names, clean, strict=True))
    else:
        raise TypeError(
            "clean must be the clean loss (a scalar that requires grad) or its gradients (a list or a dict)"
        )
    for n in names:
        if g_clean[n].shape != theta[n].shape:
            raise ValueError(
                f"clean gradient for {n!r} has shape {tuple(g_clean[n].shape)}, "
                f"expected {tuple(theta[n].shape)}"
            )
    detached = {n: theta[n].detach() for n in names}
    tangents = {n: g_clean[n].detach().to(theta[n].dtype) for n in names}
    batch = inputs.shape[0]

    def losses_of(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = loss_fn(functional_call(model, p, (x,)), y)
        if out.shape != (x.shape[0],):
            raise ValueError(
                f"loss_fn must return one loss per sample, shape ({x.shape[0]},), got {tuple(out.shape)}"
            )
        return out

    if backend == "jvp":
        # jvp returns (outputs, their derivative along the tangents).
        jvp_products: torch.Tensor = jvp(lambda p: losses_of(p, inputs, targets), (detached,), (tangents,))[1]
        return jvp_products.detach().to(torch.float64)

    def one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return losses_of(p, x.unsqueeze(0), y.unsqueeze(0)).sum()

    grads = vmap(grad(one), in_dims=(None, 0, 0))(detached, inputs, targets)
    products = torch.zeros(batch, dtype=torch.float64, device=inputs.device)
    for n in names:
        products += (grads[n].reshape(batch, -1) @ tangents[n].reshape(-1)).to(torch.float64)
    return products


def mask_noisy_samples(
    model: torch.nn.Module,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    clean: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    *,
    params: Iterable[str | torch.Tensor] | None = None,
    backend: str = "vmap",
) -> torch.Tensor:
    """Gradient-guided loss masking (Wang et al. 2021): the boolean mask (B,) of the noisy samples to keep,
    m_s = [⟨∇_θ ℓ_s, g_clean⟩ ≥ 0]. Arguments as in ``per_sample_clean_products``.

    Typical use: ``keep = mask_noisy_samples(model, per_sample_ce, x, y, clean_loss)``, then train on
    ``per_sample_ce(model(x), y)[keep].mean()``. ``GradSurgery(..., method="main_aux", main=0, mode="mask")``
    does the same inside ``backward`` from the loss vector's graph, without a functional model.
    """
    products = per_sample_clean_products(
        model, loss_fn, inputs, targets, clean, params=params, backend=backend
    )
    if not bool(torch.isfinite(products).all()):
        bad = torch.nonzero(~torch.isfinite(products)).reshape(-1).tolist()
        raise ValueError(f"non-finite per-sample gradient inner products at sample(s) {bad[:20]}")
    return products >= 0
