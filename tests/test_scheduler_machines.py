"""The scheduler's policy on a graph spread over machines: one budget each (pure, no dora)."""

from mofa_omni.scheduler.policy import (
    Activity,
    Cluster,
    Evict,
    Grant,
    Loaded,
    LoadRequest,
    MachineLost,
    Refuse,
    SchedulerState,
    Switch,
    Tick,
    Wait,
    decide_cluster,
)

GB = 1 << 30
MB = 1 << 20
LLM = (("gemma-3-270m", 1 * GB), ("smollm2-135m", GB // 2))
ASR = (("whisper-base", GB // 2), ("whisper-tiny.en", GB // 4))
TTS = (("piper-joe", GB // 4),)
EMBED = (("minilm-l6", GB // 4),)


def cluster(budget_a=GB, budget_b=2 * GB, **settings) -> Cluster:
    """asr and embed on the laptop (A); llm and tts on the GPU box (B); asr -> llm -> tts is one
    pipeline across both."""
    pipelines = [frozenset({"asr", "llm", "tts"}), frozenset({"embed"})]
    return Cluster(
        {"A": SchedulerState(budget=budget_a, pipelines=list(pipelines), **settings),
         "B": SchedulerState(budget=budget_b, pipelines=list(pipelines), **settings)},
        {"asr": "A", "embed": "A", "llm": "B", "tts": "B", "other": "B"})


def load(c: Cluster, node: str, ladder, now=0.0, size=None, seconds=1.0):
    model = ladder[0][0]
    assert decide_cluster(c, LoadRequest(node, ladder, now)) == [Grant(node, model)]
    size = size or dict(ladder)[model]
    decide_cluster(c, Loaded(node, model, size, size, seconds, now))


def test_each_machine_grants_from_its_own_budget():
    c = cluster(budget_a=GB, budget_b=2 * GB)
    load(c, "llm", LLM)  # 1 GB: fits B's 2 GB, would not fit beside asr in A's 1 GB
    load(c, "asr", ASR)
    load(c, "embed", EMBED)
    assert c.machines["A"].used_bytes() == GB // 2 + GB // 4
    assert c.machines["B"].used_bytes() == GB
    assert set(c.machines["A"].residents) == {"asr", "embed"}
    assert set(c.machines["B"].residents) == {"llm"}


def test_a_load_on_one_machine_never_evicts_a_model_on_another():
    c = cluster(budget_a=GB, budget_b=GB)
    load(c, "embed", EMBED)  # idle, outside the voice pipeline, cheap to reload: first to go
    load(c, "llm", LLM)  # B is full
    decisions = decide_cluster(c, LoadRequest("tts", TTS, 100.0))
    # B steps its own LLM down for the TTS; A's idle embedder is not touched.
    assert not [d for d in decisions if d.node in ("embed", "asr")], decisions
    assert Switch("llm", "smollm2-135m") in decisions and isinstance(decisions[-1], Wait)
    assert c.machines["A"].residents["embed"].phase == "ready"


def test_a_machine_whose_budget_cannot_hold_a_model_refuses_it_even_if_another_has_room():
    c = cluster(budget_a=GB // 8, budget_b=8 * GB)
    (refuse,) = decide_cluster(c, LoadRequest("asr", ASR, 0.0))
    assert isinstance(refuse, Refuse) and "128 MiB" in refuse.reason, refuse


def test_outside_pressure_on_one_machine_relieves_only_that_machine():
    c = cluster(budget_a=2 * GB, budget_b=2 * GB, min_available=GB)
    load(c, "embed", EMBED)
    load(c, "llm", LLM)
    load(c, "tts", TTS)
    # B's system runs short of memory; A has plenty.
    decisions = decide_cluster(c, Tick(100.0, available=GB // 2, machine="B"))
    assert decisions and {d.node for d in decisions} <= {"llm", "tts"}, decisions
    assert decide_cluster(c, Tick(100.0, available=8 * GB, machine="A")) == []
    assert c.machines["A"].residents["embed"].phase == "ready"


def test_idle_models_on_the_pressured_machine_go_first():
    c = cluster(budget_a=2 * GB, budget_b=4 * GB, min_available=GB)
    load(c, "embed", EMBED, seconds=0.5)  # the cheapest to reload anywhere
    load(c, "asr", ASR)
    load(c, "llm", LLM, seconds=0.1)  # cheaper still, but on B
    decisions = decide_cluster(c, Tick(100.0, available=GB - GB // 8, machine="A"))
    assert decisions == [Evict("embed")], decisions  # A's cheapest idle model; B untouched


def test_using_a_model_keeps_its_partners_on_the_other_machine_loaded():
    c = cluster(budget_a=2 * GB, budget_b=GB + GB // 4, min_available=0, active_seconds=30)
    load(c, "llm", LLM)
    decide_cluster(c, Activity("llm", False, 1.0))
    # Much later the pipeline is quiet on B; the ASR on A starts serving a turn.
    decide_cluster(c, Tick(50.0, machine="B"))
    assert not c.machines["B"].active
    decide_cluster(c, Activity("asr", True, 50.0))
    assert c.machines["B"].active  # the turn's reply will need the LLM: it stays protected
    decisions = decide_cluster(c, LoadRequest("other", (("x", GB // 2),), 50.0))
    assert not any(isinstance(d, Evict) for d in decisions), decisions


def test_a_lost_machine_is_forgotten_and_the_other_keeps_its_models():
    c = cluster()
    load(c, "asr", ASR)
    load(c, "llm", LLM)
    load(c, "tts", TTS)
    assert decide_cluster(c, MachineLost("B", 10.0)) == []
    assert c.lost == {"B"}
    assert c.machines["B"].used_bytes() == 0 and not c.machines["B"].residents
    assert set(c.machines["A"].residents) == {"asr"}
    # B comes back: its nodes ask again and are granted from B's budget.
    assert decide_cluster(c, LoadRequest("llm", LLM, 20.0)) == [Grant("llm", "gemma-3-270m")]
    assert c.lost == set()


# --- the scheduler node's bookkeeping over machines (no dora) ------------------------------

def test_the_bookkeeping_sizes_each_machine_from_its_own_nodes_and_loses_a_silent_one():
    import io

    from mofa_omni.scheduler.bookkeeping import Scheduling, replay
    from mofa_omni.scheduler.messages import LoadAsk, NodeReport, Variant
    from mofa_omni.scheduler.status import render_status

    journal = io.BytesIO()
    sized = []

    def size_machine(machine, total):
        sized.append((machine, total))
        return int(total * 0.5), 0

    c = cluster(budget_a=GB, budget_b=GB)  # B's budget is provisional until it reports
    book = Scheduling(c, ("asr", "llm", "tts"), started=0.0, journal=journal, home="A",
                      size_machine=size_machine, silent_after=5.0)
    ask = LoadAsk("llm", [Variant("gemma-3-270m", 3 * GB)], 200 * MB, available=12 * GB,
                  total=16 * GB)
    (grant,) = book.on_message(ask, 1.0)  # 3 GB fits B's own half of 16 GB, not A's 1 GB
    assert (grant.action, grant.model) == ("load", "gemma-3-270m") and sized == [("B", 16 * GB)]
    book.on_message(LoadAsk("asr", [Variant("whisper-base", GB // 2)], 200 * MB,
                            available=3 * GB, total=4 * GB), 1.0)
    assert sized == [("B", 16 * GB)]  # A is the scheduler's own machine: measured there
    book.on_message(NodeReport("llm", "loaded", "ready", "gemma-3-270m", 3 * GB + 200 * MB,
                               model_bytes=3 * GB, peak_bytes=3 * GB, load_seconds=2.0,
                               available=9 * GB, total=16 * GB), 2.0)
    status = book.status(3.0, available=2 * GB, total=4 * GB)
    a, b = status.machines
    assert (a.machine, a.budget, a.available, a.total) == ("A", GB, 2 * GB, 4 * GB)
    assert (b.machine, b.budget, b.available, b.total, b.lost) == ("B", 8 * GB, 9 * GB, 16 * GB,
                                                                    False)
    assert b.used == 3 * GB + 200 * MB + 200 * MB  # llm and its process, tts's default overhead
    assert {n.node: n.machine for n in status.nodes} == {"asr": "A", "llm": "B", "tts": "B"}
    text = render_status(status)
    assert text.index("machine A") < text.index("\n  asr ") < text.index("machine B") \
        < text.index("\n  llm "), text

    book.on_message(NodeReport("asr", "measure", "ready", "whisper-base", 700 * MB,
                               available=3 * GB, total=4 * GB), 9.0)
    book.on_tick(9.0, available=2 * GB)  # B's nodes silent for 7 s: B is lost
    status = book.status(9.0, available=2 * GB, total=4 * GB)
    assert status.machines[1].lost and "llm, tts" in status.machines[1].detail
    assert {n.node: n.state for n in status.nodes}["llm"] == "unavailable"
    assert {n.node: n.state for n in status.nodes}["asr"] != "unavailable"
    assert "machine B  LOST: no message from llm, tts for 7 s" in render_status(status)
    assert status.machines[1].used == 0  # what it held is forgotten

    # B's graph is restarted: its nodes ask again and are scheduled inside B's budget.
    (grant,) = book.on_message(ask, 20.0)
    assert grant.action == "load"
    assert not book.status(20.0, 2 * GB, 4 * GB).machines[1].lost
    for recorded, replayed, _ in replay(journal.getvalue().splitlines()):
        assert recorded == replayed


def test_the_machines_come_from_the_dataflow_and_budgets_may_be_set_per_machine(monkeypatch):
    from pathlib import Path

    import yaml

    from mofa_omni.scheduler.graph import scheduled_graph
    from mofa_omni_nodes.scheduler import for_machine, machine_memory

    split = Path(__file__).parents[1] / "dataflows" / "voice.split.yml"
    graph = scheduled_graph(yaml.safe_load(split.read_text()), "scheduler")
    assert graph.machine_of == {"asr": "A", "llm": "B", "tts": "B"} and graph.home == "A"
    assert graph.machines == ("A", "B")
    assert sorted(map(sorted, graph.pipelines)) == [["asr", "llm", "tts"]]  # across machines

    assert for_machine("2GiB", "B") == "2GiB"
    assert for_machine("A=4GiB, B=70%", "B") == "70%"
    assert for_machine("A=4GiB", "B") == ""
    monkeypatch.setenv("BUDGET", "A=1GiB,B=50%")
    monkeypatch.setenv("MIN_AVAILABLE", "B=1GiB")
    assert machine_memory("B", 16 * GB, here=False) == (8 * GB, GB)
    assert machine_memory("A", 16 * GB, here=False) == (GB, int(1.6 * GB))
    monkeypatch.delenv("BUDGET")
    assert machine_memory("C", 10 * GB, here=False)[0] == 7 * GB  # 70% of its own memory


def test_payloads_to_another_machine_are_held_to_the_network_limit(monkeypatch):
    from pathlib import Path

    import numpy as np
    import pyarrow as pa
    import pytest
    import yaml

    from mofa_omni.node.integrity import (
        NETWORK_PAYLOAD_BYTES,
        CheckedNode,
        PayloadTooLarge,
        remote_readers,
    )

    split = yaml.safe_load((Path(__file__).parents[1] / "dataflows" / "voice.split.yml")
                           .read_text())
    # spoken sentences go to A's sink, errors to the dialogue, reports to the scheduler
    assert remote_readers(split, "tts") == {"result": ["A"], "error": ["A"], "memory": ["A"]}
    assert remote_readers(split, "dialogue") == {"chat": ["B"], "cancel": ["B"]}
    assert remote_readers(split, "vad") == {}  # utterances stay on A
    assert remote_readers({"nodes": [{"id": "x", "outputs": ["y"]}]}, "x") == {}

    class Sent:
        def __init__(self):
            self.messages = []

        def send_output(self, output, value, metadata):
            self.messages.append((output, len(value)))

        def dataflow_descriptor(self):
            return split

    monkeypatch.delenv("DORA_MACHINE_ID", raising=False)
    monkeypatch.setenv("DORA_NODE_CONFIG", "shared_memory_pool_size: 134217728\n")
    node = CheckedNode(Sent(), "tts")
    a_minute = pa.array(np.zeros(22050 * 60, np.float32))  # 5 MiB: crosses
    node.send_output("result", a_minute)
    too_big = pa.array(np.zeros(NETWORK_PAYLOAD_BYTES // 4 + 1, np.float32))
    with pytest.raises(PayloadTooLarge, match=r"'result': a 16.0 MiB payload is too large to "
                                              r"send to machine A .*NETWORK_PAYLOAD_LIMIT"):
        node.send_output("result", too_big)
    node.send_output("trace", too_big)  # read on B only: shared memory, the pool's limit
    assert [size for _, size in node.node.messages] == [22050 * 60, len(too_big)]
    monkeypatch.setenv("NETWORK_PAYLOAD_LIMIT", "1MiB")
    with pytest.raises(PayloadTooLarge):
        CheckedNode(Sent(), "tts").send_output("result", a_minute)
