"""``GradSurgery``: wraps any ``torch.optim.Optimizer`` and fuses per-task gradients before it steps.

One ``backward(losses)`` is a pipeline of stages, each chosen when the optimizer is built (or by the call's
arguments: ``features=`` picks representation mode, ``grad_scaler=`` the loss scaling)::

    losses ─prepare─▶ T scalars ─source─▶ G (T×T), losses ─reduction─▶ averaged over ranks ─method─▶ w
           ─source─▶ new gradients ─post-transforms─▶ (λ-free L2) ─write-back─▶ .grad ─▶ step()

Nothing is written to any ``.grad`` until every check has passed, and the method runs inside its
transaction, so a failed call leaves the parameters, their gradients and the method state as they were.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from . import checkpoint
from ._validation import check_bool, check_choice, check_int, check_tensors
from .amp import LossScaling, autocast_off, mark_overflow
from .distributed import DistributedSync, fsdp_mesh, is_ddp
from .evidence import EvidenceRule
from .info import StepInfo
from .l2 import L2Rule
from .losses import MaskedLosses, PlainLosses, PresentTasks, absent_tasks, align, check_scalars
from .methods import METHODS, Method, make_method
from .sources import NonFiniteError, holds_reentrant_checkpoint
from .sources.features import FeatureSource, TaskViews
from .sources.fsdp import FSDPFeatureSource, FSDPSource
from .sources.jacobian import JacobianSource
from .sources.weighted import WeightedSource
from .sparse import check_sparse_support, sparse_tables
from .writeback import accumulate

STATE_KEY = checkpoint.STATE_KEY
STATE_VERSION = checkpoint.STATE_VERSION


def _run_eagerly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compiler.disable(fn)``, built at the first call that needs it: it imports torch._dynamo (about
    a second), which ``import gradsurgery`` should not pay for. Where no compiled frame is running (torch's
    frame-evaluation callback is unset) and nothing is being exported, nothing can trace ``fn``, and it is
    called directly: the disabling wrapper swaps that callback twice per call, 30-90 µs of a small model's
    step measured in situ."""
    disabled: list[Callable[..., Any]] = []
    # Looked up once (the frame callback is private to torch): where a torch lacks either, every call takes
    # the wrapper.
    eval_frame = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
    callback = getattr(eval_frame, "get_eval_frame_callback", None)
    exporting = getattr(torch.compiler, "is_exporting", None)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # Under tracing, is_compiling() is True and the callback is not asked for (Dynamo cannot trace it).
        if not torch.compiler.is_compiling() and callback is not None and exporting is not None:
            if callback() is None and not exporting():
                return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return wrapper


class GradSurgery(torch.optim.Optimizer):
    """Multi-task gradient combination around any optimizer.

    Args:
        optimizer: the wrapped ``torch.optim.Optimizer``; it performs the actual step.
        method: a method name (see ``gradsurgery.METHODS``) or a ``Method`` instance. The default,
            ``"cagrad"``, is the method that was never worse than equal weights beyond the seed spread on
            any metric of the benchmark suite's problems and the best of those on average (see the
            documentation's "Choosing a method").
        shared_params: parameters that receive the fused gradient. By default a parameter is shared when
            two or more tasks reach it; a parameter reached by one task receives that task's gradient.
        num_tasks: the number of losses; taken from the first ``backward`` when omitted.
        gram_dtype: dtype in which the Gram matrix is accumulated and the method solved.
        model: the model (or its ``DistributedDataParallel`` wrapper), optional. With it the exact full mode
            can take the gradients from the layers' activations instead of materialising every task's
            gradient (``gradient_source``); a DDP module also sets the process group to average over, and
            the task gradients are taken inside its ``no_sync()``.
        gradient_source: where full mode gets the task gradients: ``"jacobian"`` (one backward per task
            over the parameters, the T×d Jacobian of the shared ones), ``"activations"`` (the Gram matrix
            from each supported layer's inputs and output gradients; memory follows the activations, sparse
            embedding tables work; needs ``model``; see ``gradsurgery.sources.activation``) or ``"auto"``
            (the activations when ``model`` is given and they pay off: sparse tables, or a model that is not
            mostly convolutions and not data-parallel; see ``activations_pay_off``; and then, step by step,
            the Jacobian when the layer outputs the activations need hold more numbers than the shared
            parameters, as in a transformer at many tokens per batch). ``info.source`` says which ran.
        activation_form: ``"auto"``, ``"kernel"`` or ``"materialize"``: how the activation source forms
            each layer's contribution to G (``"auto"``: the one with fewer flops, per layer).
        activation_memory: bytes of per-task layer-output gradients the activation source holds at once
            (default None: all of them, one backward pass per task). A budget splits the per-task passes
            into chunks of layers, taken right before their contributions to G: memory near the budget,
            more backward passes, the same G. Implies the activation source at every step (a ValueError
            where it cannot run); the methods that take one backward of Σ w_i L_i (``rlw``, ``famo``,
            ``sum``) run no per-task pass, so it has nothing to bound there.
        process_group: the ``torch.distributed`` group to average over (default: the DDP module's group,
            the FSDP2 mesh's group for ``fully_shard`` parameters, else the default group).
        distributed: ``None`` (auto: average over the ranks whenever ``torch.distributed`` is initialised with
            more than one rank), ``True`` (require it) or ``False`` (each rank fuses its local gradients).
        dist_strategy: ``"allreduce"`` (all-reduce the T×d task-gradient matrix) or ``"sharded"``
            (reduce-scatter it, all-reduce the T×T Gram of the shards, all-gather the fused gradient);
            see ``gradsurgery.distributed`` for their communication cost.
        l2: add the λ-free L2 auxiliary (``gradsurgery/l2.py``) to the fused gradient of any method:
            u ← u + relu(−⟨u, θ⟩)/‖θ‖² · θ. ``l2_params`` (default: every parameter with dim ≥ 2),
            ``l2_per_tensor`` (default: per tensor for adaptive optimizers, one global rule for SGD) and
            ``l2_decoupled`` (default True: the rule corrects the optimizer's step; False: the gradient) are
            its options; ``method="l2"`` is the same rule for a single loss (and, with ``evidence=True``, the
            evidence λ for SGD, ``gradsurgery/evidence.py``).
        **options: the method's options, e.g. ``solver="cvxpy"`` for ``"mgda"``.

    FSDP2 (``fully_shard``) parameters are recognised by themselves: each task's gradient is read from the
    shards FSDP reduce-scatters and G is summed over the ranks (``gradsurgery.sources.fsdp``).

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's own objects, so LR schedulers,
    ``GradScaler`` and gradient clipping see one optimizer.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        method: str | Method = "cagrad",
        *,
        shared_params: Sequence[torch.Tensor] | None = None,
        num_tasks: int | None = None,
        gram_dtype: torch.dtype = torch.float64,
        model: torch.nn.Module | None = None,
        process_group: Any = None,
        distributed: bool | None = None,
        dist_strategy: str = "allreduce",
        gradient_source: str = "auto",
        activation_form: str = "auto",
        activation_memory: int | None = None,
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
        if num_tasks is not None:
            num_tasks = check_int(num_tasks, "num_tasks", minimum=1)
        if not isinstance(gram_dtype, torch.dtype) or not gram_dtype.is_floating_point:
            raise TypeError(f"gram_dtype must be a floating torch.dtype, got {gram_dtype!r}")
        sync = DistributedSync(
            model=model, process_group=process_group, enabled=distributed, strategy=dist_strategy
        )
        held = [p for g in optimizer.param_groups for p in g["params"]]
        mesh = fsdp_mesh(held)
        if mesh is not None:
            sync.use_mesh(mesh)
        self.method = make_method(method, **options)
        _check_direction(self.method, optimizer.param_groups)
        transforms = self.method.transforms() + _l2_option(
            self.method, l2, l2_params, l2_per_tensor, l2_decoupled
        )
        for transform in transforms:
            transform.setup(optimizer)
        if shared_params is not None:
            shared_params = check_tensors(shared_params, "shared_params")
            known = {id(p) for p in held}
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
        self.gram_dtype = gram_dtype
        self.sync = sync
        self.shared_ids = None if shared_params is None else {id(p) for p in shared_params}
        self.transforms = transforms
        self.source = _full_mode_source(
            self.method,
            model,
            gradient_source,
            activation_form,
            shared_params,
            gram_dtype,
            optimizer,
            dist_strategy,
            sharded=mesh is not None,
            activation_memory=activation_memory,
        )
        # The parameters that got no gradient in a step whose graph held no reentrant checkpoint (a set
        # changed in place: Lightning's optimizer proxy shares this object but not later assignments).
        self._cleared_unreached: set[int] = set()
        main = self.method.per_sample_task
        self.prepare = PlainLosses() if main is None else MaskedLosses(main, self.shared_ids)
        if num_tasks is not None:
            self.method.bind(num_tasks)

    def _share_inner_state(self) -> None:
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.defaults = self.optimizer.defaults

    @property
    def l2(self) -> L2Rule | EvidenceRule | None:
        """The λ-free L2 rule in effect (from ``method="l2"`` or ``l2=True``), or None."""
        return next((t for t in self.transforms if isinstance(t, L2Rule | EvidenceRule)), None)

    # -- the torch.optim.Optimizer surface ---------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The wrapped optimizer's step on the gradients ``backward`` wrote; then the step corrections of the
        post-transforms (the decoupled L2 rule, ``gradsurgery/l2.py``); then the method's own update
        (learnable task weights), which therefore happens only when the model really steps."""
        params = self._trainable_params() if self.transforms else []
        before = [t.before_step(params) for t in self.transforms]
        out = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        for transform, token in zip(self.transforms, before, strict=True):
            transform.after_step(token)
        self.method.after_step()
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self.method.zero_grad()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Called by the base initialiser before ``self.optimizer`` exists: the groups are the inner's already.
        if "optimizer" in self.__dict__:
            params = param_group.get("params") if isinstance(param_group, dict) else None
            if params is not None and not isinstance(params, set):  # the inner optimizer refuses a set
                if isinstance(params, torch.Tensor):
                    added = [params]
                else:  # read once, here: a generator (model.parameters()) would reach the optimizer empty
                    added = param_group["params"] = list(params)
                # Refuses a group that mixes FSDP2 shards with plain tensors or brings another mesh.
                fsdp_mesh(self._all_params() + added)
                complex_shapes = _complex_shapes(p for p in added if isinstance(p, torch.Tensor))
                if complex_shapes and self.source.name == "activations":
                    raise ValueError(_COMPLEX_ACTIVATIONS.format(complex_shapes))
            self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus a ``"gradsurgery"`` entry with the method and its state.
        Hooks registered on this optimizer (``register_state_dict_pre_hook``/``_post_hook``) run as
        ``torch.optim.Optimizer.state_dict`` runs them; the wrapped optimizer's run inside its own call."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self.optimizer.state_dict()
        sd[STATE_KEY] = checkpoint.method_entry(self.method)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the wrapped optimizer and the method. A state dict from another method, task count or
        option set is refused before anything changes; a plain optimizer state dict restores the optimizer
        only; a version-1 state dict (gradsurgery 0.1.0) is read as well.

        The wrapped optimizer's ``param_groups`` list and ``state`` dict keep their identity (they are
        refilled in place), so every holder of a reference (schedulers, framework proxies) sees the restored
        values. Hooks registered on this optimizer (``register_load_state_dict_pre_hook``/``_post_hook``)
        run as ``torch.optim.Optimizer.load_state_dict`` runs them.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = dict(result)
        ours = state_dict.pop(STATE_KEY, None)
        restored = None
        if ours is not None:
            ours = checkpoint.check_compatible(self.method, ours)
            restored = checkpoint.rehearse(self.method, ours)
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
            checkpoint.load_method(self.method, ours)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def method_state_dict(self) -> dict[str, Any]:
        """The method's entry of ``state_dict()`` (its ``"gradsurgery"`` key) on its own, for checkpointers
        that keep only an optimizer's ``"state"`` and ``"param_groups"``: ``torch.distributed.checkpoint``'s
        ``get_optimizer_state_dict`` and ``get_state_dict`` drop every other key. Tensors and Python
        primitives only; the same on every data-parallel rank."""
        return checkpoint.method_entry(self.method)

    def load_method_state_dict(self, entry: dict[str, Any]) -> None:
        """Restore what ``method_state_dict`` returned, leaving the wrapped optimizer alone. An entry from
        another method, task count or option set is refused with ``ValueError`` before anything changes, as
        ``load_state_dict`` refuses it."""
        if not isinstance(entry, dict):
            raise TypeError(f"entry must be a dict (from method_state_dict()), got {type(entry).__name__}")
        ours = checkpoint.check_compatible(self.method, entry)
        if checkpoint.rehearse(self.method, ours) is not None:
            checkpoint.load_method(self.method, ours)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"GradSurgery(method={self.method!r}, optimizer={self.optimizer!r})"

    # -- the multi-task backward -------------------------------------------------------------------------
    # Never traced by torch.compile: the methods run NumPy/SciPy on the host and the gradients are taken
    # with autograd.grad, so a compiled training step runs this part eagerly (its model still compiles).
    @_run_eagerly
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
        every ``.grad`` (MGDA-UB, an approximation; see ``gradsurgery.sources.features``); under data
        parallelism, that of one process on the concatenated batch. A loss weighting that reads only the
        losses (``needs_gram`` False) takes full mode's one backward of Σ w_i L_i instead: the same gradients,
        no G_z (``diagnostics=True`` forms it).

        With ``method="main_aux", mode="mask"`` the main loss is a 1-D tensor of per-sample losses and the
        samples whose gradient conflicts with the auxiliary's are dropped first (``info.sample_mask``).

        Called inside an autocast region or under ``torch.no_grad()``, it runs with autocast off
        (``gradsurgery.amp.autocast_off``) and gradients on: the same step as when called outside them.
        """
        device = self._device()
        with autocast_off("cpu", device.type), torch.enable_grad():
            return self._backward(losses, retain_graph, features, grad_scaler, device)

    def _backward(
        self,
        losses: Sequence[torch.Tensor] | torch.Tensor,
        retain_graph: bool,
        features: torch.Tensor | Sequence[torch.Tensor] | None,
        grad_scaler: torch.amp.GradScaler | None,
        device: torch.device,
    ) -> StepInfo:
        scaling = LossScaling.of(grad_scaler)
        reduction = self.sync.reduction(device)
        params = self._trainable_params()
        try:
            _check_direction(self.method, self.param_groups)
            for transform in self.transforms:
                transform.begin_backward(scaling=scaling, reduction=reduction)
            tasks, names, sample_mask, present = self._prepare_losses(losses, params, reduction)
            source = self._source_for(features, present)
            if source.collectives_in_collect:
                reduction.agree(len(tasks), signature=0)
            step = source.collect(tasks, params, scaling, retain_graph, reduction.no_sync)
            if present is not None and reduction.spans_ranks:
                step.absent_on_this_rank(present)
        except (TypeError, ValueError) as err:
            reduction.fail(err)  # the other ranks stop too
            raise
        reduction.agree(step.num_tasks, step.signature())
        reduction.share_rng(self.method)
        try:
            with self.method.transaction():
                self.method.bind(step.num_tasks if present is None else present.num_tasks, names)
                step.reduce(reduction)
                if present is not None and reduction.spans_ranks:
                    present = step.tasks_present  # the tasks some rank has: see sources.weighted
                    if present is not None and not self.method.skips_absent_tasks:
                        missing = sorted(set(range(present.num_tasks)) - set(present.indices))
                        raise ValueError(
                            f"no rank has a loss for task(s) {missing}, which method {self.method.name!r} "
                            "cannot take: some rank must pass each task's loss"
                        )
                step.check_finite()
                if present is None:
                    weights = self.method(step.gram, step.loss_values)
                else:
                    weights = self.method.weights_of(present.indices, step.gram, step.loss_values)
                pairs = step.gradients(weights)
                self._check_unreached(pairs, params, tasks)
                new_grads, fields = self._post_transform(pairs)
                accumulate(new_grads, scaling)
        except NonFiniteError as err:
            if scaling is None:
                raise
            mark_overflow(err.params)
            weights, fields = None, {"overflow": True}
        return self._info(step, weights, fields, sample_mask, present)

    def _prepare_losses(
        self, losses: Any, params: list[torch.Tensor], reduction: Any
    ) -> tuple[list[torch.Tensor], Any, Any, PresentTasks | None]:
        """The loss-preparation stage, then the validated scalars of the tasks present in task order, their
        names, the sample mask and which tasks are present (None: all of them); the task count and names
        are checked against the method, which is not bound yet."""
        method = self.method
        if absent_tasks(losses):
            if reduction.spans_ranks and isinstance(self.source, FSDPSource):
                raise ValueError(
                    "a loss is None (a task absent on this rank): under FSDP2 (fully_shard) every rank "
                    "passes every task's loss"
                )
            if reduction.spans_ranks and method.needs_gram:
                raise ValueError(
                    f"a loss is None (a task absent on this rank): under data parallelism only the loss "
                    f"weightings that take one backward pass take it ({weighted_methods()}, without "
                    f"diagnostics=True); with method {method.name!r} every rank passes every task's loss"
                )
            if not (reduction.spans_ranks or method.skips_absent_tasks):
                raise ValueError(
                    f"a loss is None (a task absent from this step), which method {method.name!r} cannot "
                    "take: its weights follow every task from step to step, or its options are set for all "
                    f"of them. Methods that take a step with tasks absent (default options): "
                    f"{skipping_methods()}"
                )
        losses, names, sample_mask = self.prepare(losses, params)
        ordered = align(check_scalars(losses), names, method.num_tasks, method.task_names, method.name)
        if method.num_tasks is None:
            method.check_num_tasks(len(ordered), names)
        present = PresentTasks.of(ordered)
        tasks = [loss for loss in ordered if loss is not None]
        return tasks, method.task_names or names, sample_mask, present

    def _source_for(self, features: Any, present: PresentTasks | None) -> Any:
        if features is None:
            return self.source
        for transform in self.transforms:
            transform.check_representation_mode()
        if present is not None and isinstance(features, TaskViews):
            features = features.of_tasks(present.indices)
        kind = FSDPFeatureSource if isinstance(self.source, FSDPSource) else FeatureSource
        return kind(features, self.gram_dtype, self.method.scales_task_specific, self.method.needs_gram)

    def _info(
        self,
        step: Any,
        weights: torch.Tensor | None,
        fields: dict[str, Any],
        sample_mask: Any,
        present: PresentTasks | None,
    ) -> StepInfo:
        """The step's record; an overflowed step (``weights`` None) reports NaN weights. With tasks absent,
        every task's entry: an absent task's weight 0, its loss and its row and column of G NaN."""
        if weights is None:
            weights, extras = torch.full_like(step.loss_values, float("nan")), {}
        else:
            extras = self.method.info_extras()
        losses, gram = step.loss_values, step.gram
        if present is not None:
            weights = present.spread(weights, 0.0)
            losses = present.spread(losses, float("nan"))
            gram = None if gram is None else present.spread_gram(gram)
        return StepInfo(
            weights=weights,
            losses=losses,
            gram=gram,
            method=self.method.name,
            task_names=self.method.task_names,
            mode=step.mode,
            source=step.source,
            sample_mask=sample_mask,
            extras=extras,
            **fields,
        )

    def _post_transform(
        self, pairs: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
        fields: dict[str, Any] = {}
        if not self.transforms:
            return pairs, fields
        # The transforms are written for the gradient the optimizer descends along; a group that maximizes
        # steps along +g, so they see −g there (negation is exact and undone after).
        ascending = _ascending(self.param_groups)
        pairs = _negated(pairs, ascending)
        for transform in self.transforms:
            pairs, more = transform.apply(pairs)
            fields.update(more)
        return _negated(pairs, ascending), fields

    def _check_unreached(
        self,
        pairs: list[tuple[torch.Tensor, torch.Tensor]],
        params: list[torch.Tensor],
        tasks: list[torch.Tensor],
    ) -> None:
        """ValueError when parameters got no gradient because a reentrant activation checkpoint hid them
        (``holds_reentrant_checkpoint``): they would silently never train. The graph is walked only when some
        trainable parameter got no gradient that no earlier walk cleared (parameters without a gradient in a
        step whose graph held no such checkpoint: unused heads, the experts a router skipped), so a model's
        walks stop once its unused parameters have all been seen."""
        if len(pairs) >= len(params):
            return
        reached = {id(p) for p, _ in pairs}
        unreached = [p for p in params if id(p) not in reached]
        ids = {id(p) for p in unreached}
        if ids <= self._cleared_unreached:
            return
        if holds_reentrant_checkpoint(tasks):
            raise ValueError(
                "the losses' graph holds an activation checkpoint with use_reentrant=True, whose parameters "
                "autograd.grad cannot reach: parameters of shapes "
                f"{[tuple(p.shape) for p in unreached]} got no gradient. Use "
                "torch.utils.checkpoint.checkpoint(..., use_reentrant=False) (for a Hugging Face model: "
                "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}))"
            )
        self._cleared_unreached.update(ids)

    def _device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                device: torch.device = p.device
                return device
        return torch.device("cpu")

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _trainable_params(self) -> list[torch.Tensor]:
        return [p for p in self._all_params() if p.requires_grad]


def weighted_methods() -> list[str]:
    """The registered methods whose weights need no Gram matrix with their default options."""
    return sorted(name for name, cls in METHODS.items() if not cls.needs_gram)


def skipping_methods() -> list[str]:
    """The registered methods that take a step with some tasks absent with their default options
    (``Method.skips_absent_tasks``)."""
    return sorted(name for name, cls in METHODS.items() if cls.skips_absent_tasks)


def _ascending(groups: Sequence[dict[str, Any]]) -> set[int]:
    """The ids of the parameters in groups with ``maximize=True`` (the optimizer steps along +.grad)."""
    return {id(p) for g in groups if g.get("maximize", False) for p in g["params"]}


def _negated(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], ids: set[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if not ids:
        return pairs
    return [(p, -g if id(p) in ids else g) for p, g in pairs]


def _check_direction(method: Method, groups: Sequence[dict[str, Any]]) -> None:
    """ValueError for a method that reads how fast the losses fall under an optimizer that raises them."""
    if not method.tracks_loss_decrease:
        return
    maximizing = [k for k, g in enumerate(groups) if g.get("maximize", False)]
    if maximizing:
        raise ValueError(
            f"method {method.name!r} weighs the tasks by how fast their losses fall, but the optimizer "
            f"maximizes (maximize=True in param group(s) {maximizing}): pass losses to minimize to an "
            "optimizer without maximize=True"
        )


def _full_mode_source(
    method: Method,
    model: torch.nn.Module | None,
    gradient_source: str,
    activation_form: str,
    shared_params: Sequence[torch.Tensor] | None,
    gram_dtype: torch.dtype,
    optimizer: torch.optim.Optimizer,
    dist_strategy: str,
    *,
    sharded: bool,
    activation_memory: int | None = None,
) -> Any:
    """The gradient source of full mode, chosen once: the FSDP2 source for sharded parameters; one weighted
    backward for methods that need no Gram matrix; else the Jacobian or the activation source
    (``gradient_source``)."""
    check_choice(gradient_source, ("auto", "jacobian", "activations"), "gradient_source")
    if activation_memory is not None:
        activation_memory = check_int(activation_memory, "activation_memory", minimum=1)
    scales = method.scales_task_specific
    complex_shapes = _complex_shapes(p for g in optimizer.param_groups for p in g["params"])
    if sharded or (activation_memory is not None and method.needs_gram):
        _check_budget_applies(activation_memory, model, gradient_source, sharded, bool(complex_shapes))
    if sharded:
        if dist_strategy != "allreduce":
            raise ValueError(
                f"dist_strategy={dist_strategy!r} chooses how the Jacobian is reduced under DDP; FSDP2 "
                "(fully_shard) reduce-scatters the gradients itself: leave dist_strategy at its default"
            )
        if gradient_source == "activations":
            raise ValueError(
                "gradient_source='activations' does not support FSDP2 (fully_shard) parameters: use 'auto' "
                "(the task gradients are then read from FSDP's gradient shards)"
            )
        return FSDPSource(shared_params, gram_dtype, scales, method.needs_gram)
    if gradient_source == "activations" and model is None:
        raise ValueError("gradient_source='activations' needs the model: GradSurgery(..., model=model)")
    if not method.needs_gram:
        return WeightedSource(gram_dtype)
    if gradient_source == "activations" and complex_shapes:
        raise ValueError(_COMPLEX_ACTIVATIONS.format(complex_shapes))
    auto = gradient_source == "auto"
    # model is None only with gradient_source "jacobian" or "auto" here ("activations" refused it above).
    if (
        gradient_source == "jacobian"
        or model is None
        or complex_shapes
        or (auto and not activations_pay_off(model))
    ):
        return JacobianSource(shared_params, gram_dtype, scales)
    from .sources.activation import ActivationSource

    if dist_strategy != "allreduce":
        raise ValueError(
            f"dist_strategy={dist_strategy!r} shards the Jacobian, which the activation source never forms: "
            "use gradient_source='jacobian' with it"
        )
    check_sparse_support(model, optimizer)
    return ActivationSource(
        model,
        form=activation_form,
        shared_params=shared_params,
        gram_dtype=gram_dtype,
        scales_task_specific=scales,
        memory=activation_memory,
        # A memory budget is a request for the activations: no step falls back to the Jacobian then.
        fallback=JacobianSource(shared_params, gram_dtype, scales)
        if auto and activation_memory is None
        else None,
    )


_COMPLEX_ACTIVATIONS = (
    "the activation source (gradient_source='activations') takes real layers; the optimizer holds complex "
    "parameters (shapes {}): use gradient_source='jacobian' (or 'auto'), which reads them as real pairs"
)


def _complex_shapes(params: Iterable[torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in params if p.is_complex()]


def _check_budget_applies(
    activation_memory: int | None,
    model: torch.nn.Module | None,
    gradient_source: str,
    sharded: bool,
    complex_params: bool,
) -> None:
    """ValueError when ``activation_memory`` is given but the activation source will not run."""
    if activation_memory is None:
        return
    if sharded:
        why = "the parameters are FSDP2 shards"
    elif complex_params:
        why = "the optimizer holds complex parameters, which the Jacobian source takes"
    elif gradient_source == "jacobian":
        why = "gradient_source='jacobian'"
    elif model is None:
        why = "no model was given"
    elif gradient_source == "auto" and not activations_pay_off(model):
        why = "gradient_source='auto' takes the Jacobian for this model (activations_pay_off)"
    else:
        return
    raise ValueError(
        f"activation_memory bounds the activation source, which does not run here ({why}); pass "
        "model=model and gradient_source='activations', or drop activation_memory"
    )


def activations_pay_off(model: torch.nn.Module) -> bool:
    """Whether the activation source is the cheaper exact source for ``model``: always with sparse tables
    (the Jacobian cannot hold their gradients); not under DDP (every layer is then materialised and
    all-reduced, the Jacobian's cost plus a backward); not when convolutions hold most of the parameters
    (their contribution is materialised: the Jacobian's weight-gradient work plus a backward). Otherwise yes:
    linear layers and embeddings get the cheaper of the kernel and the materialised form, and memory follows
    the activations instead of T × the parameters."""
    if sparse_tables(model):
        return True
    if is_ddp(model):
        return False
    conv = sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.modules.conv._ConvNd)
        for p in m.parameters(recurse=False)
        if p.requires_grad
    )
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 2 * conv <= total


def _l2_option(
    method: Method,
    l2: bool,
    l2_params: Sequence[torch.Tensor] | None,
    l2_per_tensor: bool | None,
    l2_decoupled: bool | None,
) -> list[L2Rule]:
    """The rule ``l2=True`` adds (with its ``l2_*`` options), or nothing."""
    check_bool(l2, "l2")
    options = {"l2_params": l2_params, "l2_per_tensor": l2_per_tensor, "l2_decoupled": l2_decoupled}
    given = [name for name, value in options.items() if value is not None]
    if any(isinstance(t, L2Rule | EvidenceRule) for t in method.transforms()):
        if l2 or given:
            raise TypeError(
                f"method={method.name!r} applies the L2 rule itself and takes its options as params=, "
                f"per_tensor=, decoupled=; got l2={l2!r}{' and ' + ', '.join(given) if given else ''}"
            )
        return []
    if not l2:
        if given:
            raise TypeError(f"{', '.join(given)} given without l2=True")
        return []
    return [L2Rule(l2_params, l2_per_tensor, True if l2_decoupled is None else l2_decoupled)]
