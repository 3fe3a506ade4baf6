"""What the scheduler learns from the dataflow descriptor: its model nodes and their pipelines.

Two model nodes form a pipeline when data flows from one to the other, through
any number of other nodes (whisper -> dialogue -> LLM): serving one request
then needs both loaded at once. Edges to and from the scheduler itself and
dynamic nodes (``omni`` commands) carry control, not data, and are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mofa_omni.node.wiring import input_source
from mofa_omni.scheduler.messages import COMMAND_OUTPUT, MEMORY_OUTPUT


@dataclass(frozen=True, slots=True)
class ScheduledGraph:
    model_nodes: tuple[str, ...]  # nodes that take the scheduler's commands
    memory_inputs: dict[str, str]  # the scheduler's input id -> the model node reporting on it
    pipelines: tuple[frozenset[str], ...]
    machine_of: dict[str, str] = field(default_factory=dict)  # node -> its deploy: machine
    home: str = ""  # the scheduler's own machine

    @property
    def machines(self) -> tuple[str, ...]:
        """The machines the model nodes and the scheduler run on ("" when none is named)."""
        return tuple(sorted({self.home, *(self.machine_of.get(n, self.home)
                                          for n in self.model_nodes)}))


def machine_of(descriptor: dict[str, Any]) -> dict[str, str]:
    """Each node's machine: its ``deploy: {machine: ...}``, else the dataflow's, else absent."""
    default = ((descriptor.get("deploy") or {}).get("machine")) or ""
    placed = {}
    for n in descriptor.get("nodes", []):
        machine = ((n.get("deploy") or {}).get("machine")) or default
        if machine:
            placed[n["id"]] = machine
    return placed


def scheduled_graph(descriptor: dict[str, Any], scheduler: str) -> ScheduledGraph:
    """The model nodes ``scheduler`` commands, the inputs they report on, and their pipelines."""
    nodes = {n["id"]: n for n in descriptor.get("nodes", [])}
    control = {scheduler} | {i for i, n in nodes.items() if n.get("path") == "dynamic"}
    model_nodes = tuple(sorted(
        i for i, n in nodes.items()
        if any(input_source(s) == f"{scheduler}/{COMMAND_OUTPUT}" for s in (n.get("inputs") or {}).values())))
    memory_inputs = {}
    for input_id, spec in (nodes.get(scheduler, {}).get("inputs") or {}).items():
        source_node, _, output = input_source(spec).partition("/")
        if source_node in model_nodes and output == MEMORY_OUTPUT:
            memory_inputs[input_id] = source_node

    downstream: dict[str, set[str]] = {i: set() for i in nodes}
    for target, n in nodes.items():
        for spec in (n.get("inputs") or {}).values():
            source_node = input_source(spec).partition("/")[0]
            if source_node in nodes and not {source_node, target} & control:
                downstream[source_node].add(target)

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for following in downstream[todo.pop()] - seen:
                seen.add(following)
                todo.append(following)
        return seen

    reach = {m: reachable(m) for m in model_nodes}
    pipelines: list[frozenset[str]] = []
    for m in model_nodes:
        group = frozenset({m} | {other for other in model_nodes
                                 if other in reach[m] or m in reach[other]})
        if len(group) > 1 and group not in pipelines:
            pipelines.append(group)
    for m in model_nodes:  # a model that works with no other still forms a pipeline of its own
        if not any(m in group for group in pipelines):
            pipelines.append(frozenset({m}))
    placed = machine_of(descriptor)
    home = placed.get(scheduler, "")
    return ScheduledGraph(model_nodes, memory_inputs, tuple(pipelines),
                          {n: placed.get(n, home) for n in model_nodes}, home)
