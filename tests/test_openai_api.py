"""The OpenAI API's bodies and responses, and how the gateway picks its route (no I/O)."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import ChatMessage, Task, TextChunk
from mofa_omni.gateway.openai_bodies import (
    ApiError,
    ChatBody,
    Completion,
    EmbeddingBody,
    RerankBody,
    SpeechBody,
    decode_body,
    embeddings_body,
    node_error,
    read_audio_upload,
    rerank_body,
    speech_bytes,
)
from mofa_omni.gateway.routes import Route, Router, input_sources, routes_from
from mofa_omni.media.audio import read_wav, wav_bytes
from mofa_omni.models.catalog import Catalog


def test_chat_bodies_become_chat_requests():
    body = decode_body(b'{"model": "m", "messages": [{"role": "system", "content": "Be brief."},'
                       b'{"role": "user", "content": [{"type": "text", "text": "Hi "},'
                       b'{"type": "text", "text": "there"}]}], "max_completion_tokens": 9,'
                       b'"stop": "END", "stream": true, "stream_options": {"include_usage": true}}',
                       ChatBody)
    request = body.to_request()
    assert request.messages == [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi there")]
    assert (request.max_tokens, request.stop) == (9, ["END"])
    assert body.stream and body.include_usage


@pytest.mark.parametrize("raw, message", [
    (b'{"model": "m"}', "Object missing required field `messages`"),
    (b'{"model": "m", "messages": []}', "chat request has no messages"),
    (b'{"model": "m", "messages": [{"role": "robot", "content": "x"}]}',
     r"Invalid enum value 'robot' - at `\$.messages\[0\].role`"),
    # Nothing a client sends is dropped without a word: an unknown field is named ...
    (b'{"model": "m", "reasoning_effort": "low", "messages": [{"role": "user", "content": "x"}]}',
     "unknown field `reasoning_effort`"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x", "weight": 1}]}',
     r"unknown field `weight` - at `\$.messages\[0\]`"),
    # ... and so is a known one this server cannot honour
    (b'{"model": "m", "logprobs": true, "messages": [{"role": "user", "content": "x"}]}',
     "logprobs: log-probabilities are not returned"),
    (b'{"model": "m", "presence_penalty": 0.5, "messages": [{"role": "user", "content": "x"}]}',
     "presence_penalty: penalties are not applied"),
    (b'{"model": "m", "seed": 3, "temperature": 0.7, "messages": [{"role": "user", "content": "x"}]}',
     "seed: sampling here is not seeded"),
    (b'{"model": "m", "n": 2, "messages": [{"role": "user", "content": "x"}]}', "n must be 1"),
    (b'{"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}',
     "max_tokens must be positive"),
    (b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}',
     r"messages\[0\].content\[0\] \(input_audio\): needs input_audio.data \(base64\)"),
    (b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "input_video"}]}]}',
     r"messages\[0\].content\[0\]: content of type 'input_video' is not served"),
    (b'{"model": 3, "messages": []}', "Expected `str`, got `int`"),
    (b"{nope", "the body is not JSON"),
])
def test_bad_chat_bodies_are_named(raw, message):
    with pytest.raises((ApiError, ContractError), match=message):
        decode_body(raw, ChatBody).to_request()


def test_embeddings_and_speech_bodies():
    assert EmbeddingBody("m", "one").to_request().texts == ["one"]
    with pytest.raises(ContractError, match="empty text"):
        EmbeddingBody("m", ["a", ""]).to_request()
    assert SpeechBody("m", "Hello.", speed=1.5).to_request().speed == 1.5
    with pytest.raises(ContractError, match="wav or pcm"):
        SpeechBody("m", "Hello.", response_format="mp3").to_request()


def test_rerank_bodies_and_results_best_first():
    body = decode_body(b'{"model": "m", "query": "q", "documents": ["a", "b", "c"], "top_n": 2}',
                       RerankBody)
    assert body.to_request().documents == ["a", "b", "c"]
    result = rerank_body(body, np.array([0.1, 0.9, 0.5], np.float32), "m")
    assert [(r["index"], r["document"]["text"]) for r in result["results"]] == [(1, "b"),
                                                                              (2, "c")]
    with pytest.raises(ContractError, match="no documents"):
        RerankBody("m", "q", []).to_request()
    with pytest.raises(ContractError, match="top_n must be at least 1"):
        RerankBody("m", "q", ["a"], top_n=0).to_request()


def test_responses_have_the_shapes_clients_parse():
    completion = Completion("chatcmpl-1", "m", 7)
    last = TextChunk("", True, "length", prompt_tokens=5, completion_tokens=3)
    whole = completion.whole("Hi", "length", {"prompt_tokens": 5, "completion_tokens": 3,
                                              "total_tokens": 8})
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "Hi"}
    assert completion.chunk({"content": "Hi"})["object"] == "chat.completion.chunk"
    assert completion.usage_chunk({"total_tokens": 8})["choices"] == [] and last.final
    vectors = np.array([[0.5, -1.0]], np.float32)
    encoded = embeddings_body(vectors, "m", "base64")["data"][0]["embedding"]
    assert np.frombuffer(base64.b64decode(encoded), "<f4").tolist() == [0.5, -1.0]
    assert embeddings_body(vectors, "m", "float")["data"][0]["embedding"] == [0.5, -1.0]


def test_node_errors_map_to_http_statuses():
    assert [node_error(kind, "x").status for kind in
            ("bad_request", "too_large", "unavailable", "timeout", "internal", "odd")] == \
        [400, 413, 503, 504, 500, 500]
    assert node_error("unavailable", "no memory").body() == {"error": {
        "message": "no memory", "type": "service_unavailable", "param": None,
        "code": "unavailable"}}


def test_audio_in_and_out():
    tone = np.sin(np.arange(22050) / 10).astype(np.float32) * 0.5
    wav, media = speech_bytes(tone, 22050, "wav")
    assert media == "audio/wav"
    audio, rate = read_audio_upload(wav, "a.wav")
    assert rate == 22050 and np.allclose(audio, tone, atol=1e-4)
    pcm, media = speech_bytes(tone, 22050, "pcm")
    assert media == "audio/pcm" and len(pcm) == 2 * 24000  # one second at 24 kHz, 16-bit
    with pytest.raises(ContractError, match="only PCM WAV uploads"):
        read_audio_upload(b"ID3\x04junk", "a.mp3")
    assert read_wav(wav_bytes(tone, 16000))[1] == 16000


# --- routes -------------------------------------------------------------------------------

DESCRIPTOR = {"nodes": [
    {"id": "gateway", "inputs": {"llm": "llm/result", "llm_error": {"source": "llm/error"}},
     "outputs": ["chat", "embed", "cancel", "fallback"]},
    {"id": "llm", "env": {"MODEL": "smollm2-135m"},
     "inputs": {"request": {"source": "gateway/chat", "queue_size": 9},
                "cancel": "gateway/cancel"}},
    {"id": "embedder", "env": {"TASK": "embedding"}, "inputs": {"embedding": "gateway/embed"}},
    {"id": "other", "env": {"TASK": "embedding"}, "inputs": {"request": "elsewhere/out"}},
]}


def test_routes_come_from_the_dataflow(catalog: Catalog):
    routes = routes_from(DESCRIPTOR, "gateway", catalog)
    assert routes == [
        Route("llm", "chat", "request", Task.TEXT_GENERATION, "smollm2-135m", cancel="cancel"),
        Route("embedder", "embed", "embedding", Task.EMBEDDING, "minilm-l6")]
    assert input_sources(DESCRIPTOR, "gateway") == {"llm": ("llm", "result"),
                                                    "llm_error": ("llm", "error")}
    stages = {"nodes": [{"id": "s", "env": {"STAGES": "cosine_rank"},
                         "inputs": {"tensor": "gateway/x"}}]}
    with pytest.raises(ContractError, match="whole models only"):
        routes_from(stages, "gateway", catalog)


def test_the_router_picks_the_serving_node_and_the_remote_fallback(catalog: Catalog):
    local = Route("llm", "chat", "request", Task.TEXT_GENERATION, "smollm2-135m")
    remote = Route("far", "far", "request", Task.TEXT_GENERATION, "gemma-3-270m", remote=True)
    router = Router([local, remote], catalog)
    assert router.choose("smollm2-135m", Task.TEXT_GENERATION).fallback == remote
    assert router.choose("gemma-3-270m", Task.TEXT_GENERATION).primary == remote
    assert router.choose("smollm2-135m-q4", Task.TEXT_GENERATION).primary == remote  # missing
    with pytest.raises(ApiError, match="does not exist") as unknown:
        router.choose("gpt-4o", Task.TEXT_GENERATION)
    assert unknown.value.status == 404 and unknown.value.code == "model_not_found"
    alone = Router([local], catalog)
    with pytest.raises(ApiError, match="no node of this graph serves 'gemma-3-270m'.*smollm2"):
        alone.choose("gemma-3-270m", Task.TEXT_GENERATION)
    alone.node_serves("llm", "gemma-3-270m")  # swapped
    assert alone.choose("gemma-3-270m", Task.TEXT_GENERATION).primary.node == "llm"
    assert alone.served() == {"gemma-3-270m": ["llm"]}
