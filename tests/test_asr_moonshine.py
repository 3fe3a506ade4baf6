"""Moonshine speech recognition (ort_moonshine, moonshine-base-en): real weights, speech made
here by Piper and espeak-ng, the words checked; bad input refused; one omni-node in a dataflow."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from mofa_omni.adapters.backends import create_adapter, select_adapter
from mofa_omni.adapters.loading import open_model
from mofa_omni.adapters.ort_moonshine import OrtMoonshineAdapter
from mofa_omni.contract.errors import ContractError, ModelLoadError, ModelNotLoaded
from mofa_omni.contract.tasks import Task, TranscriptionRequest
from mofa_omni.media.audio import resample, write_wav
from mofa_omni.media.text import word_error_rate
from mofa_omni.models.detect import detect
from mofa_omni.models.memory import format_bytes, snapshot
from mofa_omni.models.store import ModelStore
from tests.dataflow_run import finish, start_dataflow
from tests.test_asr import SENTENCE, espeak

MODEL = "moonshine-base-en"
SENTENCES = [SENTENCE, "The train to the city leaves every hour from the main station.",
             "What is the capital of France?"]
DATAFLOW = Path(__file__).parent / "dataflows" / "moonshine.yml"


@pytest.fixture(scope="module")
def moonshine(model):
    return model(MODEL)


def _transcribe(adapter, audio: np.ndarray, rate: int, language: str = ""):
    started = time.perf_counter()
    transcript = adapter.transcribe(TranscriptionRequest(audio, rate, language))
    seconds = len(audio) / rate
    print(f"\n{MODEL} @ {rate} Hz, {seconds:.1f} s: {transcript.text!r} "
          f"(real-time factor {(time.perf_counter() - started) / seconds:.2f})")
    return transcript


# --- real speech -----------------------------------------------------------------------

def test_the_catalog_serves_it_on_onnx_runtime(catalog):
    selection = select_adapter(catalog.get(MODEL))
    assert (selection.adapter, selection.backend) == ("ort_moonshine", "onnxruntime")


@pytest.mark.slow
@pytest.mark.parametrize("sentence", SENTENCES)
def test_transcribes_piper_speech(moonshine, speak, sentence):
    audio = speak(sentence)  # 16 kHz: Moonshine's own rate
    transcript = _transcribe(moonshine, audio, 16_000)
    wer = word_error_rate(sentence, transcript.text)
    print(f"word error rate {wer:.3f}")
    assert wer <= 0.1, transcript.text
    assert transcript.language == "en" and moonshine.english_only
    (segment,) = transcript.segments
    assert segment.start == 0 and segment.end == pytest.approx(len(audio) / 16_000)


@pytest.mark.slow
def test_other_rates_are_resampled(moonshine, tmp_path):
    audio, rate = espeak(SENTENCE, tmp_path)  # another voice, at 22.05 kHz
    assert rate == 22_050
    for audio, rate in ((audio, rate), (resample(audio, rate, 8_000), 8_000)):
        transcript = _transcribe(moonshine, audio, rate, language="en")
        wer = word_error_rate(SENTENCE, transcript.text)
        print(f"word error rate {wer:.3f}")
        assert wer <= 0.2, transcript.text


# --- bad input -------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("audio, rate, language, message", [
    (np.zeros(0, np.float32), 16_000, "", "audio is empty"),
    (np.zeros(16_000, np.float64), 16_000, "", "must be float32"),
    (np.full(16_000, np.nan, np.float32), 16_000, "", "NaN"),
    (np.zeros((2, 16_000), np.float32), 16_000, "", "mono"),
    (np.zeros(16_000, np.float32), 100, "", "sample rate 100 Hz is out of range"),
    (np.zeros(800, np.float32), 16_000, "", r"0\.050 s long; .* needs at least 0\.1 s"),
    (np.zeros(65 * 8_000, np.float32), 8_000, "", r"65\.0 s long; .* at most 64 s at once"),
    (np.zeros(16_000, np.float32), 16_000, "de", "English-only; cannot transcribe 'de'"),
])
def test_bad_requests_are_refused(moonshine, audio, rate, language, message):
    with pytest.raises(ContractError, match=message):
        moonshine.transcribe(TranscriptionRequest(audio, rate, language))


def test_a_prefix_is_refused_by_name(moonshine):
    """Moonshine cannot go on from given words: a prefix is refused, not dropped."""
    with pytest.raises(ContractError, match="does not take a transcription prefix"):
        moonshine.transcribe(TranscriptionRequest(np.zeros(16_000, np.float32), 16_000,
                                                  prefix="What is"))


def test_serving_before_loading_is_refused(catalog):
    adapter = OrtMoonshineAdapter(catalog.get(MODEL))
    with pytest.raises(ModelNotLoaded, match="not loaded"):
        adapter.transcribe(TranscriptionRequest(np.zeros(16_000, np.float32), 16_000))


@pytest.mark.slow
def test_damaged_files_are_load_errors(moonshine, tmp_path):
    broken = tmp_path / "truncated"
    shutil.copytree(moonshine.model_dir, broken, copy_function=_link)
    (broken / "tokenizer.bin").unlink()
    (broken / "tokenizer.bin").write_bytes((moonshine.model_dir / "tokenizer.bin").read_bytes()[:5000])
    adapter = OrtMoonshineAdapter(moonshine.spec)
    with pytest.raises(ModelLoadError, match=r"tokenizer\.bin ends inside token"):
        adapter.load(broken)

    other = tmp_path / "other"  # a graph that is not Moonshine's, under Moonshine's names
    shutil.copytree(moonshine.model_dir, other, copy_function=_link)
    identity = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "identity",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    (other / "decoder_model_merged.onnx").unlink()
    onnx.save(onnx.helper.make_model(identity), str(other / "decoder_model_merged.onnx"))
    with pytest.raises(ModelLoadError, match="not Moonshine's encoder and merged decoder"):
        adapter.load(other)
    assert not adapter.loaded


def _link(source: str, target: str) -> None:
    Path(target).hardlink_to(source)


@pytest.mark.slow
def test_unload_returns_memory(catalog, store, speak):
    audio = speak(SENTENCES[2])
    open_model(MODEL, catalog=catalog, store=store).unload()  # libraries stay imported
    before = snapshot()
    adapter = open_model(MODEL, catalog=catalog, store=store)
    adapter.transcribe(TranscriptionRequest(audio, 16_000))
    loaded = snapshot()
    adapter.unload()
    after = snapshot()
    print(f"\nRSS {format_bytes(before.rss_bytes)} -> {format_bytes(loaded.rss_bytes)} -> "
          f"{format_bytes(after.rss_bytes)}")
    grown = loaded.rss_bytes - before.rss_bytes
    assert grown > 150 << 20  # base's weights in float32 are ~240 MiB
    assert after.rss_bytes - before.rss_bytes < grown // 4


@pytest.mark.slow
def test_a_moonshine_folder_is_detected_and_serves(catalog, store, speak, tmp_path):
    folder = store.fetch(catalog.get(MODEL))  # the files as the wheel ships them (.ort)
    assert sorted(p.suffix for p in folder.iterdir()) == [".bin", ".ort", ".ort"]
    found = detect(folder, name="my-moonshine")
    assert found.kind == "moonshine"
    assert (found.spec.adapters, found.spec.tasks, found.spec.format) == \
        (("ort_moonshine",), (Task.SPEECH_RECOGNITION,), "onnx")
    assert 0.75 <= found.spec.memory_mb / catalog.get(MODEL).memory_mb <= 1.25
    adapter = create_adapter(found.spec)
    adapter.load(ModelStore(tmp_path).prepare(adapter))  # converted again, in its own cache
    try:
        transcript = _transcribe(adapter, speak(SENTENCES[2]), 16_000)
        assert word_error_rate(SENTENCES[2], transcript.text) <= 0.1, transcript.text
    finally:
        adapter.unload()


# --- in a dataflow ---------------------------------------------------------------------

@pytest.mark.slow
def test_an_omni_node_serves_moonshine_in_a_dataflow(speak, tmp_path):
    wav = tmp_path / "question.wav"
    write_wav(wav, speak(SENTENCES[2]), 16_000)
    report_path = tmp_path / "report.json"
    log = finish(start_dataflow(DATAFLOW, {"REPORT": str(report_path), "SPEECH_WAV": str(wav)}),
                 180)
    assert "loaded moonshine-base-en on onnxruntime" in log
    report = json.loads(report_path.read_text())
    assert not report.get("timeout"), report
    heard = report["heard"]["speech"]
    assert word_error_rate(SENTENCES[2], heard["text"]) <= 0.1 and heard["language"] == "en"
    errors = report["errors"]
    assert set(errors) == {"too-short", "german"}, errors
    assert {e["kind"] for e in errors.values()} == {"bad_request"}
    assert "needs at least 0.1 s" in errors["too-short"]["message"]
    assert "English-only" in errors["german"]["message"]
