"""benchmarks/transport.py's sending node: each case of $TRANSPORT_PLAN (a JSON list of
{"label", "dtype", "shape", "warmup", "reps"}) is sent ping-pong to the receiver, the next
message only once the receiver's ack came back; the one-way latencies the acks carry and each
case's loop time go to $TRANSPORT_RESULT (JSON). A send that dora refuses (a payload too large
for its transport) is recorded as the case's "error" and the run goes on."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from dora import Node

ACK_TIMEOUT_S = 60


def build_payload(dtype: str, shape: list[int]) -> np.ndarray:
    """Random content, so that every page is really there (no lazily mapped zero pages)."""
    rng = np.random.default_rng(0)
    if dtype == "uint8":
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    return rng.random(shape, dtype=np.float32)


def as_arrow(payload: np.ndarray) -> pa.Array:
    """A flat Arrow array over the payload's own memory (no copy)."""
    flat = payload.reshape(-1)
    array = pa.array(flat)
    assert array.buffers()[1].address == flat.__array_interface__["data"][0], "pa.array copied"
    return array


def dora_cause(error: RuntimeError) -> str:
    """The innermost cause of a dora error ("internal error / Caused by: / 0: ... / 1: ...")."""
    causes = [line.strip() for line in str(error).split("Location:")[0].splitlines()]
    numbered = [re.sub(r"^\d+: ", "", line) for line in causes if re.match(r"^\d+: ", line)]
    return numbered[-1] if numbered else str(error).strip()


def wait_for_ack(node: Node, seq: int) -> dict:
    while True:
        event = node.next(timeout=ACK_TIMEOUT_S)
        if event is None or event["type"] == "STOP":
            raise RuntimeError(f"no ack for message {seq}")
        if event["type"] == "INPUT" and event["id"] == "ack":
            ack = event["metadata"]
            if ack["seq"] == seq:
                return ack


def run_case(node: Node, case: dict) -> dict:
    payload = build_payload(case["dtype"], case["shape"])
    array = as_arrow(payload)
    meta = {"shape": case["shape"], "dtype": case["dtype"]}
    latencies_ns, started = [], time.perf_counter()
    for seq in range(case["warmup"] + case["reps"]):
        if seq == case["warmup"]:
            latencies_ns, started = [], time.perf_counter()
        sent_ns = time.monotonic_ns()
        try:
            node.send_output("payload", array, {**meta, "seq": seq, "sent_ns": sent_ns})
        except RuntimeError as error:
            return {"label": case["label"], "error": dora_cause(error)}
        latencies_ns.append(wait_for_ack(node, seq)["latency_ns"])
    return {"label": case["label"], "latencies_ns": latencies_ns,
            "elapsed_s": time.perf_counter() - started}


def main() -> None:
    plan = json.loads(os.environ["TRANSPORT_PLAN"])
    node = Node()
    results = [run_case(node, case) for case in plan]
    Path(os.environ["TRANSPORT_RESULT"]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
