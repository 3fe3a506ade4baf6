"""The incremental sentence splitter that feeds the TTS."""

from mofa_omni.media.text import SentenceStream


def feed_all(pieces: list[str], max_chars: int = 240,
             first_clause_chars: int = 0) -> tuple[list[list[str]], list[str]]:
    stream = SentenceStream(max_chars, first_clause_chars)
    return [stream.feed(p) for p in pieces], stream.flush()


def test_a_sentence_is_released_once_the_next_begins():
    released, rest = feed_all(["The capital", " of France is Paris", ".", " It is", " big."])
    assert released == [[], [], [], ["The capital of France is Paris."], []]
    assert rest == ["It is big."]


def test_abbreviations_do_not_split_while_streaming():
    released, rest = feed_all(["Dr.", " Smith", " lives here. ", "Yes."])
    assert [s for r in released for s in r] == ["Dr. Smith lives here."]
    assert rest == ["Yes."]


def test_run_on_sentences_are_cut_at_a_comma():
    long = "one, " * 60 + "end"
    released, rest = feed_all([long], max_chars=50)
    assert released[0] and all(len(s) <= 50 for s in released[0])
    assert " ".join(released[0] + rest).replace(" ", "") == long.replace(" ", "")


def test_nothing_in_nothing_out():
    assert feed_all([""]) == ([[]], [])
    assert feed_all(["   "]) == ([[]], [])


def test_the_first_clause_is_released_alone_and_the_rest_by_sentence():
    pieces = ["Yes", ",", " the capital", " of France", ",", " as", " you know", ",", " is Paris",
              ".", " It is big", ",", " and old", "."]
    released, rest = feed_all(pieces, first_clause_chars=16)
    # "Yes," is too short to be voiced alone; the first comma 16 characters in ends the first
    # piece as soon as the word after it begins, and later commas do not cut.
    assert [(i, r) for i, r in enumerate(released) if r] == [
        (5, ["Yes, the capital of France,"]), (10, ["as you know, is Paris."])]
    assert rest == ["It is big, and old."]
    # A first sentence that ends before any clause mark is released whole, as before.
    released, rest = feed_all(["Paris.", " It is big", ",", " and old", "."], first_clause_chars=16)
    assert [s for r in released for s in r] == ["Paris."] and rest == ["It is big, and old."]
    # Dashes mark a clause too.
    released, _ = feed_all(["The capital of France \u2014", " Paris"], first_clause_chars=16)
    assert released == [[], ["The capital of France \u2014"]]
