"""Drives tests/dataflows/cross_encoder.yml: one rerank request to each cross-encoder node and
one with no documents to the BERT one; writes the scores and errors to $REPORT (a request dora
dropped is sent once more: see driving.py)."""

from __future__ import annotations

import pyarrow as pa
from driving import Driver, record

from mofa_omni.contract import arrow
from mofa_omni.contract.tasks import RerankRequest, RerankResult

QUERY = "what is the capital of france?"
DOCUMENTS = ["paris is the capital of france.", "the cat sleeps.", "a man plays guitar today."]


def main() -> None:
    driver = Driver(deadline_s=180, resend_after_s=30)
    report: dict = {"scores": {}, "errors": {}, "query": QUERY, "documents": DOCUMENTS}
    # No documents: the Arrow layout is right, the request is not (refused on decoding).
    empty = pa.array([{"query": QUERY, "documents": []}],
                     type=arrow.encode(RerankRequest(QUERY, DOCUMENTS)).type)
    for event in driver.inputs():
        if event.id == "tick" and not driver.sent:
            driver.send("rank_bert", "bert", RerankRequest(QUERY, DOCUMENTS))
            driver.send("rank_xlmr", "xlmr", RerankRequest(QUERY, DOCUMENTS))
            driver.send("rank_bert", "empty", empty)
        elif event.id in ("bert", "xlmr"):
            report["scores"][event.request_id] = event.decode(RerankResult).scores.tolist()
            driver.answered(event.request_id)
        elif event.is_error:
            error = event.error()
            report["errors"][error.request_id] = record(error)
            driver.answered(error.request_id)
        if driver.all_answered():
            break
    driver.write(report)


if __name__ == "__main__":
    main()
