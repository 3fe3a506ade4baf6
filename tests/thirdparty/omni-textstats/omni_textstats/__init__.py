"""A third-party adapter: counts words and stop-words, a task kind mofa-omni never heard of.

Its "weights" are a JSON file with a stop-word list, so it goes through the
same catalog → store → prepare → load path as any real model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.contract.errors import ModelLoadError
from mofa_omni.contract.tasks import GenericRequest, GenericResult, GenericSpec, Task

TEXT_STATS = GenericSpec(
    name="text.stats",
    input_schema=pa.schema([("text", pa.string())]),
    output_schema=pa.schema([("words", pa.int32()), ("stopwords", pa.int32())]),
)


class TextStatsAdapter(ModelAdapter):
    supported_tasks = frozenset({Task.GENERIC})
    formats = frozenset({"json"})
    backend = "python"

    def prepare(self, source_dir: Path, out_dir: Path, progress) -> None:
        (source,) = source_dir.glob("*.json")
        shutil.copy(source, out_dir / "stopwords.json")

    def _load(self, model_dir: Path) -> None:
        try:
            self.stopwords = set(json.loads((model_dir / "stopwords.json").read_text()))
        except ValueError as error:
            raise ModelLoadError(f"stopwords.json is not valid JSON: {error}") from error

    def _unload(self) -> None:
        del self.stopwords

    def generic_specs(self) -> list[GenericSpec]:
        return [TEXT_STATS]

    def run_generic(self, request: GenericRequest) -> GenericResult:
        words = [text.lower().split() for text in request.batch.column("text").to_pylist()]
        counts = pa.array([len(w) for w in words], pa.int32())
        stop = pa.array([sum(x in self.stopwords for x in w) for w in words], pa.int32())
        return GenericResult(TEXT_STATS.name, pa.RecordBatch.from_arrays(
            [counts, stop], schema=TEXT_STATS.output_schema))
