"""The two nodes of tests/dataflows/gaps.yml: `burst` sends MESSAGES numbered messages at once;
`read` reads them slowly and writes what it received and what it counted as lost to $REPORT.

`burst` stays until `read` has the last message: dora drops what is still queued from a
sender that has exited (its shared memory goes with it)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pyarrow as pa

from mofa_omni.integrity import CheckedNode


def burst() -> None:
    node = CheckedNode()
    sent = False
    for event in node:
        if event["type"] == "INPUT" and event["id"] == "tick" and not sent:
            sent = True
            for i in range(int(os.environ["MESSAGES"])):
                node.send_output("numbers", pa.array([i]))
        elif event["type"] == "INPUT" and event["id"] == "done":
            return


def read() -> None:
    node = CheckedNode()
    values, last = [], int(os.environ["MESSAGES"]) - 1
    for event in node:
        if event["type"] == "INPUT":
            values.append(event["value"][0].as_py())
            time.sleep(0.005)
            if values[-1] == last:
                node.send_output("done", pa.array([True]))
    Path(os.environ["REPORT"]).write_text(json.dumps({"values": values,
                                                       "lost": node.gaps.lost()}))


if __name__ == "__main__":
    {"burst": burst, "read": read}[sys.argv[1]]()
