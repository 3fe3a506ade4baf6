"""How tools, tool calls and tool results are written into a chat model's prompt.

One call syntax for every model, the one Hermes-style templates (Qwen 2.5 and 3, Hermes,
SmolLM3 and many fine-tunes) are trained on::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that knows it (its source mentions ``tools`` and ``<tool_call>``) gets the
conversation as Hugging Face's chat templates take it: ``tools=`` beside the messages,
assistant messages with ``tool_calls``, ``tool`` messages with their ``tool_call_id``.
Any other template (SmolLM2's, Gemma's: plain turns) gets the documented fallback: the
tools and the syntax described in the system message, earlier calls written into the
assistant's turn in that syntax, and the results of a turn's calls given back as one user
turn, "The result of get_weather is: …" then "Answer my question with it." (one turn, so
that templates demanding alternating roles accept it; plain words, because the small
models tried here answered from them where they echoed ``<tool_response>`` tags).
"""

from __future__ import annotations

import json
from typing import Any

from mofa_omni.contract.tasks import ChatMessage, ChatRequest, Tool, ToolCall

OPENER = "<tool_call>\n"
CLOSER = "\n</tool_call>"
MARKER = "<tool_call>"  # what starts a call in the model's own text


def knows_tools(chat_template: Any) -> bool:
    """Whether a chat template renders tools and calls in the Hermes syntax itself."""
    return isinstance(chat_template, str) and "tools" in chat_template \
        and MARKER in chat_template


def call_text(call: ToolCall) -> str:
    """A call as the model writes it (the same JSON spacing the decoder writes)."""
    return OPENER + json.dumps({"name": call.name, "arguments": json.loads(call.arguments)}) \
        + CLOSER


def function_schema(tool: Tool) -> dict[str, Any]:
    """A tool as OpenAI and Hugging Face chat templates describe it."""
    return {"type": "function", "function": {"name": tool.name, "description": tool.description,
                                             "parameters": json.loads(tool.parameters)}}


def offered_tools(request: ChatRequest) -> list[Tool]:
    """The tools the prompt shows: none under ``tool_choice: "none"`` (the model answers)."""
    return [] if request.tool_choice == "none" else list(request.tools)


def template_messages(request: ChatRequest, native: bool
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages for ``apply_chat_template`` and its ``tools=`` (None: no tools)."""
    tools = offered_tools(request)
    if native:
        return ([_native(m) for m in request.messages],
                [function_schema(t) for t in tools] or None)
    messages: list[dict[str, Any]] = []
    names = {call.id: call.name for message in request.messages for call in message.tool_calls}
    results: list[str] = []  # the results of one turn's calls, given back in one user turn
    for message in request.messages:
        if message.role == "tool":
            results.append(f"The result of {names[message.tool_call_id]} is: {message.content}")
            continue
        if results:
            messages.append({"role": "user", "content": _results_turn(results)})
            results = []
        calls = [call_text(call) for call in message.tool_calls]
        content = "\n".join([message.content] * bool(message.content) + calls)
        messages.append({"role": message.role, "content": content})
    if results:
        messages.append({"role": "user", "content": _results_turn(results)})
    if tools:
        instructions = fallback_instructions(tools)
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] = messages[0]["content"] + "\n\n" + instructions
        else:
            messages.insert(0, {"role": "system", "content": instructions})
    return messages, None


def _results_turn(results: list[str]) -> str:
    return "\n".join(results) + ("\nAnswer my question with it." if len(results) == 1
                                 else "\nAnswer my question with them.")


def fallback_instructions(tools: list[Tool]) -> str:
    """The system text that tells a model without a tool template what it may call and how."""
    listed = "\n".join(json.dumps(function_schema(tool)) for tool in tools)
    return ("You may call one or more functions to answer the user. The functions are:\n"
            f"<tools>\n{listed}\n</tools>\n"
            "To call a function, reply with:\n"
            f'{OPENER}{{"name": <function name>, "arguments": <its arguments as a JSON object>}}'
            f"{CLOSER}")


def _native(message: ChatMessage) -> dict[str, Any]:
    entry: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        entry["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                               for c in message.tool_calls]
    if message.role == "tool":
        entry["tool_call_id"] = message.tool_call_id
    return entry
