"""The scheduler's glue, without dora: graph pipelines, sizes, control messages, bookkeeping,
and a model node's worker under a scheduler's commands (real adapter, no daemon)."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import ErrorReport
from mofa_omni.models.memory import parse_size
from mofa_omni.models.store import ModelStore
from mofa_omni.node.admission import IDLE_REPORT_AFTER_S, SchedulerLink
from mofa_omni.node.residency import ModelSlot
from mofa_omni.node.serving import RequestWorker
from mofa_omni.scheduler.bookkeeping import Scheduling, replay
from mofa_omni.scheduler.graph import scheduled_graph
from mofa_omni.scheduler.messages import (
    Command,
    LoadAsk,
    NodeReport,
    Status,
    Variant,
    from_arrow,
    to_arrow,
)
from mofa_omni.scheduler.policy import SchedulerState
from tests.wire import Wire, ask

ROOT = Path(__file__).resolve().parents[1]
MB = 1 << 20


def descriptor(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_pipelines_come_from_the_data_paths_of_the_dataflow():
    graph = scheduled_graph(descriptor(ROOT / "tests/dataflows/scheduled.yml"), "scheduler")
    assert graph.model_nodes == ("asr", "embedder", "llm", "writer")
    assert graph.memory_inputs == {"asr": "asr", "llm": "llm", "writer": "writer",
                                   "embedder": "embedder"}
    # whisper feeds the LLM through the driver; the writer feeds the embedder through another.
    assert sorted(map(sorted, graph.pipelines)) == [["asr", "llm"], ["embedder", "writer"]]


def test_pipelines_follow_cycles_and_ignore_control_edges():
    voice = descriptor(ROOT / "dataflows/voice.yml")
    for node in voice["nodes"]:
        if node["id"] in ("asr", "llm", "tts"):
            node["inputs"]["scheduler"] = "scheduler/command"
            node["outputs"].append("memory")
    voice["nodes"] += [
        {"id": "scheduler", "path": "scheduler.py", "outputs": ["command", "status"],
         "inputs": {n: f"{n}/memory" for n in ("asr", "llm", "tts")}},
        {"id": "omni-control", "path": "dynamic", "inputs": {"status": "scheduler/status"}},
        {"id": "embedder", "path": "omni_node.py", "outputs": ["result", "memory"],
         "inputs": {"request": {"source": "omni-control/embed"},
                    "scheduler": "scheduler/command"}}]
    graph = scheduled_graph(voice, "scheduler")
    assert graph.model_nodes == ("asr", "embedder", "llm", "tts")
    # The dialogue <-> LLM cycle and the VAD in front change nothing: one voice pipeline.
    # The embedder only hangs off the dynamic node: a pipeline of its own.
    assert sorted(map(sorted, graph.pipelines)) == [["asr", "llm", "tts"], ["embedder"]]
    assert "embedder" not in graph.memory_inputs.values()  # it reports nowhere: not scheduled


@pytest.mark.parametrize("text, total, expected", [
    ("1.5GiB", None, 3 << 29), ("800MB", None, 800_000_000), ("123456", None, 123456),
    ("512 MiB", None, 512 * MB), ("0.5", 1000, 500), ("25%", 1000, 250), ("1", 1000, 1000),
])
def test_memory_sizes_are_read_the_way_a_dataflow_writes_them(text, total, expected):
    assert parse_size(text, total) == expected


@pytest.mark.parametrize("text, problem", [
    ("lots", "not a memory size"), ("12 parsecs", "not a memory size"),
    ("0.5", "of what total"), ("150%", "between 0 and 1"),
])
def test_bad_memory_sizes_say_what_is_wrong(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_size(text, 1000 if "%" in text else None)


def test_control_messages_round_trip_and_bad_ones_are_explained():
    ask = LoadAsk("llm", [Variant("a", 2), Variant("b", 1)], overhead=7)
    assert from_arrow(to_arrow(ask)) == ask
    report = NodeReport("llm", "loaded", "ready", "a", 100, model_bytes=60, peak_bytes=70)
    assert from_arrow(to_arrow(report)) == report
    with pytest.raises(ContractError, match="one string"):
        from_arrow(pa.array([1, 2]))
    with pytest.raises(ContractError, match="not JSON"):
        from_arrow(pa.array(["{nope"]))
    with pytest.raises(ContractError, match="bad control message"):
        from_arrow(pa.array([json.dumps({"type": "load", "node": "x"})]))


def test_the_bookkeeping_turns_messages_into_commands_status_and_a_replayable_journal():
    journal = io.BytesIO()
    scheduling = Scheduling(SchedulerState(budget=1000 * MB, pipelines=[frozenset({"a", "b"})]),
                            ("a", "b"), started=100.0, journal=journal)
    assert scheduling.on_message(LoadAsk("a", [Variant("big", 600 * MB), Variant("small", 200 * MB)],
                                         100 * MB), 101) == [
        Command("a", "load", "big", "fits the budget")]
    (wait,) = scheduling.on_message(LoadAsk("b", [Variant("b", 400 * MB)], 100 * MB), 102)
    assert wait.action == "wait" and "waiting for memory" in wait.reason
    (switch,) = scheduling.on_message(NodeReport("a", "loaded", "ready", "big", 700 * MB,
                                                 model_bytes=600 * MB, peak_bytes=600 * MB,
                                                 load_seconds=1.5), 103)
    assert (switch.action, switch.model) == ("switch", "small")
    status = scheduling.status(104, available=5000 * MB, total=8000 * MB)
    assert isinstance(status, Status) and status.budget == 1000 * MB and status.uptime == 4
    assert [(n.node, n.state) for n in status.nodes] == [("a", "ready"), ("b", "waiting")]
    assert [d.action for d in status.decisions] == ["load", "wait", "switch"]
    # A node whose process ended holds nothing: its memory goes to whoever waits.
    (grant,) = scheduling.node_left("a", 105)
    assert grant == Command("b", "load", "b", "fits the budget")
    assert scheduling.status(106, 0, 0).nodes[0].state == "stopped"
    for recorded, replayed, _ in replay(journal.getvalue().splitlines()):
        assert recorded == replayed


# --- a model node's worker under the scheduler (the textstats adapter: real load path) ---

def test_a_scheduled_node_loads_switches_unloads_and_refuses_only_as_told(stats_catalog,
                                                                         tmp_path: Path):
    wire = Wire()
    slot = ModelSlot(stats_catalog.get("stats-big"), stats_catalog, "stats",
                     ModelStore(tmp_path / "cache"))
    link = SchedulerLink("stats", slot, wire.publish)
    worker = RequestWorker(slot, wire.send, link=link)
    wire.wait_for(lambda w: w.control)
    (asked,) = wire.control
    assert asked.ladder == [Variant("stats-big", 20 * MB), Variant("stats-small", 10 * MB)]
    worker.submit("request", ask("the cat of a dog"), {"request_id": "r1"})
    time.sleep(0.2)
    assert wire.out == [] and not slot.loaded  # no grant, no load
    worker.command(Command("stats", "load", "stats-big"))
    wire.wait_for(lambda w: "idle" in w.events())
    assert wire.stopwords("r1") == 3

    # A switch happens between requests, and none is lost.
    worker.command(Command("stats", "switch", "stats-small"))
    worker.submit("request", ask("the cat of a dog"), {"request_id": "r2"})
    wire.wait_for(lambda w: len(w.out) == 2)
    assert wire.stopwords("r2") == 1 and slot.model == "stats-small"

    # Evicted: the next request asks again; refused, it ends in an explicit error.
    worker.command(Command("stats", "unload"))
    wire.wait_for(lambda w: "unloaded" in w.events())
    worker.submit("request", ask("x"), {"request_id": "r3"})
    wire.wait_for(lambda w: w.events().count("ask") == 2)
    worker.command(Command("stats", "refuse", reason="no memory within 60 s"))
    wire.wait_for(lambda w: len(w.out) == 3)
    error = arrow.decode(wire.out[2].value, ErrorReport)
    assert (error.request_id, error.kind) == ("r3", "unavailable")
    assert "no memory within 60 s" in error.message
    worker.drain()
    assert wire.events() == ["ask", "loaded", "busy", "idle", "loaded", "busy", "idle",
                             "unloaded", "ask"]
    loaded = [m for m in wire.control if isinstance(m, NodeReport) and m.event == "loaded"]
    assert [m.model for m in loaded] == ["stats-big", "stats-small"]
    assert all(m.rss > 0 and m.load_seconds > 0 for m in loaded)


def test_a_node_standing_by_asks_for_memory_only_for_its_first_request(stats_catalog,
                                                                      tmp_path: Path):
    """LOAD=first_request (the cascade of voice.omni.yml): nothing is asked or loaded at start;
    the first request asks, and is served once granted. Without a scheduler it loads then."""
    wire = Wire()
    slot = ModelSlot(stats_catalog.get("stats-big"), stats_catalog, "stats",
                     ModelStore(tmp_path / "cache"))
    link = SchedulerLink("stats", slot, wire.publish)
    worker = RequestWorker(slot, wire.send, link=link, load_at_start=False)
    time.sleep(0.2)
    assert wire.control == [] and not slot.loaded and link.state == "evicted"
    worker.submit("request", ask("the cat of a dog"), {"request_id": "r1"})
    wire.wait_for(lambda w: w.events() == ["ask"])
    worker.command(Command("stats", "load", "stats-big"))
    wire.wait_for(lambda w: len(w.out) == 1)
    assert wire.stopwords("r1") == 3
    worker.drain()

    alone = Wire()
    slot = ModelSlot(stats_catalog.get("stats-big"), stats_catalog, "stats",
                     ModelStore(tmp_path / "cache"))
    worker = RequestWorker(slot, alone.send, load_at_start=False)
    time.sleep(0.2)
    assert not slot.loaded
    worker.submit("request", ask("the cat of a dog"), {"request_id": "r1"})
    alone.wait_for(lambda w: len(w.out) == 1)
    assert alone.stopwords("r1") == 3 and slot.loaded
    worker.drain()


def test_activity_is_reported_off_the_request_path_and_short_idle_spells_are_not(
        stats_catalog, tmp_path: Path):
    wire = Wire()
    slot = ModelSlot(stats_catalog.get("stats-big"), stats_catalog, "stats",
                     ModelStore(tmp_path / "cache"))
    link = SchedulerLink("stats", slot, wire.publish)
    link.start_measuring(60.0)  # the reporting thread; no memory report within the test
    link.activity(True)
    assert link.state == "busy"
    wire.wait_for(lambda w: w.events() == ["busy"], timeout=2)
    for _ in range(20):  # back-to-back requests: idle for microseconds each time
        link.activity(False)
        link.activity(True)
    link.activity(False)
    assert link.state == "ready"
    time.sleep(IDLE_REPORT_AFTER_S / 2)
    assert wire.events() == ["busy"]  # not idle long enough yet
    wire.wait_for(lambda w: w.events() == ["busy", "idle"], timeout=2)
    link.report("unloaded")  # after which the scheduler counts the node idle
    link.activity(True)
    wire.wait_for(lambda w: w.events() == ["busy", "idle", "unloaded", "busy"], timeout=2)
    link.stop()
    assert [m.state for m in wire.control if isinstance(m, NodeReport)] == \
        ["busy", "ready", "ready", "busy"]


def test_a_scheduled_node_whose_grant_never_comes_times_out(stats_catalog, tmp_path: Path):
    wire = Wire()
    slot = ModelSlot(stats_catalog.get("stats-big"), stats_catalog, "stats",
                     ModelStore(tmp_path / "cache"))
    worker = RequestWorker(slot, wire.send, timeout_s=0.3,
                           link=SchedulerLink("stats", slot, wire.publish))
    worker.submit("request", ask("x"), {"request_id": "late"})
    wire.wait_for(lambda w: w.out)
    error = arrow.decode(wire.out[0].value, ErrorReport)
    assert error.kind == "timeout" and "waited for memory" in error.message
    # The scheduler is gone: the node loads on its own and serves.
    slot_link = worker.link
    slot_link.detached = True
    worker.command(Command("stats", "load", "stats-big", "the scheduler stopped"))
    worker.submit("request", ask("the end"), {"request_id": "after"})
    wire.wait_for(lambda w: len(w.out) == 2)
    assert wire.stopwords("after") == 1
    worker.drain()
