"""The voice agent's conversation state machine (pure, no models)."""

from mofa_omni.scheduler.messages import MachineStatus, NodeStatus, Status
from mofa_omni.voice.dialogue import (
    UNHEARD,
    Ask,
    Cancel,
    Dialogue,
    Hear,
    Release,
    TranscriptLine,
    TurnDone,
    out_of_reach,
)
from mofa_omni.voice.events import is_held


def roles(request) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in request.messages]


def test_a_turn_asks_with_the_system_prompt_and_ends_when_spoken():
    dialogue = Dialogue(system_prompt="Be brief.")
    user_line, ask = dialogue.heard("turn-1", " What is the capital of France? ", 7)
    assert user_line == TranscriptLine("user", "What is the capital of France?", "turn-1")
    assert isinstance(ask, Ask) and ask.reply_id == "reply-1" and ask.origin_ns == 7
    assert roles(ask.request) == [("system", "Be brief."),
                                  ("user", "What is the capital of France?")]
    assert dialogue.reply_text("reply-1", "Paris", False) == []
    assert dialogue.reply_text("reply-1", ".", True) == []  # generated, not yet spoken
    assert dialogue.spoken("reply-1") == [TranscriptLine("assistant", "Paris.", "turn-1"),
                                          TurnDone("turn-1")]
    assert dialogue.active is None


def test_an_empty_system_prompt_sends_no_system_message():
    *_, ask = Dialogue(system_prompt="").heard("turn-1", "Hi", 0)
    assert roles(ask.request) == [("user", "Hi")]  # the model's chat template has its own


def test_the_next_turn_carries_the_conversation():
    dialogue = Dialogue(system_prompt="S")
    dialogue.heard("turn-1", "My name is Ada.", 0)
    dialogue.reply_text("reply-1", "Nice to meet you, Ada.", True)
    dialogue.spoken("reply-1")
    *_, ask = dialogue.heard("turn-2", "What is my name?", 0)
    assert roles(ask.request) == [("system", "S"), ("user", "My name is Ada."),
                                  ("assistant", "Nice to meet you, Ada."),
                                  ("user", "What is my name?")]


def test_barge_in_cancels_the_reply_and_marks_it_interrupted():
    dialogue = Dialogue(system_prompt="S")
    dialogue.heard("turn-1", "Tell me a long story.", 0)
    dialogue.reply_text("reply-1", "Once upon a time", False)
    cancel, line = dialogue.speech_started()
    assert cancel == Cancel("reply-1")
    assert line == TranscriptLine("assistant", "Once upon a time", "turn-1", interrupted=True)
    assert line.render() == "assistant: Once upon a time [interrupted]"
    assert dialogue.reply_text("reply-1", " there was", True) == []  # late chunks are ignored
    *_, ask = dialogue.heard("turn-2", "Stop. What time is it?", 0)
    assert ask.reply_id == "reply-2"
    assert roles(ask.request)[-2:] == [("assistant", "Once upon a time"),
                                       ("user", "Stop. What time is it?")]


def test_an_utterance_during_a_reply_interrupts_it_even_without_a_vad_event():
    dialogue = Dialogue()
    dialogue.heard("turn-1", "Hello.", 0)
    actions = dialogue.heard("turn-2", "Actually, never mind.", 0)
    assert actions[0] == Cancel("reply-1")
    assert isinstance(actions[-1], Ask) and actions[-1].reply_id == "reply-2"
    assert [m.role for m in actions[-1].request.messages] == ["system", "user"]  # unanswered dropped


def test_silence_and_noise_get_no_reply():
    dialogue = Dialogue()
    for text in ["", "   ", "[BLANK_AUDIO]", "(wind blowing)", "..."]:
        assert dialogue.heard("turn-9", text, 0) == [TurnDone("turn-9")]
    assert dialogue.history == [] and dialogue.active is None


def test_a_failed_reply_ends_the_turn_and_keeps_history_consistent():
    dialogue = Dialogue()
    dialogue.heard("turn-1", "Hi.", 0)
    line, done = dialogue.reply_failed("reply-1", "internal: boom")
    assert line.render() == "assistant:  [error: internal: boom]" and done == TurnDone("turn-1")
    assert dialogue.history == []


def test_history_is_bounded():
    dialogue = Dialogue(system_prompt="S", max_history=4)
    for i in range(6):
        dialogue.heard(f"turn-{i}", f"question {i}", 0)
        dialogue.reply_text(f"reply-{i + 1}", f"answer {i}", True)
        dialogue.spoken(f"reply-{i + 1}")
    *_, ask = dialogue.heard("turn-x", "last", 0)
    assert len(ask.request.messages) == 5 and ask.request.messages[-1].content == "last"


def test_a_speech_failure_ends_the_turn_and_stops_generation():
    dialogue = Dialogue()
    dialogue.heard("turn-1", "Hi.", 0)
    dialogue.reply_text("reply-1", "Hello", False)
    cancel, line, done = dialogue.speech_failed("reply-1", "internal: voice crashed")
    assert cancel == Cancel("reply-1") and done == TurnDone("turn-1")
    assert line.error == "internal: voice crashed"
    assert [m.role for m in dialogue.history] == ["user", "assistant"]


def test_transcript_lines_stay_on_one_line():
    line = TranscriptLine("assistant", "Once upon a time,\nthere was\n\na dragon.", "t", True)
    assert line.render() == "assistant: Once upon a time, there was a dragon. [interrupted]"


def test_a_reply_that_never_completes_times_out():
    dialogue = Dialogue()
    dialogue.heard("turn-1", "Hello?", 0, now=100.0)
    assert dialogue.expire(now=150.0, timeout_s=60) == []
    cancel, line, done = dialogue.expire(now=161.0, timeout_s=60)
    assert cancel == Cancel("reply-1") and done == TurnDone("turn-1")
    assert "timeout" in line.error and dialogue.active is None


def test_a_crash_on_the_replys_path_ends_the_turn_at_once_with_the_reason():
    dialogue = Dialogue()
    assert dialogue.node_crashed("llm") == []  # no reply in flight: nothing to end
    dialogue.heard("turn-1", "Hello?", 0, now=100.0)
    dialogue.reply_text("reply-1", "Hel", final=False)
    cancel, line, done = dialogue.node_crashed("llm")
    assert cancel == Cancel("reply-1") and done == TurnDone("turn-1")
    assert line.error == "llm crashed" and line.text == "Hel" and dialogue.active is None
    assert [m.role for m in dialogue.history] == []  # the unanswered question dropped
    ask = dialogue.heard("turn-2", "Are you there?", 0, now=110.0)[-1]
    assert [m.role for m in ask.request.messages] == ["system", "user"]


def test_a_node_on_a_lost_machine_ends_the_reply_and_the_turns_it_was_hearing_at_once():
    def status(lost: bool) -> Status:
        nodes = [NodeStatus(name, "m", "m", "unavailable" if lost and machine == "B" else "ready",
                            0, 0, 0, [], machine=machine)
                 for name, machine in (("asr", "A"), ("llm", "B"), ("tts", "B"), ("vlm", "B"))]
        machines = [MachineStatus(machine, 0, 0, 0, 0, 0, 0, lost=lost and machine == "B")
                    for machine in ("A", "B")]
        return Status(0, 0, 0, 0, 0, 0, 0, 0.0, nodes, [], [], [], machines=machines)

    path = {"asr", "llm", "tts"}  # the vlm on B is none of the dialogue's business
    assert out_of_reach(status(lost=False), path) == {}
    gone = out_of_reach(status(lost=True), path)
    assert gone == {"llm": "llm unavailable: machine B is lost",
                    "tts": "tts unavailable: machine B is lost"}
    dialogue = Dialogue(hearing_node="asr")
    dialogue.heard("turn-1", "Hello?", 0, now=100.0)
    cancel, line, done = dialogue.node_crashed("llm", now=101.0, why=gone["llm"])
    assert cancel == Cancel("reply-1") and done == TurnDone("turn-1")
    assert line.render() == "assistant:  [error: llm unavailable: machine B is lost]"
    assert dialogue.node_crashed("tts", why=gone["tts"]) == []  # that reply is over already
    dialogue.sent_to_be_heard("turn-2", now=102.0)
    line, done = dialogue.node_crashed("asr", why="asr unavailable: machine A is lost")
    assert line.error == "asr unavailable: machine A is lost: not heard"


def test_a_crashed_asr_ends_the_turns_it_was_hearing_and_the_next_is_answered():
    dialogue = Dialogue(hearing_node="asr")
    assert dialogue.node_crashed("asr") == []  # nothing being transcribed: nothing to end
    dialogue.sent_to_be_heard("turn-1", now=100.0)
    line, done = dialogue.node_crashed("asr")
    assert line == TranscriptLine("user", "", "turn-1", error="asr crashed: not heard")
    assert done == TurnDone("turn-1") and dialogue.transcribing == {}
    assert line.render() == "user:  [error: asr crashed: not heard]"
    dialogue.sent_to_be_heard("turn-2", now=110.0)  # the restarted ASR hears the next one
    *_, ask = dialogue.heard("turn-2", "Are you there?", 0, now=111.0)
    assert dialogue.transcribing == {} and ask.request.messages[-1].content == "Are you there?"
    assert dialogue.node_crashed("asr") == []  # the reply's path is another matter


def test_an_utterance_sent_before_the_asr_crashed_but_noticed_after_ends_its_turn():
    """dora may deliver the crash notice before the `hearing` notice of the utterance the ASR
    was transcribing (two inputs, no order between them): that turn still ends at once."""
    dialogue = Dialogue(hearing_node="asr")
    assert dialogue.node_crashed("asr", now_ns=5_000) == []  # nothing heard yet to end
    line, done = dialogue.sent_to_be_heard("turn-1", now=100.0, sent_ns=4_000)
    assert line.error == "asr crashed: not heard" and done == TurnDone("turn-1")
    assert dialogue.transcribing == {}
    # One sent after the crash goes to the restarted ASR: it waits for its words.
    assert dialogue.sent_to_be_heard("turn-2", now=101.0, sent_ns=6_000) == []
    assert dialogue.transcribing == {"turn-2": 101.0}


def test_words_that_overtake_their_hearing_notice_do_not_wait_again():
    """A transcript made while the user spoke is sent the moment the utterance reaches the ASR,
    and can reach the dialogue before the VAD's notice of that utterance (seen in CI: the turn
    then waited for words it had, and ended in a timeout). The late notice changes nothing."""
    dialogue = Dialogue(hearing_node="asr")
    asked = dialogue.heard("turn-1", "What is the capital of France?", 0, now=100.0)
    assert any(isinstance(a, Ask) for a in asked)
    assert dialogue.sent_to_be_heard("turn-1", now=100.1) == []
    assert dialogue.transcribing == {}
    expired = dialogue.expire(now=150.0, timeout_s=12)  # only the reply can time out now
    assert not [a for a in expired if isinstance(a, TranscriptLine) and a.role == "user"]
    dialogue = Dialogue(hearing_node="asr")
    dialogue.not_heard("turn-1", "bad_request: audio is empty")
    assert dialogue.sent_to_be_heard("turn-1", now=1.0) == [] and dialogue.transcribing == {}


def test_words_that_never_come_back_end_their_turn_at_the_deadline():
    dialogue = Dialogue(hearing_node="asr")
    dialogue.sent_to_be_heard("turn-1", now=100.0)
    assert dialogue.expire(now=150.0, timeout_s=60) == []
    line, done = dialogue.expire(now=161.0, timeout_s=60)
    assert line.error == "timeout: not heard in 60 s" and done == TurnDone("turn-1")
    dialogue.sent_to_be_heard("turn-2", now=170.0)
    assert dialogue.not_heard("turn-2", "bad_request: audio is empty")[-1] == TurnDone("turn-2")
    assert dialogue.expire(now=1000.0, timeout_s=60) == []


def test_an_omni_model_hears_each_utterance_in_the_turn_it_was_said_in():
    import numpy as np

    from mofa_omni.contract.tasks import validate_request

    dialogue = Dialogue(system_prompt="S", voice="ethan", max_tokens=12)
    first = np.full(8000, 0.1, np.float32)  # 1 s at 8 kHz: kept at 16 kHz
    user_line, ask = dialogue.heard_sound("utt-1", first, 8000, 5)
    assert user_line == TranscriptLine("user", "[spoken, 1.0 s]", "utt-1")
    request = ask.request
    assert roles(request) == [("system", "S"), ("user", "")]
    assert request.audio_turns == [1] and [c.size for c in request.audio] == [16000]
    assert (request.speak, request.voice, request.max_tokens, request.sample_rate) == \
        (True, "ethan", 12, 16000)
    assert dialogue.reply_text("reply-1", "Hello!", True) == []
    assert dialogue.spoken("reply-1")[-1] == TurnDone("utt-1")
    *_, ask = dialogue.heard_sound("utt-2", np.full(16000, 0.2, np.float32), 16000, 6)
    assert roles(ask.request) == [("system", "S"), ("user", ""), ("assistant", "Hello!"),
                                  ("user", "")]
    assert ask.request.audio_turns == [1, 3]
    validate_request(ask.request)
    # barge-in: the unanswered spoken question leaves the history, as a written one does
    cancel, line = dialogue.speech_started()
    assert cancel == Cancel("reply-2") and line.interrupted
    assert [m.role for m in dialogue.history] == ["user", "assistant"]


def test_a_turn_the_omni_model_cannot_serve_goes_to_the_cascade_and_the_next_ones_too():
    """voice.omni.yml's cascade: the omni model refused (no variant fits the budget) before it
    said a word -> that turn's sound goes to the ASR, its words to the LLM; later turns go there
    too until omni_retry_s has passed, then the omni model is asked again."""
    import numpy as np

    from mofa_omni.contract.tasks import ChatRequest, OmniRequest

    dialogue = Dialogue(system_prompt="S", cascade=True, omni_node="omni", omni_retry_s=30)
    sound = np.full(16000, 0.1, np.float32)
    dialogue.heard_sound("utt-1", sound, 16000, 5, now=100.0)
    failed = dialogue.reply_failed("reply-1", "unavailable: the scheduler refused qwen3-omni",
                                   now=101.0, unavailable=True)
    line, hear = failed
    assert line.role == "assistant" and "the cascade answers" in line.error
    assert isinstance(hear, Hear) and hear.turn_id == "utt-1" and hear.origin_ns == 5
    assert hear.audio.size == 16000 and dialogue.history == [] and dialogue.transcribing
    user_line, ask = dialogue.heard("utt-1", "What is the capital of France?", 5, now=102.0)
    assert isinstance(ask.request, ChatRequest)
    assert roles(ask.request) == [("system", "S"), ("user", "What is the capital of France?")]
    dialogue.reply_text("reply-2", "Paris.", True)
    assert dialogue.spoken("reply-2")[-1] == TurnDone("utt-1")
    # within omni_retry_s: straight to the ASR
    (hear,) = dialogue.heard_sound("utt-2", sound, 16000, 6, now=120.0)
    assert isinstance(hear, Hear) and hear.turn_id == "utt-2" and "utt-2" in dialogue.transcribing
    *_, ask = dialogue.heard("utt-2", "And of Italy?", 6, now=121.0)
    dialogue.reply_text(ask.reply_id, "Rome.", True)
    dialogue.spoken(ask.reply_id)
    # then the omni model again, hearing the conversation with the cascade's words in it
    *_, ask = dialogue.heard_sound("utt-3", sound, 16000, 7, now=140.0)
    assert isinstance(ask.request, OmniRequest) and ask.request.audio_turns == [5]
    assert [m.content for m in ask.request.messages[1:5]] == \
        ["What is the capital of France?", "Paris.", "And of Italy?", "Rome."]


def test_the_cascade_reads_turns_only_the_omni_model_heard_as_unheard_and_errors_stay_errors():
    import numpy as np

    dialogue = Dialogue(system_prompt="", cascade=True, omni_node="omni")
    sound = np.full(16000, 0.1, np.float32)
    *_, ask = dialogue.heard_sound("utt-1", sound, 16000, 5, now=1.0)
    dialogue.reply_text(ask.reply_id, "Hello!", True)
    dialogue.spoken(ask.reply_id)
    dialogue.heard_sound("utt-2", sound, 16000, 6, now=2.0)
    # the omni node crashed before it spoke: the cascade takes the turn
    cancel, line, hear = dialogue.node_crashed("omni", now=3.0)
    assert cancel == Cancel("reply-2") and "omni crashed" in line.error and hear.turn_id == "utt-2"
    *_, ask = dialogue.heard("utt-2", "Who are you?", 6, now=4.0)
    assert roles(ask.request) == [("user", UNHEARD), ("assistant", "Hello!"),
                                  ("user", "Who are you?")]
    # an error that is not "cannot serve", or one after words were said, ends the turn
    other = Dialogue(cascade=True, omni_node="omni")
    other.heard_sound("utt-1", sound, 16000, 5, now=1.0)
    assert not any(isinstance(a, Hear) for a in other.reply_failed("reply-1", "internal: x",
                                                                   now=2.0))
    other.heard_sound("utt-2", sound, 16000, 5, now=3.0)
    other.reply_text("reply-2", "Hel", False)
    assert not any(isinstance(a, Hear) for a in other.reply_failed(
        "reply-2", "unavailable: gone", now=4.0, unavailable=True))
    # without a cascade the omni turn fails as before
    alone = Dialogue()
    alone.heard_sound("utt-1", sound, 16000, 5, now=1.0)
    assert alone.reply_failed("reply-1", "unavailable: x", now=2.0, unavailable=True)[-1] == \
        TurnDone("utt-1")


# --- speculation: the words of a pause asked before the turn is sure -----------------------

def held_ask(actions) -> Ask:
    asks = [a for a in actions if isinstance(a, Ask)]
    assert len(asks) == 1 and is_held(asks[0].reply_id)
    return asks[0]


def test_a_reply_asked_on_a_pause_is_released_when_the_utterance_ends_with_its_words():
    dialogue = Dialogue(speculate=True)
    ask = held_ask(dialogue.heard_pause("utt-1", "What is the capital of France?", 7))
    assert ask.request.messages[-1].content == "What is the capital of France?"
    assert ask.origin_ns == 7 and not dialogue.history  # not the turn's yet
    assert dialogue.reply_text(ask.reply_id, "Paris.", True) == []  # kept while held
    actions = dialogue.heard("utt-1", " What is the capital of France? ", 7)
    assert actions == [TranscriptLine("user", "What is the capital of France?", "utt-1"),
                       Release(ask.reply_id)]
    assert [m.content for m in dialogue.history] == ["What is the capital of France?", "Paris."]
    assert dialogue.spoken(ask.reply_id)[-1] == TurnDone("utt-1")


def test_other_words_cancel_the_held_reply_and_the_utterance_is_asked_anew():
    dialogue = Dialogue(speculate=True)
    first = held_ask(dialogue.heard_pause("utt-1", "What is the", 1))
    second = held_ask(dialogue.heard_pause("utt-1", "What is the capital", 1))
    assert first.reply_id != second.reply_id
    assert dialogue.heard_pause("utt-1", "What is the capital", 1) == []  # the same words
    actions = dialogue.heard("utt-1", "What is the capital of Spain?", 1)
    assert actions[0] == Cancel(second.reply_id)
    ask = next(a for a in actions if isinstance(a, Ask))
    assert not is_held(ask.reply_id)
    assert dialogue.history[-1].content == "What is the capital of Spain?"
    assert dialogue.reply_text(second.reply_id, "late", True) == []


def test_a_held_reply_goes_when_a_new_utterance_starts_or_nothing_was_said():
    dialogue = Dialogue(speculate=True)
    held = held_ask(dialogue.heard_pause("utt-1", "Hello", 1))
    assert dialogue.speech_started() == [Cancel(held.reply_id)]
    held = held_ask(dialogue.heard_pause("utt-2", "Hello", 2))
    assert dialogue.heard("utt-2", "...", 2) == [Cancel(held.reply_id), TurnDone("utt-2")]
    assert Dialogue().heard_pause("utt-1", "Hello", 1) == []  # speculation off
