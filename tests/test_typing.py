"""The type check: ``mypy`` with the project's configuration (``[tool.mypy]`` in pyproject.toml:
``strict`` on ``gradsurgery/``) reports no error, with the versions constraints.txt pins of mypy and of the
packages whose annotations it reads. Another version judges the code differently: torch 2.6 leaves
``torch.enable_grad`` untyped and does not re-export ``torch.amp.GradScaler``, numpy 2.2 makes ``ndarray``
without type arguments an error. Elsewhere the check skips, naming the versions that differ.

mypy keeps its incremental cache in ``.mypy_cache/`` at the repository root (git-ignored): a run after an
earlier one re-checks only what changed (about 2 s); the first run reads torch's and numpy's annotations
(about 15 s of CPU).
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: mypy, and the dependencies whose annotations it reads
TYPED = ("mypy", "numpy", "scipy", "torch")


def pinned_versions() -> dict[str, str]:
    """The versions constraints.txt pins, by package name."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            pins[name.strip().lower()] = version.strip()
    return pins


def unpinned(packages: tuple[str, ...]) -> list[str]:
    """``name installed (pinned version)`` for each of ``packages`` installed at another version than the
    pinned one (a local label such as torch's ``+cpu`` ignored)."""
    pins = pinned_versions()
    differ = []
    for name in packages:
        installed = importlib.metadata.version(name).split("+")[0]
        if installed != pins[name]:
            differ.append(f"{name} {installed} (pinned {pins[name]})")
    return differ


@pytest.mark.slow
def test_mypy_strict_reports_no_error():
    pytest.importorskip("mypy", reason="mypy comes with the test extra (pip install -e '.[test]')")
    differ = unpinned(TYPED)
    if differ:
        pytest.skip(f"the type check runs with constraints.txt's versions; installed: {', '.join(differ)}")
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"mypy found errors (exit {done.returncode}):\n{done.stdout}{done.stderr}"
    assert "Success: no issues found" in done.stdout, done.stdout + done.stderr
