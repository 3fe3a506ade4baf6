"""Small pure text helpers shared by adapters, nodes and tests."""

from __future__ import annotations

import re

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
