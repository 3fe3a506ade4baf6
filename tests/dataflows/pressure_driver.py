"""Drives tests/dataflows/pressure.yml: a short chat request whenever the last one is answered,
until $WORK/stop exists; writes $WORK/driver.json."""

from __future__ import annotations

import os
from pathlib import Path

from driving import Driver

from mofa_omni.contract.tasks import ChatMessage, ChatRequest, TextChunk

WORK = Path(os.environ["WORK"])
DEADLINE_S = float(os.environ.get("DEADLINE_S", "300"))


def main() -> None:
    driver = Driver(deadline_s=DEADLINE_S, resend_after_s=60, checked=False)  # one dora drops
    report: dict = {"answered": 0, "errors": []}
    for event in driver.inputs():
        if event.id == "reply" and event.decode(TextChunk).final:
            report["answered"] += 1
            driver.answered(event.request_id)
        elif event.id == "llm_error":
            error = event.error()
            report["errors"].append(error.summary())
            driver.answered(error.request_id)
        elif event.id == "tick" and not driver.waiting():
            if (WORK / "stop").exists():
                break
            request = ChatRequest([ChatMessage("user", "Name a colour.")], max_tokens=6)
            driver.send("ask", f"q{len(driver.sent) + 1}", request)
    report["sent"] = len(driver.sent)
    driver.write(report, WORK / "driver.json")


if __name__ == "__main__":
    main()
