"""The scheduler node's bookkeeping, without dora: control messages in, commands and status out.

Turns each model node's :class:`LoadAsk` / :class:`NodeReport` into events of
the pure policy (:mod:`mofa_omni.scheduler`), turns its decisions into
:class:`Command` messages, remembers what every node last reported and the last
decisions with their reasons, and builds the :class:`Status` ``omni status`` shows.
A :class:`SwapAsk` from ``omni swap`` is checked against the catalog (the node
exists, the model is known and serves the node's task) before the policy decides;
how each swap ends waits in :attr:`Scheduling.outcomes` for the node to publish.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import msgspec

from mofa_omni.catalog import Catalog
from mofa_omni.contract import ContractError
from mofa_omni.control import (
    Command,
    ControlMessage,
    DecisionRecord,
    LoadAsk,
    NodeReport,
    NodeStatus,
    Status,
    SwapAsk,
    SwapOutcome,
)
from mofa_omni.scheduler import (
    Activity,
    Decision,
    Decline,
    Departed,
    Evict,
    Grant,
    Loaded,
    LoadFailed,
    LoadRequest,
    Measured,
    Refuse,
    Replace,
    SchedulerState,
    SwapFailed,
    Swapped,
    SwapRequest,
    Switch,
    Tick,
    Unloaded,
    Wait,
    decide,
)

log = logging.getLogger("mofa_omni.scheduling")

DEFAULT_OVERHEAD = 200 << 20  # a model process before it reports (measured 185-225 MiB)
ACTIONS = {Grant: "load", Evict: "unload", Switch: "switch", Wait: "wait", Refuse: "refuse",
           Replace: "swap", Decline: "decline"}
_DECISION_TYPES = {cls.__name__: cls for cls in ACTIONS}
_EVENT_TYPES = {cls.__name__: cls for cls in (LoadRequest, Loaded, LoadFailed, Unloaded, Departed,
                                               Activity, Measured, Tick, SwapRequest, Swapped,
                                               SwapFailed)}


@dataclass
class _NodeView:
    model: str = ""
    wanted: str = ""
    state: str = "starting"
    rss: int = 0
    model_bytes: int = 0
    queue: int = 0
    lost: dict[str, int] = field(default_factory=dict)


def journal_entry(event, decisions: list[Decision]) -> dict:
    return {"event": type(event).__name__, "fields": event,
            "decisions": [{"type": type(d).__name__, "fields": d} for d in decisions]}


def replay(lines: list[bytes]) -> Iterator[tuple[list[Decision], list[Decision], int]]:
    """Feed a journal's events to the policy afresh: per event, the recorded decisions, the
    replayed ones, and the memory the policy counts as used afterwards.

    The journal's first line is the policy's initial state; the rest are events."""
    state = msgspec.json.decode(lines[0], type=SchedulerState)
    state.pipelines = [frozenset(group) for group in state.pipelines]
    for line in lines[1:]:
        entry = msgspec.json.decode(line)
        event = msgspec.convert(entry["fields"], type=_EVENT_TYPES[entry["event"]])
        recorded = [msgspec.convert(d["fields"], type=_DECISION_TYPES[d["type"]])
                    for d in entry["decisions"]]
        replayed = decide(state, event)
        yield recorded, replayed, state.used_bytes()


class Scheduling:
    """One scheduler's state: the policy's, what nodes reported, and the decision log."""

    def __init__(self, state: SchedulerState, model_nodes: tuple[str, ...], started: float,
                 history: int = 50, journal: IO[bytes] | None = None,
                 catalog: Catalog | None = None):
        self.state, self.started, self.journal = state, started, journal
        self.catalog = catalog or Catalog.load()
        self.outcomes: list[SwapOutcome] = []  # finished swaps, for the node to publish
        self._swaps: dict[str, SwapAsk] = {}  # swaps under way, by node
        for node in model_nodes:
            state.overhead.setdefault(node, DEFAULT_OVERHEAD)
        if journal:
            journal.write(msgspec.json.encode(state) + b"\n")
        self.nodes = {node: _NodeView() for node in model_nodes}
        self.decisions: collections.deque[DecisionRecord] = collections.deque(maxlen=history)
        self.peak_measured = 0

    def on_message(self, message: ControlMessage, now: float) -> list[Command]:
        """A model node's message: the commands it leads to."""
        match message:
            case LoadAsk(node=node, ladder=ladder, overhead=overhead):
                view = self._view(node)
                view.wanted, view.model, view.state, view.rss = \
                    ladder[0].model, ladder[0].model, "waiting", overhead
                ladder_tuple = tuple((v.model, v.bytes) for v in ladder)
                return self._apply(LoadRequest(node, ladder_tuple, now, overhead), now)
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
        self._view(node).state, self._view(node).rss = "stopped", 0
        return self._apply(Departed(node, now), now)

    def on_tick(self, now: float, available: int | None) -> list[Command]:
        return self._apply(Tick(now, available), now)

    def _event_of(self, report: NodeReport, now: float):
        view = self._view(report.node)
        view.state, view.rss, view.queue = report.state, report.rss, report.queue
        view.lost = report.lost
        view.model = report.model or view.model
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
        return Measured(report.node, report.rss, now)

    def _apply(self, event, now: float) -> list[Command]:
        decisions = decide(self.state, event)
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
        return Command(decision.node, ACTIONS[type(decision)], model, decision.reason)

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
        """What ``omni status`` shows; ``lost``: messages missing on the scheduler's own inputs."""
        pipelines = [sorted(group) for group in self.state.pipelines]
        nodes = [NodeStatus(node, view.model, view.wanted, view.state, view.rss, view.model_bytes,
                            view.queue, [i for i, group in enumerate(pipelines) if node in group],
                            view.lost)
                 for node, view in sorted(self.nodes.items())]
        return Status(self.state.budget, self.state.used_bytes(), self.measured(),
                      self.peak_measured, available, total, self.state.min_available,
                      round(now - self.started, 3), nodes, pipelines, sorted(self.state.active),
                      list(self.decisions), lost or {})
