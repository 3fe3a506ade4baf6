"""Drives tests/dataflows/vlm.yml: a picture and two malformed ones, then — once both were
answered with errors — an RGBA picture and a plain chat; writes what came back to $REPORT
(a request dora dropped is sent once more: see resending.py)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from resending import Outbox

from mofa_omni.contract import arrow
from mofa_omni.contract.tasks import ChatMessage, ChatRequest, ErrorReport, TextChunk, VisionRequest
from mofa_omni.node.integrity import CheckedNode

DEADLINE_S = 180
MAX_TOKENS = 8
QUESTION = [ChatMessage("user", "What is in this picture?")]


def picture(height: int, width: int) -> np.ndarray:
    """A colour gradient with a dark square in it: uint8, HWC, RGB."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / width, 255 * y / height, np.full_like(x, 128.0)], axis=-1)
    rgb[height // 4: height // 2, width // 4: width // 2] = 20
    return rgb.astype(np.uint8)


def malformed(height: int, width: int, channels: int, pixels: int) -> pa.Array:
    """A VisionRequest whose one image claims ``height x width x channels`` but carries
    ``pixels`` bytes: the Arrow layout is right, the picture is not."""
    good = arrow.encode(VisionRequest([picture(2, 2)], QUESTION, MAX_TOKENS))
    row = good.to_pylist()[0]
    row["images"] = [{"pixels": [7] * pixels, "height": height, "width": width,
                      "channels": channels}]
    return pa.array([row], type=good.type)


def main() -> None:
    node = CheckedNode()
    report: dict = {"texts": {}, "finals": {}, "chunks": {}, "errors": {}, "order": []}
    first = {
        "photo": ("look", arrow.encode(VisionRequest([picture(48, 64)], QUESTION, MAX_TOKENS))),
        "two-channels": ("look", malformed(4, 4, 2, 32)),
        "short-pixels": ("look", malformed(10, 4, 3, 48)),
    }
    after_errors = {
        "rgba": ("look", arrow.encode(VisionRequest(
            [np.dstack([picture(40, 30), np.full((40, 30, 1), 255, np.uint8)])],
            QUESTION, MAX_TOKENS))),
        "chat": ("chat", arrow.encode(ChatRequest([ChatMessage("user", "Hello!")],
                                                  max_tokens=MAX_TOKENS))),
    }

    outbox = Outbox(node)

    def send(requests: dict) -> None:
        for request_id, (output, message) in requests.items():
            outbox.send(output, request_id, message)

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
        elif kind == "vlm_lost":
            outbox.resend_lost(meta, {"vision_language": "look", "text_generation": "chat"})
        elif kind == "vlm":
            chunk = arrow.decode(value, TextChunk)
            report["texts"][rid] = report["texts"].get(rid, "") + chunk.text
            report["chunks"][rid] = report["chunks"].get(rid, 0) + 1
            if chunk.final:
                outbox.answered(rid)
                report["finals"][rid] = {"finish_reason": chunk.finish_reason,
                                         "completion_tokens": chunk.completion_tokens,
                                         "prompt_tokens": chunk.prompt_tokens,
                                         "model": meta.get("model", "")}
                if rid not in report["order"]:
                    report["order"].append(rid)
        elif kind == "vlm_error":
            error = arrow.decode(value, ErrorReport)
            outbox.answered(error.request_id)
            report["errors"][error.request_id] = {"kind": error.kind, "message": error.message,
                                                  "node": error.node}
            if error.request_id not in report["order"]:
                report["order"].append(error.request_id)
            if len(report["errors"]) == 2 and not outbox.sent("rgba"):
                send(after_errors)
        if len(report["order"]) == len(first) + len(after_errors):
            break
    report["resent"], report["lost_on_inputs"] = outbox.resent, node.gaps.lost()
    Path(os.environ["REPORT"]).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
