"""One base class for every chat-LM backend: ``generate`` and ``rerank`` written once.

:class:`ChatLmAdapter` owns, for MLX, CTranslate2 and llama.cpp alike, the chat
template, request checks, structured output (:mod:`mofa_omni.adapters.structured`),
reranking (:mod:`mofa_omni.adapters.llm_rerank`), stop sequences and the usage of
the final chunk (:mod:`mofa_omni.adapters.chat`). A backend supplies only its
engine's pieces of text (:meth:`~ChatLmAdapter.pieces`) and token
log-probabilities (``next_log_probs`` / ``sequence_log_probs``).
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from collections.abc import Generator, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.chat import Piece, chat_prompt_tokens, stream_reply
from mofa_omni.adapters.llm_rerank import relevance_scores, rerank_method
from mofa_omni.adapters.options import AdapterOptions, ChatLmOptions
from mofa_omni.adapters.structured import structured_reply
from mofa_omni.adapters.tool_calls import tool_reply
from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import (
    ChatRequest,
    RerankRequest,
    RerankResult,
    Task,
    TextChunk,
    validate_request,
)
from mofa_omni.models.footprint import LlmShape, kv_cache_bytes, tokenizer_bytes, weight_bytes


class ChatLmAdapter(ModelAdapter):
    """A chat LLM on some engine: text generation and reranking from one loaded model.

    Subclasses load ``self._tokenizer`` (an mlx-lm ``TokenizerWrapper``) and their engine,
    and implement :meth:`pieces`, :meth:`next_log_probs` and :meth:`sequence_log_probs`.
    All of them take the same catalog options (:class:`~mofa_omni.adapters.options.ChatLmOptions`):
    one GGUF entry lists several of these adapters.
    """

    supported_tasks: ClassVar[frozenset[Task]] = frozenset({Task.TEXT_GENERATION, Task.RERANK})
    Options: ClassVar[type[AdapterOptions]] = ChatLmOptions
    options: ChatLmOptions
    # The engine's buffers that grow with the vocabulary (logits), per entry, beside
    # ``runtime_bytes``; measured like it.
    runtime_bytes_per_token: ClassVar[int] = 0

    def __init__(self, spec):
        super().__init__(spec)
        self._tokenizer: Any = None

    def kv_cache_tokens(self) -> int:
        """Positions whose KV cache the engine reserves when it loads (0: it grows with use)."""
        return 0

    def kv_cache_value_bytes(self) -> int:
        """Bytes of one cached key or value element."""
        return 2

    def estimate_bytes(self, model_dir: Path) -> int:
        """Weights, the KV cache reserved at load, the tokenizer and the engine's buffers."""
        shape = LlmShape.of_directory(model_dir)
        reserved = kv_cache_bytes(shape, self.kv_cache_tokens(),
                                  self.kv_cache_value_bytes()) if shape else 0
        per_token = shape.vocab * self.runtime_bytes_per_token if shape else 0
        return (weight_bytes(model_dir) + reserved + tokenizer_bytes(shape) + per_token
                + self.runtime_bytes)

    # --- what a backend supplies -------------------------------------------------------

    @abstractmethod
    def pieces(self, request: ChatRequest, prompt: list[int]) -> Generator[Piece, None, None]:
        """The reply's text as the engine produces it (sampling as ``request`` asks)."""

    @abstractmethod
    def next_log_probs(self, prompts: list[list[int]]) -> np.ndarray:
        """Log-probabilities of the next token after each prompt: (len(prompts), vocab)."""

    @abstractmethod
    def sequence_log_probs(self, sequences: list[list[int]]) -> list[np.ndarray]:
        """For each sequence, the log-probability of each of its tokens after the first."""

    def continuation_log_probs(self, prefix: list[int],
                               continuations: list[list[int]]) -> list[np.ndarray]:
        """Log-probabilities of each continuation's own tokens after ``prefix`` (a structured
        reply's or a tool call's choices). By default every whole sequence is scored; an
        engine that keeps the prefix's state scores only what follows it."""
        scored = self.sequence_log_probs([prefix + list(c) for c in continuations])
        return [log_probs[len(prefix) - 1:] for log_probs in scored]

    def check_prompt(self, prompt: list[int], request: ChatRequest) -> None:
        """Refuse a prompt the engine cannot take (e.g. beyond its context); default: none."""

    def check_room(self, prompt: list[int], request: ChatRequest, limit: int,
                   what: str) -> None:
        """Refuse a request whose prompt and ``max_tokens`` exceed ``limit`` tokens (``what``
        says whose limit it is), naming the figures."""
        if len(prompt) + request.max_tokens > limit:
            raise ContractError(f"model {self.spec.name!r}: the prompt ({len(prompt)} tokens) "
                                f"and max_tokens ({request.max_tokens}) exceed the {limit} "
                                f"tokens {what}")

    def session(self, need: int, prompt: list[int]) -> AbstractContextManager[Any]:
        """What serves one request of ``need`` tokens starting with ``prompt``: something with
        :meth:`pieces` and the token scores (:class:`~mofa_omni.adapters.llm_rerank.TokenScorer`).
        By default this adapter itself, serving one request at a time; an engine decoding
        several requests together (llama.cpp) gives each its own, waiting for room if needed."""
        return contextlib.nullcontext(self)

    # --- what every backend shares --------------------------------------------------

    def prompt_tokens(self, request: ChatRequest) -> list[int]:
        return chat_prompt_tokens(self._require_tokenizer(), request)

    def generate(self, request: ChatRequest) -> Iterator[TextChunk]:
        """Stream the reply to ``request``; the last chunk is final and carries the usage.

        Greedy at temperature 0. With ``json_schema``, the reply is JSON satisfying it
        (:mod:`mofa_omni.adapters.structured`); with tools, it may be or end in tool calls
        (:mod:`mofa_omni.adapters.tool_calls`). Stops at EOS, at ``max_tokens``
        (finish_reason "length") or at a stop sequence, which is never emitted. Closing the
        generator stops the computation.
        """
        validate_request(request)
        tokenizer = self._require_tokenizer()
        prompt = self.prompt_tokens(request)
        self.check_prompt(prompt, request)
        return self._reply(request, tokenizer, prompt)

    def _reply(self, request: ChatRequest, tokenizer, prompt: list[int]) -> Iterator[TextChunk]:
        with self.session(len(prompt) + request.max_tokens, prompt) as session:
            if request.json_schema:
                yield from structured_reply(request, tokenizer, session, prompt)
            elif request.tools:
                yield from tool_reply(request, tokenizer, session, prompt,
                                      lambda: session.pieces(request, prompt))
            else:
                yield from stream_reply(session.pieces(request, prompt), request.stop,
                                        len(prompt))

    def rerank(self, request: RerankRequest) -> RerankResult:
        """Score each document with the model (see :mod:`mofa_omni.adapters.llm_rerank`)."""
        tokenizer = self._require_tokenizer()
        # Its prompts are built inside: the room of the whole context, the longest they can be.
        with self.session(self.context_tokens(), []) as session:
            return RerankResult(relevance_scores(request, tokenizer, session,
                                                 rerank_method(self.options.rerank)))

    def context_tokens(self) -> int:
        """The most tokens one request may take (prompt and reply); 0: the engine's limit is
        not known here (the session then takes no room)."""
        return 0

    def _require_tokenizer(self):
        if self._tokenizer is None:
            raise self.not_loaded()
        return self._tokenizer
