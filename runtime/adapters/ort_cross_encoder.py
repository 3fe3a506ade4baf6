"""Reranking with a cross-encoder (BGE-Reranker, ms-marco MiniLM) on ONNX Runtime.

A cross-encoder reads the query and one document together and gives one relevance logit: far
better rankings than the cosine of two separate embeddings, one forward pass per document
(:mod:`mofa_omni.adapters.cross_encoder`: pairs, scores). The checkpoint is a Hugging Face
``BertForSequenceClassification`` or ``XLMRobertaForSequenceClassification`` with one label.
``prepare`` writes it as an ONNX graph once: ort_bert's encoder
(:func:`mofa_omni.adapters.ort_bert.encoder_states`), then the classifier head on the first
token: BERT's pooler (dense, tanh) and classifier; XLM-R's ``RobertaClassificationHead``
(dense, tanh, out_proj).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.cross_encoder import PairScorer, check_one_label, classifier_family
from mofa_omni.adapters.onnx_session import cpu_session
from mofa_omni.adapters.options import AdapterOptions, CrossEncoderOptions
from mofa_omni.adapters.ort_bert import (
    INPUTS,
    GraphBuilder,
    encoder_states,
    read_weights,
    save_graph,
)
from mofa_omni.contract.errors import ModelLoadError
from mofa_omni.contract.tasks import Task
from mofa_omni.formats.bert import check_checkpoint, copy_files, load_tokenizer, read_config
from mofa_omni.models.fetching import Progress

GRAPH = "model.onnx"


class OrtCrossEncoderAdapter(PairScorer, ModelAdapter):
    """A one-label BERT/XLM-R sequence classifier scoring (query, document) pairs jointly.

    Catalog options (:class:`~mofa_omni.adapters.options.CrossEncoderOptions`): ``max_length``
    (tokens per pair, the document cut first), ``batch_size``, ``threads``, ``scores``
    ("sigmoid" or "logits").
    """

    supported_tasks: ClassVar[frozenset[Task]] = frozenset({Task.RERANK})
    formats: ClassVar[frozenset[str]] = frozenset({"safetensors"})
    backend: ClassVar[str] = "onnxruntime"
    runtime_bytes: ClassVar[int] = 73 << 20  # as ort_bert's: the same engine and tokenizer
    requires: ClassVar[tuple[str, ...]] = ("onnxruntime", "onnx", "safetensors", "tokenizers")
    Options: ClassVar[type[AdapterOptions]] = CrossEncoderOptions
    options: CrossEncoderOptions

    def __init__(self, spec):
        super().__init__(spec)
        self._session: Any = None
        self._tokenizer: Any = None
        self._one_type = False
        self.max_length = 0

    def prepare(self, source_dir: Path, out_dir: Path, progress: Progress) -> None:
        config = check_checkpoint(self.spec.name, source_dir)
        family = classifier_family(self.spec.name, config)
        weights = read_weights(self.spec.name, source_dir)
        try:
            write_classifier_graph(config, family, weights, out_dir / GRAPH, progress)
        except ModelLoadError as error:  # a tensor the graph needs is not in the checkpoint
            raise ModelLoadError(f"model {self.spec.name!r}: {error}") from None
        copy_files(source_dir, out_dir, ("config.json", "tokenizer.json"), progress)

    def _load(self, model_dir: Path) -> None:
        config = read_config(model_dir / "config.json")
        threads = self.options.threads or os.cpu_count() or 1
        self._session = cpu_session(model_dir / GRAPH, threads, model_name=self.spec.name,
                                    memory_arena=False)
        self._tokenizer, self.max_length = load_tokenizer(model_dir, config,
                                                          self.options.max_length)
        # XLM-R has one token type: whatever a pair's tokenizer says, every type id is 0.
        self._one_type = int(config.get("type_vocab_size", 2)) == 1

    def _unload(self) -> None:
        self._session = self._tokenizer = None

    def _logits(self, ids: np.ndarray, types: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self._session is None:
            raise self.not_loaded()
        (out,) = self._session.run(None, dict(zip(INPUTS, (ids, types, mask))))
        return out[:, 0]


def write_classifier_graph(config: dict[str, Any], family: str, weights: dict[str, np.ndarray],
                           path: Path, progress: Progress) -> None:
    """Write the encoder and the classifier head of ``family`` as an ONNX graph: the encoder's
    inputs in, float32 (batch, 1) logits out."""
    graph = GraphBuilder(weights)
    g = graph.node
    states = encoder_states(graph, config, progress)
    first = g("Gather", [states, graph.const(np.array(0, np.int64))], axis=1)  # [CLS] / <s>
    output = "classifier" if family == "bert" else "classifier.out_proj"
    check_one_label(output, graph.array_of(f"{output}.weight").shape[0])
    if family == "bert":
        pooled = g("Tanh", [graph.dense(first, "pooler.dense")])
        g("Identity", [graph.dense(pooled, "classifier")], output="logits")
    else:
        hidden = g("Tanh", [graph.dense(first, "classifier.dense")])
        g("Identity", [graph.dense(hidden, "classifier.out_proj")], output="logits")
    save_graph(graph, path, f"{family}_cross_encoder", ("logits", ["batch", 1]))
