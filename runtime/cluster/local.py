"""dora's multi-machine set-up on one machine: a coordinator and one daemon per machine name.

The same processes a user starts on real machines (``dora coordinator``; ``dora daemon
--machine-id A --coordinator-addr ...`` on each), here on loopback ports of their own, so a
placed dataflow (``deploy: {machine: ...}``) runs as it would across machines, beside other
graphs on the default ports. Used by the tests and the distributed benchmark; a user can try a
placed dataflow with it before spreading it over machines::

    with LocalCluster(["A", "B"], workdir) as cluster:
        flow = cluster.start("dataflows/voice.split.yml", env={"VOICE_OUTPUT": "out"})
        cluster.wait_finished(flow, timeout=300)

Everything it started is torn down on exit: the dataflows stopped, the daemons and the node
processes they spawned killed, the coordinator last.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from mofa_omni.contract.errors import ServerError


class ClusterError(ServerError):
    """A dora command of the local cluster failed."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalCluster:
    """A dora coordinator and one daemon per name in ``machines``, under ``workdir``."""

    def __init__(self, machines: list[str], workdir: Path, env: dict[str, str] | None = None):
        self.machines, self.workdir = list(machines), Path(workdir)
        bin_dir = str(Path(sys.executable).parent)  # dora and the omni-* node scripts
        self.env = {**os.environ, **(env or {}),
                    "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                    "RUST_BACKTRACE": "0"}
        self.dora = os.path.join(bin_dir, "dora")
        self.port = free_port()
        self.coordinator: subprocess.Popen | None = None
        self.daemons: dict[str, subprocess.Popen] = {}

    # --- processes ---------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.coordinator = self._spawn("coordinator", [
            "coordinator", "--port", str(self.port), "--store", "memory"], self.workdir)
        for machine in self.machines:
            self.start_daemon(machine)
        self.wait_for_daemons(self.machines)

    def start_daemon(self, machine: str) -> None:
        """Start (or start again) the daemon of ``machine``, in a folder of its own."""
        folder = self.workdir / f"machine-{machine}"
        folder.mkdir(parents=True, exist_ok=True)
        self.daemons[machine] = self._spawn(f"daemon-{machine}", [
            "daemon", "--machine-id", machine, "--coordinator-port", str(self.port),
            "--local-listen-port", str(free_port()), "--zenoh-no-multicast", "--quiet"], folder)

    def _spawn(self, name: str, args: list[str], cwd: Path) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")
        return subprocess.Popen([self.dora, *args], cwd=cwd, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def kill_machine(self, machine: str) -> list[int]:
        """The machine dies: its daemon and every node process it spawned are killed at once
        (SIGKILL, nothing shuts down cleanly). Returns the killed process ids."""
        daemon = self.daemons.pop(machine)
        return _kill_tree(daemon.pid)

    def wait_for_daemons(self, machines: list[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listing = self.command("cluster", "status", check=False).stdout
            if all(f"\n{m}-" in "\n" + listing for m in machines):
                return
            time.sleep(0.3)
        raise ClusterError(f"daemons {machines} did not register within {timeout:g} s: "
                           f"{listing}")

    def down(self) -> None:
        """Stop every dataflow, kill the daemons with their nodes, then the coordinator."""
        if self.coordinator and self.coordinator.poll() is None:
            self.command("stop", "--all", "--force", check=False, timeout=30)
        for machine in list(self.daemons):
            self.kill_machine(machine)
        if self.coordinator:
            _kill_tree(self.coordinator.pid)
            self.coordinator = None

    # --- dora commands -----------------------------------------------------------------

    def command(self, *args: str, check: bool = True, timeout: float = 60.0,
                ) -> subprocess.CompletedProcess:
        """``dora ARGS --coordinator-port <this cluster's>``."""
        done = subprocess.run([self.dora, *args, "--coordinator-port", str(self.port)],
                              env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise ClusterError(f"dora {' '.join(args)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
        return done

    def start(self, dataflow: str | Path, env: dict[str, str] | None = None,
              name: str | None = None) -> str:
        """Start ``dataflow`` detached (``env``: for every node, ``dora start --env``); its UUID."""
        args = ["start", str(dataflow), "--detach"]
        if name:
            args += ["--name", name]
        for key, value in (env or {}).items():
            args += ["--env", f"{key}={value}"]
        out = self.command(*args, timeout=120).stdout
        for line in out.splitlines():
            if line.startswith("dataflow started:"):
                return line.split(":", 1)[1].strip()
        raise ClusterError(f"dora start printed no dataflow id:\n{out}")

    def flows(self) -> dict[str, dict]:
        """Every dataflow the coordinator knows (running, finished, failed), by UUID."""
        out = self.command("list", "--format", "json", check=False).stdout
        flows = {}
        for line in out.splitlines():
            try:
                flow = json.loads(line)
            except json.JSONDecodeError:
                continue
            flows[flow["uuid"]] = flow
        return flows

    def status_of(self, flow: str) -> str:
        return self.flows().get(flow, {}).get("status", "unknown")

    def wait_finished(self, flow: str, timeout: float) -> str:
        """Wait until ``flow`` is no longer running; its final status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status_of(flow)
            if status not in ("Running", "unknown"):
                return status
            time.sleep(1.0)
        raise ClusterError(f"dataflow {flow} still {self.status_of(flow)} after {timeout:g} s")

    def restart(self, flow: str) -> str:
        """``dora restart --force``: the dataflow again from its stored descriptor (and --env),
        on the daemons registered now; the new UUID."""
        out = self.command("restart", flow, "--force", timeout=120).stdout
        for line in out.splitlines():
            if "->" in line:
                return line.rsplit("->", 1)[1].strip()
        raise ClusterError(f"dora restart printed no new dataflow id:\n{out}")

    def node_logs(self, machine: str) -> str:
        """Every log line the nodes of ``machine`` wrote so far (dora keeps them per node)."""
        folder = self.workdir / f"machine-{machine}"
        return "".join(path.read_text(errors="replace")
                       for path in sorted(folder.glob("_work/*/out/*/log_*.jsonl")))


def _kill_tree(pid: int) -> list[int]:
    try:
        root = psutil.Process(pid)
        victims = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for process in victims:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=10)
    return [p.pid for p in victims]
