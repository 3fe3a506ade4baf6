"""Sentence embeddings from BERT-family encoders (all-MiniLM-L6-v2 and kin) on ONNX Runtime.

``prepare`` writes the checkpoint's encoder (BERT or XLM-RoBERTa) as an ONNX graph once
(``model.onnx``: embeddings and the layers, token states out), with the weights of
``model.safetensors`` as they are; no torch, no exporter: the graph is spelled out below with
``onnx.helper``. Texts are tokenized, batched, pooled and normalised exactly as by the MLX
adapter (:mod:`mofa_omni.formats.bert`, :mod:`mofa_omni.formats.sentence_transformers`), so
both embed alike. On a CPU ONNX Runtime runs this
encoder several times faster than MLX's CPU backend (``benchmarks/backends.py``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.onnx_session import cpu_session
from mofa_omni.adapters.options import AdapterOptions, BertOptions
from mofa_omni.contract.errors import ModelLoadError
from mofa_omni.contract.stages import QUERY_AND_DOCUMENTS, cosine_rank
from mofa_omni.contract.tasks import (
    EmbeddingRequest,
    Embeddings,
    RerankRequest,
    RerankResult,
    Task,
    Tensor,
)
from mofa_omni.formats.bert import (
    check_checkpoint,
    copy_files,
    encode,
    encoder_name,
    length_batches,
    load_tokenizer,
    padded,
    position_offset,
    read_config,
    read_tensors,
)
from mofa_omni.formats.sentence_transformers import (
    SentencePipeline,
    configured_pipeline,
    files_of,
    pool,
    read_pipeline,
)
from mofa_omni.models.fetching import Progress

GRAPH = "model.onnx"
OPSET = 17  # LayerNormalization is an operator from 17 on
INPUTS = ("input_ids", "token_type_ids", "attention_mask")


class OrtBertAdapter(ModelAdapter):
    """A BERT sentence-embedding model on ONNX Runtime: texts -> float32 sentence vectors (unit
    length unless its sentence-transformers files or options say otherwise).

    Catalog options (:class:`~mofa_omni.adapters.options.BertOptions`): ``max_length`` (tokens
    per text), ``batch_size`` (texts per run), ``threads`` (ONNX Runtime's intra-op threads;
    default: every core), ``pooling``, ``normalize``, ``query_prefix``, ``document_prefix``.
    """

    supported_tasks: ClassVar[frozenset[Task]] = frozenset({Task.EMBEDDING, Task.RERANK})
    formats: ClassVar[frozenset[str]] = frozenset({"safetensors"})
    backend: ClassVar[str] = "onnxruntime"
    runtime_bytes: ClassVar[int] = 73 << 20  # measured on MiniLM-L6 embedding 16 sentences
    requires: ClassVar[tuple[str, ...]] = ("onnxruntime", "onnx", "safetensors", "tokenizers")
    Options: ClassVar[type[AdapterOptions]] = BertOptions
    options: BertOptions
    artifact_version: ClassVar[int] = 2  # 2: token states out (pooled here), ST files copied

    def __init__(self, spec):
        super().__init__(spec)
        self._session: Any = None
        self._tokenizer: Any = None
        self.max_length = 0
        self.dimension = 0  # the vectors' length, once loaded
        self.batch_size = self.options.batch_size
        self.pipeline = SentencePipeline()

    def prepare(self, source_dir: Path, out_dir: Path, progress: Progress) -> None:
        config = check_checkpoint(self.spec.name, source_dir)
        read_pipeline(source_dir)  # refused now rather than at load: a module it cannot run
        weights = read_weights(self.spec.name, source_dir)
        try:
            write_encoder_graph(config, weights, out_dir / GRAPH, progress)
        except ModelLoadError as error:  # a tensor the encoder needs is not in the checkpoint
            raise ModelLoadError(f"model {self.spec.name!r}: {error}") from None
        copy_files(source_dir, out_dir, ["config.json", "tokenizer.json", *files_of(source_dir)],
                   progress)

    def _load(self, model_dir: Path) -> None:
        config = read_config(model_dir / "config.json")
        threads = self.options.threads or os.cpu_count() or 1
        # 32 texts of 256 tokens need ~300 MiB for attention scores: give it back after.
        self._session = cpu_session(model_dir / GRAPH, threads, model_name=self.spec.name,
                                    memory_arena=False)
        self._tokenizer, self.max_length = load_tokenizer(model_dir, config,
                                                          self.options.max_length)
        self.pipeline = configured_pipeline(model_dir, self.options)
        self.dimension = int(config["hidden_size"]) * len(self.pipeline.pooling)

    def _unload(self) -> None:
        self._session = self._tokenizer = None

    def embed(self, request: EmbeddingRequest) -> Embeddings:
        """Embed ``request.texts`` (after the prompt of ``request.input_type``, if the model has
        one): float32 (n, dimension), in the order given."""
        return Embeddings(self._embed_texts(list(request.texts), request.input_type))

    def rerank(self, request: RerankRequest) -> RerankResult:
        """Score each document by its cosine similarity with the query (embedded as a query,
        the documents as documents)."""
        return self.rerank_batch([request])[0]

    def rerank_batch(self, requests: Sequence[RerankRequest]) -> list[RerankResult]:
        """:meth:`rerank` of each request: their queries embedded in one call, their
        documents in another."""
        queries = self._embed_texts([r.query for r in requests], "query", normalize=True)
        documents = self._embed_texts([d for r in requests for d in r.documents], "document",
                                      normalize=True)
        ends = np.cumsum([len(r.documents) for r in requests])
        return [cosine_rank(Tensor(QUERY_AND_DOCUMENTS, np.concatenate([query[None], own])))
                for query, own in zip(queries, np.split(documents, ends[:-1]), strict=True)]

    def _embed_texts(self, texts: list[str], input_type: str | None = None,
                     normalize: bool | None = None) -> np.ndarray:
        if self._session is None:
            raise self.not_loaded()
        encodings = encode(self._tokenizer, texts, self.pipeline.prefix(input_type))
        _, batches = length_batches([len(e.ids) for e in encodings], self.batch_size)
        unit = self.pipeline.normalize if normalize is None else normalize
        vectors = np.empty((len(texts), self.dimension), np.float32)
        for batch in batches:
            arrays = padded([encodings[i] for i in batch])
            (states,) = self._session.run(None, dict(zip(INPUTS, arrays)))
            vectors[batch] = pool(states, arrays[2], self.pipeline.pooling, unit)
        return vectors


def read_weights(model: str, folder: Path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors (one file or shards) as float32, under BERT's names without a
    ``bert.``/``roberta.`` prefix."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    def load(path: Path) -> dict[str, np.ndarray]:
        try:
            return load_file(str(path))
        except (OSError, SafetensorError) as error:
            raise ModelLoadError(f"model {model!r}: {path} is not readable safetensors: "
                                 f"{error}") from None

    tensors = read_tensors(model, folder, load)
    return {encoder_name(name): value.astype(np.float32) for name, value in tensors.items()}


def write_encoder_graph(config: dict[str, Any], weights: dict[str, np.ndarray], path: Path,
                        progress: Progress) -> None:
    """Write the encoder of ``config`` with ``weights`` (HF BERT names) as an ONNX graph:
    int64 (batch, tokens) ids, type ids and attention mask in, float32 (batch, tokens, hidden)
    token states out (``token_states``)."""
    graph = GraphBuilder(weights)
    states = encoder_states(graph, config, progress)
    graph.node("Identity", [states], output="token_states")
    save_graph(graph, path, "bert_token_states", ("token_states", ["batch", "tokens",
                                                                   config["hidden_size"]]))


def save_graph(graph: GraphBuilder, path: Path, name: str,
               output: tuple[str, list[str | int]]) -> None:
    """Check and save ``graph``, the encoder's inputs in and one float32 ``output`` (its name
    and dimensions) out."""
    import onnx
    from onnx import TensorProto, helper

    dims = ["batch", "tokens"]
    model = helper.make_model(
        helper.make_graph(
            graph.nodes, name,
            [helper.make_tensor_value_info(input_name, TensorProto.INT64, dims)
             for input_name in INPUTS],
            [helper.make_tensor_value_info(output[0], TensorProto.FLOAT, output[1])],
            graph.initializers),
        opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mofa-omni")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def encoder_states(graph: GraphBuilder, config: dict[str, Any], progress: Progress) -> str:
    """Add the encoder of ``config`` to ``graph``, from its inputs (:data:`INPUTS`) to the
    last layer's token states; returns their name."""
    from onnx import TensorProto

    d, heads = config["hidden_size"], config["num_attention_heads"]
    eps = float(config.get("layer_norm_eps", 1e-12))
    layers = config["num_hidden_layers"]
    g = graph.node

    seq = g("Gather", [g("Shape", ["input_ids"]), graph.const(np.array(1, np.int64))])
    offset = position_offset(config)  # XLM-R's positions start after its padding index
    positions = g("Range", [graph.const(np.array(offset, np.int64)),
                            g("Add", [seq, graph.const(np.array(offset, np.int64))]),
                            graph.const(np.array(1, np.int64))])
    summed = g("Add", [g("Add", [g("Gather", [graph.weight("embeddings.word_embeddings.weight"),
                                              "input_ids"]),
                                 g("Gather", [graph.weight(
                                     "embeddings.position_embeddings.weight"), positions])]),
                       g("Gather", [graph.weight("embeddings.token_type_embeddings.weight"),
                                    "token_type_ids"])])
    x = graph.layer_norm(summed, "embeddings.LayerNorm", eps)
    mask = g("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    # Padded keys get -1e9 scores, so padding never changes a real token's output.
    key_bias = g("Unsqueeze", [g("Mul", [g("Sub", [graph.const(np.array(1, np.float32)), mask]),
                                         graph.const(np.array(-1e9, np.float32))]),
                               graph.const(np.array([1, 2], np.int64))])
    heads_shape = graph.const(np.array([0, 0, heads, d // heads], np.int64))
    for i in range(layers):
        x = _encoder_layer(graph, f"encoder.layer.{i}", x, key_bias, heads_shape, d, heads, eps)
        progress("write ONNX graph", i + 1, layers)

    return x


def _encoder_layer(graph: GraphBuilder, prefix: str, x: str, key_bias: str, heads_shape: str,
                   d: int, heads: int, eps: float) -> str:
    g = graph.node
    scale = 1.0 / math.sqrt(d // heads)
    # Query, key and value in one product; the query pre-scaled, which saves a multiplication.
    attention = f"{prefix}.attention.self"
    qkv_weight = np.concatenate([graph.array_of(f"{attention}.query.weight") * scale,
                                 graph.array_of(f"{attention}.key.weight"),
                                 graph.array_of(f"{attention}.value.weight")]).T
    qkv_bias = np.concatenate([graph.array_of(f"{attention}.query.bias") * scale,
                               graph.array_of(f"{attention}.key.bias"),
                               graph.array_of(f"{attention}.value.bias")])
    qkv = g("Add", [g("MatMul", [x, graph.const(np.ascontiguousarray(qkv_weight))]),
                    graph.const(qkv_bias)])
    q, k, v = g("Split", [qkv, graph.const(np.array([d, d, d], np.int64))], axis=2, outputs=3)

    def split_heads(t: str, perm: list[int]) -> str:
        return g("Transpose", [g("Reshape", [t, heads_shape])], perm=perm)

    scores = g("Add", [g("MatMul", [split_heads(q, [0, 2, 1, 3]), split_heads(k, [0, 2, 3, 1])]),
                       key_bias])
    context = g("MatMul", [g("Softmax", [scores], axis=-1), split_heads(v, [0, 2, 1, 3])])
    merged = g("Reshape", [g("Transpose", [context], perm=[0, 2, 1, 3]),
                           graph.const(np.array([0, 0, d], np.int64))])
    x = graph.layer_norm(g("Add", [graph.dense(merged, f"{prefix}.attention.output.dense"), x]),
                         f"{prefix}.attention.output.LayerNorm", eps)
    hidden = graph.dense(x, f"{prefix}.intermediate.dense")
    # HF's "gelu" is the exact one: x * (1 + erf(x / sqrt 2)) / 2
    gelu = g("Mul", [g("Mul", [hidden, graph.const(np.array(0.5, np.float32))]),
                     g("Add", [graph.const(np.array(1, np.float32)),
                               g("Erf", [g("Div", [hidden, graph.const(
                                   np.array(math.sqrt(2), np.float32))])])])])
    return graph.layer_norm(g("Add", [graph.dense(gelu, f"{prefix}.output.dense"), x]),
                            f"{prefix}.output.LayerNorm", eps)


class GraphBuilder:
    """Nodes and initializers of one ONNX graph, each value named once."""

    def __init__(self, weights: dict[str, np.ndarray]):
        self.weights = weights
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def array_of(self, name: str) -> np.ndarray:
        """The checkpoint tensor ``name``; ModelLoadError if it has none."""
        if name not in self.weights:
            raise ModelLoadError(f"model.safetensors lacks {name}")
        return self.weights[name]

    def const(self, array: np.ndarray) -> str:
        name = self._name("const")
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, name: str) -> str:
        return self.const(self.array_of(name))

    def node(self, op: str, inputs: list[str], output: str | None = None, outputs: int = 1,
             **attributes):
        """Add ``op``; returns its output's name (a list of ``outputs`` names if several)."""
        names = [output] if output else [self._name(op.lower()) for _ in range(outputs)]
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, names, **attributes))
        return names[0] if len(names) == 1 else names

    def dense(self, x: str, prefix: str) -> str:
        """``x @ W.T + b`` of the checkpoint's linear layer ``prefix``."""
        weight = np.ascontiguousarray(self.array_of(f"{prefix}.weight").T)
        return self.node("Add", [self.node("MatMul", [x, self.const(weight)]),
                                 self.weight(f"{prefix}.bias")])

    def layer_norm(self, x: str, prefix: str, eps: float) -> str:
        return self.node("LayerNormalization", [x, self.weight(f"{prefix}.weight"),
                                                self.weight(f"{prefix}.bias")],
                         axis=-1, epsilon=eps)
