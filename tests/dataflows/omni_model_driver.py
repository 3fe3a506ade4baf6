"""Drives tests/dataflows/omni_model.yml and writes what came back to $REPORT as JSON (a request
dora dropped is sent once more: see driving.py)."""

from __future__ import annotations

from driving import Driver, record

from mofa_omni.contract.tasks import (
    ChatMessage,
    ChatRequest,
    RerankRequest,
    RerankResult,
    TextChunk,
)

DEADLINE_S = 180
RESEND_AFTER_S = 20
QUERIES = [("What is the capital of France?", 1), ("When does the train leave?", 2),
           ("Which fruit is yellow?", 0), ("Which countries border France?", 3)]
DOCUMENTS = ["Bananas are yellow and rich in potassium.",
             "Paris is the capital and largest city of France.",
             "The next train to the airport leaves at noon.",
             "France borders Spain, Italy and Germany."]


def main() -> None:
    # A request of the burst dora dropped is sent again at once where a later one shows the gap
    # (the node's `lost` output), else after RESEND_AFTER_S (a slow answer is then skipped).
    driver = Driver(deadline_s=DEADLINE_S, resend_after_s=RESEND_AFTER_S)
    report: dict = {"llm": {}, "minilm": {}, "chat": "", "errors": [], "queries": QUERIES}
    for event in driver.inputs():
        if event.id == "tick" and not driver.sent:
            driver.send("chat", "chat", ChatRequest(
                [ChatMessage("user", "What is the capital of France? Answer in one sentence.")],
                max_tokens=16))
            for query, _ in QUERIES:
                driver.send("rank", query, RerankRequest(query, DOCUMENTS))
                driver.send("rank_minilm", f"minilm: {query}", RerankRequest(query, DOCUMENTS))
        elif event.id == "llm_lost":
            driver.resend_lost(event.metadata, {"text_generation": "chat", "rerank": "rank"})
        elif event.id == "minilm_lost":
            driver.resend_lost(event.metadata, {"request": "rank_minilm"})
        elif event.id in ("llm", "minilm") and event.request_id == "chat":
            chunk = event.decode(TextChunk)
            report["chat"] += chunk.text
            if chunk.final:
                driver.answered(event.request_id)
        elif event.id in ("llm", "minilm"):
            driver.answered(event.request_id)
            scores = event.decode(RerankResult).scores.tolist()
            report[event.id][event.request_id.removeprefix("minilm: ")] = scores
        elif event.is_error:
            report["errors"].append(record(event.error()))
        if len(report["llm"]) == len(report["minilm"]) == len(QUERIES) and "Paris" in report["chat"]:
            break
    report["resent"] = driver.resent
    driver.write(report)


if __name__ == "__main__":
    main()
