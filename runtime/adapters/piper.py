"""Speech synthesis with Piper voices (VITS in ONNX) on ONNX Runtime.

piper-tts is GPL-3.0 and an optional extra (``pip install 'mofa-omni[piper]'``):
it is imported only here, only when a voice is loaded.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import msgspec
import numpy as np

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.onnx_session import cpu_session
from mofa_omni.adapters.options import AdapterOptions
from mofa_omni.contract.errors import ContractError, ModelLoadError
from mofa_omni.contract.tasks import AudioChunk, SpeechRequest, Task
from mofa_omni.media.text import split_sentences
from mofa_omni.models.fetching import Progress

MAX_THREADS = 2  # more intra-op threads buy little for one short sentence and starve the graph
SPEED_RANGE = (0.25, 4.0)
NOISE_RANGE = (0.0, 2.0)
_SPEAKABLE = re.compile(r"\w")


def _find_voice(directory: Path) -> tuple[Path, Path]:
    """The voice's ``.onnx`` file and its ``.onnx.json`` config in ``directory``."""
    models = sorted(directory.glob("*.onnx")) or sorted(directory.rglob("*.onnx"))
    if len(models) != 1:
        found = ", ".join(p.name for p in models) or "none"
        raise ModelLoadError(f"expected one Piper voice (.onnx) in {directory}, found {found}")
    config = models[0].with_name(models[0].name + ".json")
    if not config.is_file():
        raise ModelLoadError(f"Piper voice {models[0].name} has no config {config.name} beside it")
    return models[0], config


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        rate = int(config["audio"]["sample_rate"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelLoadError(f"Piper voice config {path} is unreadable or names no "
                             f"audio.sample_rate: {type(error).__name__}: {error}") from None
    if rate <= 0:
        raise ModelLoadError(f"Piper voice config {path} has sample rate {rate}")
    return config


Noise = Annotated[float, msgspec.Meta(ge=NOISE_RANGE[0], le=NOISE_RANGE[1])]


class PiperOptions(AdapterOptions):
    """A Piper voice's catalog options."""

    speed: Annotated[float, msgspec.Meta(ge=SPEED_RANGE[0], le=SPEED_RANGE[1])] = 1.0
    noise_scale: Noise | None = None  # unset: the voice's config
    noise_w_scale: Noise | None = None


class PiperAdapter(ModelAdapter):
    """A Piper voice: text -> one float32 audio chunk per sentence, streamed.

    Catalog option ``speed`` (default 1.0) is the voice's own speaking rate; a request's
    ``speed`` multiplies it. Options ``noise_scale`` and ``noise_w_scale`` (default: the
    voice's config) are Piper's own: VITS samples noise for the voice and the phoneme lengths
    on every synthesis; 0 for both makes the same text give the same samples every time.
    """

    supported_tasks = frozenset({Task.SPEECH_SYNTHESIS})
    formats = frozenset({"onnx"})
    backend = "onnxruntime"
    runtime_bytes = 104 << 20  # measured on the joe voice (medium) speaking a sentence
    Options = PiperOptions
    options: PiperOptions

    def __init__(self, spec):
        super().__init__(spec)
        self._voice = None  # piper.PiperVoice while loaded

    def prepare(self, source_dir: Path, out_dir: Path, progress: Progress) -> None:
        model, config = _find_voice(source_dir)
        _read_config(config)
        for path in (model, config):
            shutil.copyfile(path, out_dir / path.name)
            progress(f"copy {path.name}", 1, 1)

    def _load(self, model_dir: Path) -> None:
        try:
            from piper import PiperVoice
            from piper.config import PiperConfig
        except ImportError:
            raise ModelLoadError(f"model {self.spec.name!r} needs Piper: "
                                 "pip install 'mofa-omni[piper]'") from None
        model, config_path = _find_voice(model_dir)
        config = PiperConfig.from_dict(_read_config(config_path))
        # PiperVoice.load() takes no session options: build the session to bound its threads.
        session = cpu_session(model, MAX_THREADS, model_name=self.spec.name)
        self._voice = PiperVoice(session=session, config=config)

    def _unload(self) -> None:
        self._voice = None

    @property
    def sample_rate(self) -> int:
        """The voice's output rate in Hz (loaded voices only)."""
        if self._voice is None:
            raise self.not_loaded()
        return int(self._voice.config.sample_rate)

    def synthesize(self, request: SpeechRequest) -> Iterator[AudioChunk]:
        """Speak ``request.text``: one chunk per sentence as soon as it is ready, the last final.

        ``request.speed`` > 1 speaks faster (Piper's length scale is divided by it).
        """
        rate = self.sample_rate
        if not SPEED_RANGE[0] <= request.speed <= SPEED_RANGE[1]:
            raise ContractError(f"speed {request.speed} is outside {SPEED_RANGE}")
        from piper.config import SynthesisConfig

        voice, options = self._voice, self.options
        syn_config = SynthesisConfig(
            length_scale=voice.config.length_scale / (request.speed * options.speed),
            noise_scale=options.noise_scale, noise_w_scale=options.noise_w_scale)
        sentences = [s for s in split_sentences(request.text) if _SPEAKABLE.search(s)]
        if not sentences:  # only punctuation: nothing to say, but the request still gets its reply
            yield AudioChunk(np.zeros(rate // 100, np.float32), rate, final=True, text=request.text)
            return
        for i, sentence in enumerate(sentences):
            # espeak may still cut a sentence in several clauses: they are one chunk here.
            pieces = [c.audio_float_array for c in voice.synthesize(sentence, syn_config)]
            audio = np.concatenate(pieces) if pieces else np.zeros(rate // 100, np.float32)
            yield AudioChunk(audio.astype(np.float32, copy=False), rate,
                             final=i == len(sentences) - 1, text=sentence)
