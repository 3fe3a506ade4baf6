"""Tiny checkpoints with random weights of the image families mflux serves here (FLUX.2-klein,
Z-Image, ERNIE-Image), for tests where the real ones cannot be downloaded.

Each is written in the layout of the real repository (diffusers: ``model_index.json``,
``transformer/``, ``text_encoder/``, ``vae/``, ``tokenizer/``, each with its ``config.json``
and safetensors under the Hugging Face tensor names, in bfloat16 as published), so it loads
through the very path a downloaded checkpoint takes: :mod:`mofa_omni.adapters.mflux_image`
reads the configs and mflux maps the tensors. The weights come from mflux's own module classes,
stored under the Hugging Face names by running mflux's name mapping backwards. Only the sizes
differ; see each writer for what is tiny and what mflux keeps at full size (the VAEs: mflux
builds them with their dimensions fixed, 84 M parameters, ~160 MB in bfloat16). The tokenizers
are trained here on a few sentences (no real vocabulary is available offline), with the real
ones' special tokens. The same seed writes the same weights.
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

# Z-Image (Tongyi-MAI/Z-Image-Turbo): a 1-block transformer of width 64 (one noise and one
# context refiner block), a 2-layer Qwen3 text encoder of width 32 (Z-Image reads the hidden
# states before the last layer), FLUX.1's VAE.
Z_IMAGE_TRANSFORMER = {
    "_class_name": "ZImageTransformer2DModel", "all_patch_size": [2], "all_f_patch_size": [1],
    "in_channels": 16, "dim": 64, "n_layers": 1, "n_refiner_layers": 1, "n_heads": 2,
    "n_kv_heads": 2, "norm_eps": 1e-5, "qk_norm": True,
    "cap_feat_dim": 32,  # the text encoder's hidden_size
    "rope_theta": 256.0, "t_scale": 1000.0,
    "axes_dims": [8, 12, 12],  # adds up to the head width, 64 / 2
    "axes_lens": [1536, 512, 512],
}
Z_IMAGE_TEXT_ENCODER = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 64,
    "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "attention_bias": False,
    "rope_theta": 1000000.0, "tie_word_embeddings": True,
}
Z_IMAGE_VAE = {  # what mflux's Z-Image VAE builds: FLUX.1's
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 16,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
    "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
    "use_post_quant_conv": False,
}
Z_IMAGE_PIPELINE = {
    "_class_name": "ZImagePipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3Model"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "ZImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
}
# ERNIE-Image (baidu/ERNIE-Image-Turbo): a 1-block transformer of width 64, a 2-layer Ministral-3
# text encoder of width 32 (the language model of a Mistral3 checkpoint: its vision tower, which
# ERNIE-Image does not use, is left out), FLUX.2's VAE.
ERNIE_TRANSFORMER = {
    "_class_name": "ErnieImageTransformer2DModel", "hidden_size": 64, "num_attention_heads": 2,
    "num_layers": 1, "ffn_hidden_size": 128, "in_channels": 128, "out_channels": 128,
    "patch_size": 1, "text_in_dim": 32,  # the text encoder's hidden_size
    "rope_theta": 256, "rope_axes_dim": [8, 12, 12],  # adds up to the head width, 64 / 2
    "eps": 1e-6, "qk_layernorm": True,
}
ERNIE_TEXT_ENCODER = {
    "architectures": ["Mistral3Model"], "model_type": "mistral3",
    "text_config": {
        "model_type": "ministral3", "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
        "intermediate_size": 64, "max_position_embeddings": 262144, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0,
                            "original_max_position_embeddings": 16384, "beta_fast": 32,
                            "beta_slow": 1, "llama_4_scaling_beta": 0.1, "mscale": 1.0,
                            "mscale_all_dim": 1.0},
    },
}
ERNIE_VAE = {"_class_name": "AutoencoderKLFlux2", "latent_channels": 32, "layers_per_block": 2,
             "block_out_channels": [128, 256, 512, 512], "patch_size": [2, 2]}
ERNIE_PIPELINE = {
    "_class_name": "ErnieImagePipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Mistral3Model"],
    "tokenizer": ["transformers", "TokenizersBackend"],
    "transformer": ["diffusers", "ErnieImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLFlux2"],
}
# mflux brings its own schedulers; the files are there because the real ones are.
Z_IMAGE_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler",
                     "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
ERNIE_SCHEDULER = {**Z_IMAGE_SCHEDULER, "shift": 4.0}
WEIGHT_FILES = {"transformer": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors", "vae": "diffusion_pytorch_model.safetensors"}

# Qwen2's pre-tokenizer split (the one its tokenizer.json carries).
_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
_MISTRAL_SPECIAL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<pad>"]  # ids as in Mistral
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
    """Write a tiny FLUX.2-klein checkpoint (``black-forest-labs/FLUX.2-klein-4B``'s layout)
    with random weights (drawn from ``seed``) into ``directory`` and return it.

    Tiny: a 1+1-block transformer and a Qwen3 text encoder of width 32 (28 layers, because
    FLUX.2-klein reads the hidden states of layers 9, 18 and 27). Full size: the VAE (mflux
    builds ``Flux2VAE()`` with its dimensions fixed). The tokenizer is a Qwen2-style byte-level
    BPE with Qwen3's chat tokens."""
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


def write_tiny_z_image(directory: Path, *, seed: int = 0) -> Path:
    """Write a tiny Z-Image checkpoint (``Tongyi-MAI/Z-Image-Turbo``'s layout) with random
    weights (drawn from ``seed``) into ``directory`` and return it; mflux's ``z-image-turbo``
    and ``z-image`` serve it.

    Tiny: a 1-block transformer of width 64 and a 2-layer Qwen3 text encoder of width 32
    (:data:`Z_IMAGE_TRANSFORMER`, :data:`Z_IMAGE_TEXT_ENCODER`). Full size: the VAE (FLUX.1's,
    which mflux builds with its dimensions fixed). The tokenizer is the Qwen2-style byte-level
    BPE of :func:`write_tiny_flux2` (Z-Image's text encoder is Qwen3 too)."""
    from mflux.models.z_image.weights.z_image_weight_definition import ZImageWeightDefinition

    directory = Path(directory)
    vocabulary = _write_tokenizer(directory / "tokenizer")
    files = {"transformer/config.json": Z_IMAGE_TRANSFORMER,
             "text_encoder/config.json": {**Z_IMAGE_TEXT_ENCODER, "vocab_size": vocabulary},
             "vae/config.json": Z_IMAGE_VAE,
             "scheduler/scheduler_config.json": Z_IMAGE_SCHEDULER,
             "model_index.json": Z_IMAGE_PIPELINE}
    return _write_family(directory, "z-image-turbo", files, ZImageWeightDefinition, seed)


def write_tiny_ernie_image(directory: Path, *, seed: int = 0) -> Path:
    """Write a tiny ERNIE-Image checkpoint (``baidu/ERNIE-Image-Turbo``'s layout, without the
    optional prompt enhancer ``pe/``) with random weights (drawn from ``seed``) into
    ``directory`` and return it; mflux's ``ernie-image-turbo`` serves it.

    Tiny: a 1-block transformer of width 64 and a 2-layer Ministral-3 text encoder of width 32
    (:data:`ERNIE_TRANSFORMER`, :data:`ERNIE_TEXT_ENCODER`; the text encoder's tensors carry the
    ``language_model.model.`` prefix of the real Mistral3 checkpoint). Full size: the VAE
    (FLUX.2's, which mflux builds with its dimensions fixed). The tokenizer is a byte-level BPE
    with Mistral's special tokens, adding ``<s>`` before a text as Mistral's does."""
    from mflux.models.ernie_image.weights.ernie_image_weight_definition import (
        ErnieImageWeightDefinition,
    )

    directory = Path(directory)
    vocabulary = _write_mistral_tokenizer(directory / "tokenizer")
    text_encoder = {**ERNIE_TEXT_ENCODER,
                    "text_config": {**ERNIE_TEXT_ENCODER["text_config"], "vocab_size": vocabulary}}
    files = {"transformer/config.json": ERNIE_TRANSFORMER,
             "text_encoder/config.json": text_encoder, "vae/config.json": ERNIE_VAE,
             "scheduler/scheduler_config.json": ERNIE_SCHEDULER,
             "model_index.json": ERNIE_PIPELINE}
    return _write_family(directory, "ernie-image-turbo", files, ErnieImageWeightDefinition, seed)


def _write_family(directory: Path, family: str, files: dict[str, dict], definition,
                  seed: int) -> Path:
    """Write ``files`` (JSON), then the weights of the modules the adapter builds from them
    (:func:`~mofa_omni.adapters.mflux_image.build_modules`: the sizes can only agree), each
    component under the names of ``definition`` (mflux's weight definition of ``family``)."""
    import mlx.core as mx

    from mofa_omni.adapters.mflux_image import build_modules, model_config

    for name, value in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        _write_json(directory / name, value)
    mx.random.seed(seed)
    modules = build_modules(family, model_config(family, directory))
    for component in definition.get_components():
        tensors = {key: value.astype(mx.bfloat16)  # as the real checkpoints store them
                   for key, value in hf_tensors(modules[component.name],
                                                component.mapping_getter()).items()}
        mx.save_safetensors(str(directory / component.hf_subdir / WEIGHT_FILES[component.name]),
                            tensors)
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


def _write_mistral_tokenizer(directory: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=_MISTRAL_SPECIAL,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_CORPUS, trainer)
    bos = ("<s>", tokenizer.token_to_id("<s>"))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[bos])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(str(directory))
    return tokenizer.get_vocab_size()


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
