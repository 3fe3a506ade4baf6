"""Transcribing an utterance while it is spoken: snapshots in, partial transcripts out.

A VAD with snapshots on (``nodes/vad.py``: PARTIAL_EVERY_MS, TRANSCRIBE_ON_PAUSE) sends each
utterance as one :class:`~mofa_omni.contract.tasks.TranscriptionRequest` in several messages
under one request id: snapshots of all its audio so far (``final: false``), then the
utterance itself (``final: true``). :class:`RecognitionStreams` serves them on any speech
recognizer:

- a snapshot is transcribed and its words go through
  :class:`~mofa_omni.voice.agreement.LocalAgreement`: the answer is a partial transcript whose
  first ``settled_words`` will not change. Where the recognizer takes a ``prefix`` (whisper),
  the settled words are given as one, so each pass only decodes what is still open;
- the utterance: when its audio is exactly that of the last snapshot transcribed (the pause
  snapshot: the VAD sends it once a pause is as long as its padding, then waits for the
  silence to last), that transcript is the answer at once: the recognizer worked while the
  VAD waited. Otherwise the utterance is transcribed, after the settled words.

A snapshot that a newer message of its request replaced before it started is not served
at all (:class:`~mofa_omni.node.serving.RequestWorker`); one the recognizer fails on is
logged and gets no partial transcript, and its utterance is transcribed whole, so its own
result or error answers the request.
"""

from __future__ import annotations

import collections
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from mofa_omni.contract.tasks import Segment, Transcript, TranscriptionRequest
from mofa_omni.voice.agreement import LocalAgreement

log = logging.getLogger("mofa_omni.voice.streaming")

OPEN_STREAMS = 8  # utterances followed at once; the oldest is forgotten past this
FIRST_SAMPLES = 256  # every snapshot of an utterance starts with the same audio


def fingerprint(request: TranscriptionRequest) -> bytes:
    """What tells two requests' audio apart: a digest of the samples and their rate."""
    digest = hashlib.blake2b(request.audio.tobytes(), digest_size=16)
    digest.update(request.sample_rate.to_bytes(4, "little"))
    return digest.digest()


def opening(request: TranscriptionRequest) -> bytes:
    """The first samples of a request's audio: the same in every snapshot of one utterance."""
    return request.audio[:FIRST_SAMPLES].tobytes()


@dataclass
class _Stream:
    opening: bytes  # the first samples of its audio
    agreement: LocalAgreement = field(default_factory=LocalAgreement)
    heard: bytes = b""  # fingerprint of the last snapshot transcribed
    transcript: Transcript | None = None  # and its transcript


class RecognitionStreams:
    """Serves speech recognition requests sent whole or as snapshots (see the module)."""

    def __init__(self, transcribe: Callable[[TranscriptionRequest], Transcript], *,
                 takes_prefix: bool):
        self.transcribe, self.takes_prefix = transcribe, takes_prefix
        self._streams: collections.OrderedDict[str, _Stream] = collections.OrderedDict()
        self.reused = 0  # utterances answered by their pause snapshot's transcript

    def is_open(self, request_id: str) -> bool:
        """Whether snapshots of ``request_id`` came and its utterance did not yet."""
        return request_id in self._streams

    def serve(self, request_id: str, final: bool, request: TranscriptionRequest
              ) -> Transcript | None:
        """The transcript of one message of ``request_id``: partial for a snapshot (None if
        the recognizer failed on it), whole for the utterance."""
        if not final:
            return self._snapshot(request_id, request)
        stream = self._streams.pop(request_id, None)
        if stream is None or stream.opening != opening(request):  # not the snapshots' speech
            return self.transcribe(request)
        if stream.transcript is not None and stream.heard == fingerprint(request):
            self.reused += 1
            return stream.transcript
        return self.transcribe(self._after_settled(request, stream))

    def _snapshot(self, request_id: str, request: TranscriptionRequest) -> Transcript | None:
        stream = self._streams.pop(request_id, None)
        if stream is None or stream.opening != opening(request):
            # the first snapshot (or an id used again: a sender that started over)
            stream = _Stream(opening(request))
        self._streams[request_id] = stream  # the newest last
        while len(self._streams) > OPEN_STREAMS:
            self._streams.popitem(last=False)
        stream.transcript = None
        try:
            transcript = self.transcribe(self._after_settled(request, stream))
        except Exception as error:  # noqa: BLE001 -- the utterance will be transcribed whole
            log.warning("%s: a snapshot could not be transcribed (%s: %s); the utterance will "
                        "be", request_id, type(error).__name__, error)
            return None
        stream.heard, stream.transcript = fingerprint(request), transcript
        stream.agreement.update(transcript.text.split())
        words = stream.agreement.committed + stream.agreement.unsettled()
        text = " ".join(words)
        seconds = request.audio.size / request.sample_rate
        return Transcript(text, transcript.language, [Segment(0.0, seconds, text)] if text else [],
                          settled_words=len(stream.agreement.committed))

    def _after_settled(self, request: TranscriptionRequest, stream: _Stream
                       ) -> TranscriptionRequest:
        """``request`` going on after the settled words, where the recognizer can."""
        if not (self.takes_prefix and stream.agreement.committed) or request.prefix:
            return request
        return replace(request, prefix=" ".join(stream.agreement.committed))
