"""scheduler: keeps the graph's models inside a memory budget (see runtime/scheduler.py).

Configuration (env in the dataflow YAML):
    BUDGET          memory for the model processes: bytes ("1.5GiB", "800MB") or a fraction of
                    physical memory ("0.5", "50%"); default: Metal's recommended working set
                    on Apple Silicon, 70% of physical memory elsewhere
    MIN_AVAILABLE   system memory to keep available; below it, models are evicted or stepped
                    down until it is back (default: 10% of physical memory)
    STEP_UP_MARGIN  available memory, beyond MIN_AVAILABLE, that a step back up must leave
                    (default 512MiB)
    CALM_S          no step back up until memory was short this long ago (default 10)
    WAIT_S          how long a load may wait for memory before it is refused (default 60)
    ACTIVE_S        a pipeline stays active this long after its last request (default 30)
    TICK_S          how often memory is read and waiting loads retried (default 0.5)
    STATUS_FILE     if set, the latest status is also written there as JSON (tests, benchmarks)
    JOURNAL         if set, every policy event and its decisions are appended there as JSON
                    lines, which mofa_omni.scheduling.replay checks against the policy

Every model node it manages declares ``scheduler: <this node>/command`` as an input and
``memory`` as an output, which this node takes as an input (any input id). The pipelines
come from the dataflow itself. Output ``status`` (read by ``omni status`` through the
dynamic ``omni-control`` node) is sent on every decision and every second, and carries
the outcome of every swap. ``omni swap`` asks through an input taken from the dynamic
node's ``control`` output (``control: omni-control/control``).
"""

from __future__ import annotations

import logging
import os
import sys
import time

from pathlib import Path

import msgspec
import psutil
from mofa_omni.contract import ContractError
from mofa_omni.control import COMMAND_OUTPUT, STATUS_OUTPUT, SwapAsk, from_arrow, to_arrow
from mofa_omni.graph import scheduled_graph
from mofa_omni.host import dora_node_id
from mofa_omni.integrity import CheckedNode
from mofa_omni.memory import format_bytes, parse_size
from mofa_omni.platform import default_memory_budget
from mofa_omni.scheduler import SchedulerState
from mofa_omni.scheduling import Scheduling

log = logging.getLogger("scheduler")

STATUS_EVERY_S = 1.0


def write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)


def settings_from_env(total: int) -> SchedulerState:
    env = os.environ.get
    if env("BUDGET"):
        budget, why = parse_size(env("BUDGET"), total), "BUDGET"
    else:
        budget, why = default_memory_budget()
    log.info("budget %s (%s); %s physical", format_bytes(budget), why, format_bytes(total))
    return SchedulerState(
        budget=budget,
        min_available=parse_size(env("MIN_AVAILABLE", "0.1"), total),
        step_up_margin=parse_size(env("STEP_UP_MARGIN", "512MiB"), total),
        calm_seconds=float(env("CALM_S", "10")),
        wait_seconds=float(env("WAIT_S", "60")),
        active_seconds=float(env("ACTIVE_S", "30")),
    )


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    total = psutil.virtual_memory().total
    try:
        state = settings_from_env(total)
    except ValueError as error:
        print(f"scheduler: {error}", file=sys.stderr)
        return 2
    tick_s = float(os.environ.get("TICK_S", "0.5"))

    node = CheckedNode()
    graph = scheduled_graph(node.dataflow_descriptor(), dora_node_id("scheduler"))
    if not graph.model_nodes:
        log.warning("no model node takes this scheduler's commands: nothing to schedule")
    state.pipelines = list(graph.pipelines)
    log.info("pipelines: %s", "; ".join(" + ".join(sorted(p)) for p in graph.pipelines))
    started = time.monotonic()
    journal = open(os.environ["JOURNAL"], "wb") if os.environ.get("JOURNAL") else None
    scheduling = Scheduling(state, graph.model_nodes, started, journal=journal)
    open_inputs = set(graph.memory_inputs)
    last_tick = last_status = 0.0
    status_file = os.environ.get("STATUS_FILE")

    def publish_status(now: float, available: int):
        status = scheduling.status(now, available, total, node.gaps.lost())
        node.send_output(STATUS_OUTPUT, to_arrow(status))
        if status_file:
            write_atomically(Path(status_file), msgspec.json.encode(status))
        return status

    while open_inputs:
        event = node.next(timeout=tick_s)
        if event is None:
            break
        now = time.monotonic()
        commands = []
        if event["type"] == "INPUT_CLOSED" and event["id"] in open_inputs:
            open_inputs.discard(event["id"])
            commands += scheduling.node_left(graph.memory_inputs[event["id"]], now)
        elif event["type"] == "INPUT" and event["id"] in graph.memory_inputs:
            try:
                commands += scheduling.on_message(from_arrow(event["value"]), now)
            except ContractError as error:
                log.error("from %s: %s", graph.memory_inputs[event["id"]], error)
        elif event["type"] == "INPUT":  # from omni-control: omni swap
            try:
                message = from_arrow(event["value"])
                if not isinstance(message, SwapAsk):
                    raise ContractError(f"expected a swap request, got {type(message).__name__}")
                commands += scheduling.on_message(message, now)
            except ContractError as error:
                log.error("on input %s: %s", event["id"], error)
        tick_due = now - last_tick >= tick_s
        status_due = commands or tick_due or now - last_status >= STATUS_EVERY_S
        available = psutil.virtual_memory().available if status_due else 0
        if tick_due:
            commands += scheduling.on_tick(now, available)
            last_tick = now
        for command in commands:
            node.send_output(COMMAND_OUTPUT, to_arrow(command))
        for outcome in scheduling.take_outcomes():
            node.send_output(STATUS_OUTPUT, to_arrow(outcome))
        if commands or now - last_status >= STATUS_EVERY_S:
            publish_status(now, available)
            last_status = now
    status = publish_status(time.monotonic(), psutil.virtual_memory().available)
    if journal:
        journal.close()
    log.info("all model nodes have finished; peak %s of a %s budget",
             format_bytes(status.peak_measured), format_bytes(status.budget))
    return 0


if __name__ == "__main__":
    sys.exit(main())
