"""An agent's tool loop as a pure state machine: questions in; LLM requests, tool calls and
answers out. The node (``nodes/agent.py``) only moves its actions onto dora outputs.

One question at a time (later ones wait their turn): the LLM is asked with the tools
(the first step with ``first_tool_choice``, "required" by default so that small models use
their tools; later steps "auto", the last one "none" so that the turn ends in an answer),
its calls go to the tools' nodes, every result — or the
tool's error, or "did not answer within N s" — goes back to the model as a tool message,
and the model is asked again, until it answers in prose or ``max_steps`` is reached. A
turn that runs past its deadline ends with an explicit error; a barge-in cancels the
turn's LLM request and ends the turn. Late results of an ended turn are ignored.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mofa_omni.agent.tools import ToolSpec
from mofa_omni.contract.errors import ContractError, ErrorKind
from mofa_omni.contract.tasks import (
    ChatMessage,
    ChatRequest,
    RerankRequest,
    TextChunk,
    ToolCall,
)


@dataclass(frozen=True, slots=True)
class AskLLM:
    request_id: str
    request: ChatRequest


@dataclass(frozen=True, slots=True)
class CallTool:
    output: str  # the agent's output feeding the tool's node
    request_id: str
    message: RerankRequest | ToolCall


@dataclass(frozen=True, slots=True)
class CancelLLM:
    request_id: str


@dataclass(frozen=True, slots=True)
class Answer:
    question_id: str
    text: str
    error: str = ""  # the turn ended without an answer: why
    steps: int = 0  # LLM requests the turn took
    kind: ErrorKind = field(default=ErrorKind.INTERNAL, compare=False)  # of ``error``


Action = AskLLM | CallTool | CancelLLM | Answer


@dataclass
class AgentSettings:
    system: str = "You are a helpful assistant. Use the tools to answer."
    max_tokens: int = 96
    max_steps: int = 4  # LLM requests per question
    tool_deadline_s: float = 30.0
    turn_deadline_s: float = 120.0
    first_tool_choice: str = "required"


@dataclass
class _Pending:
    call: ToolCall
    spec: ToolSpec
    deadline: float


@dataclass
class _Turn:
    question_id: str
    question: str
    messages: list[ChatMessage]
    deadline: float
    step: int = 0
    llm_request: str = ""  # the LLM request being answered ("" while tools run)
    text: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    pending: dict[str, _Pending] = field(default_factory=dict)  # by tool request id
    results: dict[str, str] = field(default_factory=dict)  # by call id
    tool_requests: int = 0


class Agent:
    """The loop for one agent node; every method returns the actions to take."""

    def __init__(self, tools: list[ToolSpec], settings: AgentSettings):
        self.tools = {tool.name: tool for tool in tools}
        self.settings = settings
        self.turn: _Turn | None = None
        self.waiting: deque[tuple[str, str]] = deque()

    # --- events --------------------------------------------------------------------------

    def ask(self, question_id: str, text: str, now: float) -> list[Action]:
        """A question: asked now, or once the turns before it are over."""
        self.waiting.append((question_id, text))
        return self._next_question(now) if self.turn is None else []

    def reply(self, request_id: str, chunk: TextChunk, now: float) -> list[Action]:
        """A chunk of the LLM's reply; its final one decides: calls or the answer."""
        turn = self.turn
        if turn is None or request_id != turn.llm_request:
            return []  # a reply to an ended turn, or to a request asked again
        turn.text += chunk.text
        turn.calls += chunk.tool_calls
        if not chunk.final:
            return []
        turn.llm_request = ""
        if not turn.calls:
            return self._end(Answer(turn.question_id, turn.text.strip(), steps=turn.step), now)
        if turn.step >= self.settings.max_steps:
            return self._end(Answer(turn.question_id, turn.text.strip(),
                                    f"still calling tools after {turn.step} steps",
                                    turn.step), now)
        turn.messages.append(ChatMessage("assistant", turn.text, list(turn.calls)))
        actions: list[Action] = []
        for call in turn.calls:
            spec = self.tools[call.name]  # decoding only ever names a tool of the request
            try:
                message = spec.request(call, turn.question)
            except (ContractError, ValueError, KeyError) as error:
                turn.results[call.id] = f"error: {error}"
                continue
            turn.tool_requests += 1
            request_id = f"{turn.question_id}-tool-{turn.tool_requests}"
            turn.pending[request_id] = _Pending(call, spec, now + self.settings.tool_deadline_s)
            actions.append(CallTool(spec.output, request_id, message))
        return actions + self._maybe_continue(now)

    def llm_failed(self, request_id: str, message: str, now: float) -> list[Action]:
        turn = self.turn
        if turn is None or request_id != turn.llm_request:
            return []
        return self._end(Answer(turn.question_id, "", f"the LLM failed: {message}", turn.step),
                         now)

    def tool_answered(self, request_id: str, text: str, now: float) -> list[Action]:
        """A tool's result (already as the text the model reads)."""
        return self._tool_done(request_id, text, now)

    def tool_failed(self, request_id: str, message: str, now: float) -> list[Action]:
        """A tool's error: the model reads it as the tool's result."""
        return self._tool_done(request_id, f"error: {message}", now)

    def barge_in(self, now: float) -> list[Action]:
        """The user spoke over the agent: the turn ends, its LLM request is cancelled."""
        turn = self.turn
        if turn is None:
            return []
        actions: list[Action] = [CancelLLM(turn.llm_request)] if turn.llm_request else []
        return actions + self._end(Answer(turn.question_id, "", "interrupted", turn.step,
                                          ErrorKind.CANCELLED), now)

    def expire(self, now: float) -> list[Action]:
        """Deadlines: a tool past its own becomes a tool error; a turn past its own ends."""
        turn = self.turn
        if turn is None:
            return []
        if now >= turn.deadline:
            actions: list[Action] = [CancelLLM(turn.llm_request)] if turn.llm_request else []
            return actions + self._end(Answer(
                turn.question_id, "", f"no answer within {self.settings.turn_deadline_s:g} s",
                turn.step, ErrorKind.TIMEOUT), now)
        late = [request_id for request_id, p in turn.pending.items() if now >= p.deadline]
        actions = []
        for request_id in late:
            name = turn.pending[request_id].spec.name
            actions += self._tool_done(request_id, f"error: the tool {name} did not answer "
                                       f"within {self.settings.tool_deadline_s:g} s", now)
        return actions

    @property
    def busy(self) -> bool:
        return self.turn is not None or bool(self.waiting)

    # --- the loop ---------------------------------------------------------------------------

    def _tool_done(self, request_id: str, text: str, now: float) -> list[Action]:
        turn = self.turn
        if turn is None or request_id not in turn.pending:
            return []  # late, or answered already (a timeout came first)
        pending = turn.pending.pop(request_id)
        turn.results[pending.call.id] = text
        return self._maybe_continue(now)

    def _maybe_continue(self, now: float) -> list[Action]:
        """Once every call of the step has its result, the model is asked again."""
        turn = self.turn
        if turn is None or turn.pending or turn.llm_request:
            return []
        for call in turn.calls:
            turn.messages.append(ChatMessage("tool", turn.results[call.id], tool_call_id=call.id))
        last = turn.step + 1 >= self.settings.max_steps  # then the model must answer
        return [self._ask_llm(turn, "none" if last else "auto")]

    def _ask_llm(self, turn: _Turn, tool_choice: str) -> AskLLM:
        turn.step += 1
        turn.text, turn.calls, turn.results = "", [], {}
        turn.llm_request = f"{turn.question_id}-llm-{turn.step}"
        request = ChatRequest(list(turn.messages), self.settings.max_tokens,
                              tools=[spec.tool() for spec in self.tools.values()],
                              tool_choice=tool_choice)
        return AskLLM(turn.llm_request, request)

    def _next_question(self, now: float) -> list[Action]:
        if not self.waiting:
            return []
        question_id, text = self.waiting.popleft()
        messages = [ChatMessage("system", self.settings.system)] if self.settings.system else []
        self.turn = _Turn(question_id, text, [*messages, ChatMessage("user", text)],
                          now + self.settings.turn_deadline_s)
        return [self._ask_llm(self.turn, self.settings.first_tool_choice if self.tools
                              else "none")]

    def _end(self, answer: Answer, now: float) -> list[Action]:
        self.turn = None
        return [answer, *self._next_question(now)]
