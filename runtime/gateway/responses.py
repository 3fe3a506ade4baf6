"""OpenAI's Responses API (``POST /v1/responses``), the core the OpenAI Agents SDK uses by
default, mapped onto the same chat contract as chat completions (no I/O here).

Served: ``input`` as a string or a list of items — messages (``user``, ``system``,
``developer``, ``assistant``; text parts), ``function_call`` items the model made earlier
and ``function_call_output`` items answering them — ``instructions``, function ``tools``,
``tool_choice``, ``parallel_tool_calls``, ``temperature``, ``top_p``, ``max_output_tokens``,
``text.format`` (``text`` or ``json_schema``) and ``stream`` (the semantic events:
``response.created`` … ``response.output_text.delta`` …
``response.function_call_arguments.delta`` … ``response.completed``). The server keeps no
responses: ``previous_response_id``, ``conversation``, ``store: true`` and ``background``
are refused by name, as are hosted tools (web search, files) and any field not listed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import (
    ChatMessage,
    ChatRequest,
    TextChunk,
    Tool,
    ToolCall,
    validate_request,
)
from mofa_omni.gateway.openai_bodies import ApiError, refused

DEFAULT_MAX_OUTPUT_TOKENS = 256


class ResponsesBody(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    stream: bool = False
    text: dict[str, Any] | None = None
    include: list[str] | None = None
    truncation: str | None = None
    # refused unless they ask for nothing: this server keeps no responses
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None
    reasoning: dict[str, Any] | None = None
    top_logprobs: int | None = None
    # accepted and not used
    user: str | None = None
    metadata: dict[str, str] | None = None

    def to_request(self) -> ChatRequest:
        """The chat request this body asks for; a ContractError (400) naming what cannot be
        served."""
        self._check_unserved()
        messages = ([ChatMessage("system", self.instructions)] if self.instructions else []) \
            + input_messages(self.input)
        choice, name = _tool_choice(self.tool_choice)
        max_tokens = DEFAULT_MAX_OUTPUT_TOKENS if self.max_output_tokens is None \
            else self.max_output_tokens
        request = ChatRequest(messages, max_tokens,
                              0.0 if self.temperature is None else self.temperature,
                              1.0 if self.top_p is None else self.top_p, [], self._json_schema(),
                              [_tool(i, t) for i, t in enumerate(self.tools or [])], choice, name,
                              self.parallel_tool_calls is not False)
        validate_request(request)
        return request

    def _check_unserved(self) -> None:
        stateful = {"store": self.store, "previous_response_id": self.previous_response_id,
                   "conversation": self.conversation, "background": self.background}
        for name, value in stateful.items():
            if value:
                raise refused(name, "this server keeps no responses: send the whole "
                                     "conversation as input")
        if self.reasoning:
            raise refused("reasoning", "the models here do not reason apart from their answer")
        if self.top_logprobs:
            raise refused("top_logprobs", "log-probabilities are not returned by this server")
        if self.include:
            raise refused("include", f"nothing more can be included ({', '.join(self.include)})")
        if self.truncation not in (None, "disabled"):
            raise refused("truncation", "a conversation longer than the model's context is "
                                         "refused, not truncated")

    def _json_schema(self) -> str:
        match (self.text or {}).get("format"):
            case None | {"type": "text"}:
                return ""
            case {"type": "json_schema", "schema": dict() as schema}:
                return json.dumps(schema)
            case other:
                raise ContractError(f"text.format {json.dumps(other)}: \"text\" or "
                                    "\"json_schema\" with a schema")


def _tool(index: int, tool: dict[str, Any]) -> Tool:
    where = f"tools[{index}]"
    if tool.get("type") != "function":
        raise ContractError(f"{where}: tools of type {tool.get('type')!r} are not served; "
                            "function tools are")
    _only(tool, {"type", "name", "description", "parameters", "strict"}, where)
    if not isinstance(tool.get("name"), str):
        raise ContractError(f"{where}: a function tool needs a name")
    parameters = tool.get("parameters") or {"type": "object", "properties": {}}
    return Tool(tool["name"], str(tool.get("description") or ""), json.dumps(parameters))


def _tool_choice(choice: str | dict[str, Any] | None) -> tuple[str, str]:
    match choice:
        case None:
            return "auto", ""
        case "auto" | "none" | "required":
            return choice, ""
        case {"type": "function", "name": str() as name}:
            return "required", name
        case _:
            raise ContractError("tool_choice: one of \"auto\", \"none\", \"required\" or "
                                f"{{\"type\": \"function\", \"name\": ...}}, got {json.dumps(choice)}")


def _only(item: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise ContractError(f"{where}: unknown field(s) {', '.join(unknown)}")


def input_messages(items: str | list[dict[str, Any]]) -> list[ChatMessage]:
    """The input items as chat messages: consecutive function calls join the assistant turn
    before them (or open one), each output becomes a tool message answering its call."""
    if isinstance(items, str):
        return [ChatMessage("user", items)]
    messages: list[ChatMessage] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise ContractError(f"{where}: an input item is an object")
        kind = item.get("type", "message")
        if kind == "message":
            _only(item, {"type", "role", "content", "id", "status"}, where)
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise ContractError(f"{where}: unknown role {role!r}")
            messages.append(ChatMessage("system" if role == "developer" else role,
                                        _text_of(item.get("content"), where)))
        elif kind == "function_call":
            _only(item, {"type", "call_id", "name", "arguments", "id", "status"}, where)
            call = ToolCall(str(item.get("call_id", "")), str(item.get("name", "")),
                            str(item.get("arguments", "")))
            if messages and messages[-1].role == "assistant":  # the same turn's calls
                last = messages.pop()
                messages.append(ChatMessage("assistant", last.content, [*last.tool_calls, call]))
            else:
                messages.append(ChatMessage("assistant", "", [call]))
        elif kind == "function_call_output":
            _only(item, {"type", "call_id", "output", "id", "status"}, where)
            messages.append(ChatMessage("tool", _text_of(item.get("output"), where),
                                        tool_call_id=str(item.get("call_id", ""))))
        else:
            raise ContractError(f"{where}: input items of type {kind!r} are not served; "
                                "messages, function_call and function_call_output are")
    return messages


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ContractError(f"{where}: content is a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text"):
            raise ContractError(f"{where}.content[{j}]: parts of type {kind!r} are not served "
                                "here; text parts are")
        texts.append(str(part.get("text", "")))
    return "".join(texts)


# --- the response ---------------------------------------------------------------------------

@dataclass
class ResponseBuilder:
    """The response object and, for a stream, its events, built from the node's chunks."""

    request_id: str
    model: str
    body: ResponsesBody
    created_at: int = field(default_factory=lambda: int(time.time()))
    text: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    sequence: int = 0
    message_open: bool = False

    @property
    def id(self) -> str:
        return f"resp_{self.request_id}"

    @property
    def message_id(self) -> str:
        return f"msg_{self.request_id}"

    def response(self, last: TextChunk | None) -> dict[str, Any]:
        """The response object: in progress (``last`` None) or as it ended."""
        done = last is not None
        cut = done and last.finish_reason == "length"
        output = ([self._message("completed" if done else "in_progress")] if self.text else []) \
            + [self._call(c) for c in self.calls]
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": ("incomplete" if cut else "completed") if done else "in_progress",
            "model": self.model, "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "instructions": self.body.instructions, "metadata": self.body.metadata or {},
            "parallel_tool_calls": self.body.parallel_tool_calls is not False,
            "temperature": self.body.temperature, "top_p": self.body.top_p,
            "max_output_tokens": self.body.max_output_tokens,
            "tool_choice": self.body.tool_choice or "auto", "tools": self.body.tools or [],
            "text": self.body.text or {"format": {"type": "text"}},
            "usage": _usage(last) if done else None}

    def _message(self, status: str) -> dict[str, Any]:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": self.text, "annotations": []}]}

    @staticmethod
    def _call(call: ToolCall, arguments: str | None = None) -> dict[str, Any]:
        return {"type": "function_call", "id": f"fc_{call.id}", "call_id": call.id,
                "name": call.name, "status": "completed" if arguments is None else "in_progress",
                "arguments": call.arguments if arguments is None else arguments}

    def add(self, chunk: TextChunk) -> None:
        """A chunk of the reply, for the whole response."""
        self.text += chunk.text
        self.calls += chunk.tool_calls

    # --- streaming -------------------------------------------------------------------------

    def event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {msgspec.json.encode(data).decode()}\n\n".encode()

    def opening(self) -> Iterator[bytes]:
        yield self.event("response.created", response=self.response(None))
        yield self.event("response.in_progress", response=self.response(None))

    def stream(self, chunk: TextChunk) -> Iterator[bytes]:
        """The events of one chunk: text deltas (the message opened at the first), then each
        completed call as an item of its own (the message closed before it)."""
        if chunk.text:
            if not self.message_open:
                self.message_open = True
                message = {**self._message("in_progress"), "content": []}
                yield self.event("response.output_item.added", output_index=0, item=message)
                yield self.event("response.content_part.added", item_id=self.message_id,
                                 output_index=0, content_index=0,
                                 part={"type": "output_text", "text": "", "annotations": []})
            self.text += chunk.text
            yield self.event("response.output_text.delta", item_id=self.message_id,
                             output_index=0, content_index=0, delta=chunk.text, logprobs=[])
        if chunk.tool_calls or chunk.final:
            yield from self._close_message()
        for call in chunk.tool_calls:
            index = len(self.calls) + (1 if self.text else 0)
            self.calls.append(call)
            yield self.event("response.output_item.added", output_index=index,
                             item=self._call(call, ""))
            yield self.event("response.function_call_arguments.delta", item_id=f"fc_{call.id}",
                             output_index=index, delta=call.arguments)
            yield self.event("response.function_call_arguments.done", item_id=f"fc_{call.id}",
                             output_index=index, arguments=call.arguments)
            yield self.event("response.output_item.done", output_index=index,
                             item=self._call(call))
        if chunk.final:
            done = self.response(chunk)
            yield self.event("response.incomplete" if done["status"] == "incomplete"
                             else "response.completed", response=done)

    def _close_message(self) -> Iterator[bytes]:
        if not self.message_open:
            return
        self.message_open = False
        part = {"type": "output_text", "text": self.text, "annotations": []}
        yield self.event("response.output_text.done", item_id=self.message_id, output_index=0,
                         content_index=0, text=self.text, logprobs=[])
        yield self.event("response.content_part.done", item_id=self.message_id, output_index=0,
                         content_index=0, part=part)
        yield self.event("response.output_item.done", output_index=0,
                         item=self._message("completed"))

    def failure(self, error: ApiError) -> bytes:
        """A stream that fails after it began ends with an error event."""
        return self.event("error", code=error.code or error.error_type, message=error.message,
                          param=error.param)


def _usage(chunk: TextChunk) -> dict[str, Any]:
    return {"input_tokens": chunk.prompt_tokens, "output_tokens": chunk.completion_tokens,
            "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0}}
