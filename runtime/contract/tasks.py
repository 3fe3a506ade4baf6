"""The model contract: tasks, their typed requests and results, and the task protocols.

A model adapter serves one or more *tasks*. Each task has a request type, a
result type and a protocol method; streaming tasks yield several results per
request, the last one marked ``final``. ``Generic`` covers task kinds nobody
has named yet: the adapter declares Arrow schemas for their input and output.

Audio is float32 PCM (mono) with its sample rate; images are uint8 HWC.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from mofa_omni.contract.errors import ContractError, ErrorKind

if TYPE_CHECKING:
    import pyarrow as pa


class Task(str, enum.Enum):
    TEXT_GENERATION = "text_generation"
    SPEECH_RECOGNITION = "speech_recognition"
    SPEECH_SYNTHESIS = "speech_synthesis"
    EMBEDDING = "embedding"
    RERANK = "rerank"
    VISION_LANGUAGE = "vision_language"
    IMAGE_GENERATION = "image_generation"
    VIDEO_GENERATION = "video_generation"
    OMNI = "omni"  # any of text, pictures and sound in; text, and speech if asked, out
    GENERIC = "generic"

    @classmethod
    def parse(cls, name: str) -> Task:
        try:
            return cls(name)
        except ValueError:
            known = ", ".join(t.value for t in cls)
            raise ContractError(f"unknown task {name!r}; known tasks: {known}") from None


# --- text generation -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call of one of the request's tools: its id, the tool's name, its arguments as JSON."""

    id: str
    name: str
    arguments: str  # a JSON object, valid for the tool's parameters schema


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call: its name, what it does, and its parameters' JSON Schema."""

    name: str
    description: str = ""
    parameters: str = '{"type": "object", "properties": {}}'  # JSON Schema text


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What a tool node answers to a :class:`ToolCall` (an agent's tools are graph nodes)."""

    call_id: str
    content: str


TOOL_CHOICES = ("auto", "none", "required")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant" | "tool"
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)  # an assistant's calls
    tool_call_id: str = ""  # a "tool" message: the call it answers


@dataclass(frozen=True, slots=True)
class ChatRequest:
    messages: list[ChatMessage]
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    # A JSON Schema (as JSON text) the reply must satisfy: structured output, see
    # mofa_omni.adapters.structured for the supported subset. "" = free text.
    json_schema: str = ""
    # Tools the model may call (mofa_omni.adapters.tool_calls): "auto" lets the model choose
    # between answering and calling, "none" never calls, "required" always calls;
    # ``tool_name`` forces a call of that tool (with "required").
    tools: list[Tool] = field(default_factory=list)
    tool_choice: str = "auto"
    tool_name: str = ""
    parallel_tool_calls: bool = True


@dataclass(frozen=True, slots=True)
class TextChunk:
    """One piece of a streamed text reply; the last one has ``final=True``."""

    text: str
    final: bool = False
    finish_reason: str = ""  # "stop" | "length" | "tool_calls" | "cancelled" on the final chunk
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tool_calls: list[ToolCall] = field(default_factory=list)  # calls completed in this chunk


# --- speech recognition --------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TranscriptionRequest:
    """Audio to transcribe.

    A request may also be sent as a stream of messages under one request id, each ``final:
    false`` but the last: each is a *snapshot* of an utterance still being spoken (all its
    audio so far), answered by a partial :class:`Transcript` (``final: false``); a newer
    snapshot replaces one still waiting, and the last message is the whole utterance
    (:mod:`mofa_omni.voice.streaming`).
    """

    audio: np.ndarray  # float32, mono, shape (samples,)
    sample_rate: int
    language: str = ""  # "" = detect / model default
    # words the transcript is known to begin with (the settled words of a streamed utterance):
    # decoding goes on after them, and the transcript includes them. Whisper engines honour
    # it; others refuse a request that sets it.
    prefix: str = ""


MAX_PREFIX_CHARS = 1000  # whisper decodes 224 tokens at most: a prefix must leave room


@dataclass(frozen=True, slots=True)
class Segment:
    start: float
    end: float
    text: str


@dataclass(frozen=True, slots=True)
class Transcript:
    text: str
    language: str = ""
    segments: list[Segment] = field(default_factory=list)
    # a partial transcript of an utterance still being spoken: how many of the leading words
    # of ``text`` are settled (will not change); the rest is the newest guess
    settled_words: int = 0


# --- speech synthesis ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SpeechRequest:
    text: str
    voice: str = ""
    speed: float = 1.0


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """A piece of synthesized speech (one sentence); the last one has ``final=True``."""

    audio: np.ndarray  # float32, mono
    sample_rate: int
    final: bool = False
    text: str = ""  # the text this chunk speaks


# --- embeddings and reranking --------------------------------------------------------

INPUT_TYPES = ("query", "document")  # what an embedding request's texts are, for prompted models


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    texts: list[str]
    # "query" or "document": models with prompts (E5's "query: ", "passage: ") put the matching
    # one before each text; None: the model's default prompt, if any.
    input_type: str | None = None


@dataclass(frozen=True, slots=True)
class Embeddings:
    # float32, shape (len(texts), dim); unit length when the model normalizes (its
    # sentence-transformers Normalize module, or the catalog option), as most do
    vectors: np.ndarray


@dataclass(frozen=True, slots=True)
class RerankRequest:
    query: str
    documents: list[str]


@dataclass(frozen=True, slots=True)
class RerankResult:
    scores: np.ndarray  # float32, one per document, higher is more relevant


# --- vision ----------------------------------------------------------------------------

OMNI_MAX_AUDIO_S = 600.0  # sound in one omni request, all clips together


@dataclass(frozen=True, slots=True)
class OmniRequest:
    """A conversation whose last user turn may hold pictures and sounds, answered in text and,
    when ``speak`` is set, in speech too (in the model's own voice ``voice``): the one
    multimodal request, for a vision-language model (pictures and text: ``vision_language``)
    as for an omni model (any of them, and speech out: ``omni``).

    The reply streams as TextChunks (the text, the last one final with its usage) and, when
    speaking, AudioChunks after them (the last one final)."""

    messages: list[ChatMessage]
    images: list[np.ndarray] = field(default_factory=list)  # each uint8, HWC
    audio: list[np.ndarray] = field(default_factory=list)  # each float32 mono at sample_rate
    sample_rate: int = 16000
    max_tokens: int = 256
    temperature: float = 0.0
    speak: bool = False
    voice: str = ""  # "" = the model's first voice
    # The message each clip was said in (a voice conversation's earlier turns); empty: every
    # clip belongs to the last user message.
    audio_turns: list[int] = field(default_factory=list)
    videos: list[np.ndarray] = field(default_factory=list)  # each uint8 (T, H, W, 3)
    video_fps: list[float] = field(default_factory=list)  # each video's frame rate


@dataclass(frozen=True, slots=True)
class ImageRequest:
    prompt: str
    width: int = 512
    height: int = 512
    steps: int = 4
    seed: int = 0


@dataclass(frozen=True, slots=True)
class Image:
    pixels: np.ndarray  # uint8, HWC


# --- video generation ----------------------------------------------------------------

VIDEO_PHASES = ("denoise", "decode")


@dataclass(frozen=True, slots=True)
class VideoRequest:
    """A clip to generate from a prompt, starting from ``image`` when one is given (image to
    video; it is then the first frame, resized to the clip's size)."""

    prompt: str
    frames: int = 17
    fps: int = 16
    width: int = 832
    height: int = 480
    steps: int = 20
    seed: int = 0
    image: np.ndarray | None = None  # uint8 HWC


@dataclass(frozen=True, slots=True)
class VideoProgress:
    """How far a clip has come: denoising step ``step`` of ``steps``, or decoding frames."""

    phase: str  # one of VIDEO_PHASES
    step: int
    steps: int


@dataclass(frozen=True, slots=True)
class VideoChunk:
    """Consecutive frames of a generated clip. A clip travels as several chunks (a few seconds
    at 480p are beyond one shared-memory message; several chunks fit the sender's pool at
    once), numbered from 0 so that a receiver sees a lost one; the last has ``final=True``."""

    frames: np.ndarray  # uint8, (T, H, W, 3)
    index: int  # the chunk's number in its clip
    first_frame: int  # the clip's frame number of frames[0]
    total_frames: int  # the clip's length
    fps: int
    final: bool = False


def frames_per_chunk(height: int, width: int, chunk_bytes: int) -> int:
    """How many frames of ``height`` x ``width`` RGB fit in a chunk of ``chunk_bytes`` (at
    least one: a frame larger than a chunk travels alone, if the pool can hold it)."""
    return max(1, chunk_bytes // (height * width * 3))


# --- stages ----------------------------------------------------------------------------

TENSOR_DTYPES = ("float32", "float16", "int32", "int64", "uint8")


@dataclass(frozen=True, slots=True)
class Tensor:
    """An intermediate array between two stages of a pipeline (e.g. whisper's audio features).

    Inside one process ``array`` is the producing stage's own array (an ``mx.array``),
    handed on as the same object; after crossing processes it is a read-only numpy view of
    the shared-memory buffer. ``kind`` names what it holds, so that a stage fed the wrong
    array says so; ``attrs`` carry the request's context (a duration, a language).
    """

    kind: str
    array: Any
    attrs: dict[str, str | int | float | bool] = field(default_factory=dict)


def dtype_name(array: Any) -> str:
    """``float32`` for a numpy or an MLX float32 array (MLX prints ``mlx.core.float32``)."""
    return str(array.dtype).rsplit(".", 1)[-1]


# --- generic ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class GenericSpec:
    """A task kind declared by an adapter: its name and its Arrow schemas."""

    name: str
    input_schema: pa.Schema
    output_schema: pa.Schema


@dataclass(frozen=True, slots=True)
class GenericRequest:
    kind: str  # the GenericSpec name
    batch: pa.RecordBatch


@dataclass(frozen=True, slots=True)
class GenericResult:
    kind: str
    batch: pa.RecordBatch


# --- errors ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ErrorReport:
    """Sent on a node's ``error`` output when a request cannot be served."""

    request_id: str
    kind: ErrorKind  # a string naming a kind is accepted and checked
    message: str
    node: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ErrorKind.parse(self.kind))

    def summary(self) -> str:
        return f"{self.kind}: {self.message}"


# --- task protocols ------------------------------------------------------------------

@runtime_checkable
class TextGeneration(Protocol):
    def generate(self, request: ChatRequest) -> Iterator[TextChunk]: ...


@runtime_checkable
class SpeechRecognition(Protocol):
    def transcribe(self, request: TranscriptionRequest) -> Transcript: ...


@runtime_checkable
class SpeechSynthesis(Protocol):
    def synthesize(self, request: SpeechRequest) -> Iterator[AudioChunk]: ...


@runtime_checkable
class Embedding(Protocol):
    def embed(self, request: EmbeddingRequest) -> Embeddings: ...


@runtime_checkable
class Rerank(Protocol):
    def rerank(self, request: RerankRequest) -> RerankResult: ...


@runtime_checkable
class VisionLanguage(Protocol):
    def generate_from_images(self, request: OmniRequest) -> Iterator[TextChunk]: ...


@runtime_checkable
class ImageGeneration(Protocol):
    def generate_image(self, request: ImageRequest) -> Image: ...


@runtime_checkable
class VideoGeneration(Protocol):
    def generate_video(self, request: VideoRequest) -> Iterator[VideoProgress | VideoChunk]: ...


@runtime_checkable
class Omni(Protocol):
    def generate_omni(self, request: OmniRequest) -> Iterator[TextChunk | AudioChunk]: ...


@runtime_checkable
class Generic(Protocol):
    def generic_specs(self) -> list[GenericSpec]: ...

    def run_generic(self, request: GenericRequest) -> GenericResult: ...


@dataclass(frozen=True, slots=True)
class TaskSpec:
    task: Task
    protocol: type
    method: str
    request_type: type
    result_type: type
    streams: bool


TASK_SPECS: dict[Task, TaskSpec] = {
    spec.task: spec
    for spec in (
        TaskSpec(Task.TEXT_GENERATION, TextGeneration, "generate", ChatRequest, TextChunk, True),
        TaskSpec(Task.SPEECH_RECOGNITION, SpeechRecognition, "transcribe",
                 TranscriptionRequest, Transcript, False),
        TaskSpec(Task.SPEECH_SYNTHESIS, SpeechSynthesis, "synthesize", SpeechRequest, AudioChunk, True),
        TaskSpec(Task.EMBEDDING, Embedding, "embed", EmbeddingRequest, Embeddings, False),
        TaskSpec(Task.RERANK, Rerank, "rerank", RerankRequest, RerankResult, False),
        TaskSpec(Task.VISION_LANGUAGE, VisionLanguage, "generate_from_images",
                 OmniRequest, TextChunk, True),
        TaskSpec(Task.IMAGE_GENERATION, ImageGeneration, "generate_image", ImageRequest, Image, False),
        # VideoProgress while it runs, then the VideoChunks (a receiver tells them by schema)
        TaskSpec(Task.VIDEO_GENERATION, VideoGeneration, "generate_video", VideoRequest,
                 VideoChunk, True),
        # TextChunks, then AudioChunks when speaking: a receiver tells them by their schema
        TaskSpec(Task.OMNI, Omni, "generate_omni", OmniRequest, TextChunk, True),
        TaskSpec(Task.GENERIC, Generic, "run_generic", GenericRequest, GenericResult, False),
    )
}


def ends_reply(request: object, result: object) -> bool:
    """Whether ``result`` is the last of its streamed reply: its own ``final``, except that a
    spoken omni reply goes on after its final text with its speech, to the final AudioChunk."""
    if isinstance(request, OmniRequest) and request.speak:
        return isinstance(result, AudioChunk) and result.final
    return bool(getattr(result, "final", False))


def validate_audio(audio: np.ndarray, sample_rate: int, *, what: str = "audio") -> np.ndarray:
    """Check PCM audio against the contract: mono float32, finite, non-empty, sane rate."""
    if not isinstance(audio, np.ndarray):
        raise ContractError(f"{what} must be a numpy array, got {type(audio).__name__}")
    if audio.dtype != np.float32:
        raise ContractError(f"{what} must be float32 PCM, got {audio.dtype}")
    if audio.ndim != 1:
        raise ContractError(f"{what} must be mono (1-D), got shape {audio.shape}")
    if audio.size == 0:
        raise ContractError(f"{what} is empty")
    if not np.isfinite(audio).all():
        raise ContractError(f"{what} contains NaN or infinite samples")
    if not 1000 <= int(sample_rate) <= 384_000:
        raise ContractError(f"{what} sample rate {sample_rate} Hz is out of range")
    return audio


def validate_image(pixels: np.ndarray, *, what: str = "image") -> np.ndarray:
    if not isinstance(pixels, np.ndarray):
        raise ContractError(f"{what} must be a numpy array, got {type(pixels).__name__}")
    if pixels.dtype != np.uint8:
        raise ContractError(f"{what} must be uint8, got {pixels.dtype}")
    if pixels.ndim != 3:
        raise ContractError(f"{what} must be HWC (3-D), got shape {pixels.shape}")
    if pixels.shape[2] not in (1, 3, 4):
        raise ContractError(f"{what} must have 1, 3 or 4 channels, got {pixels.shape[2]}")
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ContractError(f"{what} is empty ({pixels.shape})")
    return pixels


def _check_generation(messages: list[ChatMessage], max_tokens: int, temperature: float) -> None:
    for i, message in enumerate(messages):
        if message.role not in ("system", "user", "assistant", "tool"):
            raise ContractError(f"message {i} has unknown role {message.role!r}")
    if max_tokens <= 0:
        raise ContractError(f"max_tokens must be positive, got {max_tokens}")
    if temperature < 0:
        raise ContractError(f"temperature must be >= 0, got {temperature}")


def _check_tools(request: ChatRequest) -> None:
    """Tools with valid names and schemas, a choice among them, and a conversation whose tool
    results each answer a call made before them."""
    from mofa_omni.contract.schema import parse_schema

    names = [tool.name for tool in request.tools]
    for i, tool in enumerate(request.tools):
        if not tool.name or not all(c.isalnum() or c in "_-" for c in tool.name) \
                or len(tool.name) > 64:
            raise ContractError(f"tools[{i}]: the name {tool.name!r} must be 1-64 letters, digits, "
                                "_ or -")
        parse_schema(tool.parameters, f"tools[{i}] ({tool.name}) parameters", tool=True)
    if len(set(names)) != len(names):
        raise ContractError(f"tools: a name is given twice ({', '.join(names)})")
    if request.tool_choice not in TOOL_CHOICES:
        raise ContractError(f"tool_choice {request.tool_choice!r} is not one of "
                            f"{', '.join(TOOL_CHOICES)}")
    if request.tool_choice == "required" and not request.tools:
        raise ContractError("tool_choice 'required' needs tools")
    if request.tool_name and request.tool_name not in names:
        raise ContractError(f"tool_choice names the function {request.tool_name!r}, which is not "
                            f"among the tools ({', '.join(names) or 'none given'})")
    if request.tools and request.json_schema:
        raise ContractError("tools and a json_schema response format cannot be combined")
    called: set[str] = set()
    for i, message in enumerate(request.messages):
        if message.tool_calls and message.role != "assistant":
            raise ContractError(f"messages[{i}]: only an assistant message carries tool_calls")
        for call in message.tool_calls:
            _check_arguments(call, f"messages[{i}].tool_calls ({call.name})")
            called.add(call.id)
        if message.role == "tool" and message.tool_call_id not in called:
            raise ContractError(f"messages[{i}]: a tool message answers tool_call_id "
                                f"{message.tool_call_id!r}, which no earlier assistant message "
                                "called")


def _check_arguments(call: ToolCall, where: str) -> None:
    try:
        arguments = json.loads(call.arguments)
    except json.JSONDecodeError as error:
        raise ContractError(f"{where}: the arguments are not JSON: {error}") from None
    if not isinstance(arguments, dict):
        raise ContractError(f"{where}: the arguments must be a JSON object")


OMNI_MAX_VIDEO_FRAMES = 1024  # frames in one request, all clips together


def _check_videos(videos: list[np.ndarray], rates: list[float]) -> None:
    if len(rates) != len(videos):
        raise ContractError(f"{len(videos)} videos with {len(rates)} frame rates")
    for i, (video, rate) in enumerate(zip(videos, rates)):
        if not isinstance(video, np.ndarray) or video.dtype != np.uint8 or video.ndim != 4 \
                or video.shape[3] != 3 or 0 in video.shape:
            raise ContractError(f"video {i} must be uint8 frames (T, H, W, 3), got "
                                f"{getattr(video, 'dtype', type(video).__name__)} "
                                f"{getattr(video, 'shape', '')}")
        if not 0 < rate <= VIDEO_MAX_FPS:
            raise ContractError(f"video {i}: frame rate {rate} is outside 0-{VIDEO_MAX_FPS}")
    if sum(len(v) for v in videos) > OMNI_MAX_VIDEO_FRAMES:
        raise ContractError(f"the request holds {sum(len(v) for v in videos)} video frames; "
                            f"at most {OMNI_MAX_VIDEO_FRAMES}")


VIDEO_MAX_SIDE = 4096
VIDEO_MAX_FRAMES = 1024
VIDEO_MAX_FPS = 240


def _check_video(request: VideoRequest) -> None:
    """A video request's own sense (a model's sizes and limits are the adapter's to check)."""
    if not request.prompt.strip():
        raise ContractError("video request has an empty prompt")
    if not 1 <= request.frames <= VIDEO_MAX_FRAMES:
        raise ContractError(f"video request frames must be 1-{VIDEO_MAX_FRAMES}, "
                            f"got {request.frames}")
    if not 1 <= request.fps <= VIDEO_MAX_FPS:
        raise ContractError(f"video request fps must be 1-{VIDEO_MAX_FPS}, got {request.fps}")
    if not (16 <= request.width <= VIDEO_MAX_SIDE and 16 <= request.height <= VIDEO_MAX_SIDE):
        raise ContractError(f"video size {request.width}x{request.height} is outside "
                            f"16-{VIDEO_MAX_SIDE} pixels a side")
    if request.steps < 1:
        raise ContractError(f"video request steps must be at least 1, got {request.steps}")
    if request.seed < 0:
        raise ContractError(f"video request seed must not be negative, got {request.seed}")
    if request.image is not None:
        validate_image(request.image, what="the first frame")


def refuse_prefix(request: TranscriptionRequest, model: str) -> None:
    """For a speech recognizer that cannot go on from given words: a request with a
    ``prefix`` is refused by name, not transcribed as if it had none."""
    if request.prefix:
        raise ContractError(f"model {model!r} does not take a transcription prefix")


def validate_request(request: object) -> None:
    """Semantic checks shared by every transport (Arrow, CLI, HTTP)."""
    match request:
        case ChatRequest(messages=messages, max_tokens=max_tokens, temperature=temperature,
                         top_p=top_p):
            if not messages:
                raise ContractError("chat request has no messages")
            if not 0 < top_p <= 1:
                raise ContractError(f"top_p must be in (0, 1], got {top_p}")
            _check_generation(messages, max_tokens, temperature)
            if request.json_schema:
                from mofa_omni.contract.schema import parse_schema

                parse_schema(request.json_schema)
            _check_tools(request)
        case TranscriptionRequest(audio=audio, sample_rate=rate, prefix=prefix):
            validate_audio(audio, rate)
            if len(prefix) > MAX_PREFIX_CHARS:
                raise ContractError(f"transcription prefix is {len(prefix)} characters; at most "
                                    f"{MAX_PREFIX_CHARS}")
        case SpeechRequest(text=text, speed=speed):
            if not text.strip():
                raise ContractError("speech request has empty text")
            if not 0.25 <= speed <= 4.0:
                raise ContractError(f"speech speed {speed} is outside 0.25-4")
        case EmbeddingRequest(texts=texts, input_type=input_type):
            if not texts:
                raise ContractError("embedding request has no texts")
            if any(not t.strip() for t in texts):
                raise ContractError("embedding request contains an empty text")
            if input_type is not None and input_type not in INPUT_TYPES:
                raise ContractError(f"input_type {input_type!r} is not one of "
                                    f"{', '.join(INPUT_TYPES)}")
        case RerankRequest(query=query, documents=documents):
            if not query.strip():
                raise ContractError("rerank request has an empty query")
            if not documents:
                raise ContractError("rerank request has no documents")
        case OmniRequest(messages=messages, images=images, audio=audio, sample_rate=rate):
            if not messages:
                raise ContractError("omni request has no messages")
            for i, image in enumerate(images):
                validate_image(image, what=f"image {i}")
            for i, clip in enumerate(audio):
                validate_audio(clip, rate, what=f"audio {i}")
            if request.audio_turns:
                if len(request.audio_turns) != len(audio):
                    raise ContractError(f"audio_turns names {len(request.audio_turns)} messages "
                                        f"for {len(audio)} audio clips")
                for turn in request.audio_turns:
                    if not 0 <= turn < len(messages) or messages[turn].role != "user":
                        raise ContractError(f"audio_turns: message {turn} is not a user turn "
                                            f"of the {len(messages)} messages")
            _check_videos(request.videos, request.video_fps)
            seconds = sum(clip.size for clip in audio) / rate if audio else 0.0
            if seconds > OMNI_MAX_AUDIO_S:
                raise ContractError(f"omni request holds {seconds:.0f} s of audio; at most "
                                    f"{OMNI_MAX_AUDIO_S:.0f} s")
            _check_generation(messages, request.max_tokens, request.temperature)
        case ImageRequest(prompt=prompt, width=width, height=height, steps=steps, seed=seed):
            if not prompt.strip():
                raise ContractError("image request has an empty prompt")
            if not (8 <= width <= 4096 and 8 <= height <= 4096):
                raise ContractError(f"image size {width}x{height} is out of range")
            if steps < 1:
                raise ContractError(f"image request steps must be at least 1, got {steps}")
            if seed < 0:
                raise ContractError(f"image request seed must not be negative, got {seed}")
        case VideoRequest():
            _check_video(request)
        case VideoChunk(frames=frames, index=index, first_frame=first, total_frames=total):
            if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 \
                    or 0 in frames.shape:
                raise ContractError(f"video chunk {index}: frames must be uint8 (T, H, W, 3), "
                                    f"got {frames.dtype} {frames.shape}")
            if index < 0 or first < 0 or first + len(frames) > total:
                raise ContractError(f"video chunk {index}: frames {first}-{first + len(frames)} "
                                    f"do not lie within the clip's {total}")
            if request.fps <= 0:
                raise ContractError(f"video chunk {index}: fps must be positive")
        case VideoProgress(phase=phase, step=step, steps=steps):
            if phase not in VIDEO_PHASES or not 0 <= step <= steps:
                raise ContractError(f"video progress {phase!r} {step}/{steps} is not a phase of "
                                    f"{', '.join(VIDEO_PHASES)} with 0 <= step <= steps")
        case Tensor(kind=kind, array=array):
            if not kind:
                raise ContractError("tensor has no kind")
            if dtype_name(array) not in TENSOR_DTYPES:
                raise ContractError(f"tensor {kind!r} has dtype {array.dtype}; "
                                    f"stages exchange {', '.join(TENSOR_DTYPES)}")
        case _:
            pass
