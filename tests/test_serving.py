"""The request worker: order, cancellation, deadlines, draining; and stream numbering."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mofa_omni.adapters.ct2_batches import Ct2BatchError
from mofa_omni.adapters.loading import open_model
from mofa_omni.adapters.mlx_engine import MlxEngineError
from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import (
    ChatMessage,
    ChatRequest,
    EmbeddingRequest,
    Embeddings,
    ErrorReport,
    GenericRequest,
    TextChunk,
)
from mofa_omni.models.footprint import LlmShape, kv_cache_bytes
from mofa_omni.models.store import ModelStore
from mofa_omni.node.admission import SchedulerLink
from mofa_omni.node.host import ModelHost, Outgoing
from mofa_omni.node.residency import ModelSlot
from mofa_omni.node.serving import RequestWorker, cancelled_ids
from mofa_omni.scheduler.bookkeeping import Scheduling
from mofa_omni.scheduler.messages import LoadAsk, Variant
from mofa_omni.scheduler.policy import SchedulerState
from mofa_omni.scheduler.status import render_status
from tests.conftest import textstats_catalog


@pytest.fixture()
def stats_host(third_party: Path, tmp_path: Path) -> ModelHost:
    catalog = textstats_catalog(tmp_path, ["the"])
    return ModelHost(open_model("textstats-en", catalog=catalog,
                                store=ModelStore(tmp_path / "cache")), "stats")


@pytest.fixture()
def stats_slot(third_party: Path, tmp_path: Path) -> ModelSlot:
    catalog = textstats_catalog(tmp_path, ["the"])
    return ModelSlot(catalog.get("textstats-en"), catalog, "stats", ModelStore(tmp_path / "cache"))


def stats_request(text: str) -> pa.Array:
    return arrow.encode(GenericRequest("text.stats", pa.RecordBatch.from_pydict({"text": [text]})))


class Collector:
    def __init__(self):
        self.sent: list[Outgoing] = []
        self.lock = threading.Lock()

    def __call__(self, out: Outgoing) -> None:
        with self.lock:
            self.sent.append(out)

    def errors(self) -> dict[str, ErrorReport]:
        return {o.meta.request_id: arrow.decode(o.value, ErrorReport)
                for o in self.sent if o.output == "error"}


def test_requests_are_served_in_order_and_drained(stats_slot: ModelSlot):
    sent = Collector()
    worker = RequestWorker(stats_slot, sent)
    for i in range(20):
        worker.submit("request", stats_request("the cat " * i), {"request_id": f"r{i}"})
    worker.drain()
    assert [o.meta.request_id for o in sent.sent] == [f"r{i}" for i in range(20)]
    assert all(o.output == "result" for o in sent.sent)


def test_queued_requests_past_their_deadline_time_out(stats_slot: ModelSlot):
    sent = Collector()
    worker = RequestWorker(stats_slot, sent, timeout_s=0.0)
    time.sleep(0.01)
    worker.submit("request", stats_request("late"), {"request_id": "late"})
    worker.drain()
    assert sent.errors()["late"].kind == "timeout"


def test_cancelled_requests_are_dropped_with_an_explicit_error(stats_slot: ModelSlot):
    sent = Collector()
    worker = RequestWorker(stats_slot, sent)
    worker.cancel("gone")
    worker.submit("request", stats_request("a"), {"request_id": "gone"})
    worker.submit("request", stats_request("b"), {"request_id": "kept"})
    worker.drain()
    assert sent.errors()["gone"].kind == "cancelled"
    assert [o.output for o in sent.sent if o.meta.request_id == "kept"] == ["result"]


def test_unavailable_model_answers_every_request(stats_host: ModelHost):
    host = ModelHost(stats_host.adapter, "stats", unavailable="weights are corrupt")
    (out,) = host.handle("request", stats_request("x"), {"request_id": "r"})
    assert arrow.decode(out.value, ErrorReport).kind == "unavailable"


def test_cancel_messages_carry_request_ids():
    assert cancelled_ids(pa.array(["a", None, "b"])) == ["a", "b"]
    struct = pa.StructArray.from_arrays([pa.array(["c"])], names=["request_id"])
    assert cancelled_ids(struct) == ["c"]


@pytest.mark.slow
def test_cancelling_a_streaming_reply_stops_the_model(catalog, store):
    sent = Collector()
    worker = RequestWorker(ModelSlot(catalog.get("smollm2-135m"), catalog, "llm", store), sent)
    request = ChatRequest([ChatMessage("user", "Write a long story about a dragon.")],
                          max_tokens=400)
    worker.submit("request", arrow.encode(request), {"request_id": "story"})
    deadline = time.monotonic() + 60
    while len(sent.sent) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    worker.cancel("story")
    worker.drain()
    chunks = [arrow.decode(o.value, TextChunk) for o in sent.sent if o.output == "result"]
    assert 3 <= len(chunks) < 100  # stopped long before 400 tokens
    assert not any(c.final for c in chunks)
    assert sent.errors()["story"].kind == "cancelled"
    assert sent.sent[-1].output == "error" and sent.sent[-1].meta.final


def test_requests_sharing_an_id_form_one_numbered_stream(stats_host: ModelHost):
    """Sentences of one reply sent as separate requests: seq runs on, final only at the end."""
    metas = []
    for i, last in enumerate([False, False, True]):
        (out,) = stats_host.handle("request", stats_request(f"sentence {i}"),
                                   {"request_id": "reply-1", "seq": i, "final": last})
        metas.append((out.meta.seq, out.meta.final))
    assert metas == [(0, False), (1, False), (2, True)]
    (again,) = stats_host.handle("request", stats_request("next"), {"request_id": "reply-1"})
    assert (again.meta.seq, again.meta.final) == (0, True)  # a finished stream starts over


def test_every_request_answered_recently_is_reported_whatever_the_rate(stats_slot: ModelSlot,
                                                                       monkeypatch):
    import mofa_omni.node.serving as serving

    sent = Collector()
    worker = RequestWorker(stats_slot, sent)
    for i in range(200):  # more than a report used to hold (the last 64)
        worker.submit("request", stats_request("the cat"), {"request_id": f"r{i}"})
    worker.drain()
    assert worker.answered() == [f"r{i}" for i in range(200)]
    monkeypatch.setattr(serving, "ANSWERED_WINDOW_S", 0.0)
    time.sleep(0.01)
    assert worker.answered() == []  # older than the window: no longer reported


def embedding_request(*texts: str, input_type: str | None = None) -> pa.Array:
    return arrow.encode(EmbeddingRequest(list(texts), input_type))


@pytest.mark.slow
def test_requests_queued_together_are_served_as_one_batch(catalog, store):
    """Embedding requests that queued up while the model was busy are embedded in one engine
    call: each gets the vectors it gets alone, in order; one that cannot be read is answered
    first, one cancelled while the batch ran ends cancelled while the others get their
    results; another input is not merged; one the engine fails on fails alone."""
    texts = ["The cat sleeps.", "Dora moves Arrow buffers.", "A short one.", "Paris in spring"]
    alone = open_model("minilm-l6", catalog=catalog, store=store)
    expected = {f"r{i}": alone.embed(EmbeddingRequest([t])).vectors for i, t in enumerate(texts)}
    expected["query"] = alone.embed(EmbeddingRequest([texts[0]], "query")).vectors
    expected["two"] = alone.embed(EmbeddingRequest(texts[:2])).vectors
    worker = RequestWorker(ModelSlot(catalog.get("minilm-l6"), catalog, "embedder", store),
                           sent := Collector())
    while not worker.slot.loaded:
        time.sleep(0.01)
    embed, calls, started, release = worker.host.adapter.embed, [], threading.Event(), \
        threading.Event()

    def engine(request: EmbeddingRequest) -> Embeddings:
        calls.append(len(request.texts))
        if request.texts == ["hold"]:  # the first request holds the model while others queue
            started.set()
            release.wait(10)
        if "boom" in request.texts:
            raise RuntimeError("the engine failed on boom")
        if "cancel me" in request.texts:
            worker.cancel("cancelled-while-running")
        return embed(request)

    def queue_behind_one(*requests: tuple[str, pa.Array, str]) -> list[str]:
        """The request ids in the order their replies went out."""
        sent.sent.clear()
        calls.clear()
        started.clear()
        release.clear()
        worker.submit("request", embedding_request("hold"), {"request_id": "hold"})
        assert started.wait(10)
        for input_id, value, request_id in requests:
            worker.submit(input_id, value, {"request_id": request_id})
        release.set()
        deadline = time.monotonic() + 10
        while len(sent.sent) < len(requests) + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        return [o.meta.request_id for o in sent.sent]

    worker.host.adapter.embed = engine
    order = queue_behind_one(
        *[("request", embedding_request(text), f"r{i}") for i, text in enumerate(texts)],
        ("request", pa.array([1, 2]), "unreadable"),
        ("request", embedding_request(texts[0], input_type="query"), "query"),
        ("request", embedding_request("cancel me"), "cancelled-while-running"),
        ("request", embedding_request(*texts[:2]), "two"),
        ("other", embedding_request("x"), "other-input"))
    assert order == ["hold", "unreadable", "r0", "r1", "r2", "r3", "query",
                     "cancelled-while-running", "two", "other-input"]
    # "hold" alone; then the batch, one call per input type (query last)
    assert calls == [1, 4 + 1 + 2, 1]
    errors = sent.errors()
    assert errors["cancelled-while-running"].kind == "cancelled"
    assert errors["unreadable"].kind == "bad_request"
    assert errors["other-input"].kind == "bad_request"  # no such task: not merged, refused
    results = {o.meta.request_id: arrow.decode(o.value, Embeddings).vectors
               for o in sent.sent if o.output == "result"}
    assert set(results) == {"hold", *expected}
    for request_id, vectors in expected.items():
        np.testing.assert_allclose(results[request_id], vectors, atol=1e-5)

    order = queue_behind_one(("request", embedding_request(texts[0]), "r0"),
                             ("request", embedding_request("boom"), "bad"),
                             ("request", embedding_request(texts[1]), "r1"))
    assert order == ["hold", "r0", "bad", "r1"]
    assert calls == [1, 3, 1, 1, 1]  # the batch failed: each was served alone
    errors = sent.errors()
    assert list(errors) == ["bad"] and "boom" in errors["bad"].message
    for request_id in ("r0", "r1"):
        np.testing.assert_allclose(arrow.decode(sent.sent[order.index(request_id)].value,
                                                Embeddings).vectors, expected[request_id],
                                   atol=1e-5)
    worker.drain()


def chat_worker(catalog, store, backend: str = "llama.cpp", **options) -> RequestWorker:
    """A worker serving smollm2-135m on ``backend`` with ``options``, its model loaded."""
    base = catalog.get("smollm2-135m")
    spec = dataclasses.replace(base, options=base.options | options)
    worker = RequestWorker(ModelSlot(spec, catalog, "llm", store, backend=backend),
                           Collector(), parallel=4)
    while not worker.slot.loaded:
        time.sleep(0.01)
    return worker


LONG = ChatRequest([ChatMessage("user", "Tell me a long story.")], max_tokens=40)


def serve_cancelling_one(worker: RequestWorker, requests: dict[str, ChatRequest]) -> None:
    """Submit a long request ("cancel-me"), then ``requests``; cancel the long one once it
    has begun to stream; serve them all."""
    worker.submit("request", arrow.encode(LONG), {"request_id": "cancel-me"})
    for rid, request in requests.items():
        worker.submit("request", arrow.encode(request), {"request_id": rid})
    deadline = time.monotonic() + 60
    while not any(o.meta.request_id == "cancel-me" for o in worker.send.sent):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    worker.cancel("cancel-me")
    worker.drain()


def watch_busy(engine) -> Callable[[], int]:
    """Samples ``engine.busy()`` every millisecond on a thread; the function returned stops
    it and gives the most requests it saw the engine hold at once."""
    most, done = [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            most[0] = max(most[0], engine.busy())
            time.sleep(0.001)

    threading.Thread(target=watch, daemon=True).start()

    def stop() -> int:
        done.set()
        return most[0]

    return stop


def replies_of(worker: RequestWorker, request_ids) -> dict[str, str]:
    return {rid: "".join(arrow.decode(o.value, TextChunk).text for o in worker.send.sent
                         if o.meta.request_id == rid and o.output == "result")
            for rid in request_ids}


CHATS = {f"q{i}": ChatRequest([ChatMessage("user", q)], max_tokens=24) for i, q in enumerate(
    ["What is the capital of France?", "Name a colour.", "What is 2 plus 2?", "Say hello.",
     "What do cats eat?"])}


@pytest.mark.slow
def test_chat_requests_decoded_together_each_get_the_reply_they_get_alone(catalog, store):
    """llama.cpp decodes several chat requests in shared steps; with the deterministic option
    each greedy reply is the one it gets alone (without it, llama.cpp's sums differ beside
    others); one cancelled while it streams ends cancelled, the others intact."""
    worker = chat_worker(catalog, store, parallel=4, deterministic=True)
    alone = {rid: "".join(c.text for c in worker.host.adapter.generate(r))
             for rid, r in CHATS.items()}
    # one request holds at most its sequence's share of the context
    with pytest.raises(ContractError, match=r"exceed the 1024 tokens one request may hold"):
        worker.host.adapter.generate(ChatRequest([ChatMessage("user", "Hi")], max_tokens=1020))
    serve_cancelling_one(worker, CHATS)
    assert worker.send.errors()["cancel-me"].kind == "cancelled"
    replies = replies_of(worker, CHATS)
    assert replies == alone and all(replies.values())


@pytest.mark.slow
def test_a_context_that_holds_two_requests_runs_two_and_queues_the_rest(catalog, store):
    worker = chat_worker(catalog, store, parallel=4)
    needs = [len(worker.host.adapter.prompt_tokens(r)) + r.max_tokens for r in CHATS.values()]
    assert 3 * min(needs) > 2 * max(needs)  # a context of 2 * max(needs): two fit, not three
    worker.drain()
    worker = chat_worker(catalog, store, parallel=4, context=2 * max(needs))
    most_busy = watch_busy(worker.host.adapter._engine)
    for rid, request in CHATS.items():
        worker.submit("request", arrow.encode(request), {"request_id": rid})
    worker.drain()
    assert most_busy() == 2 and worker.send.errors() == {}
    finals = [arrow.decode(o.value, TextChunk) for o in worker.send.sent if o.meta.final]
    assert len(finals) == len(CHATS) and all(f.completion_tokens > 0 for f in finals)
    assert all(replies_of(worker, CHATS).values())


@pytest.mark.slow
def test_mlx_decodes_chat_requests_together_each_as_alone(catalog, store):
    """mlx-lm's batch generator decodes the requests together (parallel 4): each greedy reply
    is the one stream_generate gives it alone (parallel 1), a structured reply scored between
    the batch's steps is the one it gets alone, and one cancelled while it streams ends
    cancelled, the others intact. Unloading while requests decode ends them in an error."""
    from tests.test_structured import ask

    structured = ask("Which city is the capital of France?", max_tokens=48)
    requests = {**CHATS, "json": structured}
    alone_worker = chat_worker(catalog, store, "mlx", parallel=1)
    alone = {rid: "".join(c.text for c in alone_worker.host.adapter.generate(r))
             for rid, r in requests.items()}
    alone_worker.drain()
    alone_worker.slot.unload()

    worker = chat_worker(catalog, store, "mlx", parallel=4)
    most_busy = watch_busy(worker.host.adapter._engine)
    serve_cancelling_one(worker, requests)
    assert 2 <= most_busy() <= 4  # decoded together, never more than parallel
    assert worker.send.errors()["cancel-me"].kind == "cancelled"
    assert replies_of(worker, requests) == alone and all(alone.values())

    adapter = worker.host.adapter  # the worker has unloaded it as it drained
    adapter.load(store.prepare(adapter))
    stream = adapter.generate(LONG)
    next(stream)
    adapter.unload()
    with pytest.raises(MlxEngineError, match="unloaded"):
        list(stream)


@pytest.mark.slow
def test_ctranslate2_decodes_the_waiting_requests_in_static_batches_each_as_alone(catalog,
                                                                                 store):
    """CTranslate2 decodes the requests waiting when a batch starts in one generate_batch call
    (parallel 4): with the deterministic option (float32) each greedy reply is the one it gets
    alone (parallel 1); one cancelled while it streams stops alone; a request sampling
    otherwise waits for a batch of its own; unloading ends a waiting request in an error."""
    alone_worker = chat_worker(catalog, store, "ctranslate2", parallel=1, deterministic=True)
    alone = {rid: "".join(c.text for c in alone_worker.host.adapter.generate(r))
             for rid, r in CHATS.items()}
    alone_worker.drain()
    alone_worker.slot.unload()

    worker = chat_worker(catalog, store, "ctranslate2", parallel=4, deterministic=True)
    batches = worker.host.adapter._batches
    most_busy = watch_busy(batches)
    sampled = ChatRequest([ChatMessage("user", "Say hello.")], max_tokens=8, temperature=0.8)
    serve_cancelling_one(worker, {**CHATS, "sampled": sampled})
    assert 2 <= most_busy() <= 4
    assert worker.send.errors().keys() == {"cancel-me"}
    assert worker.send.errors()["cancel-me"].kind == "cancelled"
    assert replies_of(worker, CHATS) == alone and all(alone.values())
    assert any(o.meta.request_id == "sampled" and o.meta.final for o in worker.send.sent)

    adapter = worker.host.adapter  # unloaded as the worker drained
    adapter.load(store.prepare(adapter))
    first = adapter.generate(LONG)
    next(first)  # decoding: the next request waits for the next batch
    failures = []

    def wait_for_a_batch() -> None:
        try:
            list(adapter.generate(CHATS["q0"]))
        except Ct2BatchError as error:
            failures.append(error)

    waiting = threading.Thread(target=wait_for_a_batch)
    waiting.start()
    wait_until(lambda: adapter._batches._waiting)
    adapter.unload()
    waiting.join()
    assert len(failures) == 1 and "unloaded" in str(failures[0])


@pytest.mark.slow
def test_mlx_decodes_as_many_requests_together_as_the_scheduler_grants(catalog, store):
    """Under a budget that holds the model and one more sequence's KV cache, the node decodes
    two requests together and queues the rest, none lost. Another model asking for memory
    makes the scheduler lower it to one before evicting anything; the node confirms once its
    second request has ended, and the other model is granted. (The scheduler's bookkeeping in
    process, as the scheduler node runs it; no dora.)"""
    base = catalog.get("smollm2-135m")
    slot = ModelSlot(dataclasses.replace(base, options=base.options | {"parallel": 4}),
                     catalog, "llm", store, backend="mlx")
    files = store.prepare(slot.host.adapter)  # prepared: the ask can say what a sequence takes
    lock, asks, others = threading.RLock(), [], []
    scheduling: list[Scheduling] = []

    def publish(message) -> None:  # the node's memory output, to the scheduler and back
        with lock:
            if not scheduling:
                asks.append(message)
                return
            for command in scheduling[0].on_message(message, time.monotonic()):
                (worker.command if command.node == "llm" else others.append)(command)

    worker = RequestWorker(slot, Collector(), link=SchedulerLink("llm", slot, publish), parallel=4)
    wait_until(lambda: asks)
    (ask,) = asks
    assert (ask.parallel, ask.sequence_bytes) == (4, kv_cache_bytes(LlmShape.of_directory(files),
                                                                     4096, 4))
    budget = ask.overhead + ask.ladder[0].bytes + ask.sequence_bytes * 3 // 2
    with lock:
        scheduling.append(Scheduling(SchedulerState(budget=budget), ("llm",),
                                     started=time.monotonic()))
        publish(ask)
    wait_until(lambda: slot.loaded)
    state = scheduling[0].state

    def served(requests: dict[str, ChatRequest]) -> int:
        """Submit ``requests``, wait for every answer: the most decoded together."""
        most_busy = watch_busy(slot.host.adapter._engine)
        for rid, request in requests.items():
            worker.submit("request", arrow.encode(request), {"request_id": rid})
        wait_until(lambda: all(replies_of(worker, requests).values()), 120)
        return most_busy()

    assert served(CHATS) == 2 and worker.send.errors() == {}
    assert "2 of 4 requests together" in render_status(scheduling[0].status(0, 0, 0))

    # Another model needs half a sequence more than is free: llm is lowered to one request.
    free = state.budget - state.used_bytes()
    later = {f"later-{rid}": request for rid, request in CHATS.items()}
    for rid, request in later.items():
        worker.submit("request", arrow.encode(request), {"request_id": rid})
    wait_until(lambda: slot.host.adapter._engine.busy() == 2)
    with lock:
        publish(LoadAsk("asr", [Variant("whisper", free + ask.sequence_bytes // 2)], 0))
        assert [(c.action, c.node) for c in others] == [("wait", "asr")]
    wait_until(lambda: [(c.action, c.node) for c in others][-1:] == [("load", "asr")], 60)
    assert "llm" in state.residents and state.residents["llm"].parallel == 1
    assert [d.action for d in scheduling[0].decisions] == ["load", "parallel", "wait", "load"]
    wait_until(lambda: all(replies_of(worker, later).values()), 120)
    alone = {f"alone-{rid}": request for rid, request in list(CHATS.items())[:3]}
    assert served(alone) == 1 and worker.send.errors() == {}
    worker.drain()


def wait_until(condition: Callable[[], object], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
