"""A tiktoken byte-level BPE encoding (whisper's tokenizers) as a Hugging Face ``tokenizers``
tokenizer, so that a converted whisper directory carries the ``tokenizer.json`` that
faster-whisper and other CTranslate2 tools load (and otherwise fetch from the hub).

The vocabulary maps each token's bytes, written with GPT-2's byte-to-unicode table, to its
rank; the merges are every split of a token into two shorter tokens, ordered by the rank of
the token they make (how tiktoken's ranks define BPE); special tokens keep their ids.
"""

from __future__ import annotations

from functools import cache


@cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's table: printable bytes stand for themselves, the others for code points >= 256."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _text(token: bytes) -> str:
    table = _byte_to_unicode()
    return "".join(table[b] for b in token)


def hf_tokenizer(mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int]):
    """The ``tokenizers.Tokenizer`` equivalent to a tiktoken encoding's ranks and specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {_text(token): rank for token, rank in mergeable_ranks.items()}
    merges = []
    for token, rank in mergeable_ranks.items():
        splits = [(mergeable_ranks[token[:i]], mergeable_ranks[token[i:]], token[:i], token[i:])
                  for i in range(1, len(token))
                  if token[:i] in mergeable_ranks and token[i:] in mergeable_ranks]
        merges += [(rank, _text(left), _text(right)) for *_, left, right in sorted(splits)]
    merges.sort(key=lambda merge: merge[0])
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, a, b in merges]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    ordered = sorted(special_tokens.items(), key=lambda item: item[1])
    if [i for _, i in ordered] != list(range(len(vocab), len(vocab) + len(ordered))):
        raise ValueError("special tokens must follow the vocabulary without gaps")
    tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False)
                                  for text, _ in ordered])
    return tokenizer
