"""One Realtime client's conversation with the voice graph, as a pure state machine.

:class:`Conversation` takes the client's events (:meth:`Conversation.receive`) and what the
graph says (the VAD's speech events, the ASR's transcripts, the LLM's words, the TTS's audio,
the dialogue's cancels) and returns what to do: Realtime server events for the client
(plain dicts, the wire format) and messages for the graph (:class:`Listen`, :class:`Tell`).
The node (nodes/realtime.py) only carries them; every rule is here, tested without a graph.

How the graph's stream maps onto the protocol:

- the user's audio goes to the VAD as it comes; the VAD's ``speech_started`` is
  ``input_audio_buffer.speech_started`` (and opens the user's item), its utterance is
  ``speech_stopped`` + ``committed``; the ASR's partial transcripts are
  ``conversation.item.input_audio_transcription.delta`` (settled words only: they never
  change), its final one ``.completed``;
- the dialogue's reply ``reply-N`` is one response: its first words open it, the LLM's
  text is ``response.output_audio_transcript.delta``, the TTS's audio (at 24 kHz)
  ``response.output_audio.delta``, the TTS's last chunk completes it;
- a *held* reply (the dialogue asked the words of a pause before the turn was sure:
  mofa_omni.voice.events.is_held) is kept here until the dialogue releases it, then shown
  as if it came then; cancelled before that, the client never hears of it;
- a cancel from the dialogue (the user barged in, or the client sent ``response.cancel``)
  ends the response as ``cancelled``; the client's ``conversation.item.truncate`` cuts the
  reply's text in the dialogue's history to what was heard.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mofa_omni.media.audio_stream import StreamResampler
from mofa_omni.realtime.protocol import (
    RATE,
    Dialect,
    ProtocolError,
    SessionConfig,
    apply_update,
    decode_audio,
    decode_event,
    encode_audio,
    error_event,
    session_object,
)
from mofa_omni.voice import events as voice
from mofa_omni.voice.events import is_held

DELTA_S = 0.2  # the longest audio delta sent: the client can start and truncate finely

Event = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Listen:
    """Audio for the graph's VAD (float32 at :data:`RATE`); ``final`` ends the stream."""

    audio: np.ndarray
    final: bool = False


@dataclass(frozen=True, slots=True)
class Tell:
    """A control event for the dialogue (mofa_omni.voice.events ``voice.*`` kinds)."""

    kind: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Spoken:
    """The reply ``reply_id`` will have been played by the client at ``at`` (monotonic s):
    tell the dialogue it was spoken then."""

    reply_id: str
    at: float


Action = Listen | Tell | Spoken


@dataclass
class _UserItem:
    item_id: str
    start_ms: int = 0  # in the session's audio
    said: str = ""  # the words sent in transcription deltas so far
    committed: bool = False


@dataclass
class _Response:
    response_id: str
    item_id: str
    resampler: StreamResampler | None = None
    text: str = ""
    samples: int = 0  # sent to the client, at RATE
    generated: bool = False
    started_at: float | None = None  # when its first audio went out (monotonic s)


@dataclass
class Outcome:
    """What one input asks for: events for the client, actions for the graph."""

    events: list[Event] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)


@dataclass
class Limits:
    max_ahead_s: float = 30.0  # how far the audio received may run ahead of the clock


class Conversation:
    """One client's session (see the module's docstring)."""

    def __init__(self, session_id: str, dialect: Dialect, config: SessionConfig,
                 limits: Limits | None = None):
        self.session_id, self.dialect, self.config = session_id, dialect, config
        self.limits = limits or Limits()
        self._event_ids = itertools.count(1)
        self._users: dict[str, _UserItem] = {}  # utterance id -> the user's item
        self._responses: dict[str, _Response] = {}  # reply id -> its open response
        self._closed: dict[str, tuple[str, int, str]] = {}  # item id -> reply, samples, text
        self._cancelled: set[str] = set()  # replies cancelled before their first message
        self._cancel_reason = "turn_detected"  # of the next cancel: barge-in, or the client
        self._held: dict[str, list[tuple[str, tuple[Any, ...]]]] = {}  # reply -> its messages
        self._released: set[str] = set()
        self._last_item: str | None = None
        self._audio_s = 0.0  # received from the client
        self._first_audio_at: float | None = None
        self.stream_offset_s = 0.0  # the VAD's position when this session began

    def ids(self) -> set[str]:
        """The utterances and replies of the graph this session heard of: once it is over,
        what the graph still says of them is not the next session's."""
        return {*self._users, *self._responses, *self._cancelled, *self._held, *self._released,
                *(reply for reply, _, _ in self._closed.values())}

    # --- the client ------------------------------------------------------------------------

    def opened(self) -> Outcome:
        """The connection is up: the session as it is, and the dialogue told to start over."""
        return Outcome([self._event("session.created", session=self._session())],
                       [Tell(voice.SESSION_OPENED, self._settings())])

    def closed(self) -> Outcome:
        """The client went away: the VAD's stream ends, the dialogue stops what it does."""
        return Outcome([], [Listen(np.zeros(0, np.float32), final=True),
                            Tell(voice.SESSION_CLOSED)])

    def receive(self, text: str | bytes, now: float) -> Outcome:
        """One client event; a refused one is answered with an ``error`` event."""
        try:
            event = decode_event(text)
            handler = self._handlers.get(event["type"])
            if handler is None:
                raise ProtocolError(f"unknown event type {event['type']!r}",
                                    code="unknown_event", param="type",
                                    event_id=event.get("event_id"))
            return handler(self, event, now)
        except ProtocolError as error:
            return Outcome([self._stamp(error_event(error))])

    def _update(self, event: Event, now: float) -> Outcome:
        self.config = apply_update(self.config, event.get("session"), self.dialect,
                                   event.get("event_id"))
        return Outcome([self._event("session.updated", session=self._session())],
                       [Tell(voice.SETTINGS, self._settings())])

    def _append(self, event: Event, now: float) -> Outcome:
        event_id = event.get("event_id")
        audio = decode_audio(event.get("audio"), event_id,
                             round(self.limits.max_ahead_s * RATE))
        if self._first_audio_at is None:
            self._first_audio_at = now
        ahead = self._audio_s + audio.size / RATE - (now - self._first_audio_at)
        if ahead > self.limits.max_ahead_s:
            raise ProtocolError(
                f"audio is coming {ahead:.1f} s ahead of real time; at most "
                f"{self.limits.max_ahead_s:g} s is buffered: this append is dropped",
                code="input_audio_buffer_overflow", param="audio", event_id=event_id)
        self._audio_s += audio.size / RATE
        return Outcome([], [Listen(audio)] if audio.size else [])

    def _cancel(self, event: Event, now: float) -> Outcome:
        if not self._responses:
            raise ProtocolError("no response is in progress", code="response_cancel_not_active",
                                event_id=event.get("event_id"))
        self._cancel_reason = "client_cancelled"
        return Outcome([], [Tell(voice.INTERRUPT)])

    def _truncate(self, event: Event, now: float) -> Outcome:
        event_id, item_id = event.get("event_id"), event.get("item_id")
        if item_id in self._users:
            raise ProtocolError("only the assistant's audio can be truncated", param="item_id",
                                event_id=event_id)
        reply = self._closed.get(item_id) or next(
            ((reply_id, r.samples, r.text) for reply_id, r in self._responses.items()
             if r.item_id == item_id), None)
        if reply is None:
            raise ProtocolError(f"no assistant item {item_id!r} in this conversation",
                                code="item_not_found", param="item_id", event_id=event_id)
        end_ms = event.get("audio_end_ms")
        reply_id, samples, text = reply
        if not isinstance(end_ms, int) or isinstance(end_ms, bool) or end_ms < 0:
            raise ProtocolError("'audio_end_ms' must be a whole number of milliseconds",
                                param="audio_end_ms", event_id=event_id)
        if end_ms * RATE > samples * 1000:
            raise ProtocolError(f"'audio_end_ms' {end_ms} is past the {samples * 1000 // RATE}"
                                " ms of audio sent", param="audio_end_ms", event_id=event_id)
        heard = heard_text(text, end_ms * RATE / 1000 / samples if samples else 0.0)
        return Outcome([self._event("conversation.item.truncated", item_id=item_id,
                                    content_index=event.get("content_index", 0),
                                    audio_end_ms=end_ms)],
                       [Tell(voice.TRUNCATE, {"reply_id": reply_id, "text": heard})])

    def _refuse_event(self, event: Event, now: float) -> Outcome:
        why = REFUSED[event["type"]]
        raise ProtocolError(f"{event['type']} is not served: {why}", code="unsupported_event",
                            param="type", event_id=event.get("event_id"))

    _handlers = {
        "session.update": _update,
        "input_audio_buffer.append": _append,
        "response.cancel": _cancel,
        "conversation.item.truncate": _truncate,
    }

    # --- the graph ---------------------------------------------------------------------------

    def speech_started(self, utterance_id: str, start_s: float) -> Outcome:
        user = self._users[utterance_id] = _UserItem(f"item_{self.session_id}_{utterance_id}",
                                                     self._session_ms(start_s))
        return Outcome([self._event("input_audio_buffer.speech_started",
                                    audio_start_ms=user.start_ms, item_id=user.item_id)])

    def speech_stopped(self, utterance_id: str, seconds: float) -> Outcome:
        """The VAD sent the utterance (``seconds`` long): the user's turn is committed."""
        user = self._user(utterance_id)
        if user.committed:
            return Outcome()
        user.committed = True
        item = {"id": user.item_id, "object": "realtime.item", "type": "message",
                "role": "user", "status": "completed",
                "content": [{"type": "input_audio", "transcript": None}]}
        events = [self._event("input_audio_buffer.speech_stopped",
                              audio_end_ms=user.start_ms + round(seconds * 1000),
                              item_id=user.item_id),
                  self._event("input_audio_buffer.committed", item_id=user.item_id,
                              previous_item_id=self._last_item)]
        events += [self._event(name, item=item, previous_item_id=self._last_item)
                   for name in self.dialect.item_added]
        self._last_item = user.item_id
        return Outcome(events)

    def transcript(self, utterance_id: str, text: str, settled_words: int,
                   final: bool) -> Outcome:
        """The ASR's words: partial ones (``final`` false) as deltas of their settled words."""
        if not self.config.transcribe:
            return Outcome()
        user = self._user(utterance_id)
        words = text.split() if final else text.split()[:settled_words]
        wanted = " ".join(words)
        events = []
        if wanted.startswith(user.said) and len(wanted) > len(user.said):
            events.append(self._event("conversation.item.input_audio_transcription.delta",
                                      item_id=user.item_id, content_index=0,
                                      delta=wanted[len(user.said):]))
            user.said = wanted
        if final:
            events.append(self._event("conversation.item.input_audio_transcription.completed",
                                      item_id=user.item_id, content_index=0,
                                      transcript=text.strip()))
            self._users.pop(utterance_id, None)
        return Outcome(events)

    def not_heard(self, utterance_id: str, message: str) -> Outcome:
        user = self._users.pop(utterance_id, None) or _UserItem(
            f"item_{self.session_id}_{utterance_id}")
        return Outcome([self._event("conversation.item.input_audio_transcription.failed",
                                    item_id=user.item_id, content_index=0,
                                    error={"type": "transcription_error", "message": message})])

    def released(self, reply_id: str, now: float) -> Outcome:
        """The dialogue released a held reply: what came of it so far, as if it came now."""
        self._released.add(reply_id)
        outcome = Outcome()
        for method, args in self._held.pop(reply_id, []):
            if method == "reply_audio":
                args = (*args[:-1], now)
            step = getattr(self, method)(*args)
            outcome.events += step.events
            outcome.actions += step.actions
        return outcome

    def _holds(self, reply_id: str, method: str, *args: Any) -> bool:
        """Whether the message is of a held reply not released yet (then it is kept)."""
        if not is_held(reply_id) or reply_id in self._released:
            return False
        if reply_id not in self._cancelled:
            self._held.setdefault(reply_id, []).append((method, args))
        return True

    def reply_text(self, reply_id: str, text: str, final: bool) -> Outcome:
        if self._holds(reply_id, "reply_text", reply_id, text, final):
            return Outcome()
        events, response = self._open(reply_id)
        if response is None:
            return Outcome()
        if text:
            response.text += text
            events.append(self._part_event("response.output_audio_transcript.delta", response,
                                           delta=text))
        if final:
            response.generated = True
            if not response.text.strip():  # nothing to say: no audio will come
                return Outcome(events + self._finish(reply_id, "completed"),
                               [Spoken(reply_id, 0.0)])
        return Outcome(events)

    def reply_audio(self, reply_id: str, audio: np.ndarray, rate: int, final: bool,
                    now: float) -> Outcome:
        if self._holds(reply_id, "reply_audio", reply_id, audio, rate, final, now):
            return Outcome()
        events, response = self._open(reply_id)
        if response is None:
            return Outcome()
        if response.resampler is None or response.resampler.rate != rate:
            response.resampler = StreamResampler(rate, RATE)
        pcm = response.resampler.push(audio)
        if final:
            pcm = np.concatenate([pcm, response.resampler.flush()])
        step = round(DELTA_S * RATE)
        for start in range(0, pcm.size, step):
            events.append(self._part_event("response.output_audio.delta", response,
                                           delta=encode_audio(pcm[start:start + step])))
        if response.started_at is None and pcm.size:
            response.started_at = now
        response.samples += pcm.size
        if not final:
            return Outcome(events)
        # the client plays the deltas back to back from the first one
        played_at = max(now, (response.started_at or now) + response.samples / RATE)
        return Outcome(events + self._finish(reply_id, "completed"), [Spoken(reply_id, played_at)])

    def reply_failed(self, reply_id: str, message: str) -> Outcome:
        if is_held(reply_id) and reply_id not in self._released:  # asked again by the dialogue
            self._held.pop(reply_id, None)
            self._cancelled.add(reply_id)
            return Outcome()
        events, response = self._open(reply_id)
        if response is None:
            return Outcome()
        return Outcome(events + self._finish(reply_id, "failed", {
            "type": "failed", "error": {"type": "server_error", "message": message}}))

    def cancelled(self, reply_id: str) -> Outcome:
        """The dialogue cancelled the reply (barge-in, or the client's response.cancel)."""
        reason, self._cancel_reason = self._cancel_reason, "turn_detected"
        self._held.pop(reply_id, None)
        if reply_id not in self._responses:
            self._cancelled.add(reply_id)  # its first words may still be on their way
            return Outcome()
        return Outcome(self._finish(reply_id, "cancelled", {"type": "cancelled",
                                                            "reason": reason}))

    # --- inside ------------------------------------------------------------------------------

    def _open(self, reply_id: str) -> tuple[list[Event], _Response | None]:
        """The reply's response, opened (with its events) on its first message; None for a
        reply this conversation ended already."""
        if reply_id in self._responses:
            return [], self._responses[reply_id]
        if reply_id in self._cancelled or any(r == reply_id for r, _, _ in self._closed.values()):
            return [], None
        response = self._responses[reply_id] = _Response(f"resp_{reply_id}",
                                                         f"item_{self.session_id}_{reply_id}")
        item = self._item(response, "in_progress")
        events = [self._event("response.created", response=self._response(response, "in_progress")),
                  self._event("response.output_item.added", response_id=response.response_id,
                              output_index=0, item=item)]
        events += [self._event(name, item=item, previous_item_id=self._last_item)
                   for name in self.dialect.item_added]
        events.append(self._event("response.content_part.added",
                                  response_id=response.response_id, item_id=response.item_id,
                                  output_index=0, content_index=0,
                                  part={"type": self.dialect.audio_part, "transcript": ""}))
        self._last_item = response.item_id
        return events, response

    def _finish(self, reply_id: str, status: str,
                details: dict[str, Any] | None = None) -> list[Event]:
        response = self._responses.pop(reply_id)
        self._closed[response.item_id] = (reply_id, response.samples, response.text)
        done_status = "completed" if status == "completed" else "incomplete"
        part = {"type": self.dialect.audio_part, "transcript": response.text}
        events = []
        if status == "completed":
            events += [self._part_event("response.output_audio.done", response),
                       self._part_event("response.output_audio_transcript.done", response,
                                        transcript=response.text)]
        events += [self._event("response.content_part.done", response_id=response.response_id,
                               item_id=response.item_id, output_index=0, content_index=0,
                               part=part),
                   self._event("response.output_item.done", response_id=response.response_id,
                               output_index=0, item=self._item(response, done_status))]
        if not self.dialect.beta:
            events.append(self._event("conversation.item.done",
                                      item=self._item(response, done_status)))
        events.append(self._event("response.done", response=self._response(
            response, status, details, self._item(response, done_status))))
        return events

    def _item(self, response: _Response, status: str) -> Event:
        return {"id": response.item_id, "object": "realtime.item", "type": "message",
                "role": "assistant", "status": status,
                "content": [{"type": self.dialect.audio_part, "transcript": response.text}]}

    def _response(self, response: _Response, status: str, details: dict[str, Any] | None = None,
                  item: Event | None = None) -> Event:
        return {"id": response.response_id, "object": "realtime.response", "status": status,
                "status_details": details, "output": [item] if item else [],
                "conversation_id": self.session_id, "usage": None}

    def _part_event(self, name: str, response: _Response, **fields: Any) -> Event:
        return self._event(name, response_id=response.response_id, item_id=response.item_id,
                           output_index=0, content_index=0, **fields)

    def _user(self, utterance_id: str) -> _UserItem:
        return self._users.setdefault(utterance_id, _UserItem(
            f"item_{self.session_id}_{utterance_id}"))

    def _session_ms(self, stream_s: float) -> int:
        return max(0, round((stream_s - self.stream_offset_s) * 1000))

    def _session(self) -> Event:
        return session_object(self.config, self.session_id, self.dialect)

    def _settings(self) -> dict[str, Any]:
        return {"instructions": self.config.instructions, "max_tokens": self.config.max_tokens,
                "temperature": self.config.temperature}

    def _event(self, name: str, **fields: Any) -> Event:
        return {"type": self.dialect.name(name), "event_id": f"event_{next(self._event_ids)}",
                **fields}

    def _stamp(self, event: Event) -> Event:
        return {**event, "event_id": f"event_{next(self._event_ids)}"}


# Client events of the protocol this graph does not serve, and why.
REFUSED = {
    "input_audio_buffer.commit": "the graph's VAD commits the user's turns (server_vad)",
    "input_audio_buffer.clear": "the audio went to the graph's VAD as it came",
    "conversation.item.create": "the conversation is spoken: its items come from the VAD",
    "conversation.item.delete": "the dialogue keeps the conversation's history",
    "conversation.item.retrieve": "the dialogue keeps the conversation's history",
    "response.create": "the graph answers each turn the VAD ends (server_vad, create_response)",
    "output_audio_buffer.clear": "that event belongs to WebRTC connections",
}
Conversation._handlers.update({name: Conversation._refuse_event for name in REFUSED})


def heard_text(text: str, fraction: float) -> str:
    """The words of ``text`` a listener heard when playback stopped ``fraction`` of the way
    through its audio (speech takes about as long per character): whole words only."""
    if fraction >= 1:
        return text.strip()
    cut = round(len(text) * max(0.0, fraction))
    heard = text[:cut]
    if cut < len(text) and not text[cut].isspace():
        heard = heard.rsplit(None, 1)[0] if " " in heard.strip() else ""
    return heard.strip()
