"""The checks every option and input goes through: a wrong type raises ``TypeError``, a wrong value
``ValueError``, and the message names the option and what it got."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch


def check_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be a bool (True or False), got {value!r}")
    return value


def check_int(value: Any, what: str, *, minimum: int | None = None) -> int:
    """An int (not a bool; numpy integers accepted), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {value!r}")
    number = int(value)
    if minimum is not None and number < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {number}")
    return number


def check_number(
    value: Any,
    what: str,
    *,
    minimum: float | None = None,
    exclusive_minimum: bool = False,
    maximum: float | None = None,
    exclusive_maximum: bool = False,
) -> float:
    """A finite real number (not a bool) within the given bounds, as a float."""
    # Plain floats and ints first: the solvers check their options on every call, and an ABC isinstance
    # test costs more than the rest of this function.
    if type(value) is not float and type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{what} must be a number, got {value!r}")
    number = float(value)
    low_ok = minimum is None or (number > minimum if exclusive_minimum else number >= minimum)
    high_ok = maximum is None or (number < maximum if exclusive_maximum else number <= maximum)
    if not (math.isfinite(number) and low_ok and high_ok):
        if minimum is not None and maximum is not None:
            left, right = "(" if exclusive_minimum else "[", ")" if exclusive_maximum else "]"
            bound = f" in {left}{minimum:g}, {maximum:g}{right}"
        elif minimum is not None:
            bound = f" {'>' if exclusive_minimum else '>='} {minimum:g}"
        elif maximum is not None:
            bound = f" {'<' if exclusive_maximum else '<='} {maximum:g}"
        else:
            bound = ""
        raise ValueError(f"{what} must be a finite number{bound}, got {number}")
    return number


def check_choice(value: Any, choices: Sequence[str], what: str, where: str = "") -> str:
    """One of the named ``choices``; ``where`` completes the message (e.g. " for method 'mgda'")."""
    if not isinstance(value, str):
        raise TypeError(f"{what}{where} must be one of {tuple(choices)}, got {value!r}")
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}{where}; choose one of {tuple(choices)}")
    return value


def check_numbers(value: Any, what: str) -> list[float]:
    """A non-empty sequence (or 1-D tensor) of finite numbers, as a list of floats."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().reshape(-1).tolist()
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise TypeError(f"{what} must be a sequence of numbers, got {value!r}")
    value = list(value)
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{what} must hold numbers only, got {value!r}")
    out = [float(v) for v in value]
    if not out:
        raise ValueError(f"{what} is empty")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what} must be finite, got {out}")
    return out


def check_task_index(value: Any, num_tasks: int | None, what: str) -> int:
    """A task index: an int in [0, T) (the range is checked once T is known)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int task index, got {value!r}")
    index = int(value)
    if num_tasks is not None and not 0 <= index < num_tasks:
        raise ValueError(f"{what}={index} is out of range for {num_tasks} tasks")
    return index


def check_task_ref(value: Any, what: str) -> int | str:
    """A task given by index (an int) or by name (a non-empty str); resolved once the tasks are known."""
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{what} must name a task, got an empty string")
        return value
    return check_task_index(value, None, what)


def check_per_task_numbers(value: Any, what: str) -> list[float] | dict[str, float]:
    """One finite number per task: a sequence (by task index) or a mapping from task names."""
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str) or not k]
        if bad:
            raise TypeError(f"{what} maps task names to numbers; got keys {bad}")
        return dict(zip(value, check_numbers(list(value.values()), what), strict=True))
    return check_numbers(value, what)


def resolve_task(value: int | str, num_tasks: int, names: Sequence[str] | None, what: str) -> int:
    """The index of a task given by index or by name."""
    if isinstance(value, str):
        if names is None or value not in names:
            where = "the losses are unnamed" if names is None else f"the tasks are {list(names)}"
            raise ValueError(f"{what}={value!r} names no task ({where})")
        return list(names).index(value)
    return check_task_index(value, num_tasks, what)


def resolve_per_task(
    value: list[float] | dict[str, float], num_tasks: int, names: Sequence[str] | None, what: str
) -> list[float]:
    """Per-task numbers in task order; a mapping must name every task exactly once."""
    if isinstance(value, dict):
        if names is None:
            raise ValueError(f"{what} is given by task name, but the losses are unnamed")
        if set(value) != set(names):
            raise ValueError(f"{what} names tasks {sorted(value)}, the tasks are {list(names)}")
        return [value[n] for n in names]
    if len(value) != num_tasks:
        raise ValueError(f"{what} has {len(value)} entries for {num_tasks} tasks: {value}")
    return list(value)


def check_tensors(params: Any, what: str) -> list[torch.Tensor]:
    """A non-empty iterable of tensors (a single tensor counts as one)."""
    if isinstance(params, torch.Tensor):
        params = [params]
    try:
        tensors: list[torch.Tensor] = list(params)
    except TypeError:
        raise TypeError(f"{what} must be an iterable of tensors, got {type(params).__name__}") from None
    bad = [type(p).__name__ for p in tensors if not isinstance(p, torch.Tensor)]
    if bad:
        raise TypeError(f"{what} must hold tensors only, got {bad}")
    if not tensors:
        raise ValueError(f"{what} is empty")
    return tensors


def check_differentiable(loss: Any, index: int) -> None:
    """``loss`` (the ``index``-th) is a real tensor that requires grad."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss {index} is a {type(loss).__name__}, not a tensor")
    if loss.is_complex():
        raise TypeError(f"loss {index} is complex ({loss.dtype}): a loss to minimize is real (its abs()?)")
    if not loss.requires_grad:
        raise ValueError(
            f"loss {index} does not require grad (was it computed under torch.no_grad() or "
            "torch.inference_mode()?)"
        )


def non_finite(values: Sequence[float]) -> list[int]:
    """Positions of NaN or ±inf entries."""
    return [i for i, v in enumerate(values) if not math.isfinite(v)]
