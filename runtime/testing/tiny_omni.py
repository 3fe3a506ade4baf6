"""A tiny omni checkpoint with random weights, written in mlx-vlm's own format: Qwen3-Omni
(``qwen3_omni_moe``), the omni family whose whole path is MLX code in mlx-vlm.

- audio in: whisper's log-mel (WhisperFeatureExtractor) into a conv-downsampled transformer
  encoder, its frames scattered into the prompt's ``<|audio_pad|>`` run (13 per second);
- pictures in: Qwen3-VL's ViT with deepstack mergers;
- text out: a mixture-of-experts "thinker";
- speech out: a mixture-of-experts "talker" writing codec codes, a multi-codebook code predictor
  and the "code2wav" causal-conv vocoder (24 kHz, 1920 samples per 12.5 Hz codec frame).

Written by mlx-vlm's ``save_weights`` / ``save_config`` with the processor files a checkpoint
from the Hub carries, so ``mlx_vlm.utils.load`` takes the same path as for the real one. The
tokenizer is SmolLM2's plus Qwen3-Omni's special tokens; the speakers are Qwen3-Omni's names.
What it says, in text or sound, is gibberish by construction.
"""

from __future__ import annotations

import json
from pathlib import Path

from mofa_omni.testing.tiny_vlm import _tokenizer, _write_model

# Qwen3-Omni's own special tokens (same spellings as the real checkpoint's tokenizer).
AUDIO_TOKENS = ("<|audio_start|>", "<|audio_end|>", "<|audio_pad|>")
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
TTS_TOKENS = ("<|tts_bos|>", "<|tts_eos|>", "<|tts_pad|>")

# ChatML; each image a <|vision_start|><|image_pad|><|vision_end|>, each audio clip a
# <|audio_start|><|audio_pad|><|audio_end|>; the processor repeats the pad token once per
# encoder output frame. mlx-vlm's apply_chat_template builds the content list
# ([{"type": "image"}, {"type": "audio"}, {"type": "text", ...}]) and passes
# enable_thinking=True, which this template ignores.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'audio' %}<|audio_start|><|audio_pad|><|audio_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Tiny codec: 32 codes per codebook, 4 codebooks (real: 2048 x 16). The talker's own vocab
# holds the codes plus its control tokens; ids must be < codebook_size * num_quantizers so a
# control id sampled as a code (mlx-vlm does not suppress them) still indexes code2wav's table.
CODEBOOK, QUANTIZERS = 32, 4
CODEC = {"codec_pad_id": 32, "codec_bos_id": 33, "codec_eos_token_id": 34,
         "codec_nothink_id": 35, "codec_think_bos_id": 36, "codec_think_eos_id": 37}
SPEAKERS = {"chelsie": 40, "ethan": 41, "aiden": 42}
TALKER_VOCAB = 48
SAMPLE_RATE_OUT = 24000  # code2wav upsamples 2*2*8*5*4*3 = 1920 samples per codec frame


def _rope(head_dim: int) -> dict:
    """Interleaved multimodal rotary split (t, h, w) over head_dim/2 frequencies."""
    half = head_dim // 2
    return {"rope_type": "default", "type": "default", "interleaved": True,
            "mrope_section": [half - 2 * (half // 4), half // 4, half // 4]}


def write_tiny_qwen3_omni(out_dir: Path, tokenizer_gguf: Path, *, seed: int = 0,
                          text_hidden: int = 64, text_layers: int = 2, audio_hidden: int = 32,
                          vision_hidden: int = 32, talker_hidden: int = 32) -> Path:
    """Write a random-weight Qwen3-Omni (thinker + talker + code2wav) into ``out_dir``, its
    tokenizer SmolLM2's (from ``tokenizer_gguf``) plus Qwen3-Omni's special tokens."""
    from tokenizers import AddedToken

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # --- tokenizer: SmolLM2's BPE (ChatML-native) plus Qwen3-Omni's special tokens --------
    tok, _ = _tokenizer(out_dir, tokenizer_gguf, [*AUDIO_TOKENS, *VISION_TOKENS, *TTS_TOKENS])
    # SmolLM2 spells "assistant" as two BPE pieces; the talker cuts the assistant turn's
    # header as exactly [<|im_start|>, role, "\n"], so make the role one (ordinary) token.
    tok.add_tokens([AddedToken("assistant", special=False, normalized=False)])
    tok.save(str(out_dir / "tokenizer.json"))
    tid = tok.token_to_id
    vocab = tok.get_vocab_size(with_added_tokens=True)

    def role_id(role: str) -> int:
        ids = tok.encode(f"<|im_start|>{role}\n", add_special_tokens=False).ids
        # the talker slices "<|im_start|>assistant\n" as exactly three tokens
        assert len(ids) == 3 and ids[0] == tid("<|im_start|>"), (role, ids)
        return ids[1]

    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",  # never let AutoTokenizer read config.json
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 32768,
        "chat_template": CHAT_TEMPLATE,
        # Qwen3OmniMoeProcessor reads these as tokenizer attributes
        "extra_special_tokens": {
            "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
            "audio_token": "<|audio_pad|>", "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>", "audio_bos_token": "<|audio_start|>",
            "audio_eos_token": "<|audio_end|>"},
    }, indent=1))

    # --- processor configs: one preprocessor_config.json holds both the Whisper feature
    # extractor (read by AutoFeatureExtractor) and the Qwen-VL image settings (read by
    # mlx-vlm's _qwen_vl_image_kwargs), as in the real checkpoint ---------------------------
    image_cfg = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
                 "min_pixels": 32 * 32, "max_pixels": 64 * 64,
                 "size": {"shortest_edge": 32 * 32, "longest_edge": 64 * 64},
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "WhisperFeatureExtractor",
        "processor_class": "Qwen3OmniMoeProcessor",
        "feature_size": 128, "sampling_rate": 16000, "hop_length": 160, "n_fft": 400,
        "chunk_length": 300, "n_samples": 4800000, "nb_max_frames": 30000,
        "padding_side": "right", "padding_value": 0.0, "dither": 0.0,
        "return_attention_mask": True,  # the processor needs the mask to count audio tokens
        "image_processor_type": "Qwen2VLImageProcessor", **image_cfg,
    }, indent=1))
    (out_dir / "video_preprocessor_config.json").write_text(json.dumps(
        {**image_cfg, "fps": 2, "min_frames": 2, "max_frames": 8}, indent=1))
    (out_dir / "processor_config.json").write_text(
        json.dumps({"processor_class": "Qwen3OmniMoeProcessor"}, indent=1))

    # --- model config ------------------------------------------------------------------
    ids = {"image_token_id": tid("<|image_pad|>"), "video_token_id": tid("<|video_pad|>"),
           "audio_token_id": tid("<|audio_pad|>"),
           "audio_start_token_id": tid("<|audio_start|>"),
           "audio_end_token_id": tid("<|audio_end|>"),
           "vision_start_token_id": tid("<|vision_start|>")}
    head_dim = 16
    th = max(1, text_hidden // head_dim)
    talker_heads = max(1, talker_hidden // head_dim)
    config = {
        "architectures": ["Qwen3OmniMoeForConditionalGeneration"],
        "model_type": "qwen3_omni_moe",
        "enable_audio_output": True,
        "eos_token_id": tid("<|im_end|>"),
        "im_start_token_id": tid("<|im_start|>"), "im_end_token_id": tid("<|im_end|>"),
        "system_token_id": role_id("system"), "user_token_id": role_id("user"),
        "assistant_token_id": role_id("assistant"),
        "tts_bos_token_id": tid("<|tts_bos|>"), "tts_eos_token_id": tid("<|tts_eos|>"),
        "tts_pad_token_id": tid("<|tts_pad|>"),
        "thinker_config": {
            "model_type": "qwen3_omni_moe_thinker", **ids,
            "vision_end_token_id": tid("<|vision_end|>"), "user_token_id": role_id("user"),
            "position_id_per_seconds": 13, "seconds_per_chunk": 2,
            "text_config": {
                "model_type": "qwen3_omni_moe_text_encoder",
                "hidden_size": text_hidden, "intermediate_size": 2 * text_hidden,
                "num_hidden_layers": text_layers, "num_attention_heads": th,
                "num_key_value_heads": max(1, th // 2), "head_dim": head_dim,
                # layer 0 dense, the rest sparse: 4 experts, 2 per token
                "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                "decoder_sparse_step": 1, "mlp_only_layers": [0], "norm_topk_prob": True,
                "rms_norm_eps": 1e-6, "vocab_size": vocab, "rope_theta": 1000000.0,
                "max_position_embeddings": 4096, "rope_scaling": _rope(head_dim),
                "tie_word_embeddings": False,
            },
            "audio_config": {
                "model_type": "qwen3_omni_moe_audio_encoder",
                "d_model": audio_hidden, "encoder_layers": 1, "num_hidden_layers": 1,
                "encoder_attention_heads": max(1, audio_hidden // 16),
                "encoder_ffn_dim": 2 * audio_hidden, "num_mel_bins": 128,
                "output_dim": text_hidden, "downsample_hidden_size": 16,
                "n_window": 50, "n_window_infer": 800, "conv_chunksize": 500,
                "max_source_positions": 1500, "activation_function": "gelu",
            },
            "vision_config": {
                "model_type": "qwen3_omni_moe_vision_encoder",
                "depth": 1, "hidden_size": vision_hidden, "intermediate_size": 2 * vision_hidden,
                "out_hidden_size": text_hidden, "num_heads": max(1, vision_hidden // 16),
                "patch_size": 16, "spatial_patch_size": 16, "spatial_merge_size": 2,
                "temporal_patch_size": 2, "in_channels": 3, "in_chans": 3,
                "num_position_embeddings": 16, "deepstack_visual_indexes": [0],
                "image_size": 64, "tokens_per_second": 2,
            },
        },
        "talker_config": {
            "model_type": "qwen3_omni_moe_talker", **ids, "spatial_merge_size": 2,
            "thinker_hidden_size": text_hidden,
            "accept_hidden_layer": text_layers - 1,  # thinker layer whose output feeds the talker
            "num_code_groups": QUANTIZERS, **CODEC, "speaker_id": SPEAKERS,
            "text_config": {
                "model_type": "qwen3_omni_moe_talker_text",
                "hidden_size": talker_hidden, "intermediate_size": 2 * talker_hidden,
                "num_hidden_layers": 1, "num_attention_heads": talker_heads,
                "num_key_value_heads": 1, "head_dim": head_dim,
                "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 32,
                "shared_expert_intermediate_size": 32, "decoder_sparse_step": 1,
                "mlp_only_layers": [], "rms_norm_eps": 1e-6, "vocab_size": TALKER_VOCAB,
                "rope_theta": 1000000.0, "max_position_embeddings": 4096,
                "rope_scaling": _rope(head_dim),
            },
            "code_predictor_config": {  # hidden must equal the talker's
                "hidden_size": talker_hidden, "intermediate_size": 2 * talker_hidden,
                "num_hidden_layers": 1, "num_attention_heads": talker_heads,
                "num_key_value_heads": 1, "head_dim": head_dim, "vocab_size": CODEBOOK,
                "num_code_groups": QUANTIZERS, "layer_types": ["full_attention"],
            },
        },
        "code2wav_config": {
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 2, "decoder_dim": 32,
            "codebook_size": CODEBOOK, "num_quantizers": QUANTIZERS,
            "upsample_rates": [8, 5, 4, 3], "upsampling_ratios": [2, 2], "sliding_window": 72,
        },
    }

    _write_model(out_dir, config, seed, nested=True)
    return out_dir
