"""The scheduler's policy on a graph spread over machines: one budget each (pure, no dora)."""

from mofa_omni.scheduler import (
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
