"""The gateway's bridge to the dataflow: requests go out to model nodes, replies come back by
request id.

:class:`Replies` hands the results and errors the node's dora thread receives to
the asyncio task waiting for them; :class:`Graph` sends requests into the dataflow
(again, when dora dropped them) and :class:`Answer` yields one request's results,
falling back to a remote model when the local one cannot answer, and raising
:class:`~mofa_omni.gateway.openai_bodies.ApiError` for a node's error or past the
request's deadline (504), including when the reply never comes.

dora drops messages without a word. A request it dropped is found by the model node
when a later one comes (a gap in the stream numbers, reported on its ``lost``
output); the last request sent, or the last message of a reply, is found through
the scheduler's status instead: each node reports which stream number it expects
next on each input and which requests it answered in full (:class:`Delivery`). A
request the node never received is asked again; a reply whose end never came is
asked again whole where nothing of it reached the client yet (every reply the
client gets at once), and ends in an explicit error where part of it was streamed.

A model node that crashes is restarted by dora where the dataflow says so
(``restart_policy``), which tells the gateway (``NODE_RESTARTED``; ``NODE_FAILED`` once
it gives up): the requests in flight there are asked again (or end in an error, as
above), and until the node answers again a new request for it gets a 503 with
``Retry-After`` at once — or goes to the task's remote fallback — instead of waiting.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ErrorKind
from mofa_omni.contract.tasks import ErrorReport
from mofa_omni.gateway.openai_bodies import ApiError, node_error
from mofa_omni.gateway.routes import Choice, Route, Router
from mofa_omni.gateway.settings import Settings
from mofa_omni.node.delivery import ARRIVAL_NS, RESENDS  # shared with the voice dialogue
from mofa_omni.scheduler.messages import NodeStatus

log = logging.getLogger("mofa_omni.gateway.bridge")

# A local model that cannot answer with these: the remote one serving the task is asked.
FALLBACK_KINDS = frozenset({ErrorKind.UNAVAILABLE, ErrorKind.TIMEOUT})
# A reply the node says it ended but whose last message has not come this long after: lost.
# (The reply comes straight from the node, the report through the scheduler: slower.)
TAIL_GRACE_NS = 2_000_000_000
RETRY_AFTER_S = 5  # what a client is told to wait for a node restarting after a crash
RESTART_POLL_S = 0.1  # how often a request that waits for a restarting node looks again
# How long the request being served may wait for a node that is restarting after a crash, set
# per HTTP request (the client's X-Omni-Wait-For-Restart header): 0, the default, refuses at
# once with a 503 and Retry-After.
WAIT_FOR_RESTART_S: contextvars.ContextVar[float] = contextvars.ContextVar(
    "wait_for_restart_s", default=0.0)


@dataclass(frozen=True, slots=True)
class Down:
    """Why a model node cannot take requests now, and since when (time.time_ns)."""

    reason: str
    since_ns: int
    for_good: bool = False  # dora gave up restarting it

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
        """Hand ``reply`` to the task waiting for it (from any thread)."""
        self.deliver_all([(request_id, reply)])

    def deliver_all(self, replies: list[tuple[str, Reply]]) -> None:
        """Hand replies to their waiting tasks in one wake-up of the event loop: the dora
        thread passes on together what came together (a decode step of several streams)."""
        with self._lock:
            waiting = [(self._queues.get(request_id), reply) for request_id, reply in replies]
        claimed = []
        for queue, reply in waiting:
            if queue is not None and self.loop is not None:
                claimed.append((queue, reply))
                continue
            kind = reply.kind
            if kind == "error":
                kind += ":" + arrow.decode(reply.value, ErrorReport).kind
            self.unclaimed[kind] += 1
        if claimed:
            self.loop.call_soon_threadsafe(_put_each, claimed)


def _put_each(replies: list[tuple[asyncio.Queue[Reply], Reply]]) -> None:
    for queue, reply in replies:
        queue.put_nowait(reply)


@dataclass(slots=True)
class HeldReplies:
    """Replies the dora thread holds to hand over together (one wake-up of the event loop for
    a decode step of several streams), for at most ``hold_s`` after the first was held: dora's
    "more is queued" can stay true while a fast model streams, and a reply held until the
    queue ran dry would reach its client in one piece at the end."""

    hold_s: float
    replies: list[tuple[str, Reply]] = field(default_factory=list)
    since: float = 0.0  # monotonic seconds the oldest held reply came

    def add(self, request_id: str, reply: Reply, now: float) -> None:
        if not self.replies:
            self.since = now
        self.replies.append((request_id, reply))

    def due(self, now: float, more_queued: bool) -> bool:
        """Whether to hand the held replies over now: nothing more is queued, or the oldest
        has waited its time."""
        return bool(self.replies) and (not more_queued or now - self.since >= self.hold_s)

    def wait_s(self, now: float) -> float | None:
        """How long the next event may be awaited: for ever with nothing held, else what is
        left of the oldest's time (never 0, which dora reads as no timeout)."""
        if not self.replies:
            return None
        return max(self.since + self.hold_s - now, 1e-4)

    def take(self) -> list[tuple[str, Reply]]:
        replies, self.replies = self.replies, []
        return replies


@dataclass(slots=True)
class _Sent:
    answer: Answer
    route: Route
    value: pa.Array
    metadata: dict[str, Any]
    resends: int = 0
    sent_ns: int = 0  # when it was last sent (time.time_ns)
    ended_seen_ns: int = 0  # when a report first said the node had answered it in full
    request_id: str = field(init=False)

    def __post_init__(self) -> None:
        self.request_id = str(self.metadata["request_id"])


class Graph:
    """Sends requests into the dataflow; each :class:`Answer` yields one request's results.

    Requests dora dropped on their way to a model node (which says so on its ``lost``
    output, naming the stream numbers) are sent again, up to RESENDS times; those found
    lost through the nodes' reports (:meth:`check_delivery`) are asked again by their
    answers. Runs on the event loop's thread.
    """

    def __init__(self, router: Router, replies: Replies, send: Send, settings: Settings):
        self.router, self.replies, self.send, self.settings = router, replies, send, settings
        self._ids = itertools.count(1)
        self._awaiting: dict[tuple[str, int], _Sent] = {}  # (output, stream_seq) -> request
        self.resent = 0  # requests dora dropped on their way to a node, sent again
        self.asked_again = 0  # requests asked again because dora dropped (part of) their reply
        self.down: dict[str, Down] = {}  # model nodes that crashed, until they answer again

    def ask(self, choice: Choice, message: Any, result_type: type | tuple[type, ...],
            deadline_s: float | None = None) -> Answer:
        """A new request of ``message`` to ``choice``; iterating the answer sends it. It must
        end within ``deadline_s`` (default: the settings' ``deadline_s``; a video takes more)."""
        return Answer(self, choice, message, result_type, f"gw-{next(self._ids)}", deadline_s)

    def send_request(self, sent: _Sent) -> tuple[str, int]:
        sent.sent_ns = time.time_ns()
        key = (sent.route.output, self.send(sent.route.output, sent.value, sent.metadata))
        self._awaiting[key] = sent
        return key

    def answered(self, key: tuple[str, int] | None) -> None:
        if key is not None:
            self._awaiting.pop(key, None)

    def node_crashed(self, node: str, *, for_good: bool = False) -> None:
        """dora restarted ``node`` after a crash (or, ``for_good``, gave up on it): what was in
        flight there is lost; new requests are refused until it answers again."""
        reason = ("crashed and was given up after its restarts (see omni status; restart the "
                  "graph)" if for_good else "restarting after a crash")
        log.error("%s %s", node, reason)
        self.down[node] = Down(reason, time.time_ns(), for_good)
        for key, sent in list(self._awaiting.items()):
            if sent.route.node == node:
                del self._awaiting[key]
                sent.answer.lost(sent.request_id, f"the reply to {{request_id}} ({node} crashed)")

    def node_is_back(self, node: str) -> None:
        """``node`` answered (or reported ready) after a restart."""
        down = self.down.get(node)
        if down is not None and not down.for_good:
            del self.down[node]
            log.info("%s is back after its restart", node)

    def check_delivery(self, nodes: Iterable[NodeStatus], now_ns: int | None = None) -> None:
        """Compare what the nodes report they received and answered (the scheduler's status)
        with the requests still waiting: the answer of one that never arrived, or whose
        reply's end never came, is told so and asks again."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        nodes = list(nodes)
        for status in nodes:  # a restarted node that reports ready again is back
            down = self.down.get(status.node)
            if down and status.state in ("ready", "busy") and status.delivery.at_ns > down.since_ns:
                self.node_is_back(status.node)
        reported = {status.node: status.delivery for status in nodes}
        for key, sent in list(self._awaiting.items()):
            delivery = reported.get(sent.route.node)
            if delivery is None:
                continue
            if sent.request_id in delivery.answered:
                if not sent.ended_seen_ns:
                    sent.ended_seen_ns = now_ns
                elif now_ns - sent.ended_seen_ns >= TAIL_GRACE_NS:
                    del self._awaiting[key]
                    sent.answer.lost(sent.request_id, "the end of the reply to {request_id}")
            elif delivery.at_ns >= sent.sent_ns + ARRIVAL_NS and \
                    delivery.received.get(sent.route.input, 0) <= key[1]:
                del self._awaiting[key]  # a report made well after it was sent has not seen it
                sent.answer.lost(sent.request_id, "{request_id}")

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
    generation on the node (a client that went away). :meth:`whole` gathers every result
    for a client that gets them at once.
    """

    def __init__(self, graph: Graph, choice: Choice, message: Any,
                 result_type: type | tuple[type, ...], request_id: str,
                 deadline_s: float | None = None):
        self.graph, self.choice, self.message = graph, choice, message
        # one type, or several told apart by their schema (an omni reply: text, then speech)
        self.result_types = result_type if isinstance(result_type, tuple) else (result_type,)
        self.request_id = request_id
        self.model = choice.primary.model  # the model that answers, once it has
        self.deadline_s = graph.settings.deadline_s if deadline_s is None else deadline_s
        self.deadline = time.monotonic() + self.deadline_s
        self._in_flight: tuple[Route, str] | None = None  # (route, request id) not finished
        self.sent_as: tuple[str, int] | None = None  # (output, stream_seq) of the request
        self._whole = False  # the results go to the client at once: a lost end is asked again
        self.wait_for_restart_s = WAIT_FOR_RESTART_S.get()
        self._replies: asyncio.Queue[Reply] | None = None  # the current sending's replies

    def arrived(self) -> int:
        """How many replies have come and wait to be read: the next that many results (or an
        error) are there without waiting."""
        return self._replies.qsize() if self._replies is not None else 0

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._results()

    async def whole(self) -> list[Any]:
        """Every result, for a client that gets them at once: a reply whose end dora dropped
        is asked for again, whole."""
        self._whole = True
        results: list[Any] = []
        async for result in self._results():
            if result is _ASKED_AGAIN:
                results.clear()
            else:
                results.append(result)
        return results

    def lost(self, request_id: str, what: str) -> None:
        """``what`` (``"{request_id}"``, or the end of its reply) was lost in the dataflow."""
        self.graph.replies.deliver(request_id, Reply("lost", pa.array([what]),
                                                     {"request_id": request_id}))

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
        asked_as = request_id
        await self._wait_for_restart(route)
        for again in range(RESENDS + 1):
            self._check_up(route, accepted=again > 0)
            if again:
                asked_as = f"{request_id}-again{again}"
                if self._whole:
                    yield _ASKED_AGAIN
            lost = None
            async for result in self._asked(route, asked_as, first_within):
                if isinstance(result, _Lost):
                    lost = result
                else:
                    yield result
            if lost is None:
                return
            if lost.results and not self._whole:
                raise node_error(ErrorKind.LOST, f"{route.node}: {lost.what} was lost in the "
                                                 f"dataflow after part of the reply was "
                                                 f"streamed; asking again is safe")
            log.warning("%s: %s was lost in the dataflow: asking again", route.node, lost.what)
            self.graph.asked_again += 1
        raise node_error(ErrorKind.LOST, f"{route.node}: {request_id} was lost in the dataflow "
                                         f"{RESENDS + 1} times")

    async def _wait_for_restart(self, route: Route) -> None:
        """A client that said it would wait (``wait_for_restart_s``) waits that long, within
        its deadline, for a node restarting after a crash to be back."""
        until = min(time.monotonic() + self.wait_for_restart_s, self.deadline)
        while (down := self.graph.down.get(route.node)) is not None and not down.for_good \
                and time.monotonic() < until:
            await asyncio.sleep(RESTART_POLL_S)

    def _check_up(self, route: Route, *, accepted: bool) -> None:
        """Refuse at once a request for a node that is down: a new one while it restarts (one
        accepted before waits for it: it is asked again), any once dora gave up on it."""
        down = self.graph.down.get(route.node)
        if down is None or (accepted and not down.for_good):
            return
        if route is self.choice.primary and self.choice.fallback:
            raise _FallBack(f"{route.node} {down.reason}")
        raise ApiError(ErrorKind.UNAVAILABLE, f"{route.node} {down.reason}", code="unavailable",
                       retry_after_s=None if down.for_good else RETRY_AFTER_S)

    async def _asked(self, route: Route, request_id: str,
                     first_within: float | None) -> AsyncIterator[Any]:
        """The results of one sending of the request; a :class:`_Lost` last when the request
        or its reply's end was lost on the way."""
        graph = self.graph
        queue = self._replies = graph.replies.open(request_id)
        try:
            self.sent_as = graph.send_request(_Sent(self, route, arrow.encode(self.message),
                                                    {"request_id": request_id,
                                                     "origin_ns": time.time_ns()}))
            self._in_flight = (route, request_id)  # sent: a refused one has nothing to cancel
            first, results = True, 0
            while True:
                reply = await self._next(queue, route, first_within if first else None)
                if reply.kind == "lost":
                    what = str(reply.value[0].as_py()).format(request_id=request_id)
                    yield _Lost(what, results)
                    return
                if reply.kind == "result" and int(reply.metadata.get("seq", results)) != results:
                    # a result in the middle of the reply never came (dora dropped it): said,
                    # not passed over -- a reply missing a token would look whole
                    yield _Lost(f"result {results} of the reply to {request_id}", results)
                    return
                if route.node in graph.down:  # it answers: back after its restart
                    graph.node_is_back(route.node)
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
                results += 1
                yield (arrow.decode(reply.value, self.result_types[0])
                       if len(self.result_types) == 1
                       else arrow.decode_one_of(reply.value, self.result_types))
                if self._in_flight is None:
                    return
        finally:
            self._replies = None
            self.cancel()
            graph.replies.close(request_id)
            graph.answered(self.sent_as)

    async def _next(self, queue: asyncio.Queue[Reply], route: Route,
                    first_within: float | None) -> Reply:
        wait = self.deadline - time.monotonic()
        if first_within is not None:
            wait = min(wait, first_within)
        if wait > 0 and not queue.empty():  # it came while the last was passed on
            return queue.get_nowait()
        try:  # not wait_for: a task and a future more for every streamed token
            async with asyncio.timeout(max(wait, 0)):
                return await queue.get()
        except TimeoutError:
            if first_within is not None and time.monotonic() < self.deadline:
                raise _FallBack(f"no result within {first_within:g} s") from None
            raise ApiError(ErrorKind.TIMEOUT, f"{route.node} did not answer within "
                                              f"{self.deadline_s:g} s",
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


@dataclass(frozen=True, slots=True)
class _Lost:
    what: str  # what was lost: the request (its id), or the end of its reply
    results: int  # results of this sending already passed on


_ASKED_AGAIN = object()  # to :meth:`Answer.whole`: the results so far are dropped, asked again
