"""realtime: the voice graph served to OpenAI Realtime clients and to a browser page.

A WebSocket endpoint, ``ws://HOST:PORT/v1/realtime``, speaks the OpenAI Realtime API (the GA
protocol, or the beta one for a client sending ``OpenAI-Beta: realtime=v1``): the client's
``input_audio_buffer.append`` audio goes to the graph's VAD, the graph's words and speech come
back as Realtime events (mofa_omni.realtime.conversation says which). ``http://HOST:PORT/`` is a
page that talks to the graph from a browser over that same protocol. One client talks to the
graph at a time (see mofa_omni.realtime.server). dataflows/voice.web.yml wires it.

Configuration (env):
    HOST, PORT     where to listen (default 127.0.0.1:8001; loopback unless told otherwise)
    API_KEY        when set, clients need it: `Authorization: Bearer <API_KEY>`, or (a browser)
                   the WebSocket subprotocol `openai-insecure-api-key.<API_KEY>`
    MAX_AHEAD_S    how far a client's audio may run ahead of real time; appends beyond it are
                   refused with an error event (default 30)

Inputs (all from the voice graph's nodes):
    speech_started  the VAD's `speech_started`   -> input_audio_buffer.speech_started
    heard           the VAD's `utterance`        -> speech_stopped, committed (snapshots skipped)
    transcript      the ASR's `result`           -> input_audio_transcription.delta / .completed
    asr_error       the ASR's `error`            -> input_audio_transcription.failed
    reply           the LLM's `result`           -> response.created, transcript deltas
    llm_error       the LLM's `error`            -> response.done (failed)
    audio           the TTS's `result`           -> response.output_audio.delta, response.done
    tts_error       the TTS's `error`            -> response.done (failed)
    cancel          the dialogue's `cancel`      -> response.done (cancelled)
    release         the dialogue's `release`     -> a held reply (its SPECULATE) is shown
Outputs:
    audio     AudioChunk stream of the client's speech (24 kHz), request_id = the session's id;
              its last chunk (final, empty) when the client goes
    spoken    event `audio.done` with a reply's request_id once the client has played it
              (connect it to the dialogue's `spoken`)
    control   `voice.*` events for the dialogue (its `control` input): a session opened or
              closed, the session's instructions and reply settings, the client's
              response.cancel, the heard part of a truncated reply
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

import numpy as np
import uvicorn

from mofa_omni.config import env_float, env_str, exit_on_bad_settings, listen_address
from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import (
    AudioChunk,
    ErrorReport,
    TextChunk,
    Transcript,
    TranscriptionRequest,
)
from mofa_omni.models.catalog import Catalog
from mofa_omni.node.host import MessageMeta
from mofa_omni.node.integrity import CheckedNode
from mofa_omni.node.serving import cancelled_ids
from mofa_omni.realtime.conversation import Limits
from mofa_omni.realtime.graph import session_config
from mofa_omni.realtime.protocol import MAX_EVENT_BYTES, RATE
from mofa_omni.realtime.server import GraphPort, Hub, build_app
from mofa_omni.voice.events import DONE, event, read_event

log = logging.getLogger("realtime")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with exit_on_bad_settings("realtime"):
        host, port = listen_address(8001)
        limits = Limits(max_ahead_s=env_float("MAX_AHEAD_S", 30.0))
        api_key = env_str("API_KEY", "")
        catalog = Catalog.load()
    node = CheckedNode()
    with exit_on_bad_settings("realtime"):
        config = session_config(node.dataflow_descriptor(), node.node_config(), catalog)
    sending = threading.Lock()

    def send(output: str, value, meta: MessageMeta) -> None:
        with sending:
            node.send_output(output, value, meta.to_dora())

    def listen(session: str, seq: int, audio: np.ndarray, final: bool) -> None:
        now = time.time_ns()
        send("audio", arrow.encode(AudioChunk(audio.astype(np.float32), RATE, final)),
             MessageMeta(session, seq, final, now, now))

    def tell(kind: str, fields: dict[str, Any]) -> None:
        now = time.time_ns()
        send("control", event(kind, **fields) if fields else event(kind),
             MessageMeta(kind, 0, True, now, now))

    def spoken(reply_id: str) -> None:
        now = time.time_ns()
        send("spoken", event(DONE, path="", seconds=0.0), MessageMeta(reply_id, 0, True, now, now))

    hub = Hub(GraphPort(listen, tell, spoken), config, limits, api_key)
    server = uvicorn.Server(uvicorn.Config(build_app(hub), host=host, port=port,
                                           log_level="warning", ws_max_size=MAX_EVENT_BYTES))
    http = threading.Thread(target=server.run, name="http", daemon=True)
    http.start()
    log.info("serving the OpenAI Realtime API on ws://%s:%d/v1/realtime, the page on "
             "http://%s:%d/", host, port, host, port)
    for incoming in node:
        if incoming["type"] != "INPUT":
            continue
        meta = MessageMeta.from_dora(incoming.get("metadata"), incoming["id"])
        try:
            from_graph(hub, incoming["id"], meta, incoming["value"])
        except ContractError as error:
            log.error("%s %s: %s", incoming["id"], meta.request_id, error)
    server.should_exit = True
    http.join(timeout=5)
    return 0


def from_graph(hub: Hub, input_id: str, meta: MessageMeta, value) -> None:
    """What one of the graph's messages means for the client's conversation."""
    match input_id:
        case "speech_started":
            _, fields = read_event(value)
            hub.from_graph("speech_started", meta.request_id, float(fields.get("start_s", 0)))
        case "heard" if meta.final:
            request = arrow.decode(value, TranscriptionRequest)
            hub.from_graph("speech_stopped", meta.request_id,
                           request.audio.size / request.sample_rate)
        case "transcript":
            transcript = arrow.decode(value, Transcript)
            hub.from_graph("transcript", meta.request_id, transcript.text,
                           transcript.settled_words, meta.final)
        case "asr_error":
            hub.from_graph("not_heard", meta.request_id,
                           arrow.decode(value, ErrorReport).summary())
        case "reply":
            chunk = arrow.decode(value, TextChunk)
            hub.from_graph("reply_text", meta.request_id, chunk.text, chunk.final)
        case "audio":
            chunk = arrow.decode(value, AudioChunk)
            hub.from_graph("reply_audio", meta.request_id, chunk.audio, chunk.sample_rate,
                           chunk.final)
        case "llm_error" | "tts_error":
            hub.from_graph("reply_failed", meta.request_id,
                           arrow.decode(value, ErrorReport).summary())
        case "cancel":
            for reply_id in cancelled_ids(value):
                hub.from_graph("cancelled", reply_id)
        case "release":
            for reply_id in cancelled_ids(value):
                hub.from_graph("released", reply_id)


if __name__ == "__main__":
    sys.exit(main())
