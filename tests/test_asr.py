"""Speech recognition: the CTranslate2 reader/converter, the mlx_whisper adapter, word error rate."""

from __future__ import annotations

import gc
import importlib
import json
import shutil
import struct
import subprocess
import sys
import time
import wave
import weakref
from pathlib import Path

import numpy as np
import pytest

from mofa_omni.adapters.ct2_whisper import Ct2WhisperAdapter
from mofa_omni.adapters.loading import open_model
from mofa_omni.adapters.mlx_whisper import MlxWhisperAdapter
from mofa_omni.contract.errors import ContractError, ModelLoadError
from mofa_omni.contract.tasks import Task, TranscriptionRequest
from mofa_omni.formats.ctranslate2 import convert_whisper, read_model_bin
from mofa_omni.media.audio import resample
from mofa_omni.media.text import normalize_words, word_error_rate
from mofa_omni.models.catalog import ModelSpec, PathSource
from mofa_omni.models.fetching import no_progress
from mofa_omni.models.memory import format_bytes, snapshot
from mofa_omni.node.batching import batch_serve

SENTENCE = "Please turn on the lights in the kitchen and play some quiet music."
PARAGRAPH = (  # about 36 s when spoken: more than one 30 s whisper window
    "The weather today is cloudy with a chance of rain in the afternoon. Please remember to "
    "bring an umbrella when you leave the house. The meeting has been moved to three o'clock "
    "in the large conference room. After the meeting we will go to the market and buy some "
    "fresh vegetables for dinner. My sister is coming to visit next week and she will stay for "
    "a few days. We should clean the guest room and put fresh sheets on the bed. The train to "
    "the city leaves every hour from the main station near the river. Do not forget to water "
    "the plants in the garden before you go to sleep tonight. Good night and sleep well.")


# --- helpers ---------------------------------------------------------------------------

def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """16-bit PCM WAV -> float32 mono in [-1, 1] and its sample rate."""
    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2, "only 16-bit PCM is expected here"
        samples = np.frombuffer(w.readframes(w.getnframes()), np.int16).reshape(-1, w.getnchannels())
        return (samples.mean(axis=1) / 32768).astype(np.float32), w.getframerate()


def ct2_bytes(variables: dict[str, np.ndarray], aliases: dict[str, str] | None = None,
              spec: str = "WhisperSpec") -> bytes:
    """A CTranslate2 model.bin (binary version 6) holding ``variables``."""
    codes = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2,
             np.dtype(np.int32): 3, np.dtype(np.float16): 4}

    def string(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = [struct.pack("<I", 6), string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, value in variables.items():
        value = np.asarray(value)
        out += [string(name), struct.pack("<B", value.ndim), *(struct.pack("<I", d) for d in value.shape),
                struct.pack("<BI", codes[value.dtype], value.nbytes), value.tobytes()]
    out.append(struct.pack("<I", len(aliases or {})))
    for alias, target in (aliases or {}).items():
        out += [string(alias), string(target)]
    return b"".join(out)


def fake_whisper(state=64, layers=1, vocab=51864, mels=80, audio_ctx=8, text_ctx=6) -> dict:
    """Random variables laid out like a faster-whisper WhisperSpec (tiny sizes, fp16)."""
    rng = np.random.default_rng(0)

    def f(*shape):
        return rng.standard_normal(shape).astype(np.float16)

    v = {"encoder/num_heads": np.array(state // 64, np.int16),
         "decoder/num_heads": np.array(state // 64, np.int16),
         "encoder/conv1/weight": f(state, mels, 3), "encoder/conv1/bias": f(state),
         "encoder/conv2/weight": f(state, state, 3), "encoder/conv2/bias": f(state),
         "encoder/position_encodings/encodings": f(audio_ctx, state),
         "decoder/embeddings/weight": f(vocab, state),
         "decoder/position_encodings/encodings": f(text_ctx, state)}
    for side in ("encoder", "decoder"):
        v[f"{side}/layer_norm/gamma"], v[f"{side}/layer_norm/beta"] = f(state), f(state)
        for i in range(layers):
            p = f"{side}/layer_{i}/"
            norms = ["self_attention", "ffn"] + (["attention"] if side == "decoder" else [])
            for norm in norms:
                v[p + norm + "/layer_norm/gamma"], v[p + norm + "/layer_norm/beta"] = f(state), f(state)
            linears = {"self_attention/linear_0": 3 * state, "self_attention/linear_1": state,
                       "ffn/linear_0": 4 * state}
            if side == "decoder":
                linears |= {"attention/linear_0": state, "attention/linear_1": 2 * state,
                            "attention/linear_2": state}
            for name, rows in linears.items():
                v[p + name + "/weight"], v[p + name + "/bias"] = f(rows, state), f(rows)
            v[p + "ffn/linear_1/weight"], v[p + "ffn/linear_1/bias"] = f(state, 4 * state), f(state)
    return v


def espeak(text: str, directory: Path) -> tuple[np.ndarray, int]:
    """``text`` spoken by espeak-ng: float32 mono at 22.05 kHz."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    path = directory / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return read_wav(path)


@pytest.fixture(scope="session")
def speech(tmp_path_factory) -> tuple[np.ndarray, int]:
    return espeak(SENTENCE, tmp_path_factory.mktemp("speech"))


# --- word error rate -------------------------------------------------------------------

def test_normalize_words_drops_case_and_punctuation():
    assert normalize_words("Don\u2019t STOP -- the music, please!") == ["dont", "stop", "the", "music", "please"]


@pytest.mark.parametrize("hypothesis, expected", [
    ("the cat sat on the mat", 0.0),
    ("The cat sat on the mat.", 0.0),
    ("the bat sat on the mat", 1 / 6),     # substitution
    ("the cat sat on mat", 1 / 6),         # deletion
    ("the cat sat on the red mat", 1 / 6),  # insertion
    ("", 1.0),
    ("a b c d e f g h i j k l", 2.0),       # more errors than reference words
])
def test_word_error_rate(hypothesis, expected):
    assert word_error_rate("the cat sat on the mat", hypothesis) == pytest.approx(expected)


def test_word_error_rate_needs_a_reference():
    with pytest.raises(ValueError):
        word_error_rate(" ?! ", "anything")


# --- CTranslate2 reader and converter --------------------------------------------------

def test_read_model_bin_dtypes_and_aliases(tmp_path):
    variables = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1.5, -2], np.float16),
                 "c": np.array(7, np.int16), "d": np.array([-3, 4], np.int8)}
    (tmp_path / "model.bin").write_bytes(ct2_bytes(variables, {"e": "a"}))
    model = read_model_bin(tmp_path / "model.bin")
    assert (model.spec, model.revision, model.aliases) == ("WhisperSpec", 3, {"e": "a"})
    for name, value in variables.items():
        assert model.variables[name].dtype == value.dtype
        np.testing.assert_array_equal(model.variables[name], value)
    assert model.variables["e"] is model.variables["a"]


@pytest.mark.parametrize("keep", [0, 3, 10, 40, 60, -10, -1])
def test_truncated_model_bin_is_a_clear_error(tmp_path, keep):
    data = ct2_bytes({"encoder/w": np.ones((4, 4), np.float16)}, {"x": "encoder/w"})
    path = tmp_path / "model.bin"
    path.write_bytes(data[:keep])
    with pytest.raises(ModelLoadError, match=r"model\.bin") as caught:
        read_model_bin(path)
    assert "ends after" in str(caught.value) or "cannot read" in str(caught.value)


def test_truncated_in_data_names_the_variable(tmp_path):
    data = ct2_bytes({"encoder/w": np.ones((4, 4), np.float16)})
    path = tmp_path / "model.bin"
    path.write_bytes(data[:-10])  # cut inside the 32 data bytes (after the 4-byte alias count)
    with pytest.raises(ModelLoadError, match=r"ends after 26 of 32 bytes \(in variable encoder/w"):
        read_model_bin(path)


def test_not_a_model_bin(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(ModelLoadError, match="binary version"):
        read_model_bin(path)


def test_convert_synthetic_whisper_loads_in_mlx_whisper(tmp_path):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_whisper.load_models import load_model

    variables = fake_whisper()
    source = tmp_path / "ct2"
    source.mkdir()
    (source / "model.bin").write_bytes(ct2_bytes(variables, {"decoder/projection/weight":
                                                             "decoder/embeddings/weight"}))
    (source / "config.json").write_text('{"alignment_heads": [[0, 0]]}')
    stages = set()
    convert_whisper(source, tmp_path / "mlx", lambda stage, done, total: stages.add(stage))
    assert {"read model.bin", "convert weights", "write weights.safetensors"} <= stages

    model = load_model(str(tmp_path / "mlx"), dtype=mx.float32)
    weights = mx.load(str(tmp_path / "mlx" / "weights.safetensors"))
    params = dict(tree_flatten(model.parameters()))
    assert set(weights) == set(params) - {"alignment_heads"}
    for name, value in weights.items():
        assert value.dtype == mx.float32 and value.shape == params[name].shape, name
    conv = np.array(weights["encoder.conv1.weight"])
    np.testing.assert_array_equal(conv, variables["encoder/conv1/weight"].transpose(0, 2, 1))
    fused = variables["decoder/layer_0/attention/linear_1/weight"]
    np.testing.assert_array_equal(np.array(weights["decoder.blocks.0.cross_attn.value.weight"]), fused[64:])
    assert model.dims.n_audio_ctx == 8 and model.dims.n_text_layer == 1 and not model.is_multilingual


def test_untied_projection_is_refused(tmp_path):
    variables = fake_whisper(vocab=16)
    variables["decoder/projection/weight"] = np.ones((16, 64), np.float16)
    (tmp_path / "model.bin").write_bytes(ct2_bytes(variables))
    with pytest.raises(ModelLoadError, match="tied"):
        convert_whisper(tmp_path, tmp_path / "out")


def test_mlx_format_is_used_as_is(tmp_path):
    (tmp_path / "ct2").mkdir()
    (tmp_path / "ct2" / "model.bin").write_bytes(ct2_bytes(fake_whisper(vocab=51865)))
    convert_whisper(tmp_path / "ct2", tmp_path / "hub")  # stands in for an mlx-community repo
    spec = ModelSpec(name="fake-mlx-whisper", adapter="mlx_whisper", tasks=(Task.SPEECH_RECOGNITION,),
                     format="mlx", source=PathSource(tmp_path / "hub"), memory_mb=10)
    adapter = MlxWhisperAdapter(spec)
    (tmp_path / "out").mkdir()
    adapter.prepare(tmp_path / "hub", tmp_path / "out", no_progress)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "weights.safetensors"]
    adapter.load(tmp_path / "out")
    assert not adapter.english_only
    adapter.unload()


# --- audio -----------------------------------------------------------------------------

def test_resample_keeps_duration_and_pitch():
    rate = 22_050
    tone = np.sin(2 * np.pi * 440 * np.arange(rate) / rate).astype(np.float32)
    out = resample(tone, rate, 16_000)
    assert out.dtype == np.float32 and len(out) == 16_000
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) - 440) <= 1  # 1 s of audio: bin index = Hz
    assert resample(tone, rate, rate) is tone


# --- real models -----------------------------------------------------------------------

def _transcribe(adapter, audio, rate, language=""):
    started = time.perf_counter()
    transcript = adapter.transcribe(TranscriptionRequest(audio=audio, sample_rate=rate, language=language))
    rtf = (time.perf_counter() - started) / (len(audio) / rate)
    print(f"\n{adapter.spec.name} @ {rate} Hz: {transcript.text!r} (real-time factor {rtf:.2f})")
    return transcript


BACKENDS = ["mlx", "ctranslate2"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rate", [22_050, 16_000])
def test_tiny_en_transcribes_speech(model, speech, rate, backend):
    audio, source_rate = speech
    audio = resample(audio, source_rate, rate)
    transcript = _transcribe(model("whisper-tiny.en", backend), audio, rate)
    assert word_error_rate(SENTENCE, transcript.text) < 0.2, transcript.text
    assert transcript.language == "en"
    assert transcript.segments and transcript.segments[0].start >= 0
    assert transcript.segments[-1].end <= len(audio) / rate + 1.0


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_en_long_audio_spans_windows(model, tmp_path, backend):
    audio, rate = espeak(PARAGRAPH, tmp_path)
    assert len(audio) / rate > 32
    transcript = _transcribe(model("whisper-tiny.en", backend), audio, rate)
    assert word_error_rate(PARAGRAPH, transcript.text) < 0.15, transcript.text
    starts = [segment.start for segment in transcript.segments]
    assert starts == sorted(starts) and transcript.segments[-1].end > 30


@pytest.mark.slow
def test_ctranslate2_transcribes_a_batch_as_each_alone(model, speech, tmp_path, monkeypatch):
    """Requests served together (their windows decoded together) get exactly the
    transcripts they get alone: a short clip, one spanning two windows, another rate."""
    adapter = model("whisper-tiny.en", "ctranslate2")
    audio, rate = speech
    long_audio, long_rate = espeak(PARAGRAPH, tmp_path)
    requests = [TranscriptionRequest(audio=audio, sample_rate=rate),
                TranscriptionRequest(audio=long_audio, sample_rate=long_rate),
                TranscriptionRequest(audio=resample(audio, rate, 16_000), sample_rate=16_000)]
    together = adapter.transcribe_batch(requests)
    assert together == [adapter.transcribe(request) for request in requests]
    assert len(together[1].segments) == 2 and together[0].text and together[2].text
    # On a CPU one window per engine call: more are slower there and each holds ~90 MiB more
    # (a burst of requests blew a memory budget). So a node serves its transcriptions one at
    # a time there (a batch gained nothing and held each transcript until the last was done).
    # Several windows per call decode the same, and then the node batches.
    assert adapter._windows_per_call == 1
    assert batch_serve(adapter, Task.SPEECH_RECOGNITION) is None
    monkeypatch.setattr(adapter, "_windows_per_call", 3)
    assert adapter.transcribe_batch(requests) == together
    assert batch_serve(adapter, Task.SPEECH_RECOGNITION) == adapter.transcribe_batch


@pytest.mark.slow
def test_english_only_model_skips_language_detection(model, speech, monkeypatch):
    import mlx_whisper.decoding
    import mlx_whisper.whisper

    def no_detection(*args, **kwargs):
        raise AssertionError("language detection ran on an English-only model")

    monkeypatch.setattr(mlx_whisper.whisper.Whisper, "detect_language", no_detection)
    monkeypatch.setattr(mlx_whisper.decoding, "detect_language", no_detection)
    adapter = model("whisper-tiny.en", "mlx")
    assert adapter.english_only
    assert _transcribe(adapter, *speech).language == "en"
    with pytest.raises(ContractError, match="English-only"):
        adapter.transcribe(TranscriptionRequest(audio=speech[0], sample_rate=speech[1], language="de"))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_whisper_base_transcribes_and_detects_english(model, speech, backend):
    adapter = model("whisper-base", backend)
    assert not adapter.english_only
    transcript = _transcribe(adapter, *speech)
    assert word_error_rate(SENTENCE, transcript.text) < 0.2, transcript.text
    assert transcript.language == "en"


@pytest.mark.slow
def test_unload_returns_memory(catalog, store, speech):
    # Libraries imported by a first load stay (as in any process): measure a second one.
    open_model("whisper-tiny.en", catalog=catalog, store=store, backend="mlx").unload()
    before = snapshot()
    adapter = open_model("whisper-tiny.en", catalog=catalog, store=store, backend="mlx")
    adapter.transcribe(TranscriptionRequest(audio=speech[0], sample_rate=speech[1]))
    loaded = snapshot()
    model_ref = weakref.ref(adapter._model)
    adapter.unload()
    gc.collect()
    after = snapshot()
    print(f"\nMLX active {format_bytes(before.mlx_active_bytes)} -> {format_bytes(loaded.mlx_active_bytes)}"
          f" -> {format_bytes(after.mlx_active_bytes)}; RSS {format_bytes(before.rss_bytes)} -> "
          f"{format_bytes(loaded.rss_bytes)} -> {format_bytes(after.rss_bytes)}")
    assert model_ref() is None, "something still holds the unloaded model"
    assert importlib.import_module("mlx_whisper.transcribe").ModelHolder.model is None
    weights = 135 << 20  # tiny.en in float32 is 142 MiB
    assert loaded.mlx_active_bytes - before.mlx_active_bytes >= weights
    assert after.mlx_active_bytes - before.mlx_active_bytes < 4 << 20
    assert after.rss_bytes - before.rss_bytes < weights // 2


@pytest.mark.slow
def test_truncated_real_model_bin(catalog, store, tmp_path):
    source = store.fetch(catalog.get("whisper-tiny.en"))  # the CTranslate2 files as fetched
    with (source / "model.bin").open("rb") as f:
        (tmp_path / "model.bin").write_bytes(f.read(10 << 20))
    shutil.copy(source / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelLoadError,
                       match=r"model\.bin: ends after \d+ of 39831552 bytes \(in variable decoder/embeddings"):
        convert_whisper(tmp_path, tmp_path / "out")


@pytest.mark.slow
def test_both_backends_hear_the_same_words_on_the_same_weights(model, speech):
    # (whisper-base differs by a word between MLX float32 and CTranslate2 int8 on this clip:
    # each stays within the word error rate that test_whisper_base_transcribes... asks for.)
    mlx, ct2 = (_transcribe(model("whisper-tiny.en", backend), *speech) for backend in BACKENDS)
    assert normalize_words(mlx.text) == normalize_words(ct2.text), (mlx.text, ct2.text)
    assert mlx.language == ct2.language == "en"


@pytest.mark.slow
def test_ctranslate2_refuses_other_languages_on_an_english_only_model(model, speech):
    adapter = model("whisper-tiny.en", "ctranslate2")
    assert adapter.english_only and adapter.backend == "ctranslate2"
    with pytest.raises(ContractError, match="English-only"):
        adapter.transcribe(TranscriptionRequest(audio=speech[0], sample_rate=speech[1], language="de"))
    with pytest.raises(ContractError, match="unknown language"):
        adapter.transcribe(TranscriptionRequest(audio=speech[0], sample_rate=speech[1], language="xx"))


@pytest.mark.slow
def test_ctranslate2_unload_returns_memory(catalog, store, speech):
    open_model("whisper-tiny.en", catalog=catalog, store=store, backend="ctranslate2").unload()
    before = snapshot()
    adapter = open_model("whisper-tiny.en", catalog=catalog, store=store, backend="ctranslate2")
    adapter.transcribe(TranscriptionRequest(audio=speech[0], sample_rate=speech[1]))
    loaded = snapshot()
    adapter.unload()
    after = snapshot()
    print(f"\nRSS {format_bytes(before.rss_bytes)} -> {format_bytes(loaded.rss_bytes)} -> "
          f"{format_bytes(after.rss_bytes)}")
    grown = loaded.rss_bytes - before.rss_bytes
    assert grown > 30 << 20  # int8 tiny.en and its buffers
    assert after.rss_bytes - before.rss_bytes < grown // 2


def test_numpy_features_equal_mlx_whispers():
    """ct2_whisper's NumPy log-mel is whisper's (as mlx_whisper computes it on MLX)."""
    import mlx.core as mx
    from mlx_whisper.audio import log_mel_spectrogram
    from mlx_whisper.audio import mel_filters as reference_filters

    from mofa_omni.adapters.whisper_features import WINDOW_SAMPLES, log_mel, mel_filters

    for n_mels in (80, 128):
        np.testing.assert_allclose(mel_filters(n_mels), np.array(reference_filters(n_mels)),
                                   atol=1e-8)
    audio = np.random.default_rng(0).normal(0, 0.1, 3 * 16000).astype(np.float32)
    padded = np.zeros(WINDOW_SAMPLES, np.float32)
    padded[:len(audio)] = audio
    reference = np.array(log_mel_spectrogram(mx.array(padded), 80)).T
    features = log_mel(audio)
    assert features.shape == (80, 3000) and features.dtype == np.float32
    np.testing.assert_allclose(features, reference, atol=1e-4)
    assert log_mel(np.zeros(40 * 16000, np.float32)).shape == (80, 3000)  # cut to one window


@pytest.mark.slow
def test_ctranslate2_whisper_prepares_and_serves_without_mlx_whisper(catalog, store, speech,
                                                                      tmp_path, monkeypatch):
    # A plain install has no mlx-whisper: the CTranslate2 path reads the package's tokenizer.json.
    for module in ("mlx_whisper", "mlx_whisper.tokenizer", "mlx_whisper.audio"):
        monkeypatch.setitem(sys.modules, module, None)  # any import of it now fails
    spec = catalog.resolve("whisper-tiny.en", Task.SPEECH_RECOGNITION)
    adapter = Ct2WhisperAdapter(spec)
    adapter.prepare(store.fetch(spec), tmp_path, lambda *args: None)
    vocabulary = json.loads((tmp_path / "vocabulary.json").read_text())
    assert len(vocabulary) == 51864 and len(set(vocabulary)) == len(vocabulary)
    assert vocabulary[50363:50365] == ["<|0.00|>", "<|0.02|>"] and vocabulary[-1] == "<|30.00|>"
    adapter.load(tmp_path)
    try:
        transcript = adapter.transcribe(TranscriptionRequest(audio=speech[0],
                                                             sample_rate=speech[1]))
        assert transcript.language == "en" and "kitchen" in transcript.text.lower()
        with pytest.raises(ContractError, match=r"unknown language 'english'.*, de, "):
            adapter.transcribe(TranscriptionRequest(audio=speech[0], sample_rate=speech[1],
                                                    language="english"))
    finally:
        adapter.unload()


def test_whisper_tokens_name_the_prompt_and_the_languages(tmp_path):
    from mofa_omni.adapters.whisper_tokens import WhisperTokens
    from mofa_omni.formats.tiktoken_bpe import hf_tokenizer

    ranks = {bytes([b]): b for b in range(256)}
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>",
                "<|transcribe|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
    hf_tokenizer(ranks, {text: 256 + i for i, text in enumerate(specials)}).save(
        str(tmp_path / "tokenizer.json"))
    tokens = WhisperTokens.from_file(tmp_path / "tokenizer.json")
    assert tokens.languages == {"en": 258, "de": 259}
    assert tokens.prompt(None) == [257, 264] and tokens.prompt("de") == [257, 259, 261, 264]
    assert tokens.text([*b"Hi there", 256, 264]) == "Hi there"
    assert tokens.token_strings(267)[265:] == ["<|0.00|>", "<|0.02|>"]
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ModelLoadError):
        WhisperTokens.from_file(tmp_path / "other.json")
