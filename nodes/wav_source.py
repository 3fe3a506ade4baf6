"""wav_source: plays WAV files into the graph as streams of AudioChunks, one file per turn.

Configuration (env in the dataflow YAML):
    VOICE_INPUT          a WAV file, or a folder whose *.wav files are the turns in name order
                         (default: $DEFAULT_INPUT of this checkout, else dataflows/samples; a relative
                         path is relative to where dora was started)
    RATE                 rate the audio is sent at, in Hz (default 16000; 0 = each file's own rate)
    CHUNK_MS             length of one chunk (default 100)
    PACE                 realtime (default: one chunk per CHUNK_MS, like a microphone), a speed-up
                         factor (e.g. 10: ten times faster), or fast (no waiting at all). Faster
                         than real time, give the receiving input a queue_size that holds a turn
                         and `queue_policy: backpressure`: on a loaded machine dora otherwise
                         drops messages of a burst (the VAD reports such gaps).
    TRAILING_SILENCE_S   silence sent after each turn so a VAD can close the utterance (default 1.5)
    READY_TIMEOUT_S      longest wait for `ready` before the next turn is sent anyway (default 120)
    TURN_TAKING          wait (default: wait for `ready` when it is connected) or free (send the
                         turns on their own schedule, e.g. to talk over the agent)
    LINGER_S             after the last turn, how long to wait for the graph to finish its reply
                         before exiting (default 10)

Every file is turned into float32 mono (stereo averaged, 8/16/32-bit PCM scaled), resampled to RATE.

Inputs:
    ready   optional, any message: "the reply to the last turn is done". When connected, each turn
            after the first is sent only once a `ready` came (TURN_TAKING=wait), and after the last
            turn the node exits as soon as a `ready` comes after it began (at the latest after
            LINGER_S).
Outputs:
    audio   AudioChunk stream per turn: request_id `turn-N`, seq 0, 1, ...; the turn's last chunk
            (the end of its trailing silence) is final, in the chunk and in the metadata;
            origin_ns = when the chunk was sent.
    error   ErrorReport (kind `bad_request`, request_id `turn-N`) for a file that cannot be read;
            it is logged too, and the node goes on with the next file.
"""

from __future__ import annotations

import logging
import sys
import time

import numpy as np

from mofa_omni.config import env_choice, env_float, env_int, env_pace, exit_on_bad_settings
from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ContractError, ErrorKind
from mofa_omni.contract.tasks import AudioChunk, ErrorReport
from mofa_omni.media.audio_stream import load_turn, split_chunks, wav_turns
from mofa_omni.node.host import MessageMeta
from mofa_omni.node.integrity import CheckedNode
from mofa_omni.voice.events import voice_input

log = logging.getLogger("wav_source")


class Inbox:
    """The node's events while it waits: counts `ready` inputs, notices STOP; ``take_turns``:
    wait for `ready` when it is connected (TURN_TAKING=wait)."""

    def __init__(self, node: CheckedNode, take_turns: bool = True):
        self.node = node
        self.ready = 0
        self.stopped = False
        self.ready_wired = "ready" in (node.node_config().get("inputs") or {})
        self.ready_connected = take_turns and self.ready_wired

    def wait(self, seconds: float, *, for_ready: bool = False) -> bool:
        """Handle events for up to ``seconds``; with ``for_ready``, return True as soon as a
        `ready` is taken. False when the time ran out or the node was stopped."""
        deadline = time.monotonic() + seconds
        while not self.stopped:
            if for_ready and self.ready:
                self.ready -= 1
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            event = self.node.next(timeout=min(left, 0.5))
            if event is None or event["type"] == "STOP":
                self.stopped = True
            elif event["type"] == "INPUT" and event["id"] == "ready":
                self.ready += 1
            elif event["type"] == "INPUT_CLOSED" and event["id"] == "ready":
                self.ready_connected = self.ready_wired = False
                return False
        return False


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with exit_on_bad_settings("wav_source"):  # fail fast, before joining the graph
        input_path = voice_input()
        turns = wav_turns(input_path)
        rate = env_int("RATE", 16000)
        chunk_ms = env_float("CHUNK_MS", 100, minimum=1)
        speed = env_pace("PACE")
        trailing_s = env_float("TRAILING_SILENCE_S", 1.5)
        ready_timeout = env_float("READY_TIMEOUT_S", 120)
        linger = env_float("LINGER_S", 10)
        take_turns = env_choice("TURN_TAKING", "wait", ("wait", "free")) == "wait"
    if not turns:
        log.warning("no .wav files in %s", input_path)
    node = CheckedNode()
    inbox = Inbox(node, take_turns)
    awaiting_reply = False  # a turn was sent whose `ready` has not come yet
    for number, path in enumerate(turns, start=1):
        request_id = f"turn-{number}"
        if awaiting_reply and inbox.ready_connected:
            if not inbox.wait(ready_timeout, for_ready=True) and not inbox.stopped:
                log.warning("no `ready` after %.0f s; sending %s anyway", ready_timeout, request_id)
            awaiting_reply = False
        if inbox.stopped:
            break
        try:
            audio, file_rate = load_turn(path, rate or None)
        except ContractError as error:
            log.error("%s: %s", request_id, error)
            report = ErrorReport(request_id, ErrorKind.BAD_REQUEST, str(error), "wav_source")
            node.send_output("error", arrow.encode(report), MessageMeta(
                request_id, 0, True, time.time_ns(), time.time_ns()).to_dora())
            continue
        log.info("%s: %s (%.2f s at %d Hz)", request_id, path.name, len(audio) / file_rate,
                 file_rate)
        if number == len(turns) and not inbox.ready_connected:
            inbox.ready = 0  # free turns: only the last turn's `ready` ends the wait below
        silence = np.zeros(round(trailing_s * file_rate), np.float32)
        chunks = split_chunks(np.concatenate([audio, silence]), file_rate, chunk_ms)
        started = time.monotonic()
        for seq, piece in enumerate(chunks):
            if speed != float("inf"):  # an absolute schedule: waiting for events never drifts
                inbox.wait(started + seq * chunk_ms / 1000 / speed - time.monotonic())
            if inbox.stopped:
                break
            final = seq == len(chunks) - 1
            now = time.time_ns()
            node.send_output("audio", arrow.encode(AudioChunk(piece, file_rate, final)),
                             MessageMeta(request_id, seq, final, now, now).to_dora())
        awaiting_reply = True
    if awaiting_reply and not inbox.stopped:
        inbox.wait(linger, for_ready=inbox.ready_wired)
    return 0


if __name__ == "__main__":
    sys.exit(main())
