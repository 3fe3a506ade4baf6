"""The Realtime protocol's rules without a graph: session updates honoured or refused by name,
audio decoding, the conversation's events, and the dialogue's side of a client's session."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from mofa_omni.realtime.conversation import Conversation, Limits, Listen, Spoken, Tell, heard_text
from mofa_omni.realtime.protocol import (
    RATE,
    Dialect,
    ProtocolError,
    SessionConfig,
    apply_update,
    decode_audio,
    encode_audio,
)
from mofa_omni.voice import events
from mofa_omni.voice.dialogue import Ask, Cancel, Dialogue, TurnDone

GA, BETA = Dialect(beta=False), Dialect(beta=True)
GRAPH = SessionConfig(voice="piper-joe", transcription_model="whisper-tiny.en")


def refusal(session: dict, dialect: Dialect = GA) -> str | None:
    with pytest.raises(ProtocolError) as refused:
        apply_update(GRAPH, session, dialect, "ev-1")
    assert refused.value.event_id == "ev-1" and refused.value.code == "unsupported_parameter"
    return refused.value.param


def test_a_session_update_sets_what_the_graph_honours_in_both_dialects():
    ga = apply_update(GRAPH, {"type": "realtime", "instructions": "Be brief.",
                              "max_output_tokens": 40, "output_modalities": ["audio"],
                              "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE},
                                                  "transcription": None,
                                                  "turn_detection": {"type": "server_vad",
                                                                     "silence_duration_ms": 600}},
                                        "output": {"voice": "piper-joe", "speed": 1.0}}}, GA)
    assert (ga.instructions, ga.max_tokens, ga.transcribe) == ("Be brief.", 40, False)
    beta = apply_update(GRAPH, {"instructions": "Hi.", "temperature": 0.7,
                                "max_response_output_tokens": "inf", "modalities": ["text", "audio"],
                                "input_audio_format": "pcm16", "voice": "piper-joe",
                                "input_audio_transcription": {"model": "whisper-1"},
                                "tools": [], "tool_choice": "auto"}, BETA)
    assert (beta.instructions, beta.temperature, beta.max_tokens, beta.transcribe) == \
        ("Hi.", 0.7, 0, True)


def test_what_the_graph_cannot_honour_is_refused_by_name():
    assert refusal({"audio": {"output": {"voice": "alloy"}}}) == "session.audio.output.voice"
    assert refusal({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}) == \
        "session.audio.input.format"
    assert refusal({"audio": {"input": {"turn_detection": None}}}) == \
        "session.audio.input.turn_detection"
    assert refusal({"audio": {"input": {"turn_detection": {"threshold": 0.8}}}}) == \
        "session.audio.input.turn_detection.threshold"
    assert refusal({"type": "transcription"}) == "session.type"
    assert refusal({"output_modalities": ["text"]}) == "session.output_modalities"
    assert refusal({"tools": [{"type": "function", "name": "f"}]}) == "session.tools"
    assert refusal({"surprise": 1}) == "session.surprise"
    assert refusal({"input_audio_format": "g711_ulaw"}, BETA) == "session.input_audio_format"
    assert refusal({"voice": "verse"}, BETA) == "session.voice"
    assert refusal({"temperature": 3}) == "session.temperature"


def test_a_refused_update_changes_nothing():
    conversation = Conversation("s", GA, GRAPH)
    outcome = conversation.receive(json.dumps({"type": "session.update", "session": {
        "instructions": "Be brief.", "audio": {"output": {"voice": "alloy"}}}}), 0.0)
    assert outcome.events[0]["type"] == "error" and not outcome.actions
    assert conversation.config.instructions == ""


def test_audio_is_16_bit_pcm_in_base64_and_bad_audio_is_refused():
    audio = np.sin(np.arange(RATE // 10, dtype=np.float32) / 7) * 0.5
    assert np.abs(decode_audio(encode_audio(audio), None, RATE) - audio).max() < 1e-4
    for encoded, code in (("%%%", "invalid_audio"), ("AAAA", "invalid_audio"), (3, "invalid_audio"),
                          (base64.b64encode(bytes(4 * RATE)).decode(), "audio_too_long")):
        with pytest.raises(ProtocolError) as refused:
            decode_audio(encoded, "ev", RATE)
        assert refused.value.code == code and refused.value.param == "audio"


def append(conversation: Conversation, seconds: float, now: float):
    audio = base64.b64encode(bytes(2 * round(seconds * RATE))).decode()
    return conversation.receive(json.dumps({"type": "input_audio_buffer.append",
                                            "audio": audio}), now)


def test_audio_goes_to_the_vad_until_it_runs_too_far_ahead_of_the_clock():
    conversation = Conversation("s", GA, GRAPH, Limits(max_ahead_s=2.0))
    assert isinstance(append(conversation, 1.5, 10.0).actions[0], Listen)
    flood = append(conversation, 1.0, 10.1)
    assert flood.events[0]["error"]["code"] == "input_audio_buffer_overflow" and not flood.actions
    assert append(conversation, 1.0, 11.0).actions  # the clock caught up


def test_bad_events_get_error_events_naming_the_problem():
    conversation = Conversation("s", GA, GRAPH)
    codes = [conversation.receive(text, 0.0).events[0]["error"]["code"] for text in (
        "{", "[]", json.dumps({"type": "nope"}), json.dumps({"type": "response.create"}),
        json.dumps({"type": "response.cancel"}),
        json.dumps({"type": "conversation.item.truncate", "item_id": "x", "audio_end_ms": 1}))]
    assert codes == ["invalid_json", "invalid_event", "unknown_event", "unsupported_event",
                     "response_cancel_not_active", "item_not_found"]


def types(outcome) -> list[str]:
    return [event["type"] for event in outcome.events]


def test_the_users_words_come_as_deltas_of_settled_words_then_the_transcript():
    conversation = Conversation("s", GA, GRAPH)
    conversation.stream_offset_s = 10.0
    started = conversation.speech_started("utt-1", 11.25)
    assert started.events[0]["audio_start_ms"] == 1250
    deltas = [conversation.transcript("utt-1", text, settled, False).events
              for text, settled in (("What is", 0), ("What is the", 2), ("What was the cap", 2))]
    assert [e["delta"] for batch in deltas for e in batch] == ["What is"]
    assert types(conversation.speech_stopped("utt-1", 2.0)) == [
        "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
        "conversation.item.added"]
    final = conversation.transcript("utt-1", "What is the capital?", 0, True)
    assert [e.get("delta", e.get("transcript")) for e in final.events] == [
        " the capital?", "What is the capital?"]
    quiet = Conversation("s", GA, GRAPH)
    quiet.config = apply_update(GRAPH, {"audio": {"input": {"transcription": None}}}, GA)
    assert not quiet.transcript("utt-1", "words", 1, True).events


def test_a_reply_is_one_response_spoken_when_the_client_has_played_it():
    conversation = Conversation("s", BETA, GRAPH)
    opened = conversation.reply_text("reply-1", "Paris.", False)
    assert types(opened) == ["response.created", "response.output_item.added",
                             "conversation.item.created", "response.content_part.added",
                             "response.audio_transcript.delta"]
    assert not conversation.reply_text("reply-1", "", True).events
    first = conversation.reply_audio("reply-1", np.zeros(22050, np.float32), 22050, False, 5.0)
    assert set(types(first)) == {"response.audio.delta"}
    last = conversation.reply_audio("reply-1", np.zeros(11025, np.float32), 22050, True, 5.2)
    assert types(last)[-1] == "response.done"
    assert last.events[-1]["response"]["status"] == "completed"
    sent = sum(len(base64.b64decode(e["delta"])) // 2 for e in first.events + last.events
               if e["type"] == "response.audio.delta")
    assert sent == round(1.5 * RATE)
    assert last.actions == [Spoken("reply-1", 5.0 + 1.5)]
    assert not conversation.reply_text("reply-1", "late", False).events  # it is over


def test_cancels_end_the_response_with_their_reason_and_truncation_keeps_the_heard_words():
    conversation = Conversation("s", GA, GRAPH)
    conversation.reply_text("reply-1", "The capital of France is Paris.", True)
    conversation.reply_audio("reply-1", np.zeros(RATE, np.float32), RATE, False, 0.0)
    barged = conversation.cancelled("reply-1")
    assert barged.events[-1]["response"]["status_details"]["reason"] == "turn_detected"
    truncate = {"type": "conversation.item.truncate", "item_id": "item_s_reply-1",
                "content_index": 0, "audio_end_ms": 500}
    cut = conversation.receive(json.dumps(truncate), 1.0)
    assert types(cut) == ["conversation.item.truncated"]
    assert cut.actions == [Tell(events.TRUNCATE, {"reply_id": "reply-1",
                                                  "text": "The capital of"})]
    too_far = conversation.receive(json.dumps(truncate | {"audio_end_ms": 5000}), 1.0)
    assert too_far.events[0]["error"]["param"] == "audio_end_ms"
    conversation.reply_text("reply-2", "Rome.", False)
    asked = conversation.receive(json.dumps({"type": "response.cancel"}), 2.0)
    assert asked.actions == [Tell(events.INTERRUPT)]
    ended = conversation.cancelled("reply-2")
    assert ended.events[-1]["response"]["status_details"]["reason"] == "client_cancelled"
    conversation.cancelled("reply-3")  # before its first words: they are not shown
    assert not conversation.reply_text("reply-3", "late", False).events


def test_heard_text_keeps_whole_words():
    assert heard_text("The capital of France", 0.6) == "The capital"
    assert heard_text("The capital of France", 0.5) == "The"  # "capita|l": not heard whole
    assert heard_text("The capital", 0.05) == ""
    assert heard_text("Paris.", 1.2) == "Paris."


def settings(**fields) -> dict:
    return {"instructions": "", "max_tokens": 0, "temperature": 0.0} | fields


def test_the_dialogue_follows_the_clients_sessions():
    dialogue = Dialogue(system_prompt="Default.", max_tokens=96)
    dialogue.heard("utt-1", "Hello there.", 0)
    dialogue.control(events.SESSION_OPENED, settings(instructions="Be French.", max_tokens=20,
                                                     temperature=0.5))
    assert not dialogue.history  # a new client: a new conversation
    ask = next(a for a in dialogue.heard("utt-2", "Hi.", 0) if isinstance(a, Ask))
    assert ask.request.messages[0].content == "Be French."
    assert (ask.request.max_tokens, ask.request.temperature) == (20, 0.5)
    dialogue.reply_text(ask.reply_id, "Bonjour, mon ami.", True)
    dialogue.control(events.TRUNCATE, {"reply_id": ask.reply_id, "text": "Bonjour,"})
    assert dialogue.history[-1].content == "Bonjour,"
    closed = dialogue.control(events.SESSION_CLOSED, {})
    assert Cancel(ask.reply_id) in closed and not dialogue.history
    assert dialogue.heard("utt-3", "Anyone?", 0) == [TurnDone("utt-3")]  # no one is there
    dialogue.control(events.SESSION_OPENED, settings())
    ask = next(a for a in dialogue.heard("utt-4", "Hi.", 0) if isinstance(a, Ask))
    assert ask.request.messages[0].content == "Default." and ask.request.max_tokens == 96
    assert Cancel(ask.reply_id) in dialogue.control(events.INTERRUPT, {})


def test_a_held_reply_is_shown_only_once_released_and_never_if_cancelled():
    conversation = Conversation("s", GA, GRAPH)
    held = events.held_id("reply-1")
    assert not conversation.reply_text(held, "Paris.", True).events
    assert not conversation.reply_audio(held, np.zeros(RATE, np.float32), RATE, True, 1.0).events
    shown = conversation.released(held, 3.0)
    assert types(shown)[0] == "response.created" and types(shown)[-1] == "response.done"
    assert shown.actions == [Spoken(held, 4.0)]  # played from the release on
    other = events.held_id("reply-2")
    conversation.reply_text(other, "Rome.", False)
    assert not conversation.cancelled(other).events  # the client never heard of it
    assert not conversation.released(other, 5.0).events
    assert not conversation.reply_text(other, " Late.", True).events


def test_a_session_knows_the_utterances_and_replies_it_heard_of():
    """What the Realtime node ignores once the session is over: a cancel's error or a late
    transcript of them must not open a response in the next client's session."""
    conversation = Conversation("s", GA, GRAPH)
    conversation.speech_started("utt-1", 0.0)
    conversation.reply_text("reply-1", "Paris.", True)
    conversation.reply_text(events.held_id("reply-2"), "Rome.", False)
    conversation.cancelled("reply-3")
    assert conversation.ids() == {"utt-1", "reply-1", events.held_id("reply-2"), "reply-3"}
