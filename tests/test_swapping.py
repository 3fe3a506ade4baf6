"""Swapping a node's model while it serves (``omni swap``), without dora: the worker under the
scheduler's swap commands (real textstats adapter and store), and the scheduler's bookkeeping."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest

from mofa_omni.models.catalog import Catalog
from mofa_omni.models.store import ModelStore
from mofa_omni.node.admission import SchedulerLink
from mofa_omni.node.residency import ModelSlot
from mofa_omni.node.serving import RequestWorker
from mofa_omni.node.swapping import swap_warning
from mofa_omni.scheduler.bookkeeping import Scheduling
from mofa_omni.scheduler.messages import Command, LoadAsk, NodeReport, SwapAsk, SwapOutcome, Variant
from mofa_omni.scheduler.policy import SchedulerState
from mofa_omni.scheduler.status import render_swap
from tests.wire import Wire, ask

MB = 1 << 20
TEXT = "the cat of a dog"  # stats-big counts 3 stop-words in it, stats-small 1


@pytest.fixture()
def swap_catalog(stats_catalog: Catalog, tmp_path: Path) -> Catalog:
    """stats-big / stats-small, plus models whose load fails: invalid JSON, and a crash."""
    (tmp_path / "corrupt.json").write_text("[\"the\", ")
    (tmp_path / "crash.json").write_text("5")  # set(5): TypeError inside the adapter's load
    extra = tmp_path / "broken.toml"
    extra.write_text(
        '[models.stats-corrupt]\nadapter = "textstats"\ntasks = ["generic"]\nformat = "json"\n'
        'source = { path = "corrupt.json" }\n'
        '[models.stats-crash]\nadapter = "textstats"\ntasks = ["generic"]\nformat = "json"\n'
        'source = { path = "crash.json" }\n')
    stats_catalog.merge(extra)
    return stats_catalog


class Node:
    """A worker under a scheduler that granted stats-big, with a steady stream of requests."""

    def __init__(self, catalog: Catalog, cache: Path):
        self.wire = Wire()
        self.slot = ModelSlot(catalog.get("stats-big"), catalog, "stats", ModelStore(cache))
        self.worker = RequestWorker(self.slot, self.wire.send,
                                    link=SchedulerLink("stats", self.slot, self.wire.publish))
        self.worker.command(Command("stats", "load", "stats-big"))
        self.sent = 0
        self._stop = threading.Event()
        self._stream = threading.Thread(target=self._send_steadily, daemon=True)

    def _send_steadily(self) -> None:
        while not self._stop.wait(0.002):
            self.sent += 1
            self.worker.submit("request", ask(TEXT), {"request_id": f"r{self.sent}"})

    def __enter__(self):
        self._stream.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._stream.join()
        self.wire.wait_for(lambda w: len(w.out) == self.sent)
        self.worker.drain()

    def swap(self, model: str, beside: bool) -> SwapOutcome:
        before = len(self.swap_reports())
        time.sleep(0.05)  # requests flow before the swap
        self.worker.command(Command("stats", "swap", model, "test", beside=beside, swap_id=model))
        self.wire.wait_for(lambda w: len(self.swap_reports()) > before)
        time.sleep(0.05)  # and after it
        return self.swap_reports()[-1].swap

    def swap_reports(self) -> list[NodeReport]:
        with self.wire.lock:
            return [m for m in self.wire.control if isinstance(m, NodeReport) and m.swap]

    def answers(self) -> list[tuple[str, int]]:
        return [(o.meta.request_id, self.wire.stopwords(o.meta.request_id)) for o in self.wire.out]


@pytest.mark.parametrize("beside", [True, False], ids=["beside", "in-place"])
def test_a_swap_while_requests_stream_in_loses_none_and_keeps_their_order(swap_catalog, tmp_path,
                                                                          beside):
    with Node(swap_catalog, tmp_path / "cache") as node:
        outcome = node.swap("stats-small", beside)
        back = node.swap("stats-big", beside)
    answers = node.answers()
    assert [rid for rid, _ in answers] == [f"r{i}" for i in range(1, node.sent + 1)]
    counts = [count for _, count in answers]
    # Old model, then the new one from one request on, then the old one again: two switches.
    changes = [i for i in range(1, len(counts)) if counts[i] != counts[i - 1]]
    assert counts[0] == 3 and 1 in counts and counts[-1] == 3 and len(changes) == 2, counts
    assert outcome.ok and (outcome.old_model, outcome.new_model) == ("stats-big", "stats-small")
    assert outcome.mode == ("beside" if beside else "in_place") and back.ok
    assert outcome.total_seconds >= outcome.paused_seconds >= 0 and outcome.longest_wait >= 0
    reports = node.swap_reports()
    assert [r.event for r in reports] == ["swapped", "swapped"]
    assert reports[0].model == "stats-small" and reports[0].load_seconds > 0
    assert node.slot.wanted.name == "stats-big"


@pytest.mark.parametrize("model, beside, why", [
    ("stats-corrupt", True, "not valid JSON"),
    ("stats-crash", True, "TypeError"),
    ("stats-corrupt", False, "not valid JSON"),
    ("stats-crash", False, "TypeError"),
    ("stats-missing", True, "unknown model 'stats-missing'"),
    ("smollm2-135m", True, "smollm2-135m does not serve generic"),
])
def test_a_swap_that_fails_leaves_the_old_model_serving(swap_catalog, tmp_path, model, beside,
                                                        why):
    with Node(swap_catalog, tmp_path / "cache") as node:
        outcome = node.swap(model, beside)
    assert not outcome.ok and why in outcome.detail, outcome
    if not beside and model.startswith("stats-c"):  # unloaded first, so loaded again
        assert "stats-big serves again" in outcome.detail
    assert node.swap_reports()[-1].event == "swap_failed"
    assert {count for _, count in node.answers()} == {3}  # stats-big answered every request
    assert not [o for o in node.wire.out if o.output == "error"]


def test_a_swap_while_no_model_is_loaded_changes_what_the_next_request_loads(swap_catalog,
                                                                              tmp_path):
    wire = Wire()
    slot = ModelSlot(swap_catalog.get("stats-big"), swap_catalog, "stats",
                     ModelStore(tmp_path / "cache"))
    worker = RequestWorker(slot, wire.send, link=SchedulerLink("stats", slot, wire.publish))
    wire.wait_for(lambda w: w.control)  # it asked for stats-big; no grant yet
    worker.command(Command("stats", "swap", "stats-small", "holds nothing", swap_id="s1"))
    wire.wait_for(lambda w: len(w.control) >= 2)
    report = wire.control[1]
    assert report.event == "unloaded" and report.swap.ok and report.swap.mode == "not_loaded"
    wire.wait_for(lambda w: isinstance(w.control[-1], LoadAsk))  # it asks for the new model
    worker.submit("request", ask(TEXT), {"request_id": "r1"})
    assert wire.control[-1].ladder == [Variant("stats-small", 10 * MB)]
    worker.command(Command("stats", "load", "stats-small"))
    wire.wait_for(lambda w: w.out)
    assert wire.stopwords("r1") == 1
    worker.drain()


# --- the scheduler's side ------------------------------------------------------------------

def scheduling(catalog: Catalog, budget: int = 100 * MB) -> Scheduling:
    book = Scheduling(SchedulerState(budget=budget), ("stats",), 0.0, catalog=catalog)
    book.state.overhead["stats"] = 0
    book.on_message(LoadAsk("stats", [Variant("stats-big", 20 * MB)], 0), 0.0)
    book.on_message(NodeReport("stats", "loaded", "ready", "stats-big", 20 * MB,
                               model_bytes=20 * MB, peak_bytes=20 * MB, load_seconds=0.1), 0.5)
    return book


@pytest.mark.parametrize("ask_for, problem", [
    (SwapAsk("1", "nobody", "stats-small"), "no model node 'nobody' in this graph"),
    (SwapAsk("2", "stats", "stats-smal"), "did you mean stats-small"),
    (SwapAsk("3", "stats", "smollm2-135m"), "smollm2-135m does not serve generic"),
])
def test_a_swap_the_graph_cannot_do_is_answered_at_once(swap_catalog, ask_for, problem):
    book = scheduling(swap_catalog)  # the packaged catalog's models are in it too
    assert book.on_message(ask_for, 1.0) == []
    (outcome,) = book.take_outcomes()
    assert not outcome.ok and problem in outcome.detail and outcome.swap_id == ask_for.swap_id


def test_the_scheduler_commands_a_swap_and_passes_the_nodes_outcome_on(swap_catalog):
    book = scheduling(swap_catalog)
    (command,) = book.on_message(SwapAsk("abc", "stats", "stats-small"), 1.0)
    assert (command.action, command.model, command.beside, command.swap_id) == \
        ("swap", "stats-small", True, "abc")
    (again,) = [*book.on_message(SwapAsk("def", "stats", "stats-big"), 1.1),
                *book.take_outcomes()]
    assert not again.ok and "under way" in again.detail
    outcome = SwapOutcome("abc", "stats", True, "stats-big", "stats-small", "beside")
    book.on_message(NodeReport("stats", "swapped", "ready", "stats-small", 12 * MB,
                               model_bytes=10 * MB, peak_bytes=11 * MB, load_seconds=0.1,
                               swap=outcome), 2.0)
    assert book.take_outcomes() == [outcome]
    assert book.state.residents["stats"].ladder == (("stats-small", 10 * MB),)
    status = book.status(2.0, 0, 0)
    assert (status.nodes[0].model, status.nodes[0].wanted) == ("stats-small", "stats-small")
    assert [d.action for d in status.decisions][-1] == "swap"


def test_a_swap_beyond_the_budget_is_declined_with_the_figures(swap_catalog, tmp_path):
    book = scheduling(swap_catalog, budget=45 * MB)
    # Added to the user's catalog while the graph runs: the scheduler reads it again.
    (tmp_path / "fat.json").write_text("[]")
    swap_catalog.sources[-1].write_text(swap_catalog.sources[-1].read_text() + (
        '[models.stats-fat]\nadapter = "textstats"\ntasks = ["generic"]\nformat = "json"\n'
        'memory_mb = 50\nsource = { path = "fat.json" }\n'))
    assert book.on_message(SwapAsk("x", "stats", "stats-fat"), 1.0) == []
    (outcome,) = book.take_outcomes()
    assert not outcome.ok and outcome.detail == (
        "not enough memory: stats-fat needs 50 MiB; the budget of 45 MiB leaves 25 MiB, "
        "45 MiB with stats-big unloaded")


def test_swapping_embedding_models_warns_that_old_vectors_do_not_compare(catalog: Catalog):
    minilm = catalog.get("minilm-l6")
    other = dataclasses.replace(minilm, name="minilm-l6-short", options={"max_length": 64})
    assert "not comparable with those from minilm-l6" in swap_warning(minilm, other)
    assert swap_warning(catalog.get("smollm2-135m"), catalog.get("gemma-3-270m")) == ""
    assert swap_warning(minilm, minilm) == ""


def test_omni_swap_says_what_happened_and_what_still_serves():
    done = SwapOutcome("a", "llm", True, "smollm2-135m", "gemma-3-270m", "in_place",
                       load_seconds=1.5, total_seconds=2.0, paused_seconds=1.6, waited=3,
                       longest_wait=1.4, detail="fits only in place")
    assert render_swap(done).splitlines() == [
        "llm: smollm2-135m -> gemma-3-270m, loaded in place of the old model (both did not fit "
        "the budget)",
        "  switch took 2.00 s (loading 1.50 s); requests paused 1.600 s (3 queued at the switch, "
        "the longest extra wait 1.400 s)",
        "  scheduler: fits only in place"]
    failed = SwapOutcome("b", "llm", False, "smollm2-135m", "broken-llm", "beside",
                         detail="broken-llm: not a GGUF file")
    assert render_swap(failed) == ("llm: swap to broken-llm failed: broken-llm: not a GGUF file\n"
                                   "llm still serves smollm2-135m")


def test_omni_commands_on_one_machine_take_turns_on_the_graphs_control_node(monkeypatch,
                                                                            tmp_path):
    """dora keeps one event channel per dynamic node id: two `omni` commands connected at once
    would take each other's events, so the second waits for the first's turn to end."""
    from mofa_omni.scheduler import client

    monkeypatch.setattr(client.tempfile, "gettempdir", lambda: str(tmp_path))
    holding, release = threading.Event(), threading.Event()

    def first_command():
        with client.taking_turns("flow", timeout_s=5):
            holding.set()
            release.wait(10)

    first = threading.Thread(target=first_command)
    first.start()
    assert holding.wait(5)
    with pytest.raises(client.GraphUnreachable, match="another omni command held"):
        with client.taking_turns("flow", timeout_s=0.3):
            pass
    with client.taking_turns("other-flow", timeout_s=0.3):
        pass  # another graph's control node is not this one's
    waited = time.monotonic()
    threading.Timer(0.5, release.set).start()
    with client.taking_turns("flow", timeout_s=5):
        assert time.monotonic() - waited >= 0.4
    first.join()


def test_a_control_node_refused_for_a_moment_is_asked_again_while_one_graph_runs(monkeypatch):
    """The daemon may still hold the previous command's control node when the next connects:
    refused at first, connected when asked again; with no graph running, refused at once."""
    from mofa_omni.scheduler import client

    class Daemon:  # stands for dora's Node: refuses `refusals` times, then connects
        def __init__(self, refusals: int):
            self.refusals = refusals

        def __call__(self, node_id: str):
            if self.refusals:
                self.refusals -= 1
                raise RuntimeError(f"could not connect {node_id}\n\nCaused by:\n    details")
            return node_id

    monkeypatch.setattr(client, "running_dataflows", lambda: [{"uuid": "u1", "name": "flow"}])
    assert client._connect_retrying(Daemon(2), None) == client.CONTROL_NODE
    monkeypatch.setattr(client, "CONNECT_RETRY_S", 0.3)
    with pytest.raises(client.GraphUnreachable,
                       match=r"could not connect omni-control \(details\)$"):
        client._connect_retrying(Daemon(100), None)
    monkeypatch.setattr(client, "running_dataflows", lambda: [])
    started = time.monotonic()
    with pytest.raises(client.GraphUnreachable, match="no running dataflow declares"):
        client._connect_retrying(Daemon(1), None)
    assert time.monotonic() - started < 0.2

    def two_graphs(node_id: str):  # dora's own words when two graphs declare the node
        raise RuntimeError("Could not setup node from node id.\n\nCaused by:\n    failed to get "
                           f"node config from daemon: multiple dataflows contain dynamic node "
                           f"id {node_id}")
    with pytest.raises(client.GraphUnreachable, match=r"several dataflows are running and dora "
                       r"cannot tell.*\(failed to get node config .*multiple dataflows"):
        client._connect_retrying(two_graphs, None)
