"""The type check: ``mypy`` with the project's configuration (``[tool.mypy]`` in pyproject.toml:
``strict`` on ``gradsurgery/``) reports no error. The version CI runs is pinned in constraints.txt, and so
is the torch whose annotations it reads: another torch annotates its API differently (torch 2.6 leaves
``torch.enable_grad`` untyped and does not re-export ``torch.amp.GradScaler``), so the check runs with the
pinned torch only.

mypy keeps its incremental cache in ``.mypy_cache/`` at the repository root (git-ignored): a run after an
earlier one re-checks only what changed (about 2 s); the first run reads torch's and numpy's annotations
(about 15 s of CPU).
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def pinned_torch() -> str:
    """The torch version constraints.txt pins."""
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.startswith("torch=="):
            return line.removeprefix("torch==").strip()
    raise AssertionError("constraints.txt pins no torch")


@pytest.mark.slow
def test_mypy_strict_reports_no_error():
    pytest.importorskip("mypy", reason="mypy comes with the test extra (pip install -e '.[test]')")
    pinned, installed = pinned_torch(), torch.__version__.split("+")[0]
    if installed != pinned:
        pytest.skip(
            f"the type check reads torch's annotations: it runs with torch {pinned} (constraints.txt)"
        )
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"mypy found errors (exit {done.returncode}):\n{done.stdout}{done.stderr}"
    assert "Success: no issues found" in done.stdout, done.stdout + done.stderr
