"""Reranking with a cross-encoder (BGE-Reranker, ms-marco MiniLM) in MLX: Metal on a Mac.

The same checkpoints as :mod:`mofa_omni.adapters.ort_cross_encoder` — a Hugging Face
``BertForSequenceClassification`` or ``XLMRobertaForSequenceClassification`` with one label —
read as they are (no conversion): mlx_bert's encoder under the checkpoint's own tensor names,
then the classifier head on the first token: BERT's pooler (dense, tanh) and classifier,
XLM-R's ``RobertaClassificationHead`` (dense, tanh, out_proj). Pairs, batches and scores are
:mod:`mofa_omni.adapters.cross_encoder`'s, as on ONNX Runtime. Float32 throughout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.cross_encoder import PairScorer, check_one_label, classifier_family
from mofa_omni.adapters.mlx_bert import BertEncoder, mx_load
from mofa_omni.adapters.options import AdapterOptions, CrossEncoderOptions
from mofa_omni.contract.errors import ModelLoadError
from mofa_omni.contract.tasks import Task
from mofa_omni.formats.bert import (
    FILES,
    check_checkpoint,
    copy_files,
    load_tokenizer,
    read_config,
    read_tensors,
    weight_files,
)
from mofa_omni.models.fetching import Progress


class _Pooler(nn.Module):
    """BERT's pooler: the first token through a dense layer and tanh."""

    def __init__(self, d: int):
        super().__init__()
        self.dense = nn.Linear(d, d)

    def __call__(self, first: mx.array) -> mx.array:
        return mx.tanh(self.dense(first))


class _RobertaHead(nn.Module):
    """XLM-R's classification head: dense, tanh, out_proj."""

    def __init__(self, d: int, labels: int):
        super().__init__()
        self.dense = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, labels)

    def __call__(self, first: mx.array) -> mx.array:
        return self.out_proj(mx.tanh(self.dense(first)))


class BertCrossEncoder(BertEncoder):
    """mlx_bert's encoder with a sequence-classification head; its parameter names are the
    checkpoint's (``pooler.dense``, ``classifier``, ``classifier.dense``/``out_proj``)."""

    def __init__(self, config: dict[str, Any], family: str, labels: int = 1):
        super().__init__(config)
        d = config["hidden_size"]
        self.family = family
        if family == "bert":
            self.pooler = _Pooler(d)
            self.classifier = nn.Linear(d, labels)
        else:
            self.classifier = _RobertaHead(d, labels)

    def logits(self, ids: mx.array, types: mx.array, attention_mask: mx.array) -> mx.array:
        first = super().__call__(ids, types, attention_mask)[:, 0]  # [CLS] / <s>
        if self.family == "bert":
            return self.classifier(self.pooler(first))
        return self.classifier(first)


class MlxCrossEncoderAdapter(PairScorer, ModelAdapter):
    """A one-label BERT/XLM-R sequence classifier scoring (query, document) pairs jointly, in
    MLX. Catalog options (:class:`~mofa_omni.adapters.options.CrossEncoderOptions`):
    ``max_length`` (tokens per pair, the document cut first), ``batch_size``, ``scores``
    ("sigmoid" or "logits"); ``threads`` is ONNX Runtime's (MLX sizes its own pool)."""

    supported_tasks: ClassVar[frozenset[Task]] = frozenset({Task.RERANK})
    formats: ClassVar[frozenset[str]] = frozenset({"safetensors"})
    backend: ClassVar[str] = "mlx"
    runtime_bytes: ClassVar[int] = 22 << 20  # as mlx_bert's: the same engine and tokenizer
    requires: ClassVar[tuple[str, ...]] = ("mlx", "tokenizers")
    Options: ClassVar[type[AdapterOptions]] = CrossEncoderOptions
    options: CrossEncoderOptions

    def __init__(self, spec):
        super().__init__(spec)
        self._model: BertCrossEncoder | None = None
        self._tokenizer: Any = None
        self._one_type = False
        self.max_length = 0

    def prepare(self, source_dir: Path, out_dir: Path, progress: Progress) -> None:
        classifier_family(self.spec.name, check_checkpoint(self.spec.name, source_dir))
        copy_files(source_dir, out_dir, [*FILES, *weight_files(self.spec.name, source_dir)],
                   progress)

    def _load(self, model_dir: Path) -> None:
        config = read_config(model_dir / "config.json")
        family = classifier_family(self.spec.name, config)
        tensors = read_tensors(self.spec.name, model_dir, mx_load)
        output = "classifier.weight" if family == "bert" else "classifier.out_proj.weight"
        if output not in tensors:
            raise ModelLoadError(f"model {self.spec.name!r}: the checkpoint lacks {output}")
        try:
            check_one_label(output.removesuffix(".weight"), tensors[output].shape[0])
        except ModelLoadError as error:
            raise ModelLoadError(f"model {self.spec.name!r}: {error}") from None
        model = BertCrossEncoder(config, family)
        wanted = dict(tree_flatten(model.parameters()))
        # Extra tensors (position_ids, an unused pooler beside XLM-R's head) are skipped.
        weights = {name: value.astype(mx.float32) for key, value in tensors.items()
                   if (name := BertEncoder.hf_name(key)) in wanted}
        missing = sorted(wanted.keys() - weights.keys())
        wrong = sorted(n for n, v in weights.items() if v.shape != wanted[n].shape)
        if missing or wrong:
            raise ModelLoadError(f"model {self.spec.name!r}: the checkpoint lacks "
                                 f"{', '.join(missing[:5]) or '-'}; wrong shape: "
                                 f"{', '.join(wrong[:5]) or '-'}")
        model.load_weights(list(weights.items()))
        mx.eval(model.parameters())
        self._tokenizer, self.max_length = load_tokenizer(model_dir, config,
                                                          self.options.max_length)
        self._one_type = int(config.get("type_vocab_size", 2)) == 1
        self._model = model

    def _unload(self) -> None:
        self._model = self._tokenizer = None

    def _logits(self, ids: np.ndarray, types: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self._model is None:
            raise self.not_loaded()
        out = self._model.logits(mx.array(ids.astype(np.int32)), mx.array(types.astype(np.int32)),
                                 mx.array(mask.astype(np.int32)))
        return np.array(out[:, 0])
