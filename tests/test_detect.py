"""Reading what a model is from its files (mofa_omni.models.detect), registering it under a name
(mofa_omni.models.by_name, catalog.write_user_entry), and Hub names.

Real files where the cache has them (SmolLM2's GGUF, Whisper's CTranslate2 folder, the Piper
voice, MiniLM's safetensors); tiny random checkpoints written by the libraries' own classes
(mofa_omni.testing) for the kinds no real weights exist offline for.
"""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from mofa_omni.adapters.base import adapter_names
from mofa_omni.adapters.loading import open_model
from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import EmbeddingRequest, Task
from mofa_omni.models.by_name import looks_like_path, parse_hub_name, resolve_model_name
from mofa_omni.models.catalog import (
    Catalog,
    CatalogError,
    HubSource,
    ModelSpec,
    PathSource,
    entry_toml,
    write_user_entry,
)
from mofa_omni.models.detect import detect, safe_name
from mofa_omni.models.store import ModelStore
from mofa_omni.testing.tiny_bert import write_embedder, write_reranker
from tests.test_torch_checkpoint import Storage, save_zip, tensor


def fetched(catalog: Catalog, store: ModelStore, name: str) -> Path:
    return store.fetch(catalog.get(name))


@pytest.fixture(scope="module")
def smollm2_gguf(catalog: Catalog, store: ModelStore) -> Path:
    spec = catalog.get("smollm2-135m")
    return store.fetch(spec) / Path(spec.source.files[0]).name


# --- real files ------------------------------------------------------------------------------

def test_a_gguf_file_or_its_folder_is_a_chat_lm_of_its_architecture(smollm2_gguf: Path):
    for path in (smollm2_gguf, smollm2_gguf.parent):
        found = detect(path, "mine")
        assert (found.kind, found.architecture) == ("gguf", "llama")
        assert found.spec.adapters == ("mlx_lm", "llama_cpp", "ct2_lm")
        assert found.spec.tasks == (Task.TEXT_GENERATION, Task.RERANK)
        assert found.spec.format == "gguf" and found.spec.name == "mine"
        # 94 MiB of Q4_1 weights: the estimate is of the packaged entry's order (660 MB measured)
        assert 400 < found.spec.memory_mb < 1000
    assert detect(smollm2_gguf).spec.name == "smollm2-135m-instruct.q4_1"
    assert detect(smollm2_gguf).spec.source == PathSource(smollm2_gguf.resolve())


def test_a_gguf_of_an_architecture_nobody_serves_is_refused(tmp_path: Path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ContractError, match=r"'mamba' is served by no engine.*gemma3, llama"):
        detect(tmp_path / "m.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ContractError, match="bad.gguf is not a readable GGUF"):
        detect(tmp_path / "bad.gguf")


def test_whisper_piper_and_minilm_folders(catalog: Catalog, store: ModelStore):
    whisper = detect(fetched(catalog, store, "whisper-tiny.en"))
    packaged = catalog.get("whisper-tiny.en")
    assert (whisper.kind, whisper.spec.format) == ("whisper", packaged.format)
    assert whisper.spec.adapters == packaged.adapters

    voice = fetched(catalog, store, "piper-joe")
    for path in (voice, voice / "en_US-joe-medium.onnx"):
        found = detect(path)
        assert (found.kind, found.spec.adapters, found.spec.tasks) == (
            "piper", ("piper",), (Task.SPEECH_SYNTHESIS,))
        assert found.spec.source == PathSource(voice.resolve())  # the .onnx.json comes along

    minilm = detect(fetched(catalog, store, "minilm-l6"))
    assert (minilm.kind, minilm.architecture) == ("embedding", "BertModel")
    assert minilm.spec.adapters == ("mlx_bert", "ort_bert")
    assert minilm.spec.format == "safetensors"
    # no sentence-transformers files: the adapters' defaults
    assert minilm.detected == {"pooling": "mean", "normalize": True, "prompts": {},
                               "sentence_transformers": False}


# --- tiny checkpoints of kinds with no offline weights ---------------------------------------

def test_sentence_transformers_pooling_and_prompts_are_recorded(tmp_path: Path):
    folder = write_embedder(tmp_path / "bge", "bert", pooling="cls", normalize=False,
                            prompts={"query": "query: ", "passage": "passage: "})
    found = detect(folder)
    assert found.kind == "embedding" and found.spec.tasks == (Task.EMBEDDING, Task.RERANK)
    assert found.detected["pooling"] == "cls" and found.detected["normalize"] is False
    assert found.detected["prompts"] == {"query": "query: ", "document": "passage: "}
    assert "pooling cls, normalize false" in found.spec.description


def test_a_one_label_classifier_is_a_cross_encoder_and_more_labels_are_refused(tmp_path: Path):
    folder = write_reranker(tmp_path / "reranker", "xlm-roberta")
    if "ort_cross_encoder" in adapter_names():
        found = detect(folder)
        assert (found.kind, found.spec.adapters, found.spec.tasks) == (
            "cross_encoder", ("mlx_cross_encoder", "ort_cross_encoder"), (Task.RERANK,))
    else:  # an install whose entry points predate the adapter: said as such
        with pytest.raises(ContractError, match="found a cross-encoder .*no adapter serves it"):
            detect(folder)
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {"0": "neg", "1": "pos"}
    config["num_labels"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ContractError, match="2 labels is a classifier"):
        detect(folder)


def test_an_mlx_lm_folder_and_a_vlm_folder(tmp_path: Path, smollm2_gguf: Path):
    from mofa_omni.testing.tiny_llm import write_tiny_llm, write_tokenizer
    from mofa_omni.testing.tiny_vlm import write_tiny_smolvlm

    tokenizer = write_tokenizer(tmp_path / "tokenizer", smollm2_gguf)
    llm = detect(write_tiny_llm(tmp_path / "tiny-qwen3", "qwen3", tokenizer))
    assert (llm.kind, llm.architecture, llm.spec.format) == ("mlx_lm", "qwen3", "mlx")
    assert llm.spec.adapters == ("mlx_lm",)

    vlm = detect(write_tiny_smolvlm(tmp_path / "tiny-smolvlm", smollm2_gguf))
    assert (vlm.kind, vlm.spec.adapters, vlm.spec.format) == ("vlm", ("mlx_vlm",), "mlx")
    assert vlm.spec.tasks == (Task.VISION_LANGUAGE, Task.TEXT_GENERATION)


def test_a_flux2_diffusers_folder(tmp_path: Path):
    from mofa_omni.testing.tiny_imagegen import write_tiny_flux2

    found = detect(write_tiny_flux2(tmp_path / "tiny-flux2"))
    assert (found.kind, found.spec.adapters, found.spec.format) == (
        "image", ("mflux_image",), "diffusers")
    assert found.spec.tasks == (Task.IMAGE_GENERATION,)
    (tmp_path / "tiny-flux2" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ContractError, match="StableDiffusionPipeline"):
        detect(tmp_path / "tiny-flux2")


def test_what_fits_no_engine_is_refused_naming_what_was_found(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ContractError) as error:
        detect(tmp_path)
    message = str(error.value)
    assert "no engine here serves" in message and "notes.txt" in message
    assert "mflux_image" in message and "speech_synthesis" in message  # the engines' table
    (tmp_path / "config.json").write_text('{"model_type": "whisper", "d_model": 384}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ContractError, match="Transformers Whisper checkpoint"):
        detect(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "no_such_arch"}')
    with pytest.raises(ContractError, match="model_type no_such_arch"):
        detect(tmp_path)
    with pytest.raises(ContractError, match="does not exist"):
        detect(tmp_path / "missing")


# --- registration ----------------------------------------------------------------------------

@pytest.fixture()
def user_catalog(tmp_path: Path, monkeypatch) -> Path:
    path = tmp_path / "user" / "catalog.toml"
    monkeypatch.setenv("MOFA_OMNI_CATALOG", str(path))
    return path


def test_pytorch_weights_are_converted_once_and_the_model_serves(tmp_path: Path,
                                                                 user_catalog: Path):
    """A sentence-transformers folder with pytorch_model.bin only: registered from a converted
    copy in the cache, then embedded by the adapter chosen here."""
    from safetensors.numpy import load_file

    folder = write_embedder(tmp_path / "torch-bert", "bert")
    arrays = load_file(folder / "model.safetensors")
    state = OrderedDict((key, tensor(Storage(value), value.shape)) for key, value in arrays.items())
    save_zip(folder / "pytorch_model.bin", state)
    (folder / "model.safetensors").unlink()
    assert detect(folder).torch_weights == (folder / "pytorch_model.bin",)

    catalog, store = Catalog.load(), ModelStore(tmp_path / "cache")
    spec = resolve_model_name(str(folder), catalog, store)
    assert spec.name == "torch-bert" and catalog.get("torch-bert") == spec
    converted = spec.source.path
    assert converted.is_relative_to(tmp_path / "cache")
    again = load_file(converted / "model.safetensors")
    assert again.keys() == arrays.keys()
    assert all(np.array_equal(again[key], arrays[key]) for key in arrays)
    assert Catalog.load().get("torch-bert") == spec  # written to the user catalog
    vectors = open_model("torch-bert", catalog=Catalog.load(), store=store).embed(
        EmbeddingRequest(["query", "paris"])).vectors
    assert vectors.shape == (2, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_sharded_pytorch_weights_become_sharded_safetensors_with_their_index(
        tmp_path: Path, user_catalog: Path, catalog: Catalog, store: ModelStore):
    """pytorch_model-0000N-of-00002.bin shards and their index, as transformers writes them (a
    tiny Llama here): converted shard by shard, the index renamed with them
    (model.safetensors.index.json); mlx-lm then reads the shards and replies as the original
    does; an index naming a tensor its shard lacks is refused."""
    from safetensors.numpy import load_file

    from mofa_omni.contract.tasks import ChatMessage, ChatRequest
    from mofa_omni.testing.tiny_llm import write_tiny_llm, write_tokenizer

    smollm2 = catalog.get("smollm2-135m")
    gguf = store.fetch(smollm2) / Path(smollm2.source.files[0]).name
    original = write_tiny_llm(tmp_path / "tiny-llama", "llama",
                              write_tokenizer(tmp_path / "tokenizer", gguf))
    folder = tmp_path / "sharded-llama"
    shutil.copytree(original, folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    arrays = {k: v for f in sorted(original.glob("*.safetensors")) for k, v in load_file(f).items()}
    names = sorted(arrays)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for shard, keys in halves.items():
        save_zip(folder / shard, OrderedDict((k, tensor(Storage(arrays[k]), arrays[k].shape))
                                             for k in keys))
    index = {"metadata": {"total_size": 0},
             "weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert detect(folder).torch_weights == tuple(folder / shard for shard in halves)

    cache = ModelStore(tmp_path / "cache")
    spec = resolve_model_name(str(folder), Catalog.load(), cache)
    converted = spec.source.path
    assert sorted(p.name for p in converted.glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert not (converted / "pytorch_model.bin.index.json").exists()
    weight_map = json.loads((converted / "model.safetensors.index.json").read_text())["weight_map"]
    assert weight_map == {k: shard.replace("pytorch_model", "model").replace(".bin", ".safetensors")
                          for shard, keys in halves.items() for k in keys}
    (tmp_path / "original.toml").write_text(
        f'[models.tiny-llama]\nadapter = "mlx_lm"\ntasks = ["text_generation"]\n'
        f'format = "mlx"\nmemory_mb = 60\nsource = {{ path = "{original}" }}\n')
    asked = ChatRequest([ChatMessage("user", "Hello")], max_tokens=8)

    def reply(name: str, catalog_: Catalog) -> str:
        model = open_model(name, catalog=catalog_, store=cache, backend="mlx")
        return "".join(chunk.text for chunk in model.generate(asked))

    assert reply(spec.name, Catalog.load()) == reply(
        "tiny-llama", Catalog.load([tmp_path / "original.toml"]))

    wrong = dict(index, weight_map={**index["weight_map"],
                                    names[0]: "pytorch_model-00002-of-00002.bin"})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(wrong))
    with pytest.raises(ContractError, match=f"{names[0]} is listed in "
                                            "pytorch_model-00002-of-00002.bin, which does not "
                                            "hold it"):
        resolve_model_name(str(folder), Catalog.load(), ModelStore(tmp_path / "cache2"),
                           name="sharded-llama-2")


def test_the_user_catalog_keeps_its_entries_and_refuses_a_different_one(user_catalog: Path,
                                                                       tmp_path: Path):
    user_catalog.parent.mkdir(parents=True)
    user_catalog.write_text('# mine\n[models.other]\nadapter = "piper"\ntasks = '
                            '["speech_synthesis"]\nformat = "onnx"\nsource = { path = "/x" }\n')
    spec = ModelSpec("voice", "piper", (Task.SPEECH_SYNTHESIS,), "onnx",
                     PathSource(tmp_path / "a b"), 170, 'a "quoted" voice', adapters=("piper",),
                     options={"speed": 1.2})
    write_user_entry(spec)
    text = user_catalog.read_text()
    assert text.startswith("# mine") and entry_toml(spec) in text
    catalog = Catalog.load()
    assert catalog.get("voice") == spec and "other" in catalog.models
    write_user_entry(spec, catalog)  # the same entry: nothing changes
    assert user_catalog.read_text() == text
    other = ModelSpec("voice", "piper", (Task.SPEECH_SYNTHESIS,), "onnx",
                      PathSource(tmp_path / "c"), 170, adapters=("piper",))
    with pytest.raises(CatalogError, match="different model 'voice'.*--force"):
        write_user_entry(other, catalog)
    with pytest.raises(CatalogError, match="different model 'smollm2-135m'"):
        write_user_entry(ModelSpec("smollm2-135m", **{k: getattr(other, k) for k in (
            "adapter", "tasks", "format", "source", "memory_mb")}), catalog)
    write_user_entry(other, catalog, force=True)
    after = Catalog.load()
    assert after.get("voice") == other and "other" in after.models


def test_names_paths_and_hub_names_are_told_apart(tmp_path: Path, user_catalog: Path):
    assert parse_hub_name("hf:org/repo") == HubSource("org/repo", (), "main")
    assert parse_hub_name("hf:Org/Repo-1.5B:model-q4_k_m.gguf") == HubSource(
        "Org/Repo-1.5B", ("model-q4_k_m.gguf",), "main")
    assert parse_hub_name("hf:org/repo@v2:sub/f.gguf") == HubSource("org/repo", ("sub/f.gguf",),
                                                                    "v2")
    # a split GGUF named by its first part: every part is fetched
    assert parse_hub_name("hf:org/repo:q4/m-00001-of-00003.gguf").files == (
        "q4/m-00001-of-00003.gguf", "q4/m-00002-of-00003.gguf", "q4/m-00003-of-00003.gguf")
    for bad, why in [("hf:repo", "ORG/REPO"), ("hf:a/b/c", "ORG/REPO"), ("hf:org/repo@", "empty"),
                     ("hf:org/repo:../x", "not a file"), ("org/repo", "not a Hub name"),
                     ("hf:org/repo:m-00002-of-00003.gguf", "name its first part, "
                                                           "m-00001-of-00003.gguf")]:
        with pytest.raises(ContractError, match=why):
            parse_hub_name(bad)
    assert looks_like_path("./x") and looks_like_path("m.gguf") and looks_like_path(str(tmp_path))
    assert not looks_like_path("smollm2-135m")
    assert safe_name("/a/My Model_v2.GGUF/") == "my-model_v2.gguf"
    assert safe_name("SmolLM2-135M.Q4_1.gguf") == "smollm2-135m.q4_1"
    catalog = Catalog.load()
    assert resolve_model_name("smollm2-135m", catalog) is catalog.get("smollm2-135m")
    with pytest.raises(CatalogError, match="smollm2-135m"):
        resolve_model_name("smollm2-13m", catalog)  # a typo: close matches
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ContractError, match="no engine here serves"):
        resolve_model_name(str(empty), catalog)
    assert not user_catalog.exists()  # nothing registered


def test_a_path_registered_once_is_not_read_again(tmp_path: Path, user_catalog: Path,
                                                  smollm2_gguf: Path):
    link = tmp_path / "SmolLM2.gguf"
    shutil.copy(smollm2_gguf, link)
    catalog = Catalog.load()
    spec = resolve_model_name(str(link), catalog, name="small")
    assert spec.name == "small" and catalog.get("small") == spec
    link.write_bytes(b"not a gguf any more")  # read again, it would fail
    assert resolve_model_name(str(link), Catalog.load(), name="small") == spec


def test_a_hub_name_is_fetched_by_the_store_then_detected_and_registered(
        tmp_path: Path, user_catalog: Path, smollm2_gguf: Path):
    """The Hub cannot be reached here: the store's cache already holds the repository's file
    (as a finished fetch leaves it), so the store's fetch returns it without a network."""
    from mofa_omni.models.store import Manifest

    store = ModelStore(tmp_path / "cache")
    source = HubSource("someone/SmolLM2-GGUF", ("smollm2.Q4_1.gguf",))
    fetched = store.source_dir(ModelSpec("any", "", (), "", source, 0))
    fetched.mkdir(parents=True)
    shutil.copy(smollm2_gguf, fetched / "smollm2.Q4_1.gguf")
    Manifest.of_directory(fetched, 0).write(fetched)

    catalog = Catalog.load()
    spec = resolve_model_name("hf:someone/SmolLM2-GGUF:smollm2.Q4_1.gguf", catalog, store)
    assert (spec.name, spec.source, spec.format) == ("smollm2.q4_1", source, "gguf")
    assert spec.adapters == ("mlx_lm", "llama_cpp", "ct2_lm")
    assert Catalog.load().get("smollm2.q4_1") == spec
    with pytest.raises(ContractError, match="is a catalog name"):
        resolve_model_name("smollm2-135m", catalog, name="renamed")
