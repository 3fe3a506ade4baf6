"""Drives tests/dataflows/scheduler_gone.yml: one embedding request to a node whose scheduler
has left; writes to $REPORT what came back, or that the node left without answering.

With the argument ``scheduler`` it is the stand-in scheduler instead: it joins the graph and
leaves at once, so its ``command`` output closes before it sent any."""

from __future__ import annotations

import sys

from driving import Driver, record

from mofa_omni.contract.tasks import EmbeddingRequest, Embeddings

DEADLINE_S = 60


def drive() -> None:
    driver = Driver(deadline_s=DEADLINE_S, resend_after_s=20)  # one dora drops is sent again
    report: dict = {"vectors": None, "errors": []}
    for event in driver.inputs():
        if event.id == "tick" and not driver.sent:
            driver.send("embed", "e1", EmbeddingRequest(["The scheduler has left."]))
        elif event.id == "vectors":
            report["vectors"] = event.decode(Embeddings).vectors.shape[0]
            report["model"] = event.metadata.get("model", "")
            driver.answered(event.request_id)
        elif event.is_error:
            report["errors"].append(record(event.error()))
            driver.answered(event.error().request_id)
        if driver.all_answered():
            break
        if {"vectors", "embedder_error"} <= driver.closed:
            report["node_left"] = True  # the embedder exited without answering
            break
    driver.write(report)


def leave_at_once() -> None:
    from dora import Node

    Node()


if __name__ == "__main__":
    leave_at_once() if sys.argv[1:] == ["scheduler"] else drive()
