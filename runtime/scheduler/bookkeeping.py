"""The scheduler node's bookkeeping, without dora: control messages in, commands and status out.

Turns each model node's :class:`LoadAsk` / :class:`NodeReport` into events of
the pure policy (:mod:`mofa_omni.scheduler.policy`), turns its decisions into
:class:`Command` messages, remembers what every node last reported and the last
decisions with their reasons, and builds the :class:`Status` ``omni status`` shows.
A :class:`SwapAsk` from ``omni swap`` is checked against the catalog (the node
exists, the model is known and serves the node's task) before the policy decides;
how each swap ends waits in :attr:`Scheduling.outcomes` for the node to publish.

A graph on several machines is scheduled machine by machine (a
:class:`~mofa_omni.scheduler.policy.Cluster`): each node's messages carry its own
machine's memory, which sizes that machine's budget and measures its pressure;
a machine none of whose nodes was heard for ``silent_after`` seconds is lost
(its models shown ``unavailable``) until one of them speaks again.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO

import msgspec

from mofa_omni.contract.errors import ContractError
from mofa_omni.models.catalog import Catalog
from mofa_omni.models.memory import format_bytes
from mofa_omni.scheduler.messages import (
    Command,
    ControlMessage,
    DecisionRecord,
    Delivery,
    LoadAsk,
    MachineStatus,
    NodeReport,
    NodeStatus,
    Status,
    SwapAsk,
    SwapOutcome,
)
from mofa_omni.scheduler.policy import (
    Activity,
    Cluster,
    Decision,
    Decline,
    Departed,
    Evict,
    Grant,
    Loaded,
    LoadFailed,
    LoadRequest,
    MachineLost,
    MachineMemory,
    Measured,
    ParallelSet,
    Refuse,
    Replace,
    SchedulerState,
    SetParallel,
    SwapFailed,
    Swapped,
    SwapRequest,
    Switch,
    Tick,
    Unloaded,
    Wait,
    decide_cluster,
)

log = logging.getLogger("mofa_omni.scheduler.bookkeeping")

DEFAULT_OVERHEAD = 200 << 20  # a model process before it reports (measured 185-225 MiB)
ACTIONS = {Grant: "load", Evict: "unload", Switch: "switch", Wait: "wait", Refuse: "refuse",
           Replace: "swap", Decline: "decline", SetParallel: "parallel"}
_DECISION_TYPES = {cls.__name__: cls for cls in ACTIONS}
_EVENT_TYPES = {cls.__name__: cls for cls in (LoadRequest, Loaded, LoadFailed, Unloaded, Departed,
                                               Activity, Measured, Tick, SwapRequest, Swapped,
                                               SwapFailed, MachineLost, MachineMemory,
                                               ParallelSet)}
SILENT_AFTER_S = 10.0  # model nodes report every second: this long without one, a machine is lost
SizeMachine = Callable[[str, int], tuple[int, int]]  # (machine, physical) -> budget, min_available


@dataclass
class _NodeView:
    model: str = ""
    wanted: str = ""
    state: str = "starting"
    rss: int = 0
    model_bytes: int = 0
    queue: int = 0
    lost: dict[str, int] = field(default_factory=dict)
    delivery: Delivery = Delivery()
    restarts: int = 0
    parallel: int = 0  # requests it decodes together at most, as last reported
    wanted_parallel: int = 0


def journal_entry(event, decisions: list[Decision]) -> dict:
    return {"event": type(event).__name__, "fields": event,
            "decisions": [{"type": type(d).__name__, "fields": d} for d in decisions]}


def replay(lines: list[bytes]) -> Iterator[tuple[list[Decision], list[Decision], int]]:
    """Feed a journal's events to the policy afresh: per event, the recorded decisions, the
    replayed ones, and the memory the policy counts as used afterwards.

    The journal's first line is the policy's initial state (one machine's, or a cluster's);
    the rest are events. The memory used is summed over the machines."""
    first = msgspec.json.decode(lines[0])
    if "machines" in first:
        cluster = msgspec.json.decode(lines[0], type=Cluster)
    else:
        cluster = Cluster({"": msgspec.json.decode(lines[0], type=SchedulerState)})
    for state in cluster.machines.values():
        state.pipelines = [frozenset(group) for group in state.pipelines]
    for line in lines[1:]:
        entry = msgspec.json.decode(line)
        event = msgspec.convert(entry["fields"], type=_EVENT_TYPES[entry["event"]])
        recorded = [msgspec.convert(d["fields"], type=_DECISION_TYPES[d["type"]])
                    for d in entry["decisions"]]
        replayed = decide_cluster(cluster, event)
        yield recorded, replayed, sum(m.used_bytes() for m in cluster.machines.values())


class Scheduling:
    """One scheduler's state: the policy's, what nodes reported, and the decision log.

    ``state`` is one machine's policy state, or a :class:`Cluster` of them for a graph on
    several machines; ``home`` is the scheduler's own machine (measured by the caller, its
    ``available`` passed to :meth:`on_tick`). ``size_machine`` gives another machine's budget
    and minimum available memory from its physical memory, once its first node tells it.
    """

    def __init__(self, state: SchedulerState | Cluster, model_nodes: tuple[str, ...],
                 started: float, history: int = 50, journal: IO[bytes] | None = None,
                 catalog: Catalog | None = None, *, home: str = "",
                 size_machine: SizeMachine | None = None,
                 silent_after: float = SILENT_AFTER_S):
        self.cluster = state if isinstance(state, Cluster) else Cluster({home: state})
        self.home, self.started, self.journal = home, started, journal
        self.size_machine, self.silent_after = size_machine, silent_after
        self.catalog = catalog or Catalog.load()
        self.outcomes: list[SwapOutcome] = []  # finished swaps, for the node to publish
        self._swaps: dict[str, SwapAsk] = {}  # swaps under way, by node
        for node in model_nodes:
            self.cluster.state_of(node).overhead.setdefault(node, DEFAULT_OVERHEAD)
        if journal:
            journal.write(msgspec.json.encode(self.cluster) + b"\n")
        self.nodes = {node: _NodeView() for node in model_nodes}
        self.decisions: collections.deque[DecisionRecord] = collections.deque(maxlen=history)
        self.peak_measured = 0
        self.heard: dict[str, float] = {}  # machine -> when one of its nodes last spoke
        self.memory: dict[str, tuple[int, int]] = {}  # machine -> (available, total) reported
        self.sized = {home}  # machines whose budget is set from their own memory
        self.lost_detail: dict[str, str] = {}

    @property
    def state(self) -> SchedulerState:
        """The scheduler's own machine's policy state (the only one on a single machine)."""
        return self.cluster.machines[self.home]

    def on_message(self, message: ControlMessage, now: float) -> list[Command]:
        """A model node's message: the commands it leads to."""
        commands = self._heard(message, now) if isinstance(message, (LoadAsk, NodeReport)) else []
        return commands + self._on_message(message, now)

    def _heard(self, message: LoadAsk | NodeReport, now: float) -> list[Command]:
        machine = self.cluster.machine(message.node)
        self.heard[machine] = now
        if machine in self.cluster.lost:
            log.warning("machine %s is back: %s speaks again", machine, message.node)
            self.lost_detail.pop(machine, None)
        if not message.total:
            return []
        self.memory[machine] = (message.available, message.total)
        if machine in self.sized or self.size_machine is None:
            return []
        self.sized.add(machine)
        budget, min_available = self.size_machine(machine, message.total)
        log.info("machine %s: budget %s of %s physical", machine, format_bytes(budget),
                 format_bytes(message.total))
        return self._apply(MachineMemory(machine, budget, min_available, now), now)

    def _on_message(self, message: ControlMessage, now: float) -> list[Command]:
        match message:
            case LoadAsk(node=node, ladder=ladder, overhead=overhead):
                view = self._view(node)
                view.wanted, view.model, view.state, view.rss = \
                    ladder[0].model, ladder[0].model, "waiting", overhead
                view.wanted_parallel = message.parallel
                ladder_tuple = tuple((v.model, v.bytes) for v in ladder)
                return self._apply(LoadRequest(node, ladder_tuple, now, overhead,
                                               message.parallel, message.sequence_bytes), now)
            case NodeReport(swap=SwapOutcome() as outcome) if outcome.swap_id in {
                    ask.swap_id for ask in self._swaps.values()}:
                self._swaps.pop(message.node, None)
                self._finish(outcome)
                if message.event == "swapped":
                    self._view(message.node).wanted = message.model
                return self._apply(self._event_of(message, now), now)
            case NodeReport():
                return self._apply(self._event_of(message, now), now)
            case SwapAsk():
                return self._swap(message, now)
        log.warning("ignored a control message that is not for the scheduler: %r", message)
        return []

    def _swap(self, ask: SwapAsk, now: float) -> list[Command]:
        view = self.nodes.get(ask.node)
        old = view.model if view else ""
        try:
            if view is None:
                raise ContractError(f"no model node {ask.node!r} in this graph; its model nodes "
                                    f"are: {', '.join(sorted(self.nodes))}")
            if ask.node in self._swaps:
                raise ContractError(f"a swap of {ask.node} to {self._swaps[ask.node].model} is "
                                    f"under way")
            self.catalog = self.catalog.reload()  # models added since the graph started count
            spec = self.catalog.get(ask.model)
            if old in self.catalog.models and not set(self.catalog.get(old).tasks) & \
                    set(spec.tasks):
                tasks = ", ".join(t.value for t in self.catalog.get(old).tasks)
                raise ContractError(f"{ask.model} does not serve {tasks}, which {ask.node} "
                                    f"serves with {old}")
        except ContractError as error:
            self._finish(SwapOutcome(ask.swap_id, ask.node, False, old, ask.model,
                                     detail=str(error)))
            return []
        if ask.model == old and view.wanted in ("", ask.model):
            self._finish(SwapOutcome(ask.swap_id, ask.node, True, old, ask.model,
                                     detail=f"{ask.node} already serves {old}"))
            return []
        self._swaps[ask.node] = ask
        names = [ask.model, *self.catalog.smaller_than(ask.model)]
        ladder = tuple((name, self.catalog.get(name).memory_bytes) for name in names)
        return self._apply(SwapRequest(ask.node, ladder, now), now)

    def _finish(self, outcome: SwapOutcome) -> None:
        log.info("swap %s of %s to %s: %s", outcome.swap_id, outcome.node, outcome.new_model,
                 "done" if outcome.ok else f"failed: {outcome.detail}")
        self.outcomes.append(outcome)

    def take_outcomes(self) -> list[SwapOutcome]:
        outcomes, self.outcomes = self.outcomes, []
        return outcomes

    def node_left(self, node: str, now: float) -> list[Command]:
        """A model node's process ended (its ``memory`` output closed): it holds nothing now."""
        if ask := self._swaps.pop(node, None):
            self._finish(SwapOutcome(ask.swap_id, node, False, self._view(node).model, ask.model,
                                     detail=f"{node} stopped during the swap"))
        view = self._view(node)
        view.rss = 0
        if view.state != "crashed":  # a node dora gave up on stays shown as such
            view.state = "stopped"
        return self._apply(Departed(node, now), now)

    def node_crashed(self, node: str, now: float, *, for_good: bool) -> list[Command]:
        """dora restarted ``node``'s process after a crash (``for_good``: gave up restarting
        it): what it held went with the process; a restarted node asks again for memory."""
        commands = self.node_left(node, now)
        view = self._view(node)
        if for_good:
            view.state = "crashed"
            log.error("%s crashed and was given up after %d restart(s)", node, view.restarts)
        else:
            view.restarts += 1
            view.state = "restarting"
            log.warning("%s crashed: restart %d", node, view.restarts)
        return commands

    def on_tick(self, now: float, available: int | None) -> list[Command]:
        """Time passes: ``available`` is the scheduler's own machine's available memory; other
        machines' comes from their nodes' latest reports. Machines gone silent are lost."""
        commands = []
        for machine in self.cluster.machines:
            if machine == self.home:
                commands += self._apply(Tick(now, available, machine), now)
                continue
            heard = self.heard.get(machine)
            if heard is not None and now - heard > self.silent_after \
                    and machine not in self.cluster.lost and self._running_on(machine):
                commands += self._lose(machine, now - heard, now)
            recent = heard is not None and now - heard <= self.silent_after
            reported = self.memory.get(machine, (None, 0))[0] if recent else None
            commands += self._apply(Tick(now, reported, machine), now)
        return commands

    def _running_on(self, machine: str) -> list[str]:
        return [node for node, view in self.nodes.items()
                if self.cluster.machine(node) == machine and view.state != "stopped"]

    def _lose(self, machine: str, silent: float, now: float) -> list[Command]:
        nodes = self._running_on(machine)
        detail = (f"no message from {', '.join(nodes)} for {silent:.0f} s: the daemon of "
                  f"machine {machine} or the machine is gone")
        log.error("machine %s lost: %s", machine, detail)
        self.lost_detail[machine] = detail
        for node in nodes:
            view = self._view(node)
            view.state, view.rss, view.model_bytes = "unavailable", 0, 0
            if ask := self._swaps.pop(node, None):
                self._finish(SwapOutcome(ask.swap_id, node, False, view.model, ask.model,
                                         detail=detail))
        return self._apply(MachineLost(machine, now), now)

    def _event_of(self, report: NodeReport, now: float):
        view = self._view(report.node)
        view.state, view.rss, view.queue = report.state, report.rss, report.queue
        view.lost, view.delivery = report.lost, report.delivery
        view.model = report.model or view.model
        view.parallel = report.parallel or view.parallel
        self.peak_measured = max(self.peak_measured, self.measured())
        match report.event:
            case "loaded" | "swapped":
                view.model_bytes = report.model_bytes
                event = Loaded if report.event == "loaded" else Swapped
                return event(report.node, report.model, report.model_bytes, report.peak_bytes,
                             report.load_seconds, now, overhead=report.rss - report.model_bytes)
            case "load_failed":
                return LoadFailed(report.node, now)
            case "swap_failed":
                return SwapFailed(report.node, now)
            case "unloaded":
                view.model_bytes = 0
                return Unloaded(report.node, now, overhead=report.rss)
            case "busy" | "idle":
                return Activity(report.node, report.event == "busy", now)
            case "parallel":
                return ParallelSet(report.node, report.parallel, now)
        resident = self.cluster.state_of(report.node).residents.get(report.node)
        if resident and resident.narrow_to and report.parallel == resident.narrow_to:
            return ParallelSet(report.node, report.parallel, now)  # its "parallel" was dropped
        # The peak since the model loaded: what it took while serving, between two reports too.
        return Measured(report.node, max(report.rss, report.peak_rss), now)

    def _apply(self, event, now: float) -> list[Command]:
        decisions = decide_cluster(self.cluster, event)
        if self.journal:
            self.journal.write(msgspec.json.encode(journal_entry(event, decisions)) + b"\n")
            self.journal.flush()
        commands = []
        for decision in decisions:
            self._record(decision, now)
            if isinstance(decision, Decline):
                ask = self._swaps.pop(decision.node)
                self._finish(SwapOutcome(ask.swap_id, ask.node, False, self._view(ask.node).model,
                                         ask.model, detail=decision.reason))
            else:
                commands.append(self._command(decision))
        return commands

    def _command(self, decision: Decision) -> Command:
        model = getattr(decision, "model", "")
        if isinstance(decision, Replace):
            return Command(decision.node, "swap", model, decision.reason, beside=decision.beside,
                           swap_id=self._swaps[decision.node].swap_id)
        return Command(decision.node, ACTIONS[type(decision)], model, decision.reason,
                       parallel=getattr(decision, "parallel", 0))

    def _record(self, decision: Decision, now: float) -> None:
        action = ACTIONS[type(decision)]
        model = getattr(decision, "model", "") or self._view(decision.node).model
        log.info("%s %s %s: %s", action, decision.node, model, decision.reason)
        self.decisions.append(DecisionRecord(round(now - self.started, 3), action, decision.node,
                                             model, decision.reason))
        if isinstance(decision, Wait):
            self._view(decision.node).state = "waiting"
        elif isinstance(decision, Refuse):
            self._view(decision.node).state = "evicted"
        elif isinstance(decision, Replace):
            self._view(decision.node).wanted = decision.model

    def _view(self, node: str) -> _NodeView:
        return self.nodes.setdefault(node, _NodeView())

    def measured(self) -> int:
        """The model processes' resident memory, as last reported."""
        return sum(view.rss for view in self.nodes.values())

    def status(self, now: float, available: int, total: int,
               lost: dict[str, int] | None = None) -> Status:
        """What ``omni status`` shows; ``lost``: messages missing on the scheduler's own inputs.
        ``available`` and ``total`` are the scheduler's own machine's memory."""
        pipelines = [sorted(group) for group in self.state.pipelines]
        nodes = [NodeStatus(node, view.model, view.wanted, view.state, view.rss, view.model_bytes,
                            view.queue, [i for i, group in enumerate(pipelines) if node in group],
                            view.lost, self.cluster.machine(node), view.delivery,
                            view.restarts, view.parallel, view.wanted_parallel)
                 for node, view in sorted(self.nodes.items())]
        machines = []
        if set(self.cluster.machines) != {""}:
            for machine, state in sorted(self.cluster.machines.items()):
                there_available, there_total = (available, total) if machine == self.home else \
                    self.memory.get(machine, (0, 0))
                measured = sum(view.rss for node, view in self.nodes.items()
                               if self.cluster.machine(node) == machine)
                machines.append(MachineStatus(
                    machine, state.budget, state.used_bytes(), measured, there_available,
                    there_total, state.min_available, machine in self.cluster.lost,
                    self.lost_detail.get(machine, "")))
        states = self.cluster.machines.values()
        return Status(sum(s.budget for s in states), sum(s.used_bytes() for s in states),
                      self.measured(), self.peak_measured, available, total,
                      self.state.min_available, round(now - self.started, 3), nodes, pipelines,
                      sorted(self.state.active), list(self.decisions), lost or {}, machines)
