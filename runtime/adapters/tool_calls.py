"""Tool calls decoded so that every call names a real tool and its arguments fit the schema.

How a reply with tools is made, on every LLM backend (they supply only pieces of text
and token log-probabilities, as for structured output):

- ``tool_choice: "auto"`` keeps the model's own choice: the reply is decoded as any other
  (greedy at temperature 0, sampled otherwise), and the moment its text starts a call
  (``<tool_call>``, :mod:`mofa_omni.adapters.tool_format`) decoding switches to the
  constrained call below; text written before it is the message's content. A model that
  does not start a call answers in prose. The choice is thus the likelihood the decoding
  itself follows, token by token, not a separate guess.
- ``"required"`` starts the call at once; a named function (``tool_name``) too, with that
  name written rather than chosen; ``"none"`` decodes prose with no tools in the prompt.
- A call is written as ``{"name": …, "arguments": {…}}``: the name is the tool whose name
  the model finds most likely there (all scored in one batch, as the robot planner picks
  actions); the arguments are written field by field by the structured-output writer
  (:func:`mofa_omni.adapters.structured.write_object`) for that tool's schema.
- After a call, another follows (when ``parallel_tool_calls`` allows) if the model finds
  the start of another call likelier than ending its turn.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Generator, Iterator

from mofa_omni.adapters.chat import Piece, StopMatcher, stream_reply
from mofa_omni.adapters.structured import Reply, most_likely, write_object
from mofa_omni.adapters.tool_format import CLOSER, MARKER, OPENER
from mofa_omni.contract.schema import parse_schema
from mofa_omni.contract.tasks import ChatRequest, TextChunk, ToolCall

MAX_CALLS = 8  # calls in one reply


def tool_reply(request: ChatRequest, tokenizer, scorer, prompt: list[int],
               pieces: Callable[[], Generator[Piece, None, None]]) -> Iterator[TextChunk]:
    """The reply to a request with tools: text, tool calls, or text then calls. Each call
    comes in its own chunk as soon as it is complete; the final chunk says "tool_calls" when
    the reply ends in calls."""
    if not request.tools or request.tool_choice == "none":
        yield from stream_reply(pieces(), request.stop, len(prompt))
        return
    text, completion = "", 0
    if request.tool_choice == "auto":
        matcher = StopMatcher([*request.stop, MARKER])
        stream, finish = pieces(), "length"
        try:
            for piece in stream:
                completion += piece.token
                finish = "stop" if piece.end else finish
                emit, stopped = matcher.feed(piece.text)
                text += emit
                if emit:
                    yield TextChunk(emit)
                if stopped:
                    finish = "stop"
                    break
        finally:
            stream.close()
        if matcher.seen != MARKER:
            if tail := matcher.flush():
                yield TextChunk(tail)
            yield TextChunk("", final=True, finish_reason=finish, prompt_tokens=len(prompt),
                            completion_tokens=completion)
            return
    reply = Reply(prompt, tokenizer, request.max_tokens, text)
    reply.write(OPENER)
    calls = 0
    for call in _calls(request, reply, scorer):
        calls += 1
        yield TextChunk("", tool_calls=[call])
    yield TextChunk("", final=True, finish_reason="tool_calls" if calls else "length",
                    prompt_tokens=len(prompt), completion_tokens=max(reply.written, completion))


def _calls(request: ChatRequest, reply: Reply, scorer) -> Iterator[ToolCall]:
    """The calls written after ``reply.text`` (which ends with the opener), one by one."""
    names = [request.tool_name] if request.tool_name else [tool.name for tool in request.tools]
    shapes = {tool.name: parse_schema(tool.parameters, tool=True) for tool in request.tools}
    end_of_turn = reply.tokenizer.eos_token or ""
    for count in range(1, MAX_CALLS + 1):
        reply.write('{"name": ')
        name = names[most_likely(reply, [json.dumps(n) for n in names], scorer)]
        reply.write(json.dumps(name) + ', "arguments": ')
        start = len(reply.text)
        for _ in write_object(reply, shapes[name], scorer):
            pass
        if reply.cut:
            return  # max_tokens ran out inside the arguments: no call to give
        yield ToolCall(f"call_{secrets.token_hex(12)}", name, reply.text[start:])
        reply.write("}" + CLOSER)
        if (request.tool_name or not request.parallel_tool_calls or reply.exhausted
                or not end_of_turn or count == MAX_CALLS):
            return
        if most_likely(reply, ["\n" + OPENER, end_of_turn], scorer) != 0:
            return
        reply.write("\n" + OPENER)
