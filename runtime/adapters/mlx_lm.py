"""Text generation with mlx-lm: GGUF files (converted once) and MLX/Hugging Face model directories."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np

from mofa_omni.adapters.base import AdapterError, ModelAdapter, Progress
from mofa_omni.contract import (ChatRequest, RerankRequest, RerankResult, Task, TextChunk,
                                validate_request)
from mofa_omni.llm_rerank import relevance_scores, rerank_method
from mofa_omni.structured import structured_reply
from mofa_omni.store import link_model_directory


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

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.pending += text
        hits = [i for i in (self.pending.find(stop) for stop in self.stops) if i >= 0]
        if hits:
            emit, self.pending, self.stopped = self.pending[:min(hits)], "", True
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

    A base model without a template continues the plain text of its messages.
    """
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = "\n\n".join(m["content"] for m in messages)
    bos = tokenizer.bos_token
    return tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))


class MlxLmAdapter(ModelAdapter):
    """Chat models served by mlx-lm. ``options.dtype`` picks how a GGUF is converted
    (``float32``, ``float16`` or ``quantized``; see :mod:`mofa_omni.formats.gguf`);
    ``options.bits`` (e.g. 8) quantizes the converted weights with MLX when they load."""

    supported_tasks: ClassVar[frozenset[Task]] = frozenset({Task.TEXT_GENERATION, Task.RERANK})
    formats: ClassVar[frozenset[str]] = frozenset({"gguf", "mlx"})
    backend: ClassVar[str] = "mlx"

    def __init__(self, spec):
        super().__init__(spec)
        self._model = None
        self._tokenizer = None

    # --- lifecycle -------------------------------------------------------------------

    def prepare(self, source_dir: Path, out_dir: Path, progress: Progress) -> None:
        """Convert the GGUF in ``source_dir``, or link an MLX model directory's files as they are."""
        if self.spec.format == "mlx":
            link_model_directory(self.spec.name, source_dir, out_dir, progress)
            return
        from mofa_omni.formats.gguf import convert_gguf, find_gguf

        gguf = find_gguf(source_dir, self.spec.name, self.spec.options.get("file"))
        convert_gguf(gguf, out_dir, dtype=self.spec.options.get("dtype", "float32"),
                     progress=progress)

    def _load(self, model_dir: Path) -> None:
        from mlx_lm.utils import load_model, load_tokenizer

        model, config = load_model(Path(model_dir))
        if bits := self.spec.options.get("bits"):
            import mlx.core as mx
            import mlx.nn as nn

            # Quantized in memory at load (the converted float32 files stay as they are).
            nn.quantize(model, group_size=int(self.spec.options.get("group_size", 64)),
                        bits=int(bits))
            mx.eval(model.parameters())
        self._tokenizer = load_tokenizer(Path(model_dir), eos_token_ids=config.get("eos_token_id"))
        self._model = model

    def _unload(self) -> None:
        self._model = None
        self._tokenizer = None

    # --- serving ---------------------------------------------------------------------

    def prompt_tokens(self, request: ChatRequest) -> list[int]:
        return chat_prompt_tokens(self._tokenizer, request)

    def generate(self, request: ChatRequest) -> Iterator[TextChunk]:
        """Stream the reply to ``request``; the last chunk is final and carries the usage.

        Greedy at temperature 0. With ``json_schema``, the reply is JSON satisfying it
        (:mod:`mofa_omni.structured`). Stops at EOS, at ``max_tokens`` (finish_reason
        "length") or at a stop sequence, which is never emitted. Closing the
        generator stops the computation.
        """
        from mlx_lm.generate import stream_generate
        from mlx_lm.sample_utils import make_sampler

        validate_request(request)
        if self._model is None:
            raise AdapterError(f"model {self.spec.name!r} is not loaded")
        prompt = self.prompt_tokens(request)
        if request.json_schema:
            return structured_reply(request, self._tokenizer, self, prompt)
        sampler = make_sampler(temp=request.temperature, top_p=request.top_p)
        responses = stream_generate(self._model, self._tokenizer, prompt,
                                    max_tokens=request.max_tokens, sampler=sampler)

        def pieces() -> Generator[Piece, None, None]:
            try:  # EOS arrives as a response of its own: its text is not a generated token's
                for r in responses:
                    yield Piece(r.text, token=r.finish_reason != "stop",
                                end=r.finish_reason == "stop")
            finally:
                responses.close()

        return stream_reply(pieces(), request.stop, len(prompt))

    def rerank(self, request: RerankRequest) -> RerankResult:
        """Score each document with the model (see :mod:`mofa_omni.llm_rerank`)."""
        if self._model is None:
            raise AdapterError(f"model {self.spec.name!r} is not loaded")
        return RerankResult(relevance_scores(request, self._tokenizer, self,
                                             rerank_method(self.spec.options)))

    def _log_probs(self, sequences: list[list[int]]):
        """log-softmax of the logits at every position (right padding: the model is causal)."""
        import mlx.core as mx

        width = max(len(s) for s in sequences)
        logits = self._model(mx.array([s + [0] * (width - len(s)) for s in sequences]))
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def next_log_probs(self, prompts: list[list[int]]) -> np.ndarray:
        import mlx.core as mx

        log_probs = self._log_probs(prompts)
        return np.array(mx.stack([log_probs[i, len(p) - 1] for i, p in enumerate(prompts)]),
                        np.float32)

    def sequence_log_probs(self, sequences: list[list[int]]) -> list[np.ndarray]:
        import mlx.core as mx

        log_probs = self._log_probs(sequences)
        return [np.array(mx.take_along_axis(log_probs[i, :len(s) - 1],
                                            mx.array(s[1:])[:, None], axis=-1)[:, 0], np.float32)
                for i, s in enumerate(sequences)]
