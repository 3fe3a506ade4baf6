"""The pure helpers behind the voice nodes: audio streams, WAV turns and files, events,
message recognition, configuration; and the microphone's message when PortAudio is missing."""

from __future__ import annotations

import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mofa_omni.config import env_choice, env_float, env_pace
from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ConfigError, ContractError
from mofa_omni.contract.tasks import (
    AudioChunk,
    ErrorReport,
    GenericResult,
    TextChunk,
    Transcript,
    TranscriptionRequest,
)
from mofa_omni.media.audio import read_wav, resample
from mofa_omni.media.audio_stream import (
    StreamResampler,
    WavWriterSet,
    load_turn,
    split_chunks,
    wav_turns,
)
from mofa_omni.voice.events import (
    DONE,
    SPEECH_STARTED,
    MessageLog,
    SeqTracker,
    event,
    identify,
    read_event,
)

NODES = Path(__file__).parents[1] / "nodes"


def write_pcm(path: Path, samples: np.ndarray, rate: int, channels: int = 1) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(samples.astype("<i2").tobytes())


# --- audio streams -------------------------------------------------------------------

@pytest.mark.parametrize("rate, target", [(48000, 16000), (22050, 16000), (44100, 16000),
                                          (8000, 16000), (16000, 16000), (16000, 24000)])
def test_stream_resampler_equals_resampling_the_whole_stream(rate: int, target: int):
    rng = np.random.default_rng(rate)
    audio = (rng.standard_normal(2 * rate) * 0.3).astype(np.float32)
    resampler = StreamResampler(rate, target)
    out, i = [], 0
    while i < len(audio):
        n = int(rng.integers(0, rate // 8))  # empty and tiny chunks included
        out.append(resampler.push(audio[i : i + n]))
        assert resampler.pending_out <= resampler.latency * target / rate + target // 10
        i += n
    out.append(resampler.flush())
    whole = resample(audio, rate, target)
    streamed = np.concatenate(out)
    assert streamed.dtype == np.float32 and len(streamed) == len(whole)
    np.testing.assert_allclose(streamed, whole, atol=1e-5)
    assert resampler.flush().size == 0


def test_stream_resampler_latency_is_a_few_milliseconds():
    assert StreamResampler(48000, 16000).latency / 48000 < 0.002
    assert StreamResampler(22050, 16000).latency / 22050 < 0.025
    with pytest.raises(ContractError):
        StreamResampler(0, 16000)


def test_split_chunks_covers_the_audio_in_100_ms_pieces():
    audio = np.arange(16000 * 2 + 500, dtype=np.float32)
    chunks = split_chunks(audio, 16000)
    assert [len(c) for c in chunks] == [1600] * 20 + [500]
    assert np.array_equal(np.concatenate(chunks), audio)
    assert split_chunks(np.zeros(0, np.float32), 16000) == []


def test_wav_turns_are_a_file_or_a_folders_wavs_in_name_order(tmp_path: Path):
    for name in ("b.wav", "a.WAV", "c.wav", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "d.wav").mkdir()
    assert [p.name for p in wav_turns(tmp_path)] == ["a.WAV", "b.wav", "c.wav"]
    assert wav_turns(tmp_path / "c.wav") == [tmp_path / "c.wav"]
    with pytest.raises(ContractError, match="does not exist"):
        wav_turns(tmp_path / "missing")


def test_load_turn_makes_float32_mono_at_the_asked_rate(tmp_path: Path):
    t = np.arange(48000) / 48000
    left = np.sin(2 * np.pi * 300 * t) * 16000
    stereo = np.stack([left, left], axis=1).reshape(-1)
    write_pcm(tmp_path / "stereo.wav", stereo, 48000, channels=2)
    audio, rate = load_turn(tmp_path / "stereo.wav", 16000)
    assert rate == 16000 and audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == 16000
    assert np.abs(audio).max() == pytest.approx(16000 / 32768, rel=0.02)
    same, own_rate = load_turn(tmp_path / "stereo.wav")
    assert own_rate == 48000 and len(same) == 48000


@pytest.mark.parametrize("content", [b"", b"RIFF\x00\x00not a wav at all", "truncated", "empty"])
def test_load_turn_names_the_file_it_cannot_use(tmp_path: Path, content):
    path = tmp_path / "broken.wav"
    if content == "truncated":  # a stereo 16-bit file cut in the middle of a frame
        write_pcm(path, np.zeros(2000), 16000, channels=2)
        path.write_bytes(path.read_bytes()[:-3])
    elif content == "empty":
        write_pcm(path, np.zeros(0), 16000)
    else:
        path.write_bytes(content)
    with pytest.raises(ContractError, match="broken.wav"):
        load_turn(path, 16000)


def test_wav_writer_set_writes_one_numbered_file_per_request(tmp_path: Path):
    files = WavWriterSet(tmp_path / "out")
    tone = np.full(1600, 0.25, np.float32)
    assert files.write("b", tone, 16000, False) is None  # b begins first: reply-001
    assert files.write("a", tone, 22050, False) is None
    path_b, seconds_b = files.write("b", tone, 16000, True)
    assert (path_b.name, seconds_b) == ("reply-001.wav", 0.2)
    files.write("a", tone[:800], 11025, False)  # another rate: converted to the file's
    (path_a, seconds_a), = files.close_all()
    assert path_a.name == "reply-002.wav"
    audio, rate = read_wav(path_a)
    assert rate == 22050 and len(audio) == 1600 + 1600 and seconds_a == pytest.approx(3200 / 22050)
    audio_b, _ = read_wav(path_b)
    assert np.allclose(audio_b, 0.25, atol=1e-3)
    path_c, _ = files.write("c", np.zeros(0, np.float32), 16000, True)
    assert path_c.name == "reply-003.wav" and read_wav(path_c)[0].size == 0


# --- events, message recognition, configuration --------------------------------------

def test_events_round_trip_through_the_generic_contract_message():
    value = event(SPEECH_STARTED, index=3, start_s=1.25)
    assert identify(value) is GenericResult
    assert read_event(value) == (SPEECH_STARTED, {"index": 3, "start_s": 1.25})
    kind, fields = read_event(event(DONE, path="out/reply-001.wav", seconds=2.0))
    assert kind == DONE and fields["path"] == "out/reply-001.wav"


def test_identify_knows_every_message_the_voice_nodes_exchange():
    audio = np.zeros(160, np.float32)
    messages = [Transcript("hi"), TextChunk("hi"), ErrorReport("r", "bad_request", "m"),
                AudioChunk(audio, 16000), TranscriptionRequest(audio, 16000)]
    for message in messages:
        assert identify(arrow.encode(message)) is type(message)
    assert identify(pa.array([1, 2])) is None


def test_message_log_joins_streams_per_request():
    log = MessageLog()
    text = lambda t, final=False: arrow.encode(TextChunk(t, final))  # noqa: E731
    assert log.describe("reply", text("The capital"), "turn-1") is None
    assert log.describe("reply", text("Hello"), "turn-2") is None
    assert log.describe("reply", text(" is Paris.", True), "turn-1") == \
        "[reply] turn-1: says: The capital is Paris."
    audio = arrow.encode(AudioChunk(np.zeros(8000, np.float32), 16000, False, "One."))
    assert log.describe("speech", audio, "turn-1") is None
    last = arrow.encode(AudioChunk(np.zeros(16000, np.float32), 16000, True, "Two."))
    assert log.describe("speech", last, "turn-1") == "[speech] turn-1: audio 1.50 s: One. Two."
    error = arrow.encode(ErrorReport("turn-3", "bad_request", "x.wav: not a PCM WAV file", "src"))
    assert log.describe("error", error, "turn-3") == \
        "[error] turn-3: error (bad_request from src): x.wav: not a PCM WAV file"
    utterance = arrow.encode(TranscriptionRequest(np.zeros(24000, np.float32), 16000))
    assert log.describe("utterance", utterance, "utt-1") == \
        "[utterance] utt-1: utterance 1.50 s at 16000 Hz"
    assert log.describe("vad", event(SPEECH_STARTED, index=1, start_s=0.5), "utt-1") == \
        "[vad] utt-1: audio.speech_started index=1, start_s=0.5"
    heard = arrow.encode(Transcript(" Paris. "))
    assert log.describe("heard", heard, "t") == "[heard] t: heard: Paris."
    assert "unrecognised" in log.describe("x", pa.array([1]), "t")


def test_seq_tracker_counts_what_went_missing():
    gaps = SeqTracker()
    assert [gaps.observe("a", s, False) for s in (0, 1, 3, 4)] == [0, 0, 1, 0]
    assert gaps.observe("a", 9, True) == 4
    assert gaps.observe("a", 0, False) == 0  # a new stream under the same id
    assert gaps.observe("b", 2, True) == 2
    assert gaps.missing == 7


def test_configuration_errors_name_the_variable():
    assert env_float("X", 1.5, {}) == 1.5
    assert env_float("X", 1.5, {"X": " 2 "}) == 2.0
    with pytest.raises(ConfigError, match="X='soon' is not a number"):
        env_float("X", 1.5, {"X": "soon"})
    with pytest.raises(ConfigError, match="at least 0"):
        env_float("X", 1.5, {"X": "-1"})
    assert env_choice("PACE", "realtime", ("realtime", "fast"), {"PACE": "FAST"}) == "fast"
    with pytest.raises(ConfigError, match="PACE='slow': choose one of realtime, fast"):
        env_choice("PACE", "realtime", ("realtime", "fast"), {"PACE": "slow"})
    assert [env_pace("PACE", env={"PACE": p}) for p in ("", "realtime", "10", "fast")] == \
        [1.0, 1.0, 10.0, float("inf")]
    for bad in ("0", "-2", "quick"):
        with pytest.raises(ConfigError, match="use realtime, fast, or a speed-up factor"):
            env_pace("PACE", env={"PACE": bad})


# --- nodes that fail before joining a graph ------------------------------------------

def run_without_sounddevice(node: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a node program as if sounddevice were not installed."""
    code = ("import runpy, sys; sys.modules['sounddevice'] = None; "
            f"runpy.run_path({str(NODES / node)!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)


def test_microphone_says_what_to_install_without_portaudio():
    result = run_without_sounddevice("microphone.py", {})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("microphone: sounddevice is not installed")
    assert "pip install sounddevice" in lines[0] and "libportaudio2" in lines[0]


def test_speaker_sink_says_what_to_install_without_portaudio():
    result = run_without_sounddevice("wav_sink.py", {"SINK": "speaker"})
    assert result.returncode == 2
    assert result.stderr.strip().startswith("wav_sink: sounddevice is not installed")


@pytest.mark.parametrize("voice_input, message", [
    (lambda tmp: str(tmp / "nothing"), "does not exist"),
    (lambda tmp: "relative/missing.wav", "relative/missing.wav")])  # relative to $PWD
def test_wav_source_fails_fast_on_a_missing_input(tmp_path: Path, voice_input, message: str):
    value = voice_input(tmp_path)
    result = subprocess.run([sys.executable, str(NODES / "wav_source.py")],
                            env={**os.environ, "VOICE_INPUT": value, "PACE": "fast",
                                 "PWD": str(tmp_path)},
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("wav_source: ") and message in result.stderr
    assert str(tmp_path) in result.stderr  # a relative path is resolved where dora was started



def test_playback_clock_plays_chunks_back_to_back_from_their_arrival():
    from mofa_omni.media.audio_stream import PlaybackClock

    clock = PlaybackClock()
    assert clock.add("r", 2.0, now=10.0) == 12.0
    assert clock.add("r", 1.0, now=10.5) == 13.0  # queued behind the first chunk
    assert clock.add("r", 1.0, now=20.0) == 21.0  # arrived after a gap
    assert clock.add("other", 0.5, now=20.0) == 20.5  # each request has its own timeline
    clock.forget("r")
    assert clock.add("r", 1.0, now=30.0) == 31.0
