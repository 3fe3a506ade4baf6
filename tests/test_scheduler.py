"""The scheduler's pure policy: admission, eviction, stepping down, waiting, pressure (no dora)."""

import io

import pytest

from mofa_omni.scheduler.bookkeeping import Scheduling, replay
from mofa_omni.scheduler.messages import LoadAsk, NodeReport, Variant
from mofa_omni.scheduler.policy import (
    Activity,
    Decline,
    Departed,
    Evict,
    Grant,
    Loaded,
    LoadFailed,
    LoadRequest,
    Measured,
    ParallelSet,
    Refuse,
    Replace,
    SchedulerState,
    SetParallel,
    SwapFailed,
    Swapped,
    SwapRequest,
    Switch,
    Tick,
    Unloaded,
    Wait,
    decide,
)
from mofa_omni.scheduler.status import render_status

GB = 1 << 30
MB = 1 << 20
LLM = (("gemma-3-270m", 1 * GB), ("smollm2-135m", GB // 2), ("smollm2-135m-q4", GB // 8))
ASR = (("whisper-base", GB // 2), ("whisper-tiny.en", GB // 4))


def loaded(state, node, ladder, *, seconds=1.0, now=0.0, size=None, model=None):
    model = model or ladder[0][0]
    decisions = decide(state, LoadRequest(node, ladder, now))
    assert decisions[-1] == Grant(node, model), decisions
    decide(state, Loaded(node, model, size or dict(ladder)[model], size or dict(ladder)[model],
                         seconds, now))


def kinds(decisions):
    return [type(d).__name__ for d in decisions]


def test_a_model_that_fits_is_granted_and_its_memory_reserved():
    state = SchedulerState(budget=2 * GB)
    assert decide(state, LoadRequest("llm", LLM, 0)) == [Grant("llm", "gemma-3-270m")]
    # Not loaded yet, but reserved: a second big request must not be granted the same memory.
    (wait,) = decide(state, LoadRequest("other", (("x", int(1.5 * GB)),), 0))
    assert wait == Wait("other", "waiting for memory: x needs 1536 MiB, 1024 MiB free of 2048 MiB")
    assert state.residents["llm"].phase == "loading"


def test_the_model_processes_own_memory_counts():
    state = SchedulerState(budget=GB)
    decide(state, LoadRequest("a", (("a", GB // 2),), 0, overhead=300 * MB))
    (wait,) = decide(state, LoadRequest("b", (("b", GB // 4),), 0, overhead=100 * MB))
    assert isinstance(wait, Wait)  # 300 + 512 + 100 + 256 MB > 1 GB
    assert state.used_bytes() == 300 * MB + GB // 2 + 100 * MB


def test_idle_models_outside_the_pipeline_go_first_cheapest_reload_first():
    state = SchedulerState(budget=2 * GB, pipelines=[frozenset({"asr", "llm"})])
    loaded(state, "embedder", (("minilm", GB // 2),), seconds=0.1)
    loaded(state, "reranker", (("big", GB // 2),), seconds=9.0)
    loaded(state, "asr", ASR)
    decisions = decide(state, LoadRequest("llm", LLM, 5))
    # The grant waits until the evicted model has really given its memory back.
    assert decisions == [Evict("embedder"), Wait("llm", decisions[1].reason)]
    assert "asr" in state.residents and state.residents["embedder"].phase == "leaving"
    # Another request meanwhile does not evict again for memory already on its way back.
    assert decide(state, Tick(6)) == []
    assert decide(state, Unloaded("embedder", 7)) == [Grant("llm", "gemma-3-270m")]


def test_recency_breaks_ties_between_equal_reload_costs():
    state = SchedulerState(budget=int(1.5 * GB))
    loaded(state, "a", (("a", GB // 2),), now=1)
    loaded(state, "b", (("b", GB // 2),), now=2)
    decide(state, Activity("a", False, 10))
    assert kinds(decide(state, LoadRequest("c", (("c", GB),), 11))) == ["Evict", "Wait"]
    assert state.residents["b"].phase == "leaving"


def test_a_busy_model_is_never_evicted():
    state = SchedulerState(budget=GB)
    loaded(state, "a", (("a", GB // 2),), seconds=0.1)
    loaded(state, "b", (("b", GB // 2),), seconds=5.0)
    decide(state, Activity("a", True, 3))  # cheaper to reload, but serving
    assert decide(state, LoadRequest("c", (("c", GB // 2),), 4))[0] == Evict("b")


@pytest.mark.parametrize("budget, asr, llm_ladder, expected", [
    # 0.75 GB free beside whisper-base: smollm2 fits as asked.
    (1.25, ASR, LLM[1:], [Grant("llm", "smollm2-135m")]),
    # 0.4 GB free: stepping smollm2 down to q4 frees 0.375, more than whisper's step (0.25).
    (0.9, ASR, LLM[1:], [Grant("llm", "smollm2-135m-q4")]),
    # whisper-tiny.en is already the smallest: the requester steps down two rungs.
    (1.0, ASR[1:], LLM, [Grant("llm", "smollm2-135m")]),
])
def test_the_requester_steps_down_when_its_partners_fill_memory(budget, asr, llm_ladder,
                                                                expected):
    state = SchedulerState(budget=int(budget * GB), pipelines=[frozenset({"asr", "llm"})])
    loaded(state, "asr", asr)
    decisions = decide(state, LoadRequest("llm", llm_ladder, 1))
    assert decisions == expected
    assert "stepped down" in decisions[0].reason or decisions[0].model == llm_ladder[0][0]


def test_a_partner_steps_down_and_the_grant_waits_for_it():
    state = SchedulerState(budget=GB // 2, pipelines=[frozenset({"asr", "llm"})])
    loaded(state, "asr", ASR)
    decisions = decide(state, LoadRequest("llm", LLM[1:], 1))  # both must step down
    assert decisions[0] == Switch("asr", "whisper-tiny.en") and isinstance(decisions[1], Wait)
    assert "steps down from whisper-base" in decisions[0].reason
    assert decide(state, Loaded("asr", "whisper-tiny.en", GB // 4, GB // 4, 0.5, 2)) == [
        Grant("llm", "smollm2-135m-q4")]
    assert state.used_bytes() <= state.budget


def test_models_of_an_active_pipeline_are_kept():
    state = SchedulerState(budget=GB, pipelines=[frozenset({"tts"}), frozenset({"llm"})])
    loaded(state, "tts", (("piper", int(0.75 * GB)),))
    decide(state, Activity("tts", False, 10))
    assert isinstance(decide(state, LoadRequest("llm", LLM[1:2], 11))[0], Wait)
    # Once the pipeline has been idle long enough, it is evicted for the waiting request.
    assert decide(state, Tick(10 + state.active_seconds + 1)) == [Evict("tts")]
    assert decide(state, Unloaded("tts", 42)) == [Grant("llm", "smollm2-135m")]


def test_waiting_ends_in_a_grant_when_memory_frees_or_an_error_at_the_deadline():
    state = SchedulerState(budget=GB, wait_seconds=30)
    loaded(state, "a", (("a", GB),))
    decide(state, Activity("a", True, 0))  # serving: not evictable
    (wait,) = decide(state, LoadRequest("b", (("b", GB // 2),), 0))
    assert isinstance(wait, Wait) and "waiting for memory" in wait.reason
    assert decide(state, Unloaded("a", 5)) == [Grant("b", "b")]

    state = SchedulerState(budget=GB, wait_seconds=30)
    loaded(state, "a", (("a", GB),))
    decide(state, Activity("a", True, 0))
    decide(state, LoadRequest("b", (("b", GB // 2),), 0))
    assert decide(state, Tick(10)) == []
    (refused,) = decide(state, Tick(31))
    assert refused == Refuse("b", "no memory within 30 s") and state.pending == []


def test_a_pipeline_that_cannot_fit_even_at_its_smallest_is_refused_at_once():
    state = SchedulerState(budget=GB, pipelines=[frozenset({"asr", "llm"})])
    loaded(state, "asr", ASR)  # whisper-tiny.en at least: 0.25 GB
    (refused,) = decide(state, LoadRequest("llm", (("big", GB),), 1, overhead=GB // 4))
    assert isinstance(refused, Refuse) and "llm with asr" in refused.reason
    # The LLM's process (0.25 GB) + the LLM (1 GB) + whisper-tiny.en (0.25 GB) > 1 GB.
    assert "need 1536 MiB, more than the budget of 1024 MiB" in refused.reason


def test_a_model_larger_than_the_whole_budget_is_refused_at_once():
    state = SchedulerState(budget=GB)
    (refused,) = decide(state, LoadRequest("llm", (("huge", 3 * GB), ("big", 2 * GB)), 0,
                                           overhead=100 * MB))
    assert isinstance(refused, Refuse) and "smallest variants" in refused.reason
    assert "budget" in refused.reason and state.pending == [] and state.residents == {}


def test_measured_cost_replaces_the_estimate_and_the_working_set_is_reserved():
    state = SchedulerState(budget=2 * GB)
    decide(state, LoadRequest("llm", LLM, 0, overhead=100 * MB))
    decide(state, Loaded("llm", "gemma-3-270m", int(1.2 * GB), int(1.4 * GB), 6.0, 1))
    assert state.used_bytes() == 100 * MB + int(1.2 * GB)
    decide(state, Measured("llm", 100 * MB + int(1.3 * GB), 2))  # KV cache grew while serving
    assert state.used_bytes() == 100 * MB + int(1.3 * GB)
    # After an unload, a reload reserves the measured peak, not the catalog's estimate.
    decide(state, Unloaded("llm", 3, overhead=150 * MB))
    decide(state, LoadRequest("llm", LLM, 4))
    assert state.residents["llm"].bytes == int(1.4 * GB)


def test_a_model_holds_its_estimate_until_it_has_served_then_what_serving_took():
    # Whisper measured 185 MiB once loaded, but serving grows it (activations): were the load's
    # growth reserved, a second model granted beside it would take the budget over once both
    # served. The estimate stays reserved until a measurement after a request replaces it.
    state = SchedulerState(budget=GB, pipelines=[frozenset({"asr"}), frozenset({"writer"})])
    decide(state, LoadRequest("asr", (("whisper", 460 * MB),), 0, overhead=100 * MB))
    decide(state, Loaded("asr", "whisper", 185 * MB, 200 * MB, 1.0, 1))
    assert state.residents["asr"].bytes == 460 * MB
    decide(state, Activity("asr", True, 1))  # serving its first request (and so kept)
    (wait,) = decide(state, LoadRequest("writer", (("llm", 450 * MB),), 1, overhead=100 * MB))
    assert isinstance(wait, Wait)
    assert decide(state, Measured("asr", 100 * MB + 190 * MB, 2)) == []  # not served yet
    assert state.residents["asr"].bytes == 460 * MB
    assert decide(state, Activity("asr", False, 4)) == []
    assert decide(state, Measured("asr", 100 * MB + 340 * MB, 5)) == [Grant("writer", "llm")]
    assert state.residents["asr"].bytes == 340 * MB and state.working_set == {"whisper": 340 * MB}
    # Loaded again later, it reserves and then holds what serving took, not the estimate.
    decide(state, Unloaded("asr", 6, overhead=100 * MB))
    assert decide(state, LoadRequest("asr", (("whisper", 460 * MB),), 7)) == [Grant("asr", "whisper")]
    assert state.residents["asr"].bytes == 340 * MB
    decide(state, Loaded("asr", "whisper", 185 * MB, 200 * MB, 1.0, 8))
    assert state.residents["asr"].bytes == 340 * MB


def test_a_failed_load_gives_its_reservation_back():
    state = SchedulerState(budget=GB)
    decide(state, LoadRequest("a", (("a", GB),), 0))
    assert isinstance(decide(state, LoadRequest("b", (("b", GB // 2),), 0))[0], Wait)
    assert decide(state, LoadFailed("a", 1)) == [Grant("b", "b")]


def pressured_state():
    state = SchedulerState(budget=4 * GB, min_available=2 * GB, calm_seconds=10,
                           step_up_margin=GB // 2, active_seconds=5,
                           pipelines=[frozenset({"asr", "llm"}), frozenset({"embedder"})])
    loaded(state, "asr", ASR, now=-10)
    loaded(state, "llm", LLM, now=-10)
    loaded(state, "embedder", (("minilm", GB // 8),), seconds=0.1, now=-10)
    decide(state, Activity("llm", False, 1))  # the voice pipeline is active, the other is not
    return state


def test_outside_pressure_evicts_idle_models_first_then_steps_down():
    state = pressured_state()
    assert decide(state, Tick(2, available=3 * GB)) == []
    assert decide(state, Tick(3, available=2 * GB - GB // 16)) == [Evict("embedder")]
    decide(state, Unloaded("embedder", 4))
    decisions = decide(state, Tick(5, available=2 * GB - GB // 4))
    assert decisions == [Switch("llm", "smollm2-135m")]  # the largest saving first
    assert "short of memory" in decisions[0].reason


def test_stepping_down_does_not_flap_when_it_relieves_the_pressure_it_answered():
    state = pressured_state()
    decide(state, Unloaded("embedder", 1.5))
    decisions = []
    for second in range(2, 120):
        # Another app leaves 0.75 GB over the threshold beside the LLM: with gemma loaded the
        # system is short by 0.25 GB, with smollm2 it has 0.25 GB to spare. Plus noise.
        noise = (GB // 16) * (1 if second % 3 else -1)
        available = state.min_available + int(0.75 * GB) - state.residents["llm"].bytes + noise
        for decision in decide(state, Tick(second, available=available)):
            decisions.append(decision)
            size = dict(LLM)[decision.model]
            decide(state, Loaded(decision.node, decision.model, size, size, 1.0, second + 0.5))
    assert decisions == [Switch("llm", "smollm2-135m")], decisions


def test_models_step_back_up_once_pressure_is_gone():
    state = pressured_state()
    decide(state, Unloaded("embedder", 1.5))
    decide(state, Tick(2, available=2 * GB - GB // 4))
    decide(state, Loaded("llm", "smollm2-135m", GB // 2, GB // 2, 1.0, 3))
    assert decide(state, Tick(5, available=8 * GB)) == []  # not calm yet
    (up,) = decide(state, Tick(13, available=8 * GB))
    assert up == Switch("llm", "gemma-3-270m") and "plentiful" in up.reason
    assert state.used_bytes() <= state.budget
    assert decide(state, Tick(14, available=8 * GB)) == []  # one switch at a time
    # The budget, not only the system, must have room for the bigger variant.
    state = pressured_state()
    decide(state, Unloaded("embedder", 1.5))
    decide(state, Tick(2, available=2 * GB - GB // 4))
    decide(state, Loaded("llm", "smollm2-135m", GB // 2, GB // 2, 1.0, 3))
    state.budget = state.used_bytes() + GB // 4
    assert decide(state, Tick(20, available=8 * GB)) == []
    state.budget += GB // 4
    assert decide(state, Tick(21, available=8 * GB)) == [Switch("llm", "gemma-3-270m")]


def test_only_the_evictions_still_needed_after_stepping_down_are_made():
    state = SchedulerState(budget=int(1.5 * GB), pipelines=[frozenset({"asr", "llm"})])
    loaded(state, "asr", ASR, seconds=0.2)  # 0.5 GB
    loaded(state, "embedder", (("minilm", GB // 8),), seconds=0.1)
    # A 2.5 GB model cannot fit even with both others evicted: it steps down to 1 GB.
    decisions = decide(state, LoadRequest("writer", (("huge", int(2.5 * GB)), ("small", GB)), 1))
    # 0.875 GB are free: evicting the embedder is enough for the 1 GB variant; whisper stays.
    assert decisions == [Evict("embedder"), Wait("writer", decisions[-1].reason)]
    assert decide(state, Unloaded("embedder", 2)) == [Grant("writer", "small")]


def test_models_that_outgrow_the_budget_while_serving_are_brought_back_inside_it():
    state = SchedulerState(budget=2 * GB, active_seconds=5,
                           pipelines=[frozenset({"asr", "llm"}), frozenset({"embedder"})])
    loaded(state, "embedder", (("minilm", GB // 4),), seconds=0.1, now=-10)
    loaded(state, "llm", LLM[1:], now=-10)  # smollm2, 0.5 GB
    loaded(state, "asr", ASR, now=-10)  # whisper-base, 0.5 GB
    decide(state, Activity("asr", False, 0))
    assert decide(state, Tick(1)) == []
    decide(state, Measured("llm", int(1.5 * GB), 1))  # its KV cache grew to 1.5 GB
    assert decide(state, Tick(2)) == [Evict("embedder")]  # the idle outsider goes first
    decide(state, Unloaded("embedder", 3))
    decide(state, Measured("asr", int(0.75 * GB), 3))  # and whisper's activations grew
    (step,) = decide(state, Tick(4))
    assert step == Switch("llm", "smollm2-135m-q4") and "outgrew the budget" in step.reason


def test_a_node_that_leaves_holds_nothing_and_nothing_steps_up_right_after():
    state = SchedulerState(budget=int(0.9 * GB), calm_seconds=10,
                           pipelines=[frozenset({"asr", "llm"})])
    loaded(state, "asr", ASR)
    decide(state, LoadRequest("llm", LLM[1:], 1))  # steps itself down to the 4-bit variant
    decide(state, Loaded("llm", "smollm2-135m-q4", GB // 8, GB // 8, 1.0, 2))
    assert decide(state, Tick(20)) == []  # no room to step up beside whisper-base
    decide(state, Departed("asr", 21))  # the graph is winding down
    assert state.used_bytes() == GB // 8
    assert decide(state, Tick(25)) == []  # room now, but not calm: no pointless reload
    assert decide(state, Tick(32)) == [Switch("llm", "smollm2-135m")]


def test_a_pipeline_being_loaded_counts_as_active():
    state = SchedulerState(budget=GB, pipelines=[frozenset({"asr", "llm"}), frozenset({"tts"})])
    decide(state, LoadRequest("asr", ASR[1:], 0))  # whisper-tiny.en, 0.25 GB
    decide(state, Loaded("asr", "whisper-tiny.en", GB // 4, GB // 4, 1.0, 0.5))
    # The voice pipeline is starting: its whisper is not evicted for an outsider at start-up.
    (wait,) = decide(state, LoadRequest("tts", (("piper", int(0.9 * GB)),), 1))
    assert isinstance(wait, Wait) and "asr" in state.residents


# --- swaps (omni swap) -----------------------------------------------------------------

SMALL = (("smollm2-135m-q4", GB // 8),)


def test_a_swap_that_fits_beside_reserves_both_models_until_the_old_one_is_gone():
    state = SchedulerState(budget=2 * GB)
    loaded(state, "llm", LLM[1:2])  # smollm2 at 512 MiB
    (replace,) = decide(state, SwapRequest("llm", LLM[:1], 1.0))
    assert replace == Replace("llm", "gemma-3-270m", beside=True)
    assert state.used_bytes() == GB // 2 + GB  # both held while the new one loads
    (wait,) = decide(state, LoadRequest("other", (("x", GB),), 1.0))
    assert isinstance(wait, Wait)  # the reservation holds against other loads
    decide(state, Swapped("llm", "gemma-3-270m", 900 * MB, 950 * MB, 2.0, 3.0))
    resident = state.residents["llm"]
    # It holds its estimate, not the 900 MiB measured once loaded, until it has served.
    assert (resident.model, resident.bytes, resident.phase) == ("gemma-3-270m", GB, "ready")
    assert resident.ladder == LLM[:1]  # the node's ladder is the new model's now
    assert state.learned_peak["gemma-3-270m"] == 950 * MB


def test_a_swap_that_fits_only_in_place_reserves_the_larger_of_the_two():
    state = SchedulerState(budget=GB + GB // 4)
    loaded(state, "llm", LLM[1:2])
    (replace,) = decide(state, SwapRequest("llm", LLM[:1], 1.0))
    assert replace == Replace("llm", "gemma-3-270m", beside=False)
    assert "fits only in place" in replace.reason
    assert state.used_bytes() == GB


def test_a_swap_beyond_the_budget_is_declined_and_the_old_model_keeps_its_reservation():
    state = SchedulerState(budget=GB)
    loaded(state, "asr", ASR[:1])  # 512 MiB
    loaded(state, "llm", LLM[1:2])  # 512 MiB
    (decline,) = decide(state, SwapRequest("llm", LLM[:1], 1.0))
    assert decline == Decline("llm", "gemma-3-270m", decline.reason)
    assert "not enough memory: gemma-3-270m needs 1024 MiB" in decline.reason
    assert state.residents["llm"].phase == "ready" and state.used_bytes() == GB
    assert not state.swaps


def test_a_failed_swap_restores_the_old_models_reservation():
    state = SchedulerState(budget=2 * GB)
    loaded(state, "llm", LLM[1:2])
    decide(state, SwapRequest("llm", LLM[:1], 1.0))
    decide(state, SwapFailed("llm", 2.0))
    resident = state.residents["llm"]
    assert (resident.model, resident.bytes, resident.phase) == ("smollm2-135m", GB // 2, "ready")


def test_a_node_mid_change_declines_a_swap_and_a_node_holding_nothing_takes_it_at_once():
    state = SchedulerState(budget=2 * GB)
    decide(state, LoadRequest("llm", LLM[1:2], 0))  # loading, not ready
    (decline,) = decide(state, SwapRequest("llm", SMALL, 0.5))
    assert isinstance(decline, Decline) and "loading" in decline.reason
    (replace,) = decide(state, SwapRequest("asr", ASR[1:], 0.5))  # asr holds no model
    assert replace == Replace("asr", "whisper-tiny.en", beside=False)
    assert "asr" not in state.residents


def test_a_model_being_swapped_is_neither_evicted_nor_stepped():
    state = SchedulerState(budget=2 * GB, min_available=GB)
    loaded(state, "llm", LLM[1:])
    decide(state, SwapRequest("llm", SMALL, 1.0))
    assert decide(state, Tick(2.0, available=GB // 2)) == []  # pressure: nothing to touch
    decide(state, LoadRequest("other", (("x", int(1.8 * GB)),), 2.0))
    assert state.residents["llm"].phase == "swapping"


def test_asking_again_after_a_lost_answer_is_harmless():
    state = SchedulerState(budget=GB, wait_seconds=10)
    loaded(state, "asr", ASR[:1])
    decide(state, Activity("asr", True, 0))
    assert kinds(decide(state, LoadRequest("llm", LLM[:1], 1.0))) == ["Wait"]
    assert kinds(decide(state, LoadRequest("llm", LLM[:1], 6.0))) == ["Wait"]  # asked again
    assert len(state.pending) == 1 and state.pending[0].deadline == 11.0  # the first deadline
    (refuse,) = decide(state, Tick(11.5))
    assert refuse == Refuse("llm", "no memory within 10 s")
    # A node whose grant was lost asks again: granted again, reserved once.
    decide(state, Activity("asr", False, 12.0))
    state.residents.pop("asr")
    assert decide(state, LoadRequest("tts", (("piper", GB // 4),), 12.0)) == [Grant("tts", "piper")]
    assert decide(state, LoadRequest("tts", (("piper", GB // 4),), 17.0)) == [Grant("tts", "piper")]
    assert state.used_bytes() == GB // 4


def test_a_crashed_node_frees_what_it_held_and_omni_status_counts_its_restarts():
    mb = 1 << 20
    scheduling = Scheduling(SchedulerState(budget=1000 * mb), ("llm",), started=0.0)
    scheduling.on_message(LoadAsk("llm", [Variant("smollm2", 400 * mb)], 100 * mb), 1)
    scheduling.on_message(NodeReport("llm", "loaded", "ready", "smollm2", 500 * mb,
                                     model_bytes=400 * mb, peak_bytes=400 * mb), 2)
    assert scheduling.status(3, 0, 0).used > 0
    scheduling.node_crashed("llm", 4, for_good=False)  # dora restarts its process
    status = scheduling.status(5, 0, 0)
    (llm,) = status.nodes
    assert (llm.state, llm.restarts, llm.rss) == ("restarting", 1, 0) and status.used == 0
    assert "restarted 1x after crashes" in render_status(status)
    scheduling.on_message(LoadAsk("llm", [Variant("smollm2", 400 * mb)], 100 * mb), 6)
    assert scheduling.status(7, 0, 0).nodes[0].state == "waiting"  # asking again
    scheduling.node_crashed("llm", 8, for_good=True)  # dora gave up on it
    scheduling.node_left("llm", 9)  # its input closes
    (llm,) = scheduling.status(10, 0, 0).nodes
    assert (llm.state, llm.restarts) == ("crashed", 1)


# --- requests decoded together (an LLM batching its sequences) -----------------------------

SEQUENCE = 100 * MB  # one more sequence's KV cache at its longest


def batching(state, node="llm", size=GB // 2, parallel=4, now=0.0):
    """``node`` asks for its model decoding ``parallel`` requests together, and loads it."""
    (grant,) = decide(state, LoadRequest(node, (("llm-model", size),), now,
                                         parallel=parallel, sequence_bytes=SEQUENCE))
    decide(state, Loaded(node, "llm-model", size, size, 1.0, now))
    return grant


def test_a_grant_reserves_as_many_requests_together_as_the_budget_holds():
    state = SchedulerState(budget=GB // 2 + int(2.5 * SEQUENCE))
    grant = batching(state)
    assert (grant.model, grant.parallel) == ("llm-model", 3)
    assert "3 of 4 requests together (100 MiB each beyond the first)" in grant.reason
    assert state.used_bytes() == GB // 2 + 2 * SEQUENCE
    # Room for all four: all four, and the grant says nothing more (as asked).
    assert batching(SchedulerState(budget=GB), "roomy").parallel == 4
    # Never fewer than one: the model alone fits, so it is granted, one request at a time.
    assert batching(SchedulerState(budget=GB // 2)).parallel == 1
    # A model whose requests take nothing beyond it (llama.cpp's pool is fixed) is granted all.
    lone = SchedulerState(budget=GB // 2)
    assert decide(lone, LoadRequest("llm", (("llm-model", GB // 2),), 0, parallel=4)) == [
        Grant("llm", "llm-model")]


def test_under_pressure_fewer_requests_together_before_any_model_is_evicted():
    state = SchedulerState(budget=GB + 4 * SEQUENCE)
    batching(state)  # 512 MiB + 3 sequences: 812 MiB
    loaded(state, "idle", (("small", GB // 4),))  # idle, evictable: 256 MiB
    # 356 MiB free, 500 MiB asked: two sequences given back cover it, nothing is evicted.
    decisions = decide(state, LoadRequest("asr", (("whisper", 500 * MB),), 1))
    assert kinds(decisions) == ["SetParallel", "Wait"]
    assert decisions[0] == SetParallel("llm", 2)
    assert "2 of 4 requests together: makes room for asr (whisper)" in decisions[0].reason
    # Reserved until the node says its requests above two have ended; then asr is granted.
    assert state.residents["llm"].held == GB // 2 + 3 * SEQUENCE
    assert decide(state, Tick(2)) == []
    # Not confirmed within confirm_seconds (the command may have been dropped): said again.
    assert decide(state, Tick(11)) == [SetParallel("llm", 2)]
    assert decide(state, ParallelSet("llm", 2, 12)) == [Grant("asr", "whisper")]
    assert state.residents["llm"].held == GB // 2 + SEQUENCE
    # Not enough even at one request each: one request together, then the idle model goes.
    decisions = decide(state, LoadRequest("tts", (("piper", 300 * MB),), 4))
    assert kinds(decisions) == ["SetParallel", "Evict", "Wait"]
    assert decisions[0] == SetParallel("llm", 1) and decisions[1] == Evict("idle")


def test_outside_pressure_lowers_requests_together_first_and_calm_widens_them_again():
    state = SchedulerState(budget=4 * GB, min_available=GB, calm_seconds=10)
    batching(state)
    loaded(state, "idle", (("small", GB // 4),))
    (narrow,) = decide(state, Tick(1, available=GB - 150 * MB))
    assert narrow == SetParallel("llm", 2)  # 150 MiB short: two sequences, nothing evicted
    decide(state, ParallelSet("llm", 2, 2))
    assert decide(state, Tick(5, available=2 * GB)) == []  # not calm yet
    (widen,) = decide(state, Tick(12, available=2 * GB))
    assert widen == SetParallel("llm", 4) and "memory is plentiful again" in widen.reason
    assert state.residents["llm"].held == GB // 2 + 3 * SEQUENCE


def test_the_bookkeeping_carries_requests_together_to_the_node_and_status():
    journal = io.BytesIO()
    scheduling = Scheduling(SchedulerState(budget=GB // 2 + 150 * MB), ("llm",), started=0.0,
                            journal=journal)
    (load,) = scheduling.on_message(LoadAsk("llm", [Variant("llm-model", GB // 2)], 0,
                                            parallel=4, sequence_bytes=SEQUENCE), 1)
    assert (load.action, load.parallel) == ("load", 2)
    scheduling.on_message(NodeReport("llm", "loaded", "ready", "llm-model", GB // 2,
                                     model_bytes=GB // 2, peak_bytes=GB // 2, parallel=2), 2)
    assert "2 of 4 requests together" in render_status(scheduling.status(3, GB, 2 * GB))
    narrow, wait = scheduling.on_message(LoadAsk("asr", [Variant("whisper", 100 * MB)], 0), 4)
    assert (narrow.node, narrow.action, narrow.parallel) == ("llm", "parallel", 1)
    assert (wait.node, wait.action) == ("asr", "wait")
    # The node's "parallel" report was dropped: its next measurement, at one, confirms it.
    (grant,) = scheduling.on_message(NodeReport("llm", "measure", "busy", "llm-model",
                                                GB // 2, parallel=1), 5)
    assert (grant.node, grant.action) == ("asr", "load")
    for recorded, replayed, _ in replay(journal.getvalue().splitlines()):
        assert recorded == replayed
