"""whisper's tiktoken encodings as Hugging Face tokenizers (the tokenizer.json faster-whisper
reads): the same ids both ways, special tokens included."""

import pytest
from mlx_whisper.tokenizer import get_tokenizer

from mofa_omni.formats.tiktoken_bpe import hf_tokenizer

TEXTS = [" What is the capital of France?", "Hello, world! 123 — déjà vu, naïve café.",
         "  leading spaces\tand\ttabs\nnew lines", "Größe 東京 ¿qué? 🙂", "x" * 50]


@pytest.mark.parametrize("multilingual", [False, True], ids=["english", "multilingual"])
def test_the_converted_tokenizer_encodes_and_decodes_like_tiktoken(multilingual):
    encoding = get_tokenizer(multilingual=multilingual).encoding
    converted = hf_tokenizer(encoding._mergeable_ranks, encoding._special_tokens)
    for text in TEXTS:
        ids = encoding.encode(text)
        assert converted.encode(text).ids == ids, text
        assert converted.decode(ids) == text
    for name, token_id in encoding._special_tokens.items():
        assert converted.token_to_id(name) == token_id


def test_special_tokens_must_follow_the_vocabulary():
    with pytest.raises(ValueError, match="without gaps"):
        hf_tokenizer({b"a": 0, b"b": 1}, {"<|end|>": 5})
