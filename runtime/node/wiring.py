"""How a dataflow wires its nodes, read from its descriptor (the YAML as dora reads it): what
each input reads, and who reads an output."""

from __future__ import annotations

from typing import Any


def input_source(spec: Any) -> str:
    """What an input reads, ``node/output``: its YAML is that string or ``{source: node/output,
    queue_size: ...}``."""
    return str(spec.get("source", "")) if isinstance(spec, dict) else str(spec)


def source_node(spec: Any) -> str:
    """The node an input reads from."""
    return input_source(spec).partition("/")[0]


def readers(descriptor: dict[str, Any], source: str) -> list[tuple[str, str]]:
    """The (node, input) pairs that read ``source`` (``node/output``)."""
    return [(node["id"], input_id)
            for node in descriptor.get("nodes", [])
            for input_id, spec in (node.get("inputs") or {}).items()
            if input_source(spec) == source]
