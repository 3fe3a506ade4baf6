"""The OpenAI HTTP API's bodies, mapped onto the model contract, and its errors (no I/O here).

Typed request bodies (msgspec) decode what a client sent, with a clear error for
anything malformed; each turns into a contract request. The response builders
produce what the official clients parse: chat completions (whole and streamed
chunks), embeddings (floats or base64), transcriptions, model lists and error
bodies (``{"error": {"message", "type", "param", "code"}}``). A chat whose messages hold
pictures or video clips (``image_url`` and ``video_url`` parts, inline data URLs) becomes a
vision request; an image generation body becomes an image request, answered as base64 PNG.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import numpy as np

from mofa_omni.contract.errors import ContractError, ErrorKind, OmniError
from mofa_omni.contract.tasks import (
    OMNI_MAX_VIDEO_FRAMES,
    AudioChunk,
    ChatMessage,
    ChatRequest,
    EmbeddingRequest,
    ImageRequest,
    OmniRequest,
    RerankRequest,
    SpeechRequest,
    TextChunk,
    Tool,
    ToolCall,
    Transcript,
    validate_audio,
    validate_request,
)
from mofa_omni.gateway.pictures import clip_from_url, picture_from_url
from mofa_omni.media.audio import pcm16, read_wav, resample, wav_bytes
from mofa_omni.media.png import png_bytes

OPENAI_PCM_RATE = 24_000  # "pcm": raw 16-bit little-endian mono at 24 kHz, as OpenAI sends it
MAX_IMAGE_PIXELS = 4096 * 4096  # a picture in a chat message larger than this is refused


# Each kind of error as the client is answered: the HTTP status and OpenAI's error type.
HTTP_ERRORS: dict[ErrorKind, tuple[int, str]] = {
    ErrorKind.BAD_REQUEST: (400, "invalid_request_error"),
    ErrorKind.TOO_LARGE: (413, "invalid_request_error"),
    ErrorKind.UNAVAILABLE: (503, "service_unavailable"),
    ErrorKind.TIMEOUT: (504, "timeout"),
    ErrorKind.CANCELLED: (499, "cancelled"),
    ErrorKind.LOST: (500, "server_error"),
    ErrorKind.INTERNAL: (500, "server_error"),
}


class ApiError(OmniError):
    """An error answered to the client: its kind, HTTP status, OpenAI error type and message.

    The status and the type follow from ``kind`` (:data:`HTTP_ERRORS`) unless given: an
    unknown model is a ``bad_request`` answered 404, a missing API key one answered 401.
    """

    def __init__(self, kind: ErrorKind, message: str, *, status: int | None = None,
                 error_type: str | None = None, param: str | None = None,
                 code: str | None = None, retry_after_s: int | None = None):
        super().__init__(message)
        kind_status, kind_type = HTTP_ERRORS[kind]
        self.kind = kind  # this error's own, where OmniError's subclasses have one per class
        self.status = status or kind_status
        self.error_type = error_type or kind_type
        self.message, self.param, self.code = message, param, code
        self.retry_after_s = retry_after_s  # answered as the Retry-After header

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s else {}

    def body(self) -> dict[str, Any]:
        """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.code}}


def node_error(kind: ErrorKind | str, message: str) -> ApiError:
    """A model node's error (``ErrorReport.kind``) as answered to the client, the kind as its
    code; a kind this gateway does not know is answered as ``internal``."""
    try:
        known = ErrorKind(kind)
    except ValueError:
        known = ErrorKind.INTERNAL
    return ApiError(known, message, code=str(kind))


# --- request bodies ----------------------------------------------------------------------

class _Function(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class _ToolCallBody(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    function: _Function
    type: Literal["function"] = "function"


class _FunctionDefinition(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # honoured either way: every call fits its schema


class _ToolBody(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["function"]
    function: _FunctionDefinition


class _Message(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None  # accepted and not used: the participant's name
    tool_calls: list[_ToolCallBody] | None = None
    tool_call_id: str | None = None
    # What a client sends back when it echoes an assistant message whole: empty only.
    refusal: None = None
    annotations: list[Any] | None = None
    audio: None = None
    function_call: None = None


def refused(field: str, why: str) -> ApiError:
    """A 400 for a field this server cannot honour, naming it."""
    return ApiError(ErrorKind.BAD_REQUEST, f"{field}: {why}", param=field,
                    code="unsupported_parameter")


# Sent by some clients and accepted without effect, on purpose (README, "OpenAI API").
IGNORED_CHAT_FIELDS = ("user", "metadata", "name")


SPOKEN_FORMATS = ("wav", "pcm16")  # a spoken reply's audio.format (pcm16: 24 kHz, as OpenAI)
HEARING_RATE = 16_000  # sounds sent to an omni model are resampled to this once, here


class _AudioOut(msgspec.Struct, forbid_unknown_fields=True):
    """``audio`` of a chat that asks for a spoken reply (modalities ["text", "audio"])."""

    voice: str = ""  # the model's own voice names ("" = its first)
    format: str = "wav"


class ChatBody(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    messages: list[_Message]
    stream: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    n: int = 1
    stream_options: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[_ToolBody] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # Sound: input_audio parts in, and a spoken reply out (an omni model answers).
    modalities: list[str] | None = None
    audio: _AudioOut | None = None
    # Refused unless they ask for nothing (checked in ``to_request``).
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    store: bool | None = None
    # Accepted and not used (IGNORED_CHAT_FIELDS).
    user: str | None = None
    metadata: dict[str, str] | None = None

    @property
    def has_images(self) -> bool:
        """Whether a message holds a picture or a video clip (the chat is then a vision
        request)."""
        return any(isinstance(m.content, list) and
                   any(isinstance(p, dict) and p.get("type") in ("image_url", "video_url")
                       for p in m.content)
                   for m in self.messages)

    @property
    def has_sound(self) -> bool:
        """Whether a message holds sound or the reply is to be spoken (an omni request)."""
        return "audio" in (self.modalities or ()) or any(
            isinstance(m.content, list) and
            any(isinstance(p, dict) and p.get("type") == "input_audio" for p in m.content)
            for m in self.messages)

    @property
    def spoken_format(self) -> str:
        return self.audio.format if self.audio else "wav"

    def to_request(self, max_image_pixels: int = MAX_IMAGE_PIXELS) -> ChatRequest | OmniRequest:
        """A ChatRequest; an OmniRequest when the messages hold pictures (each decoded, at most
        ``max_image_pixels``; they go to the model in the order sent) or sound (WAV), or the
        reply is to be spoken."""
        if self.n != 1:
            raise ContractError("n must be 1: one choice per request")
        self._check_unserved()
        messages, images, sounds, clips = [], [], [], []
        for i, message in enumerate(self.messages):
            text, pictures, heard, seen = _content_of(message.content, i, max_image_pixels)
            images += pictures
            sounds += heard
            clips += seen
            calls = [ToolCall(c.id, c.function.name, c.function.arguments)
                     for c in message.tool_calls or []]
            role = "system" if message.role == "developer" else message.role
            messages.append(ChatMessage(role, text, calls, message.tool_call_id or ""))
        max_tokens = next((n for n in (self.max_completion_tokens, self.max_tokens)
                           if n is not None), 256)
        request: ChatRequest | OmniRequest
        if images or sounds or clips or self.has_sound:
            self._check_vision_options("sound" if sounds or self.has_sound else
                                       "images" if images else "video")
            request = OmniRequest(messages, images, sounds, HEARING_RATE, max_tokens,
                                  self.temperature, speak=self._speaks(),
                                  voice=self.audio.voice if self.audio else "",
                                  videos=[frames for frames, _ in clips],
                                  video_fps=[rate for _, rate in clips])
        else:
            stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
            choice, name = self._tool_choice()
            request = ChatRequest(messages, max_tokens, self.temperature, self.top_p, stop,
                                  self._json_schema(), self._tools(), choice, name,
                                  self.parallel_tool_calls is not False)
        validate_request(request)
        return request

    def _check_unserved(self) -> None:
        """Fields this server cannot honour are refused by name unless they ask for nothing."""
        if self.logprobs or self.top_logprobs:
            raise refused("logprobs", "log-probabilities are not returned by this server")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise refused(name, "penalties are not applied here (send 0 or leave it out)")
        if self.seed is not None and self.temperature > 0:
            raise refused("seed", "sampling here is not seeded; at temperature 0 (greedy) "
                                   "every reply is already reproducible")
        if self.store:
            raise refused("store", "this server keeps no completions")

    def _tools(self) -> list[Tool]:
        return [Tool(t.function.name, t.function.description,
                     json.dumps(t.function.parameters if t.function.parameters is not None
                                else {"type": "object", "properties": {}}))
                for t in self.tools or []]

    def _tool_choice(self) -> tuple[str, str]:
        """``tool_choice`` as the contract's choice and forced tool name."""
        match self.tool_choice:
            case None:
                return "auto", ""
            case "auto" | "none" | "required" as choice:
                return choice, ""
            case {"type": "function", "function": {"name": str() as name}}:
                return "required", name
            case _:
                raise ContractError("tool_choice: one of \"auto\", \"none\", \"required\" or "
                                    "{\"type\": \"function\", \"function\": {\"name\": ...}}, "
                                    f"got {json.dumps(self.tool_choice)}")

    def _check_vision_options(self, media: str = "images") -> None:
        """What a vision (or omni) request cannot honour is refused rather than ignored."""
        if self.stop:
            raise ContractError(f"stop: stop sequences are not served for messages with {media}")
        if self.top_p != 1.0:
            raise ContractError(f"top_p: messages with {media} are sampled by temperature only "
                                f"(top_p must be 1, got {self.top_p})")
        if self._json_schema():
            raise ContractError("response_format: structured output is not served for messages "
                                f"with {media}")
        if self.tools or any(m.tool_calls or m.role == "tool" for m in self.messages):
            raise ContractError(f"tools: tool calling is not served for messages with {media}")

    def _speaks(self) -> bool:
        """Whether the reply is spoken: modalities ["text", "audio"], with ``audio`` options."""
        modalities = self.modalities or ["text"]
        if unknown := sorted(set(modalities) - {"text", "audio"}):
            raise ContractError(f"modalities: {', '.join(unknown)} is not served (text, audio)")
        if "text" not in modalities:
            raise ContractError('modalities: a reply always has text: ["text"] or '
                                '["text", "audio"]')
        speaks = "audio" in modalities
        if self.audio and not speaks:
            raise ContractError('audio: a spoken reply needs modalities ["text", "audio"]')
        if speaks and self.spoken_format not in SPOKEN_FORMATS:
            raise refused("audio", f"spoken replies come as {' or '.join(SPOKEN_FORMATS)}, "
                                   f"not {self.spoken_format!r}")
        if speaks and self.stream and self.spoken_format != "pcm16":
            raise refused("audio", "a streamed spoken reply comes as pcm16 (as OpenAI streams "
                                   f"one), not {self.spoken_format!r}")
        return speaks

    def _json_schema(self) -> str:
        """OpenAI's structured outputs: ``{"type": "json_schema", "json_schema": {"schema": ...}}``."""
        match self.response_format:
            case None | {"type": "text"}:
                return ""
            case {"type": "json_schema", "json_schema": {"schema": dict() as schema}}:
                return json.dumps(schema)
            case _:
                raise ContractError("response_format: only {\"type\": \"json_schema\", "
                                    "\"json_schema\": {\"schema\": {...}}} and \"text\" are supported")

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


Clip = tuple[np.ndarray, float]  # a video clip's frames, uint8 (T, H, W, 3), and their rate


def _content_of(content: str | list[dict[str, Any]] | None, index: int, max_image_pixels: int
                ) -> tuple[str, list[np.ndarray], list[np.ndarray], list[Clip]]:
    """A message's text (a string, or its text parts joined), its pictures, its sounds (each
    resampled to 16 kHz) and its video clips (``video_url`` parts, as vLLM takes them)."""
    if content is None:
        return "", [], [], []
    if isinstance(content, str):
        return content, [], [], []
    texts, pictures, sounds, clips = [], [], [], []
    for j, part in enumerate(content):
        where = f"messages[{index}].content[{j}]"
        kind = part.get("type")
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise ContractError(f"{where}: an image_url part needs image_url.url (a data URL)")
            pictures.append(picture_from_url(url, f"{where} (image_url)", max_image_pixels))
        elif kind == "input_audio":
            sounds.append(_sound_of(part.get("input_audio"), f"{where} (input_audio)"))
        elif kind == "video_url":
            url = part.get("video_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise ContractError(f"{where}: a video_url part needs video_url.url (a data URL)")
            clips.append(clip_from_url(url, f"{where} (video_url)", max_image_pixels,
                                       OMNI_MAX_VIDEO_FRAMES))
        else:
            raise ContractError(f"{where}: content of type {kind!r} is not served; parts are "
                                "'text', 'image_url', 'video_url' or 'input_audio'")
    return "".join(texts), pictures, sounds, clips


def _sound_of(part: Any, where: str) -> np.ndarray:
    """An input_audio part ({"data": base64, "format": "wav"}) as float32 mono at 16 kHz."""
    if not isinstance(part, dict) or not isinstance(part.get("data"), str):
        raise ContractError(f"{where}: needs input_audio.data (base64) and input_audio.format")
    if part.get("format") != "wav":
        raise ContractError(f"{where}: format {part.get('format')!r} is not served: send "
                            "\"wav\" (PCM)")
    try:
        data = base64.b64decode(part["data"], validate=True)
    except binascii.Error as error:
        raise ContractError(f"{where}: data is not base64 ({error})") from None
    audio, rate = read_wav(data, where)
    validate_audio(audio, rate, what=where)
    return resample(audio, rate, HEARING_RATE)


_COHERE_INPUT_TYPES = {"search_query": "query", "search_document": "document"}


class EmbeddingBody(msgspec.Struct):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    # Not OpenAI's: Voyage's "query"/"document" (Cohere's "search_query"/"search_document"
    # too), for models that prompt each kind (E5's "query: "/"passage: ", BGE's instruction).
    input_type: str | None = None

    def to_request(self) -> EmbeddingRequest:
        input_type = _COHERE_INPUT_TYPES.get(self.input_type or "", self.input_type)
        request = EmbeddingRequest([self.input] if isinstance(self.input, str) else self.input,
                                   input_type)
        validate_request(request)
        return request


class RerankBody(msgspec.Struct):
    """Not OpenAI's: the rerank request of Cohere and Jina, which vLLM and others also serve."""

    model: str
    query: str
    documents: list[str]
    top_n: int | None = None
    return_documents: bool = True

    def to_request(self) -> RerankRequest:
        if self.top_n is not None and self.top_n < 1:
            raise ContractError(f"top_n must be at least 1, got {self.top_n}")
        request = RerankRequest(self.query, self.documents)
        validate_request(request)
        return request


class SpeechBody(msgspec.Struct):
    model: str
    input: str
    voice: str = ""
    response_format: str = "wav"
    speed: float = 1.0

    def to_request(self) -> SpeechRequest:
        if self.response_format not in ("wav", "pcm"):
            raise ContractError(f"response_format {self.response_format!r}: this server speaks "
                                "wav or pcm")
        request = SpeechRequest(self.input, self.voice, self.speed)
        validate_request(request)
        return request


class ImageBody(msgspec.Struct):
    """OpenAI's image generation body; ``seed`` and ``steps`` are this server's extensions
    (a random seed when none is given, the model's default step count)."""

    model: str
    prompt: str
    n: int = 1
    size: str | None = None  # "WIDTHxHEIGHT", or "auto" / absent: the contract's default
    response_format: str | None = None  # "b64_json" (the default here); "url" is not served
    output_format: str | None = None  # gpt-image's: "png" only
    seed: int | None = None
    steps: int | None = None

    def to_request(self) -> ImageRequest:
        if self.n != 1:
            raise ContractError(f"n must be 1: one image per request, got {self.n}")
        if self.response_format not in (None, "b64_json"):
            raise ContractError(f"response_format {self.response_format!r}: images are answered "
                                "as b64_json (this server keeps no files to link to)")
        if self.output_format not in (None, "png"):
            raise ContractError(f"output_format {self.output_format!r}: images are PNG")
        defaults = ImageRequest("")
        width, height = _size(self.size, defaults)
        request = ImageRequest(self.prompt, width, height,
                               defaults.steps if self.steps is None else self.steps,
                               secrets.randbelow(1 << 31) if self.seed is None else self.seed)
        validate_request(request)
        return request


def _size(size: str | None, defaults: ImageRequest) -> tuple[int, int]:
    if size in (None, "auto"):
        return defaults.width, defaults.height
    width, x, height = size.lower().partition("x")
    if not (x and width.isdigit() and height.isdigit()):
        raise ContractError(f"size {size!r}: expected WIDTHxHEIGHT in pixels (e.g. 512x512) or "
                            "auto")
    return int(width), int(height)


def decode_body(raw: bytes, body_type: type[msgspec.Struct]) -> Any:
    """The JSON body as ``body_type``; a 400 naming what is wrong otherwise."""
    try:
        return msgspec.json.decode(raw, type=body_type)
    except msgspec.ValidationError as error:
        raise ApiError(ErrorKind.BAD_REQUEST, f"invalid request body: {error}") from None
    except msgspec.DecodeError as error:
        raise ApiError(ErrorKind.BAD_REQUEST, f"the body is not JSON: {error}") from None


def read_audio_upload(data: bytes, filename: str) -> tuple[np.ndarray, int]:
    """An uploaded audio file (PCM WAV) as float32 mono and its sample rate."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ContractError(f"file {filename!r}: only PCM WAV uploads are read here")
    return read_wav(data, f"file {filename!r}")


# --- responses ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Completion:
    """Who answers: the completion id, its model, and when it was created."""

    id: str
    model: str
    created: int

    @classmethod
    def new(cls, request_id: str, model: str) -> Completion:
        return cls(f"chatcmpl-{request_id}", model, int(time.time()))

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [], "usage": usage}

    def whole(self, text: str, finish_reason: str, usage: dict[str, int],
              calls: list[ToolCall] = (), spoken: dict[str, Any] | None = None
              ) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
        if spoken is not None:  # as OpenAI answers: the words are the audio's transcript
            message = {"role": "assistant", "content": None, "audio": spoken}
        if calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in calls]
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "message": message,
                             "finish_reason": finish_reason, "logprobs": None}],
                "usage": usage}

    def call_chunks(self, call: ToolCall, index: int) -> list[dict[str, Any]]:
        """A tool call streamed as OpenAI streams one: its id and name with empty arguments,
        then the arguments."""
        return [self.chunk({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                            "function": {"name": call.name, "arguments": ""}}]}),
                self.chunk({"tool_calls": [{"index": index,
                                            "function": {"arguments": call.arguments}}]})]


SPOKEN_PCM_RATE = 24_000  # OpenAI's pcm16


def _at_pcm_rate(audio: np.ndarray, rate: int) -> np.ndarray:
    return resample(audio, rate, SPOKEN_PCM_RATE) if audio.size and rate != SPOKEN_PCM_RATE \
        else audio


def spoken_pcm16(chunk: AudioChunk) -> str:
    """One chunk of a streamed spoken reply: base64 pcm16 at 24 kHz."""
    return base64.b64encode(pcm16(_at_pcm_rate(chunk.audio, chunk.sample_rate))).decode("ascii")


def spoken_audio(request_id: str, chunks: list[AudioChunk], transcript: str,
                 audio_format: str) -> dict[str, Any]:
    """A spoken reply as OpenAI's ``message.audio``: base64 WAV at the model's rate, or
    pcm16 (16-bit little-endian at 24 kHz, OpenAI's rate)."""
    rate = chunks[0].sample_rate if chunks else SPOKEN_PCM_RATE
    audio = np.concatenate([c.audio for c in chunks]) if chunks else np.zeros(0, np.float32)
    if audio_format == "pcm16":
        data = pcm16(_at_pcm_rate(audio, rate))
    else:
        data = wav_bytes(audio, rate)
    return {"id": f"audio_{request_id}", "data": base64.b64encode(data).decode("ascii"),
            "expires_at": int(time.time()) + 3600, "transcript": transcript}


def usage_of(chunk: TextChunk) -> dict[str, int]:
    return {"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.completion_tokens,
            "total_tokens": chunk.prompt_tokens + chunk.completion_tokens}


def finish_reason_of(chunk: TextChunk) -> str:
    return chunk.finish_reason if chunk.finish_reason in ("length", "tool_calls") else "stop"


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    payload = data if isinstance(data, str) else msgspec.json.encode(data).decode()
    return f"data: {payload}\n\n".encode()


def embeddings_body(vectors: np.ndarray, model: str, encoding: str) -> dict[str, Any]:
    def encoded(row: np.ndarray) -> list[float] | str:
        if encoding == "base64":
            return base64.b64encode(row.astype("<f4").tobytes()).decode()
        return row.tolist()

    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encoded(row)}
                     for i, row in enumerate(vectors)],
            "usage": {"prompt_tokens": 0, "total_tokens": 0}}


def rerank_body(body: RerankBody, scores: np.ndarray, model: str) -> dict[str, Any]:
    """The documents' indices and scores, best first (the top_n best when asked)."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))[:body.top_n]
    return {"model": model, "results": [
        {"index": i, "relevance_score": float(scores[i]),
         **({"document": {"text": body.documents[i]}} if body.return_documents else {})}
        for i in order]}


def images_body(pixels: np.ndarray, seed: int) -> dict[str, Any]:
    """OpenAI's images response: the picture as base64 PNG (and the seed that drew it)."""
    return {"created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(png_bytes(pixels)).decode(), "seed": seed}]}


def transcription_body(transcript: Transcript, response_format: str,
                       seconds: float) -> dict[str, Any] | str:
    if response_format == "text":
        return transcript.text
    if response_format == "verbose_json":
        return {"task": "transcribe", "language": transcript.language, "duration": seconds,
                "text": transcript.text,
                "segments": [{"id": i, "start": s.start, "end": s.end, "text": s.text}
                             for i, s in enumerate(transcript.segments)]}
    return {"text": transcript.text}


def speech_bytes(audio: np.ndarray, sample_rate: int, response_format: str) -> tuple[bytes, str]:
    """Spoken audio as a WAV file (the model's rate) or OpenAI's raw 24 kHz PCM; and its type."""
    if response_format == "pcm":
        return pcm16(resample(audio, sample_rate, OPENAI_PCM_RATE)), "audio/pcm"
    return wav_bytes(audio, sample_rate), "audio/wav"
