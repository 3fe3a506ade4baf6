"""Drives tests/dataflows/omni_model.yml and writes what came back to $REPORT as JSON (a request
dora dropped is sent once more: see resending.py)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from resending import Outbox

from mofa_omni.contract import arrow
from mofa_omni.contract.tasks import (
    ChatMessage,
    ChatRequest,
    ErrorReport,
    RerankRequest,
    RerankResult,
    TextChunk,
)
from mofa_omni.node.integrity import CheckedNode

DEADLINE_S = 180
QUERIES = [("What is the capital of France?", 1), ("When does the train leave?", 2),
           ("Which fruit is yellow?", 0), ("Which countries border France?", 3)]
DOCUMENTS = ["Bananas are yellow and rich in potassium.",
             "Paris is the capital and largest city of France.",
             "The next train to the airport leaves at noon.",
             "France borders Spain, Italy and Germany."]


def main() -> None:
    node = CheckedNode()
    report: dict = {"llm": {}, "minilm": {}, "chat": "", "errors": [], "queries": QUERIES}
    started, sent = time.monotonic(), False
    outbox = Outbox(node, after_s=60)
    for event in node:
        if event["type"] != "INPUT":
            continue
        if time.monotonic() - started > DEADLINE_S:
            report["timeout"] = True
            break
        kind, value, meta = event["id"], event["value"], event.get("metadata") or {}
        rid = str(meta.get("request_id", ""))
        if kind == "tick" and not sent:
            sent = True
            outbox.send("chat", "chat", arrow.encode(ChatRequest(
                [ChatMessage("user", "What is the capital of France? Answer in one sentence.")],
                max_tokens=16)))
            for query, _ in QUERIES:
                request = arrow.encode(RerankRequest(query, DOCUMENTS))
                outbox.send("rank", query, request)
                outbox.send("rank_minilm", f"minilm: {query}", request)
        elif kind == "tick":
            outbox.resend_stale()
        elif kind in ("llm", "minilm") and rid == "chat":
            chunk = arrow.decode(value, TextChunk)
            report["chat"] += chunk.text
            if chunk.final:
                outbox.answered(rid)
        elif kind in ("llm", "minilm"):
            outbox.answered(rid)
            scores = arrow.decode(value, RerankResult).scores.tolist()
            report[kind][rid.removeprefix("minilm: ")] = scores
        elif kind.endswith("_error"):
            error = arrow.decode(value, ErrorReport)
            report["errors"].append(f"{error.request_id}: {error.kind}: {error.message}")
        if len(report["llm"]) == len(report["minilm"]) == len(QUERIES) and "Paris" in report["chat"]:
            break
    report["resent"] = outbox.resent
    Path(os.environ["REPORT"]).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
