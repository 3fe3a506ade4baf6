"""Small pieces shared by the voice nodes (nodes/wav_source.py, vad.py, wav_sink.py, printer.py).

- configuration read from the environment, with errors that name the variable, and
  sounddevice (PortAudio) with a message saying what to install when it is missing;
- *events*: tiny messages with no payload of their own (``audio.speech_started``,
  ``audio.done``) travel as the contract's :class:`GenericResult` with a one-row batch;
- recognising which contract message an Arrow array is, and describing it in one line;
- joining text streams per request, and counting sequence gaps.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from mofa_omni.config import data_path, env_path, env_str, output_path
from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ConfigError
from mofa_omni.contract.tasks import (
    AudioChunk,
    ErrorReport,
    GenericResult,
    TextChunk,
    Transcript,
    TranscriptionRequest,
)

SPEECH_STARTED = "audio.speech_started"  # the VAD heard speech begin (barge-in)
DONE = "audio.done"  # a sink finished a request (e.g. wrote or played a reply)
# A reply asked before its turn is sure (the dialogue's speculation) is *held*: its id says so,
# and a sink keeps its audio until the dialogue's `release` names it (or a cancel drops it).
HELD_SUFFIX = "~held"


def held_id(reply_id: str) -> str:
    """The id of ``reply_id`` asked as a held reply."""
    return reply_id + HELD_SUFFIX


def is_held(request_id: str) -> bool:
    """Whether a sink must keep this request's audio until it is released."""
    return request_id.endswith(HELD_SUFFIX)


# A Realtime client's session, told to the dialogue (nodes/realtime.py -> its `control` input)
SESSION_OPENED = "voice.session_opened"  # fields: instructions, max_tokens, temperature
SESSION_CLOSED = "voice.session_closed"
SETTINGS = "voice.settings"  # fields as SESSION_OPENED
INTERRUPT = "voice.interrupt"  # the client's response.cancel
TRUNCATE = "voice.truncate"  # fields: reply_id, text (what the client played of it)


def voice_input(env: Mapping[str, str] | None = None) -> Path:
    """The turns' WAVs: $VOICE_INPUT, else $DEFAULT_INPUT (a dataflow's own samples), else
    dataflows/samples (found as :func:`mofa_omni.config.data_path` finds data)."""
    default = env_str("DEFAULT_INPUT", "", env) or "dataflows/samples"
    return env_path("VOICE_INPUT", data_path(default), env)


def voice_output(env: Mapping[str, str] | None = None) -> Path:
    """Where replies go: $VOICE_OUTPUT, else $DEFAULT_OUTPUT, else out/voice (under this checkout
    when run from one, else under the folder dora was started in)."""
    default = env_str("DEFAULT_OUTPUT", "", env) or "out/voice"
    return env_path("VOICE_OUTPUT", output_path(default), env)


SOUNDDEVICE_HELP = ("install it with `pip install sounddevice`; on Linux it also needs PortAudio "
                    "(`sudo apt-get install libportaudio2`)")


def load_sounddevice():
    """The ``sounddevice`` module (PortAudio), or ConfigError saying what to install."""
    try:
        import sounddevice
    except ImportError:
        raise ConfigError(f"sounddevice is not installed: {SOUNDDEVICE_HELP}") from None
    except OSError as error:  # the module is there, the PortAudio library is not
        raise ConfigError(f"PortAudio is not available ({error}): {SOUNDDEVICE_HELP}") from None
    return sounddevice


# --- events ------------------------------------------------------------------------

def event(kind: str, **fields: Any) -> pa.StructArray:
    """A one-row event message, e.g. ``event(SPEECH_STARTED, start_s=1.2)``, Arrow-encoded."""
    batch = pa.RecordBatch.from_pylist([fields or {"at_ns": time.time_ns()}])
    return arrow.encode(GenericResult(kind, batch))


def read_event(value: pa.Array) -> tuple[str, dict[str, Any]]:
    """(kind, fields) of an event message; raises ContractError if it is not one."""
    result = arrow.decode(value, GenericResult)
    rows = result.batch.to_pylist()
    return result.kind, rows[0] if rows else {}


# --- recognising and describing messages ------------------------------------------

_KNOWN = (Transcript, TextChunk, ErrorReport, AudioChunk, TranscriptionRequest)


def identify(value: pa.Array) -> type | None:
    """The contract message type whose schema ``value`` has (GenericResult for any generic
    message), or None."""
    kind = value.type
    for message_type in _KNOWN:
        if kind.equals(arrow.schema_of(message_type)):
            return message_type
    if pa.types.is_struct(kind) and {f.name for f in kind} == {"kind", "rows"}:
        return GenericResult
    return None


@dataclass
class _Pending:
    text: list[str] = field(default_factory=list)
    seconds: float = 0.0


class MessageLog:
    """Turns incoming messages into lines to print: one per complete message, streams
    (TextChunk, AudioChunk) joined per request id and shown on their final piece."""

    def __init__(self) -> None:
        self._pending: dict[tuple[str, str], _Pending] = {}

    def describe(self, input_id: str, value: pa.Array, request_id: str) -> str | None:
        """What to print for this message (None while a stream is incomplete)."""
        message_type = identify(value)
        if message_type is None:
            return f"[{input_id}] {request_id}: unrecognised message of type {value.type}"
        message = arrow.decode(value, message_type)
        head = f"[{input_id}] {request_id}:"
        match message:
            case Transcript(text=text):
                return f"{head} heard: {text.strip()}"
            case ErrorReport(kind=kind, message=text, node=node):
                return f"{head} error ({kind}{' from ' + node if node else ''}): {text}"
            case TranscriptionRequest(audio=audio, sample_rate=rate):
                return f"{head} utterance {len(audio) / rate:.2f} s at {rate} Hz"
            case GenericResult(kind=kind, batch=batch):
                fields = ", ".join(f"{k}={v}" for k, v in (batch.to_pylist() or [{}])[0].items())
                return f"{head} {kind} {fields}".rstrip()
            case TextChunk(text=text, final=chunk_final):
                pending = self._pending.setdefault((input_id, request_id), _Pending())
                pending.text.append(text)
                if not chunk_final:
                    return None
                del self._pending[(input_id, request_id)]
                return f"{head} says: {''.join(pending.text).strip()}"
            case AudioChunk(audio=audio, sample_rate=rate, final=chunk_final, text=text):
                pending = self._pending.setdefault((input_id, request_id), _Pending())
                pending.seconds += len(audio) / rate
                if text:
                    pending.text.append(text)
                if not chunk_final:
                    return None
                del self._pending[(input_id, request_id)]
                spoken = " ".join(pending.text)
                return f"{head} audio {pending.seconds:.2f} s" + (f": {spoken}" if spoken else "")
        return f"{head} {type(message).__name__}"


class SeqTracker:
    """Counts messages missing from each request's stream (dora drops under congestion)."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}
        self.missing = 0

    def observe(self, request_id: str, seq: int, final: bool) -> int:
        """How many messages were skipped just before this one (0 when in order)."""
        expected = self._next.get(request_id, 0)
        gap = max(0, seq - expected)
        self.missing += gap
        if final:
            self._next.pop(request_id, None)
        else:
            self._next[request_id] = max(expected, seq + 1)
        return gap
