"""dataflows/voice.split.yml on dora's own multi-machine set-up: a coordinator and two daemons
(machines A and B) on loopback ports of their own, real models: the reply, then machine B dying
and coming back, the graph recovered by ``omni recover``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mofa_omni.cluster.local import LocalCluster

SPLIT = Path(__file__).parents[1] / "dataflows" / "voice.split.yml"
pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path):
    with LocalCluster(["A", "B"], tmp_path / "cluster") as running:
        yield running


def _wait(condition, timeout: float, what: str, cluster: LocalCluster):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.5)
    pytest.fail(f"{what} within {timeout:g} s\n{_diagnosis(cluster)}")


def _diagnosis(cluster: LocalCluster) -> str:
    """Which nodes still run on each machine, and the last lines their logs have."""
    parts = [f"dataflows: {cluster.flows()}"]
    for machine, daemon in cluster.daemons.items():
        try:
            alive = [" ".join(p.cmdline()[:3]) for p in psutil.Process(daemon.pid).children()]
        except psutil.NoSuchProcess:
            alive = ["(the daemon is gone)"]
        parts.append(f"{machine} still runs: {alive}")
        for log in sorted((cluster.workdir / f"machine-{machine}").glob("_work/*/out/*/log_*")):
            parts.append(f"  {log.relative_to(cluster.workdir)}: "
                         f"{log.read_text(errors='replace')[-800:]}")
    return "\n".join(parts)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def finished(cluster, flow: str, transcript: Path, timeout: float = 300) -> None:
    """Wait for ``flow`` to finish; if it does not, fail with what each machine's nodes last
    logged and the transcript so far (a graph that hangs says where)."""
    from mofa_omni.cluster.local import ClusterError

    try:
        status = cluster.wait_finished(flow, timeout=timeout)
    except ClusterError as error:
        status = str(error)
    if status != "Finished":
        tails = [f"--- {log.parents[4].name} {log.name}:\n"
                 + "\n".join(log.read_text(errors="replace").splitlines()[-6:])
                 for machine in ("A", "B")
                 for log in sorted((cluster.workdir / f"machine-{machine}").glob(
                     "_work/*/out/*/log_*.jsonl"))]
        pytest.fail(f"{status}\ntranscript: {_lines(transcript)}\n" + "\n".join(tails))


def _status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def test_asr_on_one_machine_and_the_llm_and_tts_on_another_answer_the_question(cluster,
                                                                                 tmp_path):
    out, status_file = tmp_path / "out", tmp_path / "status.json"
    flow = cluster.start(SPLIT, env={"VOICE_OUTPUT": str(out), "STATUS_FILE": str(status_file)})
    finished(cluster, flow, out / "transcript.txt")
    lines = _lines(out / "transcript.txt")
    assert lines[0] == "user: What is the capital of France?", lines
    assert "paris" in lines[1].lower() and "[" not in lines[1], lines
    assert [line.split(":")[0] for line in lines] == ["user", "assistant"] * 2, lines
    assert "italy" in lines[3].lower() and "[" not in lines[3], lines
    assert len(list(out.glob("reply-*.wav"))) == 2  # spoken on B, written on A
    # Each node ran on its own machine: dora's per-node logs are kept by that machine's daemon.
    assert '"node":"llm"' in cluster.node_logs("B") and '"node":"llm"' not in cluster.node_logs("A")
    assert '"node":"asr"' in cluster.node_logs("A") and '"node":"asr"' not in cluster.node_logs("B")
    status = _status(status_file)
    machines = {m["machine"]: m for m in status["machines"]}
    assert set(machines) == {"A", "B"} and not any(m["lost"] for m in machines.values())
    assert {n["node"]: n["machine"] for n in status["nodes"]} == {"asr": "A", "llm": "B",
                                                                  "tts": "B"}
    assert machines["B"]["total"] > 0  # B's memory, reported by B's nodes


def test_a_machine_that_dies_fails_its_requests_the_rest_goes_on_and_the_graph_recovers(
        cluster, tmp_path):
    out, status_file = tmp_path / "out", tmp_path / "status.json"
    # The turn B never answers ends when the scheduler finds B lost (MACHINE_SILENT_S), not at
    # the reply's deadline: that can be long enough for the restarted graph's first reply,
    # spoken while its models warm up on a busy machine (12 s was not, once in a clean-clone
    # run: "The capital of France is Paris. [error: timeout]"; 30 s neither, once).
    flow = cluster.start(SPLIT, name="voice", env={
        "VOICE_OUTPUT": str(out), "STATUS_FILE": str(status_file), "REPLY_TIMEOUT_S": "90",
        "MACHINE_SILENT_S": "4"})
    watcher = subprocess.Popen(
        [str(Path(sys.executable).parent / "omni"), "recover", "--dataflow", "voice",
         "--descriptor", str(SPLIT), "--coordinator-port", str(cluster.port), "--interval", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _lose_machine_b_and_recover(cluster, flow, out, status_file, watcher)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            print(watcher.communicate()[0])


def _lose_machine_b_and_recover(cluster, flow, out, status_file, watcher):
    transcript = out / "transcript.txt"
    _wait(lambda: any(line.startswith("assistant: ") for line in _lines(transcript)), 240,
          "no first reply", cluster)
    killed = cluster.kill_machine("B")  # the daemon and the LLM, splitter and TTS with it
    assert len(killed) >= 4

    # The second question was asked of a machine that is gone: once the scheduler on A finds B
    # lost, the dialogue ends that reply with the reason and the conversation goes on.
    errors = _wait(lambda: [line for line in _lines(transcript) if "[error: " in line],
                   60, "no error for the turn B never answered", cluster)
    assert errors[0].startswith("assistant: "), _lines(transcript)
    assert errors[0].endswith(("[error: llm unavailable: machine B is lost]",
                               "[error: tts unavailable: machine B is lost]")), errors
    # The scheduler on A saw B's nodes fall silent: B lost, its models unavailable, A's fine.
    status = _wait(lambda: (s := _status(status_file)) and any(
        m["lost"] for m in s["machines"]) and s, 30, "B not marked lost", cluster)
    states = {n["node"]: n["state"] for n in status["nodes"]}
    assert states["llm"] == states["tts"] == "unavailable" and states["asr"] != "unavailable"
    (lost,) = [m for m in status["machines"] if m["lost"]]
    assert lost["machine"] == "B" and "llm, tts" in lost["detail"]
    assert cluster.status_of(flow) == "Running"  # A's part of the graph is still up

    # B comes back (a fresh daemon): dora 1.1.0 gives it no nodes of the running graph; the
    # watcher sees B's daemon connected again and restarts the graph, which answers again.
    transcript.unlink()
    cluster.start_daemon("B")
    try:  # it ends when the restarted graph has finished
        log, _ = watcher.communicate(timeout=300)
    except subprocess.TimeoutExpired as timeout:
        pytest.fail(f"the restarted graph did not finish in 300 s: {timeout.output}\n"
                    f"transcript: {_lines(transcript)}\n{_diagnosis(cluster)}")
    assert watcher.returncode == 0, log
    assert "machine B lost" in log and "machine B is connected again" in log, log
    assert log.count("restarted in") == 1 and "dataflow voice is finished" in log, log
    (again,) = [f for f in cluster.flows().values() if f["uuid"] != flow]
    assert again["name"] == "voice" and again["status"] == "Finished", again
    lines = _lines(transcript)
    assert [line.split(":")[0] for line in lines] == ["user", "assistant"] * 2, lines
    # (a timeout here: where each node of the restarted graph was, from its log)
    assert not any("[error" in line for line in lines), f"{lines}\n{_diagnosis(cluster)}"
    assert "capital of France" in lines[0] and "paris" in lines[1].lower(), lines
    status = _status(status_file)
    assert not any(m["lost"] for m in status["machines"]), status["machines"]
