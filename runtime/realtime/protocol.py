"""The OpenAI Realtime API's wire format, as far as a voice graph serves it.

Two dialects of the protocol are spoken: the GA one (``client.realtime.connect`` in the
official client) and the beta one, which clients choose with the ``OpenAI-Beta: realtime=v1``
header (``client.beta.realtime.connect``). They differ in a few event names
(``response.output_audio.delta`` against ``response.audio.delta``…) and in the shape of the
session object; :class:`Dialect` holds the differences, everything else is shared.

A ``session.update`` is read into :class:`SessionConfig`, the settings the graph honours:
its instructions, reply length and temperature go to the dialogue, whether to transcribe the
user's speech stays here. Whatever else the client sets is refused by name (an ``error`` event
with ``param``) unless it asks for what the graph does anyway, and a refused update changes
nothing, as OpenAI's server does.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mofa_omni.contract.errors import ContractError

RATE = 24_000  # the API's PCM rate, both ways
MAX_EVENT_BYTES = 16 << 20  # a larger WebSocket message closes the connection (1009)


class ProtocolError(ContractError):
    """A client event the server refuses (the caller's error): sent back as an ``error``
    event."""

    def __init__(self, message: str, *, code: str = "invalid_request", param: str | None = None,
                 event_id: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.code, self.param, self.event_id, self.kind = code, param, event_id, kind


@dataclass(frozen=True, slots=True)
class Dialect:
    """Where the GA and beta protocols differ."""

    beta: bool

    def name(self, event: str) -> str:
        """The event's name in this dialect, from its GA name."""
        return BETA_NAMES.get(event, event) if self.beta else event

    @property
    def item_added(self) -> tuple[str, ...]:
        """What announces a new conversation item."""
        return ("conversation.item.created",) if self.beta else ("conversation.item.added",)

    @property
    def audio_part(self) -> str:
        """The content type of the assistant's spoken reply."""
        return "audio" if self.beta else "output_audio"


BETA_NAMES = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
}


@dataclass(frozen=True, slots=True)
class TurnDetection:
    """The graph's VAD, as the session reports it (its settings are the VAD node's env)."""

    threshold: float = 0.5
    prefix_padding_ms: int = 100
    silence_duration_ms: int = 600


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """A session's settings: the ones a client may change, and what the graph is."""

    instructions: str = ""  # "" = the dialogue's own system prompt
    max_tokens: int = 0  # 0 = the dialogue's default
    temperature: float = 0.0
    transcribe: bool = True  # send the user's words (input_audio_transcription)
    model: str = ""  # what the client called the model: reported back
    voice: str = ""  # the graph's TTS, reported
    transcription_model: str = ""  # the graph's ASR, reported
    turn_detection: TurnDetection = field(default_factory=TurnDetection)


def decode_event(text: str | bytes) -> dict[str, Any]:
    """A client event: a JSON object with a string ``type``; ProtocolError otherwise."""
    try:
        event = json.loads(text)
    except (ValueError, UnicodeDecodeError) as error:
        raise ProtocolError(f"the message is not JSON: {error}", code="invalid_json") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise ProtocolError("an event is a JSON object with a string 'type'",
                            code="invalid_event", param="type")
    event_id = event.get("event_id")
    if event_id is not None and not isinstance(event_id, str):
        raise ProtocolError("'event_id' must be a string", code="invalid_event",
                            param="event_id")
    return event


def decode_audio(encoded: Any, event_id: str | None, max_samples: int) -> np.ndarray:
    """The float32 samples of an ``input_audio_buffer.append``'s base64 PCM16 (little-endian,
    mono, 24 kHz); ProtocolError for anything else or more than ``max_samples``."""
    if not isinstance(encoded, str):
        raise ProtocolError("'audio' must be a base64 string of 16-bit PCM", param="audio",
                            code="invalid_audio", event_id=event_id)
    if len(encoded) * 3 // 4 > 2 * max_samples:
        raise ProtocolError(f"one append holds at most {max_samples / RATE:g} s of audio "
                            f"({max_samples} samples)", param="audio", code="audio_too_long",
                            event_id=event_id)
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ProtocolError(f"'audio' is not base64: {error}", param="audio",
                            code="invalid_audio", event_id=event_id) from None
    if len(raw) % 2:
        raise ProtocolError(f"'audio' holds {len(raw)} bytes: 16-bit PCM has an even number",
                            param="audio", code="invalid_audio", event_id=event_id)
    return np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0


def encode_audio(audio: np.ndarray) -> str:
    """float32 samples as base64 PCM16, for ``response.output_audio.delta``."""
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")
    return base64.b64encode(pcm.tobytes()).decode("ascii")


# --- session.update --------------------------------------------------------------------------

_PCM_NAMES = ("pcm16", None)  # beta's name of the only format served


def _refuse(param: str, message: str, event_id: str | None) -> ProtocolError:
    return ProtocolError(message, code="unsupported_parameter", param=f"session.{param}",
                         event_id=event_id)


class _Reader:
    """Reads one ``session`` object field by field; what is left unread is refused."""

    def __init__(self, session: dict[str, Any], event_id: str | None, path: str = ""):
        self.fields, self.event_id, self.path = dict(session), event_id, path

    def take(self, name: str, default: Any = None) -> Any:
        return self.fields.pop(name, default)

    def has(self, name: str) -> bool:
        return name in self.fields

    def refuse(self, name: str, message: str) -> ProtocolError:
        return _refuse(self.path + name, message, self.event_id)

    def nested(self, name: str) -> _Reader | None:
        value = self.take(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.refuse(name, f"'{self.path + name}' must be an object")
        return _Reader(value, self.event_id, f"{self.path}{name}.")

    def finish(self) -> None:
        for name in self.fields:
            raise self.refuse(name, f"'{self.path + name}' is not supported by this server")


def apply_update(config: SessionConfig, session: Any, dialect: Dialect,
                 event_id: str | None = None) -> SessionConfig:
    """``config`` with a ``session.update``'s ``session`` applied; ProtocolError naming the
    first field the graph cannot honour (and then nothing is applied)."""
    if not isinstance(session, dict):
        raise ProtocolError("'session' must be an object", param="session", event_id=event_id)
    reader = _Reader(session, event_id)
    changes: dict[str, Any] = {}
    for name in ("id", "object", "expires_at", "client_secret"):  # echoed back by some clients
        reader.take(name)
    if (model := reader.take("model")) is not None:
        changes["model"] = str(model)
    if (instructions := reader.take("instructions")) is not None:
        if not isinstance(instructions, str):
            raise reader.refuse("instructions", "'instructions' must be a string")
        changes["instructions"] = instructions
    if (temperature := reader.take("temperature")) is not None:
        if not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
            raise reader.refuse("temperature", "'temperature' must be a number from 0 to 2")
        changes["temperature"] = float(temperature)
    for name in ("max_response_output_tokens", "max_output_tokens"):
        if (limit := reader.take(name)) is not None:
            if limit == "inf":
                changes["max_tokens"] = 0
            elif isinstance(limit, int) and not isinstance(limit, bool) and 1 <= limit <= 4096:
                changes["max_tokens"] = limit
            else:
                raise reader.refuse(name, f"'{name}' must be 1 to 4096 or \"inf\"")
    tools = reader.take("tools")
    if tools:
        raise reader.refuse("tools", "this voice graph calls no tools: 'tools' must be empty")
    if reader.take("tool_choice", "auto") not in ("auto", "none"):
        raise reader.refuse("tool_choice", "with no tools, 'tool_choice' is 'auto' or 'none'")
    for name in ("tracing", "input_audio_noise_reduction", "prompt", "include"):
        if reader.take(name) is not None:
            raise reader.refuse(name, f"'{name}' is not supported by this server")
    if reader.take("truncation", "auto") != "auto":
        raise reader.refuse("truncation", "only the 'auto' truncation is served")
    if dialect.beta:
        _beta_audio(reader, config, changes)
    else:
        _ga_audio(reader, config, changes)
    reader.finish()
    return dataclasses.replace(config, **changes)


def _modalities(reader: _Reader, name: str) -> None:
    value = reader.take(name)
    if value is not None and (not isinstance(value, list) or "audio" not in value):
        raise reader.refuse(name, f"this voice graph answers aloud: '{name}' must include "
                                  "'audio'")


def _voice(reader: _Reader, config: SessionConfig, name: str = "voice") -> None:
    voice = reader.take(name)
    if voice is not None and voice != config.voice:
        raise reader.refuse(name, f"the graph speaks with {config.voice!r} only "
                                  f"(its TTS node's MODEL), not {voice!r}")


def _speed(reader: _Reader) -> None:
    speed = reader.take("speed")
    if speed is not None and speed != 1:
        raise reader.refuse("speed", "only speed 1.0 is served")


def _transcription(reader: _Reader, name: str, config: SessionConfig,
                   changes: dict[str, Any]) -> None:
    if not reader.has(name):
        return
    transcription = reader.nested(name)
    if transcription is None:  # null: the client wants no transcripts of its speech
        changes["transcribe"] = False
        return
    transcription.take("model")  # the graph's ASR transcribes; session.updated names it
    for option in ("language", "prompt"):
        if transcription.take(option):
            raise transcription.refuse(option, f"'{option}' is set on the ASR node, not per "
                                               "session")
    transcription.finish()
    changes["transcribe"] = True


def _turn_detection(reader: _Reader, name: str, config: SessionConfig) -> None:
    if not reader.has(name):
        return
    detection = reader.nested(name)
    if detection is None:
        raise reader.refuse(name, "turns are found by the graph's VAD: 'turn_detection' "
                                  "cannot be null (manual commits are not served)")
    if detection.take("type", "server_vad") != "server_vad":
        raise detection.refuse("type", "only 'server_vad' turn detection is served")
    ours = config.turn_detection
    for option, value in (("threshold", ours.threshold),
                          ("prefix_padding_ms", ours.prefix_padding_ms),
                          ("silence_duration_ms", ours.silence_duration_ms)):
        wanted = detection.take(option)
        if wanted is not None and (not isinstance(wanted, int | float)
                                   or not math.isclose(wanted, value)):
            raise detection.refuse(option, f"'{option}' is {value} (set on the VAD node of "
                                           f"the graph), not {wanted}")
    for option in ("create_response", "interrupt_response"):
        if detection.take(option, True) is not True:
            raise detection.refuse(option, f"'{option}' is always true here")
    if detection.take("idle_timeout_ms") is not None:
        raise detection.refuse("idle_timeout_ms", "'idle_timeout_ms' is not supported")
    detection.finish()


def _format(reader: _Reader, name: str, beta: bool) -> None:
    value = reader.take(name)
    if beta:
        if value not in _PCM_NAMES:
            raise reader.refuse(name, f"only 'pcm16' (24 kHz) audio is served, not {value!r}")
        return
    if value is None:
        return
    if not isinstance(value, dict) or value.get("type", "audio/pcm") != "audio/pcm" \
            or value.get("rate", RATE) != RATE or set(value) - {"type", "rate"}:
        raise reader.refuse(name, f"only 16-bit PCM at {RATE} Hz ('audio/pcm') is served, "
                                  f"not {value!r}")


def _beta_audio(reader: _Reader, config: SessionConfig, changes: dict[str, Any]) -> None:
    _modalities(reader, "modalities")
    _voice(reader, config)
    _speed(reader)
    _format(reader, "input_audio_format", beta=True)
    _format(reader, "output_audio_format", beta=True)
    _transcription(reader, "input_audio_transcription", config, changes)
    _turn_detection(reader, "turn_detection", config)


def _ga_audio(reader: _Reader, config: SessionConfig, changes: dict[str, Any]) -> None:
    if reader.take("type", "realtime") != "realtime":
        raise reader.refuse("type", "only 'realtime' sessions are served (no transcription-only "
                                    "sessions)")
    _modalities(reader, "output_modalities")
    audio = reader.nested("audio")
    if audio is None:
        return
    if (heard := audio.nested("input")) is not None:
        _format(heard, "format", beta=False)
        _transcription(heard, "transcription", config, changes)
        _turn_detection(heard, "turn_detection", config)
        if heard.take("noise_reduction") is not None:
            raise heard.refuse("noise_reduction", "'noise_reduction' is not supported")
        heard.finish()
    if (spoken := audio.nested("output")) is not None:
        _format(spoken, "format", beta=False)
        _voice(spoken, config)
        _speed(spoken)
        spoken.finish()
    audio.finish()


def session_object(config: SessionConfig, session_id: str, dialect: Dialect) -> dict[str, Any]:
    """The session as ``session.created`` / ``session.updated`` report it."""
    detection = {"type": "server_vad", **dataclasses.asdict(config.turn_detection),
                 "create_response": True, "interrupt_response": True}
    transcription = {"model": config.transcription_model} if config.transcribe else None
    limit = config.max_tokens or "inf"
    common = {"id": session_id, "object": "realtime.session", "model": config.model,
              "instructions": config.instructions, "tools": [], "tool_choice": "auto"}
    if dialect.beta:
        return {**common, "modalities": ["text", "audio"], "voice": config.voice,
                "input_audio_format": "pcm16", "output_audio_format": "pcm16",
                "input_audio_transcription": transcription, "turn_detection": detection,
                "temperature": config.temperature, "max_response_output_tokens": limit}
    pcm = {"type": "audio/pcm", "rate": RATE}
    return {**common, "type": "realtime", "output_modalities": ["audio"],
            "audio": {"input": {"format": pcm, "transcription": transcription,
                                "turn_detection": detection, "noise_reduction": None},
                      "output": {"format": pcm, "voice": config.voice, "speed": 1.0}},
            "max_output_tokens": limit}


def error_event(error: ProtocolError) -> dict[str, Any]:
    """The ``error`` event telling the client why its event was refused."""
    return {"type": "error", "error": {"type": error.kind, "code": error.code,
                                       "message": str(error), "param": error.param,
                                       "event_id": error.event_id}}
