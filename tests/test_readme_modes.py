"""The code in the README section "Results: L2 without λ and the clean-set guard" runs as written."""

from __future__ import annotations

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Results: L2 without λ and the clean-set guard"


def section_blocks() -> list[str]:
    text = README.read_text()
    assert SECTION in text
    return re.findall(r"```python\n(.*?)```", text.split(SECTION, 1)[1], flags=re.S)


def test_section_snippets_run():
    blocks = section_blocks()
    assert len(blocks) == 2
    torch.manual_seed(0)
    l2_ns: dict = {}
    exec(compile(blocks[0], "README L2 snippet", "exec"), l2_ns)
    assert l2_ns["opt"].l2.decoupled and l2_ns["info"].weights.tolist() == [1.0]
    guard_ns: dict = {}
    exec(compile(blocks[1], "README clean-set snippet", "exec"), guard_ns)
    mask = guard_ns["info"].sample_mask
    assert mask.dtype == torch.bool and mask.shape == (64,)
    assert guard_ns["clean"].epoch >= 1  # 4 noisy batches per pass drew 2 passes of 2 clean batches
