"""The conversation of a voice agent as a pure state machine: events in, actions out.

It keeps the system prompt and the multi-turn history, turns each heard
utterance into a chat request carrying the whole conversation, follows the
reply until it has been spoken, and handles barge-in: when the user starts
speaking while a reply is still being generated or spoken, the reply is
cancelled (generation and pending speech), what was said of it stays in the
history, and the transcript marks it as interrupted.

Speculation (``speculate``): the words of a pause (the ASR's transcript of the VAD's pause
snapshot, made while the VAD still waits for the silence to last) are asked at once, as a
*held* reply (:func:`mofa_omni.voice.events.held_id`): the LLM and the TTS work on it while
the user may still go on, and the sink keeps its audio. If the utterance ends with those very
words the reply is released (:class:`Release`) and the sink plays it at once; otherwise it is
cancelled and the utterance asked anew. The history takes the turn only when it is released.

With an omni model (dataflows/voice.omni.yml) no one transcribes: each utterance goes to the
model as sound (:meth:`Dialogue.heard_sound`), the earlier ones with the turns they were said
in, and the model answers in text and speech at once.

An omni graph may also declare the *cascade* (``cascade``): an ASR, an LLM and a TTS node
beside the omni model, unloaded until needed. When the omni model cannot serve a turn — the
scheduler refused it memory (no omni variant fits), it did not load in time, it crashed —
before it said anything, the turn's sound goes to the ASR instead (:class:`Hear`), its words
to the LLM, and the following turns too, for ``omni_retry_s``; then the omni model is tried
again. The LLM sees the turns only the omni model heard as :data:`UNHEARD`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import ChatMessage, ChatRequest, OmniRequest
from mofa_omni.media.audio import resample
from mofa_omni.scheduler.messages import Status
from mofa_omni.voice import events
from mofa_omni.voice.events import held_id

# What whisper writes for non-speech; such an utterance gets no reply.
NON_SPEECH = re.compile(r"^[\s.,!?\-]*$|^\s*[\[(][^\])]*[\])]\s*$")


HEARING_RATE = 16_000  # the rate utterances are kept at for an omni model
ANSWERED_TURNS = 64  # turns whose words are in, kept to tell a late `hearing` notice
# What the cascade's LLM reads for a turn only the omni model heard (its words were never known)
UNHEARD = "(spoken to another model; the words were not transcribed)"


@dataclass(frozen=True, slots=True)
class HeardMessage(ChatMessage):
    """A user turn an omni model heard: its sound (16 kHz), its words unknown."""

    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


@dataclass(frozen=True, slots=True)
class Ask:
    reply_id: str
    request: ChatRequest | OmniRequest
    origin_ns: int  # when the user stopped speaking


@dataclass(frozen=True, slots=True)
class Cancel:
    reply_id: str


@dataclass(frozen=True, slots=True)
class Hear:
    """Send an utterance to the cascade's ASR: the omni model cannot serve it."""

    turn_id: str
    audio: np.ndarray  # at HEARING_RATE
    origin_ns: int


@dataclass(frozen=True, slots=True)
class Release:
    """A held reply answers the turn after all: the sink may play it."""

    reply_id: str


@dataclass(frozen=True, slots=True)
class TurnDone:
    """The reply to the last utterance is over (spoken, failed, or there was nothing to say)."""

    turn_id: str


@dataclass(frozen=True, slots=True)
class TranscriptLine:
    role: str  # "user" | "assistant"
    text: str
    turn_id: str
    interrupted: bool = False
    error: str = ""

    def render(self) -> str:
        """One line of the transcript file (the text's own line breaks become spaces)."""
        marks = " [interrupted]" if self.interrupted else ""
        marks += f" [error: {self.error}]" if self.error else ""
        text = " ".join(self.text.split())
        return f"{self.role}: {text}{marks}"


Action = Ask | Cancel | Hear | Release | TurnDone | TranscriptLine


@dataclass
class _Reply:
    reply_id: str
    turn_id: str
    started: float  # monotonic seconds, for the reply's deadline
    text: str = ""
    generated: bool = False  # the LLM's final chunk came
    question: str = ""  # a held reply's question: the words it answers, not yet in the history
    sound: np.ndarray | None = None  # an omni reply's utterance (16 kHz), for the cascade
    origin_ns: int = 0


@dataclass(frozen=True, slots=True)
class ReplySettings:
    """How replies are asked for, as a client's session sets them (0 / "": the node's own)."""

    instructions: str = ""
    max_tokens: int = 0
    temperature: float = 0.0


@dataclass
class Dialogue:
    system_prompt: str = "You are a helpful voice assistant. Answer in one short sentence."
    max_tokens: int = 96
    temperature: float = 0.0
    max_history: int = 16  # messages kept besides the system prompt
    voice: str = ""  # an omni model's voice ("" = its first)
    history: list[ChatMessage] = field(default_factory=list)
    active: _Reply | None = None
    hearing_node: str = ""  # the node transcribing the utterances (the ASR), if known
    # Utterances sent to be transcribed, not yet heard back: turn id -> when (monotonic s).
    transcribing: dict[str, float] = field(default_factory=dict)
    # When the ASR's crash was told (time.time_ns): an utterance sent to it before then whose
    # `hearing` notice comes after (dora orders different inputs' events as it likes) went down
    # with it.
    hearing_crashed_ns: int = 0
    # Turns whose words (or the ASR's error) are in, newest last: their `hearing` notice may
    # come after them (a transcript made while the user spoke is sent at once, and dora orders
    # different inputs' events as it likes), and must not then wait for words again.
    answered_turns: list[str] = field(default_factory=list)
    # Whether a user is there to answer: a Realtime client (nodes/realtime.py) opens and closes
    # sessions; between two, what the VAD still hears of the last one gets no reply.
    listening: bool = True
    # Ask the words of a pause before the VAD ends the utterance (see the module's docstring).
    speculate: bool = False
    held: _Reply | None = None  # the held reply, while its utterance is not over
    # Where each reply's words are in the history, for a client truncating what it played.
    said_at: dict[str, int] = field(default_factory=dict)
    # The cascade that stands in for the omni model (see the module's docstring).
    cascade: bool = False
    omni_node: str = ""  # the node the omni requests go to, whose crash sends turns there
    omni_retry_s: float = 60.0
    omni_down_until: float = float("-inf")  # monotonic s: the cascade answers until then
    _own: ReplySettings | None = None  # the node's settings, before any session changed them
    _replies: int = 0

    def _system(self) -> list[ChatMessage]:
        """The system message; none for an empty prompt (the chat template's own then)."""
        return [ChatMessage("system", self.system_prompt)] if self.system_prompt else []

    def sent_to_be_heard(self, turn_id: str, now: float = 0.0, sent_ns: int = 0) -> list[Action]:
        """An utterance went to the ASR (the VAD's `utterance`, sent at ``sent_ns``): its turn
        waits for the words, unless the ASR crashed after it was sent."""
        if turn_id in self.answered_turns:
            return []  # its words overtook this notice
        if sent_ns and sent_ns < self.hearing_crashed_ns:
            return self.not_heard(turn_id, f"{self.hearing_node} crashed: not heard")
        self.transcribing[turn_id] = now
        return []

    def not_heard(self, turn_id: str, why: str) -> list[Action]:
        """The ASR could not transcribe the utterance: the turn ends, saying why."""
        self._answered(turn_id)
        return [TranscriptLine("user", "", turn_id, error=why), TurnDone(turn_id)]

    def _answered(self, turn_id: str) -> None:
        self.transcribing.pop(turn_id, None)
        self.answered_turns = [*self.answered_turns[-(ANSWERED_TURNS - 1):], turn_id]

    def heard(self, turn_id: str, text: str, origin_ns: int, now: float = 0.0) -> list[Action]:
        """A transcribed utterance: interrupt what is going on, then answer it."""
        self._answered(turn_id)
        text = text.strip()
        held, self.held = self.held, None
        if held is not None and held.turn_id == turn_id and held.question == text \
                and self.listening:
            return self._release(held, now)
        dropped = [Cancel(held.reply_id)] if held is not None else []
        if NON_SPEECH.match(text) or not self.listening:
            return [*dropped, TurnDone(turn_id)]  # silence, noise, or no one there: no reply
        actions = dropped + self._interrupt()
        self.history.append(ChatMessage("user", text))
        self._replies += 1
        self.active = _Reply(f"reply-{self._replies}", turn_id, now)
        messages = [*self._system(), *_in_words(self.history[-self.max_history:])]
        request = ChatRequest(messages, self.max_tokens, temperature=self.temperature)
        return [*actions, TranscriptLine("user", text, turn_id),
                Ask(self.active.reply_id, request, origin_ns)]

    def heard_pause(self, turn_id: str, text: str, origin_ns: int,
                    now: float = 0.0) -> list[Action]:
        """The words of a pause in ``turn_id`` (its utterance may still go on): with
        ``speculate``, ask them now as a held reply, in place of the one held before."""
        text = text.strip()
        if not self.speculate or not self.listening or NON_SPEECH.match(text) \
                or (self.held and (self.held.turn_id, self.held.question) == (turn_id, text)):
            return []
        actions = [Cancel(self.held.reply_id)] if self.held else []
        self._replies += 1
        self.held = _Reply(held_id(f"reply-{self._replies}"), turn_id, now, question=text)
        messages = [*self._system(), *_in_words(self.history[-(self.max_history - 1):]),
                    ChatMessage("user", text)] if self.max_history > 1 else \
            [*self._system(), ChatMessage("user", text)]
        request = ChatRequest(messages, self.max_tokens, temperature=self.temperature)
        return [*actions, Ask(self.held.reply_id, request, origin_ns)]

    def _release(self, held: _Reply, now: float) -> list[Action]:
        """The utterance ended with the held reply's words: it answers the turn."""
        actions = self._interrupt()
        self.history.append(ChatMessage("user", held.question))
        held.started = now
        self.active = held
        actions += [TranscriptLine("user", held.question, held.turn_id), Release(held.reply_id)]
        if held.generated:  # all of it came while held
            self._say(held.reply_id, held.text.strip())
            if not held.text.strip():
                actions += self.spoken(held.reply_id)
        return actions

    def _drop_held(self) -> list[Action]:
        held, self.held = self.held, None
        return [Cancel(held.reply_id)] if held else []

    def heard_sound(self, turn_id: str, audio: np.ndarray, sample_rate: int, origin_ns: int,
                    now: float = 0.0) -> list[Action]:
        """An utterance for an omni model: interrupt what is going on, then ask the model to
        answer the conversation aloud, every kept utterance in the turn it was said in (or,
        while the omni model cannot serve, send it to the cascade's ASR)."""
        actions = self._interrupt()
        sound = resample(audio, sample_rate, HEARING_RATE)
        if self.cascade and now < self.omni_down_until:
            self.transcribing[turn_id] = now
            return [*actions, Hear(turn_id, sound, origin_ns)]
        heard = HeardMessage("user", "", audio=sound)
        self.history.append(heard)
        self._replies += 1
        self.active = _Reply(f"reply-{self._replies}", turn_id, now, sound=sound,
                             origin_ns=origin_ns)
        window = [*self._system(), *self.history[-self.max_history:]]
        turns = [i for i, m in enumerate(window) if isinstance(m, HeardMessage)]
        request = OmniRequest([ChatMessage(m.role, m.content) for m in window],
                              audio=[window[i].audio for i in turns], sample_rate=HEARING_RATE,
                              max_tokens=self.max_tokens, speak=True, voice=self.voice,
                              audio_turns=turns)
        said = f"[spoken, {heard.audio.size / HEARING_RATE:.1f} s]"
        return [*actions, TranscriptLine("user", said, turn_id),
                Ask(self.active.reply_id, request, origin_ns)]

    def speech_started(self) -> list[Action]:
        """The user began to speak (VAD): barge in on a reply that is still going (and on one
        held for the last utterance, whose end was not heard: a new one began)."""
        return self._drop_held() + self._interrupt()

    def reply_text(self, reply_id: str, text: str, final: bool) -> list[Action]:
        if self.held and self.held.reply_id == reply_id:  # kept until its turn is sure
            self.held.text += text
            self.held.generated = self.held.generated or final
            return []
        reply = self._current(reply_id)
        if reply is None:
            return []  # a cancelled reply's late chunks
        reply.text += text
        if not final:
            return []
        reply.generated = True
        self._say(reply_id, reply.text.strip())
        if not reply.text.strip():  # nothing to speak: the turn is over now
            return self.spoken(reply_id)
        return []

    def reply_failed(self, reply_id: str, message: str, now: float = 0.0,
                     unavailable: bool = False) -> list[Action]:
        """The reply ended in an error. ``unavailable``: its model could not serve (refused
        memory, not loaded in time, crashed); an omni model's turn then goes to the cascade, if
        the graph has one and nothing was said yet."""
        if self.held and self.held.reply_id == reply_id:  # the utterance is asked again
            self.held = None
            return []
        reply = self._current(reply_id)
        if reply is None:
            return []
        self.active = None
        if unavailable and self.cascade and reply.sound is not None and not reply.text:
            self.omni_down_until = now + self.omni_retry_s
            if self.history and isinstance(self.history[-1], HeardMessage):
                self.history.pop()  # the sound: the cascade's words take its place
            self.transcribing[reply.turn_id] = now
            return [TranscriptLine("assistant", "", reply.turn_id,
                                   error=f"{message}; the cascade answers"),
                    Hear(reply.turn_id, reply.sound, reply.origin_ns)]
        if self.history and self.history[-1].role == "user":
            self.history.pop()  # keep user/assistant alternating for the chat template
        return [TranscriptLine("assistant", reply.text.strip(), reply.turn_id, error=message),
                TurnDone(reply.turn_id)]

    def spoken(self, reply_id: str) -> list[Action]:
        """The sink finished the reply's audio."""
        reply = self._current(reply_id)
        if reply is None or not reply.generated:
            return []
        self.active = None
        return [TranscriptLine("assistant", reply.text.strip(), reply.turn_id),
                TurnDone(reply.turn_id)]

    def speech_failed(self, reply_id: str, message: str) -> list[Action]:
        """The TTS could not speak (part of) the reply: the turn ends, the text stays known."""
        if self.held and self.held.reply_id == reply_id:  # the utterance is asked again
            return self._drop_held()
        reply = self._current(reply_id)
        if reply is None:
            return []
        self.active = None
        actions: list[Action] = []
        if not reply.generated:  # stop generating what cannot be spoken
            actions.append(Cancel(reply_id))
            self._say(reply_id, reply.text.strip())
        return [*actions, TranscriptLine("assistant", reply.text.strip(), reply.turn_id,
                                         error=message), TurnDone(reply.turn_id)]

    def node_crashed(self, node: str, now_ns: int = 0, now: float = 0.0,
                     why: str = "") -> list[Action]:
        """A node crashed (dora restarts it, or not), or is out of reach (``why`` says so;
        default "<node> crashed"), told at ``now_ns``. The ASR: the utterances it was
        transcribing will not be heard, their turns end now with the reason (and those sent
        before now, whose notice comes later). Any other node of the reply's path: the reply
        in flight will not come, its turn ends now — not at the deadline."""
        why = why or f"{node} crashed"
        if node == self.hearing_node:
            self.hearing_crashed_ns = max(self.hearing_crashed_ns, now_ns)
            return [action for turn_id in list(self.transcribing)
                    for action in self.not_heard(turn_id, f"{why}: not heard")]
        reply = self.active
        if reply is None:
            return self._drop_held()
        return [*self._drop_held(), Cancel(reply.reply_id),
                *self.reply_failed(reply.reply_id, why, now,
                                   unavailable=node == self.omni_node)]

    def expire(self, now: float, timeout_s: float) -> list[Action]:
        """End a reply that is not over ``timeout_s`` after the question, and a turn whose
        words have not come back ``timeout_s`` after it was sent: a lost message must not
        leave the conversation waiting for ever."""
        actions = [action for turn_id, sent in list(self.transcribing.items())
                   if now - sent > timeout_s
                   for action in self.not_heard(turn_id, f"timeout: not heard in "
                                                         f"{timeout_s:g} s")]
        if self.held and now - self.held.started > timeout_s:
            actions += self._drop_held()
        reply = self.active
        if reply is None or now - reply.started <= timeout_s:
            return actions
        return [*actions, Cancel(reply.reply_id),
                *self.reply_failed(reply.reply_id, f"timeout: no complete reply in {timeout_s:g} s")]

    def _current(self, reply_id: str) -> _Reply | None:
        return self.active if self.active and self.active.reply_id == reply_id else None

    def _interrupt(self) -> list[Action]:
        reply, self.active = self.active, None
        if reply is None:
            return []
        said = reply.text.strip()
        if reply.generated:
            self.history[-1] = ChatMessage("assistant", said)  # the whole text, but not all heard
        elif said:
            self._say(reply.reply_id, said)
        else:
            self.history.pop()  # nothing was said: drop the unanswered question
        return [Cancel(reply.reply_id),
                TranscriptLine("assistant", said, reply.turn_id, interrupted=True)]

    def _say(self, reply_id: str, text: str) -> None:
        self.history.append(ChatMessage("assistant", text))
        self.said_at[reply_id] = len(self.history) - 1

    # --- a Realtime client's session (nodes/realtime.py) ------------------------------------

    def session_opened(self, settings: ReplySettings) -> list[Action]:
        """A client connected: a new conversation, with its settings."""
        actions = self.session_closed()
        self.listening = True
        self.configure(settings)
        return actions

    def session_closed(self) -> list[Action]:
        """The client went: its reply stops, its conversation is forgotten."""
        actions = self._drop_held() + self._interrupt()
        self.history.clear()
        self.said_at.clear()
        self.listening = False
        return actions

    def configure(self, settings: ReplySettings) -> list[Action]:
        """The session's instructions and reply settings; empty ones: the node's own."""
        if self._own is None:
            self._own = ReplySettings(self.system_prompt, self.max_tokens, self.temperature)
        self.system_prompt = settings.instructions or self._own.instructions
        self.max_tokens = settings.max_tokens or self._own.max_tokens
        self.temperature = settings.temperature
        return []

    def truncate(self, reply_id: str, heard: str) -> list[Action]:
        """The client stopped playing the reply: the history keeps what was heard of it."""
        index = self.said_at.get(reply_id)
        if index is not None and index < len(self.history) \
                and self.history[index].role == "assistant":
            self.history[index] = ChatMessage("assistant", heard)
        return []

    def control(self, kind: str, fields: dict) -> list[Action]:
        """A control event of a Realtime client's session (mofa_omni.voice.events)."""
        settings = ReplySettings(str(fields.get("instructions") or ""),
                                 int(fields.get("max_tokens") or 0),
                                 float(fields.get("temperature") or 0.0))
        match kind:
            case events.SESSION_OPENED:
                return self.session_opened(settings)
            case events.SESSION_CLOSED:
                return self.session_closed()
            case events.SETTINGS:
                return self.configure(settings)
            case events.INTERRUPT:
                return self._interrupt()
            case events.TRUNCATE:
                return self.truncate(str(fields.get("reply_id", "")), str(fields.get("text", "")))
        raise ContractError(f"unknown control event {kind!r}")


def _in_words(messages: list[ChatMessage]) -> list[ChatMessage]:
    """The history as an LLM reads it: a turn only an omni model heard is :data:`UNHEARD`."""
    return [ChatMessage("user", UNHEARD) if isinstance(m, HeardMessage) else m
            for m in messages]


def out_of_reach(status: Status, nodes: set[str]) -> dict[str, str]:
    """Of ``nodes``, those the scheduler's ``status`` shows on a machine it lost (every node
    there fell silent: its daemon or the machine is gone), each with why. dora tells the
    other machines nothing when one dies: without this, a reply it was making ends only at
    the reply's deadline."""
    lost = {machine.machine for machine in status.machines if machine.lost}
    return {node.node: f"{node.node} unavailable: machine {node.machine} is lost"
            for node in status.nodes if node.node in nodes and node.machine in lost}
