"""Audio as a stream: turns read from WAV files, fixed-length chunks, chunk-wise
resampling, and one WAV file written per request as its chunks arrive."""

from __future__ import annotations

import logging
import math
import wave
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np

from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import validate_audio
from mofa_omni.media.audio import pcm16, read_wav, resample

log = logging.getLogger("mofa_omni.media.audio_stream")


def wav_turns(path: str | Path) -> list[Path]:
    """The WAV files a voice input names: the file itself, or a folder's ``*.wav`` by name."""
    path = Path(path).expanduser()
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() == ".wav" and not p.is_dir())
    if path.exists():
        return [path]
    raise ContractError(f"voice input {path} does not exist")


def load_turn(path: Path, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """One WAV file as float32 mono, resampled to ``sample_rate`` (None: the file's own rate).

    Anything that makes the file unusable raises ContractError naming the file.
    """
    audio, rate = read_wav(path)
    validate_audio(audio, rate, what=str(path))
    if sample_rate and rate != sample_rate:
        audio, rate = resample(audio, rate, sample_rate), sample_rate
    return audio, rate


def split_chunks(audio: np.ndarray, sample_rate: int, chunk_ms: float = 100.0) -> list[np.ndarray]:
    """``audio`` cut into pieces of ``chunk_ms`` (the last one may be shorter); views, no copies."""
    size = max(1, round(sample_rate * chunk_ms / 1000))
    return [audio[i : i + size] for i in range(0, len(audio), size)]


class StreamResampler:
    """Resamples a stream chunk by chunk, equal (away from the stream's end) to resampling
    the whole stream at once with :func:`mofa_omni.media.audio.resample`.

    Resampling each chunk on its own would click at every chunk boundary; this
    keeps a few milliseconds of context on both sides instead, so its output lags
    the input by ``latency`` samples until :meth:`flush`.
    """

    def __init__(self, rate: int, target_rate: int):
        if rate <= 0 or target_rate <= 0:
            raise ContractError(f"cannot resample {rate} Hz to {target_rate} Hz")
        self.rate, self.target_rate = int(rate), int(target_rate)
        divisor = gcd(self.rate, self.target_rate)
        self.up, self.down = self.target_rate // divisor, self.rate // divisor
        # resample_poly's filter reaches 10 * max(up, down) upsampled samples each way;
        # the context is that many input samples, rounded up to whole `down` blocks so
        # every block starts on an output sample.
        reach = math.ceil(10 * max(self.up, self.down) / self.up) + 1
        self.latency = math.ceil(reach / self.down) * self.down
        self._history = np.zeros(0, np.float32)
        self._pending = np.zeros(0, np.float32)

    @property
    def pending_out(self) -> float:
        """How many output samples the input held back so far will become."""
        return len(self._pending) * self.up / self.down

    def push(self, audio: np.ndarray) -> np.ndarray:
        """Resampled audio for as much of the stream as the context allows (maybe empty)."""
        audio = np.asarray(audio, np.float32).reshape(-1)
        if self.up == self.down:
            return audio
        self._pending = np.concatenate([self._pending, audio])
        ready = (len(self._pending) - self.latency) // self.down * self.down
        if ready <= 0:
            return np.zeros(0, np.float32)
        window = np.concatenate([self._history, self._pending[: ready + self.latency]])
        skip = len(self._history) * self.up // self.down
        out = self._resample(window)[skip : skip + ready * self.up // self.down]
        self._history = np.concatenate([self._history, self._pending[:ready]])[-self.latency :]
        self._pending = self._pending[ready:]
        return out

    def flush(self) -> np.ndarray:
        """The rest of the stream (its end treated as silence); the resampler starts afresh."""
        if self.up == self.down or self._pending.size == 0:
            self._history = self._pending = np.zeros(0, np.float32)
            return np.zeros(0, np.float32)
        window = np.concatenate([self._history, self._pending])
        out = self._resample(window)[len(self._history) * self.up // self.down :]
        self._history = self._pending = np.zeros(0, np.float32)
        return out

    def _resample(self, audio: np.ndarray) -> np.ndarray:
        return resample(audio, self.rate, self.target_rate)


@dataclass
class _OpenFile:
    path: Path
    wav: wave.Wave_write
    sample_rate: int
    samples: int = 0


class WavWriterSet:
    """One WAV file per request id in ``directory``, numbered in the order requests begin
    (``reply-001.wav``, ...), written chunk by chunk and closed on the final chunk."""

    def __init__(self, directory: str | Path, prefix: str = "reply"):
        self.directory = Path(directory)
        self.prefix = prefix
        self._open: dict[str, _OpenFile] = {}
        self._count = 0

    def write(self, request_id: str, audio: np.ndarray, sample_rate: int,
              final: bool) -> tuple[Path, float] | None:
        """Append ``audio`` to the request's file; on ``final`` close it and return
        (path, seconds)."""
        current = self._open.get(request_id)
        if current is None:
            current = self._open[request_id] = self._create(sample_rate)
        if audio.size:
            if sample_rate != current.sample_rate:  # a file has one rate: the first chunk's
                audio = resample(audio, sample_rate, current.sample_rate)
            current.wav.writeframes(pcm16(audio))
            current.samples += len(audio)
        return self._close(request_id) if final else None

    def open_requests(self) -> list[str]:
        """The requests whose file is being written (their final chunk has not come yet)."""
        return list(self._open)

    def close(self, request_id: str) -> tuple[Path, float] | None:
        """Close the request's file now (its stream was cancelled); None if it has none open."""
        return self._close(request_id) if request_id in self._open else None

    def close_all(self) -> list[tuple[Path, float]]:
        """Close the files whose final chunk never came (the stream ended early)."""
        closed = []
        for request_id in list(self._open):
            log.warning("request %s ended without a final chunk", request_id)
            closed.append(self._close(request_id))
        return closed

    def _create(self, sample_rate: int) -> _OpenFile:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._count += 1
        path = self.directory / f"{self.prefix}-{self._count:03d}.wav"
        wav = wave.open(str(path), "wb")
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(int(sample_rate))
        return _OpenFile(path, wav, int(sample_rate))

    def _close(self, request_id: str) -> tuple[Path, float]:
        current = self._open.pop(request_id)
        current.wav.close()
        return current.path, current.samples / current.sample_rate


class PlaybackClock:
    """When each request's audio would have finished playing on a speaker.

    Chunks play back to back from the first one's arrival; a chunk that arrives after
    the previous one has finished starts when it arrives (a gap a listener would hear).
    A file sink uses it to say "spoken" when a speaker would have, not when the bytes
    were written, so that turn-taking and barge-in behave as with a real speaker.
    """

    def __init__(self) -> None:
        self._ends: dict[str, float] = {}

    def add(self, request_id: str, seconds: float, now: float) -> float:
        """Account ``seconds`` of audio arriving ``now``; returns when it has been played."""
        end = max(now, self._ends.get(request_id, now)) + seconds
        self._ends[request_id] = end
        return end

    def forget(self, request_id: str) -> None:
        self._ends.pop(request_id, None)
