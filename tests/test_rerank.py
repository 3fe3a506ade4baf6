"""Reranking with real weights: an LLM (query likelihood, or yes/no judgement) on every LLM
backend, MiniLM's embeddings on both of its engines; and one omni-node serving chat and reranking from one model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from mofa_omni.adapters.backends import create_adapter
from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import RerankRequest
from tests.dataflow_run import finish, start_dataflow

DOCUMENTS = ["Bananas are yellow and rich in potassium.",
             "Paris is the capital and largest city of France.",
             "The next train to the airport leaves at noon.",
             "France borders Spain, Italy and Germany."]
QUERIES = [("What is the capital of France?", 1), ("When does the train leave?", 2),
           ("Which fruit is yellow?", 0), ("Which countries border France?", 3)]


@pytest.mark.parametrize("name, backend", [("smollm2-135m", "ctranslate2"),
                                           ("smollm2-135m", "mlx"), ("smollm2-135m", "llama.cpp"),
                                           ("minilm-l6", "mlx"), ("minilm-l6", "onnxruntime")])
def test_rerankers_put_the_relevant_document_first(model, name, backend):
    reranker = model(name, backend)
    for query, best in QUERIES:
        scores = reranker.rerank(RerankRequest(query, DOCUMENTS)).scores
        assert scores.shape == (4,) and scores.dtype == np.float32
        assert int(np.argmax(scores)) == best, (query, scores)


def test_every_llm_backend_scores_alike(model):
    request = RerankRequest("Which countries border France?", DOCUMENTS)
    int8 = model("smollm2-135m", "ctranslate2").rerank(request).scores
    float32 = model("smollm2-135m", "mlx").rerank(request).scores
    q4_1 = model("smollm2-135m", "llama.cpp").rerank(request).scores  # the GGUF as it is
    assert int(np.argmax(int8)) == int(np.argmax(float32)) == int(np.argmax(q4_1)) == 3
    np.testing.assert_allclose(int8, float32, atol=0.5)  # mean log-probabilities, int8 vs float32
    np.testing.assert_allclose(q4_1, float32, atol=0.5)


def test_the_judgement_method_scores_yes_against_no(catalog, store):
    spec = catalog.get("smollm2-135m")
    judge = create_adapter(dataclasses.replace(spec, options={**spec.options,
                                                              "rerank": "judgement"}))
    judge.load(store.prepare(judge))
    try:
        scores = judge.rerank(RerankRequest("What is the capital of France?", DOCUMENTS)).scores
    finally:
        judge.unload()
    assert ((scores > 0) & (scores < 1)).all()  # P(yes) / (P(yes) + P(no)); this 135M model
    # cannot judge (every document gets about the same): query likelihood is its default.


def test_an_unknown_rerank_method_is_named(catalog, store):
    spec = catalog.get("smollm2-135m")
    odd = create_adapter(dataclasses.replace(spec, options={**spec.options, "rerank": "vibes"}),
                         "ctranslate2")
    odd.load(store.prepare(odd))
    try:
        with pytest.raises(ContractError, match="options.rerank 'vibes': one of"):
            odd.rerank(RerankRequest("q", ["d"]))
    finally:
        odd.unload()


@pytest.mark.slow
def test_one_node_serves_chat_and_reranking_from_one_model(tmp_path: Path):
    report_path, status = tmp_path / "report.json", tmp_path / "status.json"
    log = finish(start_dataflow(Path(__file__).parent / "dataflows" / "omni_model.yml",
                                {"REPORT": str(report_path), "STATUS_FILE": str(status)}), 300)
    report = json.loads(report_path.read_text())
    assert not report.get("timeout") and not report["errors"], report
    assert "Paris" in report["chat"]
    for query, best in report["queries"]:
        for reranker in ("llm", "minilm"):
            scores = report[reranker][query]
            assert max(range(4), key=scores.__getitem__) == best, (reranker, query, scores)
    nodes = {n["node"]: n for n in json.loads(status.read_text())["nodes"]}
    assert nodes["llm"]["model"] == "smollm2-135m" and nodes["llm"]["model_bytes"] > 0
    assert "loaded smollm2-135m" in log and log.count("llm: mofa_omni.node.residency: loaded") == 1
