"""Text generation with mlx-lm: GGUF files (converted once) and MLX/Hugging Face model directories.

With ``parallel`` above 1 (the default, 4) requests are decoded together by mlx-lm's batch
generator (:mod:`mofa_omni.adapters.mlx_engine`), joining and leaving between steps; token
scoring (structured output, tool calls, reranking) runs between two steps. ``parallel = 1``
serves one request at a time through ``stream_generate``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from pathlib import Path
from typing import ClassVar, TypeVar

import numpy as np

from mofa_omni.adapters.chat import Piece, detokenized_pieces
from mofa_omni.adapters.chat_lm import ChatLmAdapter
from mofa_omni.adapters.mlx_engine import MlxEngine
from mofa_omni.contract.tasks import ChatRequest, Task
from mofa_omni.models.fetching import Progress
from mofa_omni.models.footprint import LlmShape, kv_cache_bytes
from mofa_omni.models.store import link_model_directory

T = TypeVar("T")


class MlxLmAdapter(ChatLmAdapter):
    """Chat models served by mlx-lm. ``options.dtype`` picks how a GGUF is converted
    (``float32``, ``float16`` or ``quantized``; see :mod:`mofa_omni.formats.gguf`);
    ``options.bits`` (e.g. 8) quantizes the converted weights with MLX when they load, in groups
    of ``options.group_size`` (:class:`~mofa_omni.adapters.options.ChatLmOptions`)."""

    formats: ClassVar[frozenset[str]] = frozenset({"gguf", "mlx"})
    backend: ClassVar[str] = "mlx"
    runtime_bytes_per_token: ClassVar[int] = 2400  # fitted like llama.cpp's (MLX's CPU backend)

    def __init__(self, spec):
        super().__init__(spec)
        self._model = None
        self._engine: MlxEngine | None = None

    # --- lifecycle -------------------------------------------------------------------

    def prepare(self, source_dir: Path, out_dir: Path, progress: Progress) -> None:
        """Convert the GGUF in ``source_dir``, or link an MLX model directory's files as they are."""
        if self.spec.format == "mlx":
            link_model_directory(self.spec.name, source_dir, out_dir, progress)
            return
        from mofa_omni.formats.gguf import convert_gguf, find_gguf

        gguf = find_gguf(source_dir, self.spec.name, self.options.file)
        convert_gguf(gguf, out_dir, dtype=self.options.dtype, progress=progress)

    def _load(self, model_dir: Path) -> None:
        from mlx_lm.utils import load_model, load_tokenizer

        model, config = load_model(Path(model_dir))
        if bits := self.options.bits:
            import mlx.core as mx
            import mlx.nn as nn

            # Quantized in memory at load (the converted float32 files stay as they are).
            nn.quantize(model, group_size=self.options.group_size, bits=bits)
            mx.eval(model.parameters())
        self._tokenizer = load_tokenizer(Path(model_dir), eos_token_ids=config.get("eos_token_id"))
        self._model = model
        if self.options.parallel > 1:
            self._engine = MlxEngine(model, sorted(self._tokenizer.eos_token_ids),
                                     parallel=self.options.parallel, model_name=self.spec.name)

    def _unload(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
        self._model = None
        self._tokenizer = None

    def sequence_bytes(self, model_dir: Path) -> int:
        """One more sequence decoded in the batch: its KV cache grown to ``options.context``
        tokens (mlx-lm grows each sequence's cache as it decodes), in the weights' float type."""
        shape = LlmShape.of_directory(model_dir)
        if self.options.parallel == 1 or shape is None:
            return 0  # one request at a time: its cache is part of the measured working set
        return kv_cache_bytes(shape, self.options.context,
                              4 if self.options.dtype == "float32" else 2)

    # --- serving ---------------------------------------------------------------------

    def parallel_requests(self, task: Task) -> int:
        return self.options.parallel

    def check_prompt(self, prompt: list[int], request: ChatRequest) -> None:
        # each sequence's memory is reserved for a KV cache of ``context`` tokens: a longer
        # request would outgrow what the scheduler granted
        self.check_room(prompt, request, self.options.context,
                        "of its context (the catalog's `context` option)")

    def pieces(self, request: ChatRequest, prompt: list[int]) -> Generator[Piece, None, None]:
        from mlx_lm.generate import stream_generate
        from mlx_lm.sample_utils import make_sampler

        sampler = make_sampler(temp=request.temperature, top_p=request.top_p)
        if self._engine is not None:
            yield from detokenized_pieces(self._engine.tokens(prompt, sampler, request.max_tokens),
                                          self._tokenizer, limit=request.max_tokens)
            return
        responses = stream_generate(self._model, self._tokenizer, prompt,
                                    max_tokens=request.max_tokens, sampler=sampler)
        try:  # EOS arrives as a response of its own: its text is not a generated token's
            for r in responses:
                yield Piece(r.text, token=r.finish_reason != "stop", end=r.finish_reason == "stop")
        finally:
            responses.close()

    def _log_probs(self, sequences: list[list[int]]):
        """log-softmax of the logits at every position (right padding: the model is causal)."""
        import mlx.core as mx

        width = max(len(s) for s in sequences)
        logits = self._model(mx.array([s + [0] * (width - len(s)) for s in sequences]))
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def next_log_probs(self, prompts: list[list[int]]) -> np.ndarray:
        import mlx.core as mx

        def score() -> np.ndarray:
            log_probs = self._log_probs(prompts)
            return np.array(mx.stack([log_probs[i, len(p) - 1] for i, p in enumerate(prompts)]),
                            np.float32)

        return self._on_engine(score)

    def sequence_log_probs(self, sequences: list[list[int]]) -> list[np.ndarray]:
        import mlx.core as mx

        def score() -> list[np.ndarray]:
            log_probs = self._log_probs(sequences)
            return [np.array(mx.take_along_axis(log_probs[i, :len(s) - 1], mx.array(s[1:])[:, None],
                                                axis=-1)[:, 0], np.float32)
                    for i, s in enumerate(sequences)]

        return self._on_engine(score)

    def _on_engine(self, job: Callable[[], T]) -> T:
        """Run ``job`` (a use of the model) between two of the batch engine's steps, on its
        thread, as only that thread uses the model while it decodes; without it, here."""
        return job() if self._engine is None else self._engine.submit(job)
