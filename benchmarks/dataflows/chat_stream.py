"""A steady stream of chat requests to an LLM node (tests/dataflows/swap.yml,
benchmarks/dataflows/hot_swap*.yml): REQUESTS requests, one every INTERVAL_S, each with its own
secret code in the conversation's earlier turns, so a reply shows whether the model saw them.
With WARM_UP=1 the stream starts once a first request was answered (the model loaded and warm).

Writes $WORK/progress (replies so far) and, once every request has ended -- or SETTLE_S after the
last was sent, when some never will (lost) -- $WORK/swap.json: per request, in the order the
replies finished, its id, code, reply (or error), the model that answered, and when it was sent
and answered (seconds from the stream's start), and the requests never answered ("lost").

dora drops a message now and then under load. A request the LLM node reports lost (its `lost`
output, wired to the driver's `llm_lost`: a gap in the numbers of the requests it received) is
sent again at once. One that no later number reveals (the last ones of the stream) is sent
again once it has waited RESEND_AFTER_S (20) and no reply at all came for as long: a request
only queued behind others (the model slower than the stream, as on a busy machine) keeps
replies coming and is not sent again. Each at most twice, listed in "resent"; a second answer
to it is skipped."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mofa_omni.contract import arrow
from mofa_omni.contract.tasks import ChatMessage, ChatRequest, ErrorReport, TextChunk
from mofa_omni.node.integrity import CheckedNode

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
    node = CheckedNode()  # numbers its requests, so the LLM node can name those dora dropped
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
    by_seq: dict[int, str] = {}  # the number each request was (last) sent under
    resent: list[str] = []
    last_reply = started  # when a reply or error last came

    def send(request_id: str) -> None:
        last_sent[request_id] = time.monotonic()
        seq = node.send_output("ask", arrow.encode(conversation(sent[request_id]["code"])),
                               {"request_id": request_id})
        by_seq[seq] = request_id

    def resend(request_id: str) -> None:
        if request_id in last_sent and resent.count(request_id) < RESENDS:
            resent.append(request_id)
            send(request_id)

    for event in node:
        now = time.monotonic()
        if event["type"] != "INPUT":
            continue
        if warming:
            if event["id"] in ("reply", "llm_error") and \
                    event["metadata"].get("request_id") == "warm-up" and \
                    event["metadata"].get("final", True):
                warming, started = False, time.monotonic()
                last_reply = started
            continue
        if event["id"] == "tick":
            if len(sent) < REQUESTS and now - started >= len(sent) * INTERVAL_S:
                request_id = f"q{len(sent):03d}"
                sent[request_id] = {"id": request_id, "code": secret_code(len(sent)),
                                    "sent": now}
                send(request_id)
            if now - last_reply > RESEND_AFTER_S:  # the node has gone quiet: nothing queued
                for request_id, at in list(last_sent.items()):
                    if now - at > RESEND_AFTER_S:
                        resend(request_id)
        elif event["id"] == "llm_lost":  # numbers that never reached the LLM node
            meta = event["metadata"]
            for seq in range(meta.get("lost_first", 0), meta.get("lost_last", -1) + 1):
                if seq in by_seq:
                    resend(by_seq[seq])
        elif event["id"] == "reply":
            last_reply = now
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
            last_reply = now
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
