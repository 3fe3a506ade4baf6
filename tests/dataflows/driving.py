"""The event loop every test driver under tests/dataflows/ shares (drivers import it as
``driving``: dora starts a driver as ``python <driver>.py``, so the driver's own folder, this
one, is first on ``sys.path``).

A driver is the node of a test dataflow that plays the client: it sends requests, each with a
``request_id`` in its metadata, reads the results and errors that come back, and writes what it
saw as JSON for the test to check. Only what it sends and what it checks differs from driver to
driver; this module does the rest::

    driver = Driver(deadline_s=240, resend_after_s=60)
    report = {"errors": []}
    for event in driver.inputs():            # INPUT events only, until the deadline
        if event.id == "tick" and not driver.sent:
            driver.send("ask", "q1", ChatRequest(...))
        elif event.id == "reply" and event.decode(TextChunk).final:
            driver.answered(event.request_id)
        elif event.is_error:                 # an input wired to a node's `error` output
            report["errors"].append(record(event.error()))
        if driver.all_answered():
            break
    driver.write(report)                     # to $REPORT, with "timeout": true if it ran out

The API:

- ``Driver(deadline_s=None, resend_after_s=None, checked=True)``: ``inputs()`` yields the
  node's INPUT events as :class:`Input`; past ``deadline_s`` (seconds since the driver started,
  checked as each input arrives) it stops and ``write`` adds ``"timeout": true`` to the report.
  ``checked``: the node is a :class:`~mofa_omni.node.integrity.CheckedNode` (its requests are
  numbered, gaps on its inputs are counted in ``driver.node.gaps``), else dora's plain ``Node``.
- ``send(output, request_id, message, **metadata)`` encodes ``message`` (a request of
  ``mofa_omni.contract.tasks``; an Arrow array goes as it is) and records the request:
  ``sent`` (ids in the order first sent), ``answered(request_id)`` when its answer has ended,
  ``answers`` (ids in the order they were answered), ``waiting()`` (sent, not answered yet),
  ``all_answered()``.
- Resending (``resend_after_s``): dora drops a message now and then under load, even into a
  near-empty queue (seen in CI: one of a burst of three requests sent while the model node was
  still starting). A request unanswered for ``resend_after_s`` is sent again on the next
  ``tick`` input, and one the model node reports lost (its ``lost`` output: a gap in an input's
  numbering) when the driver passes that report to ``resend_lost``; each at most once, listed
  in ``resent`` for the test's report (``resend_lost`` needs ``checked``: the numbers name the
  lost requests). A request that was only slow is then answered twice, one answer after the
  other (a model node serves a request's copies in order): once the driver has called
  ``answered``, ``inputs()`` skips what else comes under that request id.
- ``closed``: the inputs dora has closed (their source node has exited).
- ``record(error)``: an :class:`ErrorReport` as a dict for the report.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
from dora import Node

from mofa_omni.contract import arrow
from mofa_omni.contract.tasks import ErrorReport
from mofa_omni.node.integrity import CheckedNode

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Input:
    """One INPUT event: the input's id, its Arrow value and its metadata."""

    id: str
    value: pa.Array
    metadata: dict[str, Any]

    @property
    def request_id(self) -> str:
        return str(self.metadata.get("request_id", ""))

    @property
    def is_error(self) -> bool:
        """Wired to a node's ``error`` output: drivers name such inputs ``<node>_error``."""
        return self.id.endswith("_error")

    def decode(self, kind: type[T]) -> T:
        return arrow.decode(self.value, kind)

    def error(self) -> ErrorReport:
        return arrow.decode(self.value, ErrorReport)


def record(error: ErrorReport, **more: Any) -> dict[str, Any]:
    """An error as the reports hold it (``more``: fields of the driver's own)."""
    return {"request_id": error.request_id, "kind": str(error.kind), "message": error.message,
            "node": error.node, **more}


class Driver:
    """A test driver's dora node, the requests it sent, and its deadline (see the module)."""

    def __init__(self, *, deadline_s: float | None = None, resend_after_s: float | None = None,
                 checked: bool = True):
        self.node = CheckedNode() if checked else Node()
        self.deadline_s, self.resend_after_s = deadline_s, resend_after_s
        self.started = time.monotonic()
        self.timed_out = False
        self.closed: set[str] = set()
        self.sent: list[str] = []
        self.answers: list[str] = []
        self.resent: list[str] = []
        self._messages: dict[str, tuple[str, pa.Array, dict[str, Any]]] = {}
        self._by_seq: dict[tuple[str, int], str] = {}
        self._pending: dict[str, float] = {}  # request id -> when it was last sent

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def inputs(self) -> Iterator[Input]:
        """The node's INPUT events until its event stream ends or the deadline passes."""
        for event in self.node:
            if event["type"] == "INPUT_CLOSED":
                self.closed.add(event["id"])
            if event["type"] != "INPUT":
                continue
            if self.deadline_s is not None and self.elapsed() > self.deadline_s:
                self.timed_out = True
                return
            if event["id"] == "tick" and self.resend_after_s is not None:
                self._resend_stale()
            metadata = event.get("metadata") or {}
            request_id = str(metadata.get("request_id", ""))
            if request_id in self.resent and request_id in self.answers:
                continue  # the answer to a copy sent again after the first was answered
            yield Input(event["id"], event["value"], metadata)

    def send(self, output: str, request_id: str, message: Any, **metadata: Any) -> None:
        """Send a request (encoded unless it is an Arrow array already) with its id."""
        value = message if isinstance(message, pa.Array) else arrow.encode(message)
        if request_id not in self._messages:
            self.sent.append(request_id)
        self._messages[request_id] = (output, value, metadata)
        seq = self.node.send_output(output, value, {"request_id": request_id, **metadata})
        if seq is not None:  # a CheckedNode's stream number on that output
            self._by_seq[output, seq] = request_id
        self._pending[request_id] = time.monotonic()

    def answered(self, request_id: str) -> None:
        """The answer to ``request_id`` has ended (a final result, or an error)."""
        self._pending.pop(request_id, None)
        if request_id not in self.answers:
            self.answers.append(request_id)

    def waiting(self) -> list[str]:
        """Requests sent and not answered yet."""
        return [request_id for request_id in self.sent if request_id not in self.answers]

    def all_answered(self) -> bool:
        """Requests were sent, and every one has been answered."""
        return bool(self.sent) and not self.waiting()

    def resend_lost(self, metadata: dict[str, Any], output_of_input: dict[str, str]) -> None:
        """A model node's ``lost`` report: the requests in the gap are sent again.
        ``output_of_input``: the model node's input -> the driver's output feeding it."""
        output = output_of_input.get(metadata.get("lost_input", ""))
        for seq in range(metadata.get("lost_first", 0), metadata.get("lost_last", -1) + 1):
            if (output, seq) in self._by_seq:
                self._resend(self._by_seq[output, seq])

    def _resend_stale(self) -> None:
        for request_id, when in list(self._pending.items()):
            if time.monotonic() - when > self.resend_after_s:
                self._resend(request_id)

    def _resend(self, request_id: str) -> None:
        if request_id in self.resent or request_id not in self._pending:
            return
        self.resent.append(request_id)
        output, value, metadata = self._messages[request_id]
        self.send(output, request_id, value, **metadata)

    def write(self, report: dict[str, Any], path: str | Path | None = None) -> None:
        """Write ``report`` as JSON to ``path`` (default: $REPORT), marked if time ran out."""
        if self.timed_out:
            report["timeout"] = True
        Path(path or os.environ["REPORT"]).write_text(json.dumps(report, indent=1))
