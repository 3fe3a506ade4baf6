"""Drives tests/dataflows/new_task.yml: two good requests and one of an unknown kind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa

from mofa_omni.contract import arrow
from mofa_omni.contract.tasks import ErrorReport, GenericRequest, GenericResult
from mofa_omni.node.integrity import CheckedNode


def main() -> None:
    node = CheckedNode()
    report: dict = {"results": {}, "errors": {}}
    sent = False
    for event in node:
        if event["type"] != "INPUT":
            continue
        rid = str((event.get("metadata") or {}).get("request_id", ""))
        if event["id"] == "tick" and not sent:
            sent = True
            for request_id, kind, texts in [("two", "text.stats", ["the cat and the dog", "a b"]),
                                            ("odd", "text.sentiment", ["good"])]:
                batch = pa.RecordBatch.from_pydict({"text": texts})
                node.send_output("ask", arrow.encode(GenericRequest(kind, batch)),
                                 {"request_id": request_id})
        elif event["id"] == "stats":
            result = arrow.decode(event["value"], GenericResult)
            report["results"][rid] = {"kind": result.kind, **result.batch.to_pydict()}
        elif event["id"] == "stats_error":
            report["errors"][rid] = arrow.decode(event["value"], ErrorReport).message
        if len(report["results"]) + len(report["errors"]) == 2:
            break
    Path(os.environ["REPORT"]).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
