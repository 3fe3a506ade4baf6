"""Tiny GGUF chat LMs: the random weights of a :mod:`mofa_omni.testing.tiny_llm` checkpoint,
written as llama.cpp reads them by the ``gguf`` package's own ``GGUFWriter``.

The same weights in both formats let a test compare the engines: llama.cpp on the GGUF and
mlx-lm on the folder compute the same logits up to float rounding. Tensor names and metadata
keys are llama.cpp's (``gguf.TENSOR_NAMES`` / the writer's ``add_*``); the tokenizer's keys
(vocabulary, merges, special tokens, chat template) are copied from the GGUF the tokenizer was
rebuilt from (SmolLM2's). :data:`GGUF_ARCHITECTURES` maps each mlx-lm ``model_type`` written
here to its llama.cpp architecture.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from mofa_omni.formats.gguf import open_gguf

# mlx-lm model_type -> llama.cpp architecture (mlx-lm's Mistral is a Llama, and so is llama.cpp's)
GGUF_ARCHITECTURES: dict[str, str] = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2",
                                      "qwen3": "qwen3", "qwen3_moe": "qwen3moe"}

# llama.cpp's Llama rotates interleaved pairs of a head's dimensions where the Hugging Face
# layout (and mlx-lm's, rope_traditional False) rotates its two halves: its converter permutes
# the Q and K rows, and so does this. The Qwens rotate halves in llama.cpp too.
_PERMUTED_ROTARY = frozenset({"llama"})

_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp", "mlp.switch_mlp.gate_proj": "ffn_gate_exps",
    "mlp.switch_mlp.up_proj": "ffn_up_exps", "mlp.switch_mlp.down_proj": "ffn_down_exps",
}
_LAYER_PARAMETER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_TOKENIZER_KEYS = re.compile(r"tokenizer\.")


def gguf_name(mlx_name: str) -> str:
    """llama.cpp's name of an mlx-lm parameter (``model.layers.0.self_attn.q_proj.weight`` ->
    ``blk.0.attn_q.weight``)."""
    if match := _LAYER_PARAMETER.match(mlx_name):
        layer, module, kind = match.groups()
        if module in _LAYER:
            return f"blk.{layer}.{_LAYER[module]}.{kind}"
    else:
        module, _, kind = mlx_name.rpartition(".")
        if module in _GLOBAL:
            return f"{_GLOBAL[module]}.{kind}"
    raise ValueError(f"no GGUF name for mlx-lm parameter {mlx_name!r}")


def _interleave_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Q/K projection rows from rotating halves of each head to rotating adjacent pairs."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_tiny_gguf(checkpoint: Path, out_path: Path, tokenizer_gguf: Path) -> Path:
    """Write the tiny mlx-lm checkpoint folder ``checkpoint`` (see
    :func:`~mofa_omni.testing.tiny_llm.write_tiny_llm`) as the float32 GGUF ``out_path`` and
    return it; ``tokenizer_gguf`` is the GGUF its tokenizer came from (its keys are copied)."""
    import gguf
    import mlx.core as mx

    checkpoint, out_path = Path(checkpoint), Path(out_path)
    config = json.loads((checkpoint / "config.json").read_text())
    model_type = config["model_type"]
    if model_type not in GGUF_ARCHITECTURES:
        raise ValueError(f"no GGUF writer for architecture {model_type!r}; "
                         f"known: {', '.join(GGUF_ARCHITECTURES)}")
    arch = GGUF_ARCHITECTURES[model_type]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads

    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_path), arch)
    writer.add_name(f"tiny-{model_type}")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    if "num_experts" in config:
        writer.add_expert_count(config["num_experts"])
        writer.add_expert_used_count(config["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    _copy_tokenizer_keys(writer, tokenizer_gguf)

    weights = mx.load(str(checkpoint / "model.safetensors"))
    for name in sorted(weights):
        value = np.array(weights[name].astype(mx.float32))
        if arch in _PERMUTED_ROTARY and name.endswith(("q_proj.weight", "k_proj.weight")):
            value = _interleave_rotary(value, heads if "q_proj" in name else kv_heads)
        writer.add_tensor(gguf_name(name), value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def _copy_tokenizer_keys(writer, source: Path) -> None:
    """Every ``tokenizer.*`` key of the GGUF ``source``, as it is there."""
    reader = open_gguf(source)
    for key, field in reader.fields.items():
        if not _TOKENIZER_KEYS.match(key):
            continue
        kind = field.types[0]
        if kind == field.types[0].ARRAY:
            writer.add_array(key, field.contents())
        else:
            writer.add_key_value(key, field.contents(), kind)
