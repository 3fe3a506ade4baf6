"""Cross-encoder reranking (ort_cross_encoder, mlx_cross_encoder): tiny random-weight BERT and XLM-RoBERTa
``*ForSequenceClassification`` checkpoints in the real Hugging Face layout
(:mod:`mofa_omni.testing.tiny_bert`: no BGE-Reranker or ms-marco weights are available offline),
checked against a NumPy forward pass of the same weights, and served by omni-nodes in a real
``dora run`` from a user catalog file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mofa_omni.adapters.loading import open_model
from mofa_omni.contract.errors import ModelLoadError
from mofa_omni.contract.tasks import RerankRequest
from mofa_omni.models.catalog import Catalog
from mofa_omni.models.store import ModelStore
from mofa_omni.testing.tiny_bert import write_embedder, write_reranker
from tests.dataflow_run import finish, start_dataflow
from tests.test_bert_pooling import encoder_forward, load_checkpoint

DATAFLOW = Path(__file__).parent / "dataflows" / "cross_encoder.yml"
QUERY = "what is the capital of france?"
DOCUMENTS = ["paris is the capital of france.", "the cat sleeps.", "a man plays guitar today.",
             "paris"]
MODELS = {"tiny-bert-reranker": ("bert", ""), "tiny-xlmr-reranker": ("xlm-roberta", ""),
          "tiny-bert-reranker-logits": ("bert", 'options = { scores = "logits" }\n')}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The checkpoints and a catalog file naming them, as a user would write it."""
    root = tmp_path_factory.mktemp("cross_encoder")
    entries = []
    for name, (family, options) in MODELS.items():
        checkpoint = write_reranker(root / family, family, seed=3)
        entries.append(f'[models.{name}]\ndescription = "a tiny {family} cross-encoder"\n'
                       'adapter = ["ort_cross_encoder", "mlx_cross_encoder"]\n'
                       'tasks = ["rerank"]\n'
                       f'format = "safetensors"\nmemory_mb = 10\n'
                       f'source = {{ path = "{checkpoint}" }}\n{options}')
    (root / "catalog.toml").write_text("\n".join(entries))
    return {"root": root, "catalog": root / "catalog.toml", "cache": root / "cache"}


def open_tiny(tiny: dict[str, Path], name: str, backend: str | None = None):
    return open_model(name, catalog=Catalog.load([tiny["catalog"]]),
                      store=ModelStore(tiny["cache"]), backend=backend)


def reference_logits(checkpoint: Path, query: str, documents: list[str]) -> np.ndarray:
    """Each (query, document) pair through the encoder and the classifier head, in NumPy."""
    from tokenizers import Tokenizer

    config, w = load_checkpoint(checkpoint)
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    bert = config["model_type"] == "bert"
    logits = []
    for document in documents:
        encoding = tokenizer.encode(query, document)
        first = encoder_forward(config, w, encoding.ids, encoding.type_ids,
                                "bert." if bert else "roberta.")[0]
        if bert:  # BertPooler, then the classifier
            hidden = np.tanh(first @ w["bert.pooler.dense.weight"].T + w["bert.pooler.dense.bias"])
            logits.append(hidden @ w["classifier.weight"][0] + w["classifier.bias"][0])
        else:  # RobertaClassificationHead
            hidden = np.tanh(first @ w["classifier.dense.weight"].T + w["classifier.dense.bias"])
            logits.append(hidden @ w["classifier.out_proj.weight"][0]
                          + w["classifier.out_proj.bias"][0])
    return np.array(logits)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


@pytest.mark.parametrize("backend", ["onnxruntime", "mlx"])
@pytest.mark.parametrize("name, family", [("tiny-bert-reranker", "bert"),
                                          ("tiny-xlmr-reranker", "xlm-roberta")])
def test_pairs_are_scored_as_the_classifier_head_says(tiny, name, family, backend):
    adapter = open_tiny(tiny, name, backend)
    assert adapter.backend == backend
    scores = adapter.rerank(RerankRequest(QUERY, DOCUMENTS)).scores
    logits = reference_logits(tiny["root"] / family, QUERY, DOCUMENTS)
    assert scores.shape == (4,) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, sigmoid(logits), atol=1e-4)
    assert np.ptp(logits) > 0.05  # the documents do get different scores
    # Each pair alone scores as in a padded batch (the pair's order is kept).
    alone = [adapter.rerank(RerankRequest(QUERY, [d])).scores[0] for d in DOCUMENTS]
    np.testing.assert_allclose(alone, scores, atol=1e-5)
    adapter.unload()


@pytest.mark.parametrize("backend", ["onnxruntime", "mlx"])
def test_a_batch_of_requests_scores_as_each_alone(tiny, model, backend):
    """The pairs of several requests (different queries) share batches; each request's
    scores are those it gets alone. The bi-encoder reranker (ONNX Runtime) batches too."""
    requests = [RerankRequest(QUERY, DOCUMENTS), RerankRequest("a cat", DOCUMENTS[:2]),
                RerankRequest("music", [DOCUMENTS[3]])]
    adapters = [open_tiny(tiny, "tiny-bert-reranker", backend)]
    if backend == "onnxruntime":
        adapters.append(model("minilm-l6", "onnxruntime"))
    for adapter in adapters:
        together = adapter.rerank_batch(requests)
        for request, result in zip(requests, together, strict=True):
            np.testing.assert_allclose(result.scores, adapter.rerank(request).scores, atol=1e-5)
    adapters[0].unload()


@pytest.mark.parametrize("backend", ["onnxruntime", "mlx"])
def test_the_logits_option_gives_the_raw_logits(tiny, backend):
    adapter = open_tiny(tiny, "tiny-bert-reranker-logits", backend)
    scores = adapter.rerank(RerankRequest(QUERY, DOCUMENTS)).scores
    np.testing.assert_allclose(scores, reference_logits(tiny["root"] / "bert", QUERY, DOCUMENTS),
                               atol=1e-4)
    adapter.unload()


def test_an_embedder_or_a_many_label_classifier_is_refused(tiny, tmp_path: Path):
    catalog = tmp_path / "catalog.toml"
    embedder = write_embedder(tmp_path / "embedder", "bert")
    classifier = write_reranker(tmp_path / "three", "bert")
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(classifier / "model.safetensors"))
    weights["classifier.weight"] = np.concatenate([weights["classifier.weight"]] * 3)
    weights["classifier.bias"] = np.concatenate([weights["classifier.bias"]] * 3)
    save_file(weights, str(classifier / "model.safetensors"))
    catalog.write_text("\n".join(
        f'[models.{name}]\nadapter = ["ort_cross_encoder", "mlx_cross_encoder"]\n'
        f'tasks = ["rerank"]\nformat = "safetensors"\nmemory_mb = 10\n'
        f'source = {{ path = "{path}" }}\n'
        for name, path in (("embedder", embedder), ("three", classifier))))
    store = ModelStore(tmp_path / "cache")
    for backend in ("onnxruntime", "mlx"):
        with pytest.raises(ModelLoadError, match="'embedder': architectures .'BertModel'. name "
                                                 "no cross-encoder"):
            open_model("embedder", catalog=Catalog.load([catalog]), store=store, backend=backend)
        with pytest.raises(ModelLoadError, match="'three': a reranker has one label; "
                                                 "classifier.weight has 3"):
            open_model("three", catalog=Catalog.load([catalog]), store=store, backend=backend)


def test_omni_nodes_serve_cross_encoder_reranking_in_a_dataflow(tiny, tmp_path: Path):
    report_path = tmp_path / "report.json"
    finish(start_dataflow(DATAFLOW, {"REPORT": str(report_path),
                                     "MOFA_OMNI_CATALOG": str(tiny["catalog"]),
                                     "MOFA_OMNI_CACHE": str(tiny["cache"])}), 300)
    report = json.loads(report_path.read_text())
    assert not report.get("timeout"), report
    for node, family in (("bert", "bert"), ("xlmr", "xlm-roberta")):
        expected = sigmoid(reference_logits(tiny["root"] / family, report["query"],
                                            report["documents"]))
        np.testing.assert_allclose(report["scores"][node], expected, atol=1e-4, err_msg=node)
    assert report["errors"]["empty"]["kind"] == "bad_request", report["errors"]
    assert "no documents" in report["errors"]["empty"]["message"]
