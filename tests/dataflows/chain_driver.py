"""Drives tests/dataflows/chain.yml: a spoken question through the four model nodes (TTS ->
ASR -> LLM -> embeddings), then three bad requests; writes what happened to $REPORT as JSON."""

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


def main() -> None:
    driver = Driver(deadline_s=DEADLINE_S, checked=False)
    report: dict = {"errors": [], "speech_chunks": 0, "reply_chunks": 0, "metadata": []}
    audio: list[np.ndarray] = []
    reply = ""

    def send(output: str, message, request_id: str = "turn-1") -> None:
        driver.send(output, request_id, message, origin_ns=time.time_ns())

    for event in driver.inputs():
        if event.id == "tick" and not driver.sent:
            send("speak", SpeechRequest(QUESTION))
        elif event.id == "speech":
            chunk = event.decode(AudioChunk)
            audio.append(chunk.audio.copy())
            report["speech_chunks"] += 1
            report["sample_rate"] = chunk.sample_rate
            if chunk.final:
                send("hear", TranscriptionRequest(np.concatenate(audio), chunk.sample_rate))
        elif event.id == "transcript":
            heard = event.decode(Transcript).text.strip()
            report["heard"] = heard
            send("ask", ChatRequest([ChatMessage("system", "Answer in one sentence."),
                                     ChatMessage("user", heard)], max_tokens=48))
        elif event.id == "reply":
            chunk = event.decode(TextChunk)
            reply += chunk.text
            report["reply_chunks"] += 1
            report["metadata"].append({key: event.metadata.get(key) for key in
                                       ("request_id", "seq", "final", "origin_ns", "sent_ns")})
            if chunk.final:
                report["reply"] = reply
                send("embed", EmbeddingRequest([QUESTION, reply, "The stock market fell."]))
        elif event.id == "vectors":
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
        if "bad-empty-chat" in driver.sent and len(report["errors"]) >= 3:
            break
    report["seconds"] = driver.elapsed()
    driver.write(report)


if __name__ == "__main__":
    main()
