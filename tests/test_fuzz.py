"""Fuzzing what reads untrusted bytes: random and mutated inputs to the Arrow decoders of every
task, the control messages, the OpenAI bodies, the WAV upload reader, and the GGUF and
CTranslate2 model readers end in the project's own errors -- never a crash, a hang or an
allocation the input's size does not justify.

Bounded for CI: FUZZ_EXAMPLES examples per property (default 150), the same ones each run
(derandomized: a red run is reproducible, not a flake); `FUZZ_EXAMPLES=5000 FUZZ_RANDOM=1`
explores further with fresh examples.
"""

from __future__ import annotations

import io
import json
import os
import struct
import wave
from pathlib import Path

import msgspec
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ContractError, ModelLoadError
from mofa_omni.contract.tasks import (
    AudioChunk,
    ChatMessage,
    ChatRequest,
    EmbeddingRequest,
    Embeddings,
    ErrorReport,
    RerankRequest,
    SpeechRequest,
    TextChunk,
    Transcript,
    TranscriptionRequest,
)
from mofa_omni.formats.ctranslate2 import BINARY_VERSION, read_model_bin
from mofa_omni.formats.gguf import Metadata, open_gguf
from mofa_omni.gateway.openai_bodies import (
    ApiError,
    ChatBody,
    EmbeddingBody,
    ImageBody,
    RerankBody,
    SpeechBody,
    decode_body,
    read_audio_upload,
)
from mofa_omni.scheduler.messages import LoadAsk, NodeReport, SwapAsk, Variant, from_arrow

fuzz = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")), deadline=None,
                derandomize=not os.environ.get("FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

# --- Arrow messages of every task ------------------------------------------------------------

MESSAGE_TYPES = sorted(arrow._CODECS, key=lambda t: t.__name__)
VALID = [
    ChatRequest([ChatMessage("user", "Hi")], max_tokens=8),
    TextChunk("Hel", final=True, finish_reason="stop"),
    TranscriptionRequest(np.zeros(1600, np.float32), 16000),
    Transcript("hello"),
    SpeechRequest("Hello there."),
    AudioChunk(np.zeros(100, np.float32), 22050),
    EmbeddingRequest(["a", "b"]),
    Embeddings(np.ones((2, 4), np.float32)),
    RerankRequest("q", ["d1", "d2"]),
    ErrorReport("r-1", "bad_request", "no"),
]
# Columns of every Arrow type a field might be given instead of its own, one row each.
COLUMNS = st.sampled_from([
    pa.array([None], pa.null()), pa.array([7], pa.int64()), pa.array([-1], pa.int32()),
    pa.array([1e30], pa.float64()), pa.array([float("nan")], pa.float32()),
    pa.array(["x" * 3], pa.string()), pa.array([b"\x00\xff"], pa.binary()),
    pa.array([[1.0, 2.0]], pa.list_(pa.float32())), pa.array([[]], pa.list_(pa.float32())),
    pa.array([[2**31]], pa.list_(pa.int64())), pa.array([None], pa.list_(pa.float32())),
    pa.array([["a", None]], pa.list_(pa.string())), pa.array([True], pa.bool_()),
    pa.array([{"role": "user", "content": 5}],
             pa.struct([("role", pa.string()), ("content", pa.int64())])),
])


def decoded_or_refused(array: pa.Array, message_type: type) -> None:
    try:
        arrow.decode(array, message_type)
    except ContractError:
        pass


@fuzz
@given(st.sampled_from(MESSAGE_TYPES), st.data())
def test_a_struct_with_any_column_types_is_decoded_or_refused(message_type, data):
    names = [field.name for field in arrow.schema_of(message_type)]
    kept = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    extra = data.draw(st.lists(st.sampled_from(["bogus", "x"]), unique=True, max_size=1))
    columns = [data.draw(COLUMNS) for _ in kept + extra]
    decoded_or_refused(pa.StructArray.from_arrays(columns, names=kept + extra), message_type)


@fuzz
@given(st.sampled_from(VALID), st.data())
def test_a_valid_message_with_one_field_replaced_is_decoded_or_refused(message, data):
    encoded = arrow.encode(message)
    index = data.draw(st.integers(0, encoded.type.num_fields - 1))
    columns = [encoded.field(i) for i in range(encoded.type.num_fields)]
    columns[index] = data.draw(COLUMNS)
    names = [encoded.type.field(i).name for i in range(encoded.type.num_fields)]
    decoded_or_refused(pa.StructArray.from_arrays(columns, names=names), type(message))


@fuzz
@given(st.sampled_from(MESSAGE_TYPES), st.sampled_from(VALID), st.integers(0, 3))
def test_any_message_as_another_or_with_several_rows_is_refused(message_type, message, rows):
    encoded = arrow.encode(message)
    array = pa.concat_arrays([encoded] * rows) if rows else encoded.slice(0, 0)
    decoded_or_refused(array, message_type)
    decoded_or_refused(pa.array([1, 2, 3]), message_type)


# --- control messages --------------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)
CONTROL = [LoadAsk("llm", [Variant("m", 10)], 5), SwapAsk("s1", "llm", "m"),
           NodeReport("llm", "measure", "ready", "m", 100)]


@fuzz
@given(st.one_of(
    st.text(max_size=200),
    JSON.map(json.dumps),
    st.tuples(st.sampled_from(CONTROL), st.text(max_size=12), JSON).map(
        lambda t: json.dumps({**json.loads(msgspec.json.encode(t[0])), t[1]: t[2]})),
))
def test_control_messages_are_decoded_or_refused(text):
    try:
        from_arrow(pa.array([text]))
    except ContractError:
        pass


# --- OpenAI request bodies ------------------------------------------------------------------------

BODIES = [ChatBody, EmbeddingBody, RerankBody, SpeechBody, ImageBody]
PLAUSIBLE = st.fixed_dictionaries({}, optional={
    "model": st.text(max_size=8) | st.integers(), "input": JSON, "messages": JSON,
    "query": JSON, "documents": JSON, "prompt": JSON, "max_tokens": JSON, "stream": JSON,
    "temperature": JSON, "n": JSON, "size": JSON, "voice": JSON, "response_format": JSON,
    "encoding_format": JSON, "stop": JSON, "top_n": JSON, "speed": JSON, "seed": JSON})


@fuzz
@given(st.sampled_from(BODIES), st.one_of(st.binary(max_size=300),
                                          PLAUSIBLE.map(lambda b: json.dumps(b).encode())))
def test_openai_bodies_are_read_or_answered_with_a_4xx(body_type, raw):
    try:
        body = decode_body(raw, body_type)
        body.to_request()
    except ApiError as error:
        assert 400 <= error.status < 500
    except ContractError:
        pass  # answered 400 by the app


# --- WAV uploads ----------------------------------------------------------------------------------

def wav_file(samples: int = 400, rate: int = 16000, width: int = 2, channels: int = 1) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(b"\x01" * samples * width * channels)
    return out.getvalue()


def mutated(data: bytes, draw) -> bytes:
    """``data`` with a few bytes changed, cut short, or with a 32-bit field made huge."""
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()) and len(data) >= 8:
        at = draw(st.integers(0, len(data) - 4))
        data[at:at + 4] = struct.pack("<I", draw(st.sampled_from([0, 2**31 - 1, 2**32 - 1])))
    return bytes(data[:draw(st.integers(0, len(data)))])


@fuzz
@given(st.data())
def test_wav_uploads_are_read_or_refused(data):
    raw = mutated(wav_file(width=data.draw(st.sampled_from([1, 2, 4])),
                           channels=data.draw(st.integers(1, 3))), data.draw)
    try:
        audio, rate = read_audio_upload(raw, "upload.wav")
    except ContractError:
        return
    assert audio.dtype == np.float32 and audio.nbytes <= 4 * len(raw)  # no more than it holds


# --- model files --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> bytes:
    import gguf

    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.ones((16, 8), np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@fuzz
@given(st.data())
def test_a_damaged_gguf_is_refused_as_a_model_load_error(small_gguf, tmp_path_factory, data):
    path = tmp_path_factory.mktemp("damaged") / "model.gguf"
    path.write_bytes(mutated(small_gguf, data.draw))
    try:
        reader = open_gguf(path)
        meta = Metadata(reader)
        _ = meta.arch
    except ModelLoadError:
        pass


def small_model_bin() -> bytes:
    def string(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    weights = np.arange(6, dtype=np.float32)
    return (struct.pack("<I", BINARY_VERSION) + string("TransformerSpec") + struct.pack("<II", 1, 1)
            + string("w") + struct.pack("<BII", 2, 2, 3) + struct.pack("<BI", 0, weights.nbytes)
            + weights.tobytes() + struct.pack("<I", 1) + string("alias") + string("w"))


def test_the_small_model_bin_is_valid(tmp_path: Path):
    path = tmp_path / "model.bin"
    path.write_bytes(small_model_bin())
    model = read_model_bin(path)
    assert model.variables["w"].shape == (2, 3) and model.aliases == {"alias": "w"}


@fuzz
@given(st.data())
def test_a_damaged_model_bin_is_refused_as_a_model_load_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("ct2") / "model.bin"
    path.write_bytes(mutated(small_model_bin(), data.draw))
    try:
        model = read_model_bin(path)
    except ModelLoadError:
        return
    assert sum(v.nbytes for v in model.variables.values()) <= 4 * path.stat().st_size


# --- what the fuzzing found, kept as plain regression tests -------------------------------------

def test_a_null_inside_a_list_field_is_refused_not_a_crash():
    texts = pa.array([["a", None]], pa.list_(pa.string()))
    encoded = arrow.encode(EmbeddingRequest(["a", "b"]))
    names = [encoded.type.field(i).name for i in range(encoded.type.num_fields)]
    columns = [texts if name == "texts" else encoded.field(i) for i, name in enumerate(names)]
    with pytest.raises(ContractError, match="field 'texts' contains nulls"):
        arrow.decode(pa.StructArray.from_arrays(columns, names=names), EmbeddingRequest)


def test_a_wav_whose_chunk_size_the_standard_library_chokes_on_is_refused():
    raw = bytearray(wav_file(samples=18))
    raw[16:20] = struct.pack("<I", 2**31 - 1)  # the fmt chunk's size: past the end
    with pytest.raises(ContractError, match="not a PCM WAV file"):
        read_audio_upload(bytes(raw), "upload.wav")
