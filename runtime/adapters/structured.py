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

Supported schema subset: an ``object`` whose ``properties`` are all ``required``
(``additionalProperties`` false implied), each a ``string`` (with ``enum``, or with
``maxLength``), an ``integer`` (with ``minimum``/``maximum``) or a ``boolean``.
Anything else is a :class:`~mofa_omni.contract.tasks.ContractError` naming the keyword.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np

from mofa_omni.contract.schema import Choice, Integer, Text, parse_schema
from mofa_omni.contract.tasks import ChatRequest, TextChunk

TEXT_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 -'.,")
CANDIDATES = 64  # the most likely tokens looked at per step before scanning them all


class _Reply:
    """The JSON written so far, and the token sequence the model reads it as."""

    def __init__(self, prompt: list[int], tokenizer):
        self.prompt = prompt
        self.tokenizer = tokenizer
        self.text = ""

    def tokens(self, text: str | None = None) -> list[int]:
        written = self.text if text is None else text
        return self.prompt + self.tokenizer.encode(written, add_special_tokens=False)


def structured_reply(request: ChatRequest, tokenizer, scorer, prompt: list[int]) -> Iterator[TextChunk]:
    """The reply to ``request`` as JSON satisfying ``request.json_schema``, streamed field by
    field; the last chunk is final (finish_reason "stop", or "length" when ``max_tokens`` ran
    out first — the JSON is then cut short and says so by not parsing)."""
    shape = parse_schema(request.json_schema)
    reply = _Reply(prompt, tokenizer)
    budget = request.max_tokens
    written = 0

    def emit(text: str) -> TextChunk:
        nonlocal written
        reply.text += text
        written = len(tokenizer.encode(reply.text, add_special_tokens=False))
        return TextChunk(text)

    yield emit("{")
    for index, (name, field) in enumerate(shape.fields):
        yield emit(("" if index == 0 else ", ") + json.dumps(name) + ": ")
        if written >= budget:
            break
        match field:
            case Choice(values):
                yield emit(json.dumps(_choose(reply, values, scorer)))
            case Text():
                yield emit(json.dumps(_generate_text(reply, field, scorer, budget)))
            case Integer():
                yield emit(str(_generate_integer(reply, field, scorer)))
    else:
        yield emit("}")
        yield TextChunk("", final=True, finish_reason="stop", prompt_tokens=len(prompt),
                        completion_tokens=written)
        return
    yield TextChunk("", final=True, finish_reason="length", prompt_tokens=len(prompt),
                    completion_tokens=written)


def _choose(reply: _Reply, values: tuple, scorer) -> str | bool:
    """The value whose JSON text the model finds most likely after what is written."""
    if len(values) == 1:
        return values[0]
    base = reply.tokens()
    sequences = [reply.tokens(reply.text + json.dumps(value)) for value in values]
    scored = scorer.sequence_log_probs(sequences)
    totals = []
    for sequence, log_probs in zip(sequences, scored):
        shared = common_prefix(base, sequence)
        # log_probs[t - 1] is log P(sequence[t] | sequence[:t]); sum the value's own tokens.
        totals.append(float(np.sum(log_probs[max(shared, 1) - 1:])))
    return values[int(np.argmax(totals))]


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens ``a`` and ``b`` share from their start."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _generate_text(reply: _Reply, field: Text, scorer, budget: int) -> str:
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


def _generate_integer(reply: _Reply, field: Integer, scorer) -> int:
    digits = ""
    limit = len(str(max(abs(field.minimum), abs(field.maximum))))
    while len(digits.lstrip("-")) < limit:
        piece = _next_piece(reply, digits, scorer, lambda text: _digit_step(text, digits, field))
        if piece is None:
            break
        digits += piece
    value = int(digits) if digits.strip("-") else field.minimum if field.minimum > 0 else 0
    return min(max(value, field.minimum), field.maximum)


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


def _next_piece(reply: _Reply, partial: str, scorer, step) -> str | None:
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
