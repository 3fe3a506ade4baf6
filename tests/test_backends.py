"""Backend selection: one place decides which adapter serves a model on which machine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mofa_omni.adapters import backends
from mofa_omni.adapters.backends import create_adapter, select_adapter
from mofa_omni.contract.errors import AdapterError
from mofa_omni.models.catalog import Catalog
from mofa_omni.models.store import ModelStore


@pytest.fixture(scope="module")
def whisper():
    return Catalog.load([]).get("whisper-tiny.en")


@pytest.mark.parametrize("where, adapter", [
    ("apple-silicon", "mlx_whisper"),  # Metal
    ("cuda", "ct2_whisper"),
    ("cpu", "ct2_whisper"),  # MLX's CPU backend is the slowest here
])
def test_the_fastest_backend_per_platform_is_chosen(whisper, where, adapter):
    chosen = select_adapter(whisper, where=where)
    assert chosen.adapter == adapter and f"on {where}" in chosen.reason


def test_a_model_with_one_adapter_keeps_it():
    chosen = select_adapter(Catalog.load([]).get("piper-joe"), where="apple-silicon")
    assert (chosen.adapter, chosen.backend) == ("piper", "onnxruntime")
    assert "the only adapter listed" in chosen.reason


@pytest.mark.parametrize("where, backend", [("apple-silicon", "mlx"), ("cpu", "onnxruntime")])
def test_embeddings_run_on_onnx_runtime_on_a_cpu_and_on_mlx_on_a_mac(where, backend):
    assert select_adapter(Catalog.load([]).get("minilm-l6"), where=where).backend == backend


@pytest.mark.parametrize("where, adapter", [("apple-silicon", "mlx_lm"), ("cuda", "ct2_lm"),
                                            ("cpu", "llama_cpp")])
def test_the_llm_runs_on_the_fastest_engine_of_each_platform(where, adapter):
    assert select_adapter(Catalog.load([]).get("smollm2-135m"), where=where).adapter == adapter
    # gemma-3-270m is not a Llama-architecture model: CTranslate2 has no Gemma 3, llama.cpp does.
    gemma = select_adapter(Catalog.load([]).get("gemma-3-270m"), where=where).backend
    assert gemma == {"apple-silicon": "mlx", "cuda": "llama.cpp", "cpu": "llama.cpp"}[where]


def test_a_node_can_ask_for_a_backend(whisper):
    assert select_adapter(whisper, "mlx", where="cpu").adapter == "mlx_whisper"
    assert create_adapter(whisper, "mlx").backend == "mlx"
    with pytest.raises(AdapterError, match="has no onnxruntime adapter; its backends: "
                                           "ctranslate2, mlx"):
        select_adapter(whisper, "onnxruntime")


def test_a_pin_in_the_users_catalog_is_honoured(tmp_path: Path):
    user = tmp_path / "catalog.toml"
    builtin = Catalog.load([]).get("whisper-tiny.en")
    user.write_text('[models."whisper-tiny.en"]\nadapter = "mlx_whisper"\n'
                    'tasks = ["speech_recognition"]\nformat = "ctranslate2"\n'
                    'source = { path = "unused" }\n')
    pinned = Catalog.load([user]).get("whisper-tiny.en")
    assert builtin.adapters == ("mlx_whisper", "ct2_whisper")
    assert select_adapter(pinned, where="cpu").adapter == "mlx_whisper"


def test_a_missing_optional_backend_falls_back_and_says_why(whisper, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ctranslate2" else real(name, *a))
    chosen = select_adapter(whisper, where="cpu")
    assert chosen.adapter == "mlx_whisper"
    assert "ctranslate2 skipped: ctranslate2 is not installed" in chosen.reason
    with pytest.raises(AdapterError, match="the ctranslate2 backend cannot run: ctranslate2 "
                                           "is not installed"):
        select_adapter(whisper, "ctranslate2")


def test_without_llama_cpp_the_llm_falls_back_to_ctranslate2_and_says_how_to_get_it(
        monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    chosen = select_adapter(Catalog.load([]).get("smollm2-135m"), where="cpu")
    assert (chosen.adapter, chosen.backend) == ("ct2_lm", "ctranslate2")
    assert "llama.cpp skipped: llama_cpp is not installed (`omni install llama-cpp` adds it" in chosen.reason


def test_each_adapter_converts_into_its_own_folder(whisper, tmp_path: Path):
    store = ModelStore(tmp_path)
    mlx = create_adapter(whisper, "mlx").spec
    ct2 = create_adapter(whisper, "ctranslate2").spec
    assert store.model_dir(mlx) == tmp_path / "models" / "whisper-tiny.en"
    assert store.model_dir(ct2) == tmp_path / "models" / "whisper-tiny.en.ct2_whisper"


def test_this_machine_is_classified():
    assert backends.compute_platform() in backends.PREFERENCE


def test_omni_install_builds_llama_cpp_for_the_cpu_and_others_without_their_metadata():
    from mofa_omni.adapters.installs import ENGINES, install, llama_cpp_cmake_args, pip_steps
    from mofa_omni.contract.errors import ConfigError

    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c\n"
    assert "-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" in llama_cpp_cmake_args(avx2, "x86_64")
    for cpu, machine in ((avx2.replace(" f16c", ""), "x86_64"), (avx2, "aarch64")):
        args = llama_cpp_cmake_args(cpu, machine)
        assert "-DGGML_NATIVE=OFF" in args and "AVX2" not in args
    steps = pip_steps(ENGINES["mlx-whisper"], "python")
    assert steps[0][-3:] == ["numba", "tiktoken", "more-itertools"]
    assert steps[1][-2:] == ["--no-deps", "mlx-whisper==0.4.3"]
    assert pip_steps(ENGINES["llama-cpp"], "python") == [
        ["python", "-m", "pip", "install", "--quiet", "llama-cpp-python==0.3.36"]]
    with pytest.raises(ConfigError, match="unknown engine torch: `omni install` knows llama-cpp"):
        install(["torch"])
