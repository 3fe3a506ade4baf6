"""What a test driver sent, so that a request dora dropped is sent once more.

dora drops a message now and then under load, even into a near-empty queue (seen in CI: one of
a burst of three requests sent while the model node was still starting). A driver records
every request here; one the model node reports lost (its `lost` output: a gap in an input's
numbering) or that has had no answer for ``after_s`` is sent again, once, and listed in
``resent`` for the test's report.
"""

from __future__ import annotations

import time

import pyarrow as pa


class Outbox:
    def __init__(self, node, after_s: float = 30.0):
        self.node, self.after_s = node, after_s
        self.resent: list[str] = []
        self._messages: dict[str, tuple[str, pa.Array]] = {}
        self._by_seq: dict[tuple[str, int], str] = {}
        self._pending: dict[str, float] = {}

    def send(self, output: str, request_id: str, value: pa.Array) -> None:
        self._messages[request_id] = (output, value)
        seq = self.node.send_output(output, value, {"request_id": request_id})
        self._by_seq[output, seq] = request_id
        self._pending[request_id] = time.monotonic()

    def sent(self, request_id: str) -> bool:
        return request_id in self._messages

    def answered(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    def resend_stale(self) -> None:
        """Call on every tick: requests unanswered for ``after_s`` are sent again."""
        for request_id, when in list(self._pending.items()):
            if time.monotonic() - when > self.after_s:
                self._resend(request_id)

    def resend_lost(self, metadata: dict, output_of_input: dict[str, str]) -> None:
        """A model node's `lost` report: the requests in the gap are sent again."""
        output = output_of_input.get(metadata.get("lost_input", ""))
        for seq in range(metadata.get("lost_first", 0), metadata.get("lost_last", -1) + 1):
            if (output, seq) in self._by_seq:
                self._resend(self._by_seq[output, seq])

    def _resend(self, request_id: str) -> None:
        if request_id in self.resent or request_id not in self._pending:
            return
        self.resent.append(request_id)
        output, value = self._messages[request_id]
        self.send(output, request_id, value)
