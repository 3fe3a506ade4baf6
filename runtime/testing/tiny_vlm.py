"""Tiny vision-language checkpoints with random weights, written in mlx-vlm's own format.

No real vision-language weights can be fetched offline, so the tests serve models of real
architectures that mlx-vlm supports at a toy size:

- SmolVLM (Idefics3; ``smolvlm``): a SigLIP vision tower, a pixel-shuffle connector, a Llama
  language model; images cut into tiles.
- Qwen2-VL (``qwen2_vl``): a ViT with 2-D rotary positions, patches merged 2 x 2, a Qwen2
  language model with multimodal rotary positions; images at their own resolution.
- Qwen2.5-VL (``qwen2_5_vl``): Qwen2-VL's layout with a windowed-attention ViT (RMSNorm,
  gated MLP) and full attention in chosen blocks.
- Gemma 3 (``gemma3``): a SigLIP tower at a fixed square resolution, its patches average-pooled
  into a fixed number of soft tokens, a Gemma 3 language model (sliding-window and global
  layers, q/k norms).
- LLaVA (``llava``): a CLIP vision tower whose second-to-last layer's patch features (the
  class token dropped) pass a two-layer projector into a Llama language model; images resized
  and centre-cropped to one square.

Each is written by mlx-vlm's own ``save_weights`` and ``save_config`` and carries the files a
checkpoint from the Hub carries (config.json, model.safetensors + index, tokenizer.json,
tokenizer_config.json, preprocessor_config.json, and the processor's files), so loading it
takes the same code path as a real one. The tokenizer is SmolLM2's (the one SmolVLM is built
on), rebuilt from its GGUF, plus the image and turn tokens each processor and chat template
expects. What they write is gibberish, by construction.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mofa_omni.formats.gguf import Metadata, open_gguf, tokenizer_files

# SmolVLM's prompt tokens around an image: tiles are marked <row_r_col_c>, the downscaled
# whole image <global-img>, each tile's features are runs of <image>.
IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
MAX_TILES_PER_SIDE = 6

# SmolVLM's prompt layout: "User:<image>What is this?<end_of_utterance>\nAssistant:".
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}"
    "{% endif %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Qwen2-VL's: ChatML, each image a run of <|image_pad|> between <|vision_start|>/<|vision_end|>.
QWEN_IMAGE_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Gemma 3's: turns between <start_of_turn>/<end_of_turn>, the assistant called "model", each
# image a <start_of_image> that the processor expands into <image_soft_token>s.
GEMMA3_IMAGE_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
GEMMA3_TURN_TOKENS = ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>")
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "{{ '<start_of_image>' }}{% elif part['type'] == 'text' %}{{ part['text'] | trim }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


# LLaVA 1.5's: "USER: <image>\nWhat is this? ASSISTANT:", the image one <image> token that the
# processor repeats once per patch feature.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ 'USER: ' if message['role'] == 'user' else 'ASSISTANT: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "{{ '<image>\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _tokenizer(out_dir: Path, gguf: Path, extra: list[str]) -> tuple[Any, dict]:
    """SmolLM2's tokenizer from ``gguf`` plus the special tokens ``extra``, saved in
    ``out_dir``; returns it and its tokenizer_config (written by the caller)."""
    from tokenizers import AddedToken

    tokenizer, config = tokenizer_files(Metadata(open_gguf(gguf)))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    return tokenizer, config


def _write_model(out_dir: Path, config: dict, seed: int, *, tied: str = "",
                 nested: bool = False) -> None:
    """Build the mlx-vlm model ``config`` describes with random weights (mlx-vlm's own
    initialisation, seeded) and save it as mlx-vlm saves converted checkpoints. ``tied``: the
    module (``language_model.lm_head``) a checkpoint of the family leaves out because its
    output projection is the token embedding (mlx-vlm ties them again when it loads).
    ``nested``: the family's ModelConfig builds its parts' configs itself (Qwen3-Omni's
    thinker / talker / code2wav) instead of from top-level text and vision configs."""
    import mlx.core as mx
    from mlx_vlm.utils import get_model_and_args, save_config, save_weights, update_module_configs

    saved = json.loads(json.dumps(config))  # ModelConfig.from_dict may fill in the dict it reads
    module, _ = get_model_and_args(config)
    model_config = module.ModelConfig.from_dict(config)
    if not nested:
        model_config = update_module_configs(model_config, module, config, ["text", "vision"])
    mx.random.seed(seed)
    model = module.Model(model_config)
    if tied:
        parent, _, name = tied.rpartition(".")
        owner = model
        for part in parent.split(".") if parent else ():
            owner = owner[part]
        del owner[name]  # an mlx Module is a dict of its children
    save_weights(out_dir, model)
    save_config(saved, out_dir / "config.json")


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=1))


def write_tiny_smolvlm(out_dir: Path, tokenizer_gguf: Path, *, seed: int = 0,
                       tile: int = 32, patch: int = 8, text_hidden: int = 64,
                       text_layers: int = 2, vision_hidden: int = 32,
                       vision_layers: int = 1) -> Path:
    """Write a random-weight SmolVLM into ``out_dir`` and return it.

    ``tokenizer_gguf`` is a SmolLM2 GGUF (its tokenizer is rebuilt from the metadata). Images
    are cut into ``tile``-pixel tiles (at most 2 x 2 plus the whole image downscaled), each
    seen as ``(tile / patch)**2`` patches that the connector folds 4 to 1 into language tokens.
    The same ``seed`` writes the same weights.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tiles = [f"<row_{r}_col_{c}>" for r in range(1, MAX_TILES_PER_SIDE + 1)
             for c in range(1, MAX_TILES_PER_SIDE + 1)]
    tokenizer, tokenizer_config = _tokenizer(
        out_dir, tokenizer_gguf,
        [FAKE_IMAGE_TOKEN, IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, END_OF_UTTERANCE, *tiles])
    eos = [tokenizer.token_to_id(t) for t in (tokenizer_config["eos_token"], END_OF_UTTERANCE)]
    tokenizer_config.pop("chat_template", None)  # SmolVLM's template is in chat_template.json
    tokenizer_config.update(extra_special_tokens={
        "fake_image_token": FAKE_IMAGE_TOKEN, "image_token": IMAGE_TOKEN,
        "global_image_token": GLOBAL_IMAGE_TOKEN, "end_of_utterance_token": END_OF_UTTERANCE})
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / "chat_template.json", {"chat_template": SMOLVLM_CHAT_TEMPLATE})

    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    scale = 2  # the connector's pixel shuffle: 2 x 2 patches -> one language token
    heads = max(1, text_hidden // 16)
    _write_model(out_dir, {
        "architectures": ["SmolVLMForConditionalGeneration"],
        "model_type": "smolvlm",
        "image_token_id": tokenizer.token_to_id(IMAGE_TOKEN),
        "scale_factor": scale,
        "vocab_size": vocab,
        "eos_token_id": eos,
        "text_config": {
            "model_type": "llama", "hidden_size": text_hidden,
            "intermediate_size": 2 * text_hidden, "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 2), "num_hidden_layers": text_layers,
            "rms_norm_eps": 1e-5, "vocab_size": vocab, "rope_theta": 100000.0,
            "max_position_embeddings": 2048, "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "smolvlm_vision", "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_attention_heads": max(1, vision_hidden // 16),
            "num_hidden_layers": vision_layers, "patch_size": patch, "image_size": tile,
            "num_channels": 3, "layer_norm_eps": 1e-6,
        },
    }, seed)

    _write_json(out_dir / "processor_config.json", {
        "processor_class": "SmolVLMProcessor", "image_seq_len": (tile // patch) ** 2 // scale**2})
    _write_json(out_dir / "preprocessor_config.json", {
        "image_processor_type": "SmolVLMImageProcessor", "processor_class": "SmolVLMProcessor",
        "do_convert_rgb": True, "do_resize": True, "size": {"longest_edge": 2 * tile},
        "resample": 1, "do_image_splitting": True, "max_image_size": {"longest_edge": tile},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_pad": True,
    })
    return out_dir


def write_tiny_qwen2_vl(out_dir: Path, tokenizer_gguf: Path, *, seed: int = 0,
                        max_pixels: int = 112 * 112, text_hidden: int = 64,
                        text_layers: int = 2, vision_hidden: int = 32) -> Path:
    """Write a random-weight Qwen2-VL into ``out_dir`` and return it.

    Images are resized to at most ``max_pixels`` (keeping their aspect, sides multiples of
    28), cut into 14-pixel patches, merged 2 x 2 into language tokens. ``tokenizer_gguf`` and
    ``seed`` as for :func:`write_tiny_smolvlm`.
    """
    return _write_qwen_vl(
        out_dir, tokenizer_gguf, seed=seed, max_pixels=max_pixels, text_hidden=text_hidden,
        text_layers=text_layers, model_type="qwen2_vl",
        architecture="Qwen2VLForConditionalGeneration", processor="Qwen2VLProcessor",
        vision={"depth": 1, "embed_dim": vision_hidden, "hidden_size": text_hidden,
                "num_heads": max(1, vision_hidden // 16), "mlp_ratio": 2})


def write_tiny_qwen2_5_vl(out_dir: Path, tokenizer_gguf: Path, *, seed: int = 0,
                          max_pixels: int = 112 * 112, text_hidden: int = 64,
                          text_layers: int = 2, vision_hidden: int = 32) -> Path:
    """Write a random-weight Qwen2.5-VL into ``out_dir`` and return it.

    Qwen2-VL's image handling (see :func:`write_tiny_qwen2_vl`); the vision tower has two
    blocks, the first attending within 56-pixel windows (2 x 2 merged tokens), the second over
    the whole image, as Qwen2.5-VL alternates them. ``tokenizer_gguf`` and ``seed`` as for
    :func:`write_tiny_smolvlm`.
    """
    return _write_qwen_vl(
        out_dir, tokenizer_gguf, seed=seed, max_pixels=max_pixels, text_hidden=text_hidden,
        text_layers=text_layers, model_type="qwen2_5_vl",
        architecture="Qwen2_5_VLForConditionalGeneration", processor="Qwen2_5_VLProcessor",
        vision={"depth": 2, "hidden_size": vision_hidden, "intermediate_size": 2 * vision_hidden,
                "out_hidden_size": text_hidden, "num_heads": max(1, vision_hidden // 16),
                "window_size": 56, "fullatt_block_indexes": [1], "tokens_per_second": 2})


def _write_qwen_vl(out_dir: Path, tokenizer_gguf: Path, *, seed: int, max_pixels: int,
                   text_hidden: int, text_layers: int, model_type: str, architecture: str,
                   processor: str, vision: dict) -> Path:
    """The Qwen-VL layout both generations share: ChatML, <|image_pad|> runs, the language
    model's settings at the config's top level, multimodal rotary positions; ``vision`` is the
    generation's own vision tower settings."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, tokenizer_config = _tokenizer(out_dir, tokenizer_gguf, list(QWEN_IMAGE_TOKENS))
    tokenizer_config["chat_template"] = QWEN2_VL_CHAT_TEMPLATE
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)

    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    heads = max(1, text_hidden // 16)
    half_head = text_hidden // heads // 2  # rotary pairs, split over time, height and width
    sections = [half_head - 2 * (half_head // 3), half_head // 3, half_head // 3]
    token = tokenizer.token_to_id
    _write_model(out_dir, {  # Qwen-VL keeps the language model's settings at the top level
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": text_hidden, "intermediate_size": 2 * text_hidden,
        "num_hidden_layers": text_layers, "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2), "rms_norm_eps": 1e-6,
        "vocab_size": vocab, "rope_theta": 1000000.0, "max_position_embeddings": 4096,
        "rope_scaling": {"type": "mrope", "mrope_section": sections},
        "tie_word_embeddings": False,
        "image_token_id": token("<|image_pad|>"), "video_token_id": token("<|video_pad|>"),
        "vision_start_token_id": token("<|vision_start|>"),
        "vision_end_token_id": token("<|vision_end|>"),
        "eos_token_id": [token(tokenizer_config["eos_token"])],
        "vision_config": {
            "model_type": model_type, "in_channels": 3, "patch_size": 14,
            "spatial_patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
            **vision,
        },
    }, seed)
    _write_json(out_dir / "preprocessor_config.json", {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": processor,
        "min_pixels": 28 * 28, "max_pixels": max_pixels, "patch_size": 14,
        "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    })
    return out_dir


def write_tiny_gemma3(out_dir: Path, tokenizer_gguf: Path, *, seed: int = 0,
                      image_size: int = 32, patch: int = 8, soft_tokens: int = 4,
                      text_hidden: int = 64, text_layers: int = 2, vision_hidden: int = 32,
                      vision_layers: int = 1) -> Path:
    """Write a random-weight Gemma 3 (the multimodal one) into ``out_dir`` and return it.

    Images are resized to ``image_size`` square (no pan-and-scan), cut into ``patch``-pixel
    patches, average-pooled into ``soft_tokens`` language tokens between <start_of_image> and
    <end_of_image>. Of the language model's layers, every second one attends globally, the
    others within a sliding window (Gemma 3 has five local layers to one global); its output
    projection is the token embedding, not saved twice.
    ``tokenizer_gguf`` and ``seed`` as for :func:`write_tiny_smolvlm`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, tokenizer_config = _tokenizer(
        out_dir, tokenizer_gguf, [*GEMMA3_TURN_TOKENS, *GEMMA3_IMAGE_TOKENS])
    boi, eoi, image = GEMMA3_IMAGE_TOKENS
    tokenizer_config.update(
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", add_bos_token=False,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        extra_special_tokens={"boi_token": boi, "eoi_token": eoi, "image_token": image})
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)

    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    token = tokenizer.token_to_id
    heads, head_dim = max(1, text_hidden // 16), 16
    _write_model(out_dir, {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "image_token_index": token(image), "boi_token_index": token(boi),
        "eoi_token_index": token(eoi), "pad_token_id": token("<pad>"),
        "mm_tokens_per_image": soft_tokens,
        "vocab_size": vocab,
        "eos_token_id": [token("<eos>"), token("<end_of_turn>")],
        "text_config": {
            "model_type": "gemma3_text", "hidden_size": text_hidden,
            "intermediate_size": 2 * text_hidden, "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 2), "head_dim": head_dim,
            "query_pre_attn_scalar": head_dim, "num_hidden_layers": text_layers,
            "rms_norm_eps": 1e-6, "vocab_size": vocab, "sliding_window": 512,
            "sliding_window_pattern": 2, "rope_local_base_freq": 10000.0,
            "rope_global_base_freq": 1000000.0, "max_position_embeddings": 4096,
            "mm_tokens_per_image": soft_tokens,
        },
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_attention_heads": max(1, vision_hidden // 16),
            "num_hidden_layers": vision_layers, "patch_size": patch, "image_size": image_size,
            "num_channels": 3, "layer_norm_eps": 1e-6, "vision_use_head": False,
        },
    }, seed, tied="language_model.lm_head")  # Gemma ties its output projection to the embedding
    _write_json(out_dir / "processor_config.json", {
        "processor_class": "Gemma3Processor", "image_seq_length": soft_tokens})
    _write_json(out_dir / "preprocessor_config.json", {
        "image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
        "do_convert_rgb": None, "do_resize": True,
        "size": {"height": image_size, "width": image_size}, "resample": 2,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "do_pan_and_scan": None, "image_seq_length": soft_tokens,
    })
    return out_dir


def write_tiny_llava(out_dir: Path, tokenizer_gguf: Path, *, seed: int = 0,
                     image_size: int = 32, patch: int = 8, text_hidden: int = 64,
                     text_layers: int = 2, vision_hidden: int = 32,
                     vision_layers: int = 2) -> Path:
    """Write a random-weight LLaVA (1.5's layout) into ``out_dir`` and return it.

    Images are resized and centre-cropped to ``image_size`` square, cut into ``patch``-pixel
    patches; the features of the vision tower's second-to-last layer, its class token dropped,
    become one language token each: ``(image_size / patch)**2`` per picture.
    ``tokenizer_gguf`` and ``seed`` as for :func:`write_tiny_smolvlm`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, tokenizer_config = _tokenizer(out_dir, tokenizer_gguf, [IMAGE_TOKEN])
    tokenizer_config["chat_template"] = LLAVA_CHAT_TEMPLATE
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)

    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    heads = max(1, text_hidden // 16)
    _write_model(out_dir, {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": tokenizer.token_to_id(IMAGE_TOKEN),
        "vision_feature_select_strategy": "default",  # the class token dropped
        "vision_feature_layer": -2,
        "projector_hidden_act": "gelu",
        "vocab_size": vocab,
        "eos_token_id": [tokenizer.token_to_id(tokenizer_config["eos_token"])],
        "text_config": {
            "model_type": "llama", "hidden_size": text_hidden,
            "intermediate_size": 2 * text_hidden, "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 2), "num_hidden_layers": text_layers,
            "rms_norm_eps": 1e-5, "vocab_size": vocab, "max_position_embeddings": 2048,
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_attention_heads": max(1, vision_hidden // 16),
            "num_hidden_layers": vision_layers, "image_size": image_size, "patch_size": patch,
            "projection_dim": vision_hidden, "layer_norm_eps": 1e-5,
        },
    }, seed)
    _write_json(out_dir / "processor_config.json", {
        "processor_class": "LlavaProcessor", "patch_size": patch, "image_token": IMAGE_TOKEN,
        "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1})
    _write_json(out_dir / "preprocessor_config.json", {
        "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
        "do_convert_rgb": True, "do_resize": True, "size": {"shortest_edge": image_size},
        "resample": 3, "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    })
    return out_dir


# The mlx-vlm families the tests prove, by model_type, each with the writer of its tiny
# checkpoint (the README's table of VLM architectures is checked against this list).
VLM_ARCHITECTURES = {"smolvlm": write_tiny_smolvlm, "qwen2_vl": write_tiny_qwen2_vl,
                     "qwen2_5_vl": write_tiny_qwen2_5_vl, "gemma3": write_tiny_gemma3,
                     "llava": write_tiny_llava}
