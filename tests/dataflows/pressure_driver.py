"""Drives tests/dataflows/pressure.yml: a short chat request whenever the last one is answered,
until $WORK/stop exists; writes $WORK/driver.json."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from dora import Node

from mofa_omni.contract import arrow
from mofa_omni.contract.tasks import ChatMessage, ChatRequest, ErrorReport, TextChunk

WORK = Path(os.environ["WORK"])
DEADLINE_S = float(os.environ.get("DEADLINE_S", "300"))


def main() -> None:
    node = Node()
    report: dict = {"sent": 0, "answered": 0, "errors": []}
    started, waiting = time.monotonic(), False
    for event in node:
        if event["type"] != "INPUT":
            continue
        if time.monotonic() - started > DEADLINE_S:
            report["timeout"] = True
            break
        if event["id"] == "reply" and arrow.decode(event["value"], TextChunk).final:
            report["answered"] += 1
            waiting = False
        elif event["id"] == "llm_error":
            error = arrow.decode(event["value"], ErrorReport)
            report["errors"].append(f"{error.kind}: {error.message}")
            waiting = False
        elif event["id"] == "tick" and not waiting:
            if (WORK / "stop").exists():
                break
            report["sent"] += 1
            request = ChatRequest([ChatMessage("user", "Name a colour.")], max_tokens=6)
            node.send_output("ask", arrow.encode(request), {"request_id": f"q{report['sent']}"})
            waiting = True
    (WORK / "driver.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
