"""Drives tests/dataflows/chain.yml and writes what happened to $REPORT as JSON."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow as pa
from dora import Node

from mofa_omni.contract import arrow
from mofa_omni.contract.tasks import (
    AudioChunk,
    ChatMessage,
    ChatRequest,
    EmbeddingRequest,
    Embeddings,
    ErrorReport,
    SpeechRequest,
    TextChunk,
    Transcript,
    TranscriptionRequest,
)

QUESTION = "What is the capital of France?"
DEADLINE_S = float(os.environ.get("DEADLINE_S", "240"))


def main() -> None:
    node = Node()
    report: dict = {"errors": [], "speech_chunks": 0, "reply_chunks": 0, "metadata": []}
    audio: list[np.ndarray] = []
    reply = ""
    started = time.monotonic()
    sent_first = False
    bad_sent = False

    def send(output: str, message, request_id: str) -> None:
        node.send_output(output, arrow.encode(message),
                         {"request_id": request_id, "origin_ns": time.time_ns()})

    for event in node:
        if event["type"] != "INPUT":
            continue
        if time.monotonic() - started > DEADLINE_S:
            report["timeout"] = True
            break
        kind, value, meta = event["id"], event["value"], event.get("metadata") or {}
        if kind == "tick" and not sent_first:
            sent_first = True
            send("speak", SpeechRequest(QUESTION), "turn-1")
        elif kind == "speech":
            chunk = arrow.decode(value, AudioChunk)
            audio.append(chunk.audio.copy())
            report["speech_chunks"] += 1
            report["sample_rate"] = chunk.sample_rate
            if chunk.final:
                send("hear", TranscriptionRequest(np.concatenate(audio), chunk.sample_rate),
                     "turn-1")
        elif kind == "transcript":
            heard = arrow.decode(value, Transcript).text.strip()
            report["heard"] = heard
            send("ask", ChatRequest([ChatMessage("system", "Answer in one sentence."),
                                      ChatMessage("user", heard)], max_tokens=48), "turn-1")
        elif kind == "reply":
            chunk = arrow.decode(value, TextChunk)
            reply += chunk.text
            report["reply_chunks"] += 1
            report["metadata"].append({key: meta.get(key) for key in
                                       ("request_id", "seq", "final", "origin_ns", "sent_ns")})
            if chunk.final:
                report["reply"] = reply
                send("embed", EmbeddingRequest([QUESTION, reply, "The stock market fell."]),
                     "turn-1")
        elif kind == "vectors":
            vectors = arrow.decode(value, Embeddings).vectors
            report["similarity"] = [float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])]
            # Bad input: empty audio, float64 audio, an empty chat. Each must come back as an error.
            send("hear", TranscriptionRequest(np.zeros(0, np.float32), 16000), "bad-empty-audio")
            wrong = pa.StructArray.from_arrays(
                [pa.array([[0.1, 0.2]], pa.list_(pa.float64())), pa.array([16000], pa.int32()),
                 pa.array([""])], names=["audio", "sample_rate", "language"])
            node.send_output("hear", wrong, {"request_id": "bad-float64-audio"})
            send("ask", ChatRequest([]), "bad-empty-chat")
            bad_sent = True
        elif kind.endswith("_error"):
            error = arrow.decode(value, ErrorReport)
            report["errors"].append({"request_id": error.request_id, "kind": error.kind,
                                     "message": error.message, "node": error.node})
        if bad_sent and len(report["errors"]) >= 3:
            break
    report["seconds"] = time.monotonic() - started
    with open(os.environ["REPORT"], "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
