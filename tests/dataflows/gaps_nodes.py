"""The two nodes of tests/dataflows/gaps.yml: `burst` sends MESSAGES numbered messages at once;
`read` reads them slowly and writes what it received and what it counted as lost to $REPORT.

Once the burst is out, `burst` waits for the reader to drain its queue and sends one more
message, the end mark (number MESSAGES), then stays until `read` has it: dora drops what is
still queued from a sender that has exited, and under load it may drop the burst's newest
messages too, so only a message sent into an empty queue is sure to arrive."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pyarrow as pa

from mofa_omni.node.integrity import CheckedNode


def burst() -> None:
    node = CheckedNode()
    sent = False
    for event in node:
        if event["type"] == "INPUT" and event["id"] == "tick" and not sent:
            sent = True
            messages = int(os.environ["MESSAGES"])
            for i in range(messages):
                node.send_output("numbers", pa.array([i]))
            time.sleep(1.0)  # the reader empties its queue of 2 in ~10 ms
            node.send_output("numbers", pa.array([messages]))  # the end mark
        elif event["type"] == "INPUT" and event["id"] == "done":
            return


def read() -> None:
    node = CheckedNode()
    values, end_mark = [], int(os.environ["MESSAGES"])
    for event in node:
        if event["type"] == "INPUT":
            values.append(event["value"][0].as_py())
            time.sleep(0.005)
            if values[-1] == end_mark:
                node.send_output("done", pa.array([True]))
    Path(os.environ["REPORT"]).write_text(json.dumps({"values": values,
                                                       "lost": node.gaps.lost()}))


if __name__ == "__main__":
    {"burst": burst, "read": read}[sys.argv[1]]()
