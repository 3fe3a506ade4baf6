"""Times benchmarks/dataflows/backends.yml's model nodes in steps the benchmark starts: once
$WORK/go-K exists, one request per task it names (comma-separated), one at a time, each timed
from sending it to its last result; then $WORK/done-K.json (task -> seconds). Ends after step
STEPS."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from dora import Node

from mofa_omni.contract import arrow
from mofa_omni.contract.tasks import (
    ChatMessage,
    ChatRequest,
    EmbeddingRequest,
    ErrorReport,
    SpeechRequest,
    TextChunk,
    TranscriptionRequest,
)
from mofa_omni.media.audio import read_wav

WORK = Path(os.environ["WORK"])
STEPS = int(os.environ["STEPS"])
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
    step, todo, timings = 0, [], {}
    waiting, sent_at = None, 0.0
    for event in node:
        if event["type"] != "INPUT":
            continue
        meta = event.get("metadata") or {}
        if waiting and event["id"].removesuffix("_error") in RESULT_INPUTS and \
                meta.get("request_id") == waiting and meta.get("final", True):
            if event["id"].endswith("_error"):
                raise RuntimeError(arrow.decode(event["value"], ErrorReport).message)
            seconds = time.perf_counter() - sent_at
            tokens = (arrow.decode(event["value"], TextChunk).completion_tokens
                      if event["id"] == "llm" else None)
            timings[todo.pop(0)] = [seconds, tokens]
            waiting = None
            if not todo:
                (WORK / f"done-{step}.json").write_text(json.dumps(timings))
                step, timings = step + 1, {}
                if step == STEPS:
                    break
        go = WORK / f"go-{step}"
        if not todo and waiting is None and go.exists():
            todo = go.read_text().split(",")
        if todo and waiting is None:
            waiting, sent_at = f"{todo[0]}-{step}", time.perf_counter()
            node.send_output(todo[0], encoded[todo[0]], {"request_id": waiting})


if __name__ == "__main__":
    main()
