"""BERT-family checkpoints whose weights are shards listed by ``model.safetensors.index.json``
(as transformers writes a large checkpoint, e.g. a multilingual E5 or BGE-M3, and as a sharded
PyTorch checkpoint is converted): every BERT adapter reads them, and embeds or scores exactly as
from one file. Tiny random-weight checkpoints (mofa_omni.testing.tiny_bert), split here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mofa_omni.adapters.loading import open_model
from mofa_omni.contract.errors import ModelLoadError
from mofa_omni.contract.tasks import EmbeddingRequest, RerankRequest
from mofa_omni.formats.bert import WEIGHTS, WEIGHTS_INDEX
from mofa_omni.models.catalog import Catalog
from mofa_omni.models.store import ModelStore
from mofa_omni.testing.tiny_bert import write_embedder, write_reranker

FIRST, SECOND = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
TEXTS = ["paris is the capital of france.", "the cat sleeps.", "a man plays guitar today."]


def split(checkpoint: Path, out: Path, shards: int = 2) -> Path:
    """``checkpoint`` again in ``out``, its weights in ``shards`` files and their index."""
    shutil.copytree(checkpoint, out)
    tensors = load_file(str(out / WEIGHTS))
    (out / WEIGHTS).unlink()
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: tensors[n] for n in part}, str(out / shard), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, shard)
    (out / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharded_bert")
    checkpoints = {
        "whole-embedder": write_embedder(root / "embedder", "xlm-roberta", pooling="cls"),
        "whole-reranker": write_reranker(root / "reranker", "bert", seed=3)}
    checkpoints["sharded-embedder"] = split(checkpoints["whole-embedder"], root / "e-sharded")
    checkpoints["sharded-reranker"] = split(checkpoints["whole-reranker"], root / "r-sharded", 3)
    entries = []
    for name, checkpoint in checkpoints.items():
        adapters, tasks = (('["mlx_bert", "ort_bert"]', '["embedding", "rerank"]')
                           if "embedder" in name else
                           ('["ort_cross_encoder", "mlx_cross_encoder"]', '["rerank"]'))
        entries.append(f'[models.{name}]\nadapter = {adapters}\ntasks = {tasks}\n'
                       f'format = "safetensors"\nmemory_mb = 10\n'
                       f'source = {{ path = "{checkpoint}" }}\n')
    (root / "catalog.toml").write_text("\n".join(entries))
    return {"root": root, "catalog": root / "catalog.toml", "cache": root / "cache",
            **checkpoints}


def open_tiny(tiny: dict[str, Path], name: str, backend: str):
    return open_model(name, catalog=Catalog.load([tiny["catalog"]]),
                      store=ModelStore(tiny["cache"]), backend=backend)


@pytest.mark.parametrize("backend", ["onnxruntime", "mlx"])
def test_sharded_weights_embed_and_score_as_one_file_does(tiny, backend):
    whole, sharded = (open_tiny(tiny, f"{kind}-embedder", backend)
                      for kind in ("whole", "sharded"))
    vectors = whole.embed(EmbeddingRequest(TEXTS)).vectors
    assert np.array_equal(sharded.embed(EmbeddingRequest(TEXTS)).vectors, vectors)
    whole, sharded = (open_tiny(tiny, f"{kind}-reranker", backend)
                      for kind in ("whole", "sharded"))
    request = RerankRequest("what is the capital of france?", TEXTS)
    assert np.array_equal(sharded.rerank(request).scores, whole.rerank(request).scores)


@pytest.mark.parametrize("damage, message", [
    (lambda index, folder: index["weight_map"].update(
        dict.fromkeys(index["weight_map"], "../outside.safetensors")),
     "names the shard '../outside.safetensors'; shards are files beside it"),
    (lambda index, folder: (folder / SECOND).unlink(),
     "the shard model-00002-of-00002.safetensors that model.safetensors.index.json lists is "
     "missing"),
    (lambda index, folder: index["weight_map"].update(
        {next(k for k, v in index["weight_map"].items() if v == FIRST): SECOND}),
     f"is in {FIRST}, but model.safetensors.index.json lists it in {SECOND}"),
    (lambda index, folder: index["weight_map"].update({"extra.weight": FIRST}),
     "extra.weight listed in model.safetensors.index.json but in no shard"),
    (lambda index, folder: index.pop("weight_map"), "is unreadable"),
])
@pytest.mark.parametrize("backend", ["onnxruntime", "mlx"])
def test_a_damaged_index_is_refused_naming_what_is_wrong(tiny, tmp_path, damage, message,
                                                         backend):
    folder = split(tiny["whole-embedder"], tmp_path / "damaged")
    index = json.loads((folder / WEIGHTS_INDEX).read_text())
    damage(index, folder)
    (folder / WEIGHTS_INDEX).write_text(json.dumps(index))
    catalog = tmp_path / "catalog.toml"
    catalog.write_text('[models.damaged]\nadapter = ["mlx_bert", "ort_bert"]\n'
                       'tasks = ["embedding"]\nformat = "safetensors"\nmemory_mb = 10\n'
                       f'source = {{ path = "{folder}" }}\n')
    with pytest.raises(ModelLoadError, match=message.replace("(", r"\(")):
        open_model("damaged", catalog=Catalog.load([catalog]), store=ModelStore(tmp_path / "c"),
                   backend=backend)


def test_a_sharded_pytorch_bert_is_converted_and_embeds_as_the_original(
        tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """pytorch_model-0000N-of-00002.bin shards with their index, as transformers writes a large
    embedder: `omni pull ./folder` converts them to safetensors shards (model.safetensors.index.json)
    and the embedder serves them, as the one-file original does."""
    from collections import OrderedDict

    from mofa_omni.models.by_name import resolve_model_name
    from tests.test_torch_checkpoint import Storage, save_zip, tensor

    monkeypatch.setenv("MOFA_OMNI_CATALOG", str(tmp_path / "user.toml"))
    original = tiny["whole-embedder"]
    folder = tmp_path / "torch-sharded"
    shutil.copytree(original, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    arrays = load_file(str(original / WEIGHTS))
    names = sorted(arrays)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2],
              "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, keys in halves.items():
        save_zip(folder / shard, OrderedDict((k, tensor(Storage(arrays[k]), arrays[k].shape))
                                             for k in keys))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: shard for shard, keys in halves.items() for k in keys}}))
    cache = ModelStore(tmp_path / "cache")
    spec = resolve_model_name(str(folder), Catalog.load(), cache)
    assert (spec.source.path / WEIGHTS_INDEX).is_file()
    for backend in ("onnxruntime", "mlx"):
        converted = open_model(spec.name, catalog=Catalog.load(), store=cache, backend=backend)
        assert np.array_equal(converted.embed(EmbeddingRequest(TEXTS)).vectors,
                              open_tiny(tiny, "whole-embedder", backend).embed(
                                  EmbeddingRequest(TEXTS)).vectors)
