"""An optional per-message timing trace: one JSON line per message a node sends or receives.

Set ``MOFA_OMNI_TRACE=/path/trace.jsonl`` in the environment of the nodes (for ``dora run``,
in the shell that starts it) and every traced point appends a line such as

    {"node": "llm", "event": "send", "port": "result", "request_id": "reply-1", "seq": 0,
     "final": false, "origin_ns": ..., "sent_ns": ..., "now_ns": ..., "pid": ...}

``event`` is ``recv`` (an input arrived), ``start`` (a model node began serving a request) or
``send`` (an output left); the metadata fields are the message's
:class:`~mofa_omni.node.host.MessageMeta` and ``now_ns`` is this process's ``time.time_ns()`` when the
line was written. Without the variable every call returns at once and nothing is written.

Several processes may append to the same file: each call opens it with ``O_APPEND`` and writes
its line with a single ``write``, so lines land whole and never interleave.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

TRACE_ENV = "MOFA_OMNI_TRACE"
_FIELDS = ("request_id", "seq", "final", "origin_ns", "sent_ns")


def trace_path() -> str | None:
    """Where the trace goes, or None when tracing is off."""
    return os.environ.get(TRACE_ENV) or None


def record(node: str, event: str, port: str, meta: Any = None, **extra: Any) -> None:
    """Append one line for a message: ``meta`` is a MessageMeta or dora's metadata dict.

    A no-op when :data:`TRACE_ENV` is unset; never raises (a trace must not break a node).
    """
    path = trace_path()
    if path is None:
        return
    now = time.time_ns()
    if hasattr(meta, "to_dora"):
        meta = meta.to_dora()
    fields = meta if isinstance(meta, Mapping) else {}
    line: dict[str, Any] = {"node": node, "event": event, "port": port}
    for name in _FIELDS:
        value = fields.get(name)
        line[name] = value if isinstance(value, (int, float, str, bool)) or value is None \
            else str(value)
    line.update(now_ns=now, pid=os.getpid(), **extra)
    data = (json.dumps(line, default=str) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    except OSError:
        pass


def read(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The lines of a trace file, parsed (a torn last line, if any, is skipped)."""
    lines = []
    with open(path, encoding="utf-8") as file:
        for text in file:
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError:
                continue
    return lines
