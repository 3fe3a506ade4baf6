"""Whether the words heard so far make a complete utterance: the text half of endpointing.

A voice agent ends the user's turn after a stretch of silence; a long one cuts nobody off but
makes every answer late, a short one answers sooner but cuts people off at a pause in the
middle of a sentence. The VAD (:mod:`mofa_omni.voice.vad`) takes the short one only when the
judges of the pause agree the turn is over (:class:`PauseJudgment`): a turn-end model on the
audio, and the words of the speech before the pause (the ASR's transcript of the pause
snapshot), which look like a complete utterance by :func:`looks_complete` when:

- the transcript ends a sentence (whisper punctuates: ``.``, ``?`` or ``!``), and
- its last word is not one that cannot end an English sentence, such as an article, a
  preposition, a conjunction or an auxiliary (whisper writes "What is the capital of?" for
  "What is the capital of ... France?" cut at the pause).

It is a heuristic, not a turn-end model: "Tell me a story." looks complete before "... about a
dragon". ``benchmarks/endpointing.py`` measures what it costs (mid-sentence pauses cut off)
beside what it saves (time to end a complete turn).
"""

from __future__ import annotations

import re

SENTENCE_END = re.compile(r"[.?!][\"')\]]*$")
# Words after which an English sentence goes on: articles, determiners and possessives,
# prepositions, conjunctions, auxiliaries and modals, question words, and fillers.
OPEN_ENDINGS = frozenset("""
a an the this that these those my your his her its our their some any every each no
of to in on at for with from by about into onto over under between through during like than
as per via without within toward towards after before since until
and or but nor so because if when while although though unless whether where which who whom
whose what why how
is are was were be been being am do does did have has had can could will would shall should
may might must
i you he she we they it's i'm you're we're they're
um uh er erm hmm
""".split())


def last_word(text: str) -> str:
    """The last word of ``text``, lower case, without punctuation around it."""
    words = re.findall(r"[\w']+", text.lower())
    return words[-1] if words else ""


def looks_complete(text: str) -> bool:
    """Whether ``text`` reads as a finished utterance (see the module)."""
    text = text.strip()
    if not text or text.endswith("...") or not SENTENCE_END.search(text):
        return False
    return last_word(text) not in OPEN_ENDINGS


class PauseJudgment:
    """The verdicts on one pause snapshot. Each judge asked (the turn-end model on the audio,
    :func:`looks_complete` on the ASR's words) says whether the turn looks over; the pause ends
    the turn sooner only if every one of them says so."""

    def __init__(self, request_id: str, origin_ns: int, end_s: float, judges: frozenset[str]):
        self.request_id, self.origin_ns, self.end_s = request_id, origin_ns, end_s
        self._waiting = set(judges)
        self._over = True

    def judged(self, judge: str, over: bool) -> bool | None:
        """Take ``judge``'s verdict; the judgment once every judge gave one (or one said the
        turn goes on), else None. A judge not waited for changes nothing."""
        if judge not in self._waiting:
            return None
        self._waiting.discard(judge)
        self._over = self._over and over
        if not self._over:
            self._waiting.clear()
            return False
        return None if self._waiting else True
