"""Text generation on llama.cpp (llama-cpp-python), reading the catalog's GGUF file as it is.

Nothing is converted: ``prepare`` links the GGUF into the cache and writes the tokenizer
rebuilt from its metadata (the reader the other LLM adapters use), so every backend builds
the same prompt and streams text the same way (mlx-lm's chat template and detokenizer);
llama.cpp only runs the network. Greedy at temperature 0 gives the same tokens as the other
backends up to the arithmetic of the weights' format. llama.cpp keeps the previous
request's tokens: a prompt that starts like the last one (the next turn of a conversation)
only evaluates what is new.

Catalog options (:class:`~mofa_omni.adapters.options.ChatLmOptions`): ``context`` (tokens,
default 4096: prompt + reply must fit), ``threads`` (default: every core), ``file``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Generator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mofa_omni.adapters.chat import Piece, detokenized_pieces
from mofa_omni.adapters.chat_lm import ChatLmAdapter
from mofa_omni.adapters.structured import common_prefix
from mofa_omni.contract.errors import ContractError, ModelLoadError
from mofa_omni.contract.tasks import ChatRequest
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
        self._llama: Any = None

    def kv_cache_tokens(self) -> int:
        return self.options.context  # llama.cpp reserves the whole context's KV cache (float16)

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
        from llama_cpp import Llama
        from mlx_lm.utils import load_tokenizer

        context, threads = self.options.context, self.options.threads or os.cpu_count() or 1
        weights = next((model_dir / name for name in [WEIGHTS, *sorted(
            p.name for p in model_dir.glob("model-00001-of-*.gguf"))]
            if (model_dir / name).is_file()), model_dir / WEIGHTS)
        if not weights.is_file():
            raise ModelLoadError(f"model {self.spec.name!r}: {weights} is missing")
        try:
            self._llama = Llama(model_path=str(weights), n_ctx=context, n_threads=threads,
                                n_threads_batch=threads, logits_all=False, verbose=False)
        except (ValueError, RuntimeError) as error:  # llama.cpp says only "failed to load"
            raise ModelLoadError(f"model {self.spec.name!r}: llama.cpp cannot load {weights} "
                                 f"(corrupt, or an architecture this llama.cpp does not "
                                 f"know): {error}") from error
        config = json.loads((model_dir / MODEL_CONFIG).read_text())
        self._tokenizer = load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id"))

    def _unload(self) -> None:
        llama, self._llama, self._tokenizer = self._llama, None, None
        if llama is not None and hasattr(llama, "close"):
            llama.close()  # frees the context and unmaps the weights now, not at collection

    # --- serving ---------------------------------------------------------------------

    def check_prompt(self, prompt: list[int], request: ChatRequest) -> None:
        self._check_fits(len(prompt), request.max_tokens)

    def pieces(self, request: ChatRequest, prompt: list[int]) -> Generator[Piece, None, None]:
        llama, tokenizer = self._serving()
        sampling = {"temp": request.temperature, "top_k": 0 if request.temperature > 0 else 1,
                    "top_p": request.top_p, "min_p": 0.0, "repeat_penalty": 1.0}
        return detokenized_pieces(llama.generate(prompt, **sampling), tokenizer,
                                  limit=request.max_tokens)

    # --- token scores (structured output, reranking) ---------------------------------

    def next_log_probs(self, prompts: list[list[int]]) -> np.ndarray:
        return np.stack([_log_softmax(self._logits_after(prompt)[-1]) for prompt in prompts])

    def sequence_log_probs(self, sequences: list[list[int]]) -> list[np.ndarray]:
        # Scoring every position's logits costs the vocabulary projection per position, most of
        # the time here: the start all sequences share (a structured reply's prompt, before the
        # candidate values) is decoded and scored once, then only each one's own tokens.
        shared = min(len(s) for s in sequences) - 1
        for sequence in sequences[1:]:
            shared = min(shared, common_prefix(sequences[0], sequence))
        shared = max(shared, 1)
        logits = self._logits_after(sequences[0][:shared], every_position=True)
        start = _token_log_probs(logits[:-1], sequences[0][1:shared])
        scored = []
        for sequence in sequences:
            rest = self._logits_after(sequence, every_position=True, kept=shared)
            # The shared start's last row predicts this sequence's first token of its own.
            own = _token_log_probs(np.concatenate([logits[-1:], rest[:-1]]), sequence[shared:])
            scored.append(np.concatenate([start, own]))
        return scored

    def continuation_log_probs(self, prefix: list[int],
                               continuations: list[list[int]]) -> list[np.ndarray]:
        # The prefix (a prompt and the reply so far) is mostly what llama.cpp holds from the
        # previous call: only its new tokens are decoded, then each continuation on top of it.
        last = self._logits_after(prefix)
        scored = []
        for continuation in continuations:
            rest = self._logits_after(prefix + list(continuation), every_position=True,
                                      kept=len(prefix))
            scored.append(_token_log_probs(np.concatenate([last, rest[:-1]]), list(continuation)))
        return scored

    def _logits_after(self, tokens: list[int], *, every_position: bool = False,
                      kept: int = 0) -> np.ndarray:
        """Logits after ``tokens``: the last position's (1, vocab), or every position's from
        ``kept`` on (len - kept, vocab; the first ``kept`` tokens must be the ones llama.cpp
        holds). For the last position only what differs from the tokens llama.cpp holds from
        the previous call is evaluated."""
        llama, _ = self._serving()
        self._check_fits(len(tokens), 0)
        vocab = llama.n_vocab()
        if every_position:
            # The Llama object keeps no logits of earlier positions (0.3 keeps none at all):
            # decode with every position's logits asked for and read them from the context.
            llama.n_tokens = kept
            rows = []
            for start in range(kept, len(tokens), llama.n_batch):
                batch = tokens[start:start + llama.n_batch]
                _decode(llama, batch, every_position=True)
                rows.append(_context_logits(llama, len(batch), vocab))
            return np.concatenate(rows) if rows else np.zeros((0, vocab), np.float32)
        kept = common_prefix(list(llama.input_ids[:llama.n_tokens]), tokens)
        llama.n_tokens = min(kept, len(tokens) - 1)  # the last token's logits must be new
        llama.eval(tokens[llama.n_tokens:])
        return _context_logits(llama, 1, vocab)

    def _serving(self) -> tuple[Any, Any]:
        if self._llama is None:
            raise self.not_loaded()
        return self._llama, self._tokenizer

    def _check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        context = self._llama.n_ctx()
        if prompt_tokens + max_tokens > context:
            raise ContractError(f"model {self.spec.name!r}: the prompt ({prompt_tokens} "
                                f"tokens) and max_tokens ({max_tokens}) exceed its context of "
                                f"{context} tokens")


# llama-cpp-python's ``_ctx``/``_batch`` wrappers (the same in 0.2 and 0.3) give the decoded
# batch's logits, which its public ``eval`` only keeps when the whole model was opened with
# ``logits_all`` (slow for every prompt).

def _decode(llama, batch: list[int], *, every_position: bool) -> None:
    llama._ctx.kv_cache_seq_rm(-1, llama.n_tokens, -1)
    llama._batch.set_batch(batch=batch, n_past=llama.n_tokens, logits_all=every_position)
    llama._ctx.decode(llama._batch)
    llama.input_ids[llama.n_tokens:llama.n_tokens + len(batch)] = batch
    llama.n_tokens += len(batch)


def _context_logits(llama, rows: int, vocab: int) -> np.ndarray:
    """The logits of the last decoded batch's ``rows`` flagged positions (a copy)."""
    return np.ctypeslib.as_array(llama._ctx.get_logits(), shape=(rows, vocab)).copy()


def _token_log_probs(logits: np.ndarray, tokens: list[int]) -> np.ndarray:
    """log P(tokens[i]) under row i of ``logits``."""
    if not len(tokens):
        return np.zeros(0, np.float32)
    return _log_softmax(logits)[np.arange(len(tokens)), tokens]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float32)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
