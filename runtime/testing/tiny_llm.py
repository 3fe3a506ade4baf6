"""Tiny chat-LM checkpoints with random weights, written in mlx-lm's own format, one per
architecture.

Only SmolLM2 (a Llama) can be fetched offline, so the tests prove that the LLM adapters serve
other architectures on toy-sized models of the real ones: each is built by mlx-lm's own
``Model(ModelArgs.from_dict(config))`` (its own initialisation, seeded) and saved by mlx-lm's own
``save_model`` / ``save_config``, with the files a checkpoint from the Hub carries
(config.json with its ``model_type``, model.safetensors + index, tokenizer.json,
tokenizer_config.json with a chat template), so loading one takes the same code path as a real
one. The tokenizer is SmolLM2's, rebuilt once from its GGUF (ChatML template included), and each
model's ``vocab_size`` is that tokenizer's. What they write is gibberish, by construction.

:data:`LLM_ARCHITECTURES` lists the architectures (mlx-lm ``model_type`` names) so that the
README's table of supported architectures can be written from it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mofa_omni.formats.gguf import Metadata, open_gguf, tokenizer_files

# The settings each architecture needs beyond the shared ones of _base_config (its own names,
# as its Hugging Face config.json spells them). The mixtures of experts keep 4 small experts,
# 2 of them per token.
_ARCHITECTURE_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"tie_word_embeddings": True},
    "mistral": {"tie_word_embeddings": False},  # mlx-lm serves it with its Llama
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"tie_word_embeddings": True, "head_dim": 16},
    "phi3": {"tie_word_embeddings": False},
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "final_logit_softcapping": 30.0,
               "attn_logit_softcapping": 50.0},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16,
                    "sliding_window_pattern": 2},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "tie_word_embeddings": False},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 64, "tie_word_embeddings": True},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
                  "head_dim": 16, "tie_word_embeddings": True},
}

LLM_ARCHITECTURES: tuple[str, ...] = tuple(_ARCHITECTURE_CONFIGS)
"""The mlx-lm ``model_type`` of every architecture :func:`write_tiny_llm` writes."""

MIXTURES_OF_EXPERTS: frozenset[str] = frozenset({"mixtral", "qwen2_moe", "qwen3_moe"})


def _base_config(model_type: str, vocab: int, hidden: int, layers: int) -> dict[str, Any]:
    heads = max(1, hidden // 16)
    return {
        "model_type": model_type, "hidden_size": hidden, "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2), "rms_norm_eps": 1e-6, "vocab_size": vocab,
        "rope_theta": 10000.0, "max_position_embeddings": 4096,
    }


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def write_tokenizer(out_dir: Path, gguf: Path) -> Path:
    """Write the tokenizer of ``gguf`` (tokenizer.json, and tokenizer_config.json with its chat
    template) into ``out_dir`` and return it: rebuilt once, copied into every tiny model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, config = tokenizer_files(Metadata(open_gguf(gguf)))
    if "chat_template" not in config:
        raise ValueError(f"{gguf} carries no chat template")
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return out_dir


def _copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> tuple[Any, dict]:
    from tokenizers import Tokenizer

    for name in TOKENIZER_FILES:
        if not (tokenizer_dir / name).is_file():
            raise ValueError(f"{tokenizer_dir} has no {name} (see write_tokenizer)")
        shutil.copyfile(tokenizer_dir / name, out_dir / name)
    return (Tokenizer.from_file(str(out_dir / "tokenizer.json")),
            json.loads((out_dir / "tokenizer_config.json").read_text()))


def write_tiny_llm(out_dir: Path, model_type: str, tokenizer_dir: Path, *, seed: int = 0,
                   hidden: int = 64, layers: int = 2) -> Path:
    """Write a random-weight chat LM of architecture ``model_type`` (one of
    :data:`LLM_ARCHITECTURES`) into ``out_dir`` as an mlx-lm model folder and return it.

    ``tokenizer_dir`` holds the tokenizer's files (:func:`write_tokenizer`), copied in;
    ``hidden`` wide, ``layers`` deep, 16-wide attention heads, half as many key/value heads.
    The same ``seed`` writes the same weights.
    """
    import mlx.core as mx
    from mlx_lm.utils import _get_classes, save_config, save_model

    if model_type not in _ARCHITECTURE_CONFIGS:
        raise ValueError(f"no tiny LLM of architecture {model_type!r}; "
                         f"known: {', '.join(LLM_ARCHITECTURES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, tokenizer_config = _copy_tokenizer(Path(tokenizer_dir), out_dir)
    config = {**_base_config(model_type, tokenizer.get_vocab_size(with_added_tokens=True),
                             hidden, layers),
              **_ARCHITECTURE_CONFIGS[model_type],
              "eos_token_id": tokenizer.token_to_id(tokenizer_config["eos_token"])}
    # mlx-lm's own choice of module (e.g. "mistral" is served by its Llama) and its own init.
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    save_model(out_dir, model)
    save_config(dict(config), out_dir / "config.json")
    return out_dir
