"""Which words of a growing utterance's transcript are settled: local agreement.

Transcribing an utterance while it is spoken means running the ASR again and again on the
audio so far; each pass gives a hypothesis, and the words near its end change from one pass
to the next as more audio arrives. whisper_streaming's LocalAgreement-n policy (Macháček et
al., 2023) commits a word once ``n`` consecutive hypotheses agree on it and on every word
before it: the committed words are shown (a partial transcript) and never taken back; at the
end of speech only the words after them are still open.

:class:`LocalAgreement` is that policy over word lists, pure and engine-agnostic. Words are
compared as a listener would (case and punctuation ignored: "Paris." then "Paris," agree);
the committed form is the newest hypothesis's.
"""

from __future__ import annotations

import re

_NOT_WORD = re.compile(r"[^\w']+")
ALIGN_SLACK = 2  # words a pass may have split or merged before the end of the committed ones


def comparable(word: str) -> str:
    """A word as agreement compares it: lower case, without punctuation."""
    return _NOT_WORD.sub("", word.lower())


class LocalAgreement:
    """Commits the words on which the last ``n`` hypotheses agree (see the module)."""

    def __init__(self, n: int = 2):
        if n < 2:
            raise ValueError(f"agreement needs at least 2 hypotheses, got {n}")
        self.n = n
        self.committed: list[str] = []
        self._recent: list[list[str]] = []  # the open words of the last hypotheses, newest last

    def update(self, hypothesis: list[str]) -> list[str]:
        """Take the next pass's words for the whole utterance so far; the words it newly
        commits (often none)."""
        self._recent = [*self._recent, self._open_part(hypothesis)][-self.n:]
        if len(self._recent) < self.n:
            return []
        agreed = 0
        newest = self._recent[-1]
        while agreed < len(newest) and all(
                agreed < len(other) and comparable(other[agreed]) == comparable(newest[agreed])
                for other in self._recent[:-1]):
            agreed += 1
        settled = newest[:agreed]
        self.committed += settled
        self._recent = [words[agreed:] for words in self._recent]
        return settled

    def unsettled(self) -> list[str]:
        """The newest hypothesis's words after the committed ones."""
        return list(self._recent[-1]) if self._recent else []

    def finish(self, final: list[str]) -> list[str]:
        """The last pass, on the whole utterance: its words after the committed ones are
        committed as they are; those words."""
        rest = self._open_part(final)
        self.committed += rest
        self._recent = []
        return rest

    def _open_part(self, hypothesis: list[str]) -> list[str]:
        """``hypothesis`` without the words already committed. Where a pass splits or merges a
        word before them ("ice cream" / "ice-cream"), the end of the committed words is found
        in it within ``ALIGN_SLACK`` words; a pass that changed its mind about a settled word
        still has them counted off its start: what was shown stays shown."""
        done = len(self.committed)
        if not done:
            return list(hypothesis)
        for words in (2, 1):  # the last two committed words, else the last one, nearest first
            tail = [comparable(w) for w in self.committed[-words:]]
            for shift in sorted(range(-ALIGN_SLACK, ALIGN_SLACK + 1), key=abs):
                end = done + shift
                if len(tail) <= end <= len(hypothesis) and \
                        [comparable(w) for w in hypothesis[end - len(tail):end]] == tail:
                    return list(hypothesis[end:])
        return list(hypothesis[done:])
