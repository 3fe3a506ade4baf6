"""Stages: a model split into steps, fused in one process or spread over several nodes.

A *stage* is one step of a model (whisper's log-mel, encoder, decoder) or of a
composition (embeddings feeding a ranking). An adapter offers its stages by name
(``stages()``); a node runs a :class:`StagePipeline` of them, declared in the
dataflow as ``STAGES: "whisper-tiny.en:log_mel whisper-tiny.en:encode ..."``.

Inside one process a stage's output is handed to the next as the same object: an
MLX array is neither copied nor serialized. Where the YAML puts the stages in
separate nodes, the same stages meet through Arrow (:class:`~mofa_omni.contract.tasks.Tensor`
in dora's shared memory) — the stages themselves do not change.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np

from mofa_omni.contract.errors import ContractError, unknown_name_message
from mofa_omni.contract.tasks import RerankRequest, RerankResult, Tensor


@dataclass(frozen=True, slots=True)
class Stage:
    """One step: ``run`` takes a ``consumes`` and returns a ``produces``."""

    name: str
    consumes: type
    produces: type
    run: Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class StageRef:
    """``model:stage`` as written in STAGES, or a model-free ``stage`` (see BUILTIN_STAGES)."""

    model: str  # "" for a built-in stage
    stage: str

    @classmethod
    def parse(cls, text: str) -> StageRef:
        model, _, stage = text.rpartition(":")
        if not stage or ":" in model:
            raise ContractError(f"stage {text!r}: write it as MODEL:STAGE or as a built-in stage")
        return cls(model, stage)

    def __str__(self) -> str:
        return f"{self.model}:{self.stage}" if self.model else self.stage


def parse_stages(text: str) -> list[StageRef]:
    """The stage references of a STAGES setting (separated by spaces, commas or ``->``)."""
    refs = [StageRef.parse(part) for part in text.replace("->", " ").replace(",", " ").split()]
    if not refs:
        raise ContractError("STAGES names no stage")
    return refs


@dataclass(slots=True)
class Handoff:
    """What passed from one stage to the next in one run (kept for tests and benchmarks)."""

    producer: str
    consumer: str
    value: Any
    seconds: float  # from the producer returning to the consumer starting


@dataclass
class StagePipeline:
    """Stages run in order in this process, each output handed to the next as is."""

    stages: list[tuple[str, Stage]]  # (label, stage)
    observe: Callable[[Handoff], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for (label, stage), (next_label, following) in pairwise(self.stages):
            if stage.produces is not following.consumes:
                raise ContractError(f"stage {label} produces {stage.produces.__name__}, but "
                                    f"{next_label} takes {following.consumes.__name__}")

    @property
    def consumes(self) -> type:
        return self.stages[0][1].consumes

    @property
    def produces(self) -> type:
        return self.stages[-1][1].produces

    @property
    def label(self) -> str:
        return " -> ".join(label for label, _ in self.stages)

    def run(self, value: Any) -> Any:
        """Run every stage on ``value``; a stage's error names the stage."""
        previous = None
        for label, stage in self.stages:
            if previous is not None and self.observe is not None:
                self.observe(Handoff(previous[0], label, value, time.perf_counter() - previous[1]))
            try:
                value = stage.run(value)
            except ContractError as error:
                raise ContractError(f"stage {label}: {error}") from error
            previous = (label, time.perf_counter())
        return value


# --- built-in stages (no model) -----------------------------------------------------------

QUERY_AND_DOCUMENTS = "query_and_documents"  # Tensor kind: row 0 the query, then each document


def cosine_rank(vectors: Tensor) -> RerankResult:
    """Scores of each document row against the query row (unit vectors: the dot product)."""
    if vectors.kind != QUERY_AND_DOCUMENTS:
        raise ContractError(f"cosine_rank takes {QUERY_AND_DOCUMENTS!r} vectors, got {vectors.kind!r}")
    matrix = vectors.array
    if len(matrix.shape) != 2 or matrix.shape[0] < 2:
        raise ContractError(f"cosine_rank needs a query row and document rows, got shape "
                            f"{tuple(matrix.shape)}")
    scores = matrix[1:] @ matrix[0]
    return RerankResult(np.array(scores, dtype=np.float32))


BUILTIN_STAGES: dict[str, Stage] = {
    "cosine_rank": Stage("cosine_rank", Tensor, RerankResult, cosine_rank),
}


def builtin_stage(name: str) -> Stage:
    if name not in BUILTIN_STAGES:
        raise ContractError(unknown_name_message("built-in stage", name, list(BUILTIN_STAGES)))
    return BUILTIN_STAGES[name]


def embed_query_and_documents(embed: Callable[[list[str]], Any]) -> Stage:
    """The stage that embeds a rerank request's query and documents as one matrix."""

    def run(request: RerankRequest) -> Tensor:
        return Tensor(QUERY_AND_DOCUMENTS, embed([request.query, *request.documents]))

    return Stage("embed_query_and_documents", RerankRequest, Tensor, run)
