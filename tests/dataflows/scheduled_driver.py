"""Drives tests/dataflows/scheduled.yml (ROLE=voice or notes); writes $WORK/<role>.json.

voice: turn 1 (transcribe a question, ask the LLM), then lets the notes driver run, then
turns 2 and 3. notes: once the voice pipeline has been idle for IDLE_S, NOTES times asks the
writer for a line and embeds it, then lets the voice driver go on.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from driving import Driver, record

from mofa_omni.contract.tasks import (
    ChatMessage,
    ChatRequest,
    EmbeddingRequest,
    Embeddings,
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
RESEND_AFTER_S = 90  # a request dora drops is sent again (a turn takes seconds, a reload ~20 s)
NOTES = int(os.environ.get("NOTES", "3"))


def main() -> None:
    driver = Driver(deadline_s=DEADLINE_S, resend_after_s=RESEND_AFTER_S, checked=False)
    report: dict = {"results": {}, "errors": []}
    wavs = sorted(SAMPLES.glob("*.wav"))
    turn, waiting_since, busy = 0, None, False
    replies: dict[str, str] = {}

    def done() -> bool:
        return len(report["results"]) + len(report["errors"]) == len(driver.sent)

    for event in driver.inputs():
        request_id = event.request_id
        if event.is_error:
            report["errors"].append(record(event.error()))
            driver.answered(request_id)
            busy = False
        elif event.id == "transcript":
            driver.answered(request_id)
            text = event.decode(Transcript).text.strip()
            report["results"][request_id] = text
            driver.send("ask", request_id.replace("hear", "ask"),
                        ChatRequest([ChatMessage("system", "Answer in one sentence."),
                                     ChatMessage("user", text)], max_tokens=12))
        elif event.id == "reply":
            chunk = event.decode(TextChunk)
            replies[request_id] = replies.get(request_id, "") + chunk.text
            if chunk.final:
                driver.answered(request_id)
                report["results"][request_id] = replies[request_id]
                busy = False
        elif event.id == "vectors":
            driver.answered(request_id)
            report["results"][request_id] = len(event.decode(Embeddings).vectors)
        elif event.id == "tick" and ROLE == "voice" and not busy:
            if turn == 1 and not (WORK / "notes-done").exists():
                (WORK / "voice-idle").touch()
                continue
            if turn == 3:
                break
            audio, rate = read_wav(wavs[turn % len(wavs)])
            driver.send("hear", f"hear-{turn}", TranscriptionRequest(audio, rate))
            turn, busy = turn + 1, True
        elif event.id == "line":
            chunk = event.decode(TextChunk)
            replies[request_id] = replies.get(request_id, "") + chunk.text
            if chunk.final:
                driver.answered(request_id)
                report["results"][request_id] = replies[request_id]
                driver.send("embed", request_id.replace("write", "embed"),
                            EmbeddingRequest([replies[request_id]]))
        elif event.id == "tick" and ROLE == "notes":
            if not (WORK / "voice-idle").exists():
                continue
            waiting_since = waiting_since or time.monotonic()
            if time.monotonic() - waiting_since < IDLE_S or not done():
                continue
            if len(driver.sent) < 2 * NOTES:
                note = len(driver.sent) // 2
                driver.send("write", f"write-{note}", ChatRequest(
                    [ChatMessage("user", f"Name a city in country {note}.")], max_tokens=8))
            else:
                (WORK / "notes-done").touch()
                break
    report["sent"], report["seconds"] = driver.sent, driver.elapsed()
    report["resent"] = driver.resent
    driver.write(report, WORK / f"{ROLE}.json")


if __name__ == "__main__":
    main()
