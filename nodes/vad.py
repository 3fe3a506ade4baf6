"""vad: cuts a live audio stream into utterances with Silero VAD (a real model, in-process).

Configuration (env in the dataflow YAML):
    MODEL            catalog name of the VAD model (default silero-vad)
    THRESHOLD        speech probability at which speech starts (default 0.5)
    NEG_THRESHOLD    below this, a frame is silence (default THRESHOLD - 0.15)
    MIN_SPEECH_MS    voiced time before speech counts; shorter blips are dropped (default 250)
    MIN_SILENCE_MS   silence that ends an utterance (default 600)
    SPEECH_PAD_MS    audio kept before the speech starts and after it ends (default 100)
    MAX_UTTERANCE_S  longer speech is cut into several utterances (default 30)
    PARTIAL_EVERY_MS a snapshot of speech under way this often, for an ASR that transcribes
                     while the user speaks (default 0: none)
    TRANSCRIBE_ON_PAUSE  "true": a snapshot once a pause is SPEECH_PAD_MS long, holding what
                     the utterance will hold if the pause ends it: the ASR transcribes it
                     while the VAD still waits for MIN_SILENCE_MS (default false)
    TURN_MODEL       catalog name of a turn-end model run here on each pause snapshot
                     (smart-turn-v3; default "": none)
    COMPLETE_SILENCE_MS  with TRANSCRIBE_ON_PAUSE: the silence that ends an utterance when the
                     judges of its pause snapshot say the turn is over: the TURN_MODEL, and the
                     ASR's words (the `transcript` input, mofa_omni.voice.endpointing), each
                     where configured, all of them agreeing; default MIN_SILENCE_MS (no judges)
    LANGUAGE         language set on each TranscriptionRequest ("" = the ASR's choice)

Inputs:
    audio            AudioChunk stream, any sample rate (resampled to 16 kHz here). Empty chunks
                     and silence produce nothing; a chunk with final=true ends the stream, so
                     speech still open is sent as an utterance at once. Declare it with
                     `queue_size` and `queue_policy: backpressure` so dora does not drop audio.
Outputs:
    utterance        TranscriptionRequest, 16 kHz: request_id `utt-N` (N = 1, 2, ... for the
                     node's lifetime), origin_ns = when the speech ended (on the clock of the
                     audio chunks' origin_ns). Snapshots (see PARTIAL_EVERY_MS) go before it
                     under the same request id, numbered (seq 0, 1, ...) and `final: false`:
                     a TranscriptionRequest sent in several messages (mofa_omni.voice.streaming);
                     the pause snapshot's metadata has `pause: true`.
    speech_started   an event (a GenericResult of kind `audio.speech_started`, one row with
                     `index` and `start_s`; read it with mofa_omni.voice.events.read_event), request_id
                     `utt-N` of the utterance it begins, origin_ns = when the speech began. Sent
                     once MIN_SPEECH_MS of speech was heard (for barge-in); exactly one
                     utterance with the same request_id follows.
    error            ErrorReport for an input that is not a valid AudioChunk (kind bad_request),
                     and for audio chunks missing from a stream's seq numbers (kind lost;
                     dora can drop messages under load). The node goes on.
"""

from __future__ import annotations

import logging
import sys
import time

import numpy as np

from mofa_omni.adapters.loading import open_model
from mofa_omni.config import env_choice, env_float, env_str, exit_on_bad_settings
from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ConfigError, ContractError, ErrorKind
from mofa_omni.contract.tasks import AudioChunk, ErrorReport, Transcript, TranscriptionRequest
from mofa_omni.media.audio_stream import StreamResampler
from mofa_omni.node import trace
from mofa_omni.node.host import MessageMeta, dora_node_id
from mofa_omni.node.integrity import CheckedNode
from mofa_omni.voice.endpointing import PauseJudgment, looks_complete
from mofa_omni.voice.events import SPEECH_STARTED, SeqTracker, event
from mofa_omni.voice.vad import (
    FRAME_SAMPLES,
    VAD_RATE,
    SampleClock,
    SpeechStarted,
    StreamingVad,
    VadConfig,
)

log = logging.getLogger("vad")


def config_from_env() -> VadConfig:
    threshold = env_float("THRESHOLD", 0.5, maximum=1)
    neg = env_str("NEG_THRESHOLD", "")
    return VadConfig(threshold=threshold,
                     neg_threshold=env_float("NEG_THRESHOLD", 0.0, maximum=1) if neg else None,
                     min_speech_ms=env_float("MIN_SPEECH_MS", 250),
                     min_silence_ms=env_float("MIN_SILENCE_MS", 600),
                     speech_pad_ms=env_float("SPEECH_PAD_MS", 100),
                     max_utterance_s=env_float("MAX_UTTERANCE_S", 30),
                     partial_every_ms=env_float("PARTIAL_EVERY_MS", 0),
                     transcribe_on_pause=env_choice("TRANSCRIBE_ON_PAUSE", "false",
                                                    ("true", "false")) == "true",
                     complete_silence_ms=env_float("COMPLETE_SILENCE_MS", 0) if env_str(
                         "COMPLETE_SILENCE_MS", "") else None)


def read_chunk(value) -> AudioChunk:
    """The AudioChunk in ``value``; ContractError if it is not one or holds NaN/inf."""
    chunk = arrow.decode(value, AudioChunk)
    if chunk.audio.size and not np.isfinite(chunk.audio).all():
        raise ContractError("AudioChunk: audio contains NaN or infinite samples")
    if not 1000 <= chunk.sample_rate <= 384_000:
        raise ContractError(f"AudioChunk: sample rate {chunk.sample_rate} Hz is out of range")
    return chunk


def warm_up(adapter) -> None:
    """Pay for the slow first calls (ONNX Runtime's first run, importing SciPy's resampler)
    before audio arrives, so the first utterance is not late."""
    StreamResampler(48000, VAD_RATE).push(np.zeros(4800, np.float32))
    adapter.speech_probabilities(np.zeros((1, FRAME_SAMPLES), np.float32))
    adapter.reset()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    node_id = env_str("DORA_NODE_ID", "vad")
    trace_id = dora_node_id("vad")
    with exit_on_bad_settings("vad"):  # bad settings or an unknown model: fail fast
        language = env_str("LANGUAGE", "")
        config = config_from_env()
        adapter = open_model(env_str("MODEL", "silero-vad"))
        if not hasattr(adapter, "speech_probabilities"):
            raise ConfigError(f"model {adapter.spec.name!r} gives no speech probabilities")
        turn_model = open_model(name) if (name := env_str("TURN_MODEL", "")) else None
        if turn_model is not None and not hasattr(turn_model, "turn_end_probability"):
            raise ConfigError(f"model {turn_model.spec.name!r} does not tell turn ends")
    warm_up(adapter)
    if turn_model is not None:  # its first run is slow too
        turn_model.turn_end_probability(np.zeros(VAD_RATE, np.float32))
    vad = StreamingVad(adapter.speech_probabilities, config)
    clock = SampleClock(VAD_RATE)
    gaps = SeqTracker()
    node = CheckedNode()
    log.info("listening with %s (loaded in %.2f s)", adapter.spec.name, adapter.load_seconds)
    snapshots = 0  # sent of the utterance under way: the seq of its next message
    judges = frozenset({"audio"} if turn_model else ()) | frozenset(
        {"words"} if "transcript" in (node.node_config().get("inputs") or {}) else ())
    pause = PauseJudgment("", 0, 0.0, frozenset())  # of the last pause snapshot sent

    def send(events) -> None:
        nonlocal snapshots, pause
        verdicts = []  # utterances the judges of a pause snapshot ended at once
        for item in events:
            request_id = f"utt-{item.index}"
            if isinstance(item, SpeechStarted):
                origin = min(clock.at(round(item.start_s * VAD_RATE)), time.time_ns())
                value = event(SPEECH_STARTED, index=item.index, start_s=item.start_s)
                meta = MessageMeta(request_id, 0, True, origin, time.time_ns())
                node.send_output("speech_started", value, meta.to_dora())
                trace.record(trace_id, "send", "speech_started", meta)
                continue
            if not item.partial:
                log.info("%s: %.2f s of speech (%.2f-%.2f s)", request_id,
                         item.end_s - item.start_s, item.start_s, item.end_s)
            # Faster than real time (a file sent at once) the clock would run ahead of now.
            origin = min(clock.at(round(item.end_s * VAD_RATE)), time.time_ns())
            request = TranscriptionRequest(item.audio, item.sample_rate, language)
            meta = MessageMeta(request_id, snapshots, not item.partial, origin, time.time_ns())
            snapshots = snapshots + 1 if item.partial else 0
            # the pause snapshot says so: a dialogue may ask its words before the turn is sure
            extra = {"pause": True} if item.pause else {}
            node.send_output("utterance", arrow.encode(request), meta.to_dora() | extra)
            trace.record(trace_id, "send", "utterance", meta,
                         audio_s=round(len(item.audio) / item.sample_rate, 3))
            if item.pause and judges:
                pause = PauseJudgment(request_id, origin, item.end_s, judges)
                if turn_model is not None:
                    probability = turn_model.turn_end_probability(item.audio)
                    verdicts += judged("audio", probability > 0.5, f"p={probability:.2f}")
        if verdicts:
            send(verdicts)

    def judged(judge: str, over: bool, why: str) -> list:
        """A judge's verdict on the last pause snapshot: the utterance, if it ends now."""
        verdict = pause.judged(judge, over)
        log.info("%s: %s says the turn %s (%s)", pause.request_id, judge,
                 "is over" if over else "goes on", why)
        return [] if verdict is None else vad.segmenter.pause_heard(pause.end_s, verdict)

    def report_error(meta: MessageMeta, kind: ErrorKind, message: str) -> None:
        log.error("%s: %s", meta.request_id, message)
        report = ErrorReport(meta.request_id, kind, message, node_id)
        node.send_output("error", arrow.encode(report), MessageMeta(
            meta.request_id, 0, True, meta.origin_ns, time.time_ns()).to_dora())

    def heard(meta: MessageMeta, value) -> None:
        """A transcript from the ASR: the words of the last pause snapshot are a judge."""
        if meta.final or (meta.request_id, meta.origin_ns) != (pause.request_id, pause.origin_ns):
            return
        try:
            words = arrow.decode(value, Transcript).text
        except ContractError as error:
            log.error("transcript %s: %s", meta.request_id, error)
            return
        send(judged("words", looks_complete(words), words))

    # dora may deliver STOP before queued inputs: keep reading until the audio ends (not the
    # transcripts: their ASR waits for our utterances to end)
    while (incoming := node.next()) is not None:
        if incoming["type"] == "INPUT_CLOSED" and incoming["id"] == "audio":
            break
        if incoming["type"] != "INPUT":
            continue
        if incoming["id"] == "transcript":
            heard(MessageMeta.from_dora(incoming.get("metadata"), "transcript"), incoming["value"])
            continue
        meta = MessageMeta.from_dora(incoming.get("metadata"), "audio")
        if missing := gaps.observe(meta.request_id, meta.seq, meta.final):
            report_error(meta, ErrorKind.LOST, f"{missing} audio chunks lost before seq "
                         f"{meta.seq} ({gaps.missing} in all)")
        try:
            chunk = read_chunk(incoming["value"])
        except ContractError as error:
            report_error(meta, ErrorKind.BAD_REQUEST, str(error))
            continue
        if chunk.audio.size:
            clock.mark(round(vad.position), meta.origin_ns)
            send(vad.push(chunk.audio, chunk.sample_rate))
        if chunk.final:
            send(vad.flush())
    send(vad.flush())
    adapter.unload()
    if turn_model is not None:
        turn_model.unload()
    return 0


if __name__ == "__main__":
    sys.exit(main())
