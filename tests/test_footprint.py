"""Memory per model and backend, before the first load: the catalog's figure for the backend
that serves, else the adapter's estimate from the prepared files (weights, KV cache reserved at
load, tokenizer, engine buffers), else the largest figure given. How close the estimates come
to measured footprints is benchmarks/footprints.py's table."""

from __future__ import annotations

from pathlib import Path

import pytest

from mofa_omni.models.catalog import Catalog, entry_of, variant_entry
from mofa_omni.models.footprint import (
    TOKENIZER_BYTES_PER_TOKEN,
    LlmShape,
    kv_cache_bytes,
    weight_bytes,
)
from mofa_omni.models.store import ModelStore
from mofa_omni.node.residency import ModelSlot, estimated_bytes

MiB = 1 << 20


def test_a_decoders_shape_comes_from_its_config_nested_or_not():
    llama = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
             "hidden_size": 576, "vocab_size": 49152}
    assert LlmShape.from_config(llama) == LlmShape(30, 3, 64, 49152)  # head_dim from hidden
    gemma3 = {"text_config": {"num_hidden_layers": 18, "num_attention_heads": 4,
                              "num_key_value_heads": 1, "head_dim": 256, "hidden_size": 640,
                              "vocab_size": 262144}, "vision_config": {}}
    assert LlmShape.from_config(gemma3) == LlmShape(18, 1, 256, 262144)
    no_kv = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}
    assert LlmShape.from_config(no_kv) == LlmShape(2, 4, 16, 0)  # multi-head: kv = heads
    assert LlmShape.from_config({"model_type": "bert"}) is None
    # 2 (keys, values) x 30 layers x 3 heads x 64 x 4096 positions x 2 bytes (float16)
    assert kv_cache_bytes(LlmShape(30, 3, 64, 49152), 4096) == 94_371_840


def test_memory_per_backend_is_read_kept_and_written_back(tmp_path: Path):
    user = tmp_path / "catalog.toml"
    user.write_text(variant_entry("two-figures", "smollm2-135m",
                                  memory_mb={"mlx": 660, "llama.cpp": 340})
                    + variant_entry("one-figure", "smollm2-135m", memory_mb=500)
                    + variant_entry("no-figure", "smollm2-135m", memory_mb={}))
    catalog = Catalog.load([user])
    two, one = catalog.get("two-figures"), catalog.get("one-figure")
    assert two.memory_mb == 660 and two.memory_bytes_on("llama.cpp") == 340 * MiB
    assert two.memory_bytes_on("ctranslate2") is None  # estimated from its files instead
    assert one.memory_bytes_on("ctranslate2") == 500 * MiB
    assert catalog.get("no-figure").memory_bytes_on("mlx") is None
    assert entry_of(two)["memory_mb"] == {"mlx": 660, "llama.cpp": 340}
    assert entry_of(one)["memory_mb"] == 500


def test_a_backend_without_a_figure_is_estimated_from_the_prepared_files(tmp_path: Path, model):
    gguf = model("smollm2-135m", "llama.cpp").model_dir / "model.gguf"  # the packaged weights
    user = tmp_path / "catalog.toml"
    user.write_text('[models.my-gguf]\nadapter = ["mlx_lm", "llama_cpp"]\n'
                    'tasks = ["text_generation"]\nformat = "gguf"\n'
                    f'memory_mb = {{ mlx = 700 }}\nsource = {{ path = "{gguf}" }}\n')
    catalog, store = Catalog.load([user]), ModelStore(tmp_path / "cache")
    spec = catalog.get("my-gguf")
    assert estimated_bytes(spec, store, "mlx") == 700 * MiB  # the catalog's figure
    assert estimated_bytes(spec, store, "llama.cpp") == 700 * MiB  # none yet: the largest

    slot = ModelSlot(spec, catalog, "llm", store, backend="llama.cpp")
    prepared = slot.prepare("my-gguf")  # fetched and converted, not loaded
    shape = LlmShape(30, 3, 64, 49152)  # SmolLM2-135M's, as its GGUF says
    expected = (weight_bytes(prepared.files) + kv_cache_bytes(shape, 4096)  # llama.cpp's context
                + shape.vocab * (TOKENIZER_BYTES_PER_TOKEN + 2520))
    assert gguf.stat().st_size == weight_bytes(prepared.files)
    assert estimated_bytes(spec, store, "llama.cpp") == expected
    assert slot.ladder() == [("my-gguf", expected)]  # what the node asks the scheduler for
    assert 250 * MiB < expected < 400 * MiB  # measured: 328 MiB loaded and answering


@pytest.mark.parametrize("backend", ["mlx", "ctranslate2"])
def test_the_packaged_llm_is_planned_with_its_backends_own_figure(catalog: Catalog, store,
                                                                   backend):
    spec = catalog.get("smollm2-135m")
    assert estimated_bytes(spec, store, backend) == spec.memory_bytes_on(backend)
    assert spec.memory_bytes_on("llama.cpp") < spec.memory_bytes_on("mlx")  # the GGUF as it is


@pytest.mark.parametrize("memory", ['"lots"', "-5", '{ mlx = "big" }', "1.5"])
def test_a_memory_figure_that_is_not_whole_mib_is_refused_by_name(tmp_path: Path, memory):
    from mofa_omni.models.catalog import CatalogError

    user = tmp_path / "catalog.toml"
    user.write_text('[models.odd]\nadapter = "mlx_lm"\ntasks = ["text_generation"]\n'
                    f'format = "gguf"\nmemory_mb = {memory}\nsource = {{ path = "x.gguf" }}\n')
    with pytest.raises(CatalogError, match="model 'odd': memory_mb.* must be a whole number"):
        Catalog.load([user])
