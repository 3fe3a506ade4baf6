"""Voice activity detection: cutting a stream of speech probabilities into utterances.

:class:`Segmenter` is the pure state machine. It reads one probability per
frame (Silero VAD: 512 samples at 16 kHz, 32 ms) together with the frame's
audio, and emits

- :class:`SpeechStarted` once a run of speech is confirmed (``min_speech_ms``
  of frames at or above ``threshold``), so a barge-in never fires on a click;
- :class:`Utterance` when that speech is followed by ``min_silence_ms`` of
  silence (frames below ``neg_threshold``), or reaches ``max_utterance_s``, or
  the stream is flushed. Its audio is padded by ``speech_pad_ms`` each side.

Every ``SpeechStarted`` is followed by exactly one ``Utterance`` of the same
index; unconfirmed speech and silence produce nothing. For a speech recognizer that works
while the user speaks, confirmed speech may also give *snapshots* before its utterance
(``Utterance`` with ``partial=True``, all its audio so far):

- every ``partial_every_ms`` of speech, while the speech goes on;
- once a pause has lasted ``speech_pad_ms`` (``transcribe_on_pause``): that snapshot holds
  exactly the audio the utterance will hold if the pause turns out to end it, so its
  transcript, made while the VAD still waits for ``min_silence_ms``, is the utterance's.

Ending a turn sooner: :meth:`Segmenter.pause_heard` takes the verdict on a pause snapshot (a
turn-end model's, the words' of its transcript, see :mod:`mofa_omni.voice.endpointing`); when
it says the turn is over, the pause ends the utterance once it lasts ``complete_silence_ms``
rather than ``min_silence_ms``.
:class:`StreamingVad` adds what a live stream needs around it: any sample
rate in, arbitrary chunk sizes, and a frame scorer (the model).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mofa_omni.contract.errors import ContractError
from mofa_omni.media.audio_stream import StreamResampler

VAD_RATE = 16000
FRAME_SAMPLES = 512  # Silero VAD's window at 16 kHz

Scorer = Callable[[np.ndarray], np.ndarray]  # frames (n, FRAME_SAMPLES) -> probabilities (n,)


@dataclass(frozen=True, slots=True)
class VadConfig:
    """Thresholds and durations of the segmenter (defaults suit turn-taking in a voice agent)."""

    threshold: float = 0.5  # a frame at or above this is speech
    neg_threshold: float | None = None  # below this, silence (default: threshold - 0.15)
    min_speech_ms: float = 250.0  # voiced time before speech counts (and SpeechStarted is sent)
    min_silence_ms: float = 600.0  # silence that ends an utterance
    speech_pad_ms: float = 100.0  # audio kept before the start and after the end
    max_utterance_s: float = 30.0  # longer speech is cut here (Whisper reads 30 s windows)
    partial_every_ms: float = 0.0  # a snapshot of speech under way this often (0: none)
    transcribe_on_pause: bool = False  # a snapshot once a pause is speech_pad_ms long
    # silence that ends an utterance whose pause was judged to end the turn (None: as
    # min_silence_ms; see pause_heard)
    complete_silence_ms: float | None = None
    sample_rate: int = VAD_RATE
    frame_samples: int = FRAME_SAMPLES

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ContractError(f"VAD threshold {self.threshold} must be between 0 and 1")
        if not 0.0 <= self.silence_threshold <= self.threshold:
            raise ContractError(f"VAD neg_threshold {self.silence_threshold} must be between 0 "
                                f"and the threshold {self.threshold}")
        if min(self.min_speech_ms, self.min_silence_ms, self.speech_pad_ms,
               self.partial_every_ms, self.silence_when_complete_ms) < 0:
            raise ContractError("VAD durations must not be negative")
        if self.max_utterance_s * 1000 <= self.min_speech_ms:
            raise ContractError(f"VAD max_utterance_s {self.max_utterance_s} must exceed "
                                f"min_speech_ms {self.min_speech_ms}")

    @property
    def silence_when_complete_ms(self) -> float:
        return self.min_silence_ms if self.complete_silence_ms is None \
            else self.complete_silence_ms

    @property
    def silence_threshold(self) -> float:
        return self.threshold - 0.15 if self.neg_threshold is None else self.neg_threshold

    def frames(self, ms: float) -> int:
        """How many whole frames ``ms`` milliseconds take (rounded up)."""
        return math.ceil(ms * self.sample_rate / 1000 / self.frame_samples - 1e-9)


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    index: int  # the utterance this speech will become (1, 2, ...)
    start_s: float  # stream time where the speech began


@dataclass(frozen=True, slots=True)
class Utterance:
    """One stretch of speech; ``audio`` spans the speech plus the padding on both sides."""

    index: int
    audio: np.ndarray  # float32, mono, at ``sample_rate``
    sample_rate: int
    start_s: float  # stream time where the speech began (before padding)
    end_s: float  # stream time where the speech ended (before padding)
    partial: bool = False  # a snapshot of speech not yet over (its utterance follows)
    pause: bool = False  # a snapshot taken in a pause (transcribe_on_pause)

    @property
    def duration_s(self) -> float:
        return len(self.audio) / self.sample_rate


VadEvent = SpeechStarted | Utterance


class Segmenter:
    """The state machine: frames and their speech probabilities in, events out."""

    def __init__(self, config: VadConfig | None = None):
        self.config = config or VadConfig()
        c = self.config
        self._pad = round(c.speech_pad_ms * c.sample_rate / 1000)
        self._keep_frames = math.ceil(self._pad / c.frame_samples)
        self._min_voiced = c.frames(c.min_speech_ms)
        self._min_silence = max(1, c.frames(c.min_silence_ms))
        self._max_frames = max(1, int(c.max_utterance_s * c.sample_rate / c.frame_samples))
        self._frames: deque[np.ndarray] = deque()  # recent frames; the first is frame _first
        self._first = 0
        self.frames_seen = 0
        self._count = 0  # utterances confirmed so far
        self._start: int | None = None  # first frame of the current speech, None in silence
        self._voiced = 0
        self._silence_from: int | None = None  # first frame of the silence now running
        self._confirmed = False
        self._floor = 0  # no utterance reaches back before this sample
        self._every = c.frames(c.partial_every_ms) if c.partial_every_ms else 0
        self._snapshot_at = 0  # frame of the last snapshot of speech under way
        self._pause_snapshot: int | None = None  # the pause (its first frame) snapshotted
        self._min_complete = max(1, c.frames(c.silence_when_complete_ms))
        self._complete_pause: int | None = None  # a pause after words that look complete

    def process(self, frames: np.ndarray, probabilities: np.ndarray) -> list[VadEvent]:
        """Advance by ``frames`` (n, frame_samples) scored ``probabilities`` (n,)."""
        # A copy: the frames are kept for padding, and the caller's buffer (say, dora's shared
        # memory behind a message) may be reused once the call returns.
        frames = np.array(frames, np.float32).reshape(-1, self.config.frame_samples)
        probabilities = np.asarray(probabilities, np.float32).reshape(-1)
        if len(frames) != len(probabilities):
            raise ContractError(f"{len(frames)} frames but {len(probabilities)} probabilities")
        events: list[VadEvent] = []
        for frame, probability in zip(frames, probabilities):
            self._step(frame, float(probability), events)
        return events

    def flush(self) -> list[VadEvent]:
        """End of the stream: close confirmed speech now; drop unconfirmed speech."""
        events: list[VadEvent] = []
        if self._start is not None and self._confirmed:
            end = self._silence_from if self._silence_from is not None else self.frames_seen
            events.append(self._utterance(end, self.frames_seen * self.config.frame_samples))
        self._to_silence()
        return events

    def _step(self, frame: np.ndarray, p: float, events: list[VadEvent]) -> None:
        c = self.config
        i = self.frames_seen
        self._frames.append(frame)
        self.frames_seen += 1
        if self._start is None:
            if p < c.threshold:
                self._trim()
                return
            self._start, self._voiced, self._silence_from, self._confirmed = i, 0, None, False
            self._snapshot_at = i
        # Hysteresis: only a voiced frame ends a silence; frames between the two thresholds
        # neither start one nor break one.
        if p >= c.threshold:
            self._voiced += 1
            self._silence_from = None
        elif p < c.silence_threshold and self._silence_from is None:
            self._silence_from = i
        if not self._confirmed and self._voiced >= self._min_voiced:
            self._confirmed = True
            self._count += 1
            events.append(SpeechStarted(self._count, self._seconds(self._start)))
        silent = 0 if self._silence_from is None else self.frames_seen - self._silence_from
        if silent >= (self._min_complete if self._complete_pause == self._silence_from
                      else self._min_silence):
            if self._confirmed:
                available = self.frames_seen * c.frame_samples
                events.append(self._utterance(self._silence_from, available))
            self._to_silence()
        elif self.frames_seen - self._start >= self._max_frames:
            if self._confirmed:  # cut here; the speech goes on as a new utterance
                cut = self.frames_seen * c.frame_samples
                events.append(self._utterance(self.frames_seen, cut, pad_end=False))
                self._start, self._voiced, self._silence_from = self.frames_seen, 0, None
                self._confirmed, self._snapshot_at = False, self.frames_seen
                self._floor = cut  # the next utterance must not repeat this one's audio
            else:
                self._to_silence()
        elif self._confirmed:
            self._snapshot(events)

    def _snapshot(self, events: list[VadEvent]) -> None:
        """Confirmed speech goes on (or pauses): a snapshot if one is due."""
        available = self.frames_seen * self.config.frame_samples
        if self._silence_from is None:
            if self._every and self.frames_seen - self._snapshot_at >= self._every:
                self._snapshot_at = self.frames_seen
                events.append(self._utterance(self.frames_seen, available, pad_end=False,
                                              partial=True))
        elif (self.config.transcribe_on_pause and self._pause_snapshot != self._silence_from
              and available >= self._silence_from * self.config.frame_samples + self._pad):
            self._pause_snapshot = self._silence_from
            events.append(self._utterance(self._silence_from, available, partial=True,
                                          pause=True))

    def pause_heard(self, end_s: float, complete: bool) -> list[VadEvent]:
        """The verdict on the speech that paused at ``end_s`` (a pause snapshot's ``end_s``) is
        in: if the turn looks ``complete``, that pause ends the utterance once it lasts
        ``complete_silence_ms`` — now, if it already does. Nothing for a pause that is over
        (the speech went on, or the utterance was sent)."""
        c = self.config
        if not (complete and self._confirmed and self._silence_from is not None
                and self._silence_from * c.frame_samples == round(end_s * c.sample_rate)):
            return []
        self._complete_pause = self._silence_from
        if self.frames_seen - self._silence_from < self._min_complete:
            return []
        events: list[VadEvent] = [self._utterance(self._silence_from,
                                                  self.frames_seen * c.frame_samples)]
        self._to_silence()
        return events

    def _utterance(self, end_frame: int, available: int, *, pad_end: bool = True,
                   partial: bool = False, pause: bool = False) -> Utterance:
        c = self.config
        assert self._start is not None
        start = self._start * c.frame_samples
        end = end_frame * c.frame_samples
        lo = max(start - self._pad, self._first * c.frame_samples, self._floor)
        hi = min(end + self._pad, available) if pad_end else end
        base = self._first * c.frame_samples
        audio = np.concatenate(list(self._frames))[lo - base : hi - base]
        return Utterance(self._count, audio, c.sample_rate, start / c.sample_rate,
                         end / c.sample_rate, partial, pause)

    def _to_silence(self) -> None:
        self._start, self._voiced, self._silence_from, self._confirmed = None, 0, None, False
        self._trim()

    def _trim(self) -> None:
        """Outside speech only the frames a future start's padding may need are kept."""
        while len(self._frames) > self._keep_frames:
            self._frames.popleft()
            self._first += 1

    def _seconds(self, frame: int) -> float:
        return frame * self.config.frame_samples / self.config.sample_rate


class StreamingVad:
    """A live stream through the segmenter: audio chunks of any size and rate in, events out.

    ``score`` turns frames (n, 512) of 16 kHz audio into speech probabilities; it
    is called in stream order, so a recurrent model can carry its state across
    calls (e.g. ``SileroVadAdapter.speech_probabilities``).
    """

    def __init__(self, score: Scorer, config: VadConfig | None = None):
        self.score = score
        self.segmenter = Segmenter(config)
        self.config = self.segmenter.config
        self._rest = np.zeros(0, np.float32)
        self._resampler: StreamResampler | None = None

    @property
    def position(self) -> float:
        """Where the next input sample will land on the segmenter's timeline (samples at
        the VAD's rate): what a :class:`SampleClock` marks before each push."""
        held = self._resampler.pending_out if self._resampler else 0.0
        return self.segmenter.frames_seen * self.config.frame_samples + len(self._rest) + held

    def push(self, audio: np.ndarray, sample_rate: int) -> list[VadEvent]:
        """Feed one chunk of float32 mono audio; empty chunks are fine."""
        audio = np.asarray(audio, np.float32).reshape(-1)
        events: list[VadEvent] = []
        if self._resampler is None or self._resampler.rate != sample_rate:
            if self._resampler is not None:  # the rate changed: finish the old stream's tail
                events += self._frames(self._resampler.flush())
            self._resampler = StreamResampler(sample_rate, self.config.sample_rate)
        return events + self._frames(self._resampler.push(audio))

    def flush(self) -> list[VadEvent]:
        """The stream ended (or paused): close any confirmed utterance now."""
        events = self._frames(self._resampler.flush()) if self._resampler else []
        if self._rest.size:  # complete the last frame with silence, so no audio is lost
            missing = self.config.frame_samples - self._rest.size
            events += self._frames(np.zeros(missing, np.float32))
        return events + self.segmenter.flush()

    def _frames(self, audio: np.ndarray) -> list[VadEvent]:
        if audio.size == 0:
            return []
        buffered = np.concatenate([self._rest, audio]) if self._rest.size else audio
        n = len(buffered) // self.config.frame_samples
        self._rest = buffered[n * self.config.frame_samples :].copy()
        if n == 0:
            return []
        frames = buffered[: n * self.config.frame_samples].reshape(n, self.config.frame_samples)
        return self.segmenter.process(frames, self.score(frames))


class SampleClock:
    """Maps a stream's sample positions to the wall-clock times their chunks carried.

    ``mark(sample, ns)`` records that sample ``sample`` was captured at ``ns``;
    ``at(sample)`` extrapolates from the nearest mark at or before it.
    """

    def __init__(self, sample_rate: int, keep: int = 4096):
        self.sample_rate = sample_rate
        self._marks: deque[tuple[int, int]] = deque(maxlen=keep)

    def mark(self, sample: int, ns: int) -> None:
        self._marks.append((sample, ns))

    def at(self, sample: int, default_ns: int = 0) -> int:
        for marked, ns in reversed(self._marks):
            if marked <= sample:
                return ns + round((sample - marked) * 1e9 / self.sample_rate)
        if self._marks:
            marked, ns = self._marks[0]
            return ns - round((marked - sample) * 1e9 / self.sample_rate)
        return default_ns
