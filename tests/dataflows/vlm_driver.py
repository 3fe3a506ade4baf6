"""Drives tests/dataflows/vlm.yml: a picture and two malformed ones, then — once both were
answered with errors — an RGBA picture and a plain chat; writes what came back to $REPORT.

dora may drop a message now and then under load: a request the node reports lost, or one with
no answer after RESEND_AFTER_S, is sent once more (recorded in the report's "resent")."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from mofa_omni import arrow
from mofa_omni.contract import ChatMessage, ChatRequest, ErrorReport, TextChunk, VisionRequest
from mofa_omni.integrity import CheckedNode

DEADLINE_S = 180
RESEND_AFTER_S = 30
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

    by_seq: dict[tuple[str, int], str] = {}
    pending: dict[str, float] = {}  # request id -> when sent
    report["resent"] = []

    def send(requests: dict) -> None:
        for request_id, (output, message) in requests.items():
            seq = node.send_output(output, message, {"request_id": request_id})
            by_seq[output, seq] = request_id
            pending[request_id] = time.monotonic()

    def resend(request_id: str) -> None:
        if request_id in report["resent"] or request_id not in pending:
            return
        report["resent"].append(request_id)
        send({request_id: {**first, **after_errors}[request_id]})

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
            for request_id, when in list(pending.items()):
                if time.monotonic() - when > RESEND_AFTER_S:
                    resend(request_id)
        elif kind == "vlm_lost":  # the node saw a gap in a request input's numbering
            output = {"vision_language": "look", "text_generation": "chat"}[meta["lost_input"]]
            for seq in range(meta["lost_first"], meta["lost_last"] + 1):
                if (output, seq) in by_seq:
                    resend(by_seq[output, seq])
        elif kind == "vlm":
            chunk = arrow.decode(value, TextChunk)
            report["texts"][rid] = report["texts"].get(rid, "") + chunk.text
            report["chunks"][rid] = report["chunks"].get(rid, 0) + 1
            if chunk.final:
                pending.pop(rid, None)
                report["finals"][rid] = {"finish_reason": chunk.finish_reason,
                                         "completion_tokens": chunk.completion_tokens,
                                         "prompt_tokens": chunk.prompt_tokens,
                                         "model": meta.get("model", "")}
                if rid not in report["order"]:
                    report["order"].append(rid)
        elif kind == "vlm_error":
            error = arrow.decode(value, ErrorReport)
            pending.pop(error.request_id, None)
            report["errors"][error.request_id] = {"kind": error.kind, "message": error.message,
                                                  "node": error.node}
            if error.request_id not in report["order"]:
                report["order"].append(error.request_id)
            if len(report["errors"]) == 2 and "rgba" not in by_seq.values():
                send(after_errors)
        if len(report["order"]) == len(first) + len(after_errors):
            break
    report["lost_on_inputs"] = node.gaps.lost()
    Path(os.environ["REPORT"]).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
