"""Whisper speech recognition on CTranslate2, from the catalog's faster-whisper weights as they are.

The packaged ``model.bin`` files are CTranslate2 models already; CTranslate2
also needs one string per token (``vocabulary.json``): ``prepare`` writes them from the
``tokenizer.json`` the packages ship (:mod:`mofa_omni.adapters.whisper_tokens`), or, for a
source without one, from whisper's own tiktoken ranks where mlx-whisper is installed. Audio
becomes the same log-mel spectrogram as mlx_whisper's (computed in NumPy,
:mod:`mofa_omni.adapters.whisper_features`), so both backends see the same input and decode the
same way (greedy, no timestamps). A request's ``prefix`` is forced after the prompt of its first
window: decoding goes on from it. Nothing here imports mlx-whisper at serving time: a plain
install transcribes. Audio longer than 30 s is transcribed window by window.

``options.compute_type`` in the catalog (:class:`~mofa_omni.adapters.options.WhisperOptions`):
``int8`` (default: fastest on a CPU, same transcripts here), ``float32``, or
``float16``/``int8_float16`` on CUDA. ``options.windows_per_call``: how many 30 s windows one
engine call decodes (1 on a CPU, where more are slower and hold ~90 MiB each; 8 on CUDA).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.options import AdapterOptions, WhisperOptions
from mofa_omni.adapters.whisper_features import SAMPLE_RATE, WINDOW_SAMPLES, log_mel
from mofa_omni.adapters.whisper_tokens import WhisperTokens
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
MAX_PREFIX_TOKENS = MAX_NEW_TOKENS // 2  # the rest of the window's text must fit after it
MULTILINGUAL_VOCAB = 51865


class Ct2WhisperAdapter(ModelAdapter):
    """Whisper on CTranslate2 (CPU, or CUDA where CTranslate2 sees a GPU)."""

    supported_tasks: ClassVar[frozenset[Task]] = frozenset({Task.SPEECH_RECOGNITION})
    formats: ClassVar[frozenset[str]] = frozenset({"ctranslate2"})
    backend: ClassVar[str] = "ctranslate2"
    takes_transcription_prefix: ClassVar[bool] = True  # see mofa_omni.voice.streaming
    runtime_bytes: ClassVar[int] = 288 << 20  # measured on tiny.en and base transcribing
    requires: ClassVar[tuple[str, ...]] = ("ctranslate2", "tokenizers")
    # 2: tokenizer.json beside vocabulary.json; 3: both from the package's tokenizer.json
    artifact_version: ClassVar[int] = 3
    Options: ClassVar[type[AdapterOptions]] = WhisperOptions
    options: WhisperOptions

    def __init__(self, spec):
        super().__init__(spec)
        self._model: Any = None
        self._tokens: WhisperTokens | None = None
        self._multilingual = False
        self._windows_per_call = 1

    # --- lifecycle -------------------------------------------------------------------

    def prepare(self, source_dir: Path, out_dir: Path, progress: Progress) -> None:
        for name in ("model.bin", "config.json"):
            if not (source_dir / name).is_file():
                raise ModelLoadError(f"model {self.spec.name!r}: {source_dir} has no {name}")
            link_or_copy(source_dir / name, out_dir / name)
        vocab_size = _vocabulary_size(source_dir / "model.bin")
        progress("write vocabulary", 0, 1)
        if (source_dir / "tokenizer.json").is_file():
            link_or_copy(source_dir / "tokenizer.json", out_dir / "tokenizer.json")
        else:
            _write_tokenizer_from_tiktoken(self.spec.name, vocab_size, out_dir / "tokenizer.json")
        tokens = WhisperTokens.from_file(out_dir / "tokenizer.json")
        (out_dir / "vocabulary.json").write_text(json.dumps(tokens.token_strings(vocab_size)))
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
        self._windows_per_call = self.options.windows_per_call or (8 if device == "cuda" else 1)
        self._tokens = WhisperTokens.from_file(model_dir / "tokenizer.json")

    def _unload(self) -> None:
        self._model = self._tokens = None

    # --- serving ---------------------------------------------------------------------

    @property
    def english_only(self) -> bool:
        if self._model is None:
            raise self.not_loaded()
        return not self._multilingual

    def batches_requests(self, task: Task) -> bool:
        """Only with several windows per engine call: one window at a time (on a CPU), a batch
        costs what its requests cost one by one, and holds each transcript until the last."""
        return self._windows_per_call > 1

    def transcribe(self, request: TranscriptionRequest) -> Transcript:
        """Transcribe mono float32 audio at any sample rate (resampled to 16 kHz)."""
        return self.transcribe_batch([request])[0]

    def transcribe_batch(self, requests: Sequence[TranscriptionRequest]) -> list[Transcript]:
        """:meth:`transcribe` of each request: the 30 s windows of all of them decoded together
        (each with its own language's prompt), ``windows_per_call`` at a time."""
        import ctranslate2

        for request in requests:
            validate_request(request)
        tokens = self._tokens
        if self._model is None or tokens is None:
            raise self.not_loaded()
        audios = [resample(r.audio, r.sample_rate, SAMPLE_RATE) for r in requests]
        mels = [np.stack([log_mel(audio[start:start + WINDOW_SAMPLES], self._model.n_mels)
                          for start in range(0, len(audio), WINDOW_SAMPLES)]) for audio in audios]
        languages = [self._language(r.language.strip().lower(), mel, tokens)
                     for r, mel in zip(requests, mels, strict=True)]
        prefixes = [tokens.text_tokens(r.prefix) for r in requests]
        if (longest := max(map(len, prefixes))) > MAX_PREFIX_TOKENS:
            raise ContractError(f"the transcription prefix is {longest} tokens; whisper takes "
                                f"at most {MAX_PREFIX_TOKENS}")
        prompts = [tokens.prompt(language if self._multilingual else None)
                   + (prefix if index == 0 else [])
                   for language, mel, prefix in zip(languages, mels, prefixes, strict=True)
                   for index in range(len(mel))]
        windows = np.concatenate(mels)
        step = self._windows_per_call
        results = []  # the working set grows with the windows per call: a bounded number each
        for first in range(0, len(windows), step):
            results += self._model.generate(
                ctranslate2.StorageView.from_array(windows[first:first + step]),
                prompts[first:first + step], beam_size=1, max_length=MAX_NEW_TOKENS,
                suppress_blank=True)
        transcripts, first = [], 0
        for audio, mel, language in zip(audios, mels, languages, strict=True):
            own = results[first:first + len(mel)]
            first += len(mel)
            segments = []
            for index, result in enumerate(own):
                text = tokens.text(result.sequences_ids[0]).strip()
                if text:
                    start = index * WINDOW_SAMPLES / SAMPLE_RATE
                    end = min(len(audio), (index + 1) * WINDOW_SAMPLES) / SAMPLE_RATE
                    segments.append(Segment(start, end, text))
            transcripts.append(Transcript(text=" ".join(s.text for s in segments),
                                          language=language, segments=segments))
        return transcripts

    def _language(self, asked: str, mel: np.ndarray, tokens: WhisperTokens) -> str:
        if asked:
            code = asked
            if code not in tokens.languages:
                raise ContractError(f"unknown language {asked!r} for whisper: expected one of "
                                    f"its ISO 639 codes ({', '.join(sorted(tokens.languages))})")
            if not self._multilingual and code != "en":
                raise ContractError(f"model {self.spec.name!r} is English-only; "
                                    f"cannot transcribe {code!r}")
            return code
        if not self._multilingual:
            return "en"
        import ctranslate2

        (ranked, *_) = self._model.detect_language(  # from the first window
            ctranslate2.StorageView.from_array(mel[:1]))
        return ranked[0][0].strip("<|>")


def _vocabulary_size(model_bin: Path) -> int:
    """The number of tokens, from the decoder's embedding matrix in ``model.bin``."""
    variables = read_model_bin(model_bin).variables
    embedding = variables.get("decoder/embeddings/weight")
    if embedding is None:
        raise ModelLoadError(f"{model_bin} is not a whisper model: no decoder/embeddings/weight")
    return int(embedding.shape[0])


def _write_tokenizer_from_tiktoken(name: str, vocab_size: int, path: Path) -> None:
    """For a source without ``tokenizer.json``: whisper's own tiktoken ranks, from mlx-whisper."""
    try:
        from mlx_whisper.tokenizer import get_tokenizer
    except ImportError as error:
        raise ModelLoadError(
            f"model {name!r}: its files have no tokenizer.json, and whisper's own tokenizer "
            "(mlx-whisper) is not installed: `omni install mlx-whisper` adds it") from error
    encoding = get_tokenizer(multilingual=vocab_size >= MULTILINGUAL_VOCAB).encoding
    hf_tokenizer(encoding._mergeable_ranks, encoding._special_tokens).save(str(path))
