"""Reranking with a chat LLM, in the two ways LLM-based rerankers work.

``judgement`` (for models trained to judge, e.g. Qwen3-Reranker): the model reads
the query and a document through its chat template, is asked whether the
document answers the query, and the score is the probability it gives "yes"
against "no" as its next token (every casing and leading-space variant counted).

``query_likelihood`` (for general chat models; Sachan et al., "Improving Passage
Retrieval with Zero-Shot Question Generation", 2022): the score is the mean
log-probability of the query's tokens after the document — how well the
document explains the query. Small instruct models that cannot judge (measured:
SmolLM2-135M and Gemma-3-270M give every document about the same "yes") still
rank by it.

The catalog picks one per model (``options.rerank``; default ``query_likelihood``).
Backends only supply token log-probabilities (:class:`TokenScorer`), so the
prompts and the scoring are the same on MLX and CTranslate2.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import ChatMessage, ChatRequest, RerankRequest, validate_request

METHODS = ("query_likelihood", "judgement")
JUDGE = ("You judge search results. Answer only \"yes\" if the document answers the query, "
         "or \"no\" if it does not.")
BATCH = 8  # documents scored in one forward pass


class TokenScorer(Protocol):
    def next_log_probs(self, prompts: list[list[int]]) -> np.ndarray:
        """Log-probabilities of the token after each prompt: (len(prompts), vocab)."""

    def sequence_log_probs(self, sequences: list[list[int]]) -> list[np.ndarray]:
        """For each sequence, log P(token t | tokens before t) for t = 1 .. len - 1."""

    def continuation_log_probs(self, prefix: list[int],
                               continuations: list[list[int]]) -> list[np.ndarray]:
        """For each continuation, log P of each of its tokens after ``prefix`` and the
        continuation's tokens before it."""


def rerank_method(method: str) -> str:
    """``method`` (the model's ``options.rerank``) once it is one of METHODS."""
    if method not in METHODS:
        raise ContractError(f"options.rerank {method!r}: one of {', '.join(METHODS)}")
    return method


def relevance_scores(request: RerankRequest, tokenizer, scorer: TokenScorer,
                     method: str) -> np.ndarray:
    """One score per document, in the order given (higher: more relevant)."""
    validate_request(request)
    score = _judgement if method == "judgement" else _query_likelihood
    documents = list(request.documents)
    return np.concatenate([score(request.query, documents[i:i + BATCH], tokenizer, scorer)
                           for i in range(0, len(documents), BATCH)]).astype(np.float32)


def _judgement(query: str, documents: list[str], tokenizer, scorer: TokenScorer) -> np.ndarray:
    """P(yes) / (P(yes) + P(no))."""
    from mofa_omni.adapters.chat import chat_prompt_tokens

    yes, no = answer_ids(tokenizer)
    prompts = [chat_prompt_tokens(tokenizer, ChatRequest([
        ChatMessage("system", JUDGE),
        ChatMessage("user", f"Query: {query}\n\nDocument: {document}\n\n"
                            "Does the document answer the query?")])) for document in documents]
    log_probs = scorer.next_log_probs(prompts)
    p_yes = np.logaddexp.reduce(log_probs[:, yes], axis=1)
    p_no = np.logaddexp.reduce(log_probs[:, no], axis=1)
    return 1.0 / (1.0 + np.exp(p_no - p_yes))


def _query_likelihood(query: str, documents: list[str], tokenizer,
                      scorer: TokenScorer) -> np.ndarray:
    """The mean log-probability of the query's tokens, written after the document."""
    asked = tokenizer.encode(" " + query.strip(), add_special_tokens=False)
    sequences = [tokenizer.encode(f"Passage: {document}\nPlease write a question based on this "
                                  "passage.\nQuestion:", add_special_tokens=False) + asked
                 for document in documents]
    return np.array([float(np.mean(scores[-len(asked):]))
                     for scores in scorer.sequence_log_probs(sequences)])


def answer_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The ids of the single tokens that start a "yes" and a "no" answer."""
    def ids(word: str) -> list[int]:
        found = set()
        for variant in (word, word.capitalize(), " " + word, " " + word.capitalize()):
            encoded = tokenizer.encode(variant, add_special_tokens=False)
            if len(encoded) == 1:
                found.add(encoded[0])
        return sorted(found)

    yes, no = ids("yes"), ids("no")
    if not yes or not no:
        raise ContractError("this model's tokenizer has no single token for yes / no: "
                            "rerank it by query_likelihood")
    return yes, no
