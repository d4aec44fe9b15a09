"""What a user installs: the wheel holds the ``gradsurgery`` package only, declares dependency ranges (not
pins), and installing it next to a torch within the range leaves that torch in place.

The wheel is built from a copy of the files a build reads (a ``build/`` folder left in the checkout by an
earlier build could otherwise put stale files into it), with the environment's setuptools and no network:
``pip wheel --no-deps --no-build-isolation``. The install check runs ``pip install --dry-run --report`` into
an empty virtual environment whose site-packages holds metadata-only stand-ins for torch, numpy, scipy and
cvxpy at chosen versions, with ``--no-index``: pip decides from the installed metadata alone, offline, in a
few seconds. (The same check against the real index and a real torch 2.13.0 is in docs/getting-started.md.)
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import venv
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILD_INPUTS = ["setup.cfg", "pyproject.toml", "README.md", "gradsurgery"]

pytestmark = pytest.mark.packaging


def builds_wheels(setuptools_version: str) -> bool:
    """Whether this environment's setuptools can build a wheel offline: it has ``bdist_wheel`` itself from
    70.1 on, before that through the ``wheel`` package (which a fresh virtual environment of Python 3.11,
    with its bundled setuptools 65.5, lacks)."""
    if importlib.util.find_spec("wheel") is not None:
        return True
    major, minor = (int(part) for part in re.findall(r"\d+", setuptools_version)[:2])
    return (major, minor) >= (70, 1)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    setuptools = pytest.importorskip(
        "setuptools", reason="building the wheel without network needs setuptools installed"
    )
    if not builds_wheels(setuptools.__version__):
        pytest.skip(
            f"building the wheel without network needs setuptools >= 70.1 or the wheel package; this "
            f"environment has setuptools {setuptools.__version__} alone (no bdist_wheel)"
        )
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        str(src),
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = out.glob("gradsurgery-*.whl")
    return built


def test_wheel_holds_only_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    version = wheel.name.split("-")[1]
    dist_info = f"gradsurgery-{version}.dist-info/"
    strays = [n for n in names if not (n.startswith("gradsurgery/") or n.startswith(dist_info))]
    assert not strays, f"files outside gradsurgery/ and its dist-info: {strays}"
    assert "gradsurgery/py.typed" in names  # PEP 561: type checkers read the inline annotations
    assert "gradsurgery/__init__.py" in names and "gradsurgery/methods/__init__.py" in names
    assert not any(n.startswith(("benchmarks/", "tests/", "examples/", "docs/")) for n in names)
    metadata = zipfile.ZipFile(wheel).read(dist_info + "METADATA").decode()
    top_level = zipfile.ZipFile(wheel).read(dist_info + "top_level.txt").decode().split()
    assert top_level == ["gradsurgery"]
    entry_points = dist_info + "entry_points.txt"
    assert entry_points not in names, "a console script would need a module outside the wheel"
    requires = [
        line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")
    ]
    core = {re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0]: r for r in requires if "extra ==" not in r}
    assert set(core) == {"torch", "numpy", "scipy", "cvxpy"}, core
    assert core["torch"] == "torch>=2.6", "the lower bound is set by dist.broadcast(group_src=), torch 2.6"
    assert not any("==" in r for r in core.values()), f"pins in install_requires: {core}"


def test_versions_agree():
    import gradsurgery

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["version"] == gradsurgery.__version__
    changelog = (ROOT / "CHANGELOG.md").read_text()
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", changelog, flags=re.M)
    assert released and released[0] == gradsurgery.__version__, released
    assert "## [Unreleased]" in changelog


def _fake_env(root: pathlib.Path, installed: dict[str, str]) -> pathlib.Path:
    """A virtual environment without pip whose site-packages holds only metadata for ``installed``."""
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    for name, version in installed.items():
        info = pathlib.Path(site) / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "INSTALLER").write_text("test\n")
        (info / "RECORD").write_text("")
    return python


def _dry_run(python: pathlib.Path, wheel: pathlib.Path, quiet: bool = True) -> subprocess.CompletedProcess:
    # --isolated: no pip configuration (extra indexes, find-links, constraints) of this machine takes part;
    # without PYTHONPATH, no package outside the fake environment does either.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-m", "pip", "--isolated", "--python", str(python), "install", "--dry-run",
           "--no-index", "--find-links", str(wheel.parent), str(wheel)]  # fmt: skip
    cmd += ["--report", "-", "-q"] if quiet else []
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


DEPENDENCIES = {"numpy": "1.24.0", "scipy": "1.10.0", "cvxpy": "1.4.0"}


def test_install_keeps_a_torch_within_the_range(wheel, tmp_path):
    python = _fake_env(tmp_path / "env", {"torch": "2.6.0", **DEPENDENCIES})
    done = _dry_run(python, wheel)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    planned = {item["metadata"]["name"]: item["metadata"]["version"] for item in report["install"]}
    assert planned == {"gradsurgery": wheel.name.split("-")[1]}, planned


def test_install_refuses_a_torch_below_the_range(wheel, tmp_path):
    python = _fake_env(tmp_path / "env", {"torch": "2.5.1", **DEPENDENCIES})
    done = _dry_run(python, wheel, quiet=False)
    # torch 2.5.1 does not satisfy torch>=2.6 and --no-index offers nothing else: pip names the requirement
    # (as a conflict with the installed torch, or, from some pip versions, as no matching distribution).
    assert done.returncode != 0
    refused = "ResolutionImpossible" in done.stderr or "No matching distribution" in done.stderr
    assert refused and "torch>=2.6" in done.stdout + done.stderr, done
