"""The node host: serves a loaded model's tasks to Arrow requests, independent of dora.

A request arrives on an input named after its task (``text_generation``,
``speech_recognition``, ...) or on ``request`` for the model's first task. Its
results leave on ``result`` (streamed tasks send several, the last ``final``),
and anything that goes wrong leaves on ``error`` as an :class:`ErrorReport`
naming the request — the host itself keeps serving.

Every message carries :class:`MessageMeta` (request id, sequence number,
final flag, origin and send timestamps) in dora's metadata.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ContractError, ErrorKind, OmniError
from mofa_omni.contract.tasks import TASK_SPECS, ErrorReport, Task, ends_reply
from mofa_omni.node.batching import BatchServe, batch_serve
from mofa_omni.voice.streaming import RecognitionStreams

log = logging.getLogger("mofa_omni.node.host")

RESULT_OUTPUT = "result"
ERROR_OUTPUT = "error"
PRIMARY_INPUT = "request"


def dora_node_id(default: str = "node") -> str:
    """This process's node id in the running dataflow (dora passes it in DORA_NODE_CONFIG)."""
    match = re.search(r"^node_id:\s*(\S+)", os.environ.get("DORA_NODE_CONFIG", ""), re.MULTILINE)
    return match.group(1) if match else default


@dataclass(frozen=True, slots=True)
class MessageMeta:
    """What every message carries, so latency per stage is traceable and gaps are seen."""

    request_id: str
    seq: int = 0
    final: bool = True
    origin_ns: int = 0  # when the request entered the graph
    sent_ns: int = 0  # when this message was sent
    model: str = ""  # the model that produced it (a node's model can be swapped)

    def to_dora(self) -> dict[str, Any]:
        meta = {"request_id": self.request_id, "seq": self.seq, "final": self.final,
                "origin_ns": self.origin_ns, "sent_ns": self.sent_ns}
        return meta | {"model": self.model} if self.model else meta

    @classmethod
    def from_dora(cls, metadata: dict[str, Any] | None, fallback_id: str) -> MessageMeta:
        metadata = metadata or {}
        return cls(str(metadata.get("request_id") or fallback_id), int(metadata.get("seq", 0)),
                   bool(metadata.get("final", True)),
                   int(metadata.get("origin_ns") or time.time_ns()), int(metadata.get("sent_ns", 0)))


@dataclass(frozen=True, slots=True)
class Outgoing:
    output: str
    value: pa.Array
    meta: MessageMeta


StopCheck = Callable[[], ErrorKind | None]  # CANCELLED / TIMEOUT when a request must stop


def _never() -> str | None:
    return None


@dataclass(frozen=True, slots=True)
class Route:
    """How an input is served: the request type it carries and the callable serving it."""

    request_type: type
    serve: Callable[[Any], Any]
    streams: bool  # ``serve`` yields several results, the last one ``final``
    # serves a request sent in several messages, each a snapshot replacing the one before
    # (speech recognition, see TranscriptionRequest): (request id, final, request) -> result,
    # None for a snapshot that gets no answer
    serve_snapshot: Callable[[str, bool, Any], Any] | None = None


class RequestHost(ABC):
    """Serves requests arriving as Arrow and turns results into outgoing messages.

    Several requests may share a request id (the sentences of one reply, sent to a
    TTS one by one, each marked ``final: false`` but the last): their results then
    form one stream, numbered on from request to request, final only at the end.
    """

    def __init__(self, node_id: str, unavailable: str = ""):
        self.node_id = node_id
        self.unavailable = unavailable  # why it cannot serve (e.g. its weights are corrupt)
        self._ids = itertools.count(1)
        self._next_seq: dict[str, int] = {}  # streams still open, by request id

    @abstractmethod
    def route(self, input_id: str) -> Route:
        """How requests on ``input_id`` are served; ContractError if they cannot be."""

    @property
    @abstractmethod
    def served_name(self) -> str:
        """What results name as their producer (the model, or the stages)."""

    def batch_route(self, input_id: str) -> BatchServe | None:
        """How requests on ``input_id`` are served several at a time, or None (one by one)."""
        return None

    def takes_snapshots(self, input_id: str) -> bool:
        """Whether a request on ``input_id`` sent in several messages is a series of snapshots,
        each replacing the one before (a newer one makes an older one not worth serving)."""
        return False

    def parallel(self, input_id: str) -> int:
        """How many requests on ``input_id`` may be served at once (1: one after another)."""
        return 1

    def handle(self, input_id: str, value: pa.Array, metadata: dict[str, Any] | None = None,
               should_stop: StopCheck = _never) -> Iterator[Outgoing]:
        """Serve one request; yields its results, or one error, never raises.

        ``should_stop`` is asked before the work starts and between streamed
        results; when it names a reason the model is stopped and the request
        ends with an error of that kind.
        """
        incoming = MessageMeta.from_dora(metadata, f"{self.node_id}-{next(self._ids)}")
        results = None
        try:
            if reason := should_stop():
                yield self._error(incoming, reason, f"request {reason} before it started")
                return
            if self.unavailable:
                yield self._error(incoming, ErrorKind.UNAVAILABLE, self.unavailable)
                return
            route = self.route(input_id)
            request = arrow.decode(value, route.request_type)
            if route.serve_snapshot is None:
                results = route.serve(request)
            elif (results := route.serve_snapshot(incoming.request_id, incoming.final,
                                                  request)) is None:
                return
            if not route.streams:
                yield self._result(results, incoming, True)
                return
            # Streamed results mark their own last item (``final``): no look-ahead delay.
            for result in results:
                if reason := should_stop():
                    yield self._error(incoming, reason, f"request {reason} while it ran")
                    return
                yield self._result(result, incoming, ends_reply(request, result))
        except ContractError as error:  # the caller's mistake: no traceback in the log
            yield self._error(incoming, error.kind, str(error))
        except OmniError as error:  # the server's state (not loaded, cannot load, ...)
            log.warning("request %s: %s: %s", incoming.request_id, type(error).__name__, error)
            yield self._error(incoming, error.kind, str(error))
        except Exception as error:  # the model failed on this request: report, keep serving
            log.exception("request %s failed", incoming.request_id)
            yield self._error(incoming, ErrorKind.INTERNAL, f"{type(error).__name__}: {error}")
        finally:
            if hasattr(results, "close"):
                results.close()  # a stopped generator stops the model's work at once

    def _result(self, result: Any, incoming: MessageMeta, last_of_request: bool) -> Outgoing:
        rid = incoming.request_id
        seq = self._next_seq.pop(rid, 0)
        final = last_of_request and incoming.final
        if not final:
            self._next_seq[rid] = seq + 1
        meta = MessageMeta(rid, seq, final, incoming.origin_ns, time.time_ns(), self.served_name)
        return Outgoing(RESULT_OUTPUT, arrow.encode(result), meta)

    def reject(self, metadata: dict[str, Any] | None, kind: ErrorKind, message: str
               ) -> Outgoing:
        """The error that answers a request this host will not serve (e.g. no memory for it)."""
        return self._error(MessageMeta.from_dora(metadata, f"{self.node_id}-{next(self._ids)}"),
                           kind, message)

    def _error(self, incoming: MessageMeta, kind: ErrorKind, message: str) -> Outgoing:
        log.error("request %s: %s", incoming.request_id, message)
        self._next_seq.pop(incoming.request_id, None)
        report = ErrorReport(incoming.request_id, kind, message, self.node_id)
        meta = MessageMeta(incoming.request_id, 0, True, incoming.origin_ns, time.time_ns())
        return Outgoing(ERROR_OUTPUT, arrow.encode(report), meta)


class ModelHost(RequestHost):
    """Serves the tasks of one loaded adapter, each on the input named after it; ``request``
    carries ``task`` (the node's TASK), or else the model's first task."""

    def __init__(self, adapter: ModelAdapter, node_id: str = "omni-node",
                 unavailable: str = "", task: Task | None = None):
        super().__init__(node_id, unavailable)
        self.adapter, self.task = adapter, task
        self._recognition: RecognitionStreams | None = None

    @property
    def served_name(self) -> str:
        return self.adapter.spec.name

    def route(self, input_id: str) -> Route:
        task = self.task_for(input_id)
        spec = TASK_SPECS[task]
        serve = self.adapter.handler(task)
        if task is not Task.SPEECH_RECOGNITION:
            return Route(spec.request_type, serve, spec.streams)
        if self._recognition is None or self._recognition.transcribe != serve:
            # the first request, or the model was switched or swapped: its streams start anew
            self._recognition = RecognitionStreams(serve, takes_prefix=getattr(
                self.adapter, "takes_transcription_prefix", False))
        return Route(spec.request_type, serve, spec.streams, self._recognition.serve)

    def takes_snapshots(self, input_id: str) -> bool:
        try:
            return self.task_for(input_id) is Task.SPEECH_RECOGNITION
        except ContractError:
            return False

    def in_stream(self, input_id: str, metadata: dict[str, Any] | None) -> bool:
        """Whether a message on ``input_id`` is part of a request sent in snapshots (served
        one by one, never in a batch)."""
        if not self.takes_snapshots(input_id):
            return False
        metadata = metadata or {}
        return not metadata.get("final", True) or (
            self._recognition is not None
            and self._recognition.is_open(str(metadata.get("request_id", ""))))

    def task_for(self, input_id: str) -> Task:
        if input_id == PRIMARY_INPUT:
            task = self.task or self.adapter.tasks[0]
        else:
            try:
                task = Task(input_id)
            except ValueError:
                raise ContractError(self._input_help(f"input {input_id!r} names no task")) \
                    from None
        if task not in self.adapter.tasks:
            raise ContractError(self._input_help(
                f"model {self.adapter.spec.name!r} does not serve {task.value}"))
        return task

    def batch_route(self, input_id: str) -> BatchServe | None:
        """How requests on ``input_id`` are served several at a time (see
        :mod:`mofa_omni.node.batching`), or None where they are served one by one."""
        if self.unavailable or not self.adapter.loaded:
            return None
        try:
            return batch_serve(self.adapter, self.task_for(input_id))
        except ContractError:
            return None

    def parallel(self, input_id: str) -> int:
        """How many requests on ``input_id`` the loaded model serves at once (its
        :meth:`~mofa_omni.adapters.base.ModelAdapter.parallel_requests`)."""
        if self.unavailable or not self.adapter.loaded:
            return 1
        try:
            return max(1, self.adapter.parallel_requests(self.task_for(input_id)))
        except ContractError:
            return 1

    def handle_batch(self, input_id: str, requests: list[tuple[pa.Array, dict[str, Any] | None,
                                                               StopCheck]]) -> Iterator[Outgoing]:
        """Serve several requests on ``input_id`` in one engine call: yields one result or
        error per request, never raises. A request that cannot be read is answered with its
        error first; one stopped (cancelled, past its deadline) while the batch ran ends in that
        error, the others get their results. A batch the engine fails on is served again one
        request at a time, so that a failing item fails only its own request."""
        serve = self.batch_route(input_id)
        alone = [serve is None or self.in_stream(input_id, metadata)
                 for _, metadata, _ in requests]
        for (value, metadata, should_stop), one_by_one in zip(requests, alone, strict=True):
            if one_by_one:
                yield from self.handle(input_id, value, metadata, should_stop)
        requests = [r for r, one_by_one in zip(requests, alone, strict=True) if not one_by_one]
        if serve is None or not requests:
            return
        request_type = self.route(input_id).request_type
        decoded = []
        for value, metadata, should_stop in requests:
            incoming = MessageMeta.from_dora(metadata, f"{self.node_id}-{next(self._ids)}")
            if reason := should_stop():
                yield self._error(incoming, reason, f"request {reason} before it started")
                continue
            try:
                decoded.append((arrow.decode(value, request_type), incoming, should_stop,
                                (value, metadata)))
            except ContractError as error:
                yield self._error(incoming, error.kind, str(error))
        if not decoded:
            return
        try:
            results = serve([request for request, *_ in decoded])
        except Exception as error:  # noqa: BLE001 -- each request now meets it alone
            log.info("a batch of %d requests failed (%s: %s): serving them one by one",
                     len(decoded), type(error).__name__, error)
            for _, _, should_stop, (value, metadata) in decoded:
                yield from self.handle(input_id, value, metadata, should_stop)
            return
        for result, (_, incoming, should_stop, _) in zip(results, decoded, strict=True):
            if reason := should_stop():
                yield self._error(incoming, reason, f"request {reason} while it ran")
            else:
                yield self._result(result, incoming, True)

    def _input_help(self, problem: str) -> str:
        inputs = [PRIMARY_INPUT, *(t.value for t in self.adapter.tasks)]
        return f"{problem}; this node's inputs are: {', '.join(inputs)}"
