"""A steady stream of chat requests to an LLM node (tests/dataflows/swap.yml,
benchmarks/dataflows/hot_swap*.yml): REQUESTS requests, one every INTERVAL_S, each with its own
secret code in the conversation's earlier turns, so a reply shows whether the model saw them.
With WARM_UP=1 the stream starts once a first request was answered (the model loaded and warm).

Writes $WORK/progress (replies so far) and, once every request has ended -- or SETTLE_S after the
last was sent, when some never will (lost) -- $WORK/swap.json: per request, in the order the
replies finished, its id, code, reply (or error), the model that answered, and when it was sent
and answered (seconds from the stream's start), and the requests never answered ("lost").

dora drops a message now and then under load: a request unanswered RESEND_AFTER_S (20) after it
was sent is sent again, twice at most (listed in "resent"); a second answer to it is skipped."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from dora import Node

from mofa_omni.contract import arrow
from mofa_omni.contract.tasks import ChatMessage, ChatRequest, ErrorReport, TextChunk

WORK = Path(os.environ["WORK"])
REQUESTS = int(os.environ.get("REQUESTS", "120"))
INTERVAL_S = float(os.environ.get("INTERVAL_S", "0.25"))
DEADLINE_S = float(os.environ.get("DEADLINE_S", "400"))
SETTLE_S = float(os.environ.get("SETTLE_S", "120"))
RESEND_AFTER_S = float(os.environ.get("RESEND_AFTER_S", "20"))
RESENDS = 2
WARM_UP = os.environ.get("WARM_UP", "") == "1"  # the stream starts once a first request is answered


def secret_code(index: int) -> str:
    return str(1000 + 7919 * index % 9000)


def conversation(code: str) -> ChatRequest:
    return ChatRequest([ChatMessage("user", f"The secret code is {code}."),
                        ChatMessage("assistant", f"Got it, the secret code is {code}."),
                        ChatMessage("user", "Repeat the secret code.")], max_tokens=10)


def main() -> None:
    node = Node()
    started = time.monotonic()
    warming = WARM_UP
    if warming:
        node.send_output("ask", arrow.encode(conversation(secret_code(0))),
                         {"request_id": "warm-up"})
    sent: dict[str, dict] = {}
    finished: list[dict] = []
    replies: dict[str, str] = {}
    answered: set[str] = set()
    last_sent: dict[str, float] = {}  # unanswered requests: when each was last sent
    resent: list[str] = []
    for event in node:
        now = time.monotonic()
        if event["type"] != "INPUT":
            continue
        if warming:
            if event["id"] in ("reply", "llm_error") and \
                    event["metadata"].get("request_id") == "warm-up" and \
                    event["metadata"].get("final", True):
                warming, started = False, time.monotonic()
            continue
        if event["id"] == "tick":
            if len(sent) < REQUESTS and now - started >= len(sent) * INTERVAL_S:
                request_id = f"q{len(sent):03d}"
                code = secret_code(len(sent))
                sent[request_id] = {"id": request_id, "code": code, "sent": now}
                last_sent[request_id] = now
                node.send_output("ask", arrow.encode(conversation(code)),
                                 {"request_id": request_id})
            for request_id, at in list(last_sent.items()):
                if now - at > RESEND_AFTER_S and resent.count(request_id) < RESENDS:
                    resent.append(request_id)
                    last_sent[request_id] = now
                    node.send_output("ask", arrow.encode(conversation(sent[request_id]["code"])),
                                     {"request_id": request_id})
        elif event["id"] == "reply":
            chunk = arrow.decode(event["value"], TextChunk)
            meta = event["metadata"]
            if meta["request_id"] in answered:
                continue  # a copy sent again: answered already
            replies[meta["request_id"]] = replies.get(meta["request_id"], "") + chunk.text
            if chunk.final:
                answered.add(meta["request_id"])
                last_sent.pop(meta["request_id"], None)
                finished.append(sent[meta["request_id"]] | {
                    "reply": replies.pop(meta["request_id"]), "model": meta.get("model", ""),
                    "answered": now})
                (WORK / "progress").write_text(str(len(finished)))
        elif event["id"] == "llm_error":
            error = arrow.decode(event["value"], ErrorReport)
            if error.request_id in answered:
                continue
            answered.add(error.request_id)
            last_sent.pop(error.request_id, None)
            finished.append(sent.get(error.request_id, {"id": error.request_id}) | {
                "error": f"{error.kind}: {error.message}", "answered": now})
        all_sent = len(sent) == REQUESTS
        if len(finished) == REQUESTS or now - started > DEADLINE_S or (
                all_sent and now - started - (REQUESTS - 1) * INTERVAL_S > SETTLE_S):
            break
    for entry in finished:
        entry["sent"] -= started
        entry["answered"] -= started
    lost = [{"id": i, "code": e["code"], "sent": e["sent"] - started}
            for i, e in sent.items() if i not in answered]
    # time.monotonic() is one clock for every process on Linux and macOS: "started" places
    # the record on a benchmark's own timeline.
    (WORK / "swap.json").write_text(json.dumps({"requests": REQUESTS, "finished": finished,
                                                "lost": lost, "resent": resent,
                                                "started": started}))


if __name__ == "__main__":
    main()
