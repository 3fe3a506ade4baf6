"""Text generation on llama.cpp (llama-cpp-python), reading the catalog's GGUF file as it is.

Nothing is converted: ``prepare`` links the GGUF into the cache and writes the tokenizer
rebuilt from its metadata (the reader the other LLM adapters use), so every backend builds
the same prompt and streams text the same way (mlx-lm's chat template and detokenizer);
llama.cpp only runs the network. Greedy at temperature 0 gives the same tokens as the other
backends up to the arithmetic of the weights' format.

Several requests are served at once (:mod:`mofa_omni.adapters.llama_engine`: their tokens
decoded in shared steps), each on a sequence of the context that keeps its last request's
tokens: a prompt that starts like the last one (the next turn of a conversation) only evaluates
what is new.

Catalog options (:class:`~mofa_omni.adapters.options.ChatLmOptions`): ``context`` (tokens,
default 4096: the KV cache all requests share; one request's prompt + reply must fit),
``parallel`` (requests decoded together, default 4), ``deterministic`` (a greedy reply the
same whatever is decoded beside it; slower, see :mod:`~mofa_omni.adapters.llama_engine`),
``threads`` (default: every core), ``file``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np

from mofa_omni.adapters.chat import Piece, detokenized_pieces
from mofa_omni.adapters.chat_lm import ChatLmAdapter
from mofa_omni.adapters.llama_engine import LlamaEngine, Sampling, Slot
from mofa_omni.adapters.structured import common_prefix
from mofa_omni.contract.errors import ModelLoadError
from mofa_omni.contract.tasks import ChatRequest, Task
from mofa_omni.models.fetching import Progress

WEIGHTS = "model.gguf"
MODEL_CONFIG = "model_config.json"


class LlamaCppAdapter(ChatLmAdapter):
    """GGUF models of the architectures whose tokenizer :mod:`mofa_omni.formats.gguf` reads
    (Llama-family such as SmolLM2, Gemma 3, Qwen2, Qwen3, Qwen3-MoE), run by whatever
    llama.cpp is installed."""

    formats: ClassVar[frozenset[str]] = frozenset({"gguf"})
    backend: ClassVar[str] = "llama.cpp"
    # Fitted to SmolLM2-135M and Gemma 3 270M loaded and answering (vocabularies of 49k and
    # 262k): what grows beyond weights, KV cache and tokenizer is logits, by the vocabulary.
    runtime_bytes_per_token: ClassVar[int] = 2520
    requires: ClassVar[tuple[str, ...]] = ("llama_cpp", "mlx_lm")

    def __init__(self, spec):
        super().__init__(spec)
        self._engine: LlamaEngine | None = None

    def kv_cache_tokens(self) -> int:
        return self.options.context  # llama.cpp reserves the whole context's KV cache

    def kv_cache_value_bytes(self) -> int:
        return 4 if self.options.deterministic else 2  # float32 or float16

    # --- lifecycle -------------------------------------------------------------------

    def prepare(self, source_dir: Path, out_dir: Path, progress: Progress) -> None:
        from mofa_omni.formats.gguf import find_gguf, gguf_parts, open_gguf_parts, write_description

        gguf = find_gguf(source_dir, self.spec.name, self.options.file)
        progress("read GGUF metadata", 0, 1)
        write_description(gguf, out_dir, MODEL_CONFIG)
        open_gguf_parts(gguf)  # every part is whole
        parts = gguf_parts(gguf)
        # llama.cpp finds a split model's later parts from the first one's name: the parts
        # keep the split's numbering under the name "model".
        names = [WEIGHTS] if len(parts) == 1 else \
            [f"model-{n:05d}-of-{len(parts):05d}.gguf" for n in range(1, len(parts) + 1)]
        for part, name in zip(parts, names):
            try:  # the same bytes, not a copy: the source stays in the cache
                os.link(part, out_dir / name)
            except OSError:
                shutil.copyfile(part, out_dir / name)
        progress("read GGUF metadata", 1, 1)

    def _load(self, model_dir: Path) -> None:
        from mlx_lm.utils import load_tokenizer

        threads = self.options.threads or os.cpu_count() or 1
        weights = next((model_dir / name for name in [WEIGHTS, *sorted(
            p.name for p in model_dir.glob("model-00001-of-*.gguf"))]
            if (model_dir / name).is_file()), model_dir / WEIGHTS)
        if not weights.is_file():
            raise ModelLoadError(f"model {self.spec.name!r}: {weights} is missing")
        self._engine = LlamaEngine(weights, pool=self.options.context,
                                   parallel=self.options.parallel, threads=threads,
                                   model=self.spec.name, deterministic=self.options.deterministic)
        config = json.loads((model_dir / MODEL_CONFIG).read_text())
        self._tokenizer = load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id"))

    def _unload(self) -> None:
        engine, self._engine, self._tokenizer = self._engine, None, None
        if engine is not None:
            engine.close()  # frees the context and unmaps the weights now, not at collection

    # --- serving ---------------------------------------------------------------------

    def parallel_requests(self, task: Task) -> int:
        return self.options.parallel

    def context_tokens(self) -> int:
        return self._serving().request_limit

    def check_prompt(self, prompt: list[int], request: ChatRequest) -> None:
        engine = self._serving()
        share = f" (its context of {engine.pool} / {engine.parallel} sequences, the " \
            "deterministic option)" if engine.deterministic else ""
        self.check_room(prompt, request, engine.request_limit, f"one request may hold{share}")

    @contextlib.contextmanager
    def session(self, need: int, prompt: list[int]) -> Iterator[LlamaSession]:
        with self._serving().slot(need, prompt) as slot:
            yield LlamaSession(slot, self._tokenizer)

    # The same, one call at a time, outside a request (tests, tools).

    def pieces(self, request: ChatRequest, prompt: list[int]) -> Generator[Piece, None, None]:
        with self.session(len(prompt) + request.max_tokens, prompt) as session:
            yield from session.pieces(request, prompt)

    def next_log_probs(self, prompts: list[list[int]]) -> np.ndarray:
        with self.session(max(map(len, prompts)), prompts[0]) as session:
            return session.next_log_probs(prompts)

    def sequence_log_probs(self, sequences: list[list[int]]) -> list[np.ndarray]:
        with self.session(max(map(len, sequences)), sequences[0]) as session:
            return session.sequence_log_probs(sequences)

    def continuation_log_probs(self, prefix: list[int],
                               continuations: list[list[int]]) -> list[np.ndarray]:
        need = len(prefix) + max(map(len, continuations), default=0)
        with self.session(need, prefix) as session:
            return session.continuation_log_probs(prefix, continuations)

    def _serving(self) -> LlamaEngine:
        if self._engine is None:
            raise self.not_loaded()
        return self._engine


class LlamaSession:
    """One request's view of the engine: its slot's generation and token scores."""

    def __init__(self, slot: Slot, tokenizer):
        self.slot, self.tokenizer = slot, tokenizer

    def pieces(self, request: ChatRequest, prompt: list[int]) -> Generator[Piece, None, None]:
        tokens = self.slot.tokens(prompt, Sampling(request.temperature, request.top_p),
                                  request.max_tokens, frozenset(self.tokenizer.eos_token_ids))
        return detokenized_pieces(tokens, self.tokenizer, limit=request.max_tokens)

    def next_log_probs(self, prompts: list[list[int]]) -> np.ndarray:
        return np.stack([_log_softmax(self.slot.logits_after(prompt)[-1]) for prompt in prompts])

    def sequence_log_probs(self, sequences: list[list[int]]) -> list[np.ndarray]:
        # Scoring every position's logits costs the vocabulary projection per position, most of
        # the time here: the start all sequences share (a structured reply's prompt, before the
        # candidate values) is decoded and scored once, then only each one's own tokens.
        shared = min(len(s) for s in sequences) - 1
        for sequence in sequences[1:]:
            shared = min(shared, common_prefix(sequences[0], sequence))
        shared = max(shared, 1)
        logits = self.slot.logits_after(sequences[0][:shared], every_position=True)
        start = _token_log_probs(logits[:-1], sequences[0][1:shared])
        scored = []
        for sequence in sequences:
            rest = self.slot.logits_after(sequence, every_position=True, kept=shared)
            # The shared start's last row predicts this sequence's first token of its own.
            own = _token_log_probs(np.concatenate([logits[-1:], rest[:-1]]), sequence[shared:])
            scored.append(np.concatenate([start, own]))
        return scored

    def continuation_log_probs(self, prefix: list[int],
                               continuations: list[list[int]]) -> list[np.ndarray]:
        # The prefix (a prompt and the reply so far) is mostly what the slot holds from the
        # previous call: only its new tokens are decoded, then each continuation on top of it.
        last = self.slot.logits_after(prefix)
        scored = []
        for continuation in continuations:
            rest = self.slot.logits_after(prefix + list(continuation), every_position=True,
                                          kept=len(prefix))
            scored.append(_token_log_probs(np.concatenate([last, rest[:-1]]), list(continuation)))
        return scored


def _token_log_probs(logits: np.ndarray, tokens: list[int]) -> np.ndarray:
    """log P(tokens[i]) under row i of ``logits``."""
    if not len(tokens):
        return np.zeros(0, np.float32)
    return _log_softmax(logits)[np.arange(len(tokens)), tokens]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float32)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
