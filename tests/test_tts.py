"""Sentence splitting, and speech synthesis with the Piper voice (ONNX Runtime)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mofa_omni.adapters.loading import open_model
from mofa_omni.adapters.piper import PiperAdapter
from mofa_omni.contract.errors import ContractError, ModelLoadError
from mofa_omni.contract.tasks import AudioChunk, SpeechRequest, validate_audio
from mofa_omni.media.text import split_sentences
from mofa_omni.models.catalog import Catalog
from mofa_omni.models.memory import release_freed_memory, snapshot

VOICE = "piper-joe"
MiB = 1 << 20

# --- split_sentences -------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("Hello there. How are you? I am fine!", ["Hello there.", "How are you?", "I am fine!"]),
    ("Dr. Smith paid $3.50 for it. Then he left.", ["Dr. Smith paid $3.50 for it.", "Then he left."]),
    ("Fruit, e.g. apples, is good. See i.e. Rome. Yes.",
     ["Fruit, e.g. apples, is good.", "See i.e. Rome.", "Yes."]),
    ("J. R. R. Tolkien wrote it. Mr. Baggins agreed.", ["J. R. R. Tolkien wrote it.", "Mr. Baggins agreed."]),
    ("Pi is 3.14159 roughly. Version 2.0 is out.", ["Pi is 3.14159 roughly.", "Version 2.0 is out."]),
    ('He said "Hi." Then he left.', ['He said "Hi."', "Then he left."]),
    ('"Stop!" he said. Wait... what? Really?!', ['"Stop!" he said.', "Wait... what?", "Really?!"]),
    ("It is No. 5 on the list. I said no. Fine.", ["It is No. 5 on the list.", "I said no.", "Fine."]),
    ("  spread\n  over   lines.  Next one ", ["spread over lines.", "Next one"]),
    ("A heading\n\nThe paragraph.", ["A heading", "The paragraph."]),
    ("no terminator", ["no terminator"]),
    ("", []),
    (" \n\t ", []),
])
def test_split_sentences(text: str, expected: list[str]):
    assert split_sentences(text) == expected


# --- Piper without weights -----------------------------------------------------------


def _voice_dir(directory: Path, config: object) -> Path:
    directory.mkdir()
    (directory / "v.onnx").write_bytes(b"not really onnx")
    text = config if isinstance(config, str) else json.dumps(config)
    (directory / "v.onnx.json").write_text(text)
    return directory


def test_prepare_copies_the_voice_and_its_config(catalog: Catalog, tmp_path: Path):
    source = _voice_dir(tmp_path / "src", {"audio": {"sample_rate": 16000}})
    out = tmp_path / "out"
    out.mkdir()
    PiperAdapter(catalog.get(VOICE)).prepare(source, out, lambda *a: None)
    assert sorted(p.name for p in out.iterdir()) == ["v.onnx", "v.onnx.json"]


@pytest.mark.parametrize("config", ["{not json", {"audio": {}}, {"audio": {"sample_rate": 0}}])
def test_prepare_rejects_a_bad_voice_config(catalog: Catalog, tmp_path: Path, config):
    source = _voice_dir(tmp_path / "src", config)
    with pytest.raises(ModelLoadError, match="sample.rate"):
        PiperAdapter(catalog.get(VOICE)).prepare(source, tmp_path, lambda *a: None)


def test_prepare_needs_exactly_one_voice(catalog: Catalog, tmp_path: Path):
    with pytest.raises(ModelLoadError, match="found none"):
        PiperAdapter(catalog.get(VOICE)).prepare(tmp_path, tmp_path, lambda *a: None)


def test_missing_piper_says_how_to_install_it(catalog: Catalog, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "piper", None)  # makes `import piper` fail
    with pytest.raises(ModelLoadError, match=r"pip install 'mofa-omni\[piper\]'"):
        PiperAdapter(catalog.get(VOICE)).load(tmp_path)


# --- Piper with the real voice -------------------------------------------------------


def _speak(adapter, text: str, speed: float = 1.0) -> list[AudioChunk]:
    return list(adapter.synthesize(SpeechRequest(text, speed=speed)))


def _seconds(chunks: list[AudioChunk]) -> float:
    return sum(len(c.audio) for c in chunks) / chunks[0].sample_rate


@pytest.mark.slow
def test_piper_streams_one_audible_chunk_per_sentence(model):
    text = "Hello there. Dr. Smith paid 3.50 dollars for a coffee. Is that right?"
    chunks = _speak(model(VOICE), text)
    assert [c.text for c in chunks] == split_sentences(text)
    assert [c.final for c in chunks] == [False, False, True]
    for chunk in chunks:
        validate_audio(chunk.audio, chunk.sample_rate)
        assert chunk.sample_rate == 22050
        assert np.abs(chunk.audio).max() <= 1.0
        assert np.sqrt(np.mean(chunk.audio ** 2)) > 0.02  # speech, not silence
        assert len(chunk.audio) > 0.3 * chunk.sample_rate


@pytest.mark.slow
def test_piper_longer_text_and_speed(model):
    voice = model(VOICE)
    short = _seconds(_speak(voice, "Good morning."))
    long = _seconds(_speak(voice, "Good morning. The weather today is sunny with a light breeze."))
    assert long > 2 * short
    normal = _seconds(_speak(voice, "The quick brown fox jumps over the lazy dog."))
    fast = _seconds(_speak(voice, "The quick brown fox jumps over the lazy dog.", speed=2.0))
    assert fast < 0.75 * normal


@pytest.mark.slow
def test_piper_edge_cases(model):
    voice = model(VOICE)
    (chunk,) = _speak(voice, "...")  # nothing to say: still one final reply
    assert chunk.final and chunk.audio.dtype == np.float32
    with pytest.raises(ContractError, match="speed"):
        _speak(voice, "Hello.", speed=0)


@pytest.mark.slow
def test_piper_noise_options(model, speak):
    text = "The same words twice."
    voice = model(VOICE)  # the voice's own noise: sampled anew on every synthesis
    assert not np.array_equal(_speak(voice, text)[0].audio, _speak(voice, text)[0].audio)
    assert np.array_equal(speak(text), speak(text))  # noise_scale = noise_w_scale = 0


@pytest.mark.parametrize("value", [-0.1, 2.5, "much", True])
def test_piper_rejects_bad_noise_options(catalog, value):
    spec = dataclasses.replace(catalog.get(VOICE), options={"noise_w_scale": value})
    with pytest.raises(ContractError, match=r"'piper-joe': option noise_w_scale = .* is not a"):
        PiperAdapter(spec)


@pytest.mark.slow
def test_piper_unload_returns_memory(catalog, store):
    release_freed_memory()
    before = snapshot().rss_bytes
    adapter = open_model(VOICE, catalog=catalog, store=store)
    _speak(adapter, "Memory is measured before and after.")
    loaded = snapshot().rss_bytes
    adapter.unload()
    after = snapshot().rss_bytes
    assert loaded - before > 40 * MiB  # the voice weighs ~60 MiB
    assert loaded - after > 0.5 * (loaded - before)
