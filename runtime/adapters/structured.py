"""Structured output: an LLM's reply constrained to a JSON Schema, on any backend.

The reply is built field by field, in the order the schema lists its properties:
the JSON punctuation and keys are written, not generated; an ``enum`` is chosen by
the model as the value it finds most likely (every candidate scored in one batch);
a free string or an integer is generated greedily, token by token, among the
tokens the field still allows (its characters, its length, its range). The result
always parses and always satisfies the schema, even from a 135M model that would
not write valid JSON on its own — the way llama.cpp grammars, Outlines and
OpenAI's structured outputs constrain decoding.

Backends supply token log-probabilities only (:class:`mofa_omni.adapters.llm_rerank.TokenScorer`),
so the same code runs on MLX, CTranslate2 and llama.cpp.

The schema subset it follows is :mod:`mofa_omni.contract.schema`'s; tool calls
(:mod:`mofa_omni.adapters.tool_calls`) write their arguments with the same writer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np

from mofa_omni.contract.schema import Choice, Integer, Number, ObjectShape, Text, parse_schema
from mofa_omni.contract.tasks import ChatRequest, TextChunk

TEXT_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 -'.,")
CANDIDATES = 64  # the most likely tokens looked at per step before scanning them all


class Reply:
    """The text written after the prompt so far, the token sequence the model reads it as,
    and the budget of tokens it may take (``max_tokens``)."""

    def __init__(self, prompt: list[int], tokenizer, budget: int, text: str = ""):
        self.prompt = prompt
        self.tokenizer = tokenizer
        self.budget = budget
        self.text = text
        self.written = 0
        self.cut = False  # the budget ran out before the JSON was complete

    def tokens(self, text: str | None = None) -> list[int]:
        written = self.text if text is None else text
        return self.prompt + self.tokenizer.encode(written, add_special_tokens=False)

    def write(self, text: str) -> str:
        self.text += text
        self.written = len(self.tokenizer.encode(self.text, add_special_tokens=False))
        return text

    @property
    def exhausted(self) -> bool:
        return self.written >= self.budget


def structured_reply(request: ChatRequest, tokenizer, scorer, prompt: list[int]) -> Iterator[TextChunk]:
    """The reply to ``request`` as JSON satisfying ``request.json_schema``, streamed field by
    field; the last chunk is final (finish_reason "stop", or "length" when ``max_tokens`` ran
    out first — the JSON is then cut short and says so by not parsing)."""
    reply = Reply(prompt, tokenizer, request.max_tokens)
    for piece in write_object(reply, parse_schema(request.json_schema), scorer):
        yield TextChunk(piece)
    yield TextChunk("", final=True, finish_reason="length" if reply.cut else "stop",
                    prompt_tokens=len(prompt), completion_tokens=reply.written)


def write_object(reply: Reply, shape: ObjectShape, scorer) -> Iterator[str]:
    """A JSON object of ``shape`` written after ``reply.text``, piece by piece (each piece is
    already added to ``reply``); stops early, with ``reply.cut`` set, when the budget runs out."""
    yield reply.write("{")
    for index, (name, field) in enumerate(shape.fields):
        yield reply.write(("" if index == 0 else ", ") + json.dumps(name) + ": ")
        if reply.exhausted:
            reply.cut = True
            return
        match field:
            case Choice(values):
                yield reply.write(json.dumps(_choose(reply, values, scorer)))
            case Text():
                yield reply.write(json.dumps(_generate_text(reply, field, scorer, reply.budget)))
            case Integer():
                yield reply.write(str(_generate_integer(reply, field, scorer)))
            case Number():
                yield reply.write(_generate_number(reply, field, scorer))
    yield reply.write("}")


def _choose(reply: Reply, values: tuple, scorer) -> str | bool:
    """The value whose JSON text the model finds most likely after what is written."""
    return values[most_likely(reply, [json.dumps(value) for value in values], scorer)]


def most_likely(reply: Reply, continuations: list[str], scorer) -> int:
    """Which of ``continuations`` of ``reply.text`` the model finds most likely: the sum of
    the log-probabilities of each one's own tokens, all scored in one batch."""
    if len(continuations) == 1:
        return 0
    base = reply.tokens()
    sequences = [reply.tokens(reply.text + text) for text in continuations]
    # Where the written text's last token merges with a candidate's first, the prefix ends
    # before it (the merged token is then part of every candidate's own tokens).
    shared = max(1, min(common_prefix(base, sequence) for sequence in sequences))
    scored = scorer.continuation_log_probs(base[:shared], [s[shared:] for s in sequences])
    return int(np.argmax([float(np.sum(log_probs)) for log_probs in scored]))


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens ``a`` and ``b`` share from their start."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _generate_text(reply: Reply, field: Text, scorer, budget: int) -> str:
    """A string of allowed characters, ended where the model closes its quote."""
    value = ""
    for _ in range(budget):
        piece = _next_piece(reply, '"' + value, scorer, lambda text: _text_step(text, value, field))
        if piece is None:
            break
        value += piece
    return value.rstrip()


def _text_step(token_text: str, value: str, field: Text) -> str | None:
    """What a token adds to a string being written: its characters, or None if it may not
    follow (a closing quote ends the string: returned as "")."""
    if token_text.startswith('"'):
        return "" if len(value.strip()) >= field.min_length else None
    if not value:
        token_text = token_text.lstrip()  # no leading blanks
    if not token_text or not set(token_text) <= TEXT_CHARACTERS:
        return None
    if len(value) + len(token_text) > field.max_length:
        return None
    return token_text


def _generate_integer(reply: Reply, field: Integer, scorer) -> int:
    digits = ""
    limit = len(str(max(abs(field.minimum), abs(field.maximum))))
    while len(digits.lstrip("-")) < limit:
        piece = _next_piece(reply, digits, scorer, lambda text: _digit_step(text, digits, field))
        if piece is None:
            break
        digits += piece
    value = int(digits) if digits.strip("-") else field.minimum if field.minimum > 0 else 0
    return min(max(value, field.minimum), field.maximum)


def _generate_number(reply: Reply, field: Number, scorer) -> str:
    """A decimal number: an integer part as for integers, then at most one fraction."""
    digits = ""
    while len(digits) < 16:
        piece = _next_piece(reply, digits, scorer, lambda text: _number_step(text, digits, field))
        if piece is None:
            break
        digits += piece
    try:
        value = float(digits.rstrip("."))
    except ValueError:
        value = max(field.minimum, min(0.0, field.maximum))
    value = min(max(value, field.minimum), field.maximum)
    return json.dumps(int(value) if value.is_integer() and abs(value) < 1e15 else value)


def _number_step(token_text: str, digits: str, field: Number) -> str | None:
    if token_text[:1] in (",", "}", " ") and digits.strip("-."):
        return ""
    text = token_text.lstrip(" ") if not digits else token_text
    if not text:
        return None
    if text == "-" and not digits:
        return text
    if not all(c.isdigit() or c == "." for c in text) or (digits + text).count(".") > 1:
        return None
    candidate = digits + text
    if candidate.startswith(".") or candidate.startswith("-."):
        return None
    if abs(float(candidate.rstrip(".") or 0)) > max(abs(field.minimum), abs(field.maximum)):
        return None
    return text


def _digit_step(token_text: str, digits: str, field: Integer) -> str | None:
    if token_text[:1] in (",", "}", " ") and digits.strip("-"):
        return ""
    text = token_text.lstrip(" ") if not digits else token_text
    if not text:
        return None
    if text == "-" and not digits and field.minimum < 0:
        return text
    if not text.isdigit():
        return None
    candidate = digits + text
    if int(candidate) > field.maximum or (candidate.startswith("-") and int(candidate) < field.minimum):
        return None
    return text


def _next_piece(reply: Reply, partial: str, scorer, step) -> str | None:
    """The most likely allowed continuation of ``partial`` (the field's text so far, written
    after ``reply.text``): its text, "" when the field ends, None when nothing may follow."""
    log_probs = scorer.next_log_probs([reply.tokens(reply.text + partial)])[0]
    order = np.argsort(-log_probs)
    for block in (order[:CANDIDATES], order[CANDIDATES:]):
        for token_id in block:
            added = step(reply.tokenizer.decode([int(token_id)]))
            if added is not None:
                return added or None
    return None
