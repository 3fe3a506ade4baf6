"""Whisper speech recognition on MLX (mlx_whisper), from CTranslate2 or MLX weights.

Formats: ``ctranslate2`` (a faster-whisper directory, converted once by
:mod:`mofa_omni.formats.ctranslate2`) and ``mlx`` (an mlx-community repo:
config.json + weights.safetensors/npz, used as is).
"""

from __future__ import annotations

import importlib
import json
import types
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.options import AdapterOptions, WhisperOptions
from mofa_omni.contract.errors import AdapterError, ContractError, ModelLoadError
from mofa_omni.contract.stages import Stage
from mofa_omni.contract.tasks import (
    Segment,
    Task,
    Tensor,
    Transcript,
    TranscriptionRequest,
    refuse_prefix,
    validate_request,
)
from mofa_omni.formats.ctranslate2 import convert_whisper
from mofa_omni.media.audio import resample
from mofa_omni.models.catalog import ModelSpec
from mofa_omni.models.compute import mlx_device
from mofa_omni.models.fetching import Progress
from mofa_omni.models.store import link_or_copy

WHISPER_RATE = 16_000
MLX_FILES = ("config.json", "weights.safetensors", "weights.npz", "alignment_heads.json")


class MlxWhisperAdapter(ModelAdapter):
    """Whisper on MLX: float32 on a CPU (float16 is very slow there), float16 on a GPU."""

    supported_tasks: ClassVar[frozenset[Task]] = frozenset({Task.SPEECH_RECOGNITION})
    formats: ClassVar[frozenset[str]] = frozenset({"ctranslate2", "mlx"})
    backend: ClassVar[str] = "mlx"
    takes_transcription_prefix: ClassVar[bool] = True  # see mofa_omni.voice.streaming
    runtime_bytes: ClassVar[int] = 340 << 20  # measured on tiny.en and base transcribing
    requires: ClassVar[tuple[str, ...]] = ("mlx", "mlx_whisper")
    # It reads none of them, but takes ct2_whisper's: one catalog entry lists both adapters.
    Options: ClassVar[type[AdapterOptions]] = WhisperOptions

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self._model: Any = None
        self._fp16 = False

    # --- lifecycle -------------------------------------------------------------------

    def prepare(self, source_dir: Path, out_dir: Path, progress: Progress) -> None:
        if self.spec.format == "ctranslate2":
            convert_whisper(source_dir, out_dir, progress)
            return
        present = [name for name in MLX_FILES if (source_dir / name).is_file()]
        if "config.json" not in present or not {"weights.safetensors", "weights.npz"} & set(present):
            raise ModelLoadError(f"model {self.spec.name!r}: {source_dir} needs config.json and "
                                 f"weights.safetensors or weights.npz; it has {sorted(present)}")
        for done, name in enumerate(present, 1):
            link_or_copy(source_dir / name, out_dir / name)
            progress("link weights", done, len(present))

    def _load(self, model_dir: Path) -> None:
        import mlx.core as mx
        from mlx.utils import tree_map
        from mlx_whisper.load_models import load_model

        self._fp16 = mlx_device() == "gpu"
        dtype = mx.float16 if self._fp16 else mx.float32
        model = load_model(str(model_dir), dtype=dtype)
        # Hub weights (and quantization scales) are often float16, ~50x slower on a CPU: cast them.
        floats = {mx.float16, mx.bfloat16, mx.float32} - {dtype}
        model.update(tree_map(lambda p: p.astype(dtype) if p.dtype in floats else p,
                              model.parameters()))
        heads = model_dir / "alignment_heads.json"
        if heads.is_file():
            model.set_alignment_heads(np.asarray(json.loads(heads.read_text()), dtype=np.int64))
        mx.eval(model.parameters())
        self._model = model

    def _unload(self) -> None:
        self._model = None

    # --- serving ---------------------------------------------------------------------

    @property
    def english_only(self) -> bool:
        return not self._loaded_model().is_multilingual

    def transcribe(self, request: TranscriptionRequest) -> Transcript:
        """Transcribe mono float32 audio at any sample rate (resampled to 16 kHz)."""
        validate_request(request)
        model = self._loaded_model()
        audio = resample(request.audio, request.sample_rate, WHISPER_RATE)
        options: dict[str, Any] = {"fp16": self._fp16, "verbose": None}
        language = request.language.strip().lower()
        if language:
            options["language"] = self._checked_language(language)
        prefix = request.prefix.strip()
        if prefix:  # whisper's decoder goes on after it; its text leaves it out
            if audio.size > 30 * WHISPER_RATE:
                raise ContractError("a transcription prefix applies to audio of one 30 s window; "
                                    f"this is {audio.size / WHISPER_RATE:.1f} s")
            # after the prompt, not after a first timestamp token (which it would stand for)
            options.update(prefix=" " + prefix, without_timestamps=True)
        # An English-only model gets language "en" from mlx_whisper itself: no detection pass.
        result = _transcribe_with(model)(audio, **options)
        segments = [Segment(float(s["start"]), float(s["end"]), s["text"].strip())
                    for s in result["segments"] if s["text"].strip()]
        text = result["text"].strip()
        if prefix:
            text = f"{prefix} {text}".strip()
            first = segments[0] if segments else Segment(0.0, audio.size / WHISPER_RATE, "")
            segments = [Segment(first.start, first.end, f"{prefix} {first.text}".strip()),
                        *segments[1:]]
        return Transcript(text=text, language=result["language"], segments=segments)

    def word_times(self, request: TranscriptionRequest) -> list[Segment]:
        """Each word of the transcript with when it is said (whisper's cross-attention
        alignment, as ``word_timestamps`` in mlx_whisper), in seconds from the start."""
        validate_request(request)
        refuse_prefix(request, self.spec.name)
        audio = resample(request.audio, request.sample_rate, WHISPER_RATE)
        options: dict[str, Any] = {"fp16": self._fp16, "verbose": None, "word_timestamps": True}
        if language := request.language.strip().lower():
            options["language"] = self._checked_language(language)
        result = _transcribe_with(self._loaded_model())(audio, **options)
        return [Segment(float(w["start"]), float(w["end"]), w["word"].strip())
                for segment in result["segments"] for w in segment.get("words", [])]

    # --- stages: log-mel -> encoder -> decoder, one 30 s window ------------------------

    def stages(self) -> dict[str, Stage]:
        return {"log_mel": Stage("log_mel", TranscriptionRequest, Tensor, self._log_mel),
                "encode": Stage("encode", Tensor, Tensor, self._encode),
                "decode": Stage("decode", Tensor, Transcript, self._decode)}

    def _log_mel(self, request: TranscriptionRequest) -> Tensor:
        from mlx_whisper.audio import N_FRAMES, N_SAMPLES, log_mel_spectrogram

        validate_request(request)
        if request.prefix:
            raise ContractError("the staged whisper does not take a transcription prefix "
                                "(serve it whole instead)")
        model = self._loaded_model()
        audio = resample(request.audio, request.sample_rate, WHISPER_RATE)
        if audio.size > N_SAMPLES:
            raise ContractError(f"the staged whisper takes one 30 s window; this audio is "
                                f"{audio.size / WHISPER_RATE:.1f} s (serve it whole instead)")
        language = request.language.strip().lower()
        attrs = {"seconds": audio.size / WHISPER_RATE,
                 "language": self._checked_language(language) if language else ""}
        mel = log_mel_spectrogram(audio, n_mels=model.dims.n_mels, padding=N_SAMPLES)[:N_FRAMES]
        return Tensor(f"{self._stage_prefix}/log_mel", mel, attrs)

    def _encode(self, mel: Tensor) -> Tensor:
        import mlx.core as mx

        model = self._loaded_model()
        self._check_tensor(mel, "log_mel", (3000, model.dims.n_mels))
        features = model.encoder(self._as_mx(mel.array)[None])
        mx.eval(features)
        return Tensor(f"{self._stage_prefix}/audio_features", features, mel.attrs)

    def _decode(self, features: Tensor) -> Transcript:
        from mlx_whisper.decoding import DecodingOptions, decode

        model = self._loaded_model()
        self._check_tensor(features, "audio_features",
                           (1, model.dims.n_audio_ctx, model.dims.n_audio_state))
        language = str(features.attrs.get("language") or "") or None
        if language is None and self.english_only:
            language = "en"
        result = decode(model, self._as_mx(features.array),
                        DecodingOptions(language=language, fp16=self._fp16, without_timestamps=True))
        result = result[0] if isinstance(result, list) else result
        text = result.text.strip()
        seconds = float(features.attrs.get("seconds", 0.0))
        return Transcript(text, result.language, [Segment(0.0, seconds, text)] if text else [])

    @property
    def _stage_prefix(self) -> str:
        return f"whisper:{self.spec.name}"

    def _as_mx(self, array):
        """The stage's input as an MLX array of the model's dtype: as is when it already is one
        (a fused hand-off), else copied in (it came through Arrow)."""
        import mlx.core as mx

        dtype = mx.float16 if self._fp16 else mx.float32
        array = array if isinstance(array, mx.array) else mx.array(array)
        return array if array.dtype == dtype else array.astype(dtype)

    def _check_tensor(self, tensor: Tensor, kind: str, shape: tuple[int, ...]) -> None:
        expected = f"{self._stage_prefix}/{kind}"
        if tensor.kind != expected:
            raise ContractError(f"takes {expected!r}, got {tensor.kind!r}")
        if tuple(tensor.array.shape) != shape:
            raise ContractError(f"{kind} must have shape {shape}, got {tuple(tensor.array.shape)}")

    def _checked_language(self, language: str) -> str:
        from mlx_whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

        code = TO_LANGUAGE_CODE.get(language, language)
        if code not in LANGUAGES:
            raise ContractError(f"unknown language {language!r} for whisper")
        if self.english_only and code != "en":
            raise ContractError(f"model {self.spec.name!r} is English-only; cannot transcribe {code!r}")
        return code

    def _loaded_model(self):
        if self._model is None:
            raise self.not_loaded()
        return self._model


def _transcribe_with(model):
    """mlx_whisper's ``transcribe`` bound to ``model`` instead of its process-wide ModelHolder.

    ``transcribe`` fetches its model with ``ModelHolder.get_model(path, dtype)``,
    a class attribute that would keep a second, invisible reference (and load
    by path). A copy of the function with its own globals gets a holder that
    returns our model: upstream's windowing, fallback and timestamp logic stay
    intact, nothing global is mutated, and no reference outlives the call.
    """
    module = importlib.import_module("mlx_whisper.transcribe")
    function = module.transcribe
    if "ModelHolder" not in function.__code__.co_names:
        raise AdapterError("this mlx_whisper version no longer uses ModelHolder: "
                           "update mofa_omni.adapters.mlx_whisper")
    holder = types.SimpleNamespace(get_model=lambda path, dtype: model)
    bound = types.FunctionType(function.__code__, {**function.__globals__, "ModelHolder": holder},
                               function.__name__, function.__defaults__, function.__closure__)
    bound.__kwdefaults__ = dict(function.__kwdefaults__ or {})
    return bound

