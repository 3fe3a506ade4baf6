"""Voice activity detection: the segmenter on synthetic probabilities, the streaming VAD,
and the real Silero VAD model on espeak-ng speech."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import ErrorReport, GenericRequest, GenericResult
from mofa_omni.media.audio import read_wav, resample
from mofa_omni.node.host import ModelHost
from mofa_omni.voice.vad import (
    FRAME_SAMPLES,
    SampleClock,
    Segmenter,
    SpeechStarted,
    StreamingVad,
    Utterance,
    VadConfig,
)

RATE = 16000
FRAME_S = FRAME_SAMPLES / RATE  # 32 ms

# Round numbers of frames: 8 frames of speech confirm, 10 of silence end, pad 2 frames.
CONFIG = VadConfig(min_speech_ms=8 * 32, min_silence_ms=10 * 32, speech_pad_ms=2 * 32,
                   max_utterance_s=100 * FRAME_S)


def ramp_frames(n: int, first: int = 0) -> np.ndarray:
    """Frames whose samples hold their own stream position, so audio bounds can be checked."""
    start = first * FRAME_SAMPLES
    return np.arange(start, start + n * FRAME_SAMPLES, dtype=np.float32).reshape(n, FRAME_SAMPLES)


def run(probabilities: list[float], config: VadConfig = CONFIG, *, flush: bool = True):
    segmenter = Segmenter(config)
    p = np.asarray(probabilities, np.float32)
    events = segmenter.process(ramp_frames(len(p)), p)
    return events + (segmenter.flush() if flush else [])


def utterances(events) -> list[Utterance]:
    return [e for e in events if isinstance(e, Utterance)]


def speech(frames: int, p: float = 0.9) -> list[float]:
    return [p] * frames


def silence(frames: int, p: float = 0.05) -> list[float]:
    return [p] * frames


# --- the segmenter -------------------------------------------------------------------

def test_silence_alone_produces_nothing():
    assert run(silence(500)) == []
    assert run([0.34] * 200) == []  # just under the threshold, for ever


def test_one_stretch_of_speech_is_one_utterance_with_padding():
    events = run(silence(20) + speech(30) + silence(20))
    assert [type(e) for e in events] == [SpeechStarted, Utterance]
    started, utterance = events
    assert started.index == utterance.index == 1
    assert started.start_s == utterance.start_s == pytest.approx(20 * FRAME_S)
    assert utterance.end_s == pytest.approx(50 * FRAME_S)
    pad = 2 * FRAME_SAMPLES
    # The audio runs from `pad` before the speech to `pad` after it, sample-exact.
    assert utterance.audio[0] == 20 * FRAME_SAMPLES - pad
    assert utterance.audio[-1] == 50 * FRAME_SAMPLES + pad - 1
    assert np.all(np.diff(utterance.audio) == 1)
    assert utterance.sample_rate == RATE
    assert utterance.duration_s == pytest.approx((30 + 4) * FRAME_S)


def test_speech_at_the_very_start_is_padded_only_as_far_as_the_stream_goes():
    (utterance,) = utterances(run(speech(20) + silence(20)))
    assert utterance.start_s == 0.0 and utterance.audio[0] == 0


def test_events_come_out_incrementally_at_the_frame_they_happen():
    segmenter = Segmenter(CONFIG)
    p = np.asarray(silence(5) + speech(20) + silence(15), np.float32)
    frames = ramp_frames(len(p))
    seen = {}
    for i in range(len(p)):
        for event in segmenter.process(frames[i : i + 1], p[i : i + 1]):
            seen[type(event)] = i
    assert seen[SpeechStarted] == 5 + 8 - 1  # the 8th voiced frame confirms the speech
    assert seen[Utterance] == 25 + 10 - 1  # the 10th silent frame ends it
    assert segmenter.flush() == []


def test_feeding_frame_by_frame_or_all_at_once_gives_the_same_utterances():
    rng = np.random.default_rng(1)
    p = np.clip(np.repeat(rng.random(60), 7), 0, 1).astype(np.float32)
    frames = ramp_frames(len(p))
    whole = Segmenter(CONFIG).process(frames, p)
    pieces, segmenter, i = [], Segmenter(CONFIG), 0
    while i < len(p):
        n = int(rng.integers(1, 9))
        pieces += segmenter.process(frames[i : i + n], p[i : i + n])
        i += n
    assert len(whole) == len(pieces) > 0
    for a, b in zip(whole, pieces):
        assert type(a) is type(b) and a.index == b.index and a.start_s == b.start_s
        if isinstance(a, Utterance):
            assert np.array_equal(a.audio, b.audio)


def test_blips_shorter_than_min_speech_are_dropped():
    assert run(silence(10) + speech(7) + silence(30) + speech(3) + silence(30)) == []


def test_min_speech_counts_voiced_frames_only():
    # 7 voiced frames with undecided ones between them never confirm.
    assert run(silence(5) + [0.9, 0.4] * 7 + silence(30)) == []
    assert len(utterances(run(silence(5) + [0.9, 0.4] * 8 + silence(30)))) == 1


def test_a_pause_shorter_than_min_silence_keeps_one_utterance():
    events = run(speech(20) + silence(9) + speech(20) + silence(20))
    (utterance,) = utterances(events)
    assert utterance.end_s == pytest.approx(49 * FRAME_S)


def test_a_pause_of_min_silence_splits_into_two_utterances():
    events = run(speech(20) + silence(10) + speech(20) + silence(20))
    assert [(type(e).__name__, e.index) for e in events] == [
        ("SpeechStarted", 1), ("Utterance", 1), ("SpeechStarted", 2), ("Utterance", 2)]
    first, second = utterances(events)
    assert first.end_s == pytest.approx(20 * FRAME_S)
    assert second.start_s == pytest.approx(30 * FRAME_S)


def test_hysteresis_between_the_thresholds():
    # Undecided frames (between neg_threshold 0.35 and threshold 0.5) do not start a silence...
    (one,) = utterances(run(speech(10) + [0.4] * 40 + speech(10) + silence(20)))
    assert one.end_s == pytest.approx(60 * FRAME_S)
    # ...nor break one that has started: the silence counts from its first quiet frame.
    events = run(speech(10) + silence(3) + [0.4] * 7 + speech(10) + silence(20))
    first, second = utterances(events)
    assert first.end_s == pytest.approx(10 * FRAME_S)
    # The threshold, not neg_threshold, starts speech.
    assert run([0.45] * 100) == []


def test_max_utterance_cuts_long_speech_into_contiguous_pieces():
    events = run(speech(250) + silence(20))
    pieces = utterances(events)
    assert [u.index for u in pieces] == [1, 2, 3]
    assert [e.index for e in events if isinstance(e, SpeechStarted)] == [1, 2, 3]
    assert [round(u.start_s / FRAME_S) for u in pieces] == [0, 100, 200]
    assert [round(u.end_s / FRAME_S) for u in pieces] == [100, 200, 250]
    joined = np.concatenate([u.audio for u in pieces])
    # No sample lost or repeated at the cuts; only the last piece has its trailing pad.
    assert np.array_equal(joined, np.arange(0, 252 * FRAME_SAMPLES, dtype=np.float32))


def test_flush_closes_confirmed_speech_and_drops_the_rest():
    open_speech = run(silence(5) + speech(20) + silence(4), flush=False)
    assert [type(e) for e in open_speech] == [SpeechStarted]
    (utterance,) = utterances(run(silence(5) + speech(20) + silence(4)))
    assert utterance.end_s == pytest.approx(25 * FRAME_S)
    assert utterance.audio[-1] == 27 * FRAME_SAMPLES - 1  # the full pad
    (cut_short,) = utterances(run(silence(5) + speech(20) + silence(1)))
    assert cut_short.audio[-1] == 26 * FRAME_SAMPLES - 1  # padded as far as the audio went
    assert run(silence(5) + speech(5)) == []


def test_every_speech_started_is_followed_by_its_utterance():
    rng = np.random.default_rng(7)
    p = np.repeat(rng.random(400), rng.integers(1, 12, 400)).astype(np.float32)
    events = run(list(p))
    started = [e.index for e in events if isinstance(e, SpeechStarted)]
    ended = [e.index for e in events if isinstance(e, Utterance)]
    assert started == ended == list(range(1, len(started) + 1))
    assert len(started) > 3


@pytest.mark.parametrize("kwargs", [dict(threshold=1.2), dict(threshold=0.5, neg_threshold=0.6),
                                    dict(min_silence_ms=-1), dict(max_utterance_s=0.1)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ContractError):
        VadConfig(**kwargs)


def test_frames_and_probabilities_must_pair_up():
    with pytest.raises(ContractError, match="3 frames but 2 probabilities"):
        Segmenter().process(ramp_frames(3), np.zeros(2))


# --- the streaming VAD --------------------------------------------------------------

def loudness_scorer(frames: np.ndarray) -> np.ndarray:
    """A stand-in model: loud frames are speech."""
    return (np.sqrt((frames**2).mean(axis=1)) > 0.05).astype(np.float32)


def tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


@pytest.mark.parametrize("rate", [16000, 48000, 22050])
def test_streaming_vad_takes_chunks_of_any_size_and_rate(rate: int):
    quiet = lambda s: np.zeros(round(s * rate), np.float32)  # noqa: E731
    audio = np.concatenate([quiet(1.0), tone(1.5, rate), quiet(1.2), tone(0.8, rate), quiet(1.0)])
    vad = StreamingVad(loudness_scorer, VadConfig(min_silence_ms=500))
    rng = np.random.default_rng(rate)
    events, i = [], 0
    while i < len(audio):
        n = int(rng.integers(0, rate // 5))  # empty chunks included
        events += vad.push(audio[i : i + n], rate)
        i += n
    events += vad.flush()
    first, second = utterances(events)
    assert first.start_s == pytest.approx(1.0, abs=0.04)
    assert first.end_s == pytest.approx(2.5, abs=0.04)
    assert second.start_s == pytest.approx(3.7, abs=0.04)
    assert second.end_s == pytest.approx(4.5, abs=0.04)
    assert first.sample_rate == RATE and first.audio.dtype == np.float32
    assert first.duration_s == pytest.approx(1.5 + 0.2, abs=0.07)


def test_streaming_vad_ignores_empty_chunks_and_silence():
    vad = StreamingVad(loudness_scorer)
    assert vad.push(np.zeros(0, np.float32), 16000) == []
    assert vad.push(np.zeros(48000, np.float32), 48000) == []
    assert vad.flush() == []


def test_flush_ends_speech_at_the_end_of_a_turn_and_keeps_the_last_samples():
    vad = StreamingVad(loudness_scorer)
    events = vad.push(np.concatenate([np.zeros(8000, np.float32), tone(1.01, 16000)]), 16000)
    assert [type(e) for e in events] == [SpeechStarted]
    (utterance,) = vad.flush()
    assert utterance.end_s == pytest.approx(1.51, abs=0.033)
    assert vad.position == pytest.approx(vad.segmenter.frames_seen * FRAME_SAMPLES)


def test_position_follows_the_input_through_the_resampler():
    vad = StreamingVad(loudness_scorer)
    for _ in range(7):
        vad.push(np.zeros(4410, np.float32), 44100)
    assert vad.position == pytest.approx(7 * 1600, abs=1)


def test_sample_clock_maps_positions_to_chunk_times():
    clock = SampleClock(16000)
    assert clock.at(100, default_ns=5) == 5
    clock.mark(0, 1_000_000_000)
    clock.mark(1600, 3_000_000_000)  # the second chunk arrived late
    assert clock.at(800) == 1_050_000_000
    assert clock.at(3200) == 3_100_000_000


# --- the real model -----------------------------------------------------------------

def espeak(text: str, directory: Path) -> np.ndarray:
    """``text`` spoken by espeak-ng, as float32 mono at 16 kHz."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    path = directory / f"{abs(hash(text))}.wav"
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    audio, rate = read_wav(path)
    return resample(audio, rate, RATE)


@pytest.fixture(scope="module")
def sentences(tmp_path_factory) -> list[np.ndarray]:
    directory = tmp_path_factory.mktemp("espeak")
    return [espeak(text, directory) for text in (
        "The quick brown fox jumps over the lazy dog.",
        "What is the capital of France?",
        "Please turn off the lights in the kitchen.")]


@pytest.fixture()
def silero(model):
    adapter = model("silero-vad")
    adapter.reset()
    return adapter


def stream(vad: StreamingVad, audio: np.ndarray, chunk: int = 1600) -> list:
    events = []
    for i in range(0, len(audio), chunk):
        events += vad.push(audio[i : i + chunk], RATE)
    return events + vad.flush()


def quiet(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), np.float32)


@pytest.mark.slow
def test_silero_finds_one_utterance_per_sentence(silero, sentences):
    parts, spans, t = [quiet(0.8)], [], 0.8
    for sentence in sentences:
        parts += [sentence, quiet(1.2)]
        spans.append((t, t + len(sentence) / RATE))
        t += len(sentence) / RATE + 1.2
    events = stream(StreamingVad(silero.speech_probabilities), np.concatenate(parts))
    found = utterances(events)
    assert [u.index for u in found] == [1, 2, 3]
    assert [e.index for e in events if isinstance(e, SpeechStarted)] == [1, 2, 3]
    for utterance, (start, end) in zip(found, spans):
        # espeak's own leading/trailing silence is inside the file's span.
        assert start - 0.05 <= utterance.start_s < start + 0.3
        assert end - 0.4 < utterance.end_s <= end + 0.05
        assert np.abs(utterance.audio).max() > 0.1  # the speech is in the audio


@pytest.mark.slow
def test_silero_hears_nothing_in_silence_or_low_noise(silero):
    assert stream(StreamingVad(silero.speech_probabilities), quiet(5)) == []
    silero.reset()
    noise = (np.random.default_rng(0).standard_normal(5 * RATE) * 0.01).astype(np.float32)
    assert stream(StreamingVad(silero.speech_probabilities), noise) == []


@pytest.mark.slow
def test_silero_state_carries_over_between_calls(silero, sentences):
    audio = np.concatenate([quiet(0.5), sentences[1], quiet(0.5)])
    frames = audio[: len(audio) // FRAME_SAMPLES * FRAME_SAMPLES].reshape(-1, FRAME_SAMPLES)
    whole = silero.speech_probabilities(frames)
    silero.reset()
    split = np.concatenate([silero.speech_probabilities(frames[:17]),
                            silero.speech_probabilities(frames[17:])])
    np.testing.assert_allclose(whole, split, atol=1e-6)
    assert whole.dtype == np.float32 and whole.max() > 0.9 and whole[:10].max() < 0.2
    with pytest.raises(ContractError, match="frames of 512 samples"):
        silero.speech_probabilities(np.zeros((2, 480), np.float32))


@pytest.mark.slow
def test_silero_serves_speech_probability_through_generic(silero, sentences):
    """The same model over Arrow, as Task.GENERIC kind audio.speech_probability."""
    (spec,) = silero.generic_specs()
    assert spec.name == "audio.speech_probability"
    audio = np.concatenate([quiet(0.3), sentences[0]])
    frames = audio[: len(audio) // FRAME_SAMPLES * FRAME_SAMPLES].reshape(-1, FRAME_SAMPLES)
    batch = pa.RecordBatch.from_arrays(
        [pa.FixedSizeListArray.from_arrays(pa.array(frames.reshape(-1)), FRAME_SAMPLES)],
        schema=spec.input_schema)
    host = ModelHost(silero, "vad")
    (out,) = host.handle("generic", arrow.encode(GenericRequest(spec.name, batch)),
                         {"request_id": "frames-1"})
    assert out.output == "result" and out.meta.request_id == "frames-1"
    result = arrow.decode(out.value, GenericResult)
    assert result.batch.schema.equals(spec.output_schema)
    silero.reset()
    np.testing.assert_allclose(result.batch.column("probability").to_numpy(),
                               silero.speech_probabilities(frames), atol=1e-6)

    wrong = pa.RecordBatch.from_pydict({"frame": [[0.0] * 512]})  # list, not fixed-size list
    (error,) = host.handle("generic", arrow.encode(GenericRequest(spec.name, wrong)))
    report = arrow.decode(error.value, ErrorReport)
    assert error.output == "error" and report.kind == "bad_request"
    assert "does not match the declared" in report.message


def test_snapshots_of_speech_under_way_and_of_a_pause_come_before_the_utterance():
    """Every 5 frames of confirmed speech a snapshot of the audio so far; once a pause is as
    long as the padding, a snapshot holding exactly what the utterance will hold if the pause
    ends it. A pause that speech breaks gets its snapshot too; the last one is the utterance."""
    config = dataclasses.replace(CONFIG, partial_every_ms=5 * 32, transcribe_on_pause=True)
    segmenter = Segmenter(config)
    p = np.asarray(silence(20) + speech(30) + silence(5) + speech(10) + silence(20), np.float32)
    frames = ramp_frames(len(p))
    seen = [(i, event) for i in range(len(p))
            for event in segmenter.process(frames[i:i + 1], p[i:i + 1])]
    *partials, (end_frame, utterance) = [(i, e) for i, e in seen if isinstance(e, Utterance)]
    assert not utterance.partial and all(e.partial and e.index == 1 for _, e in partials)
    pad = 2 * FRAME_SAMPLES
    # a pause's snapshot is padded after the speech; one of speech under way is not
    growing = [(i, e) for i, e in partials if e.audio[-1] != e.end_s * RATE + pad - 1]
    # confirmed at frame 27; then every 5 frames from the speech's start (frame 20); none in
    # the pause (frames 50-54), one as soon as the speech goes on, 5 frames after the last
    assert [i for i, _ in growing] == [27, 32, 37, 42, 47, 55, 60]
    for i, snapshot in growing:
        assert snapshot.audio[0] == 20 * FRAME_SAMPLES - pad  # padded before, not after
        assert snapshot.audio[-1] == (i + 1) * FRAME_SAMPLES - 1
    pauses = [(i, e) for i, e in partials if (i, e) not in growing]
    assert [i for i, _ in pauses] == [51, 66]  # 2 frames of padding into each pause
    assert pauses[0][1].audio[-1] == 50 * FRAME_SAMPLES + pad - 1
    assert np.array_equal(pauses[-1][1].audio, utterance.audio)
    assert end_frame == 65 + 10 - 1


def test_no_snapshots_unless_asked():
    events = run(silence(20) + speech(60) + silence(20))
    assert [e.partial for e in utterances(events)] == [False]


def feed(segmenter: Segmenter, p: list[float], first: int = 0) -> list[tuple[int, object]]:
    """(frame index, event) for ``p`` fed frame by frame from frame ``first``."""
    frames = ramp_frames(len(p), first)
    return [(first + i, event) for i in range(len(p))
            for event in segmenter.process(frames[i:i + 1], np.float32([p[i]]))]


def test_words_that_look_complete_end_the_utterance_after_a_shorter_pause():
    """With the pause snapshot's words judged complete, a pause of 4 frames ends the
    utterance (not 10), with the very audio of that snapshot; judged incomplete, or heard
    after the speech went on, the pause needs its full 10 frames."""
    config = dataclasses.replace(CONFIG, transcribe_on_pause=True, complete_silence_ms=4 * 32)
    segmenter = Segmenter(config)
    seen = feed(segmenter, silence(20) + speech(30) + silence(2))
    (at, snapshot), = [(i, e) for i, e in seen if isinstance(e, Utterance)]
    assert snapshot.pause and at == 51
    assert segmenter.pause_heard(snapshot.end_s, complete=True) == []  # 2 frames of 4 so far
    (end_frame, utterance), = [(i, e) for i, e in feed(segmenter, silence(10), 52)
                               if isinstance(e, Utterance)]
    assert end_frame == 50 + 4 - 1 and not utterance.partial
    assert np.array_equal(utterance.audio, snapshot.audio)
    # the words come in after the pause already lasted long enough: the utterance ends now
    segmenter = Segmenter(config)
    seen = feed(segmenter, silence(20) + speech(30) + silence(6))
    snapshot = [e for _, e in seen if isinstance(e, Utterance)][0]
    (utterance,) = segmenter.pause_heard(snapshot.end_s, complete=True)
    assert np.array_equal(utterance.audio, snapshot.audio) and not utterance.partial
    assert [e for _, e in feed(segmenter, silence(20), 56)] == []  # and only once
    # incomplete words: the full pause
    segmenter = Segmenter(config)
    seen = feed(segmenter, silence(20) + speech(30) + silence(2))
    assert segmenter.pause_heard(seen[-1][1].end_s, complete=False) == []
    assert [i for i, e in feed(segmenter, silence(20), 52)
            if isinstance(e, Utterance) and not e.partial] == [50 + 10 - 1]
    # words of a pause the speech broke: nothing changes for the next pause
    segmenter = Segmenter(config)
    seen = feed(segmenter, silence(20) + speech(30) + silence(3) + speech(10))
    first_pause = [e for _, e in seen if isinstance(e, Utterance)][0]
    assert segmenter.pause_heard(first_pause.end_s, complete=True) == []
    assert [i for i, e in feed(segmenter, silence(20), 63)
            if isinstance(e, Utterance) and not e.partial] == [63 + 10 - 1]
