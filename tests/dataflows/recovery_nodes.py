"""The two nodes of tests/test_recovery.py's graph: `ticker` (machine A) passes its timer's
ticks on; `listener` (machine B) appends its process id to $HEARD for every tick it gets, so
that a tick that crossed from A to B after a restart shows a new process."""

from __future__ import annotations

import os
import sys

import pyarrow as pa
from dora import Node


def ticker() -> None:
    node = Node()
    for event in node:
        if event["type"] == "INPUT":
            node.send_output("tick", pa.array([1]))


def listener() -> None:
    node = Node()
    for event in node:
        if event["type"] == "INPUT":
            with open(os.environ["HEARD"], "a") as heard:
                heard.write(f"{os.getpid()}\n")


if __name__ == "__main__":
    {"ticker": ticker, "listener": listener}[sys.argv[1]]()
