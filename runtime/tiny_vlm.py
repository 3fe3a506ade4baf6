"""A tiny SmolVLM checkpoint with random weights, written in mlx-vlm's own format.

No real vision-language weights can be fetched offline, so the tests serve a model of a real
architecture that mlx-vlm supports (SmolVLM: a SigLIP vision tower, a pixel-shuffle connector
and a Llama language model) at a toy size. It is written by mlx-vlm's own ``save_weights`` and
``save_config`` and carries the files a checkpoint from the Hub carries (config.json,
model.safetensors + index, tokenizer.json, tokenizer_config.json, preprocessor_config.json,
processor_config.json, chat_template.json), so loading it takes the same code path as a real
one. The tokenizer is SmolLM2's — the one SmolVLM is built on — rebuilt from its GGUF, plus the
image tokens SmolVLM's processor expects. What it writes is gibberish, by construction.
"""

from __future__ import annotations

import json
from pathlib import Path

from mofa_omni.formats.gguf import Metadata, open_gguf, tokenizer_files

# SmolVLM's prompt tokens around an image: tiles are marked <row_r_col_c>, the downscaled
# whole image <global-img>, each tile's features are runs of <image>.
IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
MAX_TILES_PER_SIDE = 6

# SmolVLM's prompt layout: "User:<image>What is this?<end_of_utterance>\nAssistant:".
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}"
    "{% endif %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _image_tokens() -> list[str]:
    tiles = [f"<row_{r}_col_{c}>" for r in range(1, MAX_TILES_PER_SIDE + 1)
             for c in range(1, MAX_TILES_PER_SIDE + 1)]
    return [FAKE_IMAGE_TOKEN, IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, END_OF_UTTERANCE, *tiles]


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
    import mlx.core as mx
    from mlx_vlm.utils import get_model_and_args, save_config, save_weights, update_module_configs
    from tokenizers import AddedToken

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer, tokenizer_config = tokenizer_files(Metadata(open_gguf(tokenizer_gguf)))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in _image_tokens()])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    eos = [tokenizer.token_to_id(t) for t in (tokenizer_config["eos_token"], END_OF_UTTERANCE)]
    tokenizer_config.pop("chat_template", None)  # SmolVLM's template is in chat_template.json
    tokenizer_config.update(extra_special_tokens={
        "fake_image_token": FAKE_IMAGE_TOKEN, "image_token": IMAGE_TOKEN,
        "global_image_token": GLOBAL_IMAGE_TOKEN, "end_of_utterance_token": END_OF_UTTERANCE})
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))

    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    scale = 2  # the connector's pixel shuffle: 2 x 2 patches -> one language token
    heads = max(1, text_hidden // 16)
    config = {
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
    }
    module, _ = get_model_and_args(config)
    model_config = update_module_configs(module.ModelConfig.from_dict(config), module, config,
                                         ["text", "vision"])
    mx.random.seed(seed)
    model = module.Model(model_config)
    save_weights(out_dir, model)
    save_config(config, out_dir / "config.json")

    image_seq_len = (tile // patch) ** 2 // scale**2
    (out_dir / "processor_config.json").write_text(json.dumps(
        {"processor_class": "SmolVLMProcessor", "image_seq_len": image_seq_len}, indent=1))
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SmolVLMImageProcessor", "processor_class": "SmolVLMProcessor",
        "do_convert_rgb": True, "do_resize": True, "size": {"longest_edge": 2 * tile},
        "resample": 1, "do_image_splitting": True, "max_image_size": {"longest_edge": tile},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_pad": True,
    }, indent=1))
    return out_dir
