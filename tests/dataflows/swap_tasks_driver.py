"""Drives tests/dataflows/swap_tasks.yml: on every tick one request to each node -- the France
sample to whisper, a sentence to Piper, two sentences to the embedder -- until the test writes
$WORK/swapped, then AFTER more of each. Writes $WORK/progress (answers per kind, as JSON) and, once every
request has ended, $WORK/tasks.json: per kind, the answers in the order they came, each with
its request id, the model that answered, and what it said (transcript, seconds of speech, the
similarity of the two sentences' vectors) or the error; and "resent", the requests sent again.

dora drops a message now and then under load (see driving.py): a request a model node saw a
gap before (its ``lost`` output) is sent again at once, one unanswered for RESEND_AFTER_S on
the next tick (the last of a stream, which no later number reveals); the first answer counts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from driving import Driver

from mofa_omni.contract import arrow
from mofa_omni.contract.tasks import (
    AudioChunk,
    EmbeddingRequest,
    Embeddings,
    SpeechRequest,
    Transcript,
    TranscriptionRequest,
)
from mofa_omni.media.audio import read_wav

WORK = Path(os.environ["WORK"])
AFTER = int(os.environ.get("AFTER", "5"))
SAMPLE = Path(__file__).resolve().parents[2] / "dataflows" / "samples" / "01-capital-of-france.wav"
SENTENCES = ["A man is playing a guitar.", "Someone plays an instrument."]
KINDS = {"hear": "transcript", "say": "speech", "embed": "vectors"}
NODES = {"asr": "hear", "tts": "say", "embedder": "embed"}  # model node -> the kind it serves
RESEND_AFTER_S = 20.0  # each answer takes well under a second, a swap a few seconds
DEADLINE_S = 300.0


def main() -> None:
    driver = Driver(deadline_s=DEADLINE_S, resend_after_s=RESEND_AFTER_S)
    audio, rate = read_wav(SAMPLE)
    requests = {
        "hear": arrow.encode(TranscriptionRequest(audio, rate)),
        "say": arrow.encode(SpeechRequest("The capital of France is Paris.")),
        "embed": arrow.encode(EmbeddingRequest(SENTENCES)),
    }
    sent = dict.fromkeys(KINDS, 0)
    total = None  # requests of each kind, once the test said the swaps are done
    answers: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    speech_seconds: dict[str, float] = {}
    for event in driver.inputs():
        if event.id == "tick":
            if total is None and (WORK / "swapped").exists():
                total = max(sent.values()) + AFTER
            for kind in KINDS:
                if total is None or sent[kind] < total:
                    driver.send(kind, f"{kind}-{sent[kind]:02d}", requests[kind])
                    sent[kind] += 1
            continue
        if event.id.endswith("_lost"):
            driver.resend_lost(event.metadata, {"request": NODES[event.id.removesuffix("_lost")]})
            continue
        kind = next((k for k, output in KINDS.items() if event.id == output), None)
        answer = {"id": event.request_id, "model": event.metadata.get("model", "")}
        if event.is_error:
            error = event.error()
            kind = NODES[event.id.removesuffix("_error")]
            answer["id"] = error.request_id
        if answer["id"] in driver.answers:  # a resent request's second answer
            continue
        if event.is_error:
            answers[kind].append(answer | {"error": error.summary()})
            driver.answered(answer["id"])
        elif kind == "hear":
            answers[kind].append(answer | {"text": event.decode(Transcript).text})
            driver.answered(answer["id"])
        elif kind == "say":
            chunk = event.decode(AudioChunk)
            speech_seconds[answer["id"]] = speech_seconds.get(answer["id"], 0.0) + \
                len(chunk.audio) / chunk.sample_rate
            if chunk.final:
                answers[kind].append(answer | {"seconds": speech_seconds.pop(answer["id"])})
                driver.answered(answer["id"])
        elif kind == "embed":
            vectors = event.decode(Embeddings).vectors
            answers[kind].append(answer | {"similarity": float(np.dot(vectors[0], vectors[1]))})
            driver.answered(answer["id"])
        (WORK / "progress").write_text(json.dumps({k: len(v) for k, v in answers.items()}))
        if total is not None and all(len(v) == total for v in answers.values()):
            break
    driver.write({**answers, "resent": driver.resent}, WORK / "tasks.json")


if __name__ == "__main__":
    main()
