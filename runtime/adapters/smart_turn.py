"""Turn-end detection with Smart Turn v3 (Pipecat's classifier, ONNX) on ONNX Runtime.

The model hears the last 8 s of a speaker's audio (16 kHz; shorter audio is padded with
silence in front) as whisper's log-mel features of the waveform scaled to zero mean and unit
variance, and returns the probability that the speaker has finished their turn: it hears the
intonation and the words, so "What is the capital" with a level voice reads as unfinished where
a silence alone cannot tell.

Not one of the contract's named tasks: the adapter serves ``Task.GENERIC`` as kind
``audio.turn_end`` (a column of clips in, one probability each out), and in-process callers (the
VAD node, see :mod:`mofa_omni.voice.vad`) use :meth:`SmartTurnAdapter.turn_end_probability`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.onnx_session import cpu_session
from mofa_omni.adapters.whisper_features import SAMPLE_RATE, log_mel
from mofa_omni.contract.errors import ContractError, ModelLoadError
from mofa_omni.contract.tasks import GenericRequest, GenericResult, GenericSpec, Task
from mofa_omni.models.fetching import Progress

MODEL_FILE = "smart-turn.onnx"
CLIP_SAMPLES = 8 * SAMPLE_RATE  # what the model hears: the last 8 s
TURN_END = "audio.turn_end"
INPUT_SCHEMA = pa.schema([("audio", pa.list_(pa.float32()))],
                         metadata={"sample_rate": str(SAMPLE_RATE),
                                   "about": "one clip of mono speech per row, its end the "
                                            "moment asked about"})
OUTPUT_SCHEMA = pa.schema([("probability", pa.float32())])


def features(audio: np.ndarray) -> np.ndarray:
    """(80, 800) features of the last 8 s of ``audio`` (16 kHz), as the model was trained on."""
    clip = np.zeros(CLIP_SAMPLES, np.float32)
    tail = np.asarray(audio, np.float32)[-CLIP_SAMPLES:]
    clip[CLIP_SAMPLES - len(tail):] = tail
    clip = (clip - clip.mean()) / np.sqrt(clip.var() + 1e-7)
    return log_mel(clip, 80, CLIP_SAMPLES)


class SmartTurnAdapter(ModelAdapter):
    """Smart Turn v3: the probability that the speech heard so far ends the speaker's turn."""

    supported_tasks: ClassVar[frozenset[Task]] = frozenset({Task.GENERIC})
    formats: ClassVar[frozenset[str]] = frozenset({"onnx"})
    backend: ClassVar[str] = "onnxruntime"

    def __init__(self, spec):
        super().__init__(spec)
        self._session = None

    def prepare(self, source_dir: Path, out_dir: Path, progress: Progress) -> None:
        found = sorted(source_dir.rglob("*.onnx"))
        if len(found) != 1:
            raise ModelLoadError(f"model {self.spec.name!r}: expected one .onnx file in "
                                 f"{source_dir}, found {len(found)}")
        shutil.copyfile(found[0], out_dir / MODEL_FILE)
        progress(f"copy {found[0].name}", 1, 1)

    def _load(self, model_dir: Path) -> None:
        session = cpu_session(model_dir / MODEL_FILE, 1, model_name=self.spec.name)
        names = [i.name for i in session.get_inputs()]
        if names != ["input_features"]:
            raise ModelLoadError(f"model {self.spec.name!r}: expected Smart Turn's one input "
                                 f"input_features, got {', '.join(names)}")
        self._session = session

    def _unload(self) -> None:
        self._session = None

    def turn_end_probability(self, audio_16k: np.ndarray) -> float:
        """The probability that the speaker's turn ends where ``audio_16k`` (mono float32 at
        16 kHz, any length; the last 8 s are heard) ends."""
        if self._session is None:
            raise self.not_loaded()
        audio = np.asarray(audio_16k, np.float32)
        if audio.ndim != 1 or not audio.size or not np.isfinite(audio).all():
            raise ContractError(f"{TURN_END}: a clip must be non-empty, mono and finite, got "
                                f"shape {audio.shape}")
        (probability,) = self._session.run(None, {"input_features": features(audio)[None]})
        return float(np.asarray(probability).reshape(-1)[0])

    def generic_specs(self) -> list[GenericSpec]:
        return [GenericSpec(TURN_END, INPUT_SCHEMA, OUTPUT_SCHEMA)]

    def run_generic(self, request: GenericRequest) -> GenericResult:
        """Clips (one per row) -> the probability that each ends a turn."""
        column = request.batch.column("audio")
        if column.null_count:
            raise ContractError(f"{TURN_END}: a clip is null")
        probabilities = [self.turn_end_probability(clip.values.to_numpy(zero_copy_only=False))
                         for clip in column]
        batch = pa.RecordBatch.from_arrays([pa.array(probabilities, pa.float32())],
                                           schema=OUTPUT_SCHEMA)
        return GenericResult(TURN_END, batch)
