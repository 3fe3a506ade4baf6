"""Serving a model node's requests on a worker thread: in order, cancellable, within a deadline.

The node's main thread keeps reading dora events (so a ``cancel`` is seen
while a reply streams) and hands requests to :class:`RequestWorker`, which runs
them one at a time on its own thread through :class:`~mofa_omni.host.ModelHost`
and sends what they produce. Every request ends in results or an explicit error:
``cancelled`` when asked, ``timeout`` past its deadline (queued or running).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from mofa_omni import trace
from mofa_omni.host import ModelHost, Outgoing
from mofa_omni.platform import prepare_compute_thread

log = logging.getLogger("mofa_omni.serving")

CANCEL_INPUT = "cancel"
_REMEMBERED_CANCELS = 1024  # a cancelled id also drops requests of that id still to come


@dataclass
class _Job:
    deadline: float
    input_id: str
    value: pa.Array
    metadata: dict[str, Any]


def cancelled_ids(value: pa.Array) -> list[str]:
    """The request ids in a ``cancel`` message: a string array (or a struct with ``request_id``)."""
    if pa.types.is_struct(value.type):
        value = value.field("request_id")
    return [str(v) for v in value.to_pylist() if v is not None]


class RequestWorker:
    """One worker thread that builds the host (loads the model) and serves its requests in order.

    The model is loaded on the thread that runs it: MLX keeps lazily built arrays on
    the stream of the thread that made them. Requests that arrive while it loads wait
    in the queue (and their deadlines run).
    """

    def __init__(self, make_host: Callable[[], ModelHost], send: Callable[[Outgoing], None],
                 timeout_s: float = 120.0):
        self.make_host, self.send, self.timeout_s = make_host, send, timeout_s
        self.host: ModelHost | None = None
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._cancelled: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="request-worker", daemon=True)
        self._thread.start()

    def submit(self, input_id: str, value: pa.Array, metadata: dict[str, Any] | None) -> None:
        self._jobs.put(_Job(time.monotonic() + self.timeout_s, input_id, value, dict(metadata or {})))

    def cancel(self, request_id: str) -> None:
        """Stop ``request_id`` if it runs, and drop it (and later requests of that id) if queued."""
        with self._lock:
            self._cancelled[request_id] = None
            while len(self._cancelled) > _REMEMBERED_CANCELS:
                self._cancelled.popitem(last=False)

    def is_cancelled(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._cancelled

    def drain(self) -> None:
        """Finish everything queued, then stop the thread."""
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        prepare_compute_thread()
        self.host = self.make_host()
        while (job := self._jobs.get()) is not None:
            request_id = str(job.metadata.get("request_id", ""))

            def should_stop(job: _Job = job, request_id: str = request_id) -> str | None:
                if request_id and self.is_cancelled(request_id):
                    return "cancelled"
                if time.monotonic() > job.deadline:
                    return "timeout"
                return None

            trace.record(self.host.node_id, "start", job.input_id, job.metadata)
            try:
                for out in self.host.handle(job.input_id, job.value, job.metadata, should_stop):
                    self.send(out)
            except Exception:  # sending failed (dora gone?): log, keep the thread alive
                log.exception("could not send the reply to %s", request_id or job.input_id)
