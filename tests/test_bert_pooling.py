"""Pooling, normalisation and prompts as a checkpoint's sentence-transformers files say, for a
CLS-pooled BGE-style BERT, an E5-style BERT with query/passage prompts and an XLM-RoBERTa
encoder, on MLX and on ONNX Runtime: tiny random-weight checkpoints in the real Hugging Face
layout (:mod:`mofa_omni.testing.tiny_bert`, no real ones are available offline), each checked
against a NumPy forward pass of the same weights written here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mofa_omni.adapters.loading import open_model
from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ContractError, ModelLoadError
from mofa_omni.contract.stages import cosine_rank
from mofa_omni.contract.tasks import EmbeddingRequest, RerankRequest, validate_request
from mofa_omni.formats.sentence_transformers import read_pipeline
from mofa_omni.gateway.openai_bodies import EmbeddingBody
from mofa_omni.models.catalog import Catalog
from mofa_omni.models.store import ModelStore
from mofa_omni.testing.tiny_bert import write_embedder

BACKENDS = ["mlx", "onnxruntime"]
TEXTS = ["what is the capital of france?", "paris", "a man plays guitar today, the cat sleeps."]
E5_PROMPTS = {"query": "query: ", "passage": "passage: "}
MODELS = {  # name: (family, write_embedder keywords, catalog options)
    "tiny-bge": ("bert", {"pooling": "cls"}, ""),
    "tiny-e5": ("bert", {"pooling": "mean", "prompts": E5_PROMPTS, "seed": 1}, ""),
    "tiny-xlmr": ("xlm-roberta", {"pooling": "max", "normalize": False, "seed": 2}, ""),
    # The E5 checkpoint again, its files overridden by the catalog entry's options.
    "tiny-e5-as-cls": ("bert", {"pooling": "mean", "prompts": E5_PROMPTS, "seed": 1},
                       'options = { pooling = "cls", normalize = false, query_prefix = "q: " }\n'),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bert")
    entries = []
    for name, (family, keywords, options) in MODELS.items():
        checkpoint = write_embedder(root / name, family, **keywords)
        entries.append(f'[models.{name}]\nadapter = ["mlx_bert", "ort_bert"]\n'
                       'tasks = ["embedding", "rerank"]\nformat = "safetensors"\n'
                       f'memory_mb = 10\nsource = {{ path = "{checkpoint}" }}\n{options}')
    (root / "catalog.toml").write_text("\n".join(entries))
    return {"root": root, "catalog": root / "catalog.toml", "cache": root / "cache"}


def open_tiny(tiny: dict[str, Path], name: str, backend: str):
    return open_model(name, catalog=Catalog.load([tiny["catalog"]]),
                      store=ModelStore(tiny["cache"]), backend=backend)


# --- the reference: BERT / XLM-R in NumPy, one text at a time, no padding -------------------

_erf = np.vectorize(math.erf)


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def load_checkpoint(checkpoint: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config, tensors)`` of a checkpoint, float64, as its files hold them."""
    from safetensors.numpy import load_file

    config = json.loads((checkpoint / "config.json").read_text())
    tensors = load_file(str(checkpoint / "model.safetensors"))
    return config, {k: v.astype(np.float64) for k, v in tensors.items()}


def encoder_forward(config: dict, w: dict[str, np.ndarray], ids: list[int],
                    types: list[int], prefix: str = "") -> np.ndarray:
    """(tokens, hidden) last-layer states of one unpadded sequence; ``prefix``: the encoder's
    tensors' (``bert.`` in a classifier's checkpoint)."""
    ids_, types_ = np.array(ids), np.array(types)
    start = config["pad_token_id"] + 1 if config["model_type"] == "xlm-roberta" else 0
    eps, heads = config["layer_norm_eps"], config["num_attention_heads"]

    def linear(x, name):
        return x @ w[f"{prefix}{name}.weight"].T + w[f"{prefix}{name}.bias"]

    def norm(x, name):
        return _layer_norm(x, w[f"{prefix}{name}.weight"], w[f"{prefix}{name}.bias"], eps)

    x = norm(w[f"{prefix}embeddings.word_embeddings.weight"][ids_]
             + w[f"{prefix}embeddings.position_embeddings.weight"][start + np.arange(len(ids_))]
             + w[f"{prefix}embeddings.token_type_embeddings.weight"][types_],
             "embeddings.LayerNorm")
    n, d = x.shape
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        q, k, v = (linear(x, f"{p}.attention.self.{part}").reshape(n, heads, -1).transpose(1, 0, 2)
                   for part in ("query", "key", "value"))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(d // heads)
        probabilities = np.exp(scores - scores.max(-1, keepdims=True))
        probabilities /= probabilities.sum(-1, keepdims=True)
        context = (probabilities @ v).transpose(1, 0, 2).reshape(n, d)
        x = norm(linear(context, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
        hidden = linear(x, f"{p}.intermediate.dense")
        hidden = hidden * 0.5 * (1 + _erf(hidden / math.sqrt(2)))
        x = norm(linear(hidden, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
    return x


def token_states(checkpoint: Path, text: str) -> np.ndarray:
    """(tokens, hidden) float64 last-layer states of ``text``, straight from the files."""
    from tokenizers import Tokenizer

    config, w = load_checkpoint(checkpoint)
    encoding = Tokenizer.from_file(str(checkpoint / "tokenizer.json")).encode(text)
    return encoder_forward(config, w, encoding.ids, encoding.type_ids)


def reference(checkpoint: Path, text: str, pooling: str, normalize: bool) -> np.ndarray:
    states = token_states(checkpoint, text)
    vector = {"cls": states[0], "mean": states.mean(0), "max": states.max(0)}[pooling]
    return vector / np.linalg.norm(vector) if normalize else vector


# --- the adapters against it ----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, pooling, normalize", [("tiny-bge", "cls", True),
                                                      ("tiny-xlmr", "max", False)])
def test_pooling_and_normalisation_follow_the_checkpoints_files(tiny, backend, name, pooling,
                                                                normalize):
    adapter = open_tiny(tiny, name, backend)
    vectors = adapter.embed(EmbeddingRequest(TEXTS)).vectors  # three lengths: one padded batch
    expected = np.stack([reference(tiny["root"] / name, text, pooling, normalize) for text in TEXTS])
    assert vectors.shape == (3, 32) and vectors.dtype == np.float32 and adapter.dimension == 32
    np.testing.assert_allclose(vectors, expected, atol=1e-4)
    norms = np.linalg.norm(vectors, axis=1)
    assert np.allclose(norms, 1, atol=1e-5) == normalize, norms
    adapter.unload()


@pytest.mark.parametrize("backend", BACKENDS)
def test_e5_puts_each_input_types_prompt_before_the_text(tiny, backend):
    adapter, e5 = open_tiny(tiny, "tiny-e5", backend), tiny["root"] / "tiny-e5"
    for input_type, prompt in (("query", "query: "), ("document", "passage: "), (None, "")):
        vectors = adapter.embed(EmbeddingRequest(TEXTS, input_type)).vectors
        expected = np.stack([reference(e5, prompt + text, "mean", True) for text in TEXTS])
        np.testing.assert_allclose(vectors, expected, atol=1e-4, err_msg=str(input_type))
    queries = adapter.embed(EmbeddingRequest(TEXTS, "query")).vectors
    documents = adapter.embed(EmbeddingRequest(TEXTS, "document")).vectors
    assert np.abs(queries - documents).max() > 1e-2  # the prompts do change the vectors
    # Reranking embeds the query as a query and each document as a document.
    scores = adapter.rerank(RerankRequest(TEXTS[0], TEXTS[1:])).scores
    query = reference(e5, "query: " + TEXTS[0], "mean", True)
    expected = [reference(e5, "passage: " + text, "mean", True) @ query for text in TEXTS[1:]]
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    for stage in adapter.stages().values():  # MLX's split pipeline: the same prompts
        staged = cosine_rank(stage.run(RerankRequest(TEXTS[0], TEXTS[1:]))).scores
        np.testing.assert_allclose(staged, expected, atol=1e-4)
    adapter.unload()


@pytest.mark.parametrize("backend", BACKENDS)
def test_catalog_options_override_the_files(tiny, backend):
    adapter, e5 = open_tiny(tiny, "tiny-e5-as-cls", backend), tiny["root"] / "tiny-e5-as-cls"
    queries = adapter.embed(EmbeddingRequest(TEXTS, "query")).vectors
    documents = adapter.embed(EmbeddingRequest(TEXTS, "document")).vectors
    np.testing.assert_allclose(queries, [reference(e5, "q: " + t, "cls", False) for t in TEXTS],
                               atol=1e-4)
    np.testing.assert_allclose(documents, [reference(e5, "passage: " + t, "cls", False)
                                           for t in TEXTS], atol=1e-4)
    # Unnormalised vectors are still ranked by their cosine.
    scores = adapter.rerank(RerankRequest(TEXTS[0], TEXTS[1:])).scores
    query = reference(e5, "q: " + TEXTS[0], "cls", True)
    np.testing.assert_allclose(scores, [reference(e5, "passage: " + t, "cls", True) @ query
                                        for t in TEXTS[1:]], atol=1e-4)
    adapter.unload()


def test_a_module_the_runtime_does_not_run_is_refused(tmp_path: Path):
    checkpoint = write_embedder(tmp_path / "dense", "bert")
    modules = json.loads((checkpoint / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense",
                       "type": "sentence_transformers.models.Dense"})
    (checkpoint / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match="module Dense is not supported"):
        read_pipeline(checkpoint)
    pooling = checkpoint / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
    (checkpoint / "modules.json").write_text(json.dumps(modules[:2]))
    with pytest.raises(ModelLoadError, match="weightedmean is not supported"):
        read_pipeline(checkpoint)
    pooling.write_text(json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}))
    pipeline = read_pipeline(checkpoint)
    assert pipeline.pooling == ("cls", "mean") and not pipeline.normalize  # no Normalize module


# --- the request's input type, on the wire and at the gateway -------------------------------

def test_input_type_travels_through_arrow_and_old_messages_still_decode():
    request = EmbeddingRequest(["a", "b"], "query")
    assert arrow.decode(arrow.encode(request), EmbeddingRequest) == request
    assert arrow.decode(arrow.encode(EmbeddingRequest(["a"])), EmbeddingRequest).input_type is None
    old = pa.StructArray.from_arrays([pa.array([["a", "b"]], pa.list_(pa.string()))], ["texts"])
    assert arrow.decode(old, EmbeddingRequest) == EmbeddingRequest(["a", "b"])
    with pytest.raises(ContractError, match="input_type 'search' is not one of query, document"):
        validate_request(EmbeddingRequest(["a"], "search"))


def test_the_embeddings_body_takes_an_input_type():
    def body(**fields) -> EmbeddingBody:
        return EmbeddingBody(model="tiny-e5", input="hello", **fields)

    assert body(input_type="document").to_request() == EmbeddingRequest(["hello"], "document")
    assert body(input_type="search_query").to_request().input_type == "query"  # Cohere's name
    assert body().to_request().input_type is None
    with pytest.raises(ContractError, match="input_type 'classification'"):
        body(input_type="classification").to_request()
