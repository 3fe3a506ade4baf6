"""A tiny FLUX.2-klein checkpoint with random weights, for tests where the real one cannot be
downloaded.

It is written in the layout of the real ``black-forest-labs/FLUX.2-klein-4B`` repository
(diffusers: ``transformer/``, ``text_encoder/``, ``vae/``, ``tokenizer/``, each with its
``config.json`` and safetensors under the Hugging Face tensor names), so it loads through the
very path a downloaded checkpoint takes: :mod:`mofa_omni.adapters.mflux_image` reads the configs
and mflux maps the tensors. Only the sizes differ: a 1+1-block transformer and a Qwen3 text
encoder of width 32 (28 layers, because FLUX.2-klein reads the hidden states of layers 9, 18
and 27). The VAE is the real size (84 M parameters, ~160 MB in bfloat16): mflux builds
``Flux2VAE()`` with its dimensions fixed. The tokenizer is a Qwen2-style byte-level BPE trained
here on a few sentences (no Qwen vocabulary is available offline) with Qwen3's chat tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

TRANSFORMER = {
    "_class_name": "Flux2Transformer2DModel",
    "patch_size": 1, "in_channels": 128, "out_channels": None,
    "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
    "joint_attention_dim": 96,  # three text-encoder layers of width 32, concatenated
    "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": [4, 4, 4, 4],
    "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": False,
}
TEXT_ENCODER = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
    "hidden_size": 32, "num_hidden_layers": 28, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 64,
    "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "attention_bias": False,
    "rope_theta": 1000000.0, "tie_word_embeddings": True,
}
VAE = {"_class_name": "AutoencoderKLFlux2", "latent_channels": 32,
       "block_out_channels": [128, 256, 512, 512]}  # what mflux's Flux2VAE builds
PIPELINE = {"_class_name": "Flux2KleinPipeline", "transformer": ["diffusers", "Flux2Transformer2DModel"],
            "text_encoder": ["transformers", "Qwen3ForCausalLM"],
            "tokenizer": ["transformers", "Qwen2TokenizerFast"],
            "vae": ["diffusers", "AutoencoderKLFlux2"]}

# Qwen2's pre-tokenizer split (the one its tokenizer.json carries).
_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")
_CORPUS = ["a red apple on a wooden table", "a photo of a cat sitting in the sun",
           "a blue sky over green hills", "an old lighthouse by the sea at night",
           "a bowl of soup, a spoon and bread", "portrait of a woman with a hat"]


def write_tiny_flux2(directory: Path, *, seed: int = 0) -> Path:
    """Write a tiny FLUX.2-klein checkpoint with random weights (drawn from ``seed``) into
    ``directory`` and return it. The same seed writes the same weights."""
    import mlx.core as mx

    directory = Path(directory)
    tokenizer_size = _write_tokenizer(directory / "tokenizer")
    text_config = {**TEXT_ENCODER, "vocab_size": tokenizer_size}
    mx.random.seed(seed)
    for name, config, weights_file in [
        ("transformer", TRANSFORMER, "diffusion_pytorch_model.safetensors"),
        ("text_encoder", text_config, "model.safetensors"),
        ("vae", VAE, "diffusion_pytorch_model.safetensors"),
    ]:
        module, mapping = _module_and_mapping(name, config)
        tensors = {key: value.astype(mx.bfloat16)  # as the real checkpoint stores them
                   for key, value in hf_tensors(module, mapping).items()}
        (directory / name).mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(directory / name / weights_file), tensors)
        _write_json(directory / name / "config.json", config)
    _write_json(directory / "model_index.json", PIPELINE)
    return directory


def _module_and_mapping(name: str, config: dict[str, Any]):
    from mflux.models.flux2.model.flux2_text_encoder.qwen3_text_encoder import Qwen3TextEncoder
    from mflux.models.flux2.model.flux2_transformer.transformer import Flux2Transformer
    from mflux.models.flux2.model.flux2_vae.vae import Flux2VAE
    from mflux.models.flux2.weights.flux2_weight_mapping import Flux2WeightMapping

    from mofa_omni.adapters.mflux_image import constructor_arguments

    if name == "transformer":
        module = Flux2Transformer(**constructor_arguments(Flux2Transformer, config))
        return module, Flux2WeightMapping.get_transformer_mapping()
    if name == "text_encoder":
        module = Qwen3TextEncoder(**constructor_arguments(Qwen3TextEncoder, config))
        return module, Flux2WeightMapping.get_text_encoder_mapping()
    return Flux2VAE(), Flux2WeightMapping.get_vae_mapping()


def hf_tensors(module, mapping) -> dict:
    """``module``'s parameters under their Hugging Face names: mflux's name mapping (HF name
    -> MLX name, with conv weights transposed to MLX's channels-last) run backwards.
    Parameters without a mapping (rotary frequencies, which mflux computes) are not stored."""
    from mlx.utils import tree_flatten

    rules = []
    for target in mapping:
        pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", re.escape(target.to_pattern))
        rules.append((re.compile(f"^{pattern}$"), target))
    tensors = {}
    for path, value in tree_flatten(module.parameters()):
        for pattern, target in rules:
            if match := pattern.match(path):
                key = target.from_pattern[0]
                for placeholder, index in match.groupdict().items():
                    key = key.replace("{" + placeholder + "}", index)
                if target.transform is not None:
                    value = _untransform(target.transform, value)
                tensors[key] = value
                break
    return tensors


def _untransform(transform, value):
    from mflux.models.common.weights.mapping.weight_transforms import WeightTransforms

    if transform is WeightTransforms.transpose_conv2d_weight:  # (O, I, H, W) -> (O, H, W, I)
        return value.transpose(0, 3, 1, 2) if value.ndim == 4 else value
    raise ValueError(f"no inverse known for the weight transform {transform.__name__}")


def _write_tokenizer(directory: Path) -> int:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_CORPUS, trainer)
    fast = Qwen2TokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                              pad_token="<|endoftext|>")
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(str(directory))
    return tokenizer.get_vocab_size()


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
