"""The README's tables that are written from the tests' own lists stay true to them."""

from __future__ import annotations

import re
from pathlib import Path

from mofa_omni.testing.tiny_gguf import GGUF_ARCHITECTURES
from mofa_omni.testing.tiny_llm import LLM_ARCHITECTURES, MIXTURES_OF_EXPERTS
from mofa_omni.testing.tiny_vlm import VLM_ARCHITECTURES

README = Path(__file__).parents[1] / "README.md"


def table_after(heading: str) -> list[list[str]]:
    """The rows (cells stripped) of the first table after ``heading``, without its header."""
    text = README.read_text()
    section = text[text.index(heading):]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    first = section.splitlines().index(lines[0])
    rows = []
    for line in section.splitlines()[first:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[2:]


def test_the_llm_architecture_table_is_the_matrix_tests_list():
    rows = table_after("### Supported LLM architectures")
    assert [row[0] for row in rows] == list(LLM_ARCHITECTURES)
    for name, moe, mlx, gguf in rows:
        assert (moe == "yes") == (name in MIXTURES_OF_EXPERTS), name
        assert mlx == "yes", name
        found = re.fullmatch(r"yes \(`(\w+)`\)", gguf)
        assert (found.group(1) if found else None) == GGUF_ARCHITECTURES.get(name), name


def test_the_vlm_architecture_table_is_the_families_the_tests_write():
    rows = table_after("### Supported VLM architectures")
    assert [row[1].strip("`") for row in rows] == list(VLM_ARCHITECTURES)
