"""Drives tests/dataflows/new_task.yml: two good requests and one of an unknown kind."""

from __future__ import annotations

import pyarrow as pa
from driving import Driver

from mofa_omni.contract.tasks import GenericRequest, GenericResult


def main() -> None:
    driver = Driver(deadline_s=90, resend_after_s=20)  # a request dora drops is sent again
    report: dict = {"results": {}, "errors": {}}
    for event in driver.inputs():
        if event.id == "tick" and not driver.sent:
            for request_id, kind, texts in [("two", "text.stats", ["the cat and the dog", "a b"]),
                                            ("odd", "text.sentiment", ["good"])]:
                batch = pa.RecordBatch.from_pydict({"text": texts})
                driver.send("ask", request_id, GenericRequest(kind, batch))
        elif event.id == "stats":
            result = event.decode(GenericResult)
            report["results"][event.request_id] = {"kind": result.kind, **result.batch.to_pydict()}
            driver.answered(event.request_id)
        elif event.id == "stats_error":
            report["errors"][event.request_id] = event.error().message
            driver.answered(event.request_id)
        if driver.all_answered():
            break
    driver.write(report)


if __name__ == "__main__":
    main()
