"""``omni status``: read the scheduler's status from a running graph, and show it."""

from __future__ import annotations

import time

from mofa_omni.control import CONTROL_NODE, STATUS_OUTPUT, Status, from_arrow
from mofa_omni.memory import format_bytes


class GraphUnreachable(RuntimeError):
    """No running dataflow with a scheduler could be reached."""


def fetch_status(timeout_s: float = 5.0) -> Status:
    """The latest status, read through the dataflow's dynamic ``omni-control`` node."""
    from dora import Node

    try:
        node = Node(CONTROL_NODE)
    except RuntimeError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise GraphUnreachable(
            f"no running dataflow declares the dynamic node {CONTROL_NODE!r} "
            f"(is a graph with a scheduler running, started from this machine?): {first_line}"
        ) from None
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        event = node.next(timeout=left)
        if event is None:
            break
        if event["type"] == "INPUT" and event["id"] == STATUS_OUTPUT:
            message = from_arrow(event["value"])
            if isinstance(message, Status):
                return message
    raise GraphUnreachable(f"the graph sent no status within {timeout_s:g} s "
                           f"(does {CONTROL_NODE!r} take the scheduler's status as input?)")


def render_status(status: Status) -> str:
    """The status as a table: memory, then each node, then the last decisions."""
    lines = [
        f"budget     {format_bytes(status.budget)}; used {format_bytes(status.used)} (reserved), "
        f"{format_bytes(status.measured)} measured, peak {format_bytes(status.peak_measured)}",
        f"system     {format_bytes(status.available)} available of {format_bytes(status.total)}"
        f" (keeps {format_bytes(status.min_available)} free)",
        "pipelines  " + "; ".join(
            " + ".join(group) + (" (active)" if i in status.active else "")
            for i, group in enumerate(status.pipelines)),
        "",
        f"{'node':14} {'model':20} {'wants':20} {'state':12} {'resident':>10} {'model':>10} "
        f"{'queue':>5}",
    ]
    for n in status.nodes:
        wants = n.wanted if n.wanted != n.model else ""
        lines.append(f"{n.node:14} {n.model:20} {wants:20} {n.state:12} "
                     f"{format_bytes(n.rss):>10} {format_bytes(n.model_bytes):>10} {n.queue:>5}")
    if status.decisions:
        lines += ["", "last decisions"]
        for d in status.decisions[-10:]:
            lines.append(f"  {d.at:8.1f} s  {d.action:7} {d.node:12} {d.model:20} {d.reason}")
    return "\n".join(lines)
