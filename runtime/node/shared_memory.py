"""Whether dora's shared-memory transport can work for this user (Linux).

dora 1.1.0 passes messages above 4 KiB between the nodes of a machine through zenoh's
shared-memory segments, and zenoh locks every segment in memory (``mlock``) when a process
creates or maps one: the node's own pool (``shared_memory_pool_size``, 8 MiB by default),
zenoh's metadata segment, and the pool of every node that sends it such messages. A process
without ``CAP_IPC_LOCK`` may lock at most ``RLIMIT_MEMLOCK``, whose Linux default (8 MiB) is
less than one pool: then nothing is locked and every large message is copied instead.
Measured with dora 1.1.0 on the project's machine: a 16 MiB message took 56-75 ms between two
nodes run as a user with the default limit, 4 ms as root (which has the capability).

Segments stay mapped in a receiver after their sender died (zenoh never detaches them:
eclipse-zenoh/zenoh#2787), so a node restarted after a crash adds up to its pool to the
locked memory of every node it sent large messages to: leave room for restarts.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

CAP_IPC_LOCK = 14  # linux/capability.h
DEFAULT_POOL = 8 << 20  # dora's shared_memory_pool_size when a node sets none
METADATA_SEGMENT = 1_310_720  # zenoh's per-process metadata segment, also locked
# What to lock for a graph like dataflows/server.yml: its gateway maps its own 64 MiB pool, the
# speech node's 32 MiB, three nodes' 8 MiB and their metadata, with room for restarts.
ADVISED = 512 << 20


@dataclass(frozen=True, slots=True)
class LockLimit:
    """How much memory this process may lock: ``limit`` bytes (None: unlimited), or any amount
    with ``capable`` (CAP_IPC_LOCK)."""

    limit: int | None
    capable: bool

    def allows(self, size: int) -> bool:
        return self.capable or self.limit is None or self.limit >= size


def effective_capabilities(status: str) -> int:
    """The ``CapEff`` mask of a ``/proc/<pid>/status`` text (0 if absent)."""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def lock_limit() -> LockLimit | None:
    """This process's memory-locking allowance; None where it is not Linux."""
    if not sys.platform.startswith("linux"):
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    try:
        with open("/proc/self/status") as f:
            capabilities = effective_capabilities(f.read())
    except OSError:
        capabilities = 0
    return LockLimit(None if soft == resource.RLIM_INFINITY else soft,
                     bool(capabilities >> CAP_IPC_LOCK & 1))


def shared_memory_verdict(allowance: LockLimit) -> tuple[bool, str]:
    """Whether nodes run by this user exchange large messages through shared memory, and a
    line saying so (with what to change when they cannot, or can only just)."""
    if allowance.capable or allowance.limit is None:
        how = "CAP_IPC_LOCK" if allowance.capable else "no limit on locked memory"
        return True, f"on ({how}): large messages pass between nodes without a copy"
    mib = allowance.limit / (1 << 20)
    raise_it = (f"raise the limit (`ulimit -l`, or `memlock` in /etc/security/limits.conf) "
                f"to {ADVISED >> 20} MiB or more")
    if not allowance.allows(DEFAULT_POOL + METADATA_SEGMENT):
        return False, (f"off: this user may lock {mib:g} MiB of memory, less than one node's "
                       f"pool: large messages are copied between nodes (a 16 MiB one took "
                       f"~60 ms instead of ~4 ms); {raise_it}")
    if not allowance.allows(ADVISED):
        return True, (f"partly: this user may lock {mib:g} MiB, enough for a few nodes' pools; "
                      f"a node that receives from many (a gateway) may fail to map the others' "
                      f"(zenoh then drops those messages: eclipse-zenoh/zenoh#2788); {raise_it}")
    return True, f"on: this user may lock {mib:g} MiB"
