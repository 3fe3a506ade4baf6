"""Drives tests/dataflows/chain.yml: a spoken question through the four model nodes (TTS ->
ASR -> LLM -> embeddings), then three bad requests; writes what happened to $REPORT as JSON.

Each step has its own request id and is sent again if unanswered after RESEND_AFTER_S: dora
dropped the first request (the TTS's, sent as the graph started) once in a full test run, and
the chain then waited out its whole deadline (see tests/dataflows/driving.py)."""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
from driving import Driver, record

from mofa_omni.contract.tasks import (
    AudioChunk,
    ChatMessage,
    ChatRequest,
    EmbeddingRequest,
    Embeddings,
    SpeechRequest,
    TextChunk,
    Transcript,
    TranscriptionRequest,
)

QUESTION = "What is the capital of France?"
DEADLINE_S = float(os.environ.get("DEADLINE_S", "240"))
RESEND_AFTER_S = 45  # a step takes seconds; the models load within this even on a busy machine


def main() -> None:
    driver = Driver(deadline_s=DEADLINE_S, resend_after_s=RESEND_AFTER_S, checked=False)
    report: dict = {"errors": [], "speech_chunks": 0, "reply_chunks": 0, "metadata": []}
    audio: list[np.ndarray] = []
    reply = ""

    def send(output: str, message, request_id: str) -> None:
        driver.send(output, request_id, message, origin_ns=time.time_ns())

    for event in driver.inputs():
        if event.id == "tick" and not driver.sent:
            send("speak", SpeechRequest(QUESTION), "speak-1")
        elif event.id == "speech":
            chunk = event.decode(AudioChunk)
            audio.append(chunk.audio.copy())
            report["speech_chunks"] += 1
            report["sample_rate"] = chunk.sample_rate
            if chunk.final:
                driver.answered("speak-1")
                send("hear", TranscriptionRequest(np.concatenate(audio), chunk.sample_rate),
                     "hear-1")
        elif event.id == "transcript":
            driver.answered("hear-1")
            heard = event.decode(Transcript).text.strip()
            report["heard"] = heard
            send("ask", ChatRequest([ChatMessage("system", "Answer in one sentence."),
                                     ChatMessage("user", heard)], max_tokens=48), "turn-1")
        elif event.id == "reply":
            chunk = event.decode(TextChunk)
            reply += chunk.text
            report["reply_chunks"] += 1
            report["metadata"].append({key: event.metadata.get(key) for key in
                                       ("request_id", "seq", "final", "origin_ns", "sent_ns")})
            if chunk.final:
                driver.answered("turn-1")
                report["reply"] = reply
                send("embed", EmbeddingRequest([QUESTION, reply, "The stock market fell."]),
                     "embed-1")
        elif event.id == "vectors":
            driver.answered("embed-1")
            vectors = event.decode(Embeddings).vectors
            report["similarity"] = [float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])]
            # Bad input: empty audio, float64 audio, an empty chat. Each must come back as an error.
            send("hear", TranscriptionRequest(np.zeros(0, np.float32), 16000), "bad-empty-audio")
            wrong = pa.StructArray.from_arrays(
                [pa.array([[0.1, 0.2]], pa.list_(pa.float64())), pa.array([16000], pa.int32()),
                 pa.array([""])], names=["audio", "sample_rate", "language"])
            driver.send("hear", "bad-float64-audio", wrong)
            send("ask", ChatRequest([]), "bad-empty-chat")
        elif event.is_error:
            report["errors"].append(record(event.error()))
            driver.answered(event.request_id)
        if "bad-empty-chat" in driver.sent and len(report["errors"]) >= 3:
            break
    report["seconds"] = driver.elapsed()
    report["resent"] = driver.resent
    driver.write(report)


if __name__ == "__main__":
    main()
