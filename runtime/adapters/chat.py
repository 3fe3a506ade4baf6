"""Chat text every LLM backend shares: the prompt through the chat template, pieces of reply
text, stop sequences held back, and the streamed chunks with their usage (engine-neutral)."""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator
from typing import NamedTuple

from mofa_omni.adapters.tool_format import knows_tools, template_messages
from mofa_omni.contract.tasks import ChatRequest, TextChunk


class StopMatcher:
    """Streams text through while holding back anything that could be the start of a stop sequence.

    ``feed`` returns the text that is safe to emit and whether a stop sequence
    was seen (the stop text itself and everything after it are never emitted);
    ``flush`` returns what is still held back once the stream ends without one.
    """

    def __init__(self, stops: list[str]):
        self.stops = [stop for stop in stops if stop]
        self.pending = ""
        self.stopped = False
        self.seen = ""  # the stop sequence that ended the stream

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.pending += text
        hits = [(i, stop) for stop in self.stops if (i := self.pending.find(stop)) >= 0]
        if hits:
            at, self.seen = min(hits)
            emit, self.pending, self.stopped = self.pending[:at], "", True
            return emit, True
        held = max((self._overlap(stop) for stop in self.stops), default=0)
        cut = len(self.pending) - held
        emit, self.pending = self.pending[:cut], self.pending[cut:]
        return emit, False

    def flush(self) -> str:
        emit, self.pending = self.pending, ""
        return emit

    def _overlap(self, stop: str) -> int:
        """Length of the longest end of ``pending`` that is a proper start of ``stop``."""
        for size in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(stop[:size]):
                return size
        return 0


class Piece(NamedTuple):
    """Text an LLM backend produced: ``token`` if it is a generated token's (counted in the
    usage), ``end`` if the model ended its reply (EOS)."""

    text: str
    token: bool = True
    end: bool = False


def stream_reply(pieces: Generator[Piece, None, None], stops: list[str],
                 prompt_tokens: int) -> Iterator[TextChunk]:
    """The reply's chunks from a backend's pieces, for every LLM adapter: stop sequences are
    held back and never emitted, and the last chunk is final and carries the usage. Closing
    the stream closes ``pieces``, which stops the model at once."""
    matcher = StopMatcher(stops)
    completion, finish = 0, "length"
    try:
        for piece in pieces:
            completion += piece.token
            if piece.end:
                finish = "stop"
            text, stopped = matcher.feed(piece.text)
            if text:
                yield TextChunk(text)
            if stopped:
                finish = "stop"
                break
    finally:
        pieces.close()
    if tail := matcher.flush():
        yield TextChunk(tail)
    yield TextChunk("", final=True, finish_reason=finish, prompt_tokens=prompt_tokens,
                    completion_tokens=completion)


def chat_prompt_tokens(tokenizer, request: ChatRequest) -> list[int]:
    """The request's messages as token ids, through the model's chat template if it has one.

    Tools, tool calls and tool results are written as :mod:`mofa_omni.adapters.tool_format`
    says. A base model without a template continues the plain text of its messages.
    """
    native = knows_tools(tokenizer.chat_template)
    messages, tools = template_messages(request, native)
    if tokenizer.chat_template:
        extra = {"tools": tools} if tools else {}
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                             **extra)
    else:
        text = "\n\n".join(m["content"] for m in messages)
    bos = tokenizer.bos_token
    return tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))


def detokenized_pieces(tokens: Iterable[int], tokenizer, *, limit: int | None = None
                       ) -> Generator[Piece, None, None]:
    """Pieces from an engine that yields token ids: text through the tokenizer's streaming
    detokenizer, until EOS (ended) or ``limit`` tokens. Closing it closes ``tokens``."""
    eos = set(tokenizer.eos_token_ids)
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    ended, produced = False, 0
    try:
        for token in tokens:
            if token in eos:
                ended = True
                break
            detokenizer.add_token(token)
            yield Piece(detokenizer.last_segment)
            produced += 1
            if limit is not None and produced >= limit:
                break
    finally:
        if hasattr(tokens, "close"):
            tokens.close()
    detokenizer.finalize()
    yield Piece(detokenizer.last_segment, token=False, end=ended)
