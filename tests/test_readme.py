"""The README's quick start runs as written."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quick_start_runs(capsys):
    block = next(b for b in python_blocks() if "GradSurgery(" in b)
    namespace: dict = {}
    exec(compile(block, "README quick start", "exec"), namespace)
    info = namespace["info"]
    assert info.weights.shape == (2,)
    assert abs(float(info.weights.sum()) - 1.0) < 1e-9  # MGDA weights lie on the simplex
    assert "tensor(" in capsys.readouterr().out
