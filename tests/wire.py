"""A model node's worker without dora: what it would send, captured in order (tests only)."""

from __future__ import annotations

import threading
import time

import pyarrow as pa

from mofa_omni.contract import arrow
from mofa_omni.contract.tasks import GenericRequest, GenericResult
from mofa_omni.scheduler.messages import NodeReport


class Wire:
    """What a node would send: results/errors and control messages, in order."""

    def __init__(self):
        self.out, self.control, self.lock = [], [], threading.RLock()

    def send(self, out) -> None:
        with self.lock:
            self.out.append(out)

    def publish(self, message) -> None:
        with self.lock:
            self.control.append(message)

    def wait_for(self, condition, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if condition(self):
                    return
            time.sleep(0.01)
        raise AssertionError(f"timed out: {self.out} {self.control}")

    def stopwords(self, request_id: str) -> int:
        (out,) = [o for o in self.out if o.meta.request_id == request_id]
        return arrow.decode(out.value, GenericResult).batch.column("stopwords")[0].as_py()

    def events(self) -> list[str]:
        return [m.event if isinstance(m, NodeReport) else "ask" for m in self.control]


def ask(text: str) -> pa.Array:
    return arrow.encode(GenericRequest("text.stats", pa.RecordBatch.from_pydict({"text": [text]})))
