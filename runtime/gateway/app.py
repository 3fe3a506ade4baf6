"""The OpenAI-compatible HTTP server of the gateway node: each request goes to the model node
serving it, through the dataflow, and its results come back by request id.

:class:`Replies` hands the results the node's dora thread receives to the asyncio
task waiting for them; :func:`build_app` is the Starlette application. Every
request ends in a response or an error within its deadline (504), including one
whose reply dora dropped; a client that goes away mid-stream cancels the
generation on the model node.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route as HttpRoute

from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import (
    AudioChunk,
    Embeddings,
    ErrorReport,
    Image,
    RerankResult,
    Task,
    TextChunk,
    Transcript,
    TranscriptionRequest,
)
from mofa_omni.gateway.openai_bodies import (
    MAX_IMAGE_PIXELS,
    ApiError,
    ChatBody,
    Completion,
    EmbeddingBody,
    ImageBody,
    RerankBody,
    SpeechBody,
    decode_body,
    embeddings_body,
    finish_reason_of,
    images_body,
    node_error,
    read_audio_upload,
    rerank_body,
    speech_bytes,
    sse,
    transcription_body,
    usage_of,
)
from mofa_omni.gateway.routes import Choice, Route, Router
from mofa_omni.models.catalog import Catalog
from mofa_omni.node.integrity import PayloadTooLarge

log = logging.getLogger("mofa_omni.gateway.app")

FALLBACK_KINDS = ("unavailable", "timeout")  # a local model that cannot answer: try the remote


@dataclass(frozen=True, slots=True)
class Settings:
    deadline_s: float = 150.0  # a request with no complete answer by then gets a 504
    max_body_bytes: int = 25 << 20  # larger bodies get a 413 (OpenAI's own audio limit)
    api_key: str = ""  # when set, requests must carry `Authorization: Bearer <key>`
    fallback_after_s: float = 0.0  # > 0: no first result from a local model by then -> remote
    max_image_pixels: int = MAX_IMAGE_PIXELS  # a larger picture in a chat message gets a 400


@dataclass(frozen=True, slots=True)
class Reply:
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


Send = Callable[[str, pa.Array, dict[str, Any]], int]  # returns the message's stream_seq
RESENDS = 2  # times a request dora dropped is sent again


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
            raise ApiError(504, f"{route.node} did not answer within "
                                f"{self.graph.settings.deadline_s:g} s", "timeout",
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


# --- the HTTP application ------------------------------------------------------------------

def build_app(graph: Graph, catalog: Catalog, loaded: Callable[[], dict[str, bool]],
              lost: Callable[[], dict[str, int]]) -> Starlette:
    """The /v1 endpoints over ``graph``, and ``/stats``. ``loaded()``: which nodes hold their
    model now (a node missing from it: unknown); ``lost()``: replies dora dropped, by input."""
    settings = graph.settings
    statuses: collections.Counter[int] = collections.Counter()

    def check_declared_size(request: Request) -> None:
        declared = int(request.headers.get("content-length") or 0)
        if declared > settings.max_body_bytes:
            raise _too_large(declared)

    async def body_of(request: Request) -> bytes:
        check_declared_size(request)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise _too_large(size)
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(size: int) -> ApiError:
        return ApiError(413, f"the request body ({size} bytes) is over this server's limit of "
                             f"{settings.max_body_bytes} bytes", code="request_too_large")

    def checked(handler):
        async def endpoint(request: Request) -> Response:
            try:
                if settings.api_key and not hmac.compare_digest(
                        request.headers.get("authorization", ""), f"Bearer {settings.api_key}"):
                    raise ApiError(401, "a valid API key is needed: Authorization: Bearer <key>",
                                   "authentication_error", code="invalid_api_key")
                response = await handler(request)
            except PayloadTooLarge as error:  # a request bigger than the dora pool can carry
                response = JSONResponse(ApiError(413, str(error), code="request_too_large").body(),
                                        413)
            except ContractError as error:
                response = JSONResponse(ApiError(400, str(error)).body(), 400)
            except ApiError as error:
                if error.status >= 500:
                    log.error("%s %s: %d %s", request.method, request.url.path, error.status,
                              error.message)
                response = JSONResponse(error.body(), error.status)
            statuses[response.status_code] += 1
            return response
        return endpoint

    async def chat(request: Request) -> Response:
        body = decode_body(await body_of(request), ChatBody)
        if body.has_images:  # a vision request: its pictures are decoded off the event loop
            choice = graph.router.choose_for_images(body.model)
            chat_request = await run_in_threadpool(body.to_request, settings.max_image_pixels)
        else:
            chat_request = body.to_request()
            choice = graph.router.choose(body.model, Task.TEXT_GENERATION)
        answer = graph.ask(choice, chat_request, TextChunk)
        results = aiter(answer)
        if not body.stream:
            chunks = [chunk async for chunk in results]
            completion = Completion.new(answer.request_id, answer.model)
            return JSONResponse(completion.whole("".join(c.text for c in chunks),
                                                 finish_reason_of(chunks[-1]),
                                                 usage_of(chunks[-1])))
        first = await anext(results)  # errors before the first chunk keep their HTTP status
        completion = Completion.new(answer.request_id, answer.model)
        return StreamingResponse(_chat_events(completion, first, results, answer,
                                              body.include_usage),
                                 media_type="text/event-stream")

    async def embeddings(request: Request) -> Response:
        body = decode_body(await body_of(request), EmbeddingBody)
        message = body.to_request()
        choice = graph.router.choose(body.model, Task.EMBEDDING)
        answer = graph.ask(choice, message, Embeddings)
        result = await _single(answer)
        return JSONResponse(embeddings_body(result.vectors, answer.model, body.encoding_format))

    async def rerank(request: Request) -> Response:
        body = decode_body(await body_of(request), RerankBody)
        message = body.to_request()
        choice = graph.router.choose(body.model, Task.RERANK)
        answer = graph.ask(choice, message, RerankResult)
        result = await _single(answer)
        return JSONResponse(rerank_body(body, result.scores, answer.model))

    async def image_generations(request: Request) -> Response:
        body = decode_body(await body_of(request), ImageBody)
        message = body.to_request()
        choice = graph.router.choose(body.model, Task.IMAGE_GENERATION)
        image = await _single(graph.ask(choice, message, Image))
        return JSONResponse(await run_in_threadpool(images_body, image.pixels, message.seed))

    async def transcriptions(request: Request) -> Response:
        check_declared_size(request)
        async with request.form(max_part_size=settings.max_body_bytes) as form:
            upload, model = form.get("file"), str(form.get("model") or "")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "a `file` upload is required", param="file")
            audio, rate = read_audio_upload(await upload.read(), upload.filename or "file")
            language = str(form.get("language") or "")
            response_format = str(form.get("response_format") or "json")
        if response_format not in ("json", "text", "verbose_json"):
            raise ApiError(400, f"response_format {response_format!r}: json, text or verbose_json",
                           param="response_format")
        message = TranscriptionRequest(audio, rate, language)
        choice = graph.router.choose(model, Task.SPEECH_RECOGNITION)
        transcript = await _single(graph.ask(choice, message, Transcript))
        body = transcription_body(transcript, response_format, audio.size / rate)
        return PlainTextResponse(body) if isinstance(body, str) else JSONResponse(body)

    async def speech(request: Request) -> Response:
        body = decode_body(await body_of(request), SpeechBody)
        message = body.to_request()
        choice = graph.router.choose(body.model, Task.SPEECH_SYNTHESIS)
        pieces, rate = [], 0
        async for chunk in graph.ask(choice, message, AudioChunk):
            pieces.append(chunk.audio.copy())
            rate = chunk.sample_rate
        content, media_type = speech_bytes(np.concatenate(pieces), rate, body.response_format)
        return Response(content, media_type=media_type)

    async def models(request: Request) -> Response:
        served, holding = graph.router.served(), loaded()
        data = []
        for spec in catalog.models.values():
            nodes = served.get(spec.name, [])
            known = [holding[node] for node in nodes if node in holding]
            data.append({"id": spec.name, "object": "model", "created": 0,
                         "owned_by": "mofa-omni", "tasks": [t.value for t in spec.tasks],
                         "served_by": nodes, "loaded": any(known) if known else None})
        return JSONResponse({"object": "list", "data": data})

    async def stats(request: Request) -> Response:
        return JSONResponse({
            "responses": {str(code): n for code, n in sorted(statuses.items())},
            "in_flight": graph.replies.in_flight,
            "unclaimed_replies": dict(graph.replies.unclaimed),
            "cancelled_by_node": graph.replies.unclaimed["error:cancelled"],
            "resent_after_loss": graph.resent,
            "lost": lost()})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        graph.replies.loop = asyncio.get_running_loop()
        yield

    return Starlette(routes=[
        HttpRoute("/v1/chat/completions", checked(chat), methods=["POST"]),
        HttpRoute("/v1/embeddings", checked(embeddings), methods=["POST"]),
        HttpRoute("/v1/rerank", checked(rerank), methods=["POST"]),
        HttpRoute("/v1/images/generations", checked(image_generations), methods=["POST"]),
        HttpRoute("/v1/audio/transcriptions", checked(transcriptions), methods=["POST"]),
        HttpRoute("/v1/audio/speech", checked(speech), methods=["POST"]),
        HttpRoute("/v1/models", checked(models), methods=["GET"]),
        HttpRoute("/stats", checked(stats), methods=["GET"]),
    ], lifespan=lifespan)


async def _single(answer: Answer) -> Any:
    """The one result of a task that does not stream."""
    results = [result async for result in answer]
    if not results:
        raise ApiError(500, "the model node answered nothing", "server_error")
    return results[-1]


async def _chat_events(completion: Completion, first: TextChunk, rest: AsyncIterator[TextChunk],
                       answer: Answer, include_usage: bool) -> AsyncIterator[bytes]:
    """The chunks as server-sent events; an error mid-stream ends it with an error event."""
    yield sse(completion.chunk({"role": "assistant", "content": ""}))
    chunk = first
    try:
        while True:
            if chunk.text:
                yield sse(completion.chunk({"content": chunk.text}))
            if chunk.final:
                yield sse(completion.chunk({}, finish_reason_of(chunk)))
                if include_usage:
                    yield sse(completion.usage_chunk(usage_of(chunk)))
                break
            chunk = await anext(rest)
    except ApiError as error:
        yield sse(error.body())
    finally:
        answer.cancel()  # the client went away mid-stream: stop the generation
    yield sse("[DONE]")
