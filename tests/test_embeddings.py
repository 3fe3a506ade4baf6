"""Sentence embeddings with all-MiniLM-L6-v2, in MLX and on ONNX Runtime (the graph written
from the same safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mofa_omni.adapters.backends import create_adapter
from mofa_omni.adapters.loading import open_model
from mofa_omni.adapters.mlx_bert import BertEncoder, MlxBertAdapter
from mofa_omni.adapters.ort_bert import OrtBertAdapter
from mofa_omni.contract.errors import ModelLoadError
from mofa_omni.contract.tasks import EmbeddingRequest
from mofa_omni.models.catalog import Catalog
from mofa_omni.models.memory import release_freed_memory, snapshot

MINILM = "minilm-l6"
MiB = 1 << 20
BACKENDS = ["mlx", "onnxruntime"]
SENTENCES = ["A man is playing a guitar.", "Someone plays an instrument.",
             "The stock market fell sharply today.", "Wie spät ist es?",
             "The quarterly report, which was delayed by several weeks, finally showed growth."]


def _embed(adapter, texts: list[str]) -> np.ndarray:
    return adapter.embed(EmbeddingRequest(texts)).vectors


def test_checkpoint_names_map_onto_the_encoder():
    assert BertEncoder.hf_name("encoder.layer.3.attention.self.query.weight") == \
        "layers.3.attention.query.weight"
    assert BertEncoder.hf_name("encoder.layer.0.attention.output.LayerNorm.bias") == \
        "layers.0.attention.output.LayerNorm.bias"
    assert BertEncoder.hf_name("encoder.layer.5.intermediate.dense.weight") == \
        "layers.5.intermediate.weight"
    assert BertEncoder.hf_name("embeddings.word_embeddings.weight") == "embeddings.word_embeddings.weight"


@pytest.mark.parametrize("adapter", [MlxBertAdapter, OrtBertAdapter])
@pytest.mark.parametrize("config, message", [("{oops", "unreadable"), ({"hidden_size": 384}, "lacks")])
def test_prepare_rejects_a_bad_config(catalog: Catalog, tmp_path: Path, adapter, config, message):
    for name in ("model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(ModelLoadError, match=message):
        adapter(catalog.get(MINILM)).prepare(tmp_path, tmp_path / "out", lambda *a: None)


@pytest.mark.parametrize("adapter", [MlxBertAdapter, OrtBertAdapter])
def test_prepare_names_a_missing_file(catalog: Catalog, tmp_path: Path, adapter):
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        adapter(catalog.get(MINILM)).prepare(tmp_path, tmp_path, lambda *a: None)


def test_onnx_conversion_refuses_corrupt_weights(catalog: Catalog, store, tmp_path: Path):
    source = store.prepare(create_adapter(catalog.get(MINILM), "mlx"))  # the checkpoint's files
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00not safetensors at all")
    with pytest.raises(ModelLoadError, match="model.safetensors is not readable safetensors"):
        OrtBertAdapter(catalog.get(MINILM)).prepare(tmp_path, tmp_path / "out", lambda *a: None)


def test_onnx_conversion_names_a_tensor_the_checkpoint_lacks(catalog: Catalog, store, tmp_path):
    from safetensors.numpy import load_file, save_file

    source = store.prepare(create_adapter(catalog.get(MINILM), "mlx"))
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    weights = load_file(str(source / "model.safetensors"))
    del weights["encoder.layer.2.intermediate.dense.bias"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="'minilm-l6': model.safetensors lacks "
                                             "encoder.layer.2.intermediate.dense.bias"):
        OrtBertAdapter(catalog.get(MINILM)).prepare(tmp_path, tmp_path / "out", lambda *a: None)


@pytest.mark.slow
def test_onnx_runtime_and_mlx_embed_alike(model):
    onnx, mlx = (_embed(model(MINILM, backend), SENTENCES) for backend in BACKENDS)
    np.testing.assert_allclose(onnx, mlx, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_vectors_are_unit_rows_and_rank_a_paraphrase_first(model, backend):
    vectors = _embed(model(MINILM, backend), SENTENCES[:3])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors @ vectors[0]
    assert similarity[1] > similarity[2] + 0.3


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_embeddings_are_deterministic_and_batch_invariant(model, backend):
    adapter = model(MINILM, backend)
    short = "A man is playing a guitar."
    longer = ("The quarterly report, which was delayed by several weeks, finally showed that "
              "revenue grew in every region except the north.")
    alone = _embed(adapter, [short])
    np.testing.assert_array_equal(alone, _embed(adapter, [short]))
    # Padding to the longer text must not change the short one (attention and pooling masks).
    np.testing.assert_allclose(_embed(adapter, [longer, short])[1], alone[0], atol=1e-5)
    # More texts than one batch holds come back in the order given.
    texts = [f"Sentence number {i} talks about item {i * 7}." for i in range(adapter.batch_size + 5)]
    texts[3] = longer
    many = _embed(adapter, texts)
    for i in (0, 3, len(texts) - 1):
        np.testing.assert_allclose(many[i], _embed(adapter, [texts[i]])[0], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_text_longer_than_the_model_is_truncated(model, backend):
    adapter = model(MINILM, backend)
    (vector,) = _embed(adapter, ["word " * (3 * adapter.max_length)])
    assert np.isfinite(vector).all() and abs(np.linalg.norm(vector) - 1) < 1e-5


@pytest.mark.slow
def test_unload_returns_mlx_memory(catalog, store):
    release_freed_memory()
    adapter = open_model(MINILM, catalog=catalog, store=store, backend="mlx")
    _embed(adapter, ["memory is measured before and after"] * 8)
    loaded = snapshot().mlx_active_bytes
    adapter.unload()
    after = snapshot()
    assert loaded - after.mlx_active_bytes > 80 * MiB  # the float32 weights are ~87 MiB
    assert after.mlx_cache_bytes < 8 * MiB


@pytest.mark.slow
def test_onnx_runtime_gives_back_a_large_batchs_memory_and_its_weights_at_unload(catalog, store):
    release_freed_memory()
    before = snapshot().rss_bytes
    adapter = open_model(MINILM, catalog=catalog, store=store, backend="onnxruntime")
    _embed(adapter, ["memory is measured before and after"] * 8)
    loaded = snapshot().rss_bytes
    _embed(adapter, ["word " * 400] * 32)  # ~300 MiB of attention scores while it runs
    release_freed_memory()
    assert snapshot().rss_bytes - loaded < 40 * MiB
    adapter.unload()
    release_freed_memory()
    after = snapshot().rss_bytes
    assert loaded - before > 80 * MiB  # the float32 weights are ~87 MiB
    assert loaded - after > 0.7 * (loaded - before)
