"""The scheduler's pure policy: admission, eviction, stepping down, waiting (no dora, no models)."""

from mofa_omni.scheduler import (
    Evict,
    Grant,
    Loaded,
    LoadRequest,
    Refuse,
    SchedulerState,
    StepDown,
    Tick,
    Unloaded,
    Used,
    Wait,
    decide,
)

GB = 1 << 30
LLM = (("gemma-3-270m", 1 * GB), ("smollm2-135m", GB // 2), ("smollm2-135m-q4", GB // 8))
ASR = (("whisper-base", GB // 2), ("whisper-tiny.en", GB // 4))


def loaded(state, node, ladder, *, seconds=1.0, now=0.0, size=None):
    assert decide(state, LoadRequest(node, ladder, now)) == [Grant(node, ladder[0][0])]
    decide(state, Loaded(node, ladder[0][0], size or ladder[0][1], seconds, now))


def test_a_model_that_fits_is_granted_and_its_memory_reserved():
    state = SchedulerState(budget=2 * GB)
    assert decide(state, LoadRequest("llm", LLM, 0)) == [Grant("llm", "gemma-3-270m")]
    # Not loaded yet, but reserved: a second big request must not be granted the same memory.
    (wait,) = decide(state, LoadRequest("other", (("x", int(1.5 * GB)),), 0))
    assert wait == Wait("other", f"waiting for memory: x needs {int(1.5 * GB)} bytes, "
                                 f"{GB} free of {2 * GB}")


def test_idle_models_outside_the_pipeline_go_first_cheapest_reload_first():
    state = SchedulerState(budget=2 * GB, pipelines=[frozenset({"asr", "llm"})])
    loaded(state, "embedder", (("minilm", GB // 2),), seconds=0.1)
    loaded(state, "reranker", (("big", GB // 2),), seconds=9.0)
    loaded(state, "asr", ASR)
    decisions = decide(state, LoadRequest("llm", LLM, 5))
    assert decisions == [Evict("embedder"), Grant("llm", "gemma-3-270m")]
    assert "asr" in state.residents  # the pipeline partner is never evicted for it


def test_recency_breaks_ties_between_equal_reload_costs():
    state = SchedulerState(budget=int(1.5 * GB))
    loaded(state, "a", (("a", GB // 2),), now=1)
    loaded(state, "b", (("b", GB // 2),), now=2)
    decide(state, Used("a", 10))
    assert decide(state, LoadRequest("c", (("c", GB),), 11)) == [Evict("b"), Grant("c", "c")]


def test_the_requester_steps_down_when_its_partners_fill_memory():
    state = SchedulerState(budget=GB, pipelines=[frozenset({"asr", "llm"})])
    loaded(state, "asr", ASR[1:])  # whisper-tiny.en, already the smallest
    assert decide(state, LoadRequest("llm", LLM, 1)) == [Grant("llm", "smollm2-135m")]


def test_the_step_that_frees_most_is_taken_even_on_a_partner():
    state = SchedulerState(budget=int(1.25 * GB), pipelines=[frozenset({"asr", "llm"})])
    loaded(state, "asr", ASR)  # whisper-base, 0.5 GB: stepping it down frees 0.25 GB
    decisions = decide(state, LoadRequest("llm", LLM[1:], 1))  # smollm2 0.5 GB -> q4 frees 0.375
    assert decisions == [Grant("llm", "smollm2-135m")]  # 0.75 free: fits as asked
    state = SchedulerState(budget=int(0.9 * GB), pipelines=[frozenset({"asr", "llm"})])
    loaded(state, "asr", ASR)
    decisions = decide(state, LoadRequest("llm", LLM[1:], 1))
    assert decisions == [Grant("llm", "smollm2-135m-q4")]  # its own step frees the most
    state = SchedulerState(budget=GB // 2, pipelines=[frozenset({"asr", "llm"})])
    loaded(state, "asr", ASR)
    decisions = decide(state, LoadRequest("llm", LLM[1:], 1))  # both must step down
    assert decisions == [StepDown("asr", "whisper-tiny.en"), Grant("llm", "smollm2-135m-q4")]


def test_models_of_an_active_pipeline_are_kept():
    state = SchedulerState(budget=GB, pipelines=[frozenset({"tts"}), frozenset({"llm"})])
    loaded(state, "tts", (("piper", int(0.75 * GB)),))
    decide(state, Used("tts", 10))
    assert isinstance(decide(state, LoadRequest("llm", LLM[1:2], 11))[0], Wait)
    # Once the pipeline has been idle long enough, it is evicted for the waiting request.
    assert decide(state, Tick(10 + state.active_seconds + 1)) == [
        Evict("tts"), Grant("llm", "smollm2-135m")]


def test_waiting_ends_in_a_grant_when_memory_frees_or_an_error_at_the_deadline():
    state = SchedulerState(budget=GB, wait_seconds=30, pipelines=[frozenset({"a", "b"})])
    loaded(state, "a", (("a", GB),))
    (wait,) = decide(state, LoadRequest("b", (("b", GB // 2),), 0))
    assert isinstance(wait, Wait) and "waiting for memory" in wait.reason
    assert decide(state, Unloaded("a", 5)) == [Grant("b", "b")]

    state = SchedulerState(budget=GB, wait_seconds=30, pipelines=[frozenset({"a", "b"})])
    loaded(state, "a", (("a", GB),))
    decide(state, LoadRequest("b", (("b", GB // 2),), 0))
    assert decide(state, Tick(10)) == []
    (refused,) = decide(state, Tick(31))
    assert refused == Refuse("b", "no memory for b within 30 s") and state.pending == []


def test_measured_cost_replaces_the_estimate():
    state = SchedulerState(budget=2 * GB)
    loaded(state, "llm", LLM, size=int(1.2 * GB))
    assert state.used_bytes() == int(1.2 * GB)
