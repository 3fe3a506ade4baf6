"""``omni status`` and ``omni swap``: talk to a running graph through its dynamic control node.

A dataflow with a scheduler declares the dynamic node ``omni-control`` (inputs:
the scheduler's ``status``; outputs: ``control``, which the scheduler takes).
Each command connects as that node, asks or listens, and leaves; dora lets it
connect again later. dora cannot tell which graph's ``omni-control`` is meant
when several running graphs declare it: a graph meant to run beside others names
its control node ``omni-control-NAME`` and commands are given ``--dataflow NAME``.

Only one process at a time can be a dynamic node: dora keeps one event channel per
node id, so a second connection takes the first one's events, and the first to
leave removes the channel of the one still waiting. Commands on one machine
therefore take turns, through a lock file held while connected.
"""

from __future__ import annotations

import fcntl
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from mofa_omni.contract.errors import ServerError
from mofa_omni.scheduler.messages import (
    CONTROL_NODE,
    CONTROL_OUTPUT,
    STATUS_OUTPUT,
    Status,
    SwapAsk,
    SwapOutcome,
    from_arrow,
    to_arrow,
)


class GraphUnreachable(ServerError):
    """No running dataflow with a scheduler could be reached."""


Answer = TypeVar("Answer")
TURN_WAIT_S = 900.0  # as long as the longest swap: a command waits for the one before it
# While a graph runs, the daemon may refuse the control node for a moment: the command before
# this one has left, but the daemon has not yet handled its leaving. Try again this long.
CONNECT_RETRY_S = 10.0


def lock_path(dataflow: str | None) -> Path:
    """The lock file through which commands on this machine take turns on a graph."""
    return Path(tempfile.gettempdir()) / f"mofa-omni-{CONTROL_NODE}-{dataflow or 'default'}.lock"


@contextmanager
def taking_turns(dataflow: str | None, timeout_s: float) -> Iterator[None]:
    """Hold this machine's turn on the graph's control node; wait up to ``timeout_s`` for it
    while another command holds it."""
    deadline = time.monotonic() + timeout_s
    with lock_path(dataflow).open("a") as lock:
        told = False
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise GraphUnreachable(
                        f"another omni command held the graph's control node for "
                        f"{timeout_s:g} s (lock {lock.name})") from None
                if not told:
                    print("waiting for another omni command on this graph to finish",
                          file=sys.stderr)
                    told = True
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def over_control_node(dataflow: str | None, talk: Callable[..., Answer]) -> Answer:
    """``talk(node)`` over the graph's control node, connected in this machine's turn. The node
    is gone before the turn passes on: a node still alive then would, on leaving, remove the
    next command's event channel."""
    with taking_turns(dataflow, TURN_WAIT_S):
        node = connect(dataflow)
        try:
            return talk(node)
        except BaseException as error:
            error.__traceback__ = None  # its frames hold the node: let them go with it
            raise
        finally:
            del node
            gc.collect()


def running_dataflows() -> list[dict]:
    """``dora list``'s running dataflows (uuid, name), or [] if no coordinator answers."""
    if not shutil.which("dora"):
        return []
    try:
        listing = subprocess.run(["dora", "list", "--format", "json"], check=False,
                                 capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired:
        return []
    flows = []
    for line in listing.stdout.splitlines():
        try:
            flow = json.loads(line)
        except json.JSONDecodeError:
            continue
        if flow.get("status") == "Running":
            flows.append(flow)
    return flows


def _describe(flow: dict) -> str:
    return flow.get("name") or flow["uuid"]


def dora_reason(error: Exception) -> str:
    """dora's refusal in one line: what failed and, where it says, why (the last line of its
    "Caused by:" chain, e.g. that several dataflows declare the node)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[0] if len(lines) == 1 or lines[-1] == "Caused by:" else \
        f"{lines[0]} ({lines[-1]})"


def _connect_retrying(node_class, dataflow: str | None):
    """``Node(CONTROL_NODE)``, tried again for up to CONNECT_RETRY_S while one graph runs."""
    deadline = time.monotonic() + CONNECT_RETRY_S
    while True:
        try:
            return node_class(CONTROL_NODE)
        except RuntimeError as error:
            running = running_dataflows()
            if len(running) == 1 and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            reason = dora_reason(error)
        if len(running) > 1 or "multiple dataflows" in reason:
            names = f" ({', '.join(map(_describe, running))})" if running else ""
            hint = (f"several dataflows are running{names} and dora cannot tell whose "
                    f"{CONTROL_NODE!r} is meant: name each graph's control node "
                    f"'{CONTROL_NODE}-NAME' and pass --dataflow NAME")
        else:
            hint = (f"no running dataflow declares the dynamic node {CONTROL_NODE!r}"
                    + (f"-{dataflow}" if dataflow else "")
                    + " (is a graph with a scheduler running, started from this machine?)")
        raise GraphUnreachable(f"{hint}: {reason}")


def connect(dataflow: str | None = None):
    """The dora node through which to reach the graph (``dataflow``: its name or UUID)."""
    from dora import Node

    if dataflow:
        try:
            return Node(f"{CONTROL_NODE}-{dataflow}")
        except RuntimeError:
            pass  # the graph may declare the plain control node: checked below
    node = _connect_retrying(Node, dataflow)
    if dataflow and dataflow not in {node.dataflow_id(), *(
            _describe(f) for f in running_dataflows() if f["uuid"] == node.dataflow_id())}:
        raise GraphUnreachable(f"the running graph with {CONTROL_NODE!r} is "
                               f"{node.dataflow_id()}, not {dataflow!r}")
    return node


def _messages(node, timeout_s: float):
    """Control messages from the scheduler's ``status`` output, until ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        event = node.next(timeout=left)
        if event is None:
            return
        if event["type"] == "INPUT" and event["id"] == STATUS_OUTPUT:
            yield from_arrow(event["value"])


def fetch_status(timeout_s: float = 5.0, dataflow: str | None = None) -> Status:
    """The scheduler's latest status."""
    def talk(node) -> Status:
        for message in _messages(node, timeout_s):
            if isinstance(message, Status):
                return message
        raise GraphUnreachable(f"the graph sent no status within {timeout_s:g} s (does "
                               f"{CONTROL_NODE!r} take the scheduler's status as input?)")
    return over_control_node(dataflow, talk)


def swap(node_id: str, model: str, timeout_s: float = 600.0,
         dataflow: str | None = None) -> SwapOutcome:
    """Ask the graph to serve ``model`` on ``node_id``; the outcome once the node has swapped
    (or failed to). Raises :class:`GraphUnreachable` if no outcome comes within ``timeout_s``."""
    ask = SwapAsk(uuid.uuid4().hex[:12], node_id, model)

    def talk(node) -> SwapOutcome:
        node.send_output(CONTROL_OUTPUT, to_arrow(ask))
        seen_status = False
        for message in _messages(node, timeout_s):
            if isinstance(message, SwapOutcome) and message.swap_id == ask.swap_id:
                return message
            seen_status |= isinstance(message, Status)
        if not seen_status:
            raise GraphUnreachable(f"the graph sent nothing within {timeout_s:g} s (does "
                                   f"{CONTROL_NODE!r} take the scheduler's status as input?)")
        raise GraphUnreachable(f"the swap of {node_id} to {model} did not end within "
                               f"{timeout_s:g} s (does the scheduler take {CONTROL_NODE}/"
                               f"{CONTROL_OUTPUT} as an input?)")
    return over_control_node(dataflow, talk)
