"""Times benchmarks/dataflows/backends.yml's model nodes: for each task in TASKS, a warm-up and
then REPEATS requests, one at a time, each from sending it to its last result. Writes
$WORK/backends.json: per task, the median latency and every latency."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from dora import Node

from mofa_omni import arrow
from mofa_omni.audio import read_wav
from mofa_omni.contract import (
    ChatMessage,
    ChatRequest,
    EmbeddingRequest,
    ErrorReport,
    SpeechRequest,
    TranscriptionRequest,
)

WORK = Path(os.environ["WORK"])
REPEATS = int(os.environ.get("REPEATS", "5"))
RESULT_INPUTS = {"asr": "speech_recognition", "llm": "text_generation",
                 "tts": "speech_synthesis", "embedder": "embedding"}


def requests() -> dict:
    audio, rate = read_wav(Path(os.environ["SAMPLE"]))
    return {
        "speech_recognition": TranscriptionRequest(audio, rate),
        "text_generation": ChatRequest([ChatMessage("user", os.environ["PROMPT"])],
                                       max_tokens=int(os.environ["MAX_TOKENS"])),
        "speech_synthesis": SpeechRequest(os.environ["SPOKEN"]),
        "embedding": EmbeddingRequest(json.loads(os.environ["SENTENCES"])),
    }


def main() -> None:
    node = Node()
    encoded = {task: arrow.encode(request) for task, request in requests().items()}
    plan = [(task, i) for task in os.environ["TASKS"].split(",") for i in range(REPEATS + 1)]
    latencies: dict[str, list[float]] = {}
    waiting, sent_at = None, 0.0
    for event in node:
        if event["type"] != "INPUT":
            continue
        meta = event.get("metadata") or {}
        if waiting and event["id"].removesuffix("_error") in RESULT_INPUTS and \
                meta.get("request_id") == waiting and meta.get("final", True):
            task, index = plan.pop(0)
            if event["id"].endswith("_error"):
                raise RuntimeError(arrow.decode(event["value"], ErrorReport).message)
            if index:  # the first one warms up
                latencies.setdefault(task, []).append(time.perf_counter() - sent_at)
            waiting = None
        if waiting is None:
            if not plan:
                break
            task, index = plan[0]
            waiting, sent_at = f"{task}-{index}", time.perf_counter()
            node.send_output(task, encoded[task], {"request_id": waiting})
    (WORK / "backends.json").write_text(json.dumps(
        {task: {"latency_s": round(statistics.median(values), 4), "latencies": values}
         for task, values in latencies.items()}))


if __name__ == "__main__":
    main()
