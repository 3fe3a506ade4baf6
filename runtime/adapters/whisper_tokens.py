"""Whisper's tokens without whisper's own package: the prompt's special tokens, the languages
and the text of a ``tokenizer.json`` (Hugging Face ``tokenizers``), the file CTranslate2
whisper packages ship beside ``model.bin``.

So the CTranslate2 path serves after a plain install: mlx-whisper (whose tokenizer reads
tiktoken rank files) is only needed by the MLX backend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mofa_omni.contract.errors import ModelLoadError

# Whisper's timestamp tokens follow <|notimestamps|>: <|0.00|>, <|0.02|>, ... (30 s / 0.02 s).
TIMESTAMP_STEP_S = 0.02
_LANGUAGE_TOKEN = re.compile(r"<\|([a-z]{2,3})\|>")


@dataclass(frozen=True)
class WhisperTokens:
    """One whisper vocabulary: its ``tokenizers.Tokenizer`` and the ids a prompt needs."""

    tokenizer: Any
    end_of_text: int
    start_of_transcript: int
    transcribe: int
    no_timestamps: int
    languages: dict[str, int]  # ISO code ("en", "de", "haw") -> its token id

    @classmethod
    def from_file(cls, path: Path) -> WhisperTokens:
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # the library raises a bare Exception on a bad file
            raise ModelLoadError(f"{path} is not a tokenizers file: {error}") from error

        def special(text: str) -> int:
            token_id = tokenizer.token_to_id(text)
            if token_id is None:
                raise ModelLoadError(f"{path} is not whisper's tokenizer: it has no {text}")
            return token_id

        start = special("<|startoftranscript|>")
        translate = special("<|translate|>")
        # Whisper's language tokens are the ones between <|startoftranscript|> and <|translate|>.
        languages = {}
        for token_id in range(start + 1, translate):
            match = _LANGUAGE_TOKEN.fullmatch(tokenizer.id_to_token(token_id) or "")
            if match:
                languages[match.group(1)] = token_id
        return cls(tokenizer, special("<|endoftext|>"), start, special("<|transcribe|>"),
                   special("<|notimestamps|>"), languages)

    def prompt(self, language: str | None) -> list[int]:
        """The decoder's prompt without timestamps: with a language and the task on a
        multilingual model (``language`` given), without them on an English-only one."""
        if language is None:
            return [self.start_of_transcript, self.no_timestamps]
        return [self.start_of_transcript, self.languages[language], self.transcribe,
                self.no_timestamps]

    def text_tokens(self, text: str) -> list[int]:
        """The token ids of ``text`` as whisper writes it after the prompt (a leading space)."""
        text = text.strip()
        return self.tokenizer.encode(" " + text, add_special_tokens=False).ids if text else []

    def text(self, token_ids: list[int]) -> str:
        """The words of a decoded sequence (the special tokens after the text dropped)."""
        return self.tokenizer.decode([t for t in token_ids if t < self.end_of_text])

    def token_strings(self, size: int) -> list[str]:
        """One unique string per id below ``size``, as CTranslate2's ``vocabulary.json`` wants;
        the timestamp tokens a ``tokenizer.json`` may leave out are named as whisper names them."""
        strings = []
        for token_id in range(size):
            text = self.tokenizer.id_to_token(token_id)
            if text is None:
                if token_id <= self.no_timestamps:
                    raise ModelLoadError(f"whisper's tokenizer has no token {token_id}")
                text = f"<|{(token_id - self.no_timestamps - 1) * TIMESTAMP_STEP_S:.2f}|>"
            strings.append(text)
        return strings
