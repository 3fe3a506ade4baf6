"""Whisper speech recognition on CTranslate2, from the catalog's faster-whisper weights as they are.

The packaged ``model.bin`` files are CTranslate2 models already; CTranslate2
also needs the token strings (``vocabulary.json``), which those packages leave
out: ``prepare`` writes them from whisper's own tokenizer. Audio becomes the same
log-mel spectrogram as mlx_whisper's (computed in NumPy, :mod:`mofa_omni.adapters.whisper_features`)
and tokens become text with mlx_whisper's tokenizer, so both backends see the same input and
decode the same way (greedy, no timestamps). Audio longer than 30 s is transcribed window by window.

``options.compute_type`` in the catalog (:class:`~mofa_omni.adapters.options.WhisperOptions`):
``int8`` (default: fastest on a CPU, same transcripts here), ``float32``, or
``float16``/``int8_float16`` on CUDA.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.options import AdapterOptions, WhisperOptions
from mofa_omni.adapters.whisper_features import SAMPLE_RATE, WINDOW_SAMPLES, log_mel
from mofa_omni.contract.errors import ContractError, ModelLoadError
from mofa_omni.contract.tasks import (
    Segment,
    Task,
    Transcript,
    TranscriptionRequest,
    validate_request,
)
from mofa_omni.formats.ctranslate2 import read_model_bin
from mofa_omni.formats.tiktoken_bpe import hf_tokenizer
from mofa_omni.media.audio import resample
from mofa_omni.models.fetching import Progress
from mofa_omni.models.store import link_or_copy

MAX_NEW_TOKENS = 224  # whisper's decoder context is 448: half for the text, as whisper does
MULTILINGUAL_VOCAB = 51865


class Ct2WhisperAdapter(ModelAdapter):
    """Whisper on CTranslate2 (CPU, or CUDA where CTranslate2 sees a GPU)."""

    supported_tasks: ClassVar[frozenset[Task]] = frozenset({Task.SPEECH_RECOGNITION})
    formats: ClassVar[frozenset[str]] = frozenset({"ctranslate2"})
    backend: ClassVar[str] = "ctranslate2"
    runtime_bytes: ClassVar[int] = 288 << 20  # measured on tiny.en and base transcribing
    requires: ClassVar[tuple[str, ...]] = ("ctranslate2", "mlx_whisper")
    artifact_version: ClassVar[int] = 2  # 2: tokenizer.json beside vocabulary.json
    Options: ClassVar[type[AdapterOptions]] = WhisperOptions
    options: WhisperOptions

    def __init__(self, spec):
        super().__init__(spec)
        self._model: Any = None
        self._tokenizer: Any = None
        self._multilingual = False

    # --- lifecycle -------------------------------------------------------------------

    def prepare(self, source_dir: Path, out_dir: Path, progress: Progress) -> None:
        for name in ("model.bin", "config.json"):
            if not (source_dir / name).is_file():
                raise ModelLoadError(f"model {self.spec.name!r}: {source_dir} has no {name}")
            link_or_copy(source_dir / name, out_dir / name)
        vocab_size = _vocabulary_size(source_dir / "model.bin")
        progress("write vocabulary", 0, 1)
        tokenizer = _tokenizer(vocab_size >= MULTILINGUAL_VOCAB)
        (out_dir / "vocabulary.json").write_text(json.dumps(_token_strings(tokenizer, vocab_size)))
        # faster-whisper (and the like) read the same directory with this, not the hub's copy
        hf_tokenizer(tokenizer.encoding._mergeable_ranks,
                     tokenizer.encoding._special_tokens).save(str(out_dir / "tokenizer.json"))
        progress("write vocabulary", 1, 1)

    def _load(self, model_dir: Path) -> None:
        import ctranslate2

        device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        try:
            self._model = ctranslate2.models.Whisper(
                str(model_dir), device=device, compute_type=self.options.compute_type,
                intra_threads=os.cpu_count() or 1)
        except (RuntimeError, ValueError) as error:
            raise ModelLoadError(f"model {self.spec.name!r}: CTranslate2 cannot load "
                                 f"{model_dir}: {error}") from error
        self._multilingual = self._model.is_multilingual
        self._tokenizer = _tokenizer(self._multilingual)

    def _unload(self) -> None:
        self._model = self._tokenizer = None

    # --- serving ---------------------------------------------------------------------

    @property
    def english_only(self) -> bool:
        if self._model is None:
            raise self.not_loaded()
        return not self._multilingual

    def transcribe(self, request: TranscriptionRequest) -> Transcript:
        """Transcribe mono float32 audio at any sample rate (resampled to 16 kHz)."""
        import ctranslate2

        validate_request(request)
        if self._model is None:
            raise self.not_loaded()
        audio = resample(request.audio, request.sample_rate, SAMPLE_RATE)
        windows = [audio[start:start + WINDOW_SAMPLES]
                   for start in range(0, len(audio), WINDOW_SAMPLES)]
        features = ctranslate2.StorageView.from_array(
            np.stack([log_mel(w, self._model.n_mels) for w in windows]))
        language = self._language(request.language.strip().lower(), features)
        tokenizer = self._tokenizer_for(language)
        prompt = list(tokenizer.sot_sequence_including_notimestamps)
        results = self._model.generate(features, [prompt] * len(windows), beam_size=1,
                                       max_length=MAX_NEW_TOKENS, suppress_blank=True)
        segments = []
        for index, result in enumerate(results):
            text = tokenizer.decode([t for t in result.sequences_ids[0]
                                     if t < tokenizer.eot]).strip()
            if text:
                start = index * WINDOW_SAMPLES / SAMPLE_RATE
                end = min(len(audio), (index + 1) * WINDOW_SAMPLES) / SAMPLE_RATE
                segments.append(Segment(start, end, text))
        return Transcript(text=" ".join(s.text for s in segments), language=language,
                          segments=segments)

    def _language(self, asked: str, features) -> str:
        from mlx_whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

        if asked:
            code = TO_LANGUAGE_CODE.get(asked, asked)
            if code not in LANGUAGES:
                raise ContractError(f"unknown language {asked!r} for whisper")
            if not self._multilingual and code != "en":
                raise ContractError(f"model {self.spec.name!r} is English-only; "
                                    f"cannot transcribe {code!r}")
            return code
        if not self._multilingual:
            return "en"
        (ranked, *_) = self._model.detect_language(features)  # from the first window
        return ranked[0][0].strip("<|>")

    def _tokenizer_for(self, language: str):
        if not self._multilingual:
            return self._tokenizer
        return _tokenizer(True, language)


def _vocabulary_size(model_bin: Path) -> int:
    """The number of tokens, from the decoder's embedding matrix in ``model.bin``."""
    variables = read_model_bin(model_bin).variables
    embedding = variables.get("decoder/embeddings/weight")
    if embedding is None:
        raise ModelLoadError(f"{model_bin} is not a whisper model: no decoder/embeddings/weight")
    return int(embedding.shape[0])


def _tokenizer(multilingual: bool, language: str | None = None):
    from mlx_whisper.tokenizer import get_tokenizer

    return get_tokenizer(multilingual=multilingual, language=language if multilingual else None,
                         task="transcribe")


def _token_strings(tokenizer, size: int) -> list[str]:
    """One unique string per token id, as CTranslate2's vocabulary wants (ids are what it uses)."""
    encoding = tokenizer.encoding
    special = {rank: text for text, rank in encoding._special_tokens.items()}
    return [special[i] if i in special else encoding.decode_single_token_bytes(i).decode("latin-1")
            for i in range(size)]

