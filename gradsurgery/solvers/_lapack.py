"""LAPACK routines for float64 T×T matrices, called directly: the scipy.linalg wrappers (cholesky, solve,
lstsq) re-validate their inputs and query workspaces, which costs several times the factorisation of a
T ≤ 32 matrix. scipy.linalg is imported at the first call (it takes 0.2 s to import)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np


@functools.cache
def lapack(name: str) -> Callable[..., Any]:
    """The float64 LAPACK routine ``name`` (e.g. ``"potrf"``, ``"posv"``, ``"gelsy"``)."""
    import scipy.linalg

    routine: Callable[..., Any]
    (routine,) = scipy.linalg.get_lapack_funcs((name,), (np.zeros((1, 1)),))
    return routine
