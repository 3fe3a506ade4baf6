"""Drives tests/dataflows/omni_model.yml and writes what came back to $REPORT as JSON."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mofa_omni import arrow
from mofa_omni.contract import (ChatMessage, ChatRequest, ErrorReport, RerankRequest, RerankResult,
                                TextChunk)
from mofa_omni.integrity import CheckedNode

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
            node.send_output("chat", arrow.encode(ChatRequest(
                [ChatMessage("user", "What is the capital of France?")], max_tokens=16)),
                {"request_id": "chat"})
            for query, _ in QUERIES:
                request = arrow.encode(RerankRequest(query, DOCUMENTS))
                node.send_output("rank", request, {"request_id": query})
                node.send_output("rank_minilm", request, {"request_id": query})
        elif kind in ("llm", "minilm") and rid == "chat":
            report["chat"] += arrow.decode(value, TextChunk).text
        elif kind in ("llm", "minilm"):
            report[kind][rid] = arrow.decode(value, RerankResult).scores.tolist()
        elif kind.endswith("_error"):
            error = arrow.decode(value, ErrorReport)
            report["errors"].append(f"{error.request_id}: {error.kind}: {error.message}")
        if len(report["llm"]) == len(report["minilm"]) == len(QUERIES) and "Paris" in report["chat"]:
            break
    Path(os.environ["REPORT"]).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
