"""``GradSurgery``: wraps any ``torch.optim.Optimizer`` and fuses per-task gradients before it steps.

Pipeline of one ``backward(losses)``::

    losses ─autograd─▶ J (T×d, shared params) ─▶ G = J Jᵀ ─method─▶ w ─▶ u = Jᵀw ─▶ .grad ─▶ step()
           └─▶ task-specific gradients ───────────────────────────────────────────▶ .grad

Nothing is written to any ``.grad`` until every check has passed, so a failed call leaves the parameters,
their gradients and the method state as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .clean_guard import masked_main_loss
from .collect import GradientCollector, TaskGradients
from .info import StepInfo
from .l2 import make_l2_rule
from .methods import Method, make_method

STATE_KEY = "gradsurgery"
STATE_VERSION = 1


def gram_matrix(jacobian: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """G = J Jᵀ accumulated in ``dtype`` (float64 by default: small inner products survive large d)."""
    j = jacobian.to(dtype)
    return j @ j.T


class GradSurgery(torch.optim.Optimizer):
    """Multi-task gradient combination around any optimizer.

    Args:
        optimizer: the wrapped ``torch.optim.Optimizer``; it performs the actual step.
        method: a method name (see ``gradsurgery.METHODS``) or a ``Method`` instance.
        shared_params: parameters that receive the fused gradient. By default a parameter is shared when
            two or more tasks reach it; a parameter reached by one task receives that task's gradient.
        num_tasks: the number of losses; taken from the first ``backward`` when omitted.
        gram_dtype: dtype in which the Gram matrix is accumulated and the method solved.
        l2: add the λ-free L2 auxiliary (``gradsurgery/l2.py``) to the fused gradient of any method:
            u ← u + relu(−⟨u, θ⟩)/‖θ‖² · θ. ``l2_params`` (default: every parameter with dim ≥ 2),
            ``l2_per_tensor`` (default False) and ``l2_decoupled`` (default False; True corrects the
            optimizer's step instead of the gradient) are its options; ``method="l2"`` is the same rule for
            a single loss.
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
        l2: bool = False,
        l2_params: Sequence[torch.Tensor] | None = None,
        l2_per_tensor: bool | None = None,
        l2_decoupled: bool | None = None,
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
        self.l2 = make_l2_rule(self.method, optimizer, l2, l2_params, l2_per_tensor, l2_decoupled)
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
        """The wrapped optimizer's step on the gradients ``backward`` wrote; then, with the decoupled L2
        rule, the correction of that step (``gradsurgery/l2.py``)."""
        decoupled = self.l2 is not None and self.l2.decoupled
        before = self.l2.snapshot(self._trainable_params()) if decoupled else None
        result = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        if before is not None:
            self.l2.correct(before)
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

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
    def backward(self, losses: Sequence[torch.Tensor] | torch.Tensor, *, retain_graph: bool = False) -> StepInfo:
        """Fill ``.grad`` with the fused gradient of ``losses`` (T scalars) and return the step's ``StepInfo``.

        Shared parameters receive Σ_i w_i g_i with the method's weights w; a parameter reached by one task
        only receives that task's gradient. Gradients already in ``.grad`` are added to, as
        ``loss.backward()`` does. Raises ``ValueError`` (leaving everything untouched) on non-finite losses
        or gradients.

        With ``method="main_aux", mode="mask"`` the main loss is a 1-D tensor of per-sample losses and the
        samples whose gradient conflicts with the auxiliary's are dropped first (``info.sample_mask``).
        """
        sample_mask = None
        if getattr(self.method, "mode", None) == "mask":
            losses, sample_mask = masked_main_loss(
                losses, self.method.main, self._trainable_params(), self.collector.shared_override
            )
        losses = self._check_losses(losses)
        grads = self._collect(losses, retain_graph)
        gram = gram_matrix(grads.jacobian, self.gram_dtype)
        loss_values = torch.stack([loss.detach().reshape(()) for loss in losses]).to(self.gram_dtype)
        self._check_finite(loss_values, gram, grads)
        weights = self.method(gram, loss_values.to(gram.device))
        fused = self._fused_gradients(grads, weights)
        l2_coefficient = None
        if self.l2 is not None and not self.l2.decoupled:
            fused, l2_coefficient = self.l2.transform(fused)
        for p, g in fused:
            _accumulate(p, g)
        return StepInfo(
            weights=weights, losses=loss_values, gram=gram, method=self.method.name,
            l2_coefficient=l2_coefficient, sample_mask=sample_mask,
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
