"""Drives tests/dataflows/scheduled.yml (ROLE=voice or notes); writes $WORK/<role>.json.

voice: turn 1 (transcribe a question, ask the LLM), then lets the notes driver run, then
turns 2 and 3. notes: once the voice pipeline has been idle for IDLE_S, NOTES times asks the
writer for a line and embeds it, then lets the voice driver go on.
"""

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
    Embeddings,
    ErrorReport,
    TextChunk,
    Transcript,
    TranscriptionRequest,
)
from mofa_omni.media.audio import read_wav

ROLE = os.environ["ROLE"]
WORK = Path(os.environ["WORK"])
SAMPLES = Path(__file__).resolve().parents[2] / "dataflows" / "samples"
DEADLINE_S = float(os.environ.get("DEADLINE_S", "400"))
IDLE_S = float(os.environ.get("IDLE_S", "4"))
NOTES = int(os.environ.get("NOTES", "3"))


def main() -> None:
    node = Node()
    report: dict = {"results": {}, "errors": [], "sent": []}
    started = time.monotonic()
    wavs = sorted(SAMPLES.glob("*.wav"))
    turn, waiting_since, busy = 0, None, False
    replies: dict[str, str] = {}

    def send(output: str, message, request_id: str) -> None:
        report["sent"].append(request_id)
        node.send_output(output, arrow.encode(message), {"request_id": request_id})

    def done() -> bool:
        return len(report["results"]) + len(report["errors"]) == len(report["sent"])

    for event in node:
        if event["type"] != "INPUT":
            continue
        if time.monotonic() - started > DEADLINE_S:
            report["timeout"] = True
            break
        kind, value = event["id"], event["value"]
        request_id = (event.get("metadata") or {}).get("request_id", "")
        if kind.endswith("error"):
            error = arrow.decode(value, ErrorReport)
            report["errors"].append({"request_id": error.request_id, "kind": error.kind,
                                     "message": error.message})
            busy = False
        elif kind == "transcript":
            text = arrow.decode(value, Transcript).text.strip()
            report["results"][request_id] = text
            send("ask", ChatRequest([ChatMessage("system", "Answer in one sentence."),
                                      ChatMessage("user", text)], max_tokens=12),
                 request_id.replace("hear", "ask"))
        elif kind == "reply":
            chunk = arrow.decode(value, TextChunk)
            replies[request_id] = replies.get(request_id, "") + chunk.text
            if chunk.final:
                report["results"][request_id] = replies[request_id]
                busy = False
        elif kind == "vectors":
            report["results"][request_id] = len(arrow.decode(value, Embeddings).vectors)
        elif kind == "tick" and ROLE == "voice" and not busy:
            if turn == 1 and not (WORK / "notes-done").exists():
                (WORK / "voice-idle").touch()
                continue
            if turn == 3:
                break
            wav = wavs[turn % len(wavs)]
            audio, rate = read_wav(wav)
            send("hear", TranscriptionRequest(audio, rate), f"hear-{turn}")
            turn, busy = turn + 1, True
        elif kind == "line":
            chunk = arrow.decode(value, TextChunk)
            replies[request_id] = replies.get(request_id, "") + chunk.text
            if chunk.final:
                report["results"][request_id] = replies[request_id]
                send("embed", EmbeddingRequest([replies[request_id]]),
                     request_id.replace("write", "embed"))
        elif kind == "tick" and ROLE == "notes":
            if not (WORK / "voice-idle").exists():
                continue
            waiting_since = waiting_since or time.monotonic()
            if time.monotonic() - waiting_since < IDLE_S or not done():
                continue
            if len(report["sent"]) < 2 * NOTES:
                note = len(report["sent"]) // 2
                send("write", ChatRequest([ChatMessage("user", f"Name a city in country {note}.")],
                                          max_tokens=8), f"write-{note}")
            else:
                (WORK / "notes-done").touch()
                break
    report["seconds"] = time.monotonic() - started
    (WORK / f"{ROLE}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
