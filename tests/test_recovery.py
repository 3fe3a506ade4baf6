"""``omni recover``: the decision (which machines a graph lost, when to restart it) and the
watcher against a real coordinator with two daemons, whose machine B dies and comes back."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from mofa_omni.cluster.local import LocalCluster
from mofa_omni.cluster.recovery import Observation, RecoveryWatch, connected_daemons, dora_error

NODES = Path(__file__).parent / "dataflows" / "recovery_nodes.py"
A1 = "A-01a21ede-a280-74e2-884c-530b7969aeb0"
B1 = "B-01a21ede-a369-7410-9d61-4c7845b17a13"
B2 = "B-01a21ede-c1a0-75e4-ada1-227ec5069a15"
C1 = "gpu-box-2-01a21edf-1b33-751b-9507-ed7bcaf32b0e"

CLUSTER_STATUS = f"""DAEMON ID                               LAST HEARTBEAT  RESTARTS  HEALTH KILLS
{A1}  3787ms ago      0         0
{C1}  3728ms ago      0         0

Active dataflows: 1
"""


def test_the_daemons_are_read_from_dora_cluster_status_by_machine():
    assert connected_daemons(CLUSTER_STATUS) == {"A": A1, "gpu-box-2": C1}
    assert connected_daemons("DAEMON ID  LAST HEARTBEAT\n\nActive dataflows: 0\n") == {}


def test_dora_errors_are_read_from_its_error_block():
    out = ("\n[ERROR]\nno matching daemon for machine id `B`\n\nLocation:\n    x.rs:78\n")
    assert dora_error(out) == "no matching daemon for machine id `B`"
    assert dora_error("something odd\n") == "something odd"


def test_a_machine_that_leaves_and_returns_restarts_the_graph_once_every_machine_is_there():
    watch = RecoveryWatch({"A": A1, "B": B1})
    assert watch.observe({"A": A1, "B": B1}) == Observation()
    assert watch.observe({"A": A1}) == Observation(lost=("B",), missing=("B",))
    assert watch.observe({"A": A1}) == Observation(missing=("B",))  # told once
    assert watch.observe({"A": A1, "B": B2}) == Observation(back=("B",), restart=True)
    watch.restarted({"A": A1, "B": B2})
    assert watch.observe({"A": A1, "B": B2}) == Observation()


def test_a_daemon_replaced_between_two_looks_is_lost_and_back_at_once():
    watch = RecoveryWatch({"A": A1, "B": B1})
    assert watch.observe({"A": A1, "B": B2}) == Observation(lost=("B",), back=("B",),
                                                            restart=True)


def test_the_same_daemon_reconnecting_after_a_cut_still_restarts_the_graph():
    # dora never re-links a daemon that was dropped and reconnected with its peers.
    watch = RecoveryWatch({"A": A1, "B": B1})
    watch.observe({"A": A1})
    assert watch.observe({"A": A1, "B": B1}).restart


def test_no_restart_while_another_machine_of_the_graph_is_missing():
    watch = RecoveryWatch({"A": A1, "B": B1})
    watch.observe({})
    assert watch.observe({"B": B2}) == Observation(back=("B",), missing=("A",))
    seen = watch.observe({"A": "A-01a21ee0-0000-7000-8000-000000000000", "B": B2})
    assert seen.back == ("A",) and seen.restart


def test_machines_outside_the_graph_change_nothing():
    watch = RecoveryWatch({"A": A1, "B": B1, "gpu-box-2": C1}, machines={"A", "B"})
    assert watch.observe({"A": A1, "B": B1}) == Observation()
    assert watch.observe({"A": A1, "B": B1, "gpu-box-2": "x"}) == Observation()


def test_a_machine_of_the_graph_missing_when_the_watch_begins_is_lost_already():
    watch = RecoveryWatch({"A": A1}, machines={"A", "B"})
    assert watch.lost == {"B"}
    assert watch.observe({"A": A1, "B": B2}) == Observation(back=("B",), restart=True)


def _omni(*args: str, **kwargs) -> subprocess.Popen:
    omni = Path(sys.executable).parent / "omni"
    return subprocess.Popen([str(omni), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def test_the_watcher_says_so_when_no_coordinator_answers():
    from mofa_omni.cluster.local import free_port

    watcher = _omni("recover", "--dataflow", "voice", "--coordinator-port", str(free_port()))
    out, _ = watcher.communicate(timeout=30)
    assert watcher.returncode == 1 and "the coordinator does not answer" in out, out


def _heard(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.3)
    pytest.fail(f"{what} within {timeout:g} s")


def _node(name: str, machine: str, tick: str, heard: Path) -> str:
    """A node of recovery_nodes.py on ``machine``: absolute paths, as dora 1.1.0's daemons of a
    multi-machine dataflow resolve no relative one."""
    return (f"  - id: {name}\n    path: {sys.executable}\n    args: {NODES} {name}\n"
            f"    deploy: {{ machine: {machine} }}\n    env: {{ HEARD: {heard} }}\n"
            f"    inputs: {{ tick: {tick} }}\n    outputs: [tick]\n")


def test_the_graph_is_restarted_by_itself_when_its_lost_machine_is_connected_again(tmp_path):
    heard = tmp_path / "heard.txt"
    flow_yml = tmp_path / "flow.yml"
    flow_yml.write_text("nodes:\n" + _node("ticker", "A", "dora/timer/millis/200", heard)
                        + _node("listener", "B", "ticker/tick", heard))
    with LocalCluster(["A", "B"], tmp_path / "cluster") as cluster:
        cluster.start(flow_yml, name="ticks")
        first = _until(lambda: _heard(heard), 30, "B heard nothing from A")[0]
        watcher = _omni("recover", "--dataflow", "ticks", "--descriptor", str(flow_yml),
                        "--coordinator-port", str(cluster.port), "--interval", "0.5")
        try:
            started = watcher.stdout.readline()
            assert "watching dataflow ticks" in started and "machines A, B" in started, started
            cluster.kill_machine("B")
            time.sleep(2.0)
            before = len(_heard(heard))
            cluster.start_daemon("B")
            # Nothing else: the watcher sees B's daemon and restarts the graph on it.
            _until(lambda: set(_heard(heard)[before:]) - {first}, 30,
                   "B heard no tick from A after its daemon came back")
            cluster.command("stop", "ticks")
            out, _ = watcher.communicate(timeout=30)
        finally:
            if watcher.poll() is None:
                watcher.kill()
                out = watcher.communicate()[0]
    assert watcher.returncode == 0, out
    assert "machine B lost" in out and "machine B is connected again" in out, out
    assert out.count("restarted in") == 1, out
    assert "dataflow ticks is finished" in out, out
