"""benchmarks/transport.py's receiving node: each payload is read through a zero-copy numpy view
of dora's message, shaped as sent; its ack carries the one-way latency (monotonic clock, the
view in hand minus the sender's time just before sending)."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
from dora import Node


def payload_view(event: dict) -> np.ndarray:
    meta = event["metadata"]
    flat = event["value"].to_numpy(zero_copy_only=True)
    return flat.view(np.dtype(meta["dtype"])).reshape(meta["shape"])


def main() -> None:
    node = Node()
    for event in node:
        if event["type"] != "INPUT" or event["id"] != "payload":
            continue
        view = payload_view(event)
        received_ns = time.monotonic_ns()
        meta = event["metadata"]
        assert view.nbytes == np.dtype(meta["dtype"]).itemsize * int(np.prod(meta["shape"]))
        del view, event  # give the shared memory back before the sender's next message
        node.send_output("ack", pa.array([meta["seq"]]),
                         {"seq": meta["seq"], "latency_ns": received_ns - meta["sent_ns"]})


if __name__ == "__main__":
    main()
