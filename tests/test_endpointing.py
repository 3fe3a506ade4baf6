"""Ending a turn sooner: whether words look complete, the judges of a pause, and the
turn-end model (Smart Turn v3, its real weights from Pipecat's wheel)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from mofa_omni.adapters.smart_turn import TURN_END, features
from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import GenericRequest
from mofa_omni.voice.endpointing import PauseJudgment, looks_complete


@pytest.mark.parametrize("text", ["What is the capital of France?", "Play some music.",
                                  "Who wrote Romeo and Juliet?", "Stop!", "It's late.\""])
def test_finished_sentences_look_complete(text):
    assert looks_complete(text)


@pytest.mark.parametrize("text", [
    "", "   ", "What is the capital of?", "I would like to know",  # no sentence end
    "Can you tell me who", "My favourite colour is.", "Tell me a story of...",
    "How many legs, and", "I want the", "Um."])
def test_sentences_that_go_on_do_not(text):
    assert not looks_complete(text)


def test_the_turn_ends_sooner_only_when_every_judge_agrees():
    both = frozenset({"audio", "words"})
    judgment = PauseJudgment("utt-1", 5, 1.25, both)
    assert judgment.judged("audio", True) is None  # the words are still to come
    assert judgment.judged("audio", False) is None  # a judge is heard once
    assert judgment.judged("words", True) is True
    judgment = PauseJudgment("utt-1", 5, 1.25, both)
    assert judgment.judged("words", False) is False  # one says no: no need to wait
    assert judgment.judged("audio", True) is None
    assert PauseJudgment("utt-2", 0, 0.0, frozenset({"audio"})).judged("audio", True) is True
    assert PauseJudgment("", 0, 0.0, frozenset()).judged("words", True) is None


@pytest.fixture(scope="module")
def turn(model):
    return model("smart-turn-v3")


def test_smart_turn_hears_a_finished_question_and_a_sentence_cut_short(turn, speak):
    question = speak("How many legs does a spider have?")
    pad = np.zeros(1600, np.float32)  # the 100 ms of silence a pause snapshot ends with
    assert turn.turn_end_probability(np.concatenate([question, pad])) > 0.5
    # Piper voices a fragment as a finished sentence ("How many legs" scores 0.8): only one
    # that no turn ends on is heard as unfinished whatever the voice
    assert turn.turn_end_probability(np.concatenate([speak("and then"), pad])) < 0.2
    # the features are the last 8 s, padded in front: a long clip is heard by its end
    long = np.concatenate([np.zeros(12 * 16000, np.float32), question, pad])
    assert np.array_equal(features(long), features(np.concatenate([question, pad])))


def test_smart_turn_as_a_generic_task_and_bad_clips(turn, speak):
    clip = np.concatenate([speak("Play some music."), np.zeros(1600, np.float32)])
    batch = pa.RecordBatch.from_pydict({"audio": pa.array([clip, clip[:8000]],
                                                          pa.list_(pa.float32()))})
    result = turn.run_generic(GenericRequest(TURN_END, batch))
    probabilities = result.batch.column("probability").to_pylist()
    assert probabilities[0] == pytest.approx(turn.turn_end_probability(clip), abs=1e-6)
    assert len(probabilities) == 2
    for bad in (np.zeros(0, np.float32), np.full(1600, np.nan, np.float32),
                np.zeros((2, 1600), np.float32)):
        with pytest.raises(ContractError, match="non-empty, mono and finite"):
            turn.turn_end_probability(bad)
