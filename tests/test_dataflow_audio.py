"""The audio nodes in a real dora dataflow (tests/dataflows/audio.yml):
wav_source -> vad (Silero) -> wav_sink + printer, with turn-taking through `done` -> `ready`."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from mofa_omni.media.audio import read_wav, resample
from tests.test_dataflow_models import run_dataflow

AUDIO = Path(__file__).parent / "dataflows" / "audio.yml"
SHORT = "Hello there."
LONG = "The quick brown fox jumps over the lazy dog near the old river bank."


def espeak(text: str, path: Path) -> tuple[np.ndarray, int]:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return read_wav(path)


def write_int16(path: Path, audio: np.ndarray, rate: int, channels: int) -> None:
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(np.repeat(pcm, channels).tobytes())  # interleaved, same on each channel


@pytest.fixture()
def turns(tmp_path: Path) -> tuple[Path, float, float]:
    """Three turns: the short sentence as stereo 48 kHz int16, an unreadable file, and the
    long sentence as espeak's own mono 22.05 kHz. Returns the folder and the two lengths."""
    folder = tmp_path / "turns"
    folder.mkdir()
    short, rate = espeak(SHORT, tmp_path / "short.wav")
    write_int16(folder / "01-stereo-48k.wav", resample(short, rate, 48000), 48000, channels=2)
    (folder / "02-broken.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEjunk" + bytes(40))
    long, rate = espeak(LONG, folder / "03-mono-22k.wav")
    assert rate == 22050
    return folder, len(short) / rate, len(long) / rate


@pytest.mark.slow
@pytest.mark.parametrize("rate", ["16000", "0"], ids=["sent-at-16k", "sent-at-file-rates"])
def test_wav_turns_become_utterances_through_silero_vad(tmp_path: Path, turns, rate: str):
    """RATE=0: the source sends 48 kHz, then 22.05 kHz; the VAD resamples as the stream goes."""
    folder, short_s, long_s = turns
    out, transcript = tmp_path / "voice", tmp_path / "transcript.txt"
    started = time.monotonic()
    log = run_dataflow(AUDIO, {"VOICE_INPUT": str(folder), "VOICE_OUTPUT": str(out),
                               "TRANSCRIPT": str(transcript), "RATE": rate}, timeout=300)
    elapsed = time.monotonic() - started
    assert transcript.exists(), log[-5000:]
    lines = transcript.read_text().splitlines()
    story = "\n".join(line for line in log.splitlines()
                      if "stdout" in line and "diagnostic" not in line)  # what the nodes said

    # Exactly two utterances, each as long as its sentence (espeak's own silence trimmed,
    # the VAD's padding added), written in turn order.
    files = sorted(out.glob("*.wav"))
    assert [f.name for f in files] == ["utterance-001.wav", "utterance-002.wav"], story
    lengths = []
    for path in files:
        audio, rate = read_wav(path)
        assert rate == 16000 and np.abs(audio).max() > 0.1
        lengths.append(len(audio) / rate)
    assert 0.5 * short_s < lengths[0] < short_s + 0.3, (lengths, short_s, story)
    assert 0.7 * long_s < lengths[1] < long_s + 0.3, (lengths, long_s, story)

    utterances = [line for line in lines if "[utterance]" in line]
    assert [re.search(r"(utt-\d+)", line).group(1) for line in utterances] == ["utt-1", "utt-2"]
    assert len([line for line in lines if "audio.speech_started" in line]) == 2
    assert len([line for line in lines if "[done]" in line and "audio.done" in line]) == 2

    # One error, for the unreadable file, and the turns after it still went through.
    (error,) = [line for line in lines if "error (" in line]
    assert "[source_error] turn-2: error (bad_request from wav_source)" in error
    assert "02-broken.wav" in error
    assert not [line for line in lines if "[vad_error]" in line]

    # The source left as soon as the last turn was done, not after LINGER_S (60 s).
    assert elapsed < 50, elapsed
    assert "Traceback" not in log, log[-5000:]
