"""What the cross-encoder rerankers share, whatever engine runs them: which classifier head a
checkpoint has, how (query, document) pairs are tokenized and batched, and how logits become
scores.

A cross-encoder reads the query and one document together (``[CLS] query [SEP] document
[SEP]`` with token types 0 and 1 for BERT, ``<s> query </s></s> document </s>`` for XLM-R) and
gives one relevance logit per pair. Scores are the sigmoid of the logit (sentence-transformers'
CrossEncoder, Cohere's and Jina's relevance scores in (0, 1)), or the raw logit with the option
``scores = "logits"`` (what FlagEmbedding's BGE-Reranker ``compute_score`` returns unless asked
to normalise).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mofa_omni.adapters.options import CrossEncoderOptions
from mofa_omni.contract.errors import ModelLoadError
from mofa_omni.contract.tasks import RerankRequest, RerankResult
from mofa_omni.formats.bert import length_batches, padded

HEADS = {"BertForSequenceClassification": "bert",
         "XLMRobertaForSequenceClassification": "xlm-roberta",
         "RobertaForSequenceClassification": "xlm-roberta"}
# A batch of pairs -> one logit each: (ids, token types, attention mask), int64 (batch, longest)
BatchLogits = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def classifier_family(model: str, config: dict[str, Any]) -> str:
    """"bert" or "xlm-roberta", the checkpoint's head; ModelLoadError unless it is a
    ``BertForSequenceClassification`` or ``(XLM)RobertaForSequenceClassification``."""
    architectures = config.get("architectures") or []
    family = next((HEADS[a] for a in architectures if a in HEADS), None)
    if family is None:
        raise ModelLoadError(f"model {model!r}: architectures {architectures} name no "
                             f"cross-encoder this adapter runs ({', '.join(HEADS)})")
    return family


def check_one_label(output: str, labels: int) -> None:
    if labels != 1:
        raise ModelLoadError(f"a reranker has one label; {output}.weight has {labels}")


def score_pairs(requests: Sequence[RerankRequest], tokenizer, batch_size: int, one_type: bool,
                logits_of: BatchLogits, scores: str) -> list[RerankResult]:
    """Each document read with its request's query: the pairs of all ``requests`` batched
    together by length (a request of three documents fills a batch with others'), each
    batch's logits from ``logits_of``, then scored as ``scores`` says ("sigmoid" or
    "logits"); one result per request, in the order given. ``one_type``: the model has one
    token type (XLM-R), whatever the tokenizer says."""
    encodings = tokenizer.encode_batch([(request.query, document) for request in requests
                                        for document in request.documents])
    _, batches = length_batches([len(e.ids) for e in encodings], batch_size)
    logits = np.empty(len(encodings), np.float32)
    for batch in batches:
        ids, types, mask = padded([encodings[i] for i in batch])
        logits[batch] = logits_of(ids, np.zeros_like(types) if one_type else types, mask)
    if scores != "logits":
        logits = (1 / (1 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
    ends = np.cumsum([len(request.documents) for request in requests])
    return [RerankResult(part) for part in np.split(logits, ends[:-1])]


class PairScorer(ABC):
    """What a cross-encoder adapter serves, given its engine's logits (:meth:`_logits`):
    reranking one request, or several together (their pairs share batches)."""

    options: CrossEncoderOptions
    _tokenizer: Any
    _one_type: bool

    @abstractmethod
    def _logits(self, ids: np.ndarray, types: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """One logit per pair of a batch (raises the adapter's not-loaded error unloaded)."""

    def rerank(self, request: RerankRequest) -> RerankResult:
        """One score per document, from the query and that document read together; higher is
        more relevant."""
        return self.rerank_batch([request])[0]

    def rerank_batch(self, requests: Sequence[RerankRequest]) -> list[RerankResult]:
        """:meth:`rerank` of each request, their pairs scored in shared batches."""
        if self._tokenizer is None:
            raise self.not_loaded()  # type: ignore[attr-defined] -- the adapter's
        return score_pairs(requests, self._tokenizer, self.options.batch_size, self._one_type,
                           self._logits, self.options.scores)
