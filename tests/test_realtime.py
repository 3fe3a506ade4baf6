"""dataflows/voice.web.yml end to end, with real models: the official `openai` client's realtime
connection (GA and beta protocols), barge-in and response.cancel, bad input on the WebSocket,
and the browser page in headless Chromium with a fake microphone."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from mofa_omni.contract.tasks import TranscriptionRequest
from mofa_omni.media.audio import resample, write_wav
from mofa_omni.media.text import normalize_words
from tests.browser import browser_page
from tests.dataflow_run import finish, start_dataflow
from tests.test_gateway import free_port

ROOT = Path(__file__).parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
RATE = 24_000
FRANCE = "What is the capital of France?"


@dataclass
class Graph:
    port: int
    output: Path
    process: object

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0,
                             websocket_base_url=f"ws://127.0.0.1:{self.port}/v1")

    def raw(self, **options) -> object:
        """A WebSocket to /v1/realtime without the official client, for what it never sends."""
        return connect(f"ws://127.0.0.1:{self.port}/v1/realtime", max_size=None, **options)

    def health(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).json()


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> Iterator[Graph]:
    output = tmp_path_factory.mktemp("voice-web")
    port = free_port()
    process = start_dataflow(ROOT / "dataflows" / "voice.web.yml",
                             {"PORT": str(port), "VOICE_OUTPUT": str(output)})
    running = Graph(port, output, process)
    deadline = time.monotonic() + 120
    while True:
        try:
            running.health()
            break
        except httpx.HTTPError:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the graph did not serve:\n{process.stdout.read()[-5000:]}")
            time.sleep(0.5)
    yield running
    process.send_signal(2)
    log = finish(process, 90)
    assert "Traceback" not in log, log[-5000:]


@pytest.fixture(scope="module")
def question(speak) -> Callable[[str], np.ndarray]:
    """A sentence spoken by Piper at 24 kHz, with the second of silence that ends a turn."""
    def spoken(text: str) -> np.ndarray:
        audio = resample(speak(text), 16000, RATE)
        return np.concatenate([audio, np.zeros(RATE, np.float32)])
    return spoken


def pcm_pieces(audio: np.ndarray, seconds: float = 0.1) -> list[str]:
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    step = round(seconds * RATE) * 2
    return [base64.b64encode(pcm[i:i + step]).decode() for i in range(0, len(pcm), step)]


def audio_of(events: list, delta_type: str) -> np.ndarray:
    pcm = b"".join(base64.b64decode(e.delta) for e in events if e.type == delta_type)
    return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768


def until(connection, wanted: Callable[[object], bool]) -> list:
    """The events received up to and including the first ``wanted`` one."""
    events = []
    while True:
        events.append(connection.recv())
        if wanted(events[-1]):
            return events


def done(event) -> bool:
    return event.type == "response.done"


def test_the_official_client_asks_aloud_and_hears_the_answer(graph, question, model):
    with graph.client().realtime.connect(model="smollm2-135m") as connection:
        created = connection.recv()
        assert created.type == "session.created"
        assert created.session.audio.output.voice == "piper-joe"
        connection.session.update(session={
            "type": "realtime", "instructions": "You are a helpful voice assistant. Answer in "
            "one short sentence.", "max_output_tokens": 40,
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE}}}})
        updated = connection.recv()
        assert updated.type == "session.updated" and updated.session.max_output_tokens == 40
        for piece in pcm_pieces(question(FRANCE)):
            connection.input_audio_buffer.append(audio=piece)
        events = until(connection, done)
    types = [e.type for e in events]
    for expected in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                     "input_audio_buffer.committed", "conversation.item.added",
                     "conversation.item.input_audio_transcription.completed",
                     "response.created", "response.output_audio_transcript.delta",
                     "response.output_audio.delta", "response.output_audio.done"):
        assert expected in types, types
    assert types.index("input_audio_buffer.speech_started") < types.index(
        "input_audio_buffer.committed") < types.index("response.created")
    heard = next(e for e in events
                 if e.type == "conversation.item.input_audio_transcription.completed")
    assert "capital of france" in " ".join(normalize_words(heard.transcript))
    # the deltas of the user's words add up to the transcript (partial ones settled only)
    deltas = "".join(e.delta for e in events
                     if e.type == "conversation.item.input_audio_transcription.delta")
    assert normalize_words(deltas) == normalize_words(heard.transcript)
    reply = events[-1].response
    assert reply.status == "completed"
    said = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
    assert said.strip() == reply.output[0].content[0].transcript.strip() and said.strip()
    audio = audio_of(events, "response.output_audio.delta")
    assert audio.size > RATE // 2
    spoken = model("whisper-tiny.en").transcribe(TranscriptionRequest(
        resample(audio, RATE, 16000), 16000)).text
    assert {"paris", "france", "capital"} & set(normalize_words(spoken)), spoken


def test_barge_in_and_response_cancel_with_the_beta_protocol(graph, question):
    """Speaking over a reply interrupts it (the dialogue cancels it, a truncate keeps what was
    heard), the new question is answered; response.cancel stops a reply being made."""
    with graph.client().beta.realtime.connect(model="smollm2-135m") as connection:
        assert connection.recv().type == "session.created"
        for piece in pcm_pieces(question(FRANCE)):
            connection.input_audio_buffer.append(audio=piece)
        first = until(connection, lambda e: e.type == "response.audio.delta")
        assert "response.output_audio.delta" not in [e.type for e in first]  # beta names
        playing = first[-1].item_id
        for piece in pcm_pieces(question("And what is the capital of Italy?")):
            connection.input_audio_buffer.append(audio=piece)
        second = until(connection, lambda e: done(e) and e.response.output[0].id != playing)
        assert "input_audio_buffer.speech_started" in [e.type for e in second]
        # the first reply ends as cancelled if it was still being made, else as completed
        # (its audio all sent; the client stops playing it, as this one says)
        ended = [e.response for e in first + second if done(e)
                 and e.response.output[0].id == playing]
        assert len(ended) == 1 and ended[0].status in ("completed", "cancelled"), ended
        connection.conversation.item.truncate(item_id=playing, content_index=0,
                                              audio_end_ms=300)
        truncated = until(connection, lambda e: e.type == "conversation.item.truncated")
        assert truncated[-1].audio_end_ms == 300
        assert second[-1].response.status == "completed"
        heard = [e.transcript for e in first + second
                 if e.type == "conversation.item.input_audio_transcription.completed"]
        assert "italy" in normalize_words(heard[-1]), heard
        for piece in pcm_pieces(question("What is the largest ocean on Earth?")):
            connection.input_audio_buffer.append(audio=piece)
        until(connection, lambda e: e.type == "response.created")
        connection.response.cancel()
        cancelled = until(connection, done)
        assert cancelled[-1].response.status == "cancelled"
        assert cancelled[-1].response.status_details.reason == "client_cancelled"
    transcript = (graph.output / "transcript.txt").read_text()
    assert transcript.count("[interrupted]") >= 2, transcript


def errors_for(socket, events: list[str]) -> list[dict]:
    """The error event answering each raw message."""
    answers = []
    for text in events:
        socket.send(text)
        while (event := json.loads(socket.recv(timeout=30)))["type"] != "error":
            pass
        answers.append(event["error"])
    return answers


def test_bad_input_gets_error_events_and_the_graph_serves_the_next_client(graph, question):
    silence = base64.b64encode(np.zeros(2400, "<i2").tobytes()).decode()
    with graph.raw() as socket:
        assert json.loads(socket.recv(timeout=30))["type"] == "session.created"
        with graph.raw() as second:  # one conversation at a time: the next one waits
            assert json.loads(second.recv(timeout=10))["error"]["code"] == "session_busy"
            with pytest.raises(ConnectionClosed) as closed:
                second.recv(timeout=10)
            assert closed.value.rcvd.code == 1013
        bad = [
            "{not json",
            json.dumps({"type": "input_audio_buffer.dance"}),
            json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"}),
            json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA"}),  # 3 bytes
            json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {
                "input": {"format": {"type": "audio/pcmu"}}}}}),
            json.dumps({"type": "session.update", "session": {"tools": [{"type": "function",
                                                                         "name": "f"}]}}),
            json.dumps({"type": "response.create"}),
            json.dumps({"type": "conversation.item.truncate", "item_id": "nope",
                        "audio_end_ms": 0}),
            json.dumps({"type": "response.cancel", "event_id": "mine"}),
        ]
        codes = [(e["code"], e["param"]) for e in errors_for(socket, bad)]
        assert codes == [("invalid_json", None), ("unknown_event", "type"),
                         ("invalid_audio", "audio"), ("invalid_audio", "audio"),
                         ("unsupported_parameter", "session.audio.input.format"),
                         ("unsupported_parameter", "session.tools"),
                         ("unsupported_event", "type"), ("item_not_found", "item_id"),
                         ("response_cancel_not_active", None)]
        flood = [json.dumps({"type": "input_audio_buffer.append", "audio": silence})] * 400
        for text in flood:  # 40 s of audio at once: past the 30 s the graph buffers
            socket.send(text)
        overflow = errors_for(socket, [flood[0]])[0]
        assert overflow["code"] == "input_audio_buffer_overflow"
        with pytest.raises(ConnectionClosed) as closed:  # one message over 16 MiB
            socket.send(json.dumps({"type": "input_audio_buffer.append",
                                    "audio": "A" * (17 << 20)}))
            for _ in range(len(flood)):  # the flood's other refusals, then the close
                socket.recv(timeout=30)
        assert closed.value.rcvd is None or closed.value.rcvd.code == 1009
    # a client that goes in the middle of a reply: the reply stops, the next client is heard
    interrupted = (graph.output / "transcript.txt").read_text().count("[interrupted]")
    with graph.raw() as socket:
        assert json.loads(socket.recv(timeout=30))["type"] == "session.created"
        for piece in pcm_pieces(question(FRANCE)):
            socket.send(json.dumps({"type": "input_audio_buffer.append", "audio": piece}))
        while json.loads(socket.recv(timeout=60))["type"] != "response.created":
            pass
    with graph.client().realtime.connect(model="smollm2-135m") as connection:
        assert connection.recv().type == "session.created"
        for piece in pcm_pieces(question("What is the capital of Italy?")):
            connection.input_audio_buffer.append(audio=piece)
        events = until(connection, done)
        # stay until the reply has played out (the dialogue counts it spoken then): a client
        # leaving sooner stops it, as the one above did
        transcript = graph.output / "transcript.txt"
        deadline = time.monotonic() + 20
        while not transcript.read_text().splitlines()[-1].startswith("assistant: ") and \
                time.monotonic() < deadline:
            time.sleep(0.1)
    assert events[-1].response.status == "completed", events[-1].response.status_details
    transcript = transcript.read_text()
    assert transcript.count("[interrupted]") == interrupted + 1, transcript
    assert graph.health()["sessions_served"] >= 3  # this test's own


def test_the_page_in_headless_chromium_hears_the_question_and_plays_the_answer(
        graph, question, model, tmp_path):
    wav = tmp_path / "microphone.wav"
    silence = np.zeros(RATE, np.float32)
    write_wav(wav, np.concatenate([silence, question(FRANCE), silence, silence]), RATE)
    profile = tmp_path / "chromium"
    profile.mkdir()
    with browser_page(f"http://127.0.0.1:{graph.port}/", wav, profile) as page:
        page.evaluate("document.getElementById('talk').click()", gesture=True)
        page.wait_for("window.omni.assistant.length > 0", 90)
        time.sleep(1.0)  # the reply is still playing: the page keeps what it plays
        page.wait_for("window.omni.played.length > 0", 10)
        state = page.evaluate("({user: window.omni.user, assistant: window.omni.assistant, "
                              "errors: window.omni.errors, played: window.omni.played, "
                              "shown: document.getElementById('log').innerText})")
    assert not state["errors"], state["errors"]
    assert "capital of france" in " ".join(normalize_words(state["user"][0]))
    assert state["assistant"][0].strip() in state["shown"]
    pcm = b"".join(base64.b64decode(piece) for piece in state["played"])
    played = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768
    assert np.abs(played).max() > 0.05
    spoken = model("whisper-tiny.en").transcribe(TranscriptionRequest(
        resample(played, RATE, 16000), 16000)).text
    assert {"paris", "france", "capital"} & set(normalize_words(spoken)), spoken
