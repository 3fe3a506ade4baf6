"""Sentence embeddings from BERT-family encoders (all-MiniLM-L6-v2 and kin) on ONNX Runtime.

``prepare`` writes the checkpoint's encoder as an ONNX graph once (``model.onnx``: embeddings,
the layers, mean pooling over real tokens and L2 normalisation, as sentence-transformers does),
with the weights of ``model.safetensors`` as they are; no torch, no exporter: the graph is
spelled out below with ``onnx.helper``. Texts are tokenized and batched exactly as by the MLX
adapter (:mod:`mofa_omni.formats.bert`), so both embed alike. On a CPU ONNX Runtime runs this
encoder several times faster than MLX's CPU backend (``benchmarks/backends.py``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.onnx_session import cpu_session
from mofa_omni.contract.errors import ContractError, ModelLoadError
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
    DEFAULT_BATCH,
    check_checkpoint,
    copy_files,
    length_batches,
    load_tokenizer,
    padded,
    read_config,
)
from mofa_omni.models.store import Progress

GRAPH = "model.onnx"
OPSET = 17  # LayerNormalization is an operator from 17 on
INPUTS = ("input_ids", "token_type_ids", "attention_mask")


class OrtBertAdapter(ModelAdapter):
    """A BERT sentence-embedding model on ONNX Runtime: texts -> L2-normalised float32 vectors.

    Catalog options: ``max_length`` (tokens per text), ``batch_size`` (texts per run),
    ``threads`` (ONNX Runtime's intra-op threads; default: every core).
    """

    supported_tasks: ClassVar[frozenset[Task]] = frozenset({Task.EMBEDDING, Task.RERANK})
    formats: ClassVar[frozenset[str]] = frozenset({"safetensors"})
    backend: ClassVar[str] = "onnxruntime"
    requires: ClassVar[tuple[str, ...]] = ("onnxruntime", "onnx", "safetensors", "tokenizers")

    def __init__(self, spec):
        super().__init__(spec)
        self._session: Any = None
        self._tokenizer: Any = None
        self.max_length = 0
        self.dimension = 0  # the vectors' length, once loaded
        self.batch_size = int(spec.options.get("batch_size", DEFAULT_BATCH))

    def prepare(self, source_dir: Path, out_dir: Path, progress: Progress) -> None:
        config = check_checkpoint(self.spec.name, source_dir)
        weights = _read_weights(self.spec.name, source_dir / "model.safetensors")
        try:
            write_encoder_graph(config, weights, out_dir / GRAPH, progress)
        except ModelLoadError as error:  # a tensor the encoder needs is not in the checkpoint
            raise ModelLoadError(f"model {self.spec.name!r}: {error}") from None
        copy_files(source_dir, out_dir, ("config.json", "tokenizer.json"), progress)

    def _load(self, model_dir: Path) -> None:
        config = read_config(model_dir / "config.json")
        if not (model_dir / GRAPH).is_file():
            raise ModelLoadError(f"model {self.spec.name!r}: {model_dir / GRAPH} is missing")
        threads = int(self.spec.options.get("threads", os.cpu_count() or 1))
        try:
            # 32 texts of 256 tokens need ~300 MiB for attention scores: give it back after.
            self._session = cpu_session(model_dir / GRAPH, threads, model_name=self.spec.name,
                                        memory_arena=False)
        except (RuntimeError, ValueError) as error:  # onnxruntime's Fail/InvalidGraph
            raise ModelLoadError(f"model {self.spec.name!r}: ONNX Runtime cannot load "
                                 f"{model_dir / GRAPH}: {error}") from None
        self._tokenizer, self.max_length = load_tokenizer(model_dir, config, self.spec.options)
        self.dimension = int(config["hidden_size"])

    def _unload(self) -> None:
        self._session = self._tokenizer = None

    def embed(self, request: EmbeddingRequest) -> Embeddings:
        """Embed ``request.texts``: float32 (n, hidden), unit rows, in the order given."""
        return Embeddings(self._embed_texts(list(request.texts)))

    def rerank(self, request: RerankRequest) -> RerankResult:
        """Score each document by its cosine similarity with the query."""
        return cosine_rank(Tensor(QUERY_AND_DOCUMENTS,
                                  self._embed_texts([request.query, *request.documents])))

    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        if self._session is None:
            raise ContractError(f"model {self.spec.name!r} is not loaded")
        encodings = self._tokenizer.encode_batch(texts)
        _, batches = length_batches([len(e.ids) for e in encodings], self.batch_size)
        vectors = np.empty((len(texts), self.dimension), np.float32)
        for batch in batches:
            arrays = padded([encodings[i] for i in batch])
            (vectors[batch],) = self._session.run(None, dict(zip(INPUTS, arrays)))
        return vectors


def _read_weights(model: str, path: Path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors as float32, under BERT's names without a ``bert.`` prefix."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise ModelLoadError(f"model {model!r}: {path} is not readable safetensors: "
                             f"{error}") from None
    return {name.removeprefix("bert."): value.astype(np.float32) for name, value in tensors.items()}


def write_encoder_graph(config: dict[str, Any], weights: dict[str, np.ndarray], path: Path,
                        progress: Progress) -> None:
    """Write the encoder of ``config`` with ``weights`` (HF BERT names) as an ONNX graph:
    int64 (batch, tokens) ids, type ids and attention mask in, float32 (batch, hidden) unit
    sentence vectors out."""
    import onnx
    from onnx import TensorProto, helper

    graph = _GraphBuilder(weights)
    d, heads = config["hidden_size"], config["num_attention_heads"]
    eps = float(config.get("layer_norm_eps", 1e-12))
    layers = config["num_hidden_layers"]
    g = graph.node

    seq = g("Gather", [g("Shape", ["input_ids"]), graph.const(np.array(1, np.int64))])
    positions = g("Range", [graph.const(np.array(0, np.int64)), seq,
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

    # Mean over real tokens, then unit length.
    token_weights = g("Unsqueeze", [mask, graph.const(np.array([2], np.int64))])
    tokens_axis = graph.const(np.array([1], np.int64))
    total = g("ReduceSum", [g("Mul", [x, token_weights]), tokens_axis], keepdims=0)
    count = g("Max", [g("ReduceSum", [token_weights, tokens_axis], keepdims=0),
                      graph.const(np.array(1, np.float32))])
    mean = g("Div", [total, count])
    norm = g("Max", [g("ReduceL2", [mean], axes=[1], keepdims=1),
                     graph.const(np.array(1e-12, np.float32))])
    g("Div", [mean, norm], output="embeddings")

    dims = ["batch", "tokens"]
    model = helper.make_model(
        helper.make_graph(
            graph.nodes, "bert_sentence_embeddings",
            [helper.make_tensor_value_info(name, TensorProto.INT64, dims) for name in INPUTS],
            [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", d])],
            graph.initializers),
        opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mofa-omni")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _encoder_layer(graph: _GraphBuilder, prefix: str, x: str, key_bias: str, heads_shape: str,
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


class _GraphBuilder:
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
