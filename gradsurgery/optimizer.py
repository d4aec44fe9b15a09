"""``GradSurgery``: wraps any ``torch.optim.Optimizer`` and fuses per-task gradients before it steps.

Pipeline of one ``backward(losses)``::

    losses ─autograd─▶ J (T×d, shared params) ─▶ G = J Jᵀ ─method─▶ w ─▶ u = Jᵀw ─▶ .grad ─▶ step()
           └─▶ task-specific gradients ───────────────────────────────────────────▶ .grad

Nothing is written to any ``.grad`` until every check has passed, so a failed call leaves the parameters,
their gradients and the method state as they were.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .collect import GradientCollector, TaskGradients
from .gram import gram_matrix
from .info import StepInfo
from .methods import Method, make_method
from .representation import representation_backward

STATE_KEY = "gradsurgery"
STATE_VERSION = 1


class GradSurgery(torch.optim.Optimizer):
    """Multi-task gradient combination around any optimizer.

    Args:
        optimizer: the wrapped ``torch.optim.Optimizer``; it performs the actual step.
        method: a method name (see ``gradsurgery.METHODS``) or a ``Method`` instance.
        shared_params: parameters that receive the fused gradient. By default a parameter is shared when
            two or more tasks reach it; a parameter reached by one task receives that task's gradient.
        num_tasks: the number of losses; taken from the first ``backward`` when omitted.
        gram_dtype: dtype in which the Gram matrix is accumulated and the method solved.
        **options: the method's options, e.g. ``solver="cvxpy"`` for ``"mgda"``.

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's own objects, so LR schedulers,
    ``GradScaler`` and gradient clipping see one optimizer.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        method: str | Method = "mgda",
        *,
        shared_params: Sequence[torch.Tensor] | None = None,
        num_tasks: int | None = None,
        gram_dtype: torch.dtype = torch.float64,
        **options: Any,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"GradSurgery wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, GradSurgery):
            raise TypeError("GradSurgery cannot wrap another GradSurgery")
        if num_tasks is not None and (isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1):
            raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
        if not isinstance(gram_dtype, torch.dtype) or not gram_dtype.is_floating_point:
            raise TypeError(f"gram_dtype must be a floating torch.dtype, got {gram_dtype!r}")
        self.method = make_method(method, **options)
        if shared_params is not None:
            shared_params = list(shared_params)
            known = {id(p) for g in optimizer.param_groups for p in g["params"]}
            strangers = [tuple(p.shape) for p in shared_params if id(p) not in known]
            if strangers:
                raise ValueError(f"shared_params has tensors the optimizer does not hold (shapes {strangers})")
        # The base initialiser creates the hook registries; the groups, state and defaults are then made the
        # wrapped optimizer's own objects (copies would break schedulers such as OneCycleLR).
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.optimizer = optimizer
        self._share_inner_state()
        self.collector = GradientCollector(shared_params)
        self.gram_dtype = gram_dtype
        if num_tasks is not None:
            self.method.bind(num_tasks)

    def _share_inner_state(self) -> None:
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.defaults = self.optimizer.defaults

    # -- the torch.optim.Optimizer surface ---------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The wrapped optimizer's step on the gradients ``backward`` wrote, then the method's own update
        (learnable task weights), which therefore happens only when the model really steps."""
        out = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.method.after_step()
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self.method.zero_grad()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Called by the base initialiser before ``self.optimizer`` exists: the groups are the inner's already.
        if "optimizer" in self.__dict__:
            self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus a ``"gradsurgery"`` entry with the method and its state."""
        sd = self.optimizer.state_dict()
        sd[STATE_KEY] = {
            "version": STATE_VERSION,
            "method": self.method.name,
            "options": dict(self.method.options),
            "num_tasks": self.method.num_tasks,
            "method_state": self.method.state_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        ours = state_dict.pop(STATE_KEY, None)
        if ours is not None:
            self._check_compatible(ours)
        self.optimizer.load_state_dict(state_dict)
        self._share_inner_state()
        if ours is not None:
            if ours["num_tasks"] is not None:
                self.method.bind(ours["num_tasks"])
                self.method.load_state_dict(ours["method_state"])

    def _check_compatible(self, ours: dict[str, Any]) -> None:
        if not isinstance(ours, dict) or ours.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported gradsurgery state version {ours.get('version')!r} (expected {STATE_VERSION})")
        if ours["method"] != self.method.name:
            raise ValueError(
                f"state dict is for method {ours['method']!r}, this optimizer uses {self.method.name!r}"
            )
        if ours["num_tasks"] is not None and self.method.num_tasks not in (None, ours["num_tasks"]):
            raise ValueError(
                f"state dict is for {ours['num_tasks']} tasks, this optimizer has {self.method.num_tasks}"
            )

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"GradSurgery(method={self.method!r}, optimizer={self.optimizer!r})"

    # -- the multi-task backward -------------------------------------------------------------------------
    def backward(
        self,
        losses: Sequence[torch.Tensor] | torch.Tensor,
        *,
        retain_graph: bool = False,
        features: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> StepInfo:
        """Fill ``.grad`` with the fused gradient of ``losses`` (T scalars) and return the step's ``StepInfo``.

        Shared parameters receive Σ_i w_i g_i with the method's weights w; a parameter reached by one task
        only receives that task's gradient. Gradients already in ``.grad`` are added to, as
        ``loss.backward()`` does. Raises ``ValueError`` (leaving everything untouched) on non-finite losses
        or gradients.

        ``features``: the shared representation z (a tensor or a sequence of tensors) that the task heads
        read. The weights then come from the task gradients with respect to z, and one backward pass fills
        every ``.grad`` (MGDA-UB, an approximation; see ``gradsurgery.representation``).
        """
        losses = self._check_losses(losses)
        if features is not None:
            return representation_backward(self, losses, features, retain_graph=retain_graph)
        if not self.method.needs_gram:
            return self._backward_weighted(losses, retain_graph)
        grads = self._collect(losses, retain_graph)
        gram = gram_matrix(grads.jacobian, self.gram_dtype)
        loss_values = torch.stack([loss.detach().reshape(()) for loss in losses]).to(self.gram_dtype)
        self._check_finite(loss_values, gram, grads)
        weights = self.method(gram, loss_values.to(gram.device))
        for p, g in self._fused_gradients(grads, weights):
            _accumulate(p, g)
        return StepInfo(
            weights=weights,
            losses=loss_values,
            gram=gram,
            method=self.method.name,
            extras=self.method.info_extras(),
        )

    def _backward_weighted(self, losses: list[torch.Tensor], retain_graph: bool) -> StepInfo:
        """Loss weightings that need no per-task gradient (``Method.needs_gram = False``, e.g. FAMO, RLW).

        The weights come from the loss values alone, so one backward pass of Σ_i w_i L_i gives every parameter
        Σ_i w_i g_i, exactly what the per-task path gives a loss weighting, for one backward instead of T and
        no T×d Jacobian. No Gram matrix is formed (``StepInfo.gram`` is None), and a loss that reaches no
        parameter is noticed only when none of them does. The method's state is restored when the gradients
        turn out non-finite, so a refused call changes nothing.
        """
        loss_values = torch.stack([loss.detach().reshape(()) for loss in losses]).to(self.gram_dtype)
        values = loss_values.tolist()
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"non-finite loss value(s) for task(s) {bad}: {values}")
        params = self._trainable_params()
        saved = copy.deepcopy(self.method.state_dict())
        weights = self.method(None, loss_values)
        try:
            total = sum(w.to(loss.dtype) * loss for w, loss in zip(weights.unbind(), losses, strict=True))
            grads = torch.autograd.grad(total, params, retain_graph=retain_graph, allow_unused=True)
            reached = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
            if not reached:
                raise ValueError("the losses reach none of the optimizer's parameters")
            if not bool(torch.stack([torch.isfinite(g).all() for _, g in reached]).all()):
                raise ValueError("non-finite (NaN/inf) gradient of the weighted loss; nothing was written")
        except BaseException:
            self.method.load_state_dict(saved)
            raise
        for p, g in reached:
            _accumulate(p, g)
        return StepInfo(
            weights=weights,
            losses=loss_values,
            gram=None,
            method=self.method.name,
            extras=self.method.info_extras(),
        )

    def _collect(self, losses: list[torch.Tensor], retain_graph: bool) -> TaskGradients:
        """Per-task gradients: the Jacobian over the shared parameters and the others' own gradients."""
        grads = self.collector.collect(losses, self._trainable_params(), retain_graph=retain_graph)
        self._check_reached(grads)
        return grads

    def _check_losses(self, losses: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        if isinstance(losses, torch.Tensor):
            if losses.dim() > 1:
                raise ValueError(f"losses must be a sequence or a 1-D tensor of scalars, got shape {tuple(losses.shape)}")
            losses = [losses] if losses.dim() == 0 else list(losses.unbind())
        elif not isinstance(losses, Sequence) or isinstance(losses, str):
            raise TypeError(f"losses must be a sequence of scalar tensors, got {type(losses).__name__}")
        losses = list(losses)
        if not losses:
            raise ValueError("backward needs at least one loss, got none")
        for i, loss in enumerate(losses):
            if not isinstance(loss, torch.Tensor):
                raise TypeError(f"loss {i} is a {type(loss).__name__}, not a tensor")
            if loss.numel() != 1:
                raise ValueError(f"loss {i} is not a scalar: shape {tuple(loss.shape)}")
            if not loss.requires_grad:
                raise ValueError(f"loss {i} does not require grad (was it computed under torch.no_grad()?)")
        expected = self.method.num_tasks
        if expected is not None and len(losses) != expected:
            raise ValueError(f"expected {expected} losses (the task count of method {self.method.name!r}), got {len(losses)}")
        self.method.bind(len(losses))
        return [loss.reshape(()) for loss in losses]

    def _trainable_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    @staticmethod
    def _check_reached(grads: TaskGradients) -> None:
        lost = [i for i, n in enumerate(grads.reached) if n == 0]
        if lost:
            raise ValueError(f"loss(es) {lost} reach none of the optimizer's parameters")

    @staticmethod
    def _check_finite(loss_values: torch.Tensor, gram: torch.Tensor, grads: TaskGradients) -> None:
        """One synchronisation for all checks; a non-finite gradient makes its Gram diagonal non-finite."""
        other_sq = [g.detach().double().pow(2).sum() for entries in grads.other for _, g in entries]
        checks = [loss_values.to(gram.device), gram.diagonal()]
        if other_sq:
            checks.append(torch.stack(other_sq).to(gram.device))
        if bool(torch.isfinite(torch.cat(checks)).all()):
            return
        bad_losses = [i for i, v in enumerate(loss_values.tolist()) if v != v or abs(v) == float("inf")]
        if bad_losses:
            raise ValueError(f"non-finite loss value(s) for task(s) {bad_losses}: {loss_values.tolist()}")
        diag = gram.diagonal().tolist()
        bad_tasks = {i for i, v in enumerate(diag) if not torch.isfinite(torch.tensor(v))}
        for entries in grads.other:
            bad_tasks |= {i for i, g in entries if not bool(torch.isfinite(g).all())}
        raise ValueError(f"non-finite (NaN/inf) gradient for task(s) {sorted(bad_tasks)}; nothing was written")

    def _fused_gradients(
        self, grads: TaskGradients, weights: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The new gradient of each reached parameter: u = Jᵀw for shared ones, Σ_i s_i g_i for the others
        (s_i = 1, or w_i for loss-weighting methods)."""
        layout, jac = grads.layout, grads.jacobian
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        if layout.shared:
            fused = weights.to(device=jac.device, dtype=jac.dtype) @ jac
            for slot, k in enumerate(layout.shared):
                p = layout.params[k]
                out.append((p, layout.segment(fused, slot).view_as(p)))
        scale = self.method.scales_task_specific
        for k, entries in enumerate(grads.other):
            if not entries:
                continue
            total = None
            for i, g in entries:
                g = g * weights[i].to(device=g.device, dtype=g.dtype) if scale else g
                total = g if total is None else total + g
            out.append((layout.params[k], total))
        return out


def _accumulate(p: torch.Tensor, grad: torch.Tensor) -> None:
    grad = grad.to(p.dtype)
    if p.grad is None:
        p.grad = grad.detach()
    else:
        p.grad.add_(grad)
