"""Bringing a multi-machine graph back when a machine it lost is connected again.

dora 1.1.0 gives a daemon that re-registers with the coordinator none of the running graph's
nodes, and a daemon that was cut off and reconnects is never re-linked with its peers, so the
graph only works again once it is restarted on the daemons there are now (``dora restart
--force``: stop, then start from the stored descriptor and ``--env``). ``omni recover`` does
that by itself. What it watches is the coordinator's own list of connected daemons (``dora
cluster status``: one line per daemon, ``<machine>-<uuid>``, a fresh uuid for every daemon
started): a machine of the graph whose daemon left, or was replaced by another between two
looks, is lost; once every machine of the graph has a daemon again, the graph is restarted.

A restart is never asked for while a machine is missing: dora then fails to place that
machine's nodes and leaves the dataflow Failed, which no restart can bring back.

``RecoveryWatch`` is the decision (pure); ``Recoverer`` runs it against dora's CLI.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mofa_omni.contract.errors import ServerError

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_DAEMON_ID = re.compile(rf"^(?:(?P<machine>.*)-)?(?P<uuid>{_UUID})$")


def connected_daemons(cluster_status: str) -> dict[str, str]:
    """Machine id -> daemon id of every daemon in ``dora cluster status``'s table."""
    daemons = {}
    for line in cluster_status.splitlines():
        word = line.split(maxsplit=1)[0] if line.strip() else ""
        if match := _DAEMON_ID.match(word):
            daemons[match["machine"] or ""] = word
    return daemons


def dora_error(output: str) -> str:
    """The message of a failed dora command (the line after ``[ERROR]``), else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if "[ERROR]" in lines and lines.index("[ERROR]") + 1 < len(lines):
        return lines[lines.index("[ERROR]") + 1]
    return lines[-1] if lines else "no output"


@dataclass(frozen=True, slots=True)
class Observation:
    """What one look at the connected daemons changed."""

    lost: tuple[str, ...] = ()  # machines lost since the previous look
    back: tuple[str, ...] = ()  # lost machines that have a daemon again, since the previous look
    missing: tuple[str, ...] = ()  # machines of the graph with no daemon now
    restart: bool = False  # a machine came back and every machine is there: restart now


@dataclass
class RecoveryWatch:
    """The graph's machines and the daemons its nodes run on; which machines it lost.

    ``daemons``: those connected when the graph was (last) started. ``machines``: the graph's
    machines (its ``deploy: machine`` names); None takes every machine in ``daemons``.
    A machine of the graph without a daemon at the start counts as lost already.
    """

    daemons: dict[str, str]
    machines: frozenset[str] | None = None
    lost: set[str] = field(default_factory=set)
    _returned: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.machines = frozenset(self.daemons if self.machines is None else self.machines)
        self.daemons = {m: d for m, d in self.daemons.items() if m in self.machines}
        self.lost = {m for m in self.machines if m not in self.daemons}

    def observe(self, connected: dict[str, str]) -> Observation:
        """Take in the daemons connected now."""
        newly_lost = sorted(m for m in self.machines - self.lost
                            if connected.get(m) != self.daemons.get(m))
        self.lost.update(newly_lost)
        here = {m for m in self.lost if m in connected}
        back = sorted(here - self._returned)
        self._returned = here
        missing = tuple(sorted(m for m in self.machines if m not in connected))
        return Observation(tuple(newly_lost), tuple(back), missing,
                           restart=bool(self.lost) and not missing)

    def restarted(self, connected: dict[str, str]) -> None:
        """The graph was started again on the daemons connected now."""
        self.daemons = {m: d for m, d in connected.items() if m in self.machines}
        self.lost = {m for m in self.machines if m not in self.daemons}
        self._returned = set()


class CoordinatorGone(ServerError):
    """The coordinator did not answer for longer than the watcher waits."""


class RecoveryFailed(ServerError):
    """The dataflow could not be restarted (or is not running to begin with)."""


def _machines_text(machines: Iterable[str]) -> str:
    return ", ".join(m or "(unnamed)" for m in machines)


class Recoverer:
    """Watches one running dataflow and restarts it when a machine it lost comes back.

    ``dora(*args)``: runs ``dora ARGS`` against the coordinator (its address and port added),
    returning the finished process. ``log(line)``: where each thing it noticed or did goes.
    """

    def __init__(self, dataflow: str, dora: Callable[..., subprocess.CompletedProcess],
                 log: Callable[[str], None], *, machines: Iterable[str] | None = None,
                 interval: float = 2.0, coordinator_timeout: float = 60.0, attempts: int = 3,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.dataflow, self.dora, self.log = dataflow, dora, log
        self.machines = frozenset(machines) if machines is not None else None
        self.interval, self.coordinator_timeout, self.attempts = (interval, coordinator_timeout,
                                                                   attempts)
        self.sleep, self.clock = sleep, clock
        self.restarts = 0
        self._silent_since: float | None = None

    # --- dora ---------------------------------------------------------------------------

    def _ask(self, *args: str) -> str | None:
        """stdout of ``dora ARGS``; None while the coordinator does not answer (for up to
        ``coordinator_timeout``, then CoordinatorGone)."""
        try:
            done = self.dora(*args)
            failure = None if done.returncode == 0 else dora_error(done.stdout + done.stderr)
        except subprocess.TimeoutExpired:
            failure = f"dora {args[0]} timed out"
        if failure is None:
            if self._silent_since is not None:
                self.log("coordinator answers again")
            self._silent_since = None
            return done.stdout
        now = self.clock()
        if self._silent_since is None:
            self._silent_since = now
            self.log(f"coordinator does not answer ({failure}); waiting up to "
                     f"{self.coordinator_timeout:g} s")
        elif now - self._silent_since >= self.coordinator_timeout:
            raise CoordinatorGone(f"the coordinator has not answered for "
                                  f"{now - self._silent_since:.0f} s: {failure}")
        return None

    def _daemons(self) -> dict[str, str] | None:
        out = self._ask("cluster", "status")
        return None if out is None else connected_daemons(out)

    def _flows(self) -> list[dict] | None:
        out = self._ask("list", "--format", "json")
        if out is None:
            return None
        flows = []
        for line in out.splitlines():
            try:
                flows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return flows

    def _restart(self, uuid: str) -> str:
        """``dora restart UUID --force``; the new UUID."""
        try:
            done = self.dora("restart", uuid, "--force")
        except subprocess.TimeoutExpired:
            raise RecoveryFailed("dora restart timed out") from None
        if done.returncode != 0:
            raise RecoveryFailed(dora_error(done.stdout + done.stderr))
        for line in done.stdout.splitlines():
            if "->" in line:
                return line.rsplit("->", 1)[1].strip()
        raise RecoveryFailed(f"dora restart printed no new dataflow id: {done.stdout.strip()}")

    # --- the watch ----------------------------------------------------------------------

    def resolve(self, flows: list[dict]) -> dict:
        """The running dataflow named (or numbered) ``self.dataflow``."""
        running = [f for f in flows if f.get("status") == "Running"
                   and self.dataflow in (f.get("uuid"), f.get("name"))]
        if len(running) > 1:
            raise RecoveryFailed(f"{len(running)} running dataflows are named {self.dataflow}: "
                                 f"give its UUID ({', '.join(f['uuid'] for f in running)})")
        if not running:
            known = ", ".join(f"{f.get('name') or f['uuid']} ({f.get('status')})" for f in flows)
            raise RecoveryFailed(f"no running dataflow {self.dataflow} on the coordinator"
                                 + (f"; it has {known}" if known else ""))
        return running[0]

    def run(self) -> int:
        """Watch until the dataflow is no longer running: 0 when it finished, 1 when it failed.
        Raises RecoveryFailed (restarts that failed ``attempts`` times, or no such dataflow)
        and CoordinatorGone."""
        try:
            first_look = (self.dora("cluster", "status"), self.dora("list", "--format", "json"))
        except subprocess.TimeoutExpired:
            raise CoordinatorGone("the coordinator does not answer: dora timed out") from None
        for done in first_look:
            if done.returncode != 0:
                raise CoordinatorGone("the coordinator does not answer: "
                                      + dora_error(done.stdout + done.stderr))
        flow = self.resolve([json.loads(line) for line in first_look[1].stdout.splitlines()
                             if line.startswith("{")])
        uuid, name = flow["uuid"], flow.get("name") or flow["uuid"]
        watch = RecoveryWatch(connected_daemons(first_look[0].stdout), self.machines)
        self.log(f"watching dataflow {name} ({uuid}) on machines "
                 f"{_machines_text(sorted(watch.machines))}")
        failures = 0
        while True:
            self.sleep(self.interval)
            flows = self._flows()
            if flows is None:
                continue
            status = next((f.get("status") for f in flows if f.get("uuid") == uuid), "gone")
            if status != "Running":
                self.log(f"dataflow {name} is {status.lower()}: nothing more to watch")
                return 0 if status == "Finished" else 1
            connected = self._daemons()
            if connected is None:
                continue
            seen = watch.observe(connected)
            for machine in seen.lost:
                self.log(f"machine {machine} lost: "
                         + (f"its daemon {watch.daemons[machine]} left the coordinator"
                            if machine in watch.daemons and machine not in connected
                            else "its daemon was replaced" if machine in connected
                            else "no daemon"))
            for machine in seen.back:
                self.log(f"machine {machine} is connected again (daemon {connected[machine]})"
                         + (f"; waiting for {_machines_text(seen.missing)}"
                            if seen.missing else ""))
            if not seen.restart:
                continue
            started = self.clock()
            self.log(f"restarting dataflow {name} on {_machines_text(sorted(watch.machines))}")
            try:
                new = self._restart(uuid)
            except RecoveryFailed as error:
                failures += 1
                self.log(f"restart {failures} of {self.attempts} failed: {error}")
                if failures >= self.attempts:
                    raise RecoveryFailed(f"dataflow {name} could not be restarted after "
                                         f"{failures} attempts: {error}") from None
                continue
            failures = 0
            self.restarts += 1
            self.log(f"dataflow {name} restarted in {self.clock() - started:.1f} s: "
                     f"{uuid} -> {new}")
            uuid = new
            watch.restarted(connected)
