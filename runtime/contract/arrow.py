"""Arrow codecs for the contract's messages: one schema per message type, defined here only.

Every message travels as a one-row ``pa.StructArray`` whose type is the
message's schema. Numeric payloads (audio, vectors, pixels) are Arrow lists
built from and read back as numpy arrays without copying. ``decode`` rejects
malformed input (not a struct, missing field, wrong type, NaN audio, empty
input) with a :class:`ContractError` that names the message and the field.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import (
    TENSOR_DTYPES,
    AudioChunk,
    ChatMessage,
    ChatRequest,
    EmbeddingRequest,
    Embeddings,
    ErrorReport,
    GenericRequest,
    GenericResult,
    Image,
    ImageRequest,
    OmniRequest,
    RerankRequest,
    RerankResult,
    Segment,
    SpeechRequest,
    Tensor,
    TextChunk,
    Tool,
    ToolCall,
    ToolResult,
    Transcript,
    TranscriptionRequest,
    VideoChunk,
    VideoProgress,
    VideoRequest,
    dtype_name,
    validate_image,
    validate_request,
)

T = TypeVar("T")

_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
_TOOL_CALL = pa.struct([("id", pa.string()), ("name", pa.string()), ("arguments", pa.string())])
_TOOL = pa.struct([("name", pa.string()), ("description", pa.string()),
                   ("parameters", pa.string())])
# A chat request's messages also carry tool calls (an assistant's) and the call a tool
# message answers.
_CHAT_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string()),
                           ("tool_calls", pa.list_(_TOOL_CALL)), ("tool_call_id", pa.string())])
_SEGMENT = pa.struct([("start", pa.float32()), ("end", pa.float32()), ("text", pa.string())])
_IMAGE_FIELDS = [
    ("pixels", pa.list_(pa.uint8())),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("channels", pa.int32()),
]


class _Row:
    """Typed, validating access to the single row of a message StructArray.

    A row of exactly its schema that carries no list of numbers (a streamed token, a request
    of text) is read into Python in one call, checked for nulls as Python values, and its
    scalars are taken from there: per field through pyarrow, a token's message cost more to
    read than everything else the gateway did with it. Anything else, or a row with a null,
    goes field by field (that path words the errors)."""

    def __init__(self, array: pa.Array, schema: pa.StructType, what: str, *,
                 numbers: bool = True):
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        if not isinstance(array, pa.StructArray):
            raise ContractError(f"{what}: expected an Arrow struct array, got {array.type}")
        if len(array) != 1:
            raise ContractError(f"{what}: expected exactly one row, got {len(array)}")
        self.array, self.schema, self.what = array, schema, what
        self._values: dict[str, Any] | None = None
        if not numbers and array.type.equals(schema):
            values = array[0].as_py()
            if values is not None and not _holds_none(values):
                self._values = values

    def column(self, name: str) -> pa.Array:
        index = self.array.type.get_field_index(name)
        if index < 0:
            raise ContractError(f"{self.what}: missing field {name!r}")
        column = self.array.field(index)
        expected = self.schema.field(name).type
        if not _compatible(column.type, expected):
            raise ContractError(
                f"{self.what}: field {name!r} must be {expected}, got {column.type}")
        if column.null_count:
            raise ContractError(f"{self.what}: field {name!r} is null")
        if _nulls_inside(column):
            raise ContractError(f"{self.what}: field {name!r} contains nulls")
        return column

    def scalar(self, name: str) -> Any:
        if self._values is not None:
            return self._values[name]
        return self.column(name)[0].as_py()

    def optional(self, name: str, default: Any) -> Any:
        """A field added after messages without it were sent: ``default`` when it is absent."""
        if self.array.type.get_field_index(name) < 0:
            return default
        return self.scalar(name)

    def numbers(self, name: str) -> np.ndarray:
        """A list<number> field as a zero-copy numpy view."""
        values = self.column(name).flatten()
        if values.null_count:
            raise ContractError(f"{self.what}: field {name!r} contains nulls")
        return values.to_numpy(zero_copy_only=True)


def _without_numbers(schema: pa.DataType) -> bool:
    """Whether no list of numbers (a payload: audio, pixels, vectors) is anywhere in
    ``schema``: such a row is cheap to read into Python whole."""
    if pa.types.is_list(schema) or pa.types.is_large_list(schema):
        item = schema.value_type
        return not (pa.types.is_integer(item) or pa.types.is_floating(item)) \
            and _without_numbers(item)
    if pa.types.is_struct(schema):
        return all(_without_numbers(schema.field(i).type) for i in range(schema.num_fields))
    return True


def _holds_none(value: Any) -> bool:
    """Whether a row read into Python holds a null anywhere."""
    if value is None:
        return True
    if isinstance(value, dict):
        return any(_holds_none(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_none(v) for v in value)
    return False


def _nulls_inside(column: pa.Array) -> bool:
    """Whether a list or struct column holds a null anywhere below its top level."""
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        values = column.flatten()
        return bool(values.null_count) or _nulls_inside(values)
    if pa.types.is_struct(column.type):
        return any(column.field(i).null_count or _nulls_inside(column.field(i))
                   for i in range(column.type.num_fields))
    return False


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Exact match, except that any integer (float) width is accepted for an integer
    (float) scalar; lists of numbers must match exactly (a payload dtype is a contract)."""
    if actual.equals(expected):
        return True
    if pa.types.is_integer(expected) and pa.types.is_integer(actual):
        return True
    if pa.types.is_floating(expected) and pa.types.is_floating(actual):
        return True
    if pa.types.is_string(expected) and pa.types.is_large_string(actual):
        return True
    return False


def _numbers(values: np.ndarray, arrow_type: pa.DataType) -> pa.ListArray:
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=arrow_type)
    return pa.ListArray.from_arrays(pa.array([0, len(flat)], pa.int32()), flat)


def _one(value: Any, arrow_type: pa.DataType) -> pa.Array:
    if isinstance(value, (str, int, float, list)) and not value:  # "", 0, False, []
        return _empty(type(value), arrow_type)
    return pa.array([value], type=arrow_type)


@functools.lru_cache(maxsize=64)
def _empty(kind: type, arrow_type: pa.DataType) -> pa.Array:
    """A one-value array of an empty value ("", 0, False, no tool calls), built once and
    shared (Arrow arrays are immutable): most fields of a streamed token's message hold one,
    and building each anew cost more than the token's text."""
    return pa.array([kind()], type=arrow_type)


def _raw_bytes(array: Any) -> pa.ListArray:
    """An array's bytes as list<uint8> without copying them (an MLX array is read in place)."""
    flat = np.ascontiguousarray(np.asarray(array)).reshape(-1)
    data = pa.Array.from_buffers(pa.uint8(), flat.nbytes, [None, pa.py_buffer(flat.view(np.uint8))])
    return pa.ListArray.from_arrays(pa.array([0, flat.nbytes], pa.int32()), data)


def _tensor_from(row: _Row) -> Tensor:
    kind, dtype, shape = row.scalar("kind"), row.scalar("dtype"), tuple(row.scalar("shape"))
    raw = row.numbers("data")
    if dtype not in TENSOR_DTYPES:
        raise ContractError(f"{row.what} {kind!r}: dtype {dtype!r} is not one of "
                            f"{', '.join(TENSOR_DTYPES)}")
    itemsize = np.dtype(dtype).itemsize
    if any(n < 0 for n in shape) or raw.size != int(np.prod(shape)) * itemsize:
        raise ContractError(f"{row.what} {kind!r}: {raw.size} bytes do not fill shape {shape} "
                            f"of {dtype}")
    return Tensor(kind, raw.view(dtype).reshape(shape), json.loads(row.scalar("attrs") or "{}"))


def _messages(messages: list[ChatMessage]) -> pa.Array:
    return _one([{"role": m.role, "content": m.content} for m in messages], pa.list_(_MESSAGE))


def _read_messages(row: _Row) -> list[ChatMessage]:
    return [ChatMessage(m["role"], m["content"], _read_calls(m.get("tool_calls") or []),
                        m.get("tool_call_id") or "")
            for m in row.scalar("messages")]


def _chat_messages(messages: list[ChatMessage]) -> pa.Array:
    return _one([{"role": m.role, "content": m.content, "tool_calls": _calls(m.tool_calls),
                  "tool_call_id": m.tool_call_id} for m in messages], pa.list_(_CHAT_MESSAGE))


def _calls(calls: list[ToolCall]) -> list[dict[str, str]]:
    return [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls]


def _read_calls(calls: list[dict[str, str]]) -> list[ToolCall]:
    return [ToolCall(c["id"], c["name"], c["arguments"]) for c in calls]


def _image_from(pixels: np.ndarray, height: int, width: int, channels: int, what: str) -> np.ndarray:
    if pixels.dtype != np.uint8:
        raise ContractError(f"{what}: pixels must be uint8, got {pixels.dtype}")
    if min(height, width, channels) <= 0 or pixels.size != height * width * channels:
        raise ContractError(
            f"{what}: {pixels.size} pixels do not fill shape ({height}, {width}, {channels})")
    return validate_image(pixels.reshape(height, width, channels), what=what)


@dataclass(frozen=True, slots=True)
class _Codec:
    schema: pa.StructType
    to_columns: Callable[[Any], list[pa.Array]]
    from_row: Callable[[_Row], Any]
    numbers: bool = field(init=False)  # a list of numbers somewhere in the schema
    fields: list[pa.Field] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "numbers", not _without_numbers(self.schema))
        object.__setattr__(self, "fields", list(self.schema))


_CODECS: dict[type, _Codec] = {
    ErrorReport: _Codec(
        pa.struct([("request_id", pa.string()), ("kind", pa.string()), ("message", pa.string()),
                   ("node", pa.string())]),
        lambda m: [_one(m.request_id, pa.string()), _one(str(m.kind), pa.string()),
                   _one(m.message, pa.string()), _one(m.node, pa.string())],
        lambda r: ErrorReport(r.scalar("request_id"), r.scalar("kind"), r.scalar("message"),
                              r.scalar("node")),
    ),
    ChatRequest: _Codec(
        pa.struct([("messages", pa.list_(_CHAT_MESSAGE)), ("max_tokens", pa.int32()),
                   ("temperature", pa.float32()), ("top_p", pa.float32()),
                   ("stop", pa.list_(pa.string())), ("json_schema", pa.string()),
                   ("tools", pa.list_(_TOOL)), ("tool_choice", pa.string()),
                   ("tool_name", pa.string()), ("parallel_tool_calls", pa.bool_())]),
        lambda m: [_chat_messages(m.messages), _one(m.max_tokens, pa.int32()),
                   _one(m.temperature, pa.float32()), _one(m.top_p, pa.float32()),
                   _one(list(m.stop), pa.list_(pa.string())), _one(m.json_schema, pa.string()),
                   _one([{"name": t.name, "description": t.description,
                          "parameters": t.parameters} for t in m.tools], pa.list_(_TOOL)),
                   _one(m.tool_choice, pa.string()), _one(m.tool_name, pa.string()),
                   _one(m.parallel_tool_calls, pa.bool_())],
        lambda r: ChatRequest(_read_messages(r), r.scalar("max_tokens"), r.scalar("temperature"),
                              r.scalar("top_p"), r.scalar("stop"), r.scalar("json_schema"),
                              [Tool(t["name"], t["description"], t["parameters"])
                               for t in r.scalar("tools")],
                              r.scalar("tool_choice"), r.scalar("tool_name"),
                              r.scalar("parallel_tool_calls")),
    ),
    TextChunk: _Codec(
        pa.struct([("text", pa.string()), ("final", pa.bool_()), ("finish_reason", pa.string()),
                   ("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32()),
                   ("tool_calls", pa.list_(_TOOL_CALL))]),
        lambda m: [_one(m.text, pa.string()), _one(m.final, pa.bool_()),
                   _one(m.finish_reason, pa.string()), _one(m.prompt_tokens, pa.int32()),
                   _one(m.completion_tokens, pa.int32()),
                   _one(_calls(m.tool_calls), pa.list_(_TOOL_CALL))],
        lambda r: TextChunk(r.scalar("text"), r.scalar("final"), r.scalar("finish_reason"),
                            r.scalar("prompt_tokens"), r.scalar("completion_tokens"),
                            _read_calls(r.scalar("tool_calls"))),
    ),
    ToolCall: _Codec(
        _TOOL_CALL,
        lambda m: [_one(m.id, pa.string()), _one(m.name, pa.string()),
                   _one(m.arguments, pa.string())],
        lambda r: ToolCall(r.scalar("id"), r.scalar("name"), r.scalar("arguments")),
    ),
    ToolResult: _Codec(
        pa.struct([("call_id", pa.string()), ("content", pa.string())]),
        lambda m: [_one(m.call_id, pa.string()), _one(m.content, pa.string())],
        lambda r: ToolResult(r.scalar("call_id"), r.scalar("content")),
    ),
    TranscriptionRequest: _Codec(
        pa.struct([("audio", pa.list_(pa.float32())), ("sample_rate", pa.int32()),
                   ("language", pa.string()), ("prefix", pa.string())]),
        lambda m: [_numbers(m.audio, pa.float32()), _one(m.sample_rate, pa.int32()),
                   _one(m.language, pa.string()), _one(m.prefix, pa.string())],
        lambda r: TranscriptionRequest(r.numbers("audio"), r.scalar("sample_rate"),
                                       r.scalar("language"), r.scalar("prefix")),
    ),
    Transcript: _Codec(
        pa.struct([("text", pa.string()), ("language", pa.string()),
                   ("segments", pa.list_(_SEGMENT)), ("settled_words", pa.int32())]),
        lambda m: [_one(m.text, pa.string()), _one(m.language, pa.string()),
                   _one([{"start": s.start, "end": s.end, "text": s.text} for s in m.segments],
                        pa.list_(_SEGMENT)), _one(m.settled_words, pa.int32())],
        lambda r: Transcript(r.scalar("text"), r.scalar("language"),
                             [Segment(s["start"], s["end"], s["text"])
                              for s in r.scalar("segments")], r.scalar("settled_words")),
    ),
    SpeechRequest: _Codec(
        pa.struct([("text", pa.string()), ("voice", pa.string()), ("speed", pa.float32())]),
        lambda m: [_one(m.text, pa.string()), _one(m.voice, pa.string()),
                   _one(m.speed, pa.float32())],
        lambda r: SpeechRequest(r.scalar("text"), r.scalar("voice"), r.scalar("speed")),
    ),
    AudioChunk: _Codec(
        pa.struct([("audio", pa.list_(pa.float32())), ("sample_rate", pa.int32()),
                   ("final", pa.bool_()), ("text", pa.string())]),
        lambda m: [_numbers(m.audio, pa.float32()), _one(m.sample_rate, pa.int32()),
                   _one(m.final, pa.bool_()), _one(m.text, pa.string())],
        lambda r: AudioChunk(r.numbers("audio"), r.scalar("sample_rate"), r.scalar("final"),
                             r.scalar("text")),
    ),
    EmbeddingRequest: _Codec(  # input_type "" is None; messages from before it had none
        pa.struct([("texts", pa.list_(pa.string())), ("input_type", pa.string())]),
        lambda m: [_one(list(m.texts), pa.list_(pa.string())),
                   _one(m.input_type or "", pa.string())],
        lambda r: EmbeddingRequest(r.scalar("texts"), r.optional("input_type", "") or None),
    ),
    Embeddings: _Codec(
        pa.struct([("vectors", pa.list_(pa.float32())), ("dim", pa.int32())]),
        lambda m: [_numbers(m.vectors, pa.float32()), _one(m.vectors.shape[1], pa.int32())],
        lambda r: Embeddings(_matrix(r.numbers("vectors"), r.scalar("dim"), r.what)),
    ),
    RerankRequest: _Codec(
        pa.struct([("query", pa.string()), ("documents", pa.list_(pa.string()))]),
        lambda m: [_one(m.query, pa.string()), _one(list(m.documents), pa.list_(pa.string()))],
        lambda r: RerankRequest(r.scalar("query"), r.scalar("documents")),
    ),
    RerankResult: _Codec(
        pa.struct([("scores", pa.list_(pa.float32()))]),
        lambda m: [_numbers(m.scores, pa.float32())],
        lambda r: RerankResult(r.numbers("scores")),
    ),
    OmniRequest: _Codec(  # the clips travel as one float32 list and their lengths
        pa.struct([("messages", pa.list_(_MESSAGE)), ("images", pa.list_(pa.struct(_IMAGE_FIELDS))),
                   ("audio", pa.list_(pa.float32())), ("audio_lengths", pa.list_(pa.int64())),
                   ("sample_rate", pa.int32()), ("max_tokens", pa.int32()),
                   ("temperature", pa.float32()), ("speak", pa.bool_()), ("voice", pa.string()),
                   ("audio_turns", pa.list_(pa.int32())),
                   # the clips' frames as one uint8 list, each clip's (T, H, W, 3) and rate
                   ("video_frames", pa.list_(pa.uint8())),
                   ("video_shapes", pa.list_(pa.list_(pa.int32()))),
                   ("video_fps", pa.list_(pa.float32()))]),
        lambda m: [_messages(m.messages), _images(m.images),
                   _numbers(np.concatenate(m.audio) if m.audio else np.zeros(0, np.float32),
                            pa.float32()),
                   _one([int(clip.size) for clip in m.audio], pa.list_(pa.int64())),
                   _one(m.sample_rate, pa.int32()), _one(m.max_tokens, pa.int32()),
                   _one(m.temperature, pa.float32()), _one(m.speak, pa.bool_()),
                   _one(m.voice, pa.string()), _one(list(m.audio_turns), pa.list_(pa.int32())),
                   _raw_bytes(np.concatenate([v.reshape(-1) for v in m.videos]) if m.videos
                              else np.zeros(0, np.uint8)),
                   _one([list(v.shape) for v in m.videos], pa.list_(pa.list_(pa.int32()))),
                   _one([float(f) for f in m.video_fps], pa.list_(pa.float32()))],
        lambda r: OmniRequest(_read_messages(r), _read_images(r), _read_clips(r),
                              r.scalar("sample_rate"), r.scalar("max_tokens"),
                              r.scalar("temperature"), r.scalar("speak"), r.scalar("voice"),
                              r.optional("audio_turns", []), *_read_videos(r)),
    ),
    Tensor: _Codec(
        pa.struct([("kind", pa.string()), ("dtype", pa.string()), ("shape", pa.list_(pa.int64())),
                   ("data", pa.list_(pa.uint8())), ("attrs", pa.string())]),
        lambda m: [_one(m.kind, pa.string()), _one(dtype_name(m.array), pa.string()),
                   _one(list(m.array.shape), pa.list_(pa.int64())), _raw_bytes(m.array),
                   _one(json.dumps(m.attrs), pa.string())],
        _tensor_from,
    ),
    ImageRequest: _Codec(
        pa.struct([("prompt", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                   ("steps", pa.int32()), ("seed", pa.int64())]),
        lambda m: [_one(m.prompt, pa.string()), _one(m.width, pa.int32()),
                   _one(m.height, pa.int32()), _one(m.steps, pa.int32()),
                   _one(m.seed, pa.int64())],
        lambda r: ImageRequest(r.scalar("prompt"), r.scalar("width"), r.scalar("height"),
                               r.scalar("steps"), r.scalar("seed")),
    ),
    Image: _Codec(
        pa.struct(_IMAGE_FIELDS),
        lambda m: [_numbers(validate_image(m.pixels), pa.uint8()),
                   *(_one(n, pa.int32()) for n in m.pixels.shape)],
        lambda r: Image(_image_from(r.numbers("pixels"), r.scalar("height"), r.scalar("width"),
                                    r.scalar("channels"), r.what)),
    ),
    VideoRequest: _Codec(
        pa.struct([("prompt", pa.string()), ("frames", pa.int32()), ("fps", pa.int32()),
                   ("width", pa.int32()), ("height", pa.int32()), ("steps", pa.int32()),
                   ("seed", pa.int64()), ("images", pa.list_(pa.struct(_IMAGE_FIELDS)))]),
        lambda m: [_one(m.prompt, pa.string()), _one(m.frames, pa.int32()),
                   _one(m.fps, pa.int32()), _one(m.width, pa.int32()), _one(m.height, pa.int32()),
                   _one(m.steps, pa.int32()), _one(m.seed, pa.int64()),
                   _images([] if m.image is None else [m.image])],
        lambda r: VideoRequest(r.scalar("prompt"), r.scalar("frames"), r.scalar("fps"),
                               r.scalar("width"), r.scalar("height"), r.scalar("steps"),
                               r.scalar("seed"), _first_frame(r)),
    ),
    VideoProgress: _Codec(
        pa.struct([("phase", pa.string()), ("step", pa.int32()), ("steps", pa.int32())]),
        lambda m: [_one(m.phase, pa.string()), _one(m.step, pa.int32()),
                   _one(m.steps, pa.int32())],
        lambda r: VideoProgress(r.scalar("phase"), r.scalar("step"), r.scalar("steps")),
    ),
    VideoChunk: _Codec(
        pa.struct([("frames", pa.list_(pa.uint8())), ("shape", pa.list_(pa.int32())),
                   ("index", pa.int32()), ("first_frame", pa.int32()),
                   ("total_frames", pa.int32()), ("fps", pa.int32()), ("final", pa.bool_())]),
        lambda m: [_raw_bytes(_checked_frames(m)), _one(list(m.frames.shape), pa.list_(pa.int32())),
                   _one(m.index, pa.int32()), _one(m.first_frame, pa.int32()),
                   _one(m.total_frames, pa.int32()), _one(m.fps, pa.int32()),
                   _one(m.final, pa.bool_())],
        lambda r: VideoChunk(_frames_from(r), r.scalar("index"), r.scalar("first_frame"),
                             r.scalar("total_frames"), r.scalar("fps"), r.scalar("final")),
    ),
}


def _checked_frames(chunk: VideoChunk) -> np.ndarray:
    validate_request(chunk)
    return chunk.frames


def _frames_from(row: _Row) -> np.ndarray:
    """A chunk's frames as a (T, H, W, 3) view of the message's buffer (no copy)."""
    pixels, shape = row.numbers("frames"), tuple(row.scalar("shape"))
    if len(shape) != 4 or min(shape) <= 0 or pixels.size != int(np.prod(shape)):
        raise ContractError(f"{row.what}: {pixels.size} bytes do not fill frames of shape {shape}")
    return pixels.reshape(shape)


def _first_frame(row: _Row) -> np.ndarray | None:
    images = _read_images(row)
    if len(images) > 1:
        raise ContractError(f"{row.what}: {len(images)} first frames given; at most one")
    return images[0] if images else None


def _matrix(flat: np.ndarray, dim: int, what: str) -> np.ndarray:
    if dim <= 0 or flat.size % dim:
        raise ContractError(f"{what}: {flat.size} values do not split into rows of {dim}")
    return flat.reshape(-1, dim)


def _images(images: list[np.ndarray]) -> pa.Array:
    structs = []
    for image in images:
        validate_image(image)
        columns = [_numbers(image, pa.uint8()), *(_one(n, pa.int32()) for n in image.shape)]
        structs.append(pa.StructArray.from_arrays(columns, fields=list(pa.struct(_IMAGE_FIELDS))))
    values = pa.concat_arrays(structs) if structs else pa.array([], pa.struct(_IMAGE_FIELDS))
    return pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)


def _read_clips(row: _Row) -> list[np.ndarray]:
    """Audio clips sent as one list of samples and the clips' lengths."""
    samples, lengths = row.numbers("audio"), row.scalar("audio_lengths")
    if any(n <= 0 for n in lengths) or sum(lengths) != samples.size:
        raise ContractError(f"{row.what}: audio clips of {lengths} samples do not fill the "
                            f"{samples.size} sent")
    return np.split(samples, np.cumsum(lengths)[:-1]) if lengths else []


def _read_videos(row: _Row) -> tuple[list[np.ndarray], list[float]]:
    """Video clips sent as one uint8 list of frames, each clip's shape and frame rate (absent
    from messages sent before clips were carried: none)."""
    if row.array.type.get_field_index("video_frames") < 0:
        return [], []
    frames, shapes = row.numbers("video_frames"), row.scalar("video_shapes")
    sizes = [int(np.prod(shape)) if len(shape) == 4 and min(shape) > 0 else -1
             for shape in shapes]
    if any(size < 0 for size in sizes) or sum(sizes) != frames.size:
        raise ContractError(f"{row.what}: video clips of shapes {shapes} do not fill the "
                            f"{frames.size} bytes sent")
    parts = np.split(frames, np.cumsum(sizes)[:-1]) if sizes else []
    return [part.reshape(shape) for part, shape in zip(parts, shapes)], row.scalar("video_fps")


def _read_images(row: _Row) -> list[np.ndarray]:
    images = row.column("images").flatten()
    out = []
    for i in range(len(images)):
        item = images[i : i + 1]
        pixels = item.field("pixels").flatten().to_numpy(zero_copy_only=True)
        h, w, c = (item.field(name)[0].as_py() for name in ("height", "width", "channels"))
        out.append(_image_from(pixels, h, w, c, f"{row.what}: image {i}"))
    return out


# Generic messages wrap a caller-defined record batch: struct<kind, rows: list<struct<...>>>.

def _generic_schema(rows_type: pa.DataType) -> pa.StructType:
    return pa.struct([("kind", pa.string()), ("rows", pa.list_(rows_type))])


def _encode_generic(message: GenericRequest | GenericResult) -> pa.StructArray:
    rows = message.batch.to_struct_array()
    columns = [_one(message.kind, pa.string()),
               pa.ListArray.from_arrays(pa.array([0, len(rows)], pa.int32()), rows)]
    return pa.StructArray.from_arrays(columns, fields=list(_generic_schema(rows.type)))


def _decode_generic(array: pa.Array, message_type: type[T]) -> T:
    what = message_type.__name__
    row = _Row(array, _generic_schema(pa.null()), what)
    kind = row.scalar("kind")
    index = row.array.type.get_field_index("rows")
    if index < 0 or not pa.types.is_list(row.array.type.field(index).type):
        raise ContractError(f"{what}: missing list field 'rows'")
    rows = row.array.field(index).flatten()
    if not pa.types.is_struct(rows.type):
        raise ContractError(f"{what}: 'rows' must be a list of structs, got {rows.type}")
    return message_type(kind, pa.RecordBatch.from_struct_array(rows))


def check_generic_schema(batch: pa.RecordBatch, schema: pa.Schema, what: str) -> None:
    """Reject a generic batch whose columns differ from the declared schema."""
    if not batch.schema.equals(schema, check_metadata=False):
        raise ContractError(f"{what}: batch schema {batch.schema.to_string(show_schema_metadata=False)!r}"
                            f" does not match the declared {schema.to_string(show_schema_metadata=False)!r}")
    if batch.num_rows == 0:
        raise ContractError(f"{what}: batch is empty")


# --- public API ------------------------------------------------------------------------

def schema_of(message_type: type) -> pa.StructType:
    """The Arrow type that ``message_type`` travels as."""
    try:
        return _CODECS[message_type].schema
    except KeyError:
        raise ContractError(f"{message_type.__name__} has no fixed Arrow schema") from None


def encode(message: Any) -> pa.StructArray:
    """Encode a contract message as a one-row Arrow struct array."""
    if isinstance(message, (GenericRequest, GenericResult)):
        return _encode_generic(message)
    codec = _CODECS.get(type(message))
    if codec is None:
        raise ContractError(f"cannot encode {type(message).__name__}: not a contract message")
    return pa.StructArray.from_arrays(codec.to_columns(message), fields=codec.fields)


def decode(array: pa.Array, message_type: type[T]) -> T:
    """Decode and validate a message of ``message_type``; raises ContractError on bad input."""
    if message_type in (GenericRequest, GenericResult):
        return _decode_generic(array, message_type)
    codec = _CODECS.get(message_type)
    if codec is None:
        raise ContractError(f"cannot decode {message_type.__name__}: not a contract message")
    message = codec.from_row(_Row(array, codec.schema, message_type.__name__,
                                  numbers=codec.numbers))
    try:
        validate_request(message)
    except ContractError as error:
        raise ContractError(f"{message_type.__name__}: {error}") from None
    return message


def decode_one_of(array: pa.Array, message_types: tuple[type, ...]) -> Any:
    """Decode a message that may be any of ``message_types`` (an omni reply's TextChunks and
    AudioChunks on one output), told apart by its Arrow schema."""
    for message_type in message_types:
        codec = _CODECS.get(message_type)
        if codec is not None and array.type == codec.schema:
            return decode(array, message_type)
    names = ", ".join(t.__name__ for t in message_types)
    raise ContractError(f"a message of schema {array.type} is none of {names}")
