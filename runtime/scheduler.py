"""The memory scheduler's policy: a pure, deterministic function of state and event.

No I/O and no clock: every event carries ``now``; the caller (the scheduler
node) measures memory, applies the decisions and feeds back what happened.
The order of the policy, for a model that asks to load:

1. it fits in what the budget leaves: grant it;
2. evict idle models outside the active pipelines, cheapest to reload first
   (measured load seconds; least recently used breaks ties) — models that a
   pipeline needs together with the requester, or that an active pipeline
   needs, are never evicted for it;
3. if that is not enough: evict all those, and step the remaining models (the
   requester and its partners) down their size ladders, the step that frees
   the most first — the requester itself may be granted a smaller variant;
4. otherwise wait, and fail with an explicit error once the deadline passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Ladder = tuple[tuple[str, int], ...]  # (model, bytes), largest first; [0] is what is asked


@dataclass(frozen=True, slots=True)
class LoadRequest:
    node: str
    ladder: Ladder  # the requested model, then the smaller variants that may stand in
    now: float


@dataclass(frozen=True, slots=True)
class Loaded:
    node: str
    model: str
    bytes: int  # measured cost of the load (replaces the estimate)
    seconds: float  # measured load time: the cost of reloading it later
    now: float


@dataclass(frozen=True, slots=True)
class Unloaded:
    node: str
    now: float


@dataclass(frozen=True, slots=True)
class Used:
    """A node served a request (it is busy now, and recently used)."""

    node: str
    now: float


@dataclass(frozen=True, slots=True)
class Tick:
    now: float


Event = LoadRequest | Loaded | Unloaded | Used | Tick


@dataclass(frozen=True, slots=True)
class Grant:
    node: str
    model: str  # the model to load: the one asked for, or a smaller variant


@dataclass(frozen=True, slots=True)
class Evict:
    node: str


@dataclass(frozen=True, slots=True)
class StepDown:
    node: str
    model: str  # reload this resident node with this smaller variant


@dataclass(frozen=True, slots=True)
class Wait:
    node: str
    reason: str


@dataclass(frozen=True, slots=True)
class Refuse:
    node: str
    reason: str


Decision = Grant | Evict | StepDown | Wait | Refuse


@dataclass
class Resident:
    node: str
    model: str
    bytes: int
    ladder: Ladder
    reload_seconds: float = 0.0
    last_used: float = 0.0
    loading: bool = False  # granted, not loaded yet: its memory is reserved, not movable


@dataclass
class Pending:
    request: LoadRequest
    deadline: float


@dataclass
class SchedulerState:
    budget: int
    pipelines: list[frozenset[str]] = field(default_factory=list)  # nodes needed together
    active: set[int] = field(default_factory=set)  # indexes of pipelines in use now
    residents: dict[str, Resident] = field(default_factory=dict)
    pending: list[Pending] = field(default_factory=list)
    wait_seconds: float = 60.0
    active_seconds: float = 30.0  # a pipeline stays active this long after its last use

    def used_bytes(self) -> int:
        return sum(r.bytes for r in self.residents.values())

    def protected_for(self, node: str) -> set[str]:
        """Nodes that must stay loaded while ``node`` loads: its pipelines and active ones."""
        keep = {node}
        for index, group in enumerate(self.pipelines):
            if node in group or index in self.active:
                keep |= group
        return keep


def decide(state: SchedulerState, event: Event) -> list[Decision]:
    """Apply ``event`` to ``state`` (mutated) and return the decisions to carry out."""
    match event:
        case LoadRequest():
            return _admit(state, event)
        case Loaded(node=node, model=model, bytes=size, seconds=seconds, now=now):
            resident = state.residents.get(node)
            ladder = resident.ladder if resident else ((model, size),)
            state.residents[node] = Resident(node, model, size, ladder, seconds, now)
            return []
        case Unloaded(node=node):
            state.residents.pop(node, None)
            return _retry_pending(state, event.now)
        case Used(node=node, now=now):
            if node in state.residents:
                state.residents[node].last_used = now
            state.active |= {i for i, group in enumerate(state.pipelines) if node in group}
            return []
        case Tick(now=now):
            _expire_activity(state, now)
            refused = [Refuse(p.request.node, f"no memory for {p.request.ladder[0][0]} within "
                                              f"{state.wait_seconds:g} s")
                       for p in state.pending if now > p.deadline]
            state.pending = [p for p in state.pending if now <= p.deadline]
            return refused + _retry_pending(state, now)
    raise TypeError(f"not a scheduler event: {event!r}")


def _expire_activity(state: SchedulerState, now: float) -> None:
    state.active = {
        index for index in state.active
        if any(state.residents[n].last_used >= now - state.active_seconds
               for n in state.pipelines[index] if n in state.residents)
    }


def _retry_pending(state: SchedulerState, now: float) -> list[Decision]:
    waiting, state.pending = state.pending, []
    decisions: list[Decision] = []
    for pending in waiting:
        outcome = _admit(state, pending.request, queue=False)
        if outcome and isinstance(outcome[-1], Grant):
            decisions += outcome
        else:
            state.pending.append(pending)
    return decisions


def _admit(state: SchedulerState, request: LoadRequest, *, queue: bool = True) -> list[Decision]:
    node, (model, need) = request.node, request.ladder[0]
    state.residents.pop(node, None)  # a node asking to load replaces what it held
    free = state.budget - state.used_bytes()
    if need <= free:
        return _grant(state, request, model, need)

    protected = state.protected_for(node)
    evictable = sorted((r for r in state.residents.values()
                        if r.node not in protected and not r.loading),
                       key=lambda r: (r.reload_seconds, r.last_used, r.node))
    evictions: list[Resident] = []
    for resident in evictable:
        if free >= need:
            break
        evictions.append(resident)
        free += resident.bytes
    if free >= need:
        for resident in evictions:
            del state.residents[resident.node]
        return [Evict(r.node) for r in evictions] + _grant(state, request, model, need)

    # Evicting every idle outsider is not enough: step down what remains (the requester and
    # its pipeline partners), with those evictions done too.
    steps = _step_down_plan(state, request, free, exclude={r.node for r in evictions})
    if steps is not None:
        for resident in evictions:
            del state.residents[resident.node]
        decisions: list[Decision] = [Evict(r.node) for r in evictions]
        for target, (smaller, size) in steps.items():
            if target == node:
                model, need = smaller, size
            else:
                decisions.append(StepDown(target, smaller))
                state.residents[target].model, state.residents[target].bytes = smaller, size
        return decisions + _grant(state, request, model, need)

    if queue:
        state.pending.append(Pending(request, request.now + state.wait_seconds))
    return [Wait(node, f"waiting for memory: {model} needs {need} bytes, "
                       f"{state.budget - state.used_bytes()} free of {state.budget}")]


def _grant(state: SchedulerState, request: LoadRequest, model: str, size: int) -> list[Decision]:
    # Reserve the memory now so that concurrent requests cannot both be granted it.
    state.residents[request.node] = Resident(request.node, model, size, request.ladder,
                                             last_used=request.now, loading=True)
    return [Grant(request.node, model)]


def _step_down_plan(state: SchedulerState, request: LoadRequest, free: int,
                    exclude: set[str]) -> dict[str, tuple[str, int]] | None:
    """Steps down the ladders (the requester's and the residents' but ``exclude``) until the
    request fits in ``free``, the step that frees the most first; None if it cannot fit."""
    options = {request.node: list(request.ladder)}
    for r in state.residents.values():
        models = [m for m, _ in r.ladder]
        if r.node not in exclude and not r.loading and r.model in models:
            options[r.node] = [(r.model, r.bytes), *r.ladder[models.index(r.model) + 1:]]
    current = {node: ladder[0] for node, ladder in options.items()}
    need = current[request.node][1]
    plan: dict[str, tuple[str, int]] = {}
    while need > free:
        best = None
        for node, ladder in options.items():
            index = ladder.index(current[node])
            if index + 1 < len(ladder):
                saving = current[node][1] - ladder[index + 1][1]
                if best is None or saving > best[0]:
                    best = (saving, node, ladder[index + 1])
        if best is None or best[0] <= 0:
            return None
        saving, node, step = best
        current[node] = step
        plan[node] = step
        if node == request.node:
            need -= saving
        else:
            free += saving
    return plan
