"""Small text utilities shared by adapters, tests and benchmarks (pure functions, no models)."""

from __future__ import annotations

import re
import unicodedata

_NOT_WORD = re.compile(r"[^\w\s']|_")


def normalize_words(text: str) -> list[str]:
    """Lower-cased words with punctuation removed ("Don't-stop!" -> ["dont", "stop"])."""
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    return _NOT_WORD.sub(" ", text).replace("'", "").split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, after :func:`normalize_words`.

    Raises ValueError when the reference has no words (the rate is undefined).
    """
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    if not ref:
        raise ValueError("word error rate needs a reference with at least one word")
    # Levenshtein distance over words, one row at a time.
    previous = list(range(len(hyp) + 1))
    for i, word in enumerate(ref, 1):
        current = [i]
        for j, other in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (word != other)))
        previous = current
    return previous[-1] / len(ref)


# Abbreviations after which a full stop does not end a sentence (lower case, without the dot).
# "etc." is left out on purpose: it often does end a sentence.
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "cf", "fig", "figs",
    "approx", "dept", "gen", "gov", "sgt", "capt", "lt", "col", "rev", "hon", "ca",
})
# A run of terminators, any closing quotes/brackets, then the whitespace before the next sentence.
_BOUNDARY = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*\s+")
_PARAGRAPH = re.compile(r"\n\s*\n")


def _ends_sentence(text: str, match: re.Match[str]) -> bool:
    punctuation = match.group().rstrip()
    following = text[match.end():match.end() + 1]
    if following.islower():
        return False  # "e.g. apples", "Wait... what?", '"Stop!" he said'
    if punctuation.rstrip("\"'\u201d\u2019)]") != ".":
        return True  # "!", "?", "...", "?!"
    before = text[max(0, match.start() - 64):match.start()].split()
    word = before[-1].lstrip("\"'(\u201c\u2018[") if before else ""
    if word.lower() in _ABBREVIATIONS:
        return False  # "Dr. Smith"
    if len(word) == 1 and word.isalpha():
        return False  # an initial: "J. Smith"
    if re.fullmatch(r"(?:[A-Za-z]\.)+[A-Za-z]", word):
        return False  # dotted abbreviations: "e.g.", "i.e.", "U.S.", "a.m."
    if word.lower() == "no" and following.isdigit():
        return False  # "No. 5"
    return True


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences, keeping their punctuation; whitespace is normalised.

    A sentence ends at ``.``, ``!``, ``?`` or ``…`` followed by whitespace, or at a blank
    line. Common abbreviations ("Dr.", "e.g.", "Mr."), initials ("J. Smith") and decimals
    ("3.14", no space after the dot) do not end a sentence. Text with no terminator is one
    sentence; empty text gives an empty list.
    """
    sentences: list[str] = []
    for paragraph in _PARAGRAPH.split(text):
        paragraph = " ".join(paragraph.split())
        start = 0
        for match in _BOUNDARY.finditer(paragraph + " "):
            if _ends_sentence(paragraph, match):
                sentences.append(paragraph[start:match.end()].strip())
                start = match.end()
        if paragraph[start:].strip():
            sentences.append(paragraph[start:].strip())
    return [s for s in sentences if s]


_CLAUSE_MARKS = (", ", "; ", ": ", " - ", " \u2013 ", " \u2014 ")


class SentenceStream:
    """Turns a stream of text pieces (an LLM's tokens) into TTS-sized sentences as they complete.

    A sentence is released once the next one has begun (only then is its end
    certain: "Dr. Smith" is not two sentences); :meth:`flush` releases the rest.
    A sentence longer than ``max_chars`` without an end is cut after its last
    comma, semicolon or colon, so speech can start before a run-on sentence ends.
    With ``first_clause_chars``, the reply's first piece is its first clause instead,
    released at the first comma, semicolon, colon or dash at least that many characters in:
    the voice starts on it while the model writes the rest of the sentence (0: whole
    sentences from the start).
    """

    def __init__(self, max_chars: int = 240, first_clause_chars: int = 0):
        self.max_chars = max_chars
        self.first_clause_chars = first_clause_chars
        self._pending = ""
        self._released = False

    def feed(self, piece: str) -> list[str]:
        self._pending += piece
        sentences = split_sentences(self._pending)
        if not sentences:
            return []
        done, rest = sentences[:-1], sentences[-1]
        if not done and not self._released and self.first_clause_chars:
            marks = [(at, mark) for mark in _CLAUSE_MARKS
                     if (at := rest.find(mark, self.first_clause_chars)) > 0]
            if marks:
                cut, mark = min(marks)  # the first clause mark far enough in
                done.append(rest[:cut + len(mark.rstrip())].strip())
                rest = rest[cut + len(mark):]
        if len(rest) > self.max_chars:
            cut = max(rest.rfind(mark, 0, self.max_chars) for mark in (", ", "; ", ": "))
            if cut > 0:
                done.append(rest[: cut + 1])
                rest = rest[cut + 2 :]
        trailing = " " if self._pending[-1:].isspace() else ""
        self._pending = rest + trailing
        self._released |= bool(done)
        return done

    def flush(self) -> list[str]:
        rest, self._pending = self._pending, ""
        return split_sentences(rest)
