"""Drives tests/dataflows/swap.yml: REQUESTS chat requests, one every INTERVAL_S, each with its
own secret code in the conversation's earlier turns; writes $WORK/progress (replies so far) and,
once every request has ended, $WORK/swap.json: per request, in the order the replies finished,
its id, code, reply, the model that answered, and when it was sent and answered."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from dora import Node

from mofa_omni import arrow
from mofa_omni.contract import ChatMessage, ChatRequest, ErrorReport, TextChunk

WORK = Path(os.environ["WORK"])
REQUESTS = int(os.environ.get("REQUESTS", "120"))
INTERVAL_S = float(os.environ.get("INTERVAL_S", "0.25"))
DEADLINE_S = float(os.environ.get("DEADLINE_S", "400"))


def secret_code(index: int) -> str:
    return str(1000 + 7919 * index % 9000)


def conversation(code: str) -> ChatRequest:
    return ChatRequest([ChatMessage("user", f"The secret code is {code}."),
                        ChatMessage("assistant", f"Got it, the secret code is {code}."),
                        ChatMessage("user", "Repeat the secret code.")], max_tokens=10)


def main() -> None:
    node = Node()
    started = time.monotonic()
    sent: dict[str, dict] = {}
    finished: list[dict] = []
    replies: dict[str, str] = {}
    for event in node:
        now = time.monotonic()
        if event["type"] != "INPUT":
            continue
        if event["id"] == "tick":
            if len(sent) < REQUESTS and now - started >= len(sent) * INTERVAL_S:
                request_id = f"q{len(sent):03d}"
                code = secret_code(len(sent))
                sent[request_id] = {"id": request_id, "code": code, "sent": now}
                node.send_output("ask", arrow.encode(conversation(code)),
                                 {"request_id": request_id})
        elif event["id"] == "reply":
            chunk = arrow.decode(event["value"], TextChunk)
            meta = event["metadata"]
            replies[meta["request_id"]] = replies.get(meta["request_id"], "") + chunk.text
            if chunk.final:
                finished.append(sent[meta["request_id"]] | {
                    "reply": replies.pop(meta["request_id"]), "model": meta.get("model", ""),
                    "answered": now})
                (WORK / "progress").write_text(str(len(finished)))
        elif event["id"] == "llm_error":
            error = arrow.decode(event["value"], ErrorReport)
            finished.append(sent.get(error.request_id, {"id": error.request_id}) | {
                "error": f"{error.kind}: {error.message}", "answered": now})
        if len(finished) == REQUESTS or now - started > DEADLINE_S:
            break
    for entry in finished:
        entry["sent"] -= started
        entry["answered"] -= started
    (WORK / "swap.json").write_text(json.dumps({"requests": REQUESTS, "finished": finished}))


if __name__ == "__main__":
    main()
