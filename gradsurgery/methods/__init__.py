"""The registry of combination methods: ``make_method("mgda", solver="cvxpy")``."""

from __future__ import annotations

import inspect
from typing import Any

from .aligned_mtl import AlignedMTL
from .base import Method
from .cagrad import CAGrad
from .dwa import DWA
from .famo import FAMO
from .gradnorm import GradNorm
from .gradvac import GradVac
from .imtl import IMTL
from .l2 import L2
from .main_aux import MainAux
from .mgda import MGDA
from .mixed import Mixed
from .nash_mtl import NashMTL
from .pareto import Pareto
from .pcgrad import PCGrad
from .rlw import RLW
from .sum import Sum
from .uncertainty import Uncertainty
from .upgrad import UPGrad

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Make a method available by its ``name`` (usable as a class decorator by extensions)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    METHODS[cls.name] = cls
    return cls


_GRADIENT_METHODS = (
    Sum,
    MGDA,
    Pareto,
    PCGrad,
    GradVac,
    MainAux,
    Mixed,
    CAGrad,
    NashMTL,
    IMTL,
    UPGrad,
    AlignedMTL,
)
_LOSS_WEIGHTING = (Uncertainty, GradNorm, DWA, RLW, FAMO)
for _cls in _GRADIENT_METHODS + _LOSS_WEIGHTING:
    register(_cls)
register(L2)


def option_names(cls: type[Method]) -> list[str]:
    """The options of a method class (its ``__init__``'s keyword-only arguments)."""
    return cls.option_names()


def make_method(method: str | Method, **options: Any) -> Method:
    """A configured method from its name and options; a ``Method`` instance is used as it is."""
    if isinstance(method, Method):
        if options:
            raise TypeError(f"options {sorted(options)} given together with a Method instance {method!r}")
        return method
    if not isinstance(method, str):
        raise TypeError(f"method must be a name or a Method instance, got {method!r}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {sorted(METHODS)}")
    cls = METHODS[method]
    allowed = cls.option_names()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"method {method!r} got unknown option(s) {unknown}; its options are {allowed}")
    parameters = inspect.signature(cls.__init__).parameters.values()
    missing = [
        p.name for p in parameters if p.name in allowed and p.default is p.empty and p.name not in options
    ]
    if missing:
        raise TypeError(f"method {method!r} needs option(s) {missing}")
    return cls(**options)


__all__ = ["METHODS", "Method", "make_method", "option_names", "register"]
