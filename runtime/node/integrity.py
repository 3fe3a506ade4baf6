"""Nothing lost silently: numbered output streams, gap detection, payloads sized for the pool.

dora drops messages without a word when an input queue overflows (upstream
issues #3397, #3439), and a payload larger than a node's shared-memory pool either
crawls through the daemon or fails deep inside dora with a bare "internal error".
:class:`CheckedNode` wraps a dora node so that neither goes unseen: every message
it sends carries its number on that output (``stream_seq``, from 0), every input it
receives is checked by a :class:`GapDetector`, and a payload that does not fit the
pool is refused with :class:`PayloadTooLarge` before dora sees it.

An output read by a node on another machine (dora's ``deploy: machine``) crosses the
network through the daemons, with no shared memory: dora 1.1.0 refuses messages
above 64 MiB there and was measured to drop some of 32 and 56 MiB without a word
(loopback, two daemons), so such outputs are held to NETWORK_PAYLOAD_LIMIT (16 MiB
by default: 8 minutes of 16 kHz audio, or a 2-megapixel RGB frame, in one message).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from mofa_omni.config import env_str, exit_on_bad_settings
from mofa_omni.contract.errors import ContractError, ErrorKind
from mofa_omni.models.memory import format_bytes, parse_size
from mofa_omni.node.faults import DROP_MESSAGES, Dropper, parse_drops
from mofa_omni.node.host import dora_node_id

log = logging.getLogger("mofa_omni.node.integrity")

STREAM_SEQ = "stream_seq"  # metadata key: a message's number on its output
LOST_OUTPUT = "lost"  # a model node's notices of requests dora dropped on their way to it
DEFAULT_POOL_BYTES = 8 << 20  # dora 1.1.0's pool without `shared_memory_pool_size` (measured)
NETWORK_PAYLOAD_BYTES = 16 << 20  # the largest message sent to another machine (see above)


class PayloadTooLarge(ContractError):
    """A message bigger than the sending node's shared-memory pool."""

    kind = ErrorKind.TOO_LARGE


class OutputNumbering:
    """The next ``stream_seq`` of each output."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def peek(self, output: str) -> int:
        return self._next.get(output, 0)

    def advance(self, output: str) -> None:
        """The message numbered ``peek(output)`` was sent (one that failed keeps its number)."""
        self._next[output] = self.peek(output) + 1


@dataclass(slots=True)
class InputCount:
    received: int = 0
    lost: int = 0
    restarts: int = 0  # the sender started numbering again (it restarted or reconnected)
    expected: int = 0


@dataclass
class GapDetector:
    """Counts the messages missing from each input's numbered stream."""

    inputs: dict[str, InputCount] = field(default_factory=dict)

    def check(self, input_id: str, metadata: dict[str, Any] | None) -> int:
        """Note one received message; returns how many were lost just before it (0 if none,
        or if the sender does not number its messages)."""
        seq = (metadata or {}).get(STREAM_SEQ)
        if not isinstance(seq, int) or isinstance(seq, bool):
            return 0
        count = self.inputs.setdefault(input_id, InputCount())
        count.received += 1
        missing = 0
        if seq > count.expected:
            missing = seq - count.expected
            count.lost += missing
        elif seq < count.expected:
            count.restarts += 1
        count.expected = seq + 1
        return missing

    def received(self) -> dict[str, int]:
        """The next stream_seq expected on each numbered input."""
        return {name: count.expected for name, count in sorted(self.inputs.items())}

    def lost(self) -> dict[str, int]:
        """Messages lost so far, by input (only inputs that lost some)."""
        return {name: count.lost for name, count in sorted(self.inputs.items()) if count.lost}


def payload_bytes(value: pa.Array) -> int:
    """What a message's buffers take (what dora copies into shared memory)."""
    return value.get_total_buffer_size() if isinstance(value, pa.Array) else len(value)


def pool_bytes(node_config: str | None = None) -> int:
    """This node's shared-memory pool, from the config dora passes to it."""
    text = os.environ.get("DORA_NODE_CONFIG", "") if node_config is None else node_config
    match = re.search(r"^\s*shared_memory_pool_size:\s*(\d+)", text, re.MULTILINE)
    return int(match.group(1)) if match else DEFAULT_POOL_BYTES


# What a message takes in the pool besides its payload's values (Arrow offsets, padding, the
# message's header): measured ~8.3 KiB for a 48 KiB video chunk; twice that, to be safe.
MESSAGE_OVERHEAD_BYTES = 16 << 10
CHUNKS_IN_FLIGHT = 4  # a stream's messages the pool must hold at once (the receiver lags)


def chunk_bytes(pool: int) -> int:
    """The payload of one message of a stream of large pieces (a clip's frames) sent back to
    back: CHUNKS_IN_FLIGHT of them, with their overhead, fit the pool at once — two
    half-pool messages did not (dora then drops one without a word)."""
    return max(0, pool // CHUNKS_IN_FLIGHT - MESSAGE_OVERHEAD_BYTES)


def check_payload(output: str, size: int, pool: int) -> None:
    """Refuse a payload the pool cannot hold, saying how to fix it."""
    if size > pool:
        raise PayloadTooLarge(
            f"output {output!r}: a {format_bytes(size)} payload does not fit this node's "
            f"{format_bytes(pool)} shared-memory pool; raise `shared_memory_pool_size` on "
            f"this node in the dataflow (at least {size}), or send smaller pieces")


def remote_readers(descriptor: dict[str, Any], node_id: str,
                   machine: str | None = None) -> dict[str, list[str]]:
    """The outputs of ``node_id`` read on other machines: output -> those machines.

    ``machine``: where this node runs (default: dora's DORA_MACHINE_ID, else its
    ``deploy: machine``). Empty on a graph with no placement."""
    def placed(node: dict[str, Any]) -> str:
        default = (descriptor.get("deploy") or {}).get("machine") or ""
        return (node.get("deploy") or {}).get("machine") or default

    nodes = {n["id"]: n for n in descriptor.get("nodes", [])}
    if node_id not in nodes:
        return {}
    here = machine or os.environ.get("DORA_MACHINE_ID") or placed(nodes[node_id])
    readers: dict[str, list[str]] = {}
    for reader in nodes.values():
        there = placed(reader)
        if not there or there == here:
            continue
        for spec in (reader.get("inputs") or {}).values():
            source = spec["source"] if isinstance(spec, dict) else str(spec)
            sender, _, output = source.partition("/")
            if sender == node_id and there not in readers.get(output, []):
                readers.setdefault(output, []).append(there)
    return readers


def network_limit() -> int:
    """NETWORK_PAYLOAD_LIMIT (bytes, e.g. "32MiB"), else NETWORK_PAYLOAD_BYTES."""
    setting = os.environ.get("NETWORK_PAYLOAD_LIMIT", "").strip()
    return parse_size(setting, None) if setting else NETWORK_PAYLOAD_BYTES


def check_network_payload(output: str, size: int, limit: int, machines: list[str]) -> None:
    """Refuse a payload too large to send to a node on another machine."""
    if size > limit:
        raise PayloadTooLarge(
            f"output {output!r}: a {format_bytes(size)} payload is too large to send to machine "
            f"{', '.join(machines)} (over the network, without shared memory, at most "
            f"{format_bytes(limit)} a message: NETWORK_PAYLOAD_LIMIT); send smaller pieces, "
            f"or place the reading node on this node's machine")


@dataclass(frozen=True, slots=True)
class Gap:
    """Messages ``first`` .. ``last`` (stream_seq) of ``input`` never arrived."""

    input: str
    first: int
    last: int


class CheckedNode:
    """A dora node whose outputs are numbered and checked against its pool, and whose inputs
    are checked for gaps (logged when seen, counted in :attr:`gaps`, and passed to
    ``on_gap`` — a model node tells its requester, which sends the lost requests again).
    ``DROP_MESSAGES`` (:mod:`mofa_omni.node.faults`) makes it drop messages on purpose."""

    def __init__(self, node: Any = None, node_id: str = ""):
        if node is None:
            from dora import Node

            node = Node()
        self.node, self.node_id = node, node_id or dora_node_id()
        self.pool = pool_bytes()
        try:
            self.remote = remote_readers(self.node.dataflow_descriptor(), self.node_id)
        except Exception:  # a stand-in node without a descriptor (tests): nothing remote
            self.remote = {}
        self.network_limit = network_limit() if self.remote else NETWORK_PAYLOAD_BYTES
        self.numbering = OutputNumbering()
        self.gaps = GapDetector()
        self._sending = threading.Lock()  # numbers follow the order of sending, across threads
        with exit_on_bad_settings(self.node_id):
            self.dropper = Dropper(parse_drops(env_str(DROP_MESSAGES, "")))
        self.on_gap: Callable[[Gap], None] | None = None

    def send_output(self, output: str, value: pa.Array,
                    metadata: dict[str, Any] | None = None) -> int:
        """Send ``value``; returns its stream_seq on ``output``."""
        size = payload_bytes(value)
        check_payload(output, size, self.pool)
        if output in self.remote:
            check_network_payload(output, size, self.network_limit, self.remote[output])
        with self._sending:
            seq = self.numbering.peek(output)
            if self.dropper.drops(output, metadata):
                log.warning("%s: message %d on %r dropped, as %s asks", self.node_id, seq,
                            output, DROP_MESSAGES)
            else:
                self.node.send_output(output, value, {**(metadata or {}), STREAM_SEQ: seq})
            self.numbering.advance(output)
        return seq

    def next(self, timeout: float | None = None) -> dict | None:
        event = self.node.next(timeout=timeout)
        if event is not None and event["type"] == "INPUT":
            missing = self.gaps.check(event["id"], event.get("metadata"))
            if missing:
                seq = event["metadata"][STREAM_SEQ]
                log.warning("%s: %d message(s) lost on input %r before stream_seq %s (dora "
                            "dropped them; %d lost on it so far)", self.node_id,
                            missing, event["id"], seq, self.gaps.inputs[event["id"]].lost)
                if self.on_gap is not None:
                    self.on_gap(Gap(event["id"], seq - missing, seq - 1))
        return event

    def __iter__(self) -> Iterator[dict]:
        while (event := self.next()) is not None:
            yield event

    def __getattr__(self, name: str) -> Any:  # node_config, dataflow_descriptor, ...
        return getattr(self.node, name)
