"""Drives tests/dataflows/imagegen.yml: two drawings with one seed, two bad requests, then —
once both were answered with errors — a drawing with another seed; writes what came back
(shapes, a digest of the pixels, whether they were read in place) to $REPORT. A request dora
dropped is sent once more (see driving.py)."""

from __future__ import annotations

import hashlib

from driving import Driver, record

from mofa_omni.contract.tasks import Image, ImageRequest

DEADLINE_S = 240
WIDTH, HEIGHT = 96, 64  # 18 KiB of pixels: above dora's shared-memory threshold (4 KiB)


def main() -> None:
    driver = Driver(deadline_s=DEADLINE_S, resend_after_s=60)
    report: dict = {"images": {}, "errors": {}}
    first = {
        "apple": ImageRequest("a red apple on a table", WIDTH, HEIGHT, steps=2, seed=3),
        "apple-again": ImageRequest("a red apple on a table", WIDTH, HEIGHT, steps=2, seed=3),
        "odd-size": ImageRequest("a red apple on a table", 100, HEIGHT, steps=2, seed=3),
        "no-steps": ImageRequest("a red apple on a table", WIDTH, HEIGHT, steps=0, seed=3),
    }
    after_errors = {"apple-seed-4": ImageRequest("a red apple on a table", WIDTH, HEIGHT,
                                                 steps=2, seed=4)}

    def send(requests: dict[str, ImageRequest]) -> None:
        for request_id, request in requests.items():
            driver.send("draw", request_id, request)

    for event in driver.inputs():
        if event.id == "tick" and not driver.sent:
            send(first)
        elif event.id == "image_lost":
            driver.resend_lost(event.metadata, {"image_generation": "draw"})
        elif event.id == "image":
            driver.answered(event.request_id)
            pixels = event.decode(Image).pixels
            arrow_pixels = event.value.field("pixels").flatten()
            report["images"][event.request_id] = {
                "shape": list(pixels.shape), "dtype": str(pixels.dtype),
                "sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
                "mean": float(pixels.mean()), "model": event.metadata.get("model", ""),
                # decoded in place: the numpy array is the Arrow buffer dora handed over
                "in_place": pixels.ctypes.data == arrow_pixels.buffers()[1].address
                and not pixels.flags.owndata,
            }
        elif event.id == "image_error":
            error = event.error()
            driver.answered(error.request_id)
            report["errors"][error.request_id] = record(error)
            if len(report["errors"]) == 2 and "apple-seed-4" not in driver.sent:
                send(after_errors)
        if len(driver.answers) == len(first) + len(after_errors):
            break
    report["order"] = driver.answers
    report["resent"], report["lost_on_inputs"] = driver.resent, driver.node.gaps.lost()
    driver.write(report)


if __name__ == "__main__":
    main()
