"""The ``"gradsurgery"`` entry of ``GradSurgery.state_dict()``: the method, its options, task count, state
and random generators, in tensors and Python primitives only (``torch.load(weights_only=True)`` reads it).

Version 2 saves each generator once, under ``rng_state``. Version 1 (gradsurgery 0.1.0) also kept the
generator inside ``method_state``; such checkpoints are read by dropping that copy.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .methods import Method

STATE_KEY = "gradsurgery"
STATE_VERSION = 2
READABLE_VERSIONS = (1, 2)


def method_entry(method: Method) -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "method": method.name,
        "options": dict(method.options),
        "num_tasks": method.num_tasks,
        "task_names": None if method.task_names is None else list(method.task_names),
        "method_state": method.state_dict(),
        "rng_state": {name: gen.get_state() for name, gen in method.generators().items()},
    }


def check_compatible(method: Method, ours: object) -> dict[str, Any]:
    """The entry in the current version's layout; ValueError (before anything changes) when it belongs to
    another method, task count or option set."""
    if not isinstance(ours, dict) or ours.get("version") not in READABLE_VERSIONS:
        version = ours.get("version") if isinstance(ours, dict) else ours
        raise ValueError(
            f"unsupported gradsurgery state version {version!r} (expected one of {READABLE_VERSIONS})"
        )
    if ours["method"] != method.name:
        raise ValueError(f"state dict is for method {ours['method']!r}, this optimizer uses {method.name!r}")
    if ours["num_tasks"] is not None and method.num_tasks not in (None, ours["num_tasks"]):
        raise ValueError(
            f"state dict is for {ours['num_tasks']} tasks, this optimizer has {method.num_tasks}"
        )
    names = ours.get("task_names")
    if ours["num_tasks"] is not None and method.num_tasks is not None and names != method.task_names:
        raise ValueError(f"state dict is for tasks named {names}, this optimizer's are {method.task_names}")
    # The seed only picks the initial generator state, which the checkpoint replaces anyway; a solver backend
    # computes the same weights from the same state.
    free = {"seed", *method.interchangeable_options}
    theirs = {k: v for k, v in dict(ours.get("options", {})).items() if k not in free}
    mine = {k: v for k, v in method.options.items() if k not in free}
    # Options added since the checkpoint was written (to 0.1.0's methods, or ``evidence`` and ``num_samples``
    # to method "l2"): it ran with their defaults.
    theirs = {**{k: v for k, v in method.option_defaults().items() if k in mine}, **theirs}
    differ = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
    if differ:
        detail = ", ".join(f"{k}: saved {theirs.get(k)!r} vs {mine.get(k)!r}" for k in differ)
        raise ValueError(f"state dict is for different {method.name!r} options ({detail})")
    if ours["version"] == 1:
        ours = dict(ours)
        generators = dict(ours.get("rng_state") or {})
        ours["method_state"] = {k: v for k, v in dict(ours["method_state"]).items() if k not in generators}
    return ours


def rehearse(method: Method, ours: dict[str, Any]) -> Method | None:
    """A copy of ``method`` with the entry loaded (None for an entry saved before the first ``backward``): a
    malformed entry fails here, before anything is changed."""
    if ours["num_tasks"] is None:
        return None
    restored = copy.deepcopy(method)
    load_method(restored, ours)
    return restored


def load_method(method: Method, ours: dict[str, Any]) -> None:
    """Bind ``method`` to the saved task count and restore its state and generators."""
    try:
        method.bind(ours["num_tasks"], ours.get("task_names"))
        method.load_state_dict(ours["method_state"])
        gens = method.generators()
        for name, state in dict(ours.get("rng_state") or {}).items():
            if name not in gens:
                raise KeyError(f"the method has no generator {name!r}")
            gens[name].set_state(state)
    except (KeyError, TypeError, RuntimeError, AttributeError) as err:
        raise ValueError(f"malformed gradsurgery method state for {method.name!r}: {err}") from err
