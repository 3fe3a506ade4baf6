"""The `omni` command as a user runs it: real processes, real weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mofa_omni.media.text import word_error_rate

OMNI = str(Path(sys.executable).with_name("omni"))


def omni(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([OMNI, *args], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MOFA_OMNI_CATALOG": ""})
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_models_lists_the_catalog_as_json():
    rows = {row["name"]: row for row in json.loads(omni("models", "--json").stdout)}
    assert rows["smollm2-135m"]["default"]
    assert rows["gemma-3-270m"]["backend"] in ("mlx", "llama.cpp")
    assert rows["smollm2-135m"]["backend"] in ("mlx", "ctranslate2", "llama.cpp")  # per machine
    assert rows["piper-joe"]["backend"] == "onnxruntime"
    assert rows["whisper-base"]["ladder"] == ["whisper-base", "whisper-tiny.en"]
    assert not rows["qwen2.5-0.5b-instruct"]["offline"]


def test_unknown_model_lists_close_matches():
    result = omni("chat", "--model", "smolm2", "hi", check=False)
    assert result.returncode == 1
    assert "unknown model 'smolm2'; did you mean smollm2-135m" in result.stderr


def test_doctor_reports_blas_and_a_measured_speed():
    out = omni("doctor").stdout
    assert "GFLOP/s" in out and "text_generation" in out
    if sys.platform.startswith("linux"):
        assert "OpenBLAS (preloaded)" in out


@pytest.mark.slow
def test_say_then_transcribe_gives_the_sentence_back(tmp_path: Path):
    sentence = "The weather is lovely today and the birds are singing."
    wav = tmp_path / "said.wav"
    omni("say", sentence, "-o", str(wav), "-q")
    heard = omni("transcribe", str(wav), "-q").stdout.strip()
    # Piper's VITS samples noise: a run in ten is heard "but whether is lovely today ..."
    assert word_error_rate(sentence, heard) <= 0.3, heard


@pytest.mark.slow
def test_chat_streams_an_answer():
    out = omni("chat", "-q", "--max-tokens", "32", "--system", "Answer in one sentence.",
               "What is the capital of France?").stdout
    assert "Paris" in out


@pytest.mark.slow
def test_embed_json_ranks_a_paraphrase_first():
    result = json.loads(omni("embed", "-q", "--json", "A man is playing a guitar.",
                             "Someone plays an instrument.", "The stock market fell.").stdout)
    assert result["dim"] == 384
    a, b, c = result["embeddings"]
    dot = lambda x, y: sum(p * q for p, q in zip(x, y))  # noqa: E731
    assert dot(a, b) > dot(a, c)


def test_transcribe_of_a_broken_file_is_a_clear_error(tmp_path: Path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really")
    result = omni("transcribe", str(bad), "-q", check=False)
    assert result.returncode == 1 and "bad.wav: not a PCM WAV file" in result.stderr


def test_status_without_a_running_graph_says_so_quickly():
    started = time.monotonic()
    result = omni("status", "--timeout", "2", check=False)
    assert result.returncode == 1
    assert "no running dataflow declares the dynamic node 'omni-control'" in result.stderr
    assert time.monotonic() - started < 30  # a clear answer, not a hang
