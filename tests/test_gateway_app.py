"""The gateway's HTTP app and settings without dora: a fake graph answers in place of the model
nodes, and each endpoint's errors come back as OpenAI error bodies with the right status."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pytest
from starlette.testclient import TestClient

from mofa_omni.config import listen_address
from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ConfigError, ErrorKind, OmniError
from mofa_omni.contract.tasks import (
    ChatMessage,
    ChatRequest,
    Embeddings,
    ErrorReport,
    Task,
    TextChunk,
)
from mofa_omni.gateway.app import build_app, check_transcription_fields
from mofa_omni.gateway.bridge import (
    ARRIVAL_NS,
    TAIL_GRACE_NS,
    Graph,
    HeldReplies,
    Replies,
    Reply,
    _Sent,
)
from mofa_omni.gateway.openai_bodies import HTTP_ERRORS, ApiError
from mofa_omni.gateway.routes import Route, Router
from mofa_omni.gateway.settings import Settings
from mofa_omni.scheduler.messages import Delivery, NodeStatus
from mofa_omni_nodes.gateway import settings_from_env

ROUTE = Route("embedder", "embed", "request", Task.EMBEDDING, "minilm-l6")


def serving(catalog, reply, **settings) -> tuple[TestClient, list[str]]:
    """The app over a graph whose one node answers each request with ``reply(request_id)``
    (None: never answers)."""
    replies, sent = Replies(), []

    def send(output, value, metadata) -> int:
        sent.append(metadata["request_id"])
        answer = reply(metadata["request_id"])
        if answer is not None:
            replies.deliver(metadata["request_id"], answer)
        return len(sent)

    graph = Graph(Router([ROUTE], catalog), replies, send, Settings(**settings))
    return TestClient(build_app(graph, catalog, lambda: {"embedder": True}, dict)), sent


def vectors(request_id: str) -> Reply:
    return Reply("result", arrow.encode(Embeddings(np.ones((1, 3), np.float32))),
                 {"request_id": request_id})


def node_error(kind: str):
    def reply(request_id: str) -> Reply:
        return Reply("error", arrow.encode(ErrorReport(request_id, kind, "no memory")),
                     {"request_id": request_id})
    return reply


def test_an_answered_request_and_the_stats(catalog):
    client, sent = serving(catalog, vectors)
    with client:
        response = client.post("/v1/embeddings", json={"model": "minilm-l6", "input": "hi",
                                                       "encoding_format": "float"})
        assert response.status_code == 200, response.text
        assert response.json()["data"][0]["embedding"] == [1.0, 1.0, 1.0]
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert models["minilm-l6"]["served_by"] == ["embedder"] and models["minilm-l6"]["loaded"]
        stats = client.get("/stats").json()
    assert sent == ["gw-1"]
    assert stats["responses"] == {"200": 2} and stats["in_flight"] == 0


@pytest.mark.parametrize("kind, status, error_type", [
    ("unavailable", 503, "service_unavailable"),
    ("bad_request", 400, "invalid_request_error"),
    ("timeout", 504, "timeout"),
    ("internal", 500, "server_error"),
])
def test_a_nodes_error_gets_its_status(catalog, kind, status, error_type):
    client, _ = serving(catalog, node_error(kind))
    with client:
        response = client.post("/v1/embeddings", json={"model": "minilm-l6", "input": "hi"})
    assert response.status_code == status
    assert response.json() == {"error": {"message": "embedder: no memory", "type": error_type,
                                         "param": None, "code": kind}}


def test_the_apps_own_refusals(catalog):
    client, sent = serving(catalog, vectors, api_key="sesame", max_body_bytes=100)
    key = {"Authorization": "Bearer sesame"}
    with client:
        refused = client.post("/v1/embeddings", json={"model": "minilm-l6", "input": "hi"})
        assert refused.status_code == 401
        assert refused.json()["error"]["type"] == "authentication_error"
        assert refused.json()["error"]["code"] == "invalid_api_key"
        large = client.post("/v1/embeddings", headers=key,
                            json={"model": "minilm-l6", "input": "x" * 200})
        assert large.status_code == 413 and large.json()["error"]["code"] == "request_too_large"
        broken = client.post("/v1/embeddings", headers=key, content=b"{nope")
        assert broken.status_code == 400 and "not JSON" in broken.json()["error"]["message"]
        unknown = client.post("/v1/embeddings", headers=key, json={"model": "gpt-4o", "input": "a"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        empty = client.post("/v1/embeddings", headers=key, json={"model": "minilm-l6", "input": ""})
        assert empty.status_code == 400 and empty.json()["error"]["type"] == "invalid_request_error"
        stats = client.get("/stats", headers=key).json()
    assert sent == [] and stats["responses"] == {"400": 2, "401": 1, "404": 1, "413": 1}


def test_no_answer_within_the_deadline_is_a_504(catalog):
    client, sent = serving(catalog, lambda request_id: None, deadline_s=0.2)
    with client:
        response = client.post("/v1/embeddings", json={"model": "minilm-l6", "input": "hi"})
        assert client.get("/stats").json()["in_flight"] == 0
    assert response.status_code == 504 and sent == ["gw-1"]
    assert response.json()["error"] == {"message": "embedder did not answer within 0.2 s",
                                         "type": "timeout", "param": None, "code": "timeout"}


def test_api_errors_carry_their_kind():
    assert set(HTTP_ERRORS) == set(ErrorKind)
    error = ApiError(ErrorKind.BAD_REQUEST, "no such model", status=404)
    assert isinstance(error, OmniError) and error.kind is ErrorKind.BAD_REQUEST
    assert (error.status, error.error_type) == (404, "invalid_request_error")
    assert ApiError(ErrorKind.UNAVAILABLE, "x").status == 503


def test_settings_come_from_the_environment():
    assert settings_from_env({}) == Settings()
    assert settings_from_env({"DEADLINE_S": "6", "API_KEY": "sesame", "MAX_BODY_BYTES": "1024",
                              "FALLBACK_AFTER_S": "2.5", "MAX_IMAGE_PIXELS": "4096"}) == \
        Settings(6.0, 1024, "sesame", 2.5, 4096)
    assert listen_address(8000, {}) == ("127.0.0.1", 8000)
    assert listen_address(8000, {"HOST": "0.0.0.0", "PORT": "9000"}) == ("0.0.0.0", 9000)


@pytest.mark.parametrize("env, message", [
    ({"DEADLINE_S": "soon"}, "DEADLINE_S='soon' is not a number"),
    ({"FALLBACK_AFTER_S": "-1"}, "FALLBACK_AFTER_S='-1' must be at least 0"),
    ({"MAX_BODY_BYTES": "25M"}, "MAX_BODY_BYTES='25M' is not a whole number"),
    ({"MAX_IMAGE_PIXELS": "0"}, "MAX_IMAGE_PIXELS='0' must be at least 1"),
])
def test_a_bad_setting_names_its_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        settings_from_env(env)


@pytest.mark.parametrize("env, message", [
    ({"PORT": "http"}, "PORT='http' is not a whole number"),
    ({"PORT": "70000"}, "PORT=70000 must be at most 65535"),
])
def test_a_bad_address_names_its_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        listen_address(8000, env)


# --- requests and replies' ends dora dropped, found through the nodes' reports --------------

CHAT = Route("llm", "chat", "request", Task.TEXT_GENERATION, "smollm2-135m")


def reported(delivery: Delivery) -> list[NodeStatus]:
    return [NodeStatus("llm", "smollm2-135m", "smollm2-135m", "ready", 0, 0, 0, [],
                       delivery=delivery)]


def lossy_chat(catalog, answers: dict[str, list[TextChunk] | None]):
    """A graph whose LLM node answers each request id with ``answers[id]`` (None: the request
    never arrives; a reply without a final chunk: its end was lost; a None among its chunks:
    that one was lost), then reports what it
    received and answered; the report comes again after the bridge's grace, as the
    scheduler's status does every second."""
    replies, sent = Replies(), []
    received = 0

    def send(output, value, metadata) -> int:
        nonlocal received
        request_id, seq = metadata["request_id"], len(sent)
        sent.append(request_id)
        chunks = answers[request_id]
        if chunks is not None:
            received = seq + 1
            for number, chunk in enumerate(chunks):
                if chunk is not None:  # None: that result was lost on its way back
                    replies.deliver(request_id, Reply("result", arrow.encode(chunk),
                                                      {"request_id": request_id, "seq": number,
                                                       "final": chunk.final}))
        later = time.time_ns() + 3 * ARRIVAL_NS
        delivery = Delivery(later, {"request": received}, [request_id] if chunks else [])
        for grace in (0, TAIL_GRACE_NS):  # the end not come by the second report: lost
            replies.loop.call_soon(graph.check_delivery, reported(delivery), later + grace)
        return seq

    graph = Graph(Router([CHAT], catalog), replies, send, Settings(deadline_s=10))
    return TestClient(build_app(graph, catalog, lambda: {"llm": True}, dict)), sent, graph


def chunk(text: str, final: bool = False) -> TextChunk:
    return TextChunk(text, final=final, finish_reason="stop" if final else "")


ASK = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}]}


def test_a_lost_request_and_a_lost_reply_end_are_asked_again_for_a_whole_reply(catalog):
    client, sent, graph = lossy_chat(catalog, {
        "gw-1": None,  # dropped on its way to the node
        "gw-1-again1": [chunk("Hel")],  # answered, but the end of the reply was dropped
        "gw-1-again2": [chunk("Hel"), chunk("lo", final=True)]})
    with client:
        response = client.post("/v1/chat/completions", json=ASK)
        stats = client.get("/stats").json()
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Hello"  # not "HelHello"
    assert sent == ["gw-1", "gw-1-again1", "gw-1-again2"]
    assert stats["in_flight"] == 0 and graph._awaiting == {}


def test_a_streamed_reply_whose_end_was_lost_ends_in_an_explicit_error(catalog):
    client, sent, _ = lossy_chat(catalog, {"gw-1": [chunk("Hel")]})
    with client:
        response = client.post("/v1/chat/completions", json={**ASK, "stream": True})
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line]
    assert '"Hel"' in events[1] and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "lost" and "the end of the reply to gw-1 was lost" in error["message"]
    assert sent == ["gw-1"]  # part of it reached the client: not asked again


def test_a_result_lost_in_the_middle_of_a_reply_is_never_passed_over(catalog):
    # Whole: asked again, the client gets the reply in full.
    client, sent, _ = lossy_chat(catalog, {
        "gw-1": [chunk("Hel"), None, chunk("!", final=True)],
        "gw-1-again1": [chunk("Hel"), chunk("lo"), chunk("!", final=True)]})
    with client:
        response = client.post("/v1/chat/completions", json=ASK)
    assert response.json()["choices"][0]["message"]["content"] == "Hello!"
    assert sent == ["gw-1", "gw-1-again1"]
    # Streamed: part of it reached the client, so it ends in an explicit error.
    client, sent, _ = lossy_chat(catalog, {"gw-1": [chunk("Hel"), None, chunk("!", final=True)]})
    with client:
        response = client.post("/v1/chat/completions", json={**ASK, "stream": True})
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line]
    error = json.loads(events[-2])["error"]
    assert error["code"] == "lost" and "result 1 of the reply to gw-1" in error["message"]
    assert '"!"' not in response.text and sent == ["gw-1"]


def paced_chat(catalog, chunks: list[TextChunk], apart_s: float) -> TestClient:
    """A graph whose LLM node streams ``chunks`` for every request, ``apart_s`` apart."""
    replies = Replies()

    def send(output, value, metadata) -> int:
        request_id = metadata["request_id"]
        for number, piece in enumerate(chunks):
            reply = Reply("result", arrow.encode(piece), {"request_id": request_id,
                                                          "seq": number, "final": piece.final})
            replies.loop.call_later(number * apart_s, replies.deliver, request_id, reply)
        return 0

    graph = Graph(Router([CHAT], catalog), replies, send, Settings(deadline_s=10))
    return TestClient(build_app(graph, catalog, lambda: {"llm": True}, dict))


def test_tokens_that_came_while_the_client_was_slower_go_out_in_one_event(catalog):
    tokens = [chunk("Hel"), chunk("lo"), chunk(" wor"), chunk("ld"), chunk("!", final=True)]

    def contents(apart_s: float) -> list[str]:
        with paced_chat(catalog, tokens, apart_s) as client:
            response = client.post("/v1/chat/completions", json={**ASK, "stream": True})
        events = [json.loads(line.removeprefix("data: ")) for line in response.text.splitlines()
                  if line.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "stop"
        return [e["choices"][0]["delta"]["content"] for e in events
                if e["choices"][0]["delta"].get("content")]

    # All arrived before the client read: one event, the text whole.
    assert contents(0) == ["Hello world!"]
    # A client that keeps up with the model gets each token in its own event.
    assert contents(0.05) == ["Hel", "lo", " wor", "ld", "!"]


def test_replies_are_held_to_go_together_but_never_past_their_time():
    held = HeldReplies(hold_s=0.005)
    assert held.wait_s(now=1.0) is None and not held.due(1.0, more_queued=False)
    token = Reply("result", arrow.encode(chunk("a")), {})
    held.add("first", token, now=1.0)
    assert held.due(1.0, more_queued=False)  # nothing queued behind it: at once
    assert not held.due(1.001, more_queued=True) and held.wait_s(1.001) == pytest.approx(0.004)
    assert [request_id for request_id, _ in held.take()] == ["first"]
    # A fast model keeps dora's queue from ever running dry: a token every millisecond is
    # still handed over within the hold time of the oldest, not at the end of the reply.
    came: dict[str, float] = {}
    late: list[float] = []
    for step in range(30):
        now = 2.0 + step * 0.001
        came[f"r{step}"] = now
        held.add(f"r{step}", token, now)
        if held.due(now, more_queued=True):
            late += [now - came[request_id] for request_id, _ in held.take()]
    assert len(late) >= 24 and max(late) < 0.005 + 0.001  # all but the last few, each in time
    assert held.wait_s(now=3.0) == 1e-4  # those left are past their time: no wait for more


def test_merged_tokens_are_not_lost_when_an_error_follows_them(catalog):
    import asyncio

    from mofa_omni.gateway.app import coalesced

    async def stream():
        yield chunk("lo")
        yield TextChunk(" there", tool_calls=[])
        raise ApiError(ErrorKind.LOST, "result 3 was lost")

    async def read() -> tuple[list[str], str]:
        got = []
        with pytest.raises(ApiError, match="result 3 was lost"):
            async for piece in coalesced(chunk("Hel"), stream(), lambda: 1):
                got.append(piece.text)
        return got

    assert asyncio.run(read()) == ["Hello there"]


def test_a_request_lost_every_time_gets_an_error_not_a_wait(catalog):
    client, sent, _ = lossy_chat(catalog, dict.fromkeys(["gw-1", "gw-1-again1", "gw-1-again2"]))
    with client:
        started = time.monotonic()
        response = client.post("/v1/chat/completions", json=ASK)
    assert time.monotonic() - started < 5  # well within the 10 s deadline
    assert response.status_code == 500 and response.json()["error"]["code"] == "lost"
    assert "gw-1 was lost in the dataflow 3 times" in response.json()["error"]["message"]
    assert len(sent) == 3


def test_a_request_the_report_has_not_yet_seen_is_not_taken_for_lost(catalog):
    replies = Replies()
    graph = Graph(Router([CHAT], catalog), replies, lambda *_: 0, Settings())
    answer = graph.ask(graph.router.choose("smollm2-135m", Task.TEXT_GENERATION), ChatRequest(
        [ChatMessage("user", "Hi")]), TextChunk)
    lost = []
    answer.lost = lambda request_id, what: lost.append(what)
    graph.send_request(_Sent(answer, CHAT, pa.array(["x"]), {"request_id": "gw-1"}))
    sent_ns = graph._awaiting[("chat", 0)].sent_ns
    graph.check_delivery(reported(Delivery(sent_ns, {"request": 0})), sent_ns)  # too early
    graph.check_delivery(reported(Delivery(sent_ns + ARRIVAL_NS, {"request": 1})))  # arrived
    assert lost == [] and ("chat", 0) in graph._awaiting
    graph.check_delivery(reported(Delivery(sent_ns + ARRIVAL_NS, {}, ["gw-1"])), sent_ns)
    graph.check_delivery(reported(Delivery(sent_ns + ARRIVAL_NS, {}, ["gw-1"])),
                         sent_ns + TAIL_GRACE_NS // 2)  # the end may still be on its way
    assert lost == []
    graph.check_delivery(reported(Delivery(sent_ns + ARRIVAL_NS, {}, ["gw-1"])),
                         sent_ns + TAIL_GRACE_NS)
    assert lost == ["the end of the reply to {request_id}"] and graph._awaiting == {}


def test_a_crashed_node_refuses_new_requests_at_once_until_it_answers_again(catalog):
    replies, sent = Replies(), []
    answered = {"gw-1": False}

    def send(output, value, metadata) -> int:
        request_id = metadata["request_id"]
        sent.append(request_id)
        if request_id == "gw-1":  # in flight when the node crashes: asked again once it is back
            replies.loop.call_soon(graph.node_crashed, "llm")
        else:
            answered[request_id] = True
            for chunk_ in (chunk("Hel"), chunk("lo", final=True)):
                replies.deliver(request_id, Reply("result", arrow.encode(chunk_),
                                                  {"request_id": request_id,
                                                   "final": chunk_.final}))
        return len(sent) - 1

    graph = Graph(Router([CHAT], catalog), replies, send, Settings(deadline_s=10))
    with TestClient(build_app(graph, catalog, lambda: {"llm": True}, dict)) as client:
        whole = client.post("/v1/chat/completions", json=ASK)
        assert whole.status_code == 200 and whole.json()["choices"][0]["message"]["content"] \
            == "Hello"  # accepted before the crash: asked again, not refused
        assert graph.down == {}  # it answered: back
        graph.node_crashed("llm")
        refused = client.post("/v1/chat/completions", json=ASK)  # down: refused, not sent
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert refused.json()["error"]["message"] == "llm restarting after a crash"
        graph.node_is_back("llm")
        assert client.post("/v1/chat/completions", json=ASK).status_code == 200
        graph.node_crashed("llm", for_good=True)
        given_up = client.post("/v1/chat/completions", json=ASK)
        graph.node_is_back("llm")  # a node dora gave up on stays down
        still = client.post("/v1/chat/completions", json=ASK)
    assert sent == ["gw-1", "gw-1-again1", "gw-3"]
    for response in (given_up, still):
        assert response.status_code == 503 and "retry-after" not in response.headers
        assert "given up after its restarts" in response.json()["error"]["message"]


def test_a_client_may_wait_for_a_restarting_node_instead_of_a_503(catalog):
    """X-Omni-Wait-For-Restart: SECONDS — a request to a node restarting after a crash waits
    up to that long for it to be back (then it is sent), or gets the 503 once it has waited;
    a value out of range is a 400 naming the header and the bound."""
    replies, sent = Replies(), []

    def send(output, value, metadata) -> int:
        request_id = metadata["request_id"]
        sent.append(request_id)
        for chunk_ in (chunk("Hel"), chunk("lo", final=True)):
            replies.deliver(request_id, Reply("result", arrow.encode(chunk_),
                                              {"request_id": request_id, "final": chunk_.final}))
        return len(sent) - 1

    graph = Graph(Router([CHAT], catalog), replies, send,
                  Settings(deadline_s=10, max_wait_for_restart_s=20))
    with TestClient(build_app(graph, catalog, lambda: {"llm": True}, dict)) as client:
        graph.node_crashed("llm")
        replies.loop.call_soon_threadsafe(replies.loop.call_later, 0.5, graph.node_is_back,
                                          "llm")
        started = time.monotonic()
        waited = client.post("/v1/chat/completions", json=ASK,
                             headers={"X-Omni-Wait-For-Restart": "5"})
        assert waited.status_code == 200, waited.text
        assert waited.json()["choices"][0]["message"]["content"] == "Hello"
        assert 0.4 < time.monotonic() - started < 3
        graph.node_crashed("llm")
        started = time.monotonic()
        short = client.post("/v1/chat/completions", json=ASK,
                            headers={"X-Omni-Wait-For-Restart": "0.3"})
        assert short.status_code == 503 and 0.25 < time.monotonic() - started < 2
        for bad in ("soon", "-1", "21"):
            refused = client.post("/v1/chat/completions", json=ASK,
                                  headers={"X-Omni-Wait-For-Restart": bad})
            assert refused.status_code == 400
            assert "X-Omni-Wait-For-Restart" in refused.json()["error"]["message"]
            assert "from 0 to 20" in refused.json()["error"]["message"]
    assert sent == ["gw-1"]


@pytest.mark.parametrize("fields", [
    {"file": ["x"], "model": ["whisper-tiny.en"]}, {"temperature": ["0"]}, {"temperature": ["0.0"]},
    {"stream": ["false"]}, {"timestamp_granularities[]": ["segment"]}, {"language": ["en"]}])
def test_transcription_fields_done_here_pass(fields):
    check_transcription_fields(fields)


@pytest.mark.parametrize(("fields", "param"), [
    ({"prompt": ["British spelling"]}, "prompt"), ({"temperature": ["0.4"]}, "temperature"),
    ({"temperature": ["warm"]}, "temperature"), ({"stream": ["true"]}, "stream"),
    ({"timestamp_granularities[]": ["segment", "word"]}, "timestamp_granularities[]"),
    ({"chunking_strategy": ["auto"]}, "chunking_strategy"), ({"voice": ["alloy"]}, "voice")])
def test_transcription_fields_not_done_here_are_refused_by_name(fields, param):
    with pytest.raises(ApiError) as refused:
        check_transcription_fields(fields)
    assert refused.value.param == param and param in str(refused.value)
