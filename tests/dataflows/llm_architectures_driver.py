"""Drives tests/dataflows/llm_architectures.yml: one greedy chat to each of the three model
nodes; writes each reply's text, chunk count and final chunk (and any error) to $REPORT."""

from __future__ import annotations

from driving import Driver, record

from mofa_omni.contract.tasks import ChatMessage, ChatRequest, TextChunk

DEADLINE_S = 90
MAX_TOKENS = 5
NODES = ("llama", "gemma", "moe")


def main() -> None:
    driver = Driver(deadline_s=DEADLINE_S, resend_after_s=30)
    report: dict = {"texts": {}, "chunks": {}, "finals": {}, "errors": {}}
    question = ChatRequest([ChatMessage("user", "Hello!")], max_tokens=MAX_TOKENS)
    for event in driver.inputs():
        if event.id == "tick" and not driver.sent:
            for node in NODES:  # the request id names the node that should answer it
                driver.send(f"ask_{node}", node, question)
        elif event.id in NODES:
            rid = event.request_id
            chunk = event.decode(TextChunk)
            report["texts"][rid] = report["texts"].get(rid, "") + chunk.text
            report["chunks"][rid] = report["chunks"].get(rid, 0) + 1
            if chunk.final:
                driver.answered(rid)
                report["finals"][rid] = {"node": event.id,
                                         "finish_reason": chunk.finish_reason,
                                         "prompt_tokens": chunk.prompt_tokens,
                                         "completion_tokens": chunk.completion_tokens,
                                         "model": event.metadata.get("model", "")}
        elif event.is_error:
            error = event.error()
            driver.answered(error.request_id)
            report["errors"][error.request_id] = record(error)
        if driver.all_answered():
            break
    report["resent"] = driver.resent
    driver.write(report)


if __name__ == "__main__":
    main()
