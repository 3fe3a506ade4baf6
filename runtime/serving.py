"""Serving a model node's requests on a worker thread: in order, cancellable, within a deadline.

The node's main thread keeps reading dora events (so a ``cancel`` is seen
while a reply streams) and hands requests to :class:`RequestWorker`, which runs
them one at a time on its own thread through :class:`~mofa_omni.host.ModelHost`
and sends what they produce; with a scheduler in the graph it also loads,
unloads and switches the model as granted, between two requests. Every request ends in results or an explicit error:
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
from mofa_omni.admission import SchedulerLink
from mofa_omni.control import Command
from mofa_omni.host import ModelHost, Outgoing
from mofa_omni.platform import prepare_compute_thread
from mofa_omni.residency import ModelSlot

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


_WAKE = object()  # wakes the worker so that it applies a scheduler command between requests


class RequestWorker:
    """One worker thread that loads the slot's model and serves its requests in order.

    The model is loaded on the thread that runs it: MLX keeps lazily built arrays on
    the stream of the thread that made them. Requests that arrive while it loads wait
    in the queue (and their deadlines run).

    With a :class:`~mofa_omni.admission.SchedulerLink` the worker loads only what the
    scheduler grants: it asks at start and again when a request finds the model
    evicted, and applies the scheduler's commands (unload, switch to another variant)
    between two requests, so a switch loses none: requests wait during it.
    """

    def __init__(self, slot: ModelSlot, send: Callable[[Outgoing], None],
                 timeout_s: float = 120.0, link: SchedulerLink | None = None):
        self.slot, self.send, self.timeout_s, self.link = slot, send, timeout_s, link
        self._jobs: queue.Queue[_Job | object | None] = queue.Queue()
        self._commands: queue.Queue[Command] = queue.Queue()
        self._cancelled: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._drained = threading.Event()
        self._queued = 0
        self._thread = threading.Thread(target=self._run, name="request-worker", daemon=True)
        self._thread.start()

    @property
    def host(self) -> ModelHost:
        return self.slot.host

    def queue_length(self) -> int:
        """Requests waiting to start."""
        with self._lock:
            return self._queued

    def submit(self, input_id: str, value: pa.Array, metadata: dict[str, Any] | None) -> None:
        with self._lock:
            self._queued += 1
        self._jobs.put(_Job(time.monotonic() + self.timeout_s, input_id, value, dict(metadata or {})))

    def command(self, command: Command) -> None:
        """A scheduler decision for this node: applied before the next request starts."""
        self._commands.put(command)
        self._jobs.put(_WAKE)

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
        """Finish everything queued, then unload the model."""
        self._jobs.put(None)
        self._drained.wait()

    def _run(self) -> None:
        prepare_compute_thread()
        if self.link:
            self.link.ask()
        else:
            self.slot.load()
        while True:
            self._apply_commands()
            job = self._jobs.get()
            if job is None:
                break
            if job is _WAKE:
                continue
            with self._lock:
                self._queued -= 1
            if self.link and not self._admitted(job):
                continue
            self._serve(job)
        if self.link:
            self.link.stop()
        self.slot.unload()
        self._drained.set()
        # Stay parked until the process exits: MLX aborts at exit (std::terminate) when the
        # thread that made a stream and freed arrays on it has ended (measured: 4 runs in 5).
        threading.Event().wait()

    def _serve(self, job: _Job) -> None:
        request_id = str(job.metadata.get("request_id", ""))

        def should_stop() -> str | None:
            if request_id and self.is_cancelled(request_id):
                return "cancelled"
            if time.monotonic() > job.deadline:
                return "timeout"
            return None

        self._set_state("busy", "busy")
        trace.record(self.host.node_id, "start", job.input_id, job.metadata)
        try:
            for out in self.host.handle(job.input_id, job.value, job.metadata, should_stop):
                self.send(out)
        except Exception:  # sending failed (dora gone?): log, keep the thread alive
            log.exception("could not send the reply to %s", request_id or job.input_id)
        if self.queue_length() == 0:
            self._set_state("ready", "idle")

    def _admitted(self, job: _Job) -> bool:
        """Wait until the scheduler grants the model (asking if needed); False if the job was
        answered with an error instead (refused, or past its deadline)."""
        while not (self.slot.loaded or self.host.unavailable or self.link.detached):
            if not self.link.asked:
                self.link.ask()
            try:
                command = self._commands.get(timeout=max(job.deadline - time.monotonic(), 0))
            except queue.Empty:
                self._reject(job, "timeout", "waited for memory to load "
                                             f"{self.slot.wanted.name} until the deadline")
                return False
            if command.action == "refuse":
                self.link.state = "evicted"
                self._reject(job, "unavailable", f"the scheduler refused "
                                                 f"{self.slot.wanted.name}: {command.reason}")
                return False
            self._apply(command)
        if not self.slot.loaded and self.link.detached and not self.host.unavailable:
            self._load("load", self.slot.wanted.name)
        return True

    def _apply_commands(self) -> None:
        while True:
            try:
                self._apply(self._commands.get_nowait())
            except queue.Empty:
                return

    def _apply(self, command: Command) -> None:
        reason = f"({command.reason})" if command.reason else ""
        log.info("scheduler: %s", " ".join(filter(None, [command.action, command.model, reason])))
        loaded = self.slot.loaded
        if command.action == "load" and not loaded:
            self._load("loading", command.model)
        elif command.action == "switch" and loaded:
            self._load("switching", command.model)
        elif command.action == "switch" or (command.action == "unload" and not loaded):
            self.link.report("unloaded")  # it holds nothing: tell the scheduler so
        elif command.action == "unload":
            self.slot.unload()
            self._set_state("evicted", "unloaded")
        elif command.action == "wait":
            self.link.state = "waiting"
        elif command.action == "refuse" and not loaded:
            self.link.state = "evicted"  # the next request asks again

    def _load(self, state: str, model: str) -> None:
        if self.link:
            self.link.state = state
        outcome = self.slot.load(model)
        if self.link:
            self._set_state("ready" if outcome else "unavailable",
                            "loaded" if outcome else "load_failed", outcome)

    def _set_state(self, state: str, event: str, outcome=None) -> None:
        if self.link:
            self.link.state = state
            self.link.report(event, outcome, detail=self.host.unavailable)

    def _reject(self, job: _Job, kind: str, message: str) -> None:
        self.send(self.host.reject(job.metadata, kind, message))
