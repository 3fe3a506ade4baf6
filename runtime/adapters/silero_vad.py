"""Voice activity detection with Silero VAD (v5/v6, ONNX) on ONNX Runtime.

The model reads 512-sample frames of 16 kHz audio, each preceded by the last
64 samples of the frame before it, and carries a recurrent state (2, 1, 128)
from frame to frame; it returns the probability that the frame is speech.

VAD is not one of the contract's named tasks: the adapter serves it through
``Task.GENERIC`` as kind ``audio.speech_probability`` (a column of frames in,
one probability per frame out; each request is one stream from a fresh
state), and in-process callers use :meth:`SileroVadAdapter.speech_probabilities`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.onnx_session import cpu_session
from mofa_omni.contract.errors import ContractError, ModelLoadError
from mofa_omni.contract.tasks import GenericRequest, GenericResult, GenericSpec, Task
from mofa_omni.models.fetching import Progress

SAMPLE_RATE = 16000
FRAME_SAMPLES = 512
CONTEXT_SAMPLES = 64
MODEL_FILE = "silero_vad.onnx"
SPEECH_PROBABILITY = "audio.speech_probability"

INPUT_SCHEMA = pa.schema([("frame", pa.list_(pa.float32(), FRAME_SAMPLES))],
                         metadata={"sample_rate": str(SAMPLE_RATE),
                                   "about": "consecutive frames of one mono stream"})
OUTPUT_SCHEMA = pa.schema([("probability", pa.float32())])


@dataclass
class SileroStream:
    """The model's memory of one audio stream: its recurrent state and the last samples."""

    state: np.ndarray = field(default_factory=lambda: np.zeros((2, 1, 128), np.float32))
    context: np.ndarray = field(default_factory=lambda: np.zeros(CONTEXT_SAMPLES, np.float32))


class SileroVadAdapter(ModelAdapter):
    """Silero VAD: the speech probability of each 32 ms frame of 16 kHz audio."""

    supported_tasks = frozenset({Task.GENERIC})
    formats = frozenset({"onnx"})
    backend = "onnxruntime"

    def __init__(self, spec):
        super().__init__(spec)
        self._session = None
        self._stream = SileroStream()

    def prepare(self, source_dir: Path, out_dir: Path, progress: Progress) -> None:
        model = source_dir / MODEL_FILE
        if not model.is_file():
            raise ModelLoadError(f"model {self.spec.name!r}: {MODEL_FILE} is not in {source_dir}")
        shutil.copyfile(model, out_dir / MODEL_FILE)
        progress(f"copy {MODEL_FILE}", 1, 1)

    def _load(self, model_dir: Path) -> None:
        # One frame is a few hundred microseconds of work: threads would only add overhead.
        session = cpu_session(model_dir / MODEL_FILE, 1, model_name=self.spec.name)
        names = {i.name for i in session.get_inputs()}
        if names != {"input", "state", "sr"}:
            raise ModelLoadError(f"model {self.spec.name!r}: expected Silero VAD v5/v6 inputs "
                                 f"input, state, sr; got {', '.join(sorted(names))}")
        self._session = session
        self._stream = SileroStream()

    def _unload(self) -> None:
        self._session = None

    def reset(self) -> None:
        """Start a new stream for :meth:`speech_probabilities`."""
        self._stream = SileroStream()

    def speech_probabilities(self, frames_16k: np.ndarray,
                             stream: SileroStream | None = None) -> np.ndarray:
        """Speech probability (float32) of each frame of ``frames_16k`` (n, 512), in stream order.

        The state carries over from the previous call (the adapter's own stream, or
        ``stream`` when given), so a live stream can be fed a few frames at a time.
        """
        if self._session is None:
            raise self.not_loaded()
        frames = np.asarray(frames_16k, np.float32)
        if frames.ndim == 1 and frames.size % FRAME_SAMPLES == 0:
            frames = frames.reshape(-1, FRAME_SAMPLES)
        if frames.ndim != 2 or frames.shape[1] != FRAME_SAMPLES:
            raise ContractError(f"Silero VAD reads frames of {FRAME_SAMPLES} samples at 16 kHz, "
                                f"got shape {frames_16k.shape}")
        stream = stream if stream is not None else self._stream
        sr = np.array(SAMPLE_RATE, np.int64)
        out = np.empty(len(frames), np.float32)
        for i, frame in enumerate(frames):
            x = np.concatenate([stream.context, frame])[None, :]
            probability, stream.state = self._session.run(
                None, {"input": x, "state": stream.state, "sr": sr})
            out[i] = probability[0, 0]
            stream.context = frame[-CONTEXT_SAMPLES:].copy()
        return out

    def generic_specs(self) -> list[GenericSpec]:
        return [GenericSpec(SPEECH_PROBABILITY, INPUT_SCHEMA, OUTPUT_SCHEMA)]

    def run_generic(self, request: GenericRequest) -> GenericResult:
        """Frames of one stream (a fresh one per request) -> their speech probabilities."""
        column = request.batch.column("frame")
        frames = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, FRAME_SAMPLES)
        if column.null_count or not np.isfinite(frames).all():
            raise ContractError(f"{SPEECH_PROBABILITY}: frames must be finite and not null")
        probabilities = self.speech_probabilities(frames, SileroStream())
        batch = pa.RecordBatch.from_arrays([pa.array(probabilities, pa.float32())],
                                           schema=OUTPUT_SCHEMA)
        return GenericResult(SPEECH_PROBABILITY, batch)
