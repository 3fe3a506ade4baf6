"""What a model takes in memory once loaded, estimated from its prepared files before it loads.

The scheduler plans with these figures until a load has been measured (then it uses the
measurement). A catalog's ``memory_mb`` is one figure for every engine, but the same
weights cost very different memory on each: SmolLM2-135M as a Q8 GGUF takes ~300 MiB
on llama.cpp and ~610 MiB on MLX, where the GGUF was dequantized to float32. So each
adapter estimates from the files it prepared, in the terms of its engine:

    weights (the files it loads)  +  KV cache an engine reserves up front (llama.cpp:
    the whole context, float16)  +  the tokenizer  +  the engine's own libraries and
    buffers (measured per adapter in a fresh process, some growing with the vocabulary)

The adapters' constants were measured here (Linux, x86-64, CPU) on the packaged models:
see ``benchmarks/footprints.py``, whose table sets each estimate beside the measured peak.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 1 << 20
# A loaded Hugging Face tokenizer (the Rust ``tokenizers`` object and mlx-lm's wrapper), per
# vocabulary entry: measured ~29 MiB for SmolLM2's 49k tokens, ~150 MiB for Gemma 3's 262k.
TOKENIZER_BYTES_PER_TOKEN = 600
CONFIG_NAMES = ("model_config.json", "config.json")  # the model's own config, as adapters keep it


@dataclass(frozen=True, slots=True)
class LlmShape:
    """What sizes a decoder's KV cache and its vocabulary buffers."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LlmShape | None:
        """The shape a Hugging Face / mlx-lm ``config.json`` describes (a multimodal model's
        ``text_config``), or None if it names no decoder."""
        config = config.get("text_config") or config
        try:
            heads = int(config["num_attention_heads"])
            head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
            return cls(int(config["num_hidden_layers"]),
                       int(config.get("num_key_value_heads") or heads), head_dim,
                       int(config.get("vocab_size", 0)))
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return None

    @classmethod
    def of_directory(cls, directory: Path) -> LlmShape | None:
        """The shape of the prepared model in ``directory`` (its own config), or None."""
        for name in CONFIG_NAMES:
            path = Path(directory) / name
            if path.is_file():
                try:
                    return cls.from_config(json.loads(path.read_text()))
                except (OSError, ValueError):
                    return None
        return None


def weight_bytes(directory: Path) -> int:
    """What the files of a prepared model take, configs and tokenizer files (JSON) aside."""
    return sum(path.stat().st_size for path in Path(directory).rglob("*")
               if path.is_file() and path.suffix != ".json")


def kv_cache_bytes(shape: LlmShape, tokens: int, bytes_per_value: int = 2) -> int:
    """Keys and values of every layer for ``tokens`` positions."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * tokens * bytes_per_value


def tokenizer_bytes(shape: LlmShape | None) -> int:
    return shape.vocab * TOKENIZER_BYTES_PER_TOKEN if shape else 0
