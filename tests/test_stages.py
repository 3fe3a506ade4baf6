"""Stages: whisper and MiniLM split into steps, fused in one process with zero-copy hand-offs,
and the same stages meeting through Arrow (as they do across processes)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mofa_omni.contract import arrow
from mofa_omni.contract.errors import AdapterError, ContractError
from mofa_omni.contract.stages import (
    QUERY_AND_DOCUMENTS,
    Handoff,
    Stage,
    StagePipeline,
    StageRef,
    cosine_rank,
    parse_stages,
)
from mofa_omni.contract.tasks import (
    EmbeddingRequest,
    ErrorReport,
    RerankRequest,
    RerankResult,
    Tensor,
    TranscriptionRequest,
)
from mofa_omni.media.text import normalize_words
from mofa_omni.node.stage_host import TENSOR_INPUT, StageHost, StageSlot
from tests.test_asr import read_wav

SAMPLES = Path(__file__).parents[1] / "dataflows" / "samples"
WHISPER = "whisper-tiny.en:log_mel whisper-tiny.en:encode whisper-tiny.en:decode"
RANKING = "minilm-l6:embed_query_and_documents -> cosine_rank"
DOCUMENTS = ["Bananas are yellow and rich in potassium.",
             "Paris is the capital and largest city of France.",
             "The next train to the airport leaves at noon."]


def buffer_address(array) -> int:
    """Where an MLX or numpy array's data lives (a numpy view of an MLX array shares it)."""
    return np.asarray(array).__array_interface__["data"][0]


def served(host: StageHost, input_id: str, message) -> object:
    [out] = list(host.handle(input_id, arrow.encode(message), {"request_id": "r1"}))
    if out.output == "error":
        report = arrow.decode(out.value, ErrorReport)
        raise AssertionError(f"{report.kind}: {report.message}")
    return arrow.decode(out.value, host.pipeline.produces)


@pytest.fixture(scope="module")
def whisper_stages(catalog, store) -> StageSlot:
    slot = StageSlot(parse_stages(WHISPER), catalog, "asr", store)
    assert slot.load()
    yield slot
    slot.unload()


@pytest.fixture(scope="module")
def ranking_stages(catalog, store) -> StageSlot:
    slot = StageSlot(parse_stages(RANKING), catalog, "rank", store)
    assert slot.load()
    yield slot
    slot.unload()


# --- the pipeline itself -----------------------------------------------------------------

def test_stage_references_parse_and_name_what_is_wrong():
    assert parse_stages("a:x, b:y -> z") == [StageRef("a", "x"), StageRef("b", "y"),
                                              StageRef("", "z")]
    assert str(StageRef("whisper-tiny.en", "encode")) == "whisper-tiny.en:encode"
    with pytest.raises(ContractError, match="names no stage"):
        parse_stages("  ")
    with pytest.raises(ContractError, match="MODEL:STAGE"):
        parse_stages("a:b:c")


def test_stages_that_do_not_chain_are_refused():
    to_tensor = Stage("to_tensor", RerankRequest, Tensor, lambda r: r)
    with pytest.raises(ContractError, match="produces Tensor, but b takes RerankRequest"):
        StagePipeline([("a", to_tensor), ("b", to_tensor)])


def test_unknown_stage_or_model_fails_before_loading(catalog, store):
    with pytest.raises(AdapterError, match="no stage 'encoder'.*encode"):
        StageSlot(parse_stages("whisper-tiny.en:encoder"), catalog, "n", store)
    with pytest.raises(ContractError, match="unknown model"):
        StageSlot(parse_stages("whisper-tiny:encode"), catalog, "n", store)
    with pytest.raises(ContractError, match="built-in stage 'cosine_ranks'.*cosine_rank"):
        StageSlot(parse_stages("cosine_ranks"), catalog, "n", store)


# --- fused: the same object, no copy -----------------------------------------------------

def test_fused_whisper_hands_the_encoder_output_over_without_a_copy(whisper_stages):
    produced: list[int] = []
    encode = dict(whisper_stages.host.pipeline.stages)["whisper-tiny.en:encode"]
    recording = Stage(encode.name, encode.consumes, encode.produces,
                      lambda mel: _record(encode.run(mel), produced))
    pipeline = whisper_stages.host.pipeline
    handoffs: list[Handoff] = []
    fused = StagePipeline([pipeline.stages[0], ("whisper-tiny.en:encode", recording),
                           pipeline.stages[2]], observe=handoffs.append)
    audio, rate = read_wav(SAMPLES / "01-capital-of-france.wav")
    transcript = fused.run(TranscriptionRequest(audio, rate))
    assert normalize_words(transcript.text) == "what is the capital of france".split()
    assert [(h.producer, h.consumer) for h in handoffs] == [
        ("whisper-tiny.en:log_mel", "whisper-tiny.en:encode"),
        ("whisper-tiny.en:encode", "whisper-tiny.en:decode")]
    features = handoffs[1].value
    assert isinstance(features.array, mx.array)  # still MLX: never converted, never serialized
    assert features.array.shape == (1, 1500, 384)
    assert buffer_address(features.array) == produced[0]  # the decoder reads the encoder's buffer
    assert all(h.seconds < 0.05 for h in handoffs)


def _record(tensor: Tensor, addresses: list[int]) -> Tensor:
    addresses.append(buffer_address(tensor.array))
    return tensor


def test_fused_and_whole_whisper_hear_the_same(whisper_stages, model):
    whole = model("whisper-tiny.en", "mlx")
    for wav in sorted(SAMPLES.glob("*.wav")):
        audio, rate = read_wav(wav)
        request = TranscriptionRequest(audio, rate)
        staged = served(whisper_stages.host, "speech_recognition", request)
        assert staged.text == whole.transcribe(request).text, wav.name
        assert staged.segments[0].end == pytest.approx(audio.size / rate, rel=1e-3)


def split(slot: StageSlot, at: int) -> tuple[StageHost, StageHost]:
    """The slot's loaded stages as two hosts, as two nodes would run them."""
    stages = slot.host.pipeline.stages
    return StageHost(StagePipeline(stages[:at]), "front"), StageHost(StagePipeline(stages[at:]),
                                                                     "back")


def test_whisper_stages_meet_through_arrow_as_across_processes(whisper_stages):
    """The front node's stages send a Tensor through Arrow; the back node reads it as a numpy
    view of the same bytes and decodes the same text."""
    front, back = split(whisper_stages, 2)
    assert front.input_names() == ["request", "speech_recognition"]
    assert back.input_names() == [TENSOR_INPUT]
    audio, rate = read_wav(SAMPLES / "02-capital-of-italy.wav")
    [sent] = list(front.handle("request", arrow.encode(TranscriptionRequest(audio, rate)), {}))
    features = arrow.decode(sent.value, Tensor)
    assert features.kind == "whisper:whisper-tiny.en/audio_features"
    assert isinstance(features.array, np.ndarray) and features.array.base is not None  # a view
    assert features.array.shape == (1, 1500, 384) and features.array.dtype == np.float32
    assert features.attrs["seconds"] == pytest.approx(audio.size / rate)
    transcript = served(back, TENSOR_INPUT, features)
    fused = served(whisper_stages.host, "request", TranscriptionRequest(audio, rate))
    assert transcript.text == fused.text and "capital of italy" in " ".join(
        normalize_words(transcript.text))


def test_whisper_stages_refuse_what_they_cannot_take(whisper_stages):
    long_audio = np.zeros(31 * 16_000, np.float32)
    long_audio[::100] = 0.1
    [out] = list(whisper_stages.host.handle(
        "request", arrow.encode(TranscriptionRequest(long_audio, 16_000)), {"request_id": "long"}))
    report = arrow.decode(out.value, ErrorReport)
    assert (report.request_id, report.kind) == ("long", "bad_request")
    assert "log_mel" in report.message and "30 s window" in report.message
    _, back = split(whisper_stages, 2)
    wrong = Tensor(QUERY_AND_DOCUMENTS, np.zeros((3, 384), np.float32))
    [out] = list(back.handle(TENSOR_INPUT, arrow.encode(wrong), {"request_id": "w"}))
    assert "takes 'whisper:whisper-tiny.en/audio_features', got 'query_and_documents'" in \
        arrow.decode(out.value, ErrorReport).message
    [out] = list(back.handle("request", arrow.encode(wrong), {}))
    assert "take Tensor on tensor" in arrow.decode(out.value, ErrorReport).message


# --- a composition: embeddings feeding a ranking -----------------------------------------

def test_embeddings_feed_the_ranking_in_memory(ranking_stages):
    handoffs: list[Handoff] = []
    ranking_stages.observe(handoffs.append)
    result = served(ranking_stages.host, "rerank", RerankRequest("What is the capital of France?",
                                                            DOCUMENTS))
    assert isinstance(result, RerankResult) and result.scores.shape == (3,)
    assert int(np.argmax(result.scores)) == 1
    [handoff] = handoffs
    assert isinstance(handoff.value.array, mx.array) and handoff.value.array.shape == (4, 384)


def test_ranking_matches_the_embedding_task(ranking_stages, model):
    query = "When does the train leave?"
    vectors = model("minilm-l6", "mlx").embed(EmbeddingRequest([query, *DOCUMENTS])).vectors
    result = served(ranking_stages.host, "request", RerankRequest(query, DOCUMENTS))
    np.testing.assert_allclose(result.scores, vectors[1:] @ vectors[0], atol=1e-5)
    assert int(np.argmax(result.scores)) == 2


def test_cosine_rank_checks_its_input():
    with pytest.raises(ContractError, match="takes 'query_and_documents'"):
        cosine_rank(Tensor("other", np.zeros((2, 4), np.float32)))
    with pytest.raises(ContractError, match="query row and document rows"):
        cosine_rank(Tensor(QUERY_AND_DOCUMENTS, np.zeros((1, 4), np.float32)))


# --- Tensor through Arrow ----------------------------------------------------------------

def test_tensor_arrow_round_trip_reads_the_bytes_in_place():
    source = mx.arange(24, dtype=mx.float32).reshape(2, 3, 4)
    mx.eval(source)
    encoded = arrow.encode(Tensor("t", source, {"seconds": 1.5, "language": "en"}))
    data = encoded.field("data").flatten()
    assert data.buffers()[1].address == buffer_address(source)  # encoding copies nothing
    decoded = arrow.decode(encoded, Tensor)
    assert decoded.array.__array_interface__["data"][0] == data.buffers()[1].address
    np.testing.assert_array_equal(decoded.array, np.asarray(source))
    assert decoded.attrs == {"seconds": 1.5, "language": "en"}


@pytest.mark.parametrize("change, message", [
    ({"dtype": "complex64"}, "dtype 'complex64' is not one of"),
    ({"shape": [5, 5]}, "do not fill shape"),
    ({"kind": ""}, "tensor has no kind"),
])
def test_bad_tensors_are_refused(change, message):
    import pyarrow as pa

    encoded = arrow.encode(Tensor("t", np.zeros((2, 3), np.float32)))
    columns = {name: encoded.field(name) for name in encoded.type.names}
    for name, value in change.items():
        columns[name] = pa.array([value], columns[name].type)
    with pytest.raises(ContractError, match=message):
        arrow.decode(pa.StructArray.from_arrays(list(columns.values()), list(columns)), Tensor)
