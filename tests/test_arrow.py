"""Round trips and rejections of the Arrow codecs (no models needed)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import (
    TASK_SPECS,
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
    TextChunk,
    ToolCall,
    Transcript,
    TranscriptionRequest,
)

AUDIO = np.sin(np.linspace(0, 100, 16000, dtype=np.float32))
PIXELS = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)

SAMPLES = [
    ChatRequest([ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")], 32, 0.5, 0.75,
                ["\n\n"]),
    TextChunk("Paris", True, "stop", 12, 7),
    Transcript("hello world", "en", [Segment(0.0, 1.5, "hello world")]),
    SpeechRequest("Hello there.", "joe", 1.25),
    EmbeddingRequest(["a", "b"]),
    RerankRequest("q", ["d1", "d2"]),
    ImageRequest("a cat", 64, 32, 2, 7),
    ErrorReport("req-1", "bad_request", "audio is empty", "asr"),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_of_plain_messages(message):
    encoded = arrow.encode(message)
    assert encoded.type == arrow.schema_of(type(message))
    decoded = arrow.decode(encoded, type(message))
    assert decoded == message  # sample floats are exact in float32


def test_a_token_message_is_read_whole_yet_checked_as_field_by_field():
    """A message without payload lists is read into Python in one call: a null deep inside
    one is still refused naming its field, and one of other widths still read."""
    chunk = TextChunk("", True, "tool_calls", 3, 2, [ToolCall("call_1", "add", "{}")])
    encoded = arrow.encode(chunk)
    calls = pa.array([[{"id": "call_1", "name": None, "arguments": "{}"}]],
                     encoded.type.field("tool_calls").type)
    names = [field.name for field in encoded.type]
    with_null = pa.StructArray.from_arrays(
        [calls if name == "tool_calls" else encoded.field(name) for name in names], names=names)
    with pytest.raises(ContractError, match="field 'tool_calls' contains nulls"):
        arrow.decode(with_null, TextChunk)
    wider = pa.StructArray.from_arrays(
        [encoded.field(name).cast(pa.int64()) if name.endswith("_tokens")
         else encoded.field(name) for name in names], names=names)
    assert arrow.decode(wider, TextChunk) == chunk
    assert arrow.encode(TextChunk("", False)).field("text").to_pylist() == [""]


def test_audio_round_trip_is_zero_copy_on_decode():
    encoded = arrow.encode(TranscriptionRequest(AUDIO, 16000, "en"))
    decoded = arrow.decode(encoded, TranscriptionRequest)
    np.testing.assert_array_equal(decoded.audio, AUDIO)
    values = encoded.field("audio").flatten()
    assert decoded.audio.ctypes.data == values.buffers()[1].address  # a view on the Arrow buffer


def test_audio_chunk_embeddings_rerank_and_images_round_trip():
    chunk = arrow.decode(arrow.encode(AudioChunk(AUDIO, 22050, True, "Hi.")), AudioChunk)
    assert (chunk.sample_rate, chunk.final, chunk.text) == (22050, True, "Hi.")
    np.testing.assert_array_equal(chunk.audio, AUDIO)

    vectors = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_array_equal(
        arrow.decode(arrow.encode(Embeddings(vectors)), Embeddings).vectors, vectors)
    scores = np.array([0.1, 0.9], np.float32)
    np.testing.assert_array_equal(
        arrow.decode(arrow.encode(RerankResult(scores)), RerankResult).scores, scores)

    image = arrow.decode(arrow.encode(Image(PIXELS)), Image)
    np.testing.assert_array_equal(image.pixels, PIXELS)
    vision = OmniRequest([ChatMessage("user", "What is this?")], [PIXELS, PIXELS[:2]],
                         max_tokens=16, temperature=0.0)
    decoded = arrow.decode(arrow.encode(vision), OmniRequest)
    assert [i.shape for i in decoded.images] == [(4, 5, 3), (2, 5, 3)]
    np.testing.assert_array_equal(decoded.images[1], PIXELS[:2])
    assert decoded.messages == vision.messages


def test_generic_round_trip():
    batch = pa.RecordBatch.from_pydict({"x": pa.array([1.0, 2.0], pa.float64()),
                                        "label": ["a", "b"]})
    for message_type in (GenericRequest, GenericResult):
        decoded = arrow.decode(arrow.encode(message_type("my.kind", batch)), message_type)
        assert decoded.kind == "my.kind" and decoded.batch.equals(batch)


def test_every_task_has_one_schema_for_its_request_and_result():
    for spec in TASK_SPECS.values():
        for message_type in (spec.request_type, spec.result_type):
            if message_type in (GenericRequest, GenericResult):
                continue
            assert isinstance(arrow.schema_of(message_type), pa.StructType)


def _with_field(array: pa.StructArray, name: str, column: pa.Array) -> pa.StructArray:
    names = [f.name for f in array.type]
    columns = [column if n == name else array.field(n) for n in names]
    return pa.StructArray.from_arrays(columns, names=names)


@pytest.mark.parametrize(
    ("make_bad", "message"),
    [
        (lambda good: pa.array([1, 2, 3]), "expected an Arrow struct array"),
        (lambda good: pa.StructArray.from_arrays([good.field("sample_rate")], names=["sample_rate"]),
         "missing field 'audio'"),
        (lambda good: _with_field(good, "audio", pa.array([[0.1, 0.2]], pa.list_(pa.float64()))),
         "field 'audio' must be list<item: float>, got list<item: double>"),
        (lambda good: _with_field(good, "audio", pa.array([[0.1, float("nan")]], pa.list_(pa.float32()))),
         "NaN"),
        (lambda good: _with_field(good, "audio", pa.array([[]], pa.list_(pa.float32()))),
         "audio is empty"),
        (lambda good: _with_field(good, "sample_rate", pa.array([7], pa.int32())),
         "sample rate 7 Hz is out of range"),
        (lambda good: _with_field(good, "sample_rate", pa.array(["16000"])),
         "field 'sample_rate' must be int32, got string"),
        (lambda good: pa.concat_arrays([good, good]), "exactly one row"),
    ],
)
def test_malformed_transcription_requests_are_rejected_clearly(make_bad, message):
    good = arrow.encode(TranscriptionRequest(AUDIO, 16000))
    with pytest.raises(ContractError, match="TranscriptionRequest") as error:
        arrow.decode(make_bad(good), TranscriptionRequest)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (ChatRequest([]), "no messages"),
        (ChatRequest([ChatMessage("robot", "x")]), "unknown role 'robot'"),
        (ChatRequest([ChatMessage("user", "x")], max_tokens=0), "max_tokens must be positive"),
        (SpeechRequest("   "), "empty text"),
        (EmbeddingRequest([]), "no texts"),
        (EmbeddingRequest(["ok", ""]), "empty text"),
        (RerankRequest("q", []), "no documents"),
        (ImageRequest("cat", 4, 4), "out of range"),
        (ImageRequest("  ", 64, 64), "empty prompt"),
        (ImageRequest("cat", 64, 64, steps=0), "steps must be at least 1"),
        (ImageRequest("cat", 64, 64, seed=-1), "seed must not be negative"),
    ],
)
def test_semantically_empty_requests_are_rejected(message, error):
    with pytest.raises(ContractError, match=error):
        arrow.decode(arrow.encode(message), type(message))


def test_image_with_wrong_shape_dtype_or_channels_is_rejected():
    with pytest.raises(ContractError, match="must be uint8"):
        arrow.encode(Image(PIXELS.astype(np.float32)))
    with pytest.raises(ContractError, match="1, 3 or 4 channels"):
        arrow.encode(Image(np.zeros((2, 2, 2), np.uint8)))
    good = arrow.encode(Image(PIXELS))
    bad = _with_field(good, "height", pa.array([7], pa.int32()))
    with pytest.raises(ContractError, match="do not fill shape"):
        arrow.decode(bad, Image)
    floats = pa.array([PIXELS.astype(np.float32).ravel()], pa.list_(pa.float32()))
    with pytest.raises(ContractError, match="field 'pixels' must be list<item: uint8>"):
        arrow.decode(_with_field(good, "pixels", floats), Image)
    two = _with_field(_with_field(good, "channels", pa.array([2], pa.int32())), "height",
                      pa.array([6], pa.int32()))  # 6 x 5 x 2 = the 60 values sent
    with pytest.raises(ContractError, match="1, 3 or 4 channels"):
        arrow.decode(two, Image)
    with pytest.raises(ContractError, match="HWC"):
        arrow.encode(Image(PIXELS[:, :, 0]))


def test_unknown_types_are_refused():
    with pytest.raises(ContractError, match="not a contract message"):
        arrow.encode("hello")
