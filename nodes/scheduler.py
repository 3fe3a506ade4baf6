"""scheduler: keeps the graph's models inside a memory budget (see runtime/scheduler/policy.py).

Configuration (env in the dataflow YAML):
    BUDGET          memory for the model processes: bytes ("1.5GiB", "800MB") or a fraction of
                    physical memory ("0.5", "50%"); default: Metal's recommended working set
                    on Apple Silicon, 70% of physical memory elsewhere. A graph on several
                    machines has one budget per machine: one value is each machine's, or
                    per machine "A=4GiB,B=70%" (a fraction of that machine's memory)
    MIN_AVAILABLE   system memory to keep available; below it, models are evicted or stepped
                    down until it is back (default: 10% of physical memory; per machine as
                    BUDGET)
    MACHINE_SILENT_S  on several machines: a machine none of whose model nodes reported for this
                    long is lost, its models unavailable, until they speak again (default 10)
    STEP_UP_MARGIN  available memory, beyond MIN_AVAILABLE, that a step back up must leave
                    (default 512MiB)
    CALM_S          no step back up until memory was short this long ago (default 10)
    WAIT_S          how long a load may wait for memory before it is refused (default 60)
    ACTIVE_S        a pipeline stays active this long after its last request (default 30)
    TICK_S          how often memory is read and waiting loads retried (default 0.5)
    STATUS_FILE     if set, the latest status is also written there as JSON (tests, benchmarks)
    JOURNAL         if set, every policy event and its decisions are appended there as JSON
                    lines, which mofa_omni.scheduler.bookkeeping.replay checks against the policy

Every model node it manages declares ``scheduler: <this node>/command`` as an input and
``memory`` as an output, which this node takes as an input (any input id). The pipelines
come from the dataflow itself. Output ``status`` (read by ``omni status`` through the
dynamic ``omni-control`` node) is sent on every decision and every second, and carries
the outcome of every swap. ``omni swap`` asks through an input taken from the dynamic
node's ``control`` output (``control: omni-control/control``).

On several machines (``deploy: {machine: ...}`` in the dataflow), the model nodes' machines
come from the dataflow; this node measures its own machine and each model node reports its
own machine's memory, so every machine is scheduled inside its own budget.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import msgspec
import psutil

from mofa_omni.config import env_float, env_str, exit_on_bad_settings
from mofa_omni.contract.errors import ConfigError, ContractError
from mofa_omni.models.compute import LINUX_BUDGET_FRACTION, default_memory_budget
from mofa_omni.models.memory import format_bytes, parse_size
from mofa_omni.node.host import dora_node_id
from mofa_omni.node.integrity import CheckedNode
from mofa_omni.scheduler.bookkeeping import Scheduling
from mofa_omni.scheduler.graph import scheduled_graph
from mofa_omni.scheduler.messages import (
    COMMAND_OUTPUT,
    STATUS_OUTPUT,
    SwapAsk,
    from_arrow,
    to_arrow,
)
from mofa_omni.scheduler.policy import Cluster, SchedulerState

log = logging.getLogger("scheduler")

STATUS_EVERY_S = 1.0


def write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)


def for_machine(setting: str, machine: str) -> str:
    """A setting's value for ``machine``: the whole value, or its ``machine=value`` entry from
    "A=4GiB,B=70%" ("" when the machine has none)."""
    if "=" not in setting:
        return setting
    entries = dict(entry.strip().partition("=")[::2] for entry in setting.split(",") if entry.strip())
    return entries.get(machine, "").strip()


def size_setting(name: str, value: str, total: int) -> int:
    """:func:`parse_size` of setting ``name``'s ``value``; a bad one names the setting."""
    try:
        return parse_size(value, total)
    except ConfigError as error:
        raise ConfigError(f"{name}: {error}") from None


def machine_memory(machine: str, total: int, here: bool) -> tuple[int, int]:
    """``machine``'s budget and minimum available memory from BUDGET and MIN_AVAILABLE; ``here``:
    it is this node's own machine (then Metal's working set can be asked for the default)."""
    budget_setting = for_machine(env_str("BUDGET", ""), machine)
    if budget_setting:
        budget, why = size_setting("BUDGET", budget_setting, total), "BUDGET"
    elif here:
        budget, why = default_memory_budget()
    else:
        budget, why = int(total * LINUX_BUDGET_FRACTION), \
            f"{LINUX_BUDGET_FRACTION:.0%} of its physical memory"
    log.info("budget%s %s (%s); %s physical", f" of machine {machine}" if machine else "",
             format_bytes(budget), why, format_bytes(total))
    minimum = for_machine(env_str("MIN_AVAILABLE", ""), machine) or "0.1"
    return budget, size_setting("MIN_AVAILABLE", minimum, total)


def settings_from_env(total: int, machine: str = "") -> SchedulerState:
    budget, min_available = machine_memory(machine, total, here=True)
    return SchedulerState(
        budget=budget,
        min_available=min_available,
        step_up_margin=size_setting("STEP_UP_MARGIN", env_str("STEP_UP_MARGIN", "512MiB"), total),
        calm_seconds=env_float("CALM_S", 10),
        wait_seconds=env_float("WAIT_S", 60),
        active_seconds=env_float("ACTIVE_S", 30),
    )


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    total = psutil.virtual_memory().total
    with exit_on_bad_settings("scheduler"):
        tick_s = env_float("TICK_S", 0.5)
        silent_after = env_float("MACHINE_SILENT_S", 10)
        journal_path, status_file = env_str("JOURNAL", ""), env_str("STATUS_FILE", "")
    node = CheckedNode()
    graph = scheduled_graph(node.dataflow_descriptor(), dora_node_id("scheduler"))
    if not graph.model_nodes:
        log.warning("no model node takes this scheduler's commands: nothing to schedule")
    with exit_on_bad_settings("scheduler"):  # BUDGET and MIN_AVAILABLE may name the machines
        # Until another machine's first node tells its memory, it is sized like this one.
        states = {machine: settings_from_env(total, machine) for machine in graph.machines}
    for state in states.values():
        state.pipelines = list(graph.pipelines)
    log.info("pipelines: %s", "; ".join(" + ".join(sorted(p)) for p in graph.pipelines))
    if len(states) > 1:
        log.info("machines: %s; this one is %s", ", ".join(
            f"{m} ({', '.join(n for n in graph.model_nodes if graph.machine_of[n] == m) or '-'})"
            for m in states), graph.home)
    started = time.monotonic()
    journal = open(journal_path, "wb") if journal_path else None
    scheduling = Scheduling(
        Cluster(states, dict(graph.machine_of)), graph.model_nodes, started, journal=journal,
        home=graph.home, size_machine=lambda machine, size: machine_memory(machine, size, False),
        silent_after=silent_after)
    open_inputs = set(graph.memory_inputs)
    last_tick = last_status = 0.0

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
        if event["type"] in ("NODE_RESTARTED", "NODE_FAILED") and \
                event["id"] in graph.model_nodes:  # dora's restart_policy at work
            commands += scheduling.node_crashed(event["id"], now,
                                                for_good=event["type"] == "NODE_FAILED")
        elif event["type"] == "INPUT_CLOSED" and event["id"] in open_inputs:
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
