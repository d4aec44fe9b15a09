"""Terminal output shared by the suite and its parts: a progress bar on stderr, lines that do not break it,
and the warnings of a stage counted instead of printed.

Its own module so that ``suite`` (the command line, which calls ``speed`` and ``quality``) and the parts it
calls can all use it without importing each other in a circle.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from typing import Any


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True, file=sys.stderr)


def say(text: str) -> None:
    """Print without breaking a tqdm bar."""
    try:
        from tqdm import tqdm

        tqdm.write(text)
    except ImportError:
        print(text)
    sys.stdout.flush()


@contextlib.contextmanager
def counted_warnings(counts: dict[str, int], first: dict[str, str] | None = None) -> Iterator[None]:
    """Record every warning raised inside the block into ``counts`` (category name → number) instead of
    printing it; ``first`` keeps the first message of each category."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                name = w.category.__name__
                counts[name] = counts.get(name, 0) + 1
                if first is not None:
                    first.setdefault(name, str(w.message)[:300])


def count_text(counts: dict[str, int]) -> str:
    """``"3 UserWarning, 1 SolverFallbackWarning"``."""
    return ", ".join(f"{n} {name}" for name, n in counts.items())


__all__ = ["count_text", "counted_warnings", "progress_bar", "say"]
