"""The robot's planner as a pure state machine: heard commands in, LLM requests, drives and
sentences out.

One turn at a time: a command is heard → the LLM is asked for the action (structured
output) → the action is checked against the world → an approved drive is sent to the
simulator and, when it ends, the outcome is spoken; a refused one is not executed and
its reason is spoken. The turn is over once the sentence has been spoken. Commands
heard meanwhile wait their turn — except "stop", which stops a drive at once (the
drive's turn then says where it stopped). Every phase has a deadline, so a lost message or a
stuck drive ends in an explicit sentence rather than a silent robot. dora can drop a message
silently (DESIGN.md), the last of a reply too, which no later message would reveal: an LLM
that has said nothing for ``reask_s`` is asked again under a new request id (the action is
chosen deterministically, so the answer is the same), and the late answer to the old id is
ignored.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from dataclasses import dataclass, field

import msgspec

from mofa_omni.contract.tasks import ChatRequest
from mofa_omni.robot.actions import Approved, action_request, check, parse_action, report
from mofa_omni.robot.messages import Drive, Outcome, RobotState
from mofa_omni.robot.world import World
from mofa_omni.voice.dialogue import NON_SPEECH, TurnDone  # a turn ends as in the voice agent

log = logging.getLogger("mofa_omni.robot.planner")

# Said while the robot drives, these stop it at once, without waiting for the LLM.
_EMERGENCY_STOP = re.compile(r"^\W*(stop|halt|freeze|wait)( now| there| it)?\W*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class AskLLM:
    request_id: str
    request: ChatRequest


@dataclass(frozen=True, slots=True)
class SendDrive:
    drive: Drive


@dataclass(frozen=True, slots=True)
class Say:
    say_id: str
    text: str


@dataclass(frozen=True, slots=True)
class LogLine:
    speaker: str  # "user", "action", "outcome", "refused", "robot" (what it says)
    text: str

    def render(self) -> str:
        return f"{self.speaker}: {self.text}"


Action = AskLLM | SendDrive | Say | TurnDone | LogLine


@dataclass
class Deadlines:
    think_s: float = 120.0  # the LLM's action
    drive_s: float = 60.0  # a drive, in wall-clock seconds
    speak_s: float = 120.0  # a sentence spoken
    reask_s: float = 20.0  # the LLM silent this long while thinking: ask again (a lost reply)


@dataclass
class _Turn:
    turn_id: str
    command: str
    phase: str  # "thinking" | "driving" | "speaking"
    since: float
    reply: str = ""
    description: str = ""
    request: ChatRequest | None = None  # what the LLM was asked (asked again if it goes silent)
    attempt: int = 0  # how many times it was asked again
    heard_at: float = 0.0  # the LLM's last message for this turn (or when it was asked)


@dataclass
class Planner:
    world: World
    deadlines: Deadlines = field(default_factory=Deadlines)
    state: RobotState | None = None
    seen: str = "The camera sees no known place."
    turn: _Turn | None = None
    waiting: deque = field(default_factory=deque)

    def heard(self, turn_id: str, text: str, now: float) -> list[Action]:
        if NON_SPEECH.match(text):
            return [TurnDone(turn_id)]
        if _EMERGENCY_STOP.match(text) and self.turn is not None and self.turn.phase == "driving":
            return [LogLine("user", text.strip()),
                    SendDrive(Drive(f"{turn_id}-stop", "stop")), TurnDone(turn_id)]
        self.waiting.append((turn_id, text.strip()))
        return self._next(now)

    def _next(self, now: float) -> list[Action]:
        if self.turn is not None or not self.waiting:
            return []
        turn_id, command = self.waiting.popleft()
        request = action_request(command, self.state, self.seen, self.world)
        self.turn = _Turn(turn_id, command, "thinking", now, request=request, heard_at=now)
        return [LogLine("user", command), AskLLM(self._llm_id, request)]

    @property
    def _llm_id(self) -> str:
        attempt = self.turn.attempt
        return f"{self.turn.turn_id}-action" + (f"-{attempt}" if attempt else "")

    @property
    def _drive_id(self) -> str:
        return f"{self.turn.turn_id}-drive"

    @property
    def _say_id(self) -> str:
        return f"{self.turn.turn_id}-say"

    def reply_text(self, request_id: str, text: str, final: bool, now: float) -> list[Action]:
        turn = self.turn
        if turn is None or turn.phase != "thinking" or request_id != self._llm_id:
            return []
        turn.reply += text
        turn.heard_at = now
        if not final:
            return []
        try:
            action = parse_action(turn.reply)
        except msgspec.DecodeError as error:
            return self._say([LogLine("refused", f"{turn.reply!r}: {error}")],
                             "Sorry, I did not understand that command.", now)
        log = [LogLine("action", turn.reply)]
        if self.state is None:
            return self._say(log + [LogLine("refused", "no robot state yet")],
                             "I cannot move yet: I have not heard from my wheels.", now)
        decision = check(action, self._drive_id, self.world, self.state)
        if not isinstance(decision, Approved):
            return self._say(log + [LogLine("refused", "not executed")], decision.reason, now)
        turn.phase, turn.since, turn.description = "driving", now, decision.description
        return log + [SendDrive(decision.drive)]

    def llm_failed(self, request_id: str, message: str, now: float) -> list[Action]:
        if self.turn is None or self.turn.phase != "thinking" or request_id != self._llm_id:
            return []
        return self._say([LogLine("refused", f"LLM: {message}")],
                         "Sorry, I could not work out what to do.", now)

    def robot_state(self, state: RobotState) -> None:
        self.state = state

    def camera(self, description: str) -> None:
        self.seen = description

    def outcome(self, outcome: Outcome, now: float) -> list[Action]:
        self.state = outcome.state
        if self.turn is None or self.turn.phase != "driving" or outcome.drive_id != self._drive_id:
            return []
        where = f"{outcome.status} at x={outcome.state.x:.2f}, y={outcome.state.y:.2f}"
        return self._say([LogLine("outcome", where)], report(self.turn.description, outcome), now)

    def spoken(self, say_id: str, now: float) -> list[Action]:
        if self.turn is None or self.turn.phase != "speaking" or say_id != self._say_id:
            return []
        done = TurnDone(self.turn.turn_id)
        self.turn = None
        return [done, *self._next(now)]

    def expire(self, now: float) -> list[Action]:
        """Deadlines: a turn stuck in a phase ends with a sentence (or, speaking, just ends)."""
        turn = self.turn
        if turn is None:
            return []
        limit = {"thinking": self.deadlines.think_s, "driving": self.deadlines.drive_s,
                 "speaking": self.deadlines.speak_s}[turn.phase]
        if now - turn.since < limit:
            if turn.phase == "thinking" and now - turn.heard_at >= self.deadlines.reask_s:
                return self._ask_again(now)
            return []
        if turn.phase == "thinking":
            return self._say([LogLine("refused", "timeout: no action from the LLM")],
                             "Sorry, I could not work out what to do in time.", now)
        if turn.phase == "driving":
            stop = SendDrive(Drive(f"{turn.turn_id}-halt", "stop"))
            return [stop, *self._say([], f"I could not {turn.description} in time, so I stopped.",
                                     now)]
        return self.spoken(self._say_id, now)

    def _ask_again(self, now: float) -> list[Action]:
        """The LLM has been silent for ``reask_s``: its reply (or the request) was likely
        dropped. Ask again under a new id; what came of the old one is dropped."""
        turn = self.turn
        log.warning("no reply to %s for %.0f s: asking the LLM again", self._llm_id,
                    now - turn.heard_at)
        turn.attempt += 1
        turn.reply, turn.heard_at = "", now
        return [AskLLM(self._llm_id, turn.request)]

    def _say(self, before: list[Action], text: str, now: float) -> list[Action]:
        self.turn.phase, self.turn.since = "speaking", now
        return [*before, LogLine("robot", text), Say(self._say_id, text)]
