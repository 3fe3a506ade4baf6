"""Drives tests/dataflows/vlm.yml: a picture and two malformed ones, then — once both were
answered with errors — an RGBA picture and a plain chat; and, from the start, a picture and a
chat to the second node (another family), a picture to the third (a third family); writes
what came back to $REPORT. Requests go one a
tick; a request dora dropped is sent once more (see driving.py), and so is one whose answer
was cut short on its way back (a gap on the input its node answers on)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from driving import Driver, record

from mofa_omni.contract import arrow
from mofa_omni.contract.tasks import ChatMessage, ChatRequest, OmniRequest, TextChunk

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
    """A OmniRequest whose one image claims ``height x width x channels`` but carries
    ``pixels`` bytes: the Arrow layout is right, the picture is not."""
    good = arrow.encode(OmniRequest(QUESTION, [picture(2, 2)], max_tokens=MAX_TOKENS))
    row = good.to_pylist()[0]
    row["images"] = [{"pixels": [7] * pixels, "height": height, "width": width,
                      "channels": channels}]
    return pa.array([row], type=good.type)


def main() -> None:
    driver = Driver(deadline_s=DEADLINE_S, resend_after_s=30)
    report: dict = {"texts": {}, "finals": {}, "chunks": {}, "errors": {}}
    first = {
        "photo": ("look", OmniRequest(QUESTION, [picture(48, 64)], max_tokens=MAX_TOKENS)),
        "two-channels": ("look", malformed(4, 4, 2, 32)),
        "short-pixels": ("look", malformed(10, 4, 3, 48)),
    }
    after_errors = {
        "rgba": ("look", OmniRequest(
            QUESTION, [np.dstack([picture(40, 30), np.full((40, 30, 1), 255, np.uint8)])],
            max_tokens=MAX_TOKENS)),
        "chat": ("chat", ChatRequest([ChatMessage("user", "Hello!")], max_tokens=MAX_TOKENS)),
    }
    second = {  # to the node of the second family, answered whenever it is ready
        "gemma-photo": ("gemma_look", OmniRequest(QUESTION, [picture(48, 64)],
                                                  max_tokens=MAX_TOKENS)),
        "gemma-chat": ("gemma_chat", ChatRequest([ChatMessage("user", "Hello!")],
                                                 max_tokens=MAX_TOKENS)),
        "llava-photo": ("llava_look", OmniRequest(QUESTION, [picture(48, 64)],
                                                  max_tokens=MAX_TOKENS)),
    }

    def send(requests: dict) -> None:
        for request_id, (output, message) in requests.items():
            driver.send(output, request_id, message)

    # One request a tick: a burst sent while a node is still starting is where dora drops one
    # (the last, which nothing after it on that input reveals until the resend).
    queued = [*first.items(), *second.items()]
    requests = {**first, **after_errors, **second}
    # Each node's outputs by the task its requests arrive on.
    outputs = {"vlm": {"vision_language": "look", "text_generation": "chat"},
               "gemma": {"vision_language": "gemma_look", "text_generation": "gemma_chat"},
               "llava": {"vision_language": "llava_look"}}
    node_of = {output: node for node, tasks in outputs.items() for output in tasks.values()}
    gaps = dict.fromkeys(outputs, 0)
    report["resent_on_gap"] = []
    for event in driver.inputs():
        rid = event.request_id
        node = event.id.removesuffix("_error")
        lost = sum(n for i, n in driver.node.gaps.lost().items() if i in (node, node + "_error"))
        if node in gaps and lost > gaps[node]:
            # Part of a node's answers never reached us (the end of one, or an error: the next
            # message on that input shows the gap): what it still owes, but this, is asked again.
            gaps[node] = lost
            for waiting in driver.waiting():
                output, message = requests[waiting]
                if node_of[output] == node and waiting != rid:
                    report["resent_on_gap"].append(waiting)
                    driver.send(output, waiting, message)
        if event.id == "tick" and queued:
            send(dict([queued.pop(0)]))
        elif event.id.endswith("_lost"):
            driver.resend_lost(event.metadata, outputs[event.id.removesuffix("_lost")])
        elif event.id in outputs:
            chunk = event.decode(TextChunk)
            report["texts"][rid] = report["texts"].get(rid, "") + chunk.text
            report["chunks"][rid] = report["chunks"].get(rid, 0) + 1
            if chunk.final:
                driver.answered(rid)
                report["finals"][rid] = {"finish_reason": chunk.finish_reason,
                                         "completion_tokens": chunk.completion_tokens,
                                         "prompt_tokens": chunk.prompt_tokens,
                                         "model": event.metadata.get("model", "")}
        elif event.id.endswith("_error"):
            error = event.error()
            driver.answered(error.request_id)
            report["errors"][error.request_id] = record(error)
            if "rgba" not in driver.sent and {"two-channels", "short-pixels"} <= set(
                    report["errors"]):
                send(after_errors)
        if len(driver.answers) == len(first) + len(after_errors) + len(second):
            break
    report["order"] = driver.answers
    report["resent"], report["lost_on_inputs"] = driver.resent, driver.node.gaps.lost()
    driver.write(report)


if __name__ == "__main__":
    main()
