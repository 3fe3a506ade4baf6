"""The incremental sentence splitter that feeds the TTS."""

from mofa_omni.media.text import SentenceStream


def feed_all(pieces: list[str], max_chars: int = 240) -> tuple[list[list[str]], list[str]]:
    stream = SentenceStream(max_chars)
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
