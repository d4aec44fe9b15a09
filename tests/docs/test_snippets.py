"""Every ```python block of README.md and docs/**/*.md is a complete script, and runs.

Each block runs on its own, as a user would paste it into a file: ``exec`` in a fresh namespace with
``__name__ == "__main__"``, in a fresh temporary folder, after ``torch.manual_seed(0)``; the method
registry is restored after each block (a page registers a method of its own). A block preceded by
the marker ``<!-- snippet: ddp -->`` is a ``torchrun`` script: it runs in 2 gloo processes on 127.0.0.1,
with the environment torchrun would give it, forked (as ``tests/test_distributed.py`` starts its ranks) by
a fresh launcher process, ``_ddp_launcher.py``, under a timeout.
A block that imports an optional package which is not installed (Lightning, Accelerate, ...) is skipped;
CI installs them all.

A few blocks also have their results checked (``CHECKS``): each check names its page and a line of its
block, and fails when that block is gone, so a check cannot silently stop running.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest
import torch
from torch_support import FSDP2_ON_CPU, FSDP2_ON_CPU_REASON

import gradsurgery

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
MARKER = re.compile(r"^\s*<!--\s*snippet:\s*(?P<kind>[\w-]+)\s*-->\s*$")
LANGUAGES = {"python", "bash", "text", "yaml", "toml", "ini"}  # what a fence may be tagged with
OPTIONAL = {"lightning", "accelerate", "matplotlib", "tensorboard", "sklearn", "torchjd"}
WORLD = 2

pytestmark = pytest.mark.docs


@dataclasses.dataclass
class Block:
    page: pathlib.Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    kind: str = "script"  # or "ddp"

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fenced_blocks(page: pathlib.Path) -> list[Block]:
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].strip()
        body, j = [], i + 1
        while j < len(lines) and not (
            lines[j].startswith(indent)
            and lines[j].strip().startswith(fence)
            and not lines[j].strip()[len(fence) :]
        ):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        if j == len(lines):
            raise AssertionError(f"{page.relative_to(ROOT)}:{i + 1}: code fence never closed")
        previous = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        marker = MARKER.match(previous)
        language = info.split()[0] if info else ""
        blocks.append(
            Block(page, i + 1, language, "\n".join(body) + "\n", marker["kind"] if marker else "script")
        )
        i = j + 1
    return blocks


ALL_BLOCKS = [b for page in PAGES for b in fenced_blocks(page)]
PYTHON = [b for b in ALL_BLOCKS if b.language == "python"]


def test_pages_and_fences():
    assert (ROOT / "docs" / "index.md") in PAGES and len(PYTHON) >= 15
    untagged = [b.name for b in ALL_BLOCKS if b.language not in LANGUAGES]
    assert not untagged, f"code blocks without a known language tag ({sorted(LANGUAGES)}): {untagged}"
    kinds = {b.kind for b in ALL_BLOCKS}
    assert kinds <= {"script", "ddp"}, kinds
    assert all(b.language == "python" for b in ALL_BLOCKS if b.kind == "ddp")
    assert any(b.kind == "ddp" for b in PYTHON), "the DDP how-to has a torchrun script"


def _imported_modules(block: Block) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(block.code, block.name)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


def _needs(block: Block) -> list[str]:
    modules = {name.split(".")[0] for name in _imported_modules(block)}
    return sorted(m for m in modules & OPTIONAL if importlib.util.find_spec(m) is None)


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    registry = dict(gradsurgery.METHODS)  # a page may register a method of its own (How it works)
    torch.manual_seed(0)
    yield tmp_path
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    gradsurgery.METHODS.clear()
    gradsurgery.METHODS.update(registry)


def run_script(block: Block) -> dict:
    namespace: dict = {"__name__": "__main__"}
    exec(compile(block.code, block.name, "exec"), namespace)
    return namespace


LAUNCHER = pathlib.Path(__file__).with_name("_ddp_launcher.py")
DDP_TIMEOUT = 300  # seconds: a hung rank fails the test instead of stalling the run


def run_ddp(block: Block, outdir: pathlib.Path) -> None:
    """The block as a torchrun script on 2 gloo ranks, forked by a fresh launcher (``_ddp_launcher.py``)."""
    script = outdir / "script.py"
    script.write_text(block.code)
    proc = subprocess.Popen(
        [sys.executable, str(LAUNCHER), str(script), str(outdir)],
        cwd=outdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a timeout stops the ranks too
    )
    try:
        output, _ = proc.communicate(timeout=DDP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"{block.name}: the 2-rank run did not finish in {DDP_TIMEOUT} s") from None
    errors = "\n".join(p.read_text() for p in sorted(outdir.glob("rank*.error")))
    assert proc.returncode == 0, f"{block.name} failed on a rank:\n{errors}\n{output}"
    assert sorted(p.name for p in outdir.glob("rank*.done")) == [f"rank{r}.done" for r in range(WORLD)]


@pytest.mark.parametrize("block", PYTHON, ids=lambda b: b.name)
def test_block_runs(block, sandbox):
    missing = _needs(block)
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (not installed)")
    if block.kind == "ddp":
        if not torch.distributed.is_available():
            pytest.skip("torch.distributed is not available")
        if "torch.distributed.fsdp" in _imported_modules(block) and not FSDP2_ON_CPU:
            pytest.skip(FSDP2_ON_CPU_REASON)
        run_ddp(block, sandbox)
        return
    namespace = run_script(block)
    for check in checks_for(block):  # defined below, with the blocks they read
        check(namespace)


# -- results of a few blocks --------------------------------------------------------------------------------
def _quick_start(ns):
    info = ns["info"]
    assert info.weights.shape == (2,) and info.task_names == ["click", "conversion"]
    assert abs(float(info.weights.sum()) - 1.0) < 1e-9  # MGDA weights lie on the simplex
    assert abs(float(info.shares.sum()) - 1.0) < 1e-9


def _l2(ns):
    assert ns["opt"].l2.decoupled and ns["info"].weights.tolist() == [1.0]


def _clean_set(ns):
    mask = ns["info"].sample_mask
    assert mask.dtype == torch.bool and mask.shape == (64,)
    assert ns["clean"].epoch >= 1  # 4 noisy batches per pass drew 2 passes of 2 clean batches


def _shares(ns):
    info = ns["info"]
    w, gram = info.weights, info.gram
    torch.testing.assert_close(ns["shares"], w * (gram @ w) / (w @ gram @ w))  # the formula on the page
    assert abs(float(ns["shares"].sum()) - 1.0) < 1e-9
    assert float(info.weights.max()) > 10  # the projection weights that need the share to read
    assert info.task_names == ["click", "watch"] and "share/click" in info.as_dict()


def _checkpoint(ns):
    assert ns["same"]  # the resumed run is bit-identical


def _distributed_checkpoint(ns):
    assert ns["resumed"]  # with the method's entry beside torch.distributed.checkpoint's files


def _diagnostics(ns):  # was tests/test_diagnostics.py::test_readme_weighting_example_runs
    from gradsurgery.diagnostics import read_csv

    info = ns["info"]
    assert info.mode == "representation" and info.method == "gradnorm"
    torch.testing.assert_close(float(ns["opt"].method.weights.sum()), 2.0)
    assert read_csv("results/diagnostics.csv")["step"] == [0, 1, 2, 3, 4]
    assert pathlib.Path("results/diagnostics.png").stat().st_size > 0


CHECKS = {
    ("README.md", 'opt = GradSurgery(torch.optim.Adam(params, lr=1e-3), method="mgda")'): _quick_start,
    ("docs/howto/l2-without-lambda.md", 'method="l2", decoupled=True)'): _l2,
    ("docs/howto/clean-set-guard.md", 'mode="mask")'): _clean_set,
    ("docs/reading-the-weights.md", "shares = "): _shares,
    ("docs/howto/checkpoints.md", "same = "): _checkpoint,
    ("docs/howto/checkpoints.md", "resumed = all("): _distributed_checkpoint,
    ("docs/howto/diagnostics.md", 'method="gradnorm"'): _diagnostics,
}


def checks_for(block: Block) -> list:
    page = str(block.page.relative_to(ROOT))
    return [check for (p, needle), check in CHECKS.items() if p == page and needle in block.code]


@pytest.mark.parametrize("page, needle", list(CHECKS), ids=[f"{p}:{n[:30]}" for p, n in CHECKS])
def test_each_check_finds_its_block(page, needle):
    matches = [b.name for b in PYTHON if str(b.page.relative_to(ROOT)) == page and needle in b.code]
    assert len(matches) == 1, f"{page}: python blocks containing {needle!r}: {matches} (expected one)"
