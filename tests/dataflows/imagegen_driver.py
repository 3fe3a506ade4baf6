"""Drives tests/dataflows/imagegen.yml: two drawings with one seed, two bad requests, then —
once both were answered with errors — a drawing with another seed; writes what came back
(shapes, a digest of the pixels, whether they were read in place) to $REPORT. A request dora
dropped is sent once more (see resending.py)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from resending import Outbox

from mofa_omni.contract import arrow
from mofa_omni.contract.tasks import ErrorReport, Image, ImageRequest
from mofa_omni.node.integrity import CheckedNode

DEADLINE_S = 240
WIDTH, HEIGHT = 96, 64  # 18 KiB of pixels: above dora's shared-memory threshold (4 KiB)


def main() -> None:
    node = CheckedNode()
    report: dict = {"images": {}, "errors": {}, "order": []}
    first = {
        "apple": ImageRequest("a red apple on a table", WIDTH, HEIGHT, steps=2, seed=3),
        "apple-again": ImageRequest("a red apple on a table", WIDTH, HEIGHT, steps=2, seed=3),
        "odd-size": ImageRequest("a red apple on a table", 100, HEIGHT, steps=2, seed=3),
        "no-steps": ImageRequest("a red apple on a table", WIDTH, HEIGHT, steps=0, seed=3),
    }
    after_errors = {"apple-seed-4": ImageRequest("a red apple on a table", WIDTH, HEIGHT,
                                                 steps=2, seed=4)}

    outbox = Outbox(node, after_s=60)

    def send(requests: dict[str, ImageRequest]) -> None:
        for request_id, request in requests.items():
            outbox.send("draw", request_id, arrow.encode(request))

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
            send(first)
        elif kind == "tick":
            outbox.resend_stale()
        elif kind == "image_lost":
            outbox.resend_lost(meta, {"image_generation": "draw"})
        elif kind == "image":
            outbox.answered(rid)
            pixels = arrow.decode(value, Image).pixels
            arrow_pixels = value.field("pixels").flatten()
            report["images"][rid] = {
                "shape": list(pixels.shape), "dtype": str(pixels.dtype),
                "sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
                "mean": float(pixels.mean()), "model": meta.get("model", ""),
                # decoded in place: the numpy array is the Arrow buffer dora handed over
                "in_place": pixels.ctypes.data == arrow_pixels.buffers()[1].address
                and not pixels.flags.owndata,
            }
            if rid not in report["order"]:
                report["order"].append(rid)
        elif kind == "image_error":
            error = arrow.decode(value, ErrorReport)
            outbox.answered(error.request_id)
            report["errors"][error.request_id] = {"kind": error.kind, "message": error.message,
                                                  "node": error.node}
            if error.request_id not in report["order"]:
                report["order"].append(error.request_id)
            if len(report["errors"]) == 2 and not outbox.sent("apple-seed-4"):
                send(after_errors)
        if len(report["order"]) == len(first) + len(after_errors):
            break
    report["resent"], report["lost_on_inputs"] = outbox.resent, node.gaps.lost()
    Path(os.environ["REPORT"]).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
