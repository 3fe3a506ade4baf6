"""wav_sink: writes each request's audio into its own WAV file, or plays it on the speaker.

Configuration (env in the dataflow YAML):
    SINK          file (default) | speaker
    PLAYBACK      instant (default) | realtime: in file mode, when `done` is sent — as soon as
                  the file is written, or when a speaker would have finished playing it (so
                  turn-taking and barge-in behave as with a speaker)
    VOICE_OUTPUT  folder of the WAV files (default: $DEFAULT_OUTPUT of this checkout, else
                  out/voice; a relative path is relative to where dora was started)
    PREFIX        file name prefix (default reply): reply-001.wav, reply-002.wav, ... numbered in
                  the order the requests begin

Inputs:
    audio   AudioChunk streams with request_id metadata (a TTS node's `result`, or an omni
            node's, whose TextChunks are skipped); a request's
            final chunk closes its file. A TranscriptionRequest (e.g. a VAD `utterance`) counts as
            one whole, final chunk.
    release optional, request ids of held replies (their id ends with "~held": a dialogue asked
            them before the turn was sure, see its SPECULATE): their audio is kept until the id
            comes here, then written or played as if it arrived now; a cancel drops it
    cancel  optional, request ids (barge-in): the request's file is closed as it is (or its
            queued audio is not played), and its later chunks are ignored. Once it closes (the
            dialogue sending it has ended, which it does only after its last reply was spoken)
            and no reply is open, the node ends without waiting for `audio` to close: across
            machines dora 1.1.0 sometimes never tells a node that a remote input closed (seen
            with the TTS on another machine, after that machine's daemon restarted).
Outputs:
    done    event `audio.done` (a GenericResult, read it with mofa_omni.voice.events.read_event; fields
            `path` and `seconds`) with the request's request_id and origin_ns, sent once its file
            is closed or its audio has been played. Connect it to wav_source's `ready` to take
            turns.

Speaker mode needs sounddevice (PortAudio) and an output device; without them the node exits
with code 2 and one line saying what is missing.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

from mofa_omni.config import env_choice, env_str, exit_on_bad_settings
from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ConfigError, ContractError
from mofa_omni.contract.tasks import AudioChunk, TextChunk, TranscriptionRequest
from mofa_omni.media.audio_stream import PlaybackClock, WavWriterSet
from mofa_omni.node import trace
from mofa_omni.node.host import MessageMeta, dora_node_id
from mofa_omni.node.integrity import CheckedNode
from mofa_omni.node.serving import CANCEL_INPUT, cancelled_ids
from mofa_omni.voice.events import (
    DONE,
    SeqTracker,
    event,
    identify,
    is_held,
    load_sounddevice,
    voice_output,
)

log = logging.getLogger("wav_sink")

Done = Callable[[MessageMeta, str, float], None]


def read_audio(value) -> tuple[np.ndarray, int, bool] | None:
    """(audio, rate, final) of an AudioChunk, or of a TranscriptionRequest (one final chunk);
    None for a TextChunk (an omni reply's words, which are not for the sink)."""
    kind = identify(value)
    if kind is TextChunk:
        return None
    if kind is AudioChunk:
        chunk = arrow.decode(value, AudioChunk)
        return chunk.audio, chunk.sample_rate, chunk.final
    if kind is TranscriptionRequest:
        request = arrow.decode(value, TranscriptionRequest)
        return request.audio, request.sample_rate, True
    raise ContractError(f"expected an AudioChunk or a TranscriptionRequest, got {value.type}")


class Speaker:
    """Plays chunks in order on a worker thread (one output stream per sample rate)."""

    def __init__(self, sd, done: Done):
        self.sd, self.done = sd, done
        self._queue: queue.Queue = queue.Queue()
        self._played: dict[str, float] = {}
        self.cancelled: set[str] = set()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def play(self, meta: MessageMeta, audio: np.ndarray, rate: int, final: bool) -> None:
        self._queue.put((meta, audio, rate, final))

    def close(self) -> None:
        """Let everything queued finish playing."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        stream = None
        while (item := self._queue.get()) is not None:
            meta, audio, rate, final = item
            if meta.request_id in self.cancelled:
                continue
            if stream is None or stream.samplerate != rate:
                if stream is not None:
                    stream.close()
                stream = self.sd.OutputStream(samplerate=rate, channels=1, dtype="float32")
                stream.start()
            if audio.size:
                stream.write(np.ascontiguousarray(audio.reshape(-1, 1)))
            seconds = self._played.pop(meta.request_id, 0.0) + len(audio) / rate
            if final:
                self.done(meta, "speaker", seconds)
            else:
                self._played[meta.request_id] = seconds
        if stream is not None:
            stream.close()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with exit_on_bad_settings("wav_sink"):
        mode = env_choice("SINK", "file", ("file", "speaker"))
        realtime = env_choice("PLAYBACK", "instant", ("instant", "realtime")) == "realtime"
        prefix = env_str("PREFIX", "reply")
        out_dir = voice_output()
        if mode == "speaker":
            sd = load_sounddevice()
            try:
                sd.query_devices(kind="output")
            except (ValueError, sd.PortAudioError) as error:
                raise ConfigError(f"no audio output device ({error}); use SINK=file") from None
    node = CheckedNode()
    node_id = dora_node_id("sink")

    def done(meta: MessageMeta, path: str, seconds: float) -> None:
        log.info("%s: %s (%.2f s)", meta.request_id, path, seconds)
        out = MessageMeta(meta.request_id, 0, True, meta.origin_ns, time.time_ns())
        node.send_output("done", event(DONE, path=path, seconds=seconds), out.to_dora())
        trace.record(node_id, "send", "done", out)

    speaker = Speaker(sd, done) if mode == "speaker" else None
    files = WavWriterSet(out_dir, prefix)
    clock = PlaybackClock() if realtime else None
    due: list[tuple[float, MessageMeta, str, float]] = []  # `done`s waiting for the playback
    gaps = SeqTracker()
    cancelled: set[str] = speaker.cancelled if speaker is not None else set()
    conversation_over = False  # `cancel` closed
    held: dict[str, list[tuple[MessageMeta, dict, np.ndarray, int, bool]]] = {}  # until released
    released: set[str] = set()

    def take(meta: MessageMeta, metadata: dict, audio: np.ndarray, rate: int, final: bool,
             now: float) -> None:
        """One chunk of a reply that may be heard now: written (or played)."""
        trace.record(node_id, "recv", "audio", metadata, audio_s=round(len(audio) / rate, 4))
        if final:
            released.discard(meta.request_id)
        if speaker is not None:
            speaker.play(meta, audio, rate, final)
            return
        played_at = clock.add(meta.request_id, len(audio) / rate, now) if clock else now
        if (closed := files.write(meta.request_id, audio, rate, final)) is not None:
            if clock:
                clock.forget(meta.request_id)
            if played_at <= now:
                done(meta, str(closed[0]), closed[1])
            else:
                due.append((played_at, meta, str(closed[0]), closed[1]))
    while (incoming := node.next(timeout=0.05) if due else node.next()) is not None:
        now = time.monotonic()
        for entry in [d for d in due if d[0] <= now]:
            due.remove(entry)
            done(*entry[1:])
        if incoming["type"] == "INPUT_CLOSED" and incoming["id"] == CANCEL_INPUT:
            conversation_over = True
        if conversation_over and not due and not files.open_requests():
            log.info("the conversation is over (cancel closed) and every reply was written")
            break
        if incoming["type"] != "INPUT":
            continue
        if incoming["id"] == "release":
            for request_id in cancelled_ids(incoming["value"]):
                released.add(request_id)
                for chunk in held.pop(request_id, []):
                    take(*chunk, now)
            continue
        if incoming["id"] == CANCEL_INPUT:
            for request_id in cancelled_ids(incoming["value"]):
                cancelled.add(request_id)
                held.pop(request_id, None)
                due[:] = [d for d in due if d[1].request_id != request_id]
                if (closed := files.close(request_id)) is not None:
                    log.info("%s: cancelled, %s kept as it was", request_id, closed[0])
            continue
        meta = MessageMeta.from_dora(incoming.get("metadata"), "audio")
        if meta.request_id in cancelled:
            continue
        if missing := gaps.observe(meta.request_id, meta.seq, meta.final):
            log.warning("%s: %d audio chunks lost before seq %d", meta.request_id, missing,
                        meta.seq)
        try:
            read = read_audio(incoming["value"])
        except ContractError as error:
            log.error("%s: %s", meta.request_id, error)
            continue
        if read is None:  # an omni reply's words: not for us
            continue
        audio, rate, chunk_final = read
        # A reply spoken sentence by sentence is one stream: the metadata says where it ends.
        chunk = (meta, incoming.get("metadata") or {}, audio, rate, chunk_final and meta.final)
        if is_held(meta.request_id) and meta.request_id not in released:
            held.setdefault(meta.request_id, []).append(chunk)
        else:
            take(*chunk, now)
    for _, meta, path, seconds in due:  # the stream ended: say so now
        done(meta, path, seconds)
    if speaker is not None:
        speaker.close()
    for path, seconds in files.close_all():
        log.info("%s (%.2f s) closed at the end of the stream", path, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
