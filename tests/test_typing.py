"""The type check of issue 13: ``mypy`` with the project's configuration (``[tool.mypy]`` in pyproject.toml:
``strict`` on ``gradsurgery/``) reports no error. The version CI runs is pinned in constraints.txt.

mypy keeps its incremental cache in ``.mypy_cache/`` at the repository root (git-ignored): a run after an
earlier one re-checks only what changed (about 2 s); the first run reads torch's and numpy's annotations
(about 15 s of CPU).
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_mypy_strict_reports_no_error():
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"mypy found errors (exit {done.returncode}):\n{done.stdout}{done.stderr}"
    assert "Success: no issues found" in done.stdout, done.stdout + done.stderr
