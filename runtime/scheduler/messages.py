"""Messages of the control plane: model nodes, the scheduler node and ``omni`` commands.

Model nodes send :class:`LoadAsk` and :class:`NodeReport` on their ``memory``
output; the scheduler answers with :class:`Command` on its ``command`` output
(every model node's ``scheduler`` input; each keeps those naming it) and
publishes :class:`Status` on ``status`` for the dataflow's dynamic
``omni-control`` node, through which ``omni status`` reads it. ``omni swap``
sends :class:`SwapAsk` on that node's ``control`` output; the scheduler
decides how (or whether) the swap fits the budget, the node carries it out and
reports it, and the scheduler publishes the :class:`SwapOutcome` on ``status``. Each message is
one msgspec-encoded JSON string in a one-element Arrow string array: small,
typed, and readable in a trace.
"""

from __future__ import annotations

from typing import Literal

import msgspec
import pyarrow as pa

from mofa_omni.contract.errors import ContractError

MEMORY_OUTPUT = "memory"  # model node -> scheduler
SCHEDULER_INPUT = "scheduler"  # scheduler/command -> model node
COMMAND_OUTPUT = "command"
STATUS_OUTPUT = "status"
CONTROL_OUTPUT = "control"  # omni-control -> scheduler
CONTROL_NODE = "omni-control"  # the dynamic node `omni` commands connect as

NodeState = Literal["starting", "waiting", "loading", "switching", "swapping", "ready", "busy",
                    "evicted", "unavailable"]


class Variant(msgspec.Struct, frozen=True):
    model: str
    bytes: int  # estimated memory (the catalog's, until the scheduler has measured it)


class LoadAsk(msgspec.Struct, frozen=True, tag="load"):
    """A model node asks for memory to load its model (or a smaller variant of its ladder)."""

    node: str
    ladder: list[Variant]  # largest first; [0] is the model the node wants
    overhead: int  # the process's own resident memory before loading
    available: int = 0  # the node's machine: available memory (the scheduler may run elsewhere)
    total: int = 0  # the node's machine: physical memory (0: not measured)
    # Requests its model would decode together, and the memory each one beyond the first takes
    # at its longest (0: none beyond the model's own, e.g. llama.cpp's KV pool is fixed at load)
    parallel: int = 1
    sequence_bytes: int = 0


class SwapAsk(msgspec.Struct, frozen=True, tag="swap"):
    """``omni swap``: serve ``model`` on ``node`` from now on."""

    swap_id: str
    node: str
    model: str


class SwapOutcome(msgspec.Struct, frozen=True, tag="swap_outcome"):
    """How a swap ended: the node reports it, the scheduler passes it on to ``omni swap``."""

    swap_id: str
    node: str
    ok: bool
    old_model: str
    new_model: str
    mode: Literal["beside", "in_place", "not_loaded", "none"] = "none"
    load_seconds: float = 0.0  # loading the new model
    total_seconds: float = 0.0  # from the node's receiving the command to serving the new model
    paused_seconds: float = 0.0  # when no request could be served (unload + load in place)
    waited: int = 0  # requests that were waiting when serving resumed
    longest_wait: float = 0.0  # the longest any of them waited because of the swap
    detail: str = ""  # failed: why; ok: how the scheduler decided
    warning: str = ""


class Delivery(msgspec.Struct, frozen=True):
    """What reached a model node and what it answered, when it reported: proof for the sender
    of a request that the request arrived, and that the reply's last message went out.

    dora drops messages without a word (see :mod:`mofa_omni.node.integrity`); a gap in a
    numbered stream shows only when a later message comes. A request that was the last
    one sent, or the last message of a reply, is found lost only this way.
    """

    at_ns: int = 0  # when the node reported (time.time_ns)
    received: dict[str, int] = {}  # by input: the next stream_seq expected on it
    answered: list[str] = []  # the request ids whose last message went out, newest last


class NodeReport(msgspec.Struct, frozen=True, tag="report"):
    """What a model node did and measured. ``event`` says why it reports now."""

    node: str
    event: Literal["loaded", "load_failed", "unloaded", "busy", "idle", "measure", "swapped",
                   "swap_failed", "parallel"]
    state: NodeState
    model: str  # the variant it holds or is about to hold
    rss: int  # the process's resident memory now
    queue: int = 0  # requests waiting
    model_bytes: int = 0  # loaded: resident growth the load caused
    peak_bytes: int = 0  # loaded: peak growth while loading
    load_seconds: float = 0.0
    mlx_active: int = 0
    mlx_peak: int = 0
    detail: str = ""  # load_failed: why
    swap: SwapOutcome | None = None  # swapped / swap_failed (and unloaded, for a node
    # that held no model): the outcome for ``omni swap``
    lost: dict[str, int] = {}  # messages missing from each input's numbered stream, so far
    available: int = 0  # the node's machine: available memory (the scheduler may run elsewhere)
    total: int = 0  # the node's machine: physical memory (0: not measured)
    delivery: Delivery = Delivery()
    parallel: int = 0  # requests it serves together at most now (event parallel: newly so)
    # the highest resident memory since its model loaded (Linux; 0: not measured): a working
    # set's peaks (activations while serving) fall between two reports
    peak_rss: int = 0


class Command(msgspec.Struct, frozen=True, tag="command"):
    """The scheduler's decision for one node."""

    node: str
    action: Literal["load", "unload", "switch", "wait", "refuse", "swap", "parallel"]
    model: str = ""
    reason: str = ""
    beside: bool = False  # swap: load the new model while the old one keeps serving
    swap_id: str = ""
    # load and parallel: the requests it may serve together (0: as many as it asked for)
    parallel: int = 0


class NodeStatus(msgspec.Struct, frozen=True):
    node: str
    model: str
    wanted: str
    state: str
    rss: int
    model_bytes: int
    queue: int
    pipelines: list[int]
    lost: dict[str, int] = {}  # by input: messages dora dropped on the way to this node
    machine: str = ""  # the machine it runs on (dora's deploy: machine; "" on one machine)
    delivery: Delivery = Delivery()  # as of its latest report
    restarts: int = 0  # times dora restarted it after a crash
    parallel: int = 0  # requests it serves together at most (0: not reported)
    wanted_parallel: int = 0  # ... and would, memory allowing


class MachineStatus(msgspec.Struct, frozen=True):
    """One machine of a graph spread over several: its own budget and memory."""

    machine: str
    budget: int
    used: int
    measured: int
    available: int
    total: int
    min_available: int
    lost: bool = False  # its nodes fell silent: its daemon or the machine is gone
    detail: str = ""


class DecisionRecord(msgspec.Struct, frozen=True):
    at: float  # seconds since the scheduler started
    action: str
    node: str
    model: str
    reason: str


class Status(msgspec.Struct, frozen=True, tag="status"):
    """The scheduler's view, for ``omni status``."""

    budget: int
    used: int  # what the model processes hold and what is reserved for loads under way
    measured: int  # the model processes' resident memory, as last reported
    peak_measured: int  # the highest ``measured`` seen since the scheduler started
    available: int  # the system's available memory
    total: int
    min_available: int
    uptime: float
    nodes: list[NodeStatus]
    pipelines: list[list[str]]
    active: list[int]
    decisions: list[DecisionRecord]
    lost: dict[str, int] = {}  # the scheduler's own inputs
    machines: list[MachineStatus] = []  # per machine, when the graph runs on several


ControlMessage = LoadAsk | NodeReport | Command | Status | SwapAsk | SwapOutcome

_decoder = msgspec.json.Decoder(ControlMessage)


def to_arrow(message: ControlMessage) -> pa.Array:
    return pa.array([msgspec.json.encode(message).decode()], pa.string())


def from_arrow(value: pa.Array) -> ControlMessage:
    """Decode one control message; a malformed one raises ContractError saying what is wrong."""
    if not pa.types.is_string(value.type) or len(value) != 1:
        raise ContractError(f"a control message is one string, got {len(value)} x {value.type}")
    try:
        return _decoder.decode(value[0].as_py())
    except msgspec.ValidationError as error:
        raise ContractError(f"bad control message: {error}") from None
    except msgspec.DecodeError as error:
        raise ContractError(f"control message is not JSON: {error}") from None
