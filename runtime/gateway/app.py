"""The OpenAI-compatible HTTP server of the gateway node: the /v1 endpoints, and ``/stats``.

:func:`build_app` is the Starlette application. Each endpoint is a function of the
request and the :class:`ServerState` it works with; :func:`_checked` wraps each one
with what every endpoint does (the API key, errors as OpenAI error bodies, the count
of responses by status). The requests go to the model nodes through the dataflow
(:mod:`mofa_omni.gateway.bridge`); a client that goes away mid-stream cancels the
generation on the model node. A video takes minutes: ``/v1/videos`` makes jobs that run in the
background (:mod:`mofa_omni.gateway.videos`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route as HttpRoute

from mofa_omni.contract.errors import ContractError, ErrorKind
from mofa_omni.contract.tasks import (
    AudioChunk,
    Embeddings,
    Image,
    RerankResult,
    Task,
    TextChunk,
    Transcript,
    TranscriptionRequest,
    VideoChunk,
    VideoProgress,
)
from mofa_omni.gateway.bridge import WAIT_FOR_RESTART_S, Answer, Graph
from mofa_omni.gateway.openai_bodies import (
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
    read_audio_upload,
    refused,
    rerank_body,
    speech_bytes,
    spoken_audio,
    spoken_pcm16,
    sse,
    transcription_body,
    usage_of,
)
from mofa_omni.gateway.responses import ResponseBuilder, ResponsesBody
from mofa_omni.gateway.settings import Settings
from mofa_omni.gateway.videos import (
    COMPLETED,
    LIST_LIMIT,
    MAX_LIST_LIMIT,
    VideoBody,
    VideoJobs,
    body_from_form,
    deleted_object,
    generate,
    video_object,
)
from mofa_omni.models.catalog import Catalog
from mofa_omni.node.integrity import PayloadTooLarge

log = logging.getLogger("mofa_omni.gateway.app")


@dataclass
class ServerState:
    """What the endpoints work with: the graph that answers, the catalog, what the nodes
    hold, the video jobs, and the responses given so far."""

    graph: Graph
    catalog: Catalog
    loaded: Callable[[], dict[str, bool]]  # which nodes hold their model now
    lost: Callable[[], dict[str, int]]  # replies dora dropped, by input
    videos: VideoJobs  # the video jobs, running and finished
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)

    @property
    def settings(self) -> Settings:
        return self.graph.settings


Endpoint = Callable[[Request, ServerState], Awaitable[Response]]


def build_app(graph: Graph, catalog: Catalog, loaded: Callable[[], dict[str, bool]],
              lost: Callable[[], dict[str, int]]) -> Starlette:
    """The /v1 endpoints over ``graph``, and ``/stats``. ``loaded()``: which nodes hold their
    model now (a node missing from it: unknown); ``lost()``: replies dora dropped, by input."""
    app = Starlette(routes=[HttpRoute(path, _checked(endpoint), methods=[method])
                            for path, method, endpoint in ENDPOINTS],
                    lifespan=_lifespan)
    settings = graph.settings
    app.state.server = ServerState(graph, catalog, loaded, lost,
                                   VideoJobs(settings.max_videos, settings.video_keep_s))
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    server: ServerState = app.state.server
    server.graph.replies.loop = asyncio.get_running_loop()  # where replies go
    yield
    running = server.videos.stop_all()  # the nodes are told to stop what they make
    if running:
        await asyncio.wait(running, timeout=5)


def _checked(endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
    """``endpoint`` as Starlette calls it: the API key checked, errors answered as OpenAI
    error bodies with their status, and each response counted by status."""
    async def answer(request: Request) -> Response:
        server: ServerState = request.app.state.server
        try:
            _check_api_key(request, server.settings.api_key)
            WAIT_FOR_RESTART_S.set(_wait_for_restart(request, server.settings))
            response = await endpoint(request, server)
        except PayloadTooLarge as error:  # a request bigger than the dora pool can carry
            response = _error_response(ApiError(ErrorKind.TOO_LARGE, str(error),
                                                code="request_too_large"))
        except ContractError as error:
            response = _error_response(ApiError(ErrorKind.BAD_REQUEST, str(error)))
        except ApiError as error:
            if error.status >= 500:
                log.error("%s %s: %d %s", request.method, request.url.path, error.status,
                          error.message)
            response = _error_response(error)
        server.statuses[response.status_code] += 1
        return response
    return answer


WAIT_HEADER = "x-omni-wait-for-restart"


def _wait_for_restart(request: Request, settings: Settings) -> float:
    """The seconds the client will wait for a node restarting after a crash (its
    X-Omni-Wait-For-Restart header; none: a 503 at once), at most ``max_wait_for_restart_s``."""
    raw = request.headers.get(WAIT_HEADER)
    if raw is None:
        return 0.0
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= settings.max_wait_for_restart_s:
        raise ApiError(ErrorKind.BAD_REQUEST, f"X-Omni-Wait-For-Restart: {raw!r} must be "
                                              f"seconds from 0 to "
                                              f"{settings.max_wait_for_restart_s:g}",
                       param=WAIT_HEADER)
    return seconds


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), error.status, headers=error.headers())


def _check_api_key(request: Request, api_key: str) -> None:
    if api_key and not hmac.compare_digest(request.headers.get("authorization", ""),
                                           f"Bearer {api_key}"):
        raise ApiError(ErrorKind.BAD_REQUEST,
                       "a valid API key is needed: Authorization: Bearer <key>", status=401,
                       error_type="authentication_error", code="invalid_api_key")


# --- request bodies, within the size limit ---------------------------------------------------

def _check_declared_size(request: Request, limit: int) -> None:
    declared = int(request.headers.get("content-length") or 0)
    if declared > limit:
        raise _too_large(declared, limit)


async def _body_of(request: Request, limit: int) -> bytes:
    """The whole request body; a 413 as soon as it is over ``limit`` bytes."""
    _check_declared_size(request, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(ErrorKind.TOO_LARGE, f"the request body ({size} bytes) is over this server's "
                                         f"limit of {limit} bytes", code="request_too_large")


# --- the endpoints -----------------------------------------------------------------------------

async def chat_completions(request: Request, server: ServerState) -> Response:
    """POST /v1/chat/completions: whole, or streamed as server-sent events; a chat holding
    pictures goes to the node serving vision_language."""
    graph, settings = server.graph, server.settings
    body = decode_body(await _body_of(request, settings.max_body_bytes), ChatBody)
    if body.has_sound:  # an omni request: sounds and pictures decoded off the event loop
        choice = graph.router.choose_for_sound(body.model)
        chat_request = await run_in_threadpool(body.to_request, settings.max_image_pixels)
    elif body.has_images:  # a vision request: its pictures are decoded off the event loop
        choice = graph.router.choose_for_images(body.model)
        chat_request = await run_in_threadpool(body.to_request, settings.max_image_pixels)
    else:
        chat_request = body.to_request()
        choice = graph.router.choose(body.model, Task.TEXT_GENERATION)
    speaks = getattr(chat_request, "speak", False)  # only a spoken reply holds AudioChunks
    answer = graph.ask(choice, chat_request, (TextChunk, AudioChunk) if speaks else TextChunk)
    if not body.stream:
        results = await answer.whole()
        chunks = [r for r in results if isinstance(r, TextChunk)]
        text = "".join(c.text for c in chunks)
        spoken = None
        if speaks:
            sounds = [r for r in results if isinstance(r, AudioChunk)]
            spoken = await run_in_threadpool(spoken_audio, answer.request_id, sounds, text,
                                             body.spoken_format)
        completion = Completion.new(answer.request_id, answer.model)
        return JSONResponse(completion.whole(text, finish_reason_of(chunks[-1]),
                                             usage_of(chunks[-1]),
                                             [call for c in chunks for call in c.tool_calls],
                                             spoken))
    results = aiter(answer)
    first = await anext(results)  # errors before the first chunk keep their HTTP status
    completion = Completion.new(answer.request_id, answer.model)
    events = _spoken_events if speaks else _chat_events
    return StreamingResponse(events(completion, first, results, answer, body.include_usage),
                             media_type="text/event-stream")


async def responses(request: Request, server: ServerState) -> Response:
    """POST /v1/responses: OpenAI's Responses API over the same text-generation node, whole or
    as a stream of its semantic events (:mod:`mofa_omni.gateway.responses`)."""
    body = decode_body(await _body_of(request, server.settings.max_body_bytes), ResponsesBody)
    chat_request = body.to_request()
    choice = server.graph.router.choose(body.model, Task.TEXT_GENERATION)
    answer = server.graph.ask(choice, chat_request, TextChunk)
    if not body.stream:
        chunks = await answer.whole()
        built = ResponseBuilder(answer.request_id, answer.model, body)
        for chunk in chunks:
            built.add(chunk)
        return JSONResponse(built.response(chunks[-1]))
    results = aiter(answer)
    first = await anext(results)  # errors before the first chunk keep their HTTP status
    built = ResponseBuilder(answer.request_id, answer.model, body)
    return StreamingResponse(_response_events(built, first, results, answer),
                             media_type="text/event-stream")


async def embeddings(request: Request, server: ServerState) -> Response:
    """POST /v1/embeddings: one vector per input text, as floats or base64."""
    body = decode_body(await _body_of(request, server.settings.max_body_bytes), EmbeddingBody)
    message = body.to_request()
    choice = server.graph.router.choose(body.model, Task.EMBEDDING)
    answer = server.graph.ask(choice, message, Embeddings)
    result = await _single(answer)
    return JSONResponse(embeddings_body(result.vectors, answer.model, body.encoding_format))


async def rerank(request: Request, server: ServerState) -> Response:
    """POST /v1/rerank: the documents scored against the query, best first."""
    body = decode_body(await _body_of(request, server.settings.max_body_bytes), RerankBody)
    message = body.to_request()
    choice = server.graph.router.choose(body.model, Task.RERANK)
    answer = server.graph.ask(choice, message, RerankResult)
    result = await _single(answer)
    return JSONResponse(rerank_body(body, result.scores, answer.model))


async def image_generations(request: Request, server: ServerState) -> Response:
    """POST /v1/images/generations: one picture, as base64 PNG."""
    body = decode_body(await _body_of(request, server.settings.max_body_bytes), ImageBody)
    message = body.to_request()
    choice = server.graph.router.choose(body.model, Task.IMAGE_GENERATION)
    image = await _single(server.graph.ask(choice, message, Image))
    return JSONResponse(await run_in_threadpool(images_body, image.pixels, message.seed))


TRANSCRIPTION_FIELDS = ("file", "model", "language", "response_format")


def check_transcription_fields(fields: dict[str, list]) -> None:
    """Refuse, by name, what a transcription request asks that is not done here: a ``prompt``
    (a style hint: the recognizers here take none), a ``temperature`` other than 0 (decoding is
    greedy), ``stream``, timestamps by the word, and any field OpenAI's API does not have."""
    for name, values in fields.items():
        value = str(values[-1]) if values else ""
        if name in TRANSCRIPTION_FIELDS:
            continue
        if name == "temperature":
            try:
                if float(value) == 0:
                    continue
            except ValueError:
                pass
            raise refused(name, f"{value!r}: decoding here is greedy (temperature 0 only)")
        if name == "stream" and value.lower() == "false":
            continue
        if name == "timestamp_granularities[]" and set(map(str, values)) <= {"segment"}:
            continue
        if name in ("prompt", "stream", "timestamp_granularities[]", "chunking_strategy",
                     "include[]"):
            raise refused(name, f"{value!r} is not supported by this server's transcriptions")
        raise ApiError(ErrorKind.BAD_REQUEST, f"unknown field {name!r}", param=name)


async def transcriptions(request: Request, server: ServerState) -> Response:
    """POST /v1/audio/transcriptions: a multipart WAV upload, as text or JSON."""
    limit = server.settings.max_body_bytes
    _check_declared_size(request, limit)
    async with request.form(max_part_size=limit) as form:
        upload, model = form.get("file"), str(form.get("model") or "")
        if upload is None or isinstance(upload, str):
            raise ApiError(ErrorKind.BAD_REQUEST, "a `file` upload is required", param="file")
        audio, rate = read_audio_upload(await upload.read(), upload.filename or "file")
        language = str(form.get("language") or "")
        response_format = str(form.get("response_format") or "json")
        check_transcription_fields({key: form.getlist(key) for key in form.keys()})
    if response_format not in ("json", "text", "verbose_json"):
        raise ApiError(ErrorKind.BAD_REQUEST,
                       f"response_format {response_format!r}: json, text or verbose_json",
                       param="response_format")
    message = TranscriptionRequest(audio, rate, language)
    choice = server.graph.router.choose(model, Task.SPEECH_RECOGNITION)
    transcript = await _single(server.graph.ask(choice, message, Transcript))
    body = transcription_body(transcript, response_format, audio.size / rate)
    return PlainTextResponse(body) if isinstance(body, str) else JSONResponse(body)


async def speech(request: Request, server: ServerState) -> Response:
    """POST /v1/audio/speech: the spoken input as WAV or raw 24 kHz PCM."""
    body = decode_body(await _body_of(request, server.settings.max_body_bytes), SpeechBody)
    message = body.to_request()
    choice = server.graph.router.choose(body.model, Task.SPEECH_SYNTHESIS)
    chunks = await server.graph.ask(choice, message, AudioChunk).whole()
    if not chunks:
        raise ApiError(ErrorKind.INTERNAL, "the model node answered nothing")
    audio = np.concatenate([chunk.audio for chunk in chunks])
    content, media_type = speech_bytes(audio, chunks[-1].sample_rate, body.response_format)
    return Response(content, media_type=media_type)


async def create_video(request: Request, server: ServerState) -> Response:
    """POST /v1/videos (JSON, or multipart with an ``input_reference`` file): a video job,
    answered at once as OpenAI's Video object; the node serving video_generation makes the
    clip in the background (GET /v1/videos/{id} says how far it is)."""
    settings = server.settings
    body, upload = await _video_body(request, settings.max_body_bytes)
    # the first frame, if any, is decoded off the event loop
    message = await run_in_threadpool(body.to_request, upload, settings.max_image_pixels)
    choice = server.graph.router.choose(body.model, Task.VIDEO_GENERATION)
    job = server.videos.create(body.model, message)
    answer = server.graph.ask(choice, message, (VideoProgress, VideoChunk),
                              settings.video_deadline_s)
    job.task = asyncio.create_task(generate(job, answer))
    # One turn of the loop sends the request: a refusal at once (the node is down, the first
    # frame is larger than the pool) is in this answer already, as a failed job.
    await asyncio.sleep(0)
    return JSONResponse(video_object(job))


async def _video_body(request: Request, limit: int) -> tuple[VideoBody, bytes | None]:
    """The creation body, and the ``input_reference`` file of a multipart one."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return decode_body(await _body_of(request, limit), VideoBody), None
    _check_declared_size(request, limit)
    fields, upload = [], None
    async with request.form(max_part_size=limit) as form:
        for name, value in form.multi_items():
            if isinstance(value, str):
                fields.append((name, value))
            elif name == "input_reference" and upload is None:
                upload = await value.read()
            else:
                raise ApiError(ErrorKind.BAD_REQUEST, f"{name}: only one file is read, the "
                                                      "input_reference picture", param=name)
    return body_from_form(fields), upload


async def retrieve_video(request: Request, server: ServerState) -> Response:
    """GET /v1/videos/{video_id}: the job as OpenAI's Video object."""
    _query(request, ())
    return JSONResponse(video_object(server.videos.get(request.path_params["video_id"])))


async def video_content(request: Request, server: ServerState) -> Response:
    """GET /v1/videos/{video_id}/content: the MP4 of a completed job (``variant=video``, the
    only one kept); a 409 while it is not completed."""
    variant = _query(request, ("variant",)).get("variant", "video")
    job = server.videos.get(request.path_params["video_id"])
    if variant != "video":
        raise ApiError(ErrorKind.BAD_REQUEST, f"variant {variant!r}: only the video (MP4) is "
                                              "made here", param="variant",
                       code="unsupported_parameter")
    if job.status != COMPLETED or job.mp4 is None:
        why = f": {job.error.message}" if job.error else f" ({job.progress}% done)"
        raise ApiError(ErrorKind.BAD_REQUEST, f"video {job.id} is {job.status}{why}; its "
                                              "content comes once it is completed",
                       status=409, code="video_not_ready")
    return Response(job.mp4, media_type="video/mp4")


async def list_videos(request: Request, server: ServerState) -> Response:
    """GET /v1/videos: the jobs held, newest first (``order``, ``after``, ``limit``)."""
    query = _query(request, ("after", "limit", "order"))
    limit = query.get("limit", str(LIST_LIMIT))
    if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIST_LIMIT:
        raise ApiError(ErrorKind.BAD_REQUEST, f"limit must be 1-{MAX_LIST_LIMIT}, got "
                                              f"{limit!r}", param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(ErrorKind.BAD_REQUEST, f"order must be asc or desc, got {order!r}",
                       param="order")
    return JSONResponse(server.videos.page(query.get("after"), int(limit), order))


async def delete_video(request: Request, server: ServerState) -> Response:
    """DELETE /v1/videos/{video_id}: the job and its MP4 go; a running one is cancelled on its
    node."""
    _query(request, ())
    return JSONResponse(deleted_object(server.videos.remove(request.path_params["video_id"])))


def _query(request: Request, known: tuple[str, ...]) -> dict[str, str]:
    """The query parameters; one this endpoint does not read is refused by name."""
    query = dict(request.query_params)
    if unknown := sorted(set(query) - set(known)):
        raise ApiError(ErrorKind.BAD_REQUEST, f"unknown query parameter {unknown[0]!r}"
                       + (f" (this endpoint reads {', '.join(known)})" if known else ""),
                       param=unknown[0], code="unknown_parameter")
    return query


async def list_models(request: Request, server: ServerState) -> Response:
    """GET /v1/models: the catalog, with the nodes serving each model and whether it is
    loaded (null: unknown)."""
    served, holding = server.graph.router.served(), server.loaded()
    data = []
    for spec in server.catalog.models.values():
        nodes = served.get(spec.name, [])
        known = [holding[node] for node in nodes if node in holding]
        data.append({"id": spec.name, "object": "model", "created": 0,
                     "owned_by": "mofa-omni", "tasks": [t.value for t in spec.tasks],
                     "served_by": nodes, "loaded": any(known) if known else None})
    return JSONResponse({"object": "list", "data": data})


async def stats(request: Request, server: ServerState) -> Response:
    """GET /stats: responses by status, requests in flight, replies nobody waited for any
    more, requests sent again after dora dropped them or their replies, and the messages it
    dropped."""
    replies = server.graph.replies
    return JSONResponse({
        "responses": {str(code): n for code, n in sorted(server.statuses.items())},
        "in_flight": replies.in_flight,
        "unclaimed_replies": dict(replies.unclaimed),
        "cancelled_by_node": replies.unclaimed["error:cancelled"],
        "resent_after_loss": server.graph.resent,
        "asked_again_after_lost_reply": server.graph.asked_again,
        "lost": server.lost()})


ENDPOINTS: tuple[tuple[str, str, Endpoint], ...] = (  # path, method, endpoint
    ("/v1/chat/completions", "POST", chat_completions),
    ("/v1/responses", "POST", responses),
    ("/v1/embeddings", "POST", embeddings),
    ("/v1/rerank", "POST", rerank),
    ("/v1/images/generations", "POST", image_generations),
    ("/v1/audio/transcriptions", "POST", transcriptions),
    ("/v1/audio/speech", "POST", speech),
    ("/v1/videos", "POST", create_video),
    ("/v1/videos", "GET", list_videos),
    ("/v1/videos/{video_id}", "GET", retrieve_video),
    ("/v1/videos/{video_id}", "DELETE", delete_video),
    ("/v1/videos/{video_id}/content", "GET", video_content),
    ("/v1/models", "GET", list_models),
    ("/stats", "GET", stats),
)


# --- answers -----------------------------------------------------------------------------------

async def _single(answer: Answer) -> Any:
    """The one result of a task that does not stream."""
    results = await answer.whole()
    if not results:
        raise ApiError(ErrorKind.INTERNAL, "the model node answered nothing")
    return results[-1]


async def _response_events(built: ResponseBuilder, first: TextChunk,
                           rest: AsyncIterator[TextChunk], answer: Answer) -> AsyncIterator[bytes]:
    """The Responses API's events for the chunks; an error mid-stream ends it with an error
    event."""
    for event in built.opening():
        yield event
    try:
        async for chunk in coalesced(first, rest, answer.arrived):
            for event in built.stream(chunk):
                yield event
    except ApiError as error:
        yield built.failure(error)
    finally:
        answer.cancel()  # the client went away mid-stream: stop the generation


async def _spoken_events(completion: Completion, first: TextChunk | AudioChunk,
                         rest: AsyncIterator[TextChunk | AudioChunk], answer: Answer,
                         include_usage: bool) -> AsyncIterator[bytes]:
    """A spoken reply streamed as OpenAI streams one: the words as ``delta.audio.transcript``,
    the sound as ``delta.audio.data`` (base64 pcm16 at 24 kHz), then the finish and usage."""
    audio_id = f"audio_{answer.request_id}"
    yield sse(completion.chunk({"role": "assistant", "content": None}))
    ended: TextChunk | None = None
    try:
        result = first
        while True:
            if isinstance(result, TextChunk):
                if result.text:
                    yield sse(completion.chunk({"audio": {"id": audio_id,
                                                          "transcript": result.text}}))
                ended = result if result.final else ended
            elif result.audio.size:
                data = await run_in_threadpool(spoken_pcm16, result)
                yield sse(completion.chunk({"audio": {"id": audio_id, "data": data}}))
            try:
                result = await anext(rest)
            except StopAsyncIteration:
                break
        if ended is not None:
            yield sse(completion.chunk({}, finish_reason_of(ended)))
            if include_usage:
                yield sse(completion.usage_chunk(usage_of(ended)))
    except ApiError as error:
        yield sse(error.body())
    finally:
        answer.cancel()  # the client went away mid-stream: stop the speech
    yield sse("[DONE]")


async def coalesced(first: TextChunk, rest: AsyncIterator[TextChunk],
                    arrived: Callable[[], int]) -> AsyncIterator[TextChunk]:
    """The chunks of a streamed reply, each merged with those that had already ``arrived``
    behind it: a client that reads slower than the model generates gets several tokens per
    event (one JSON encoding and one write for them all), one that keeps up gets each token as
    it comes. A chunk with tool calls or the final one ends a merge, so text and calls keep
    their order; an error after merged text comes after that text."""
    chunk = first
    while True:
        while not (chunk.final or chunk.tool_calls) and arrived():
            try:
                following = await anext(rest)
            except ApiError:
                yield chunk
                raise
            chunk = dataclasses.replace(following, text=chunk.text + following.text)
        yield chunk
        if chunk.final:
            return
        chunk = await anext(rest)


async def _chat_events(completion: Completion, first: TextChunk, rest: AsyncIterator[TextChunk],
                       answer: Answer, include_usage: bool) -> AsyncIterator[bytes]:
    """The chunks as server-sent events; an error mid-stream ends it with an error event."""
    yield sse(completion.chunk({"role": "assistant", "content": ""}))
    calls = 0
    try:
        async for chunk in coalesced(first, rest, answer.arrived):
            if chunk.text:
                yield sse(completion.chunk({"content": chunk.text}))
            for call in chunk.tool_calls:
                for event in completion.call_chunks(call, calls):
                    yield sse(event)
                calls += 1
            if chunk.final:
                yield sse(completion.chunk({}, finish_reason_of(chunk)))
                if include_usage:
                    yield sse(completion.usage_chunk(usage_of(chunk)))
    except ApiError as error:
        yield sse(error.body())
    finally:
        answer.cancel()  # the client went away mid-stream: stop the generation
    yield sse("[DONE]")
