"""Local agreement (mofa_omni.voice.agreement): words commit once consecutive hypotheses agree,
never go back, and the end of the utterance commits the rest; on whisper's own passes over a
growing utterance the committed words are the whole-utterance transcript's."""

from __future__ import annotations

import pytest

from mofa_omni.contract.tasks import TranscriptionRequest
from mofa_omni.media.text import normalize_words, word_error_rate
from mofa_omni.voice.agreement import LocalAgreement, comparable


def test_a_word_commits_once_two_passes_agree_on_it_and_all_before_it():
    agreement = LocalAgreement()
    assert agreement.update("What is".split()) == []  # one pass: nothing agreed yet
    assert agreement.update("What is the cap".split()) == ["What", "is"]
    assert agreement.update("What is the capital".split()) == ["the"]  # "cap" != "capital"
    assert agreement.update("What is the capital of France".split()) == ["capital"]
    assert agreement.unsettled() == ["of", "France"]
    assert agreement.finish("What is the capital of France?".split()) == ["of", "France?"]
    assert agreement.committed == "What is the capital of France?".split()


def test_case_and_punctuation_do_not_break_agreement_and_the_newest_form_is_kept():
    agreement = LocalAgreement()
    agreement.update(["paris"])
    assert agreement.update(["Paris,", "is"]) == ["Paris,"]
    assert comparable("Don't!") == "don't"


def test_committed_words_are_never_taken_back():
    agreement = LocalAgreement()
    agreement.update("I have a dog".split())
    agreement.update("I have a dog named".split())
    assert agreement.committed == "I have a dog".split()
    # The ASR changes its mind about a settled word: what was shown stays shown.
    assert agreement.update("I had a dog named Max".split()) == ["named"]
    assert agreement.update("I had a dog named Max.".split()) == ["Max."]
    assert agreement.committed == "I have a dog named Max.".split()


def test_a_pass_that_splits_a_word_before_the_end_still_lines_up():
    agreement = LocalAgreement()
    agreement.update("I like ice-cream and".split())
    agreement.update("I like ice-cream and cake".split())
    assert agreement.committed == "I like ice-cream and".split()
    # one word more before the end: "cake" still agrees with the pass before
    assert agreement.update("I like ice cream and cake too".split()) == ["cake"]
    assert agreement.update("I like ice cream and cake too.".split()) == ["too."]
    assert agreement.committed == "I like ice-cream and cake too.".split()


def test_three_passes_must_agree_when_asked():
    agreement = LocalAgreement(n=3)
    assert agreement.update(["hello"]) == agreement.update(["hello", "there"]) == []
    assert agreement.update(["hello", "there"]) == ["hello"]
    with pytest.raises(ValueError, match="at least 2"):
        LocalAgreement(n=1)


@pytest.mark.slow
def test_whispers_passes_over_a_growing_utterance_commit_its_transcript(model, speak):
    """whisper tiny.en on the first 0.5 s, 1.0 s, ... of a spoken question: the words committed
    along the way, with the last pass's rest, are the whole-utterance transcript; most were
    committed before the end."""
    asr = model("whisper-tiny.en")
    audio = speak("What is the capital of France and how many people live there?")
    whole = asr.transcribe(TranscriptionRequest(audio, 16000)).text.split()
    agreement = LocalAgreement()
    step = 8000  # 0.5 s of audio more for each pass
    for end in range(step, len(audio), step):
        agreement.update(asr.transcribe(TranscriptionRequest(audio[:end], 16000)).text.split())
    before_the_end = len(agreement.committed)
    agreement.finish(whole)
    assert word_error_rate(" ".join(agreement.committed), " ".join(whole)) <= 0.05, (
        agreement.committed, whole)
    assert before_the_end >= len(normalize_words(" ".join(whole))) // 2, agreement.committed
