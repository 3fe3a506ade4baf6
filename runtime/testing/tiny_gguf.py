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

# mlx-lm model_type -> llama.cpp architecture. mlx-lm's Mistral is a Llama, and so is
# llama.cpp's; so is llama.cpp's Mixtral: a Llama whose blocks carry experts.
GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
    "gemma2": "gemma2", "gemma3_text": "gemma3", "mixtral": "llama", "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
}

# llama.cpp's Llama rotates interleaved pairs of a head's dimensions where the Hugging Face
# layout (and mlx-lm's, rope_traditional False) rotates its two halves: its converter permutes
# the Q and K rows, and so does this. The Qwens, Phi-3 and the Gemmas rotate halves in
# llama.cpp too.
_PERMUTED_ROTARY = frozenset({"llama"})
# Gemma's RMSNorm multiplies by (1 + w): llama.cpp's converter stores w + 1, and so does this.
_NORM_SHIFTED = frozenset({"gemma2", "gemma3"})

_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    # Phi-3 fuses Q/K/V into one projection and gate/up into ffn_up (gate rows first)
    "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",
    # the router and the experts, stacked (expert, out, in) as mlx-lm's SwitchGLU keeps them
    "mlp.gate": "ffn_gate_inp", "mlp.switch_mlp.gate_proj": "ffn_gate_exps",
    "mlp.switch_mlp.up_proj": "ffn_up_exps", "mlp.switch_mlp.down_proj": "ffn_down_exps",
    "block_sparse_moe.gate": "ffn_gate_inp",
    "block_sparse_moe.switch_mlp.gate_proj": "ffn_gate_exps",
    "block_sparse_moe.switch_mlp.up_proj": "ffn_up_exps",
    "block_sparse_moe.switch_mlp.down_proj": "ffn_down_exps",
    # Qwen2-MoE's shared expert and its sigmoid gate
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
# Gemma normalises around attention and the MLP both before and after.
_GEMMA_LAYER = {**_LAYER, "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}
_LAYER_PARAMETER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_TOKENIZER_KEYS = re.compile(r"tokenizer\.")


def gguf_name(mlx_name: str, arch: str = "llama") -> str:
    """llama.cpp's name of an mlx-lm parameter of llama.cpp architecture ``arch``
    (``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``)."""
    if match := _LAYER_PARAMETER.match(mlx_name):
        layer, module, kind = match.groups()
        names = _GEMMA_LAYER if arch in _NORM_SHIFTED else _LAYER
        if module in names:
            return f"blk.{layer}.{names[module]}.{kind}"
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


def write_tiny_gguf(checkpoint: Path, out_path: Path, tokenizer_gguf: Path, *,
                    split_max_tensors: int = 0) -> Path:
    """Write the tiny mlx-lm checkpoint folder ``checkpoint`` (see
    :func:`~mofa_omni.testing.tiny_llm.write_tiny_llm`) as the float32 GGUF ``out_path`` and
    return it; ``tokenizer_gguf`` is the GGUF its tokenizer came from (its keys are copied).
    With ``split_max_tensors``, gguf-py splits it as llama.cpp's gguf-split does
    (``STEM-00001-of-0000N.gguf`` ..., at most that many tensors each): the first part is
    returned."""
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
    writer = gguf.GGUFWriter(str(out_path), arch, split_max_tensors=split_max_tensors)
    # llama.cpp gives Phi-3's own special tokens (</s>, <unk>, <s>) their attributes when the
    # model's *name* says phi3 / phi-3, and fails on a vocabulary (SmolLM2's) without them.
    writer.add_name("tiny-phi" if model_type == "phi3" else f"tiny-{model_type}")
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
    experts = config.get("num_experts") or config.get("num_local_experts")
    if experts:  # Mixtral's experts are as wide as a dense MLP; the Qwens' have their own width
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(config.get("moe_intermediate_size",
                                                         config["intermediate_size"]))
    if "shared_expert_intermediate_size" in config:
        writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])
    if arch == "gemma2":  # mlx-lm's Gemma 2 attends to everything: a window wider than any use
        writer.add_sliding_window(config["max_position_embeddings"])
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    if arch == "gemma3":
        writer.add_sliding_window(config["sliding_window"])
        writer.add_sliding_window_pattern(config["sliding_window_pattern"])
    _copy_tokenizer_keys(writer, tokenizer_gguf)

    # the tensors gguf-py (llama.cpp's own converter) names for this architecture
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[
        next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)]}
    weights = mx.load(str(checkpoint / "model.safetensors"))
    for name in sorted(weights):
        tensor = gguf_name(name, arch)
        if re.sub(r"^blk\.\d+\.", "blk.{bid}.", tensor.rpartition(".")[0]) not in known:
            raise ValueError(f"{tensor} is no tensor of llama.cpp's {arch}")
        value = np.array(weights[name].astype(mx.float32))
        if arch in _PERMUTED_ROTARY and name.endswith(("q_proj.weight", "k_proj.weight")):
            value = _interleave_rotary(value, heads if "q_proj" in name else kv_heads)
        if arch in _NORM_SHIFTED and name.endswith("norm.weight"):
            value = value + np.float32(1.0)
        writer.add_tensor(tensor, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return writer.format_shard_names(out_path)[0]


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
