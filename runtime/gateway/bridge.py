"""The gateway's bridge to the dataflow: requests go out to model nodes, replies come back by
request id.

:class:`Replies` hands the results and errors the node's dora thread receives to
the asyncio task waiting for them; :class:`Graph` sends requests into the dataflow
(again, when dora dropped them) and :class:`Answer` yields one request's results,
falling back to a remote model when the local one cannot answer, and raising
:class:`~mofa_omni.gateway.openai_bodies.ApiError` for a node's error or past the
request's deadline (504), including when the reply never comes.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ErrorKind
from mofa_omni.contract.tasks import ErrorReport
from mofa_omni.gateway.openai_bodies import ApiError, node_error
from mofa_omni.gateway.routes import Choice, Route, Router
from mofa_omni.gateway.settings import Settings

log = logging.getLogger("mofa_omni.gateway.bridge")

# A local model that cannot answer with these: the remote one serving the task is asked.
FALLBACK_KINDS = frozenset({ErrorKind.UNAVAILABLE, ErrorKind.TIMEOUT})
RESENDS = 2  # times a request dora dropped is sent again

Send = Callable[[str, pa.Array, dict[str, Any]], int]  # returns the message's stream_seq


@dataclass(frozen=True, slots=True)
class Reply:
    """What a model node sent back for a request."""

    kind: str  # "result" or "error"
    value: pa.Array
    metadata: dict[str, Any]


class Replies:
    """Results and errors by request id, from the dora thread to the waiting asyncio task."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, asyncio.Queue[Reply]] = {}
        self._lock = threading.Lock()
        # Replies to requests nobody waits for any more (given up, cancelled), by kind:
        # "result", or "error:<kind>" ("error:cancelled": a node confirming a cancel).
        self.unclaimed: collections.Counter[str] = collections.Counter()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._queues)

    def open(self, request_id: str) -> asyncio.Queue[Reply]:
        queue: asyncio.Queue[Reply] = asyncio.Queue()
        with self._lock:
            self._queues[request_id] = queue
        return queue

    def close(self, request_id: str) -> None:
        with self._lock:
            self._queues.pop(request_id, None)

    def deliver(self, request_id: str, reply: Reply) -> None:
        """Called on the dora thread."""
        with self._lock:
            queue = self._queues.get(request_id)
        if queue is None or self.loop is None:
            kind = reply.kind
            if kind == "error":
                kind += ":" + arrow.decode(reply.value, ErrorReport).kind
            self.unclaimed[kind] += 1
            return
        self.loop.call_soon_threadsafe(queue.put_nowait, reply)


@dataclass(slots=True)
class _Sent:
    answer: Answer
    output: str
    value: pa.Array
    metadata: dict[str, Any]
    resends: int = 0


class Graph:
    """Sends requests into the dataflow; each :class:`Answer` yields one request's results.

    Requests dora dropped on their way to a model node (which says so on its ``lost``
    output, naming the stream numbers) are sent again, up to RESENDS times. Runs on the
    event loop's thread.
    """

    def __init__(self, router: Router, replies: Replies, send: Send, settings: Settings):
        self.router, self.replies, self.send, self.settings = router, replies, send, settings
        self._ids = itertools.count(1)
        self._awaiting: dict[tuple[str, int], _Sent] = {}  # (output, stream_seq) -> request
        self.resent = 0

    def ask(self, choice: Choice, message: Any, result_type: type) -> Answer:
        """A new request of ``message`` to ``choice``; iterating the answer sends it."""
        return Answer(self, choice, message, result_type, f"gw-{next(self._ids)}")

    def send_request(self, sent: _Sent) -> tuple[str, int]:
        key = (sent.output, self.send(sent.output, sent.value, sent.metadata))
        self._awaiting[key] = sent
        return key

    def answered(self, key: tuple[str, int] | None) -> None:
        if key is not None:
            self._awaiting.pop(key, None)

    def resend_lost(self, node: str, input_id: str, first: int, last: int) -> None:
        """``node`` never got messages ``first`` .. ``last`` of its input ``input_id``."""
        outputs = {r.output for r in self.router.routes if r.node == node and r.input == input_id}
        for output in outputs:
            for seq in range(first, last + 1):
                sent = self._awaiting.pop((output, seq), None)
                if sent is None or sent.resends >= RESENDS:
                    continue
                sent.resends += 1
                self.resent += 1
                log.warning("dora dropped %s on its way to %s: sending it again",
                            sent.metadata.get("request_id"), node)
                sent.answer.sent_as = self.send_request(sent)


class Answer:
    """The results of one request, as they come, from the node that answers it.

    The fallback route answers when the primary cannot (an ``unavailable`` or
    ``timeout`` error, or no first result within ``fallback_after_s``). Raises
    :class:`ApiError` for a node's error or past the deadline. :meth:`cancel` stops the
    generation on the node (a client that went away).
    """

    def __init__(self, graph: Graph, choice: Choice, message: Any, result_type: type,
                 request_id: str):
        self.graph, self.choice, self.message, self.result_type = graph, choice, message, result_type
        self.request_id = request_id
        self.model = choice.primary.model  # the model that answers, once it has
        self.deadline = time.monotonic() + graph.settings.deadline_s
        self._in_flight: tuple[Route, str] | None = None  # (route, request id) not finished
        self.sent_as: tuple[str, int] | None = None  # (output, stream_seq) of the request

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._results()

    async def _results(self) -> AsyncIterator[Any]:
        choice, settings = self.choice, self.graph.settings
        first_within = settings.fallback_after_s if choice.fallback and \
            settings.fallback_after_s else None
        try:
            async for result in self._from(choice.primary, self.request_id, first_within):
                yield result
            return
        except _FallBack as reason:
            log.warning("%s could not answer %s (%s): asking %s", choice.primary.node,
                        self.request_id, reason, choice.fallback.node)
        async for result in self._from(choice.fallback, f"{self.request_id}-fallback", None):
            yield result

    async def _from(self, route: Route, request_id: str,
                    first_within: float | None) -> AsyncIterator[Any]:
        graph = self.graph
        queue = graph.replies.open(request_id)
        try:
            self.sent_as = graph.send_request(_Sent(self, route.output, arrow.encode(self.message),
                                                    {"request_id": request_id,
                                                     "origin_ns": time.time_ns()}))
            self._in_flight = (route, request_id)  # sent: a refused one has nothing to cancel
            first = True
            while True:
                reply = await self._next(queue, route, first_within if first else None)
                if reply.kind == "error":
                    self._in_flight = None
                    error = arrow.decode(reply.value, ErrorReport)
                    if first and error.kind in FALLBACK_KINDS and self.choice.fallback and \
                            route is self.choice.primary:
                        raise _FallBack(f"{error.kind}: {error.message}")
                    raise node_error(error.kind, f"{route.node}: {error.message}")
                if first:  # the model that answers (after `omni swap`, not the one at start)
                    self.model = str(reply.metadata.get("model") or route.model)
                    graph.router.node_serves(route.node, self.model)
                first = False
                if reply.metadata.get("final", True):
                    self._in_flight = None
                yield arrow.decode(reply.value, self.result_type)
                if self._in_flight is None:
                    return
        finally:
            self.cancel()
            graph.replies.close(request_id)
            graph.answered(self.sent_as)

    async def _next(self, queue: asyncio.Queue[Reply], route: Route,
                    first_within: float | None) -> Reply:
        wait = self.deadline - time.monotonic()
        if first_within is not None:
            wait = min(wait, first_within)
        try:
            return await asyncio.wait_for(queue.get(), max(wait, 0))
        except TimeoutError:
            if first_within is not None and time.monotonic() < self.deadline:
                raise _FallBack(f"no result within {first_within:g} s") from None
            raise ApiError(ErrorKind.TIMEOUT, f"{route.node} did not answer within "
                                              f"{self.graph.settings.deadline_s:g} s",
                           code="timeout") from None

    def cancel(self) -> None:
        """Stop the request on its node if it has not finished (idempotent)."""
        if self._in_flight is None:
            return
        route, request_id = self._in_flight
        self._in_flight = None
        self.graph.replies.close(request_id)  # what still comes for it is unclaimed
        if route.cancel:
            self.graph.send(route.cancel, pa.array([request_id]), {"request_id": request_id})
            log.info("cancelled %s on %s", request_id, route.node)


class _FallBack(Exception):
    """The primary route cannot answer: the fallback should."""
