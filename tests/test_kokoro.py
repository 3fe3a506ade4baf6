"""Speech synthesis with Kokoro-82M (the second TTS family, ONNX Runtime): its phonemes, its
files, and the real model speaking English that whisper then hears — in-process and as an
omni-node of a dora dataflow."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mofa_omni.adapters.backends import create_adapter
from mofa_omni.adapters.kokoro import MAX_BATCH, KokoroAdapter, _batches, misaki_style
from mofa_omni.contract.errors import ContractError, ModelLoadError
from mofa_omni.contract.tasks import (
    AudioChunk,
    SpeechRequest,
    Task,
    TranscriptionRequest,
    validate_audio,
)
from mofa_omni.media.audio import read_wav
from mofa_omni.media.text import split_sentences, word_error_rate
from mofa_omni.models.catalog import Catalog
from mofa_omni.models.detect import detect
from tests.dataflow_run import finish, start_dataflow

KOKORO = "kokoro-82m"
VOICES = ["jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo"]
ROOT = Path(__file__).resolve().parents[1]

# --- without weights -----------------------------------------------------------------


@pytest.mark.parametrize("espeak, language, kokoro", [
    ("bɹˈaʊn fˈɑks", "en-us", "bɹˈWn fˈɑks"),  # diphthongs are single letters
    ("ˌoʊvɚ ðə lˈeɪzi dˈɑːɡ", "en-us", "ˌOvəɹ ðə lˈAzi dˈɑɡ"),  # no lengths in American
    ("wˈɔːtɚ", "en-us", "wˈɔtəɹ"),  # espeak's t stays a t ...
    ("wˈɔːɾɚ", "en-us", "wˈɔTəɹ"),  # ... its flap is misaki's T
    ("dʒˈʌmps tʃˈiːz", "en-us", "ʤˈʌmps ʧˈiz"),
    ("ɡˈəʊ hˈəʊm", "en-gb", "ɡˈQ hˈQm"),  # the British diphthong, lengths kept
    ("mˈɑːstə", "en-gb", "mˈɑːstə"),
])
def test_misaki_style(espeak: str, language: str, kokoro: str):
    assert misaki_style(espeak, language) == kokoro


def test_batches_cut_long_sentences_between_clauses_then_words():
    vocab = {" ": 16, "a": 43, ",": 3}
    short = ["a" * 40 + ",", "a" * 40 + ","]
    assert [len(b) for b in _batches(short, vocab)] == [83]  # both clauses, one space between
    clauses = ["a" * 60 + ",", "a" * 60 + ","]  # together too long for one call
    assert [len(b) for b in _batches(clauses, vocab)] == [61, 61]
    words = " ".join(["aaaa"] * 60)  # one clause of 299 symbols: cut at spaces
    batches = list(_batches([words], vocab))
    assert all(len(b) <= MAX_BATCH for b in batches) and len(batches) == 3
    assert sum(len(b) for b in batches) + len(batches) - 1 == len(words)  # only spaces dropped
    assert all(b[0] != vocab[" "] and b[-1] != vocab[" "] for b in batches)
    assert list(_batches([], vocab)) == []


def _kokoro_dir(directory: Path, *, digest: str | None = None, voices: bool = True) -> Path:
    directory.mkdir()
    graph = directory / "kokoro.onnx"
    graph.write_bytes(b"not really onnx")
    (directory / "model.sha256").write_text(
        (digest or hashlib.sha256(graph.read_bytes()).hexdigest()) + "\n")
    (directory / "vocab.json").write_text(json.dumps({"vocab": {" ": 16, "a": 43}}))
    if voices:
        np.savez(directory / "voices.npz", af_test=np.zeros((510, 1, 256), np.float32))
    return directory


def test_prepare_links_the_files(catalog: Catalog, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    KokoroAdapter(catalog.get(KOKORO)).prepare(_kokoro_dir(tmp_path / "src"), out,
                                                lambda *a: None)
    assert sorted(p.name for p in out.iterdir()) == ["kokoro.onnx", "vocab.json", "voices.npz"]


def test_prepare_checks_the_joined_parts(catalog: Catalog, tmp_path: Path):
    source = _kokoro_dir(tmp_path / "src", digest="0" * 64)
    with pytest.raises(ModelLoadError, match="SHA-256 .* joined out of order"):
        KokoroAdapter(catalog.get(KOKORO)).prepare(source, tmp_path, lambda *a: None)


def test_prepare_needs_voices_and_a_vocabulary(catalog: Catalog, tmp_path: Path):
    adapter = KokoroAdapter(catalog.get(KOKORO))
    with pytest.raises(ModelLoadError, match=r"no voice packs \(.npz\)"):
        adapter.prepare(_kokoro_dir(tmp_path / "a", voices=False), tmp_path, lambda *a: None)
    source = _kokoro_dir(tmp_path / "b")
    (source / "vocab.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="vocabulary"):
        adapter.prepare(source, tmp_path, lambda *a: None)
    source = _kokoro_dir(tmp_path / "c")
    np.savez(source / "voices.npz", af_test=np.zeros((10, 256), np.float32))
    with pytest.raises(ModelLoadError, match="'af_test' .* has shape"):
        adapter.prepare(source, tmp_path, lambda *a: None)


@pytest.mark.parametrize("options, match", [
    ({"language": "ja"}, r"option language = 'ja' is not one of 'en-us', 'en-gb'"),
    ({"speed": 9.0}, r"option speed = 9.0 is not a float in \[0.25, 4.0\]"),
    ({"voices": "jm_kumo"}, r"'voices' is not an option of kokoro; did you mean voice\?"),
])
def test_kokoro_rejects_bad_options(catalog: Catalog, options, match):
    with pytest.raises(ContractError, match=match):
        KokoroAdapter(dataclasses.replace(catalog.get(KOKORO), options=options))


def test_missing_espeak_says_how_to_install_it(catalog: Catalog, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "piper", None)  # makes `import piper` fail
    with pytest.raises(ModelLoadError, match=r"pip install 'mofa-omni\[piper\]'"):
        KokoroAdapter(catalog.get(KOKORO)).load(tmp_path)


# --- the real model ------------------------------------------------------------------


def _speak(adapter, text: str, voice: str = "", speed: float = 1.0) -> list[AudioChunk]:
    return list(adapter.synthesize(SpeechRequest(text, voice=voice, speed=speed)))


def _audio(chunks: list[AudioChunk]) -> np.ndarray:
    return np.concatenate([c.audio for c in chunks])


def _heard(model, audio: np.ndarray, rate: int = 24000) -> str:
    return model("whisper-tiny.en").transcribe(TranscriptionRequest(audio, rate)).text


@pytest.mark.slow
def test_kokoro_speaks_english_whisper_hears(model):
    text = "Good morning. Please turn off the lights in the kitchen before you leave the house."
    kokoro = model(KOKORO)
    assert kokoro.voices == tuple(VOICES)
    assert kokoro.phonemize("Go home, Bob.") == ["ɡˌO hˈOm,", "bˈɑb."]  # one string per clause
    chunks = _speak(kokoro, text)
    assert [c.text for c in chunks] == split_sentences(text)  # one chunk per sentence, streamed
    assert [c.final for c in chunks] == [False, True]
    for chunk in chunks:
        validate_audio(chunk.audio, chunk.sample_rate)
        assert chunk.sample_rate == 24000 and chunk.audio.dtype == np.float32
        assert np.abs(chunk.audio).max() <= 1.0
        assert np.sqrt(np.mean(chunk.audio ** 2)) > 0.02  # speech, not silence
    heard = _heard(model, _audio(chunks))
    assert word_error_rate(text, heard) < 0.15, heard


@pytest.mark.slow
def test_kokoro_voice_by_request_and_determinism(model):
    kokoro, text = model(KOKORO), "The quick brown fox jumps over the lazy dog."
    default = _audio(_speak(kokoro, text))
    assert np.array_equal(default, _audio(_speak(kokoro, text)))  # no sampling: same samples
    male = _audio(_speak(kokoro, text, voice="jm_kumo"))
    assert not np.array_equal(default[:len(male)], male[:len(default)])
    heard = _heard(model, male)
    assert word_error_rate(text, heard) < 0.15, heard


@pytest.mark.slow
def test_kokoro_refuses_unknown_voice_and_empty_text(model):
    kokoro = model(KOKORO)
    with pytest.raises(ContractError, match=r"unknown voice 'af_heart' \(known: jf_alpha, "
                                            r"jf_gongitsune, jf_nezumi, jf_tebukuro, jm_kumo\)"):
        _speak(kokoro, "Hello.", voice="af_heart")
    with pytest.raises(ContractError, match="did you mean jm_kumo"):
        _speak(kokoro, "Hello.", voice="jm_kumu")
    for empty in ("", "  \n"):
        with pytest.raises(ContractError, match="empty text"):
            _speak(kokoro, empty)
    with pytest.raises(ContractError, match="speed"):
        _speak(kokoro, "Hello.", speed=0)
    (chunk,) = _speak(kokoro, "...")  # nothing to say: still one final reply
    assert chunk.final and chunk.audio.dtype == np.float32 and not chunk.audio.any()


@pytest.mark.slow
def test_kokoro_speed(model, catalog, store):
    kokoro, text = model(KOKORO), "The weather today is sunny with a light breeze."
    normal = len(_audio(_speak(kokoro, text)))
    fast = _audio(_speak(kokoro, text, speed=2.0))
    assert len(fast) < 0.7 * normal
    # The catalog's speed is the model's own rate: a request's multiplies it.
    quick = create_adapter(dataclasses.replace(catalog.get(KOKORO), options={"speed": 2.0}))
    quick.load(store.prepare(quick))
    try:
        assert np.array_equal(_audio(_speak(quick, text)), fast)
    finally:
        quick.unload()


@pytest.mark.slow
def test_kokoro_british_english(model, catalog, store):
    british = create_adapter(dataclasses.replace(catalog.get(KOKORO),
                                                 options={"language": "en-gb"}))
    british.load(store.prepare(british))
    try:
        assert british.phonemize("Go home.") == ["ɡˌQ hˈQm."]  # American: ɡˌO hˈOm.
        text = "Shall we go home before the rain starts?"
        heard = _heard(model, _audio(_speak(british, text)))
        assert word_error_rate(text, heard) < 0.15, heard
    finally:
        british.unload()


@pytest.mark.slow
def test_unknown_voice_option_fails_at_load(catalog, store):
    spec = dataclasses.replace(catalog.get(KOKORO), options={"voice": "af_heart"})
    adapter = create_adapter(spec)
    with pytest.raises(ModelLoadError, match=r"option voice: unknown voice 'af_heart' "
                                             r"\(known: jf_alpha"):
        adapter.load(store.prepare(adapter))


@pytest.mark.slow
def test_a_kokoro_folder_is_detected(model):
    folder = model(KOKORO).model_dir  # the prepared files: graph, vocab.json, voices_ja.npz
    detected = detect(folder, name="my-kokoro")
    assert (detected.kind, detected.spec.adapter) == ("kokoro", "kokoro")
    assert detected.spec.tasks == (Task.SPEECH_SYNTHESIS,)
    assert 250 <= detected.spec.memory_mb <= 350  # measured: 300 MiB at most


# --- as an omni-node -----------------------------------------------------------------

DRIVER = '''
"""Sends three speech requests to the kokoro omni-node; writes what came back to $REPORT."""
import os
import numpy as np
from driving import Driver, record
from mofa_omni.contract.tasks import AudioChunk, SpeechRequest
from mofa_omni.media.audio import write_wav

driver = Driver(deadline_s=90, resend_after_s=45)
report = {"chunks": 0, "errors": {}}
audio = []
for event in driver.inputs():
    if event.id == "tick" and not driver.sent:
        driver.send("speak", "speech", SpeechRequest(os.environ["TEXT"], voice="jm_kumo"))
        driver.send("speak", "unknown-voice", SpeechRequest("Hello.", voice="af_heart"))
        driver.send("speak", "empty", SpeechRequest("  "))
    elif event.id == "speech":
        chunk = event.decode(AudioChunk)
        audio.append(chunk.audio.copy())
        report["chunks"] += 1
        if chunk.final:
            write_wav(os.environ["WAV"], np.concatenate(audio), chunk.sample_rate)
            driver.answered(event.request_id)
    elif event.is_error:
        error = event.error()
        report["errors"][error.request_id] = record(error)
        driver.answered(error.request_id)
    if driver.all_answered():
        break
driver.write(report)
'''

DATAFLOW = '''
nodes:
  - id: driver
    path: {driver}
    env: {{ PYTHONPATH: {dataflows} }}
    inputs:
      tick: dora/timer/millis/200
      speech: tts/result
      tts_error: tts/error
    outputs: [speak]
  - id: tts
    path: {omni_node}
    env: {{ MODEL: kokoro-82m }}
    inputs: {{ request: driver/speak }}
    outputs: [result, error]
'''


@pytest.mark.slow
def test_kokoro_as_an_omni_node(model, tmp_path: Path):
    model(KOKORO)  # fetched and prepared beforehand: the node only loads it
    text = "Kokoro runs as a node of the graph. It speaks each sentence in turn."
    (tmp_path / "driver.py").write_text(DRIVER)
    dataflow = tmp_path / "kokoro.yml"
    dataflow.write_text(DATAFLOW.format(driver=tmp_path / "driver.py",
                                        dataflows=ROOT / "tests" / "dataflows",
                                        omni_node=ROOT / "nodes" / "omni_node.py"))
    report_path, wav = tmp_path / "report.json", tmp_path / "speech.wav"
    log = finish(start_dataflow(dataflow, {"REPORT": str(report_path), "WAV": str(wav),
                                           "TEXT": text}), timeout=150)
    assert report_path.exists(), log[-5000:]
    report = json.loads(report_path.read_text())
    assert not report.get("timeout"), report
    assert report["chunks"] == 2, report  # one per sentence
    errors = report["errors"]
    assert errors.keys() == {"unknown-voice", "empty"}, report
    assert errors["unknown-voice"]["kind"] == "bad_request"
    assert "jm_kumo" in errors["unknown-voice"]["message"]
    assert errors["empty"]["kind"] == "bad_request" and "empty" in errors["empty"]["message"]
    audio, rate = read_wav(wav)
    assert rate == 24000
    heard = _heard(model, audio, rate)
    assert word_error_rate(text, heard) < 0.2, heard
