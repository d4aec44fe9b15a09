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

from . import amp
from .clean_guard import masked_main_loss
from .collect import GradientCollector, TaskGradients
from .distributed import DistributedSync, check_not_sharded, generators, layout_signature
from .gram import gram_matrix
from .info import StepInfo
from .l2 import make_l2_rule
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
        model: the ``DistributedDataParallel`` module (optional): gradients are averaged over its process
            group and the task gradients are taken inside its ``no_sync()``.
        process_group: the ``torch.distributed`` group to average over (default: the DDP module's group,
            else the default group).
        distributed: ``None`` (auto: average over the ranks whenever ``torch.distributed`` is initialised with
            more than one rank), ``True`` (require it) or ``False`` (each rank fuses its local gradients).
        dist_strategy: ``"allreduce"`` (all-reduce the T×d task-gradient matrix) or ``"sharded"``
            (reduce-scatter it, all-reduce the T×T Gram of the shards, all-gather the fused gradient);
            see ``gradsurgery.distributed`` for their communication cost.
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
        model: torch.nn.Module | None = None,
        process_group: Any = None,
        distributed: bool | None = None,
        dist_strategy: str = "allreduce",
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
        if num_tasks is not None and (
            isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1
        ):
            raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
        if not isinstance(gram_dtype, torch.dtype) or not gram_dtype.is_floating_point:
            raise TypeError(f"gram_dtype must be a floating torch.dtype, got {gram_dtype!r}")
        sync = DistributedSync(
            model=model, process_group=process_group, enabled=distributed, strategy=dist_strategy
        )
        check_not_sharded(p for g in optimizer.param_groups for p in g["params"])
        self.method = make_method(method, **options)
        self.l2 = make_l2_rule(self.method, optimizer, l2, l2_params, l2_per_tensor, l2_decoupled)
        if shared_params is not None:
            shared_params = list(shared_params)
            known = {id(p) for g in optimizer.param_groups for p in g["params"]}
            strangers = [tuple(p.shape) for p in shared_params if id(p) not in known]
            if strangers:
                raise ValueError(
                    f"shared_params has tensors the optimizer does not hold (shapes {strangers})"
                )
        # The base initialiser creates the hook registries; the groups, state and defaults are then made the
        # wrapped optimizer's own objects (copies would break schedulers such as OneCycleLR).
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.optimizer = optimizer
        self._share_inner_state()
        self.collector = GradientCollector(shared_params)
        self.gram_dtype = gram_dtype
        self.sync = sync
        if num_tasks is not None:
            self.method.bind(num_tasks)

    def _share_inner_state(self) -> None:
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.defaults = self.optimizer.defaults

    # -- the torch.optim.Optimizer surface ---------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The wrapped optimizer's step on the gradients ``backward`` wrote; then, with the decoupled L2
        rule, the correction of that step (``gradsurgery/l2.py``); then the method's own update (learnable
        task weights), which therefore happens only when the model really steps."""
        decoupled = self.l2 is not None and self.l2.decoupled
        before = self.l2.snapshot(self._trainable_params()) if decoupled else None
        out = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        if before is not None:
            self.l2.correct(before)
        self.method.after_step()
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self.method.zero_grad()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Called by the base initialiser before ``self.optimizer`` exists: the groups are the inner's already.
        if "optimizer" in self.__dict__:
            params = param_group.get("params") if isinstance(param_group, dict) else None
            if params is not None:
                check_not_sharded([params] if isinstance(params, torch.Tensor) else list(params))
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
            # Every generator the method holds, whether or not its own state_dict saves it.
            "rng_state": {name: gen.get_state() for name, gen in generators(self.method)},
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the wrapped optimizer and the method. A state dict from another method, task count or
        option set is refused before anything changes; a plain optimizer state dict restores the optimizer
        only.

        The wrapped optimizer's ``param_groups`` list and ``state`` dict keep their identity (they are
        refilled in place), so every holder of a reference (schedulers, framework proxies) sees the restored
        values.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        ours = state_dict.pop(STATE_KEY, None)
        restored = None
        if ours is not None:
            self._check_compatible(ours)
            if ours["num_tasks"] is not None:
                # Rehearse on a copy: a malformed method state fails here, before the optimizer is touched.
                restored = copy.deepcopy(self.method)
                _load_method(restored, ours)
        groups, state = self.optimizer.param_groups, self.optimizer.state
        self.optimizer.load_state_dict(state_dict)
        if self.optimizer.param_groups is not groups:
            groups[:] = self.optimizer.param_groups
            self.optimizer.param_groups = groups
        if self.optimizer.state is not state:
            fresh = self.optimizer.state
            state.clear()
            state.update(fresh)
            self.optimizer.state = state
        if restored is not None:
            _load_method(self.method, ours)

    def _check_compatible(self, ours: dict[str, Any]) -> None:
        if not isinstance(ours, dict) or ours.get("version") != STATE_VERSION:
            version = ours.get("version") if isinstance(ours, dict) else ours
            raise ValueError(f"unsupported gradsurgery state version {version!r} (expected {STATE_VERSION})")
        if ours["method"] != self.method.name:
            raise ValueError(
                f"state dict is for method {ours['method']!r}, this optimizer uses {self.method.name!r}"
            )
        if ours["num_tasks"] is not None and self.method.num_tasks not in (None, ours["num_tasks"]):
            raise ValueError(
                f"state dict is for {ours['num_tasks']} tasks, this optimizer has {self.method.num_tasks}"
            )
        # The seed only picks the initial generator state, which the checkpoint replaces anyway.
        theirs = {k: v for k, v in dict(ours.get("options", {})).items() if k != "seed"}
        mine = {k: v for k, v in self.method.options.items() if k != "seed"}
        differ = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
        if differ:
            detail = ", ".join(f"{k}: saved {theirs.get(k)!r} vs {mine.get(k)!r}" for k in differ)
            raise ValueError(f"state dict is for different {self.method.name!r} options ({detail})")

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"GradSurgery(method={self.method!r}, optimizer={self.optimizer!r})"

    # -- the multi-task backward -------------------------------------------------------------------------
    # Never traced by torch.compile: the methods run NumPy/SciPy/cvxpy on the host and the gradients are
    # taken with autograd.grad, so a compiled training step runs this part eagerly (its model still compiles).
    @torch.compiler.disable
    def backward(
        self,
        losses: Sequence[torch.Tensor] | torch.Tensor,
        *,
        retain_graph: bool = False,
        features: torch.Tensor | Sequence[torch.Tensor] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> StepInfo:
        """Fill ``.grad`` with the fused gradient of ``losses`` (T scalars); return the step's ``StepInfo``.

        Shared parameters receive Σ_i w_i g_i with the method's weights w; a parameter reached by one task
        only receives that task's gradient. Gradients already in ``.grad`` are added to, as
        ``loss.backward()`` does: k calls before one ``step`` accumulate k fused gradients (the fusion is per
        micro-batch). Raises ``ValueError`` (leaving everything untouched) on non-finite losses or gradients.

        ``grad_scaler``: a ``torch.amp.GradScaler``; each task loss is scaled, each task gradient unscaled
        before the fusion and the fused gradient scaled back (see ``gradsurgery.amp``). An overflowed step
        writes inf to ``.grad`` (so ``scaler.step`` skips it), leaves the method state alone and returns an
        info with ``overflow=True`` and NaN weights.

        Under data parallelism (see ``gradsurgery.distributed``) every rank fuses the rank-averaged
        gradients and gets the same weights and ``.grad``.

        ``features``: the shared representation z (a tensor or a sequence of tensors) that the task heads
        read. The weights then come from the task gradients with respect to z, and one backward pass fills
        every ``.grad`` (MGDA-UB, an approximation; see ``gradsurgery.representation``). Not combined with
        ``grad_scaler`` or data parallelism yet.

        With ``method="main_aux", mode="mask"`` the main loss is a 1-D tensor of per-sample losses and the
        samples whose gradient conflicts with the auxiliary's are dropped first (``info.sample_mask``).
        """
        scaler = amp.active_scaler(grad_scaler)
        group = self.sync.group()
        if features is not None:
            if scaler is not None or group is not None or self._direct_l2:
                raise ValueError(
                    "representation mode (features=) does not support grad_scaler=, distributed training "
                    "or the direct l2 rule yet; use the full mode (no features=)"
                )
            losses = self._check_losses(losses)
            return representation_backward(self, losses, features, retain_graph=retain_graph)
        sample_mask = None
        if getattr(self.method, "mode", None) == "mask":
            losses, sample_mask = masked_main_loss(
                losses, self.method.main, self._trainable_params(), self.collector.shared_override
            )
        device = self._device()
        scale = None
        weighted = not self.method.needs_gram
        try:
            losses = self._check_losses(losses)
            grads = None
            if not weighted:
                grad_losses = losses
                if scaler is not None:
                    grad_losses, scale = amp.scale_losses(losses, scaler)
                grads = self._collect(grad_losses, retain_graph)
        except (TypeError, ValueError) as err:
            if group is not None:
                self.sync.agree(group, device, failure=err)  # the other ranks stop too, then this raises err
            raise
        num_tasks = len(losses)
        if group is not None:
            signature = 0 if grads is None else layout_signature(grads, num_tasks)
            self.sync.agree(group, device, num_tasks=num_tasks, signature=signature)
        self.method.bind(num_tasks)
        if weighted:
            return self._backward_weighted(losses, retain_graph, scaler=scaler, group=group, device=device)
        if scale is not None:
            amp.unscale(grads, scale)
        loss_values = torch.stack([loss.detach().reshape(()) for loss in losses]).to(self.gram_dtype)
        shard = None
        if group is None:
            gram = gram_matrix(grads.jacobian, self.gram_dtype)
        else:
            self.sync.share_rng(self.method, group, device)
            if self.sync.strategy == "sharded":
                shard, gram, loss_values = self.sync.sharded_gram(group, grads, loss_values, self.gram_dtype)
            else:
                loss_values = self.sync.allreduce(group, grads, loss_values)
                gram = gram_matrix(grads.jacobian, self.gram_dtype)
        if scale is not None and not amp.all_finite(loss_values, gram, grads):
            amp.mark_overflow(amp.reached_params(grads))
            return self._overflow_info(loss_values, gram)
        self._check_finite(loss_values, gram, grads)
        weights = self.method(gram, loss_values.to(gram.device))
        fused = None
        if shard is not None:
            fused = self.sync.gather_fused(group, shard, weights, grads.layout.dim)
        new_grads, l2_coefficient = self._apply_l2(self._fused_gradients(grads, weights, fused))
        for p, g in new_grads:
            _accumulate(p, g if scale is None else g * scale)
        return StepInfo(
            weights=weights,
            losses=loss_values,
            gram=gram,
            method=self.method.name,
            extras=self.method.info_extras(),
            l2_coefficient=l2_coefficient,
            sample_mask=sample_mask,
        )

    @property
    def _direct_l2(self) -> bool:
        return self.l2 is not None and not self.l2.decoupled

    def _apply_l2(self, new_grads):
        """The direct L2 rule on this backward's new gradient contributions (identity without it)."""
        if not self._direct_l2:
            return new_grads, None
        return self.l2.transform(new_grads)

    def _backward_weighted(
        self,
        losses: list[torch.Tensor],
        retain_graph: bool,
        *,
        scaler: torch.amp.GradScaler | None = None,
        group: Any = None,
        device: torch.device | None = None,
    ) -> StepInfo:
        """Loss weightings that need no per-task gradient (``Method.needs_gram = False``, e.g. FAMO, RLW).

        The weights come from the loss values alone, so one backward pass of Σ_i w_i L_i gives every parameter
        Σ_i w_i g_i, exactly what the per-task path gives a loss weighting, for one backward instead of T and
        no T×d Jacobian. No Gram matrix is formed (``StepInfo.gram`` is None), and a loss that reaches no
        parameter is noticed only when none of them does. The method's state is restored when the gradients
        turn out non-finite, so a refused call changes nothing.

        With a GradScaler the weighted loss is scaled (the weights do not depend on the gradients, so this
        equals scaling each loss) and an overflow restores the method's state. Under data parallelism the
        loss values are averaged over the ranks before the weights are computed, and the gradient after.
        """
        loss_values = torch.stack([loss.detach().reshape(()) for loss in losses]).to(self.gram_dtype)
        if group is not None:
            self.sync.share_rng(self.method, group, device)
            loss_values = self.sync.average(group, loss_values)
        values = loss_values.tolist()
        params = self._trainable_params()
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            if scaler is None:
                raise ValueError(f"non-finite loss value(s) for task(s) {bad}: {values}")
            amp.mark_overflow(params)
            return self._overflow_info(loss_values, None)
        saved = copy.deepcopy(self.method.state_dict())
        weights = self.method(None, loss_values)
        try:
            total = sum(w.to(loss.dtype) * loss for w, loss in zip(weights.unbind(), losses, strict=True))
            if scaler is not None:
                total = scaler.scale(total)  # .grad then holds s·Σ w_i g_i, as GradScaler expects
            with self.sync.no_sync():
                grads = torch.autograd.grad(total, params, retain_graph=retain_graph, allow_unused=True)
            if group is not None:
                grads = self.sync.average_gradients(group, params, grads)
            reached = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
            if not reached:
                raise ValueError("the losses reach none of the optimizer's parameters")
            if not bool(torch.stack([torch.isfinite(g).all() for _, g in reached]).all()):
                if scaler is None:
                    raise ValueError(
                        "non-finite (NaN/inf) gradient of the weighted loss; nothing was written"
                    )
                self.method.load_state_dict(saved)
                amp.mark_overflow(p for p, _ in reached)
                return self._overflow_info(loss_values, None)
        except BaseException:
            self.method.load_state_dict(saved)
            raise
        reached, l2_coefficient = self._apply_l2(reached)
        for p, g in reached:
            _accumulate(p, g)
        return StepInfo(
            weights=weights,
            losses=loss_values,
            gram=None,
            method=self.method.name,
            extras=self.method.info_extras(),
            l2_coefficient=l2_coefficient,
        )

    def _overflow_info(self, loss_values: torch.Tensor, gram: torch.Tensor | None) -> StepInfo:
        nan = torch.full(
            (len(loss_values),), float("nan"), dtype=loss_values.dtype, device=loss_values.device
        )
        return StepInfo(weights=nan, losses=loss_values, gram=gram, method=self.method.name, overflow=True)

    def _device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    def _collect(self, losses: list[torch.Tensor], retain_graph: bool) -> TaskGradients:
        """Per-task gradients: the Jacobian over the shared parameters and the others' own gradients."""
        with self.sync.no_sync():
            grads = self.collector.collect(losses, self._trainable_params(), retain_graph=retain_graph)
        self._check_reached(grads)
        return grads

    def _check_losses(self, losses: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        if isinstance(losses, torch.Tensor):
            if losses.dim() > 1:
                raise ValueError(
                    f"losses must be a sequence or a 1-D tensor of scalars, got shape {tuple(losses.shape)}"
                )
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
            raise ValueError(
                f"expected {expected} losses (the task count of method {self.method.name!r}), "
                f"got {len(losses)}"
            )
        if expected is None:
            # Validate the task count now; binding waits until every check (and every rank) has agreed.
            self.method._check_num_tasks(len(losses))
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
        raise ValueError(
            f"non-finite (NaN/inf) gradient for task(s) {sorted(bad_tasks)}; nothing was written"
        )

    def _fused_gradients(
        self, grads: TaskGradients, weights: torch.Tensor, fused: torch.Tensor | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The new gradient of each reached parameter: u = Jᵀw for shared ones, Σ_i s_i g_i for the others
        (s_i = 1, or w_i for loss-weighting methods). ``fused``: u already formed (the sharded path)."""
        layout, jac = grads.layout, grads.jacobian
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        if layout.shared:
            if fused is None:
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


def _load_method(method: Method, ours: dict[str, Any]) -> None:
    """Bind ``method`` to the saved task count and restore its state and generators."""
    try:
        method.bind(ours["num_tasks"])
        method.load_state_dict(ours["method_state"])
        gens = dict(generators(method))
        for name, state in dict(ours.get("rng_state") or {}).items():
            if name not in gens:
                raise KeyError(f"the method has no generator {name!r}")
            gens[name].set_state(state)
    except (KeyError, TypeError, RuntimeError, AttributeError) as err:
        raise ValueError(f"malformed gradsurgery method state for {method.name!r}: {err}") from err


def _accumulate(p: torch.Tensor, grad: torch.Tensor) -> None:
    grad = grad.to(p.dtype)
    if p.grad is None:
        p.grad = grad.detach()
    else:
        p.grad.add_(grad)
