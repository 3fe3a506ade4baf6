"""The memory scheduler's policy: a pure, deterministic function of state and event.

No I/O and no clock: every event carries ``now``; the scheduler node measures
memory, carries out the decisions and feeds back what really happened. Memory
counts what the model processes hold: each process's own footprint (Python,
libraries: ``overhead``) plus the model it loaded. A load is reserved at its
measured peak, and memory being given back counts as used until the node says
it is gone, so the budget holds at every instant, not only on average. A model
holds its estimate until it has served a request: what it takes once loaded is
less than what it takes while serving (activations, KV caches), so only a
working set measured after serving replaces the estimate (``working_set``).

For a node that asks to load a model, in this order:

1. it fits in what the budget leaves: grant it;
2. evict idle models outside the requester's and the active pipelines, cheapest
   to reload first (measured load seconds; least recently used breaks ties);
3. if that is not enough: evict all of those, and step the remaining models (the
   requester's partners, and the requester itself) down their size ladders, the
   step that frees the most first;
4. otherwise wait, and refuse with an explicit error once the deadline passes. A
   model larger than the whole budget even at its smallest is refused at once.

Under pressure from outside (the system's available memory falls under
``min_available``), idle models outside the active pipelines are evicted and
then models are stepped down, until the deficit is covered. Models are stepped
back up one rung at a time once memory is plentiful again: the step must leave
``min_available + step_up_margin`` available and fit the budget, and no pressure
may have been seen for ``calm_seconds`` (hysteresis, so it does not flap).

A model that decodes several requests together (an LLM batching its sequences)
asks for its ``parallel`` requests and the memory each beyond the first takes at
its longest (``sequence_bytes``, its KV cache). A grant reserves as many of them
as the rest of the budget holds (at least one); under pressure, before any model
is evicted or stepped down, the models reserving the most for them decode fewer
together (:class:`SetParallel`; the node confirms once the requests above the new
bound have ended, and waiting requests queue meanwhile); they widen again once
memory is plentiful.

A node asked to swap its model (``omni swap``) loads the new one beside the old,
which keeps serving, when the budget holds both; in place (the old one unloaded
first, requests waiting meanwhile) when it holds the new one only once the old
is gone; otherwise the swap is declined and the old model keeps serving.

A graph spread over several machines (dora's ``deploy: {machine: ...}``) has one
:class:`SchedulerState` per machine in a :class:`Cluster`: each machine has its
own budget, its own measured memory and its own outside pressure, and
:func:`decide_cluster` hands every event to the state of the machine its node
runs on, so a model on one machine is never evicted or stepped down to make room
on another. Pipelines still span machines: using a model keeps its partners on
other machines loaded. A machine whose nodes all fell silent (its daemon died) is
:class:`MachineLost`: its models are forgotten until its nodes ask again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Ladder = tuple[tuple[str, int], ...]  # (model, estimated bytes), largest first; [0] is asked


# --- events ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LoadRequest:
    node: str
    ladder: Ladder  # the requested model, then the smaller variants that may stand in
    now: float
    overhead: int | None = None  # the process's own resident memory, measured before loading
    # Requests the model would decode together, and what each one beyond the first takes at
    # its longest (its KV cache): reserved while the budget holds them, given back under
    # pressure before any model is evicted (0: nothing beyond the model's own)
    parallel: int = 1
    sequence_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Loaded:
    node: str
    model: str
    bytes: int  # measured resident growth once loaded (replaces the estimate)
    peak: int  # measured peak growth while loading: what a reload of it must reserve
    seconds: float  # measured load time: the cost of reloading it later
    now: float
    overhead: int | None = None  # the process's resident memory before this load


@dataclass(frozen=True, slots=True)
class LoadFailed:
    node: str
    now: float


@dataclass(frozen=True, slots=True)
class Unloaded:
    node: str
    now: float
    overhead: int | None = None  # the process's resident memory with no model


@dataclass(frozen=True, slots=True)
class Activity:
    """A node started (``busy``) or finished serving requests (then it has ``served``)."""

    node: str
    busy: bool
    now: float


@dataclass(frozen=True, slots=True)
class Measured:
    """A node's periodic measurement of its process's resident memory."""

    node: str
    rss: int
    now: float


@dataclass(frozen=True, slots=True)
class ParallelSet:
    """A node serves at most ``parallel`` requests together now (after a :class:`SetParallel`,
    once the requests beyond it have ended): the sequences above it are given back."""

    node: str
    parallel: int
    now: float


@dataclass(frozen=True, slots=True)
class Tick:
    now: float
    available: int | None = None  # the system's available memory, when measured
    machine: str = ""  # in a cluster: the machine measured (see decide_cluster)


@dataclass(frozen=True, slots=True)
class MachineMemory:
    """A machine's budget, set once its physical memory is known (its first node's message)."""

    machine: str
    budget: int
    min_available: int
    now: float


@dataclass(frozen=True, slots=True)
class MachineLost:
    """Every node of ``machine`` fell silent (its daemon or the machine died)."""

    machine: str
    now: float


@dataclass(frozen=True, slots=True)
class Departed:
    """A node's process ended: it holds no memory any more."""

    node: str
    now: float


@dataclass(frozen=True, slots=True)
class SwapRequest:
    """Replace the model a node holds with ``ladder[0]`` (``omni swap``)."""

    node: str
    ladder: Ladder  # the new model, then its smaller variants: the node's ladder afterwards
    now: float


@dataclass(frozen=True, slots=True)
class Swapped:
    """The node serves the new model; the old one's memory is given back."""

    node: str
    model: str
    bytes: int
    peak: int
    seconds: float
    now: float
    overhead: int | None = None


@dataclass(frozen=True, slots=True)
class SwapFailed:
    """The new model could not load; the node serves the old one again."""

    node: str
    now: float


Event = (LoadRequest | Loaded | LoadFailed | Unloaded | Departed | Activity | Measured | Tick
         | SwapRequest | Swapped | SwapFailed | MachineLost | MachineMemory | ParallelSet)


# --- decisions ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Grant:
    node: str
    model: str  # the model to load: the one asked for, or a smaller variant
    reason: str = field(default="", compare=False)
    parallel: int = 0  # requests it may decode together (0: as many as it asked for)


@dataclass(frozen=True, slots=True)
class Evict:
    node: str
    reason: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class Switch:
    """Reload a resident node with another variant of its ladder (down under pressure, up after)."""

    node: str
    model: str
    reason: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class SetParallel:
    """Decode at most ``parallel`` requests together: fewer under pressure (the memory of the
    sequences above it comes back as they end), more once memory is plentiful again."""

    node: str
    parallel: int
    reason: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class Wait:
    node: str
    reason: str


@dataclass(frozen=True, slots=True)
class Refuse:
    node: str
    reason: str


@dataclass(frozen=True, slots=True)
class Replace:
    """Swap the node's model: ``beside`` the old one (both fit), or in its place."""

    node: str
    model: str
    beside: bool
    reason: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class Decline:
    """A swap that cannot be done now; the node keeps its model."""

    node: str
    model: str
    reason: str


Decision = Grant | Evict | Switch | Wait | Refuse | Replace | Decline | SetParallel


# --- state -------------------------------------------------------------------------------

Phase = Literal["loading", "ready", "leaving", "switching", "swapping"]


@dataclass
class Resident:
    node: str
    model: str
    bytes: int  # reserved: the load's peak while loading, then the measured working set
    ladder: Ladder  # the node's ladder; ladder[0] is the model it wants
    reload_seconds: float = 0.0
    last_used: float = 0.0
    phase: Phase = "loading"
    target: int = 0  # while leaving/switching: the bytes it will hold afterwards
    busy: bool = False
    served: bool = False  # finished a request since it loaded
    parallel: int = 1  # requests it may decode together: those beyond the first are reserved
    wanted_parallel: int = 1  # ... and would, memory allowing
    sequence_bytes: int = 0  # what each request beyond the first takes at its longest
    narrow_to: int = 0  # > 0: told to decode at most this many; the rest is being given back
    narrowed_at: float = 0.0  # when it was told (told again if it has not confirmed in a while)

    @property
    def settled(self) -> bool:
        return self.phase == "ready"

    @property
    def held(self) -> int:
        """The model, and the sequences reserved beyond the first."""
        return self.bytes + (self.parallel - 1) * self.sequence_bytes

    @property
    def kept(self) -> int:
        """What it holds once a narrowing under way is done."""
        return self.bytes + ((self.narrow_to or self.parallel) - 1) * self.sequence_bytes

    def giving_back(self) -> int:
        """Memory an eviction, step-down or narrowing under way will give back."""
        if self.phase == "leaving":
            return max(self.held - self.target, 0)
        back = self.held - self.kept
        if self.phase == "switching":
            back += max(self.bytes - self.target, 0)
        return back


@dataclass
class Pending:
    request: LoadRequest
    deadline: float
    planned: str  # the variant it will be granted (the one asked, or a smaller one)


@dataclass
class SwapPlan:
    ladder: Ladder  # the node's ladder once swapped
    previous_bytes: int  # what the node held before: restored if the swap fails


@dataclass
class SchedulerState:
    budget: int
    pipelines: list[frozenset[str]] = field(default_factory=list)  # nodes needed together
    active: set[int] = field(default_factory=set)  # indexes of pipelines in use now
    residents: dict[str, Resident] = field(default_factory=dict)
    overhead: dict[str, int] = field(default_factory=dict)  # each model process's own memory
    learned_peak: dict[str, int] = field(default_factory=dict)  # model -> measured load peak
    working_set: dict[str, int] = field(default_factory=dict)  # model -> measured serving
    estimates: dict[str, int] = field(default_factory=dict)  # model -> the ladders' estimate
    pending: list[Pending] = field(default_factory=list)
    wait_seconds: float = 60.0
    active_seconds: float = 30.0  # a pipeline stays active this long after its last use
    min_available: int = 0  # system memory to keep available (0: ignore outside pressure)
    step_up_margin: int = 512 << 20
    calm_seconds: float = 10.0  # no step back up until memory was short this long ago
    unsettled_at: float | None = None  # when memory was last short or a node left
    swaps: dict[str, SwapPlan] = field(default_factory=dict)  # swaps under way, by node
    confirm_seconds: float = 10.0  # a narrowing not confirmed this long is said again

    def used_bytes(self) -> int:
        return sum(self.overhead.values()) + sum(r.held for r in self.residents.values())

    def freeing_bytes(self) -> int:
        """Memory that evictions, step-downs and narrowings under way will give back."""
        return sum(r.giving_back() for r in self.residents.values())

    def protected_for(self, node: str | None) -> set[str]:
        """Nodes to keep loaded for ``node``: its pipelines' and the active pipelines' nodes."""
        keep = {node} if node else set()
        for index, group in enumerate(self.pipelines):
            if node in group or index in self.active:
                keep |= group
        return keep

    def estimate(self, model: str, estimate: int) -> int:
        """What a load of ``model`` reserves: what it was measured to take while loading and
        serving, and before it has been seen serving, at least ``estimate`` (the catalog's)."""
        learned = self.learned_peak.get(model, 0)
        return learned if model in self.working_set else max(estimate, learned)

    def holding(self, model: str, loaded: int) -> int:
        """What a loaded ``model`` holds: its measured serving working set, or its estimate
        until it has served (a load's measured growth leaves out activations and caches)."""
        if model in self.working_set:
            return max(loaded, self.working_set[model])
        return max(loaded, self.estimates.get(model, 0))

    def note_estimates(self, ladder: Ladder) -> None:
        self.estimates |= dict(ladder)


@dataclass
class Cluster:
    """One policy state per machine, and which machine each model node runs on."""

    machines: dict[str, SchedulerState]
    machine_of: dict[str, str] = field(default_factory=dict)  # node -> machine
    lost: set[str] = field(default_factory=set)  # machines whose nodes all fell silent

    def machine(self, node: str) -> str:
        """The machine ``node`` runs on ("" on a single machine)."""
        return self.machine_of.get(node, "")

    def state_of(self, node: str) -> SchedulerState:
        return self.machines[self.machine(node)]


# --- the policy --------------------------------------------------------------------------

def decide_cluster(cluster: Cluster, event: Event) -> list[Decision]:
    """:func:`decide` for a graph on several machines: each event goes to its machine's state.

    A node's event is decided by its own machine's policy state, so memory on one machine is
    never freed for another. Activity also marks the node's pipelines active on the other
    machines, whose partners then stay loaded. A :class:`Tick` concerns its ``machine``; a
    :class:`MachineLost` forgets what that machine held."""
    match event:
        case Tick(machine=machine):
            return decide(cluster.machines[machine], event)
        case MachineMemory(machine=machine):
            state = cluster.machines[machine]
            state.budget, state.min_available = event.budget, event.min_available
            return []
        case MachineLost(machine=machine, now=now):
            cluster.lost.add(machine)
            state = cluster.machines[machine]
            state.residents.clear()
            state.overhead.clear()
            state.swaps.clear()
            state.pending.clear()  # its nodes are gone: nobody left to grant or refuse
            state.unsettled_at = now
            return []
    node = event.node
    machine = cluster.machine(node)
    cluster.lost.discard(machine)  # one of its nodes speaks again: the machine is back
    if isinstance(event, (Activity, LoadRequest)):
        for other, state in cluster.machines.items():
            if other != machine:
                _activate(state, node)
    return decide(cluster.machines[machine], event)


def decide(state: SchedulerState, event: Event) -> list[Decision]:
    """Apply ``event`` to ``state`` (mutated) and return the decisions to carry out."""
    match event:
        case LoadRequest():
            state.note_estimates(event.ladder)
            if event.overhead is not None:
                state.overhead[event.node] = event.overhead
            _activate(state, event.node)  # a pipeline being loaded is about to be used
            # A node asks again when an answer was lost (the ask keeps its first deadline) or
            # after a swap changed its model (a new ask): either way it replaces the old one.
            earlier = [p for p in state.pending if p.request.node == event.node]
            state.pending = [p for p in state.pending if p.request.node != event.node]
            deadline = earlier[0].deadline if earlier and \
                earlier[0].request.ladder == event.ladder else None
            return _queue(state, event, deadline)
        case Loaded(node=node, model=model, now=now) | Swapped(node=node, model=model, now=now):
            swapped = isinstance(event, Swapped)
            plan = state.swaps.pop(node, None) if swapped else None
            state.learned_peak[model] = max(event.peak, event.bytes)
            if event.overhead is not None:  # libraries a first load imported stay resident
                state.overhead[node] = event.overhead
            previous = state.residents.get(node)
            if plan:  # swapped: the node's ladder is the new model's
                ladder = plan.ladder
            elif previous and not swapped:
                ladder = previous.ladder
            else:
                ladder = ((model, event.peak),)
            holding = state.holding(model, event.bytes)
            resident = state.residents[node] = Resident(node, model, holding, ladder,
                                                        event.seconds, last_used=now,
                                                        phase="ready",
                                                        busy=bool(previous and previous.busy))
            if previous:  # the sequences granted with the model (or held before the swap)
                resident.parallel, resident.wanted_parallel, resident.sequence_bytes = \
                    previous.parallel, previous.wanted_parallel, previous.sequence_bytes
            return _retry_pending(state, now)
        case Departed(node=node, now=now):
            state.residents.pop(node, None)
            state.overhead.pop(node, None)
            state.swaps.pop(node, None)
            state.unsettled_at = now  # often the graph winding down: no step-ups for a while
            return _retry_pending(state, now)
        case LoadFailed(node=node, now=now) | Unloaded(node=node, now=now):
            state.residents.pop(node, None)
            if isinstance(event, Unloaded) and event.overhead is not None:
                state.overhead[node] = event.overhead
            return _retry_pending(state, now)
        case Activity(node=node, busy=busy, now=now):
            if resident := state.residents.get(node):
                resident.last_used, resident.busy = now, busy
                resident.served |= not busy and resident.settled
            _activate(state, node)
            return _retry_pending(state, now) if not busy else []
        case Measured(node=node, rss=rss, now=now):
            resident = state.residents.get(node)
            if resident is None:
                state.overhead[node] = rss
            elif resident.settled:
                # The working set grows while serving (KV cache, activations): reserve what it
                # used, now and whenever this model is loaded again. Once it has served, what
                # it was measured to use replaces the estimate it held until then.
                working = rss - state.overhead.get(node, 0)
                model = resident.model
                state.learned_peak[model] = max(state.learned_peak.get(model, 0), working)
                if not resident.served:
                    resident.bytes = max(resident.bytes, working)
                    return []
                state.working_set[model] = max(state.working_set.get(model, 0), working)
                resident.bytes = state.working_set[model]
                return _retry_pending(state, now)  # less than the estimate held until now
            return []
        case ParallelSet(node=node, parallel=parallel, now=now):
            if resident := state.residents.get(node):
                resident.parallel, resident.narrow_to = max(parallel, 1), 0
            return _retry_pending(state, now)
        case SwapRequest():
            state.note_estimates(event.ladder)
            return _swap(state, event)
        case SwapFailed(node=node, now=now):
            plan = state.swaps.pop(node, None)
            if (resident := state.residents.get(node)) and plan:
                resident.bytes, resident.phase, resident.target = plan.previous_bytes, "ready", 0
            return _retry_pending(state, now)
        case Tick(now=now, available=available):
            _expire_activity(state, now)
            refused = [Refuse(p.request.node, f"no memory within {state.wait_seconds:g} s")
                       for p in state.pending if now > p.deadline]
            state.pending = [p for p in state.pending if now <= p.deadline]
            return refused + _narrow_again(state, now) + _retry_pending(state, now) + \
                _balance(state, available, now)
    raise TypeError(f"not a scheduler event: {event!r}")


def _swap(state: SchedulerState, request: SwapRequest) -> list[Decision]:
    node = request.node
    model, estimate = request.ladder[0]
    need = state.estimate(model, estimate)
    resident = state.residents.get(node)
    if resident is None:  # it holds nothing: the next request loads the new model
        return [Replace(node, model, False, "the node holds no model now; the next request "
                                            "loads it")]
    if not resident.settled:
        return [Decline(node, model, f"{node} is {resident.phase} {resident.model}; "
                                     f"try again once it is ready")]
    free = state.budget - state.used_bytes()
    state.swaps[node] = SwapPlan(request.ladder, resident.bytes)
    if need <= free:
        resident.phase, resident.target = "swapping", need
        resident.bytes += need
        return [Replace(node, model, True, f"{model} ({_mib(need)}) fits beside "
                                            f"{resident.model}: {_mib(free)} free")]
    if need <= free + resident.bytes:
        resident.phase, resident.target = "swapping", need
        resident.bytes = max(resident.bytes, need)
        return [Replace(node, model, False, f"{model} ({_mib(need)}) fits only in place of "
                                             f"{resident.model}: {_mib(free)} free")]
    del state.swaps[node]
    return [Decline(node, model, f"not enough memory: {model} needs {_mib(need)}; the budget "
                                 f"of {_mib(state.budget)} leaves {_mib(free)}, "
                                 f"{_mib(free + resident.bytes)} with {resident.model} unloaded")]


def _activate(state: SchedulerState, node: str) -> None:
    state.active |= {i for i, group in enumerate(state.pipelines) if node in group}


def _expire_activity(state: SchedulerState, now: float) -> None:
    def recent(node: str) -> bool:
        resident = state.residents.get(node)
        return bool(resident and (resident.busy or resident.last_used >= now - state.active_seconds))

    state.active = {index for index in state.active if any(map(recent, state.pipelines[index]))}


def _retry_pending(state: SchedulerState, now: float) -> list[Decision]:
    waiting, state.pending = state.pending, []
    decisions: list[Decision] = []
    for pending in waiting:
        outcome, planned = _admit(state, pending.request, pending.planned)
        if planned is None:  # granted or refused
            decisions += outcome
        else:  # still waiting: carry out what it set in motion, keep its deadline
            decisions += [d for d in outcome if not isinstance(d, Wait)]
            state.pending.append(Pending(pending.request, pending.deadline, planned))
    return decisions


def _queue(state: SchedulerState, request: LoadRequest,
           deadline: float | None = None) -> list[Decision]:
    decisions, planned = _admit(state, request)
    if planned is not None:
        state.pending.append(Pending(request, deadline or request.now + state.wait_seconds,
                                     planned))
    return decisions


def _admit(state: SchedulerState, request: LoadRequest,
           planned: str | None = None) -> tuple[list[Decision], str | None]:
    """The decisions for ``request``, and the model it waits for (None: granted or refused)."""
    node = request.node
    state.residents.pop(node, None)  # a node asking to load holds no model
    ladder = tuple((model, state.estimate(model, size)) for model, size in request.ladder)
    models = [m for m, _ in ladder]
    candidates = ladder[models.index(planned):] if planned in models else ladder
    model, need = candidates[0]
    free = state.budget - state.used_bytes()
    if need <= free:
        reason = "fits the budget" if model == models[0] else \
            f"stepped down from {models[0]}: the budget holds no more"
        return _grant(state, request, ladder, model, reason), None

    floor, partners = _smallest_footprint(state, node, ladder)
    if floor > state.budget:
        together = f" with {', '.join(sorted(partners))}" if partners else ""
        return [Refuse(node, f"even at the smallest variants, {node}{together} and the model "
                             f"processes need {_mib(floor)}, more than the budget of "
                             f"{_mib(state.budget)}")], None

    incoming = state.freeing_bytes()
    if need <= free + incoming:
        return [Wait(node, f"waiting for memory being given back: {model} needs "
                           f"{_mib(need)}")], model

    # Before any model is evicted or stepped down: fewer requests decoded together elsewhere.
    narrowed = _narrow(state, need - free - incoming, f"makes room for {node} ({model})",
                       request.now)
    incoming = state.freeing_bytes()
    if narrowed and need <= free + incoming:
        return narrowed + [Wait(node, f"waiting for requests decoded together to end: {model} "
                                      f"needs {_mib(need)}")], model

    protected = state.protected_for(node)
    evictable = sorted((r for r in state.residents.values()
                        if r.node not in protected and r.settled and not r.busy),
                       key=lambda r: (r.reload_seconds, r.last_used, r.node))
    evictions: list[Resident] = []
    within_reach = free + incoming
    for resident in evictable:
        if within_reach >= need:
            break
        evictions.append(resident)
        within_reach += resident.kept
    plan: dict[str, tuple[str, int]] = {}
    if within_reach < need:
        # Evicting every idle outsider is not enough: step down the rest (partners, requester).
        plan = _step_down_plan(state, {node: candidates}, need - within_reach,
                               exclude={r.node for r in evictions}) or {}
        if not plan:
            return narrowed + [Wait(node, f"waiting for memory: {model} needs {_mib(need)}, "
                                          f"{_mib(free)} free of {_mib(state.budget)}")], model
        # With the steps taken, fewer evictions may do: keep only the cheapest ones needed.
        need = plan.get(node, (model, need))[1]
        reach = free + incoming + sum(state.residents[n].bytes - size
                                      for n, (_, size) in plan.items() if n != node)
        kept = []
        for resident in evictions:
            if reach >= need:
                break
            kept.append(resident)
            reach += resident.kept
        evictions = kept

    if plan:
        state.unsettled_at = request.now  # no stepping back up for a while: no flapping
    decisions: list[Decision] = list(narrowed)
    for resident in evictions:
        resident.phase, resident.target = "leaving", 0
        decisions.append(Evict(resident.node, f"idle, frees memory for {node} ({model})"))
    for target, (smaller, size) in plan.items():
        if target == node:
            model = smaller
        else:
            decisions.append(_switch(state.residents[target], smaller, size,
                                     f"makes room for {node}"))
    if not decisions:  # only the requester itself stepped down: it fits now
        return _admit(state, request, model)
    return decisions + [Wait(node, f"waiting for {len(decisions)} model(s) to give memory "
                                   f"back")], model


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.0f} MiB"


def _smallest_footprint(state: SchedulerState, node: str, ladder: Ladder) -> tuple[int, set[str]]:
    """The least ``node`` and the partners it must run beside can take, with every process's
    own memory: the floor below which no eviction or step-down can bring it."""
    partners: dict[str, Ladder] = {}
    for group in state.pipelines:
        if node in group:
            partners |= {r.node: r.ladder for r in state.residents.values() if r.node in group}
            partners |= {p.request.node: p.request.ladder for p in state.pending
                         if p.request.node in group}
    partners.pop(node, None)
    smallest = [min(state.estimate(m, size) for m, size in lad) for lad in
                [ladder, *partners.values()]]
    return sum(state.overhead.values()) + sum(smallest), set(partners)


def _switch(resident: Resident, model: str, size: int, why: str) -> Switch:
    models = [m for m, _ in resident.ladder]
    lower = model in models and resident.model in models and \
        models.index(model) > models.index(resident.model)
    direction = "down" if lower else "up"
    reason = f"steps {direction} from {resident.model}: {why}"
    resident.phase, resident.target = "switching", size
    resident.bytes = max(resident.bytes, size)  # a bigger variant's load peak is reserved now
    return Switch(resident.node, model, reason)


def _grant(state: SchedulerState, request: LoadRequest, ladder: Ladder, model: str,
           reason: str) -> list[Decision]:
    # Reserve the load's peak now so that concurrent requests cannot both be granted it.
    size = dict(ladder)[model]
    resident = state.residents[request.node] = Resident(
        request.node, model, size, ladder, last_used=request.now,
        wanted_parallel=max(request.parallel, 1), sequence_bytes=max(request.sequence_bytes, 0))
    if resident.wanted_parallel == 1 or not resident.sequence_bytes:
        resident.parallel = resident.wanted_parallel  # nothing to reserve per request
        return [Grant(request.node, model, reason)]
    # As many requests together as the rest of the budget holds, at least one.
    room = max(state.budget - state.used_bytes(), 0) // resident.sequence_bytes
    resident.parallel = 1 + min(resident.wanted_parallel - 1, room)
    if resident.parallel < resident.wanted_parallel:
        reason += f"; {resident.parallel} of {resident.wanted_parallel} requests together " \
                  f"({_mib(resident.sequence_bytes)} each beyond the first): the budget " \
                  f"holds no more"
    return [Grant(request.node, model, reason, resident.parallel)]


def _narrow(state: SchedulerState, shortfall: int, why: str, now: float) -> list[Decision]:
    """Fewer requests decoded together on the models reserving the most for them, each only as
    far as ``shortfall`` needs (at least one request each): freed without unloading anything,
    as their extra requests end."""
    wide = sorted((r for r in state.residents.values()
                   if r.settled and not r.narrow_to and r.parallel > 1 and r.sequence_bytes),
                  key=lambda r: (-(r.parallel - 1) * r.sequence_bytes, r.node))
    decisions: list[Decision] = []
    for resident in wide:
        if shortfall <= 0:
            break
        fewer = min(resident.parallel - 1, -(-shortfall // resident.sequence_bytes))
        resident.narrow_to, resident.narrowed_at = resident.parallel - fewer, now
        shortfall -= fewer * resident.sequence_bytes
        decisions.append(SetParallel(resident.node, resident.narrow_to,
                                     f"{resident.narrow_to} of {resident.wanted_parallel} "
                                     f"requests together: {why}"))
    return decisions


def _step_down_plan(state: SchedulerState, extra: dict[str, Ladder], shortfall: int,
                    exclude: set[str], partial: bool = False) -> dict[str, tuple[str, int]] | None:
    """Steps down ladders (those in ``extra`` and the settled residents' but ``exclude``) that
    free ``shortfall`` bytes, the step that frees the most first. None if they cannot,
    unless ``partial``: then as many steps as there are."""
    options: dict[str, list[tuple[str, int]]] = {node: list(ladder) for node, ladder in extra.items()}
    for r in state.residents.values():
        models = [m for m, _ in r.ladder]
        if r.node not in exclude and r.settled and r.model in models:
            smaller = [(m, state.estimate(m, size)) for m, size in r.ladder[models.index(r.model) + 1:]]
            options[r.node] = [(r.model, r.bytes), *smaller]
    current = {node: 0 for node in options}
    plan: dict[str, tuple[str, int]] = {}
    while shortfall > 0:
        best = None
        for node, ladder in options.items():
            index = current[node]
            if index + 1 < len(ladder):
                saving = ladder[index][1] - ladder[index + 1][1]
                if best is None or saving > best[0]:
                    best = (saving, node)
        if best is None or best[0] <= 0:
            return plan if partial else None
        saving, node = best
        current[node] += 1
        plan[node] = options[node][current[node]]
        shortfall -= saving
    return plan


def _balance(state: SchedulerState, available: int | None, now: float) -> list[Decision]:
    """Relieve outside pressure, or step a model back up once memory is plentiful again."""
    if available is not None and available < state.min_available:
        state.unsettled_at = now
        deficit = state.min_available - available - state.freeing_bytes()
        return _relieve(state, deficit, "the system is short of memory", now) \
            if deficit > 0 else []
    # Working sets grow after loading (KV caches, activations): back inside the budget.
    excess = state.used_bytes() - state.freeing_bytes() - state.budget
    if excess > 0 and not state.pending:
        state.unsettled_at = now
        return _relieve(state, excess, "the models outgrew the budget", now)
    settling = any(r.phase != "ready" for r in state.residents.values())
    calm = state.unsettled_at is None or now - state.unsettled_at >= state.calm_seconds
    if not calm or settling or state.pending:
        return []
    return _step_up(state, available)


def _narrow_again(state: SchedulerState, now: float) -> list[Decision]:
    """A narrowing not confirmed within ``confirm_seconds`` (its command dropped on the way,
    or long requests still decoding): said again; the node confirms once it is done."""
    decisions: list[Decision] = []
    for r in state.residents.values():
        if r.narrow_to and now - r.narrowed_at >= state.confirm_seconds:
            r.narrowed_at = now
            decisions.append(SetParallel(r.node, r.narrow_to, "not confirmed yet: said again"))
    return decisions


def _relieve(state: SchedulerState, deficit: int, why: str, now: float) -> list[Decision]:
    """Free ``deficit`` bytes: fewer requests decoded together first, then idle models outside
    the active pipelines, then step-downs."""
    before = state.freeing_bytes()
    decisions = _narrow(state, deficit, why, now)
    deficit -= state.freeing_bytes() - before
    protected = state.protected_for(None)
    evictable = sorted((r for r in state.residents.values()
                        if r.node not in protected and r.settled and not r.busy),
                       key=lambda r: (r.reload_seconds, r.last_used, r.node))
    for resident in evictable:
        if deficit <= 0:
            return decisions
        deficit -= resident.kept
        resident.phase, resident.target = "leaving", 0
        decisions.append(Evict(resident.node, f"idle; {why}"))
    if deficit > 0:
        plan = _step_down_plan(state, {}, deficit, exclude={d.node for d in decisions},
                               partial=True) or {}
        decisions += [_switch(state.residents[node], smaller, size, why)
                      for node, (smaller, size) in plan.items()]
    return decisions


def _step_up(state: SchedulerState, available: int | None) -> list[Decision]:
    """More requests together for a model decoding fewer than it would, else one rung back up
    for one stepped-down model, if memory stays plentiful after it."""
    free = state.budget - state.used_bytes()
    spare = free if available is None or not state.min_available else \
        min(free, available - state.min_available - state.step_up_margin)
    for r in sorted(state.residents.values(), key=lambda r: r.node):
        if r.settled and not r.narrow_to and r.sequence_bytes and \
                r.parallel < r.wanted_parallel and spare >= r.sequence_bytes:
            r.parallel += min(r.wanted_parallel - r.parallel, spare // r.sequence_bytes)
            return [SetParallel(r.node, r.parallel, f"{r.parallel} of {r.wanted_parallel} "
                                                   f"requests together: memory is plentiful "
                                                   f"again")]
    candidates = []
    for r in state.residents.values():
        models = [m for m, _ in r.ladder]
        if r.model in models and models.index(r.model) > 0:
            bigger, estimate = r.ladder[models.index(r.model) - 1]
            size = state.estimate(bigger, estimate)
            candidates.append((size - r.bytes, r.node, bigger, size))
    for growth, node, bigger, size in sorted(candidates):
        room = available is None or not state.min_available or \
            available - growth >= state.min_available + state.step_up_margin
        if growth <= free and room:
            return [_switch(state.residents[node], bigger, size, "memory is plentiful again")]
    return []
