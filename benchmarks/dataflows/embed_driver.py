"""Drives the embedder of benchmarks/dataflows/memory_pressure.yml: indexes the conversation.

It follows the voice agent's transcript (VOICE_OUTPUT/transcript.txt), a file rather than a data
edge, so that the scheduler sees the embedder as a pipeline of its own. Its script:

    start            embeds a few fixed sentences (the embedder loads while the voice models do)
    user line k      embeds what the user said, while the voice pipeline answers (busy)
    assistant line k IDLE_S seconds later, embeds the reply (idle, when the next turn comes
                     after a pause; otherwise while the next turn is being answered)

It exits once TURNS assistant lines were written (or WORK/voice-ended exists: the benchmark
saw the dialogue end) and every request it sent is answered, or after DEADLINE_S. It writes
WORK/embed.json: each request's id, phase, send time, and outcome (time.monotonic(), which
lines up with the other processes' on Linux).

Environment: WORK (required), VOICE_OUTPUT, TURNS (default 4), IDLE_S (default 4),
DEADLINE_S (default 280).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from dora import Node

from mofa_omni.contract import arrow
from mofa_omni.contract.tasks import EmbeddingRequest, Embeddings, ErrorReport
from mofa_omni.voice.events import voice_output

WORK = Path(os.environ["WORK"])
TURNS = int(os.environ.get("TURNS", "4"))
IDLE_S = float(os.environ.get("IDLE_S", "4"))
DEADLINE_S = float(os.environ.get("DEADLINE_S", "280"))
STARTUP = ["The assistant answers questions about capitals.",
           "Paris is the capital of France.", "Rome is the capital of Italy."]


def transcript_lines(path: Path) -> tuple[list[str], list[str]]:
    users, answers = [], []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return users, answers
    for line in text.splitlines():
        role, _, said = line.partition(": ")
        if role == "user":
            users.append(said)
        elif role == "assistant":
            answers.append(said)
    return users, answers


def main() -> None:
    node = Node()
    transcript = voice_output() / "transcript.txt"
    started = time.monotonic()
    requests: dict[str, dict] = {}
    due: list[tuple[float, str, str, list[str]]] = []  # (when, request id, phase, texts)
    users_seen = answers_seen = 0

    def send(request_id: str, phase: str, texts: list[str]) -> None:
        requests[request_id] = {"phase": phase, "sent": time.monotonic(), "texts": len(texts)}
        node.send_output("embed", arrow.encode(EmbeddingRequest(texts)),
                         {"request_id": request_id})

    send("embed-start", "start", STARTUP)
    for event in node:
        if event["type"] != "INPUT":
            continue
        now = time.monotonic()
        request_id = str((event.get("metadata") or {}).get("request_id", ""))
        if event["id"] == "vectors":
            vectors = arrow.decode(event["value"], Embeddings).vectors
            if request_id in requests:
                requests[request_id].update(done=now, vectors=len(vectors))
        elif event["id"] == "embedder_error":
            error = arrow.decode(event["value"], ErrorReport)
            if error.request_id in requests:
                requests[error.request_id].update(done=now, error=f"{error.kind}: {error.message}")
        elif event["id"] == "tick":
            users, answers = transcript_lines(transcript)
            for k in range(users_seen, len(users)):
                send(f"embed-user-{k + 1}", "busy", [users[k] or "(nothing heard)"])
            for k in range(answers_seen, len(answers)):
                due.append((now + IDLE_S, f"embed-reply-{k + 1}", "after reply",
                            [answers[k] or "(no reply)"]))
            users_seen, answers_seen = len(users), len(answers)
            for entry in [d for d in due if d[0] <= now]:
                due.remove(entry)
                send(*entry[1:])
            voice_over = answers_seen >= TURNS or (WORK / "voice-ended").exists()
            answered = all("done" in r for r in requests.values())
            if voice_over and not due and answered:
                break
            if now - started > DEADLINE_S:
                break
    report = {"started": started, "ended": time.monotonic(), "requests": requests,
              "timed_out": time.monotonic() - started > DEADLINE_S}
    (WORK / "embed.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
