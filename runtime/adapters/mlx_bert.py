"""Sentence embeddings from BERT-family encoders (all-MiniLM-L6-v2 and kin) in MLX.

The encoder is built from a Hugging Face ``config.json`` (BERT, or XLM-RoBERTa) and loads
the checkpoint's ``model.safetensors`` under its own names; texts are tokenized with
``tokenizer.json`` (after the prompt of their input type, if the model has one), and pooled and
normalised as the checkpoint's sentence-transformers files say (mean and unit length without
them), with :func:`mofa_omni.formats.sentence_transformers.pool`, as ort_bert does. Everything
stays float32 (float16 is very slow on a CPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.options import BertOptions
from mofa_omni.contract.errors import ModelLoadError
from mofa_omni.contract.stages import (
    QUERY_AND_DOCUMENTS,
    Stage,
    cosine_rank,
    embed_query_and_documents,
)
from mofa_omni.contract.tasks import (
    EmbeddingRequest,
    Embeddings,
    RerankRequest,
    RerankResult,
    Task,
    Tensor,
)
from mofa_omni.formats.bert import (
    FILES,
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
    weight_files,
)
from mofa_omni.formats.sentence_transformers import (
    SentencePipeline,
    configured_pipeline,
    files_of,
    pool,
    read_pipeline,
)
from mofa_omni.models.fetching import Progress


class _Embeddings(nn.Module):
    def __init__(self, c: dict[str, Any]):
        super().__init__()
        d = c["hidden_size"]
        self.word_embeddings = nn.Embedding(c["vocab_size"], d)
        self.position_embeddings = nn.Embedding(c["max_position_embeddings"], d)
        self.token_type_embeddings = nn.Embedding(c.get("type_vocab_size", 2), d)
        self.LayerNorm = nn.LayerNorm(d, eps=c.get("layer_norm_eps", 1e-12))
        self.offset = position_offset(c)  # XLM-R's positions start after its padding index

    def __call__(self, ids: mx.array, types: mx.array) -> mx.array:
        positions = mx.arange(ids.shape[1]) + self.offset
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(positions)
                              + self.token_type_embeddings(types))


class _DenseNorm(nn.Module):
    """BERT's output block: projection, then layer norm over the residual sum."""

    def __init__(self, d_in: int, d: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.output = _DenseNorm(d, d, eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        b, n, d = x.shape

        def split(t: mx.array) -> mx.array:
            return t.reshape(b, n, self.heads, -1).transpose(0, 2, 1, 3)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scale = (d // self.heads) ** -0.5
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        return self.output(out.transpose(0, 2, 1, 3).reshape(b, n, d), x)


class _Layer(nn.Module):
    def __init__(self, c: dict[str, Any]):
        super().__init__()
        d, eps = c["hidden_size"], c.get("layer_norm_eps", 1e-12)
        self.attention = _Attention(d, c["num_attention_heads"], eps)
        self.intermediate = nn.Linear(d, c["intermediate_size"])
        self.output = _DenseNorm(c["intermediate_size"], d, eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = self.attention(x, mask)
        return self.output(nn.gelu(self.intermediate(x)), x)  # HF "gelu" is the exact (erf) one


def mx_load(path: Path) -> dict[str, mx.array]:
    """One safetensors file's tensors, as MLX arrays."""
    return mx.load(str(path))


class BertEncoder(nn.Module):
    """A BERT encoder whose parameter names follow the HF checkpoint (see ``hf_name``)."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.embeddings = _Embeddings(config)
        self.layers = [_Layer(config) for _ in range(config["num_hidden_layers"])]

    def __call__(self, ids: mx.array, types: mx.array, attention_mask: mx.array) -> mx.array:
        # Padded keys get -inf-like scores, so padding never changes a real token's output.
        bias = (1.0 - attention_mask[:, None, None, :].astype(mx.float32)) * -1e9
        x = self.embeddings(ids, types)
        for layer in self.layers:
            x = layer(x, bias)
        return x

    @staticmethod
    def hf_name(name: str) -> str:
        """The MLX parameter name of the HF checkpoint tensor ``name``."""
        return (encoder_name(name).replace("encoder.layer.", "layers.")
                .replace(".attention.self.", ".attention.")
                .replace(".intermediate.dense.", ".intermediate."))


class MlxBertAdapter(ModelAdapter):
    """A BERT sentence-embedding model in MLX: texts -> float32 sentence vectors (unit length
    unless its sentence-transformers files or options say otherwise)."""

    supported_tasks = frozenset({Task.EMBEDDING, Task.RERANK})
    formats = frozenset({"safetensors"})
    backend = "mlx"
    runtime_bytes = 22 << 20  # measured on MiniLM-L6 embedding 16 sentences
    Options = BertOptions  # max_length, batch_size, pooling, prompts; threads is ort_bert's
    options: BertOptions
    artifact_version = 2  # 2: the sentence-transformers files copied along

    def __init__(self, spec):
        super().__init__(spec)
        self._model: BertEncoder | None = None
        self._tokenizer = None
        self.max_length = 0
        self.batch_size = self.options.batch_size
        self.pipeline = SentencePipeline()

    def prepare(self, source_dir: Path, out_dir: Path, progress: Progress) -> None:
        check_checkpoint(self.spec.name, source_dir)
        read_pipeline(source_dir)  # refused now rather than at load: a module it cannot run
        copy_files(source_dir, out_dir, [*FILES, *weight_files(self.spec.name, source_dir),
                                         *files_of(source_dir)], progress)

    def _load(self, model_dir: Path) -> None:
        config = read_config(model_dir / "config.json")
        model = BertEncoder(config)
        wanted = {name for name, _ in tree_flatten(model.parameters())}
        # Extra tensors (position_ids, a pooler head) are not part of the encoder: skip them.
        weights = {name: v.astype(mx.float32)
                   for k, v in read_tensors(self.spec.name, model_dir, mx_load).items()
                   if (name := BertEncoder.hf_name(k)) in wanted}
        missing = wanted - weights.keys()
        if missing:
            raise ModelLoadError(f"model {self.spec.name!r}: the checkpoint lacks "
                                 f"{', '.join(sorted(missing)[:5])}")
        model.load_weights(list(weights.items()))
        mx.eval(model.parameters())
        self.pipeline = configured_pipeline(model_dir, self.options)
        self._tokenizer, self.max_length = load_tokenizer(model_dir, config,
                                                          self.options.max_length)
        self._model = model

    def _unload(self) -> None:
        self._model = None
        self._tokenizer = None

    @property
    def dimension(self) -> int:
        """Length of the embedding vectors (hidden size times the pooling modes)."""
        return self._model.embeddings.LayerNorm.weight.shape[0] * len(self.pipeline.pooling)

    def embed(self, request: EmbeddingRequest) -> Embeddings:
        """Embed ``request.texts`` (after the prompt of ``request.input_type``, if the model has
        one): float32 (n, dimension), in the order given."""
        return Embeddings(np.array(self._embed_texts(list(request.texts), request.input_type),
                                   dtype=np.float32))

    def rerank(self, request: RerankRequest) -> RerankResult:
        """Score each document by its cosine similarity with the query (embedded as a query,
        the documents as documents)."""
        return cosine_rank(Tensor(QUERY_AND_DOCUMENTS,
                                  self._query_and_documents([request.query, *request.documents])))

    def stages(self) -> dict[str, Stage]:
        return {"embed_query_and_documents": embed_query_and_documents(self._query_and_documents)}

    def _query_and_documents(self, texts: list[str]) -> mx.array:
        """Unit vectors of a query (``texts[0]``) and its documents, each with its prompt."""
        return mx.concatenate([self._embed_texts(texts[:1], "query", normalize=True),
                               self._embed_texts(texts[1:], "document", normalize=True)])

    def _embed_texts(self, texts: list[str], input_type: str | None = None,
                     normalize: bool | None = None) -> mx.array:
        """Vectors of ``texts`` as one MLX matrix, rows in the order given; unit length if
        ``normalize`` (unset: as the model's pipeline says)."""
        if self._model is None:
            raise self.not_loaded()
        if not texts:
            return mx.zeros((0, self.dimension), mx.float32)
        encodings = encode(self._tokenizer, texts, self.pipeline.prefix(input_type))
        order, batches = length_batches([len(e.ids) for e in encodings], self.batch_size)
        unit = self.pipeline.normalize if normalize is None else normalize
        vectors = np.concatenate([self._embed_batch([encodings[i] for i in batch], unit)
                                  for batch in batches])
        vectors = mx.array(vectors[np.argsort(order)])  # back to the order given
        mx.eval(vectors)
        return vectors

    def _embed_batch(self, encodings: list, normalize: bool) -> np.ndarray:
        ids, types, mask = padded(encodings)
        hidden = self._model(mx.array(ids.astype(np.int32)), mx.array(types.astype(np.int32)),
                             mx.array(mask.astype(np.int32)))
        return pool(np.asarray(hidden), mask, self.pipeline.pooling, normalize)
