"""A tiny Gemma 3n checkpoint with random weights, written in mlx-vlm's own format
(``gemma3n``): sound, pictures and text in, text out (no talker: it does not speak).

- audio in: Gemma 3n's own log-mel (Gemma3nAudioFeatureExtractor, 128 bins at 16 kHz, at
  most 30 s) into a conv-subsampled conformer; its frames, padded to a fixed
  ``audio_seq_length`` soft tokens per clip whatever its length, replace the prompt's
  ``<audio_soft_token>`` run between ``<start_of_audio>`` / ``<end_of_audio>``;
- pictures in: the MobileNet-V5 vision tower, 256 soft tokens per picture;
- text out: Gemma 3n's language model (AltUp, Laurel, per-layer inputs, sliding and global
  layers), its output projection the token embedding.

Gemma 3n lays its vocabulary out in three blocks: the text tokens, then the vision tokens
(from ``vision_config.vocab_offset``), then the audio tokens (from
``audio_config.vocab_offset``); the model tells a soft token's modality by its id, so
``<end_of_image>`` / ``<image_soft_token>`` open the vision block and ``<end_of_audio>`` /
``<audio_soft_token>`` the audio block, as in the real tokenizer (262144 + 128 + 128 ids;
here SmolLM2's ~49k + 4 + 4).

mlx-vlm 0.7.10 builds the MobileNet-V5 vision tower at its full size whatever the config
says (models/gemma3n/vision.py ``gemma3n_mobilenet_def``, ~294M parameters) and its loader
needs every one of its weights (VisionModel.sanitize reads one by name; strict loading),
so the vision tower is written whole, in float16 (~590 MB): this checkpoint is tiny in
everything but that. Written by mlx-vlm's ``save_weights`` / ``save_config`` with the
processor files a checkpoint from the Hub carries, so ``mlx_vlm.utils.load`` takes the
same path as for the real one (mlx-vlm's own Gemma3nProcessor). The tokenizer is SmolLM2's
plus Gemma 3n's special tokens. What it says is gibberish by construction.
"""

from __future__ import annotations

import json
from pathlib import Path

from mofa_omni.testing.tiny_vlm import _tokenizer, _write_json

TURN_TOKENS = ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>")
# text-block markers (their ids below the vision block, as in the real tokenizer)
BOI, BOA = "<start_of_image>", "<start_of_audio>"
# the vision block: <end_of_image> first, then the image soft token, then unused ids
VISION_BLOCK = ("<end_of_image>", "<image_soft_token>", "<vision_unused_0>", "<vision_unused_1>")
# the audio block, laid out the same way; its last id pads short clips' soft tokens
AUDIO_BLOCK = ("<end_of_audio>", "<audio_soft_token>", "<audio_unused_0>", "<audio_unused_1>")
AUDIO_SEQ_LENGTH = 188  # soft tokens per clip (Gemma 3n's: 30 s of sound)
IMAGE_SEQ_LENGTH = 256  # soft tokens per picture: fixed by the vision tower (16 x 16)
PICTURE_SIDE = 768  # what the real model's image processor resizes pictures to
VISION_HIDDEN = 2048  # the vision tower's output channels: fixed by mlx-vlm
SAMPLE_RATE = 16000

# Gemma 3n's template: <bos>, turns between <start_of_turn>/<end_of_turn>, the assistant
# called "model", a system message folded into the first user turn, each sound a
# <audio_soft_token> and each picture a <image_soft_token> (the processor expands them into
# "\n\n<start_of_audio>" + soft tokens + "<end_of_audio>\n\n", and the same for pictures).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}"
    "{%- endif -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'audio' -%}{{ '<audio_soft_token>' }}"
    "{%- elif item['type'] == 'image' -%}{{ '<image_soft_token>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


def write_tiny_gemma3n(out_dir: Path, tokenizer_gguf: Path, *, seed: int = 0,
                       text_hidden: int = 64, text_layers: int = 2,
                       audio_hidden: int = 32, picture_side: int = PICTURE_SIDE) -> Path:
    """Write a random-weight Gemma 3n into ``out_dir`` and return it; its tokenizer SmolLM2's
    (rebuilt from ``tokenizer_gguf``) plus Gemma 3n's special tokens. The same ``seed``
    writes the same weights. Its image processor resizes pictures to ``picture_side``
    pixels square: the real model's 768, or, for a test, 256, the least side the vision tower
    reads into its 16 x 16 soft tokens as it is (it fuses its features at 1/16 of the side,
    pooling a larger grid; mlx-vlm 0.7.10 fails to interpolate a smaller one), ~9x faster."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # --- tokenizer: the text tokens, then the vision block, then the audio block ---------
    tok, tokenizer_config = _tokenizer(out_dir, tokenizer_gguf,
                                       [*TURN_TOKENS, BOI, BOA, *VISION_BLOCK, *AUDIO_BLOCK])
    tid = tok.token_to_id
    vocab = tok.get_vocab_size(with_added_tokens=True)
    vision_offset, audio_offset = tid(VISION_BLOCK[0]), tid(AUDIO_BLOCK[0])
    # the blocks must be contiguous and last: the model reads a token's modality from its id
    assert [tid(t) for t in VISION_BLOCK] == list(range(vision_offset, audio_offset))
    assert [tid(t) for t in AUDIO_BLOCK] == list(range(audio_offset, vocab))
    assert all(tid(t) < vision_offset for t in (*TURN_TOKENS, BOI, BOA))
    tokenizer_config.update(
        tokenizer_class="PreTrainedTokenizerFast",  # never let AutoTokenizer read config.json
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", add_bos_token=False,
        add_eos_token=False, chat_template=CHAT_TEMPLATE,
        # Gemma3nProcessor reads these as tokenizer attributes (and their *_id)
        extra_special_tokens={"image_token": VISION_BLOCK[1], "boi_token": BOI,
                              "eoi_token": VISION_BLOCK[0], "audio_token": AUDIO_BLOCK[1],
                              "boa_token": BOA, "eoa_token": AUDIO_BLOCK[0]})
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)

    # --- processor files: one preprocessor_config.json holds the audio feature extractor
    # (AutoFeatureExtractor) and the SigLIP image processor (AutoImageProcessor), as the
    # real checkpoint's does ----------------------------------------------------------------
    _write_json(out_dir / "preprocessor_config.json", {
        "processor_class": "Gemma3nProcessor",
        "feature_extractor_type": "Gemma3nAudioFeatureExtractor",
        "feature_size": 128, "sampling_rate": SAMPLE_RATE, "padding_value": 0.0,
        "padding_side": "right", "return_attention_mask": True, "frame_length_ms": 32.0,
        "hop_length_ms": 10.0, "min_frequency": 125.0, "max_frequency": 7600.0,
        "preemphasis": 0.97, "preemphasis_htk_flavor": True, "fft_overdrive": True,
        "dither": 0.0, "input_scale_factor": 1.0, "mel_floor": 1e-5,
        "per_bin_mean": None, "per_bin_stddev": None,
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": True, "size": {"height": picture_side, "width": picture_side}, "resample": 2,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": False,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "image_seq_length": IMAGE_SEQ_LENGTH,
    })
    _write_json(out_dir / "processor_config.json", {
        "processor_class": "Gemma3nProcessor", "audio_seq_length": AUDIO_SEQ_LENGTH,
        "image_seq_length": IMAGE_SEQ_LENGTH})

    # --- model config ------------------------------------------------------------------
    head_dim = 16
    heads = max(1, text_hidden // head_dim)
    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                   for i in range(text_layers)]
    layer_types[-1] = "full_attention"  # at least one of each kind
    eos = [tid("<eos>"), tid("<end_of_turn>")]
    config = {
        "architectures": ["Gemma3nForConditionalGeneration"],
        "model_type": "gemma3n",
        "audio_token_id": tid(AUDIO_BLOCK[1]), "image_token_id": tid(VISION_BLOCK[1]),
        "image_token_index": tid(VISION_BLOCK[1]),
        "boa_token_id": tid(BOA), "eoa_token_id": tid(AUDIO_BLOCK[0]),
        "boi_token_id": tid(BOI), "eoi_token_id": tid(VISION_BLOCK[0]),
        "audio_soft_tokens_per_image": AUDIO_SEQ_LENGTH,
        "vision_soft_tokens_per_image": IMAGE_SEQ_LENGTH,
        "pad_token_id": tid("<pad>"), "eos_token_id": eos, "vocab_size": vocab,
        "hidden_size": VISION_HIDDEN, "tie_word_embeddings": True,
        "text_config": {
            "model_type": "gemma3n_text", "hidden_size": text_hidden,
            "intermediate_size": [2 * text_hidden] * text_layers,
            "num_hidden_layers": text_layers, "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 2), "head_dim": head_dim,
            "vocab_size": vocab, "vocab_size_per_layer_input": vision_offset,
            "hidden_size_per_layer_input": 16, "laurel_rank": 8, "altup_num_inputs": 4,
            "altup_active_idx": 0, "altup_coef_clip": 120.0, "altup_correct_scale": True,
            "layer_types": layer_types, "num_kv_shared_layers": 0,
            # Gemma 3n's first layers keep only their strongest activations
            "activation_sparsity_pattern": [0.95] + [0.0] * (text_layers - 1),
            "sliding_window": 512, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
            "final_logit_softcapping": 30.0, "pad_token_id": tid("<pad>"),
        },
        "audio_config": {
            "model_type": "gemma3n_audio", "input_feat_size": 128,
            "hidden_size": audio_hidden, "conf_num_attention_heads": max(1, audio_hidden // 16),
            "conf_num_hidden_layers": 1, "conf_attention_chunk_size": 12,
            "conf_attention_context_left": 13, "conf_attention_context_right": 0,
            "conf_conv_kernel_size": 5, "conf_reduction_factor": 4,
            "sscp_conv_channel_size": [8, 4], "rms_norm_eps": 1e-6,
            "vocab_size": len(AUDIO_BLOCK), "vocab_offset": audio_offset,
        },
        "vision_config": {
            "model_type": "gemma3n_vision", "hidden_size": VISION_HIDDEN,
            "rms_norm_eps": 1e-6, "vocab_size": len(VISION_BLOCK),
            "vocab_offset": vision_offset,
        },
    }
    _write_model(out_dir, config, seed)
    return out_dir


def _write_model(out_dir: Path, config: dict, seed: int) -> None:
    """Build Gemma 3n from ``config`` with mlx-vlm's own (seeded) random initialisation and
    save it as mlx-vlm saves converted checkpoints: the fixed-size vision tower in float16,
    the rest in float32."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_vlm.utils import get_model_and_args, save_config, save_weights, update_module_configs

    saved = json.loads(json.dumps(config))
    module, _ = get_model_and_args(config)
    model_config = update_module_configs(module.ModelConfig.from_dict(config), module, config,
                                         ["text", "vision", "audio"])
    mx.random.seed(seed)
    model = module.Model(model_config)
    model.vision_tower.update(tree_map(lambda p: p.astype(mx.float16),
                                       model.vision_tower.parameters()))
    save_weights(out_dir, model)
    save_config(saved, out_dir / "config.json")
