"""Streaming speech recognition: whisper going on after a prefix, snapshots of a growing
utterance answered with partial transcripts, and the pause snapshot's transcript answering the
utterance (mofa_omni.voice.streaming), with whisper tiny.en on the speech Piper makes."""

from __future__ import annotations

import time

import numpy as np
import pytest

from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import Transcript, TranscriptionRequest
from mofa_omni.media.text import normalize_words, word_error_rate
from mofa_omni.node.residency import ModelSlot
from mofa_omni.node.serving import RequestWorker
from mofa_omni.voice.streaming import RecognitionStreams
from tests.test_serving import Collector

QUESTION = "What is the capital of France and how many people live there?"
RATE = 16000
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def question(speak) -> np.ndarray:
    return speak(QUESTION)


@pytest.mark.parametrize("backend", ["ctranslate2", "mlx"])
def test_whisper_goes_on_after_a_prefix_and_keeps_it(model, question, backend):
    asr = model("whisper-tiny.en", backend)
    whole = asr.transcribe(TranscriptionRequest(question, RATE)).text
    prefix = "What is the capital of France,"
    after = asr.transcribe(TranscriptionRequest(question, RATE, prefix=prefix))
    assert after.text.startswith(prefix), after
    assert word_error_rate(whole, after.text) <= 0.1, (whole, after.text)
    with pytest.raises(ContractError, match="prefix is 1001 characters"):
        asr.transcribe(TranscriptionRequest(question, RATE, prefix="a" * 1001))


class Counted:
    """The real recognizer, with each request it was given kept."""

    def __init__(self, adapter):
        self.adapter, self.requests = adapter, []

    def __call__(self, request: TranscriptionRequest) -> Transcript:
        self.requests.append(request)
        return self.adapter.transcribe(request)


def test_snapshots_get_partial_transcripts_and_the_pause_snapshot_answers_the_utterance(
        model, question):
    """Snapshots every 0.5 s: partial transcripts whose settled words only grow and are given
    as the prefix of the next pass; then the pause snapshot (the whole utterance) and the
    utterance itself, answered with that snapshot's transcript without a second pass. An
    utterance whose audio differs from the last snapshot is transcribed after the settled
    words."""
    asr = Counted(model("whisper-tiny.en", "ctranslate2"))
    streams = RecognitionStreams(asr, takes_prefix=True)
    partials = [streams.serve("utt-1", False, TranscriptionRequest(question[:end], RATE))
                for end in range(RATE // 2, len(question), RATE // 2)]
    settled = [p.settled_words for p in partials]
    assert settled == sorted(settled) and settled[-1] >= 4, partials
    for before, after in zip(partials, partials[1:]):
        kept = before.text.split()[:before.settled_words]
        assert after.text.split()[:len(kept)] == kept, (before, after)
    assert any(r.prefix for r in asr.requests), "the settled words were never given as a prefix"
    pause = streams.serve("utt-1", False, TranscriptionRequest(question.copy(), RATE))
    passes = len(asr.requests)
    final = streams.serve("utt-1", True, TranscriptionRequest(question.copy(), RATE))
    assert len(asr.requests) == passes and streams.reused == 1  # no pass of its own
    assert final.text == " ".join(pause.text.split()) and final.settled_words == 0
    assert word_error_rate(QUESTION, final.text) <= 0.2, final
    assert not streams.is_open("utt-1")
    # the same again, but the speech went on after the pause: transcribed after what settled
    streams.serve("utt-2", False, TranscriptionRequest(question[:2 * RATE], RATE))
    streams.serve("utt-2", False, TranscriptionRequest(question[:2 * RATE + RATE // 2], RATE))
    longer = np.concatenate([question, np.zeros(RATE // 4, np.float32)])
    final = streams.serve("utt-2", True, TranscriptionRequest(longer, RATE))
    assert asr.requests[-1].audio.size == longer.size and streams.reused == 1
    assert {"capital", "france"} <= set(normalize_words(final.text)), final
    # the same id used again for other speech (a sender that started over): nothing of the
    # first utterance's settled words is carried into it
    streams.serve("utt-3", False, TranscriptionRequest(question[:2 * RATE], RATE))
    streams.serve("utt-3", False, TranscriptionRequest(question[:3 * RATE], RATE))
    other = question[RATE // 2:]
    streams.serve("utt-3", False, TranscriptionRequest(other[:RATE], RATE))
    assert asr.requests[-1].prefix == ""
    # a request sent whole is transcribed as it is
    whole = streams.serve("plain", True, TranscriptionRequest(question, RATE))
    assert asr.requests[-1].prefix == "" and not streams.is_open("plain")
    assert whole == asr.adapter.transcribe(TranscriptionRequest(question, RATE))


def test_an_omni_node_worker_skips_replaced_snapshots_and_numbers_the_stream(
        catalog, store, question):
    """Through the node's worker: snapshots queued behind a newer message of their request
    are not served; a snapshot served alone is answered `final: false`; the utterance after it
    is the stream's last message, `final: true`, answered from the pause snapshot."""
    worker = RequestWorker(ModelSlot(catalog.get("whisper-tiny.en"), catalog, "asr", store),
                           sent := Collector())

    def submit(request_id: str, seq: int, final: bool, audio: np.ndarray) -> None:
        worker.submit("speech_recognition", arrow.encode(TranscriptionRequest(audio, RATE)),
                      {"request_id": request_id, "seq": seq, "final": final})

    def wait_for(count: int) -> None:
        deadline = time.monotonic() + 60
        while len(sent.sent) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(sent.sent) >= count, sent.sent

    # queued while the model loads: only the utterance is served
    for seq in range(3):
        submit("utt-1", seq, False, question[:(seq + 1) * RATE // 2])
    submit("utt-1", 3, True, question)
    wait_for(1)
    submit("utt-2", 0, False, question.copy())  # the pause snapshot, alone
    wait_for(2)
    submit("utt-2", 1, True, question.copy())
    wait_for(3)
    worker.drain()
    results = [(o.meta.request_id, o.meta.seq, o.meta.final, o.output) for o in sent.sent]
    assert results == [("utt-1", 0, True, "result"), ("utt-2", 0, False, "result"),
                       ("utt-2", 1, True, "result")], results
    first, partial, last = (arrow.decode(o.value, Transcript) for o in sent.sent)
    assert last.text == first.text and partial.text == " ".join(first.text.split())
    assert worker.host._recognition.reused == 1


def test_a_model_switched_under_the_host_serves_the_next_request(model, question):
    """The node's model is switched (a scheduler step, `omni swap`): the next request is
    served by the new model, not the unloaded one the streams were made with."""
    from mofa_omni.adapters.loading import open_model
    from mofa_omni.node.host import ModelHost

    first = open_model("whisper-tiny.en", backend="ctranslate2")
    host = ModelHost(first, "asr")

    def ask(request_id: str):
        (out,) = host.handle("speech_recognition",
                             arrow.encode(TranscriptionRequest(question, RATE)),
                             {"request_id": request_id, "seq": 0, "final": True})
        return out

    assert ask("before").output == "result"
    host.adapter = model("whisper-tiny.en", "ctranslate2")  # as ModelSlot switches
    first.unload()
    after = ask("after")
    assert after.output == "result", arrow.decode(after.value, Transcript)
