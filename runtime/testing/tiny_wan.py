"""A tiny Wan 2.2 TI2V checkpoint with random weights, for tests where the real one (~20 GB)
cannot be downloaded.

What is real: the layout of ``Wan-AI/Wan2.2-TI2V-5B-Diffusers`` (``model_index.json``,
``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), its config keys
(diffusers' ``WanTransformer3DModel`` and ``AutoencoderKLWan``, transformers'
``UMT5EncoderModel``, ``T5TokenizerFast``), its tensor names and layouts, and the classes that
make the weights: the transformer and the VAE are mlx-gen's own Wan modules, built from these
configs exactly as :func:`mofa_omni.adapters.wan_pipeline.load_pipeline` builds them, and
stored under the diffusers names by running mlx-gen's name mapping backwards (so loading takes
mlx-gen's real path: mapping, transposes, dtype); the text encoder is written by
:meth:`mofa_omni.adapters.umt5.UMT5Encoder.save`; the tokenizer is transformers'
``T5TokenizerFast`` (Unigram, ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2).

What is tiny: the sizes (a 2-layer transformer of width 48, a VAE of base width 16 with one
residual block a level, a 2-layer UMT5 of width 32) and the tokenizer's vocabulary (a Unigram
over the words and letters of a few sentences, scored by frequency: no UMT5 vocabulary is
available offline). The VAE keeps the
real model's 48 latent channels, 16x spatial and 4x temporal packing and latent statistics, so
the size rules (32 pixels, 4k+1 frames) are the real ones. The same seed writes the same
weights.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

TRANSFORMER = {
    "_class_name": "WanTransformer3DModel", "_diffusers_version": "0.35.0",
    "added_kv_proj_dim": None, "attention_head_dim": 24, "cross_attn_norm": True, "eps": 1e-6,
    "ffn_dim": 96, "freq_dim": 64, "image_dim": None, "in_channels": 48,
    "num_attention_heads": 2, "num_layers": 2, "out_channels": 48, "patch_size": [1, 2, 2],
    "pos_embed_seq_len": None, "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024,
    "text_dim": 32,
}
VAE = {
    "_class_name": "AutoencoderKLWan", "_diffusers_version": "0.35.0", "attn_scales": [],
    "base_dim": 16, "clip_output": False, "decoder_base_dim": 16, "dim_mult": [1, 2, 4, 4],
    "dropout": 0.0, "in_channels": 12, "is_residual": True, "num_res_blocks": 1,
    "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16, "scale_factor_temporal": 4,
    "temperal_downsample": [False, True, True], "z_dim": 48,  # sic: diffusers' spelling
}
UMT5 = {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_heads": 2,
        "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128}
PIPELINE = {
    "_class_name": "WanPipeline", "_diffusers_version": "0.35.0", "boundary_ratio": None,
    "expand_timesteps": True, "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": [None, None],
    "vae": ["diffusers", "AutoencoderKLWan"],
}
SCHEDULER = {  # mlx-gen brings its own UniPC; the file is there because the real one is
    "_class_name": "UniPCMultistepScheduler", "_diffusers_version": "0.35.0", "beta_end": 0.02,
    "beta_schedule": "linear", "beta_start": 0.0001, "disable_corrector": [],
    "final_sigmas_type": "zero", "flow_shift": 5.0, "lower_order_final": True,
    "num_train_timesteps": 1000, "predict_x0": True, "prediction_type": "flow_prediction",
    "solver_order": 2, "solver_type": "bh2", "timestep_spacing": "linspace",
    "use_flow_sigmas": True,
}
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
_SPECIAL = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5 / UMT5
_CORPUS = ["a cat walks across a sunny garden", "waves roll onto a sandy beach at dusk",
           "a red car drives down a mountain road", "snow falls slowly over a quiet village",
           "a dog runs after a ball in the park", "city lights flicker at night in the rain",
           "a bird flies over green hills and a river", "the camera pans across an old library"]


def write_tiny_wan(directory: Path, *, seed: int = 0) -> Path:
    """Write a tiny Wan 2.2 TI2V checkpoint with random weights (drawn from ``seed``) into
    ``directory`` and return it. The same seed writes the same weights."""
    import mlx.core as mx
    from mflux.models.common.config.model_config import ModelConfig

    from mofa_omni.adapters.umt5 import UMT5Config, UMT5Encoder
    from mofa_omni.adapters.wan_pipeline import model_config

    directory = Path(directory)
    vocabulary = _write_tokenizer(directory / "tokenizer")
    mx.random.seed(seed)  # the modules draw their initial values from MLX's generator
    encoder = UMT5Encoder(UMT5Config(vocab_size=vocabulary, **UMT5))
    encoder.set_dtype(mx.bfloat16)  # as Wan's text encoder is stored
    encoder.save(directory / "text_encoder")
    for name, config in (("transformer", TRANSFORMER), ("vae", {**VAE, **_latent_statistics()})):
        _write_json(directory / name / "config.json", config)
    _write_json(directory / "model_index.json", PIPELINE)
    _write_json(directory / "scheduler" / "scheduler_config.json", SCHEDULER)

    config = model_config(directory)  # the sizes exactly as loading will read them
    for component, module in _modules(config):
        tensors = {key: value.astype(ModelConfig.precision)  # bfloat16, as the real one
                   for key, value in diffusers_tensors(module, component.mapping_getter()).items()}
        mx.save_safetensors(str(directory / component.hf_subdir / WEIGHTS_FILE), tensors,
                            metadata={"format": "pt"})
    return directory


def _modules(config) -> list[tuple[Any, Any]]:
    """mlx-gen's transformer and VAE for ``config`` (as its initializer builds them), each with
    its weight-definition component."""
    from mflux.models.wan.model.wan_transformer import WanTransformer
    from mflux.models.wan.model.wan_vae import Wan2_2_VAE
    from mflux.models.wan.wan_initializer import WanInitializer
    from mflux.models.wan.weights import WanWeightDefinition

    builders = {"transformer": lambda: WanTransformer(**WanInitializer._transformer_kwargs(config)),
                "vae": lambda: Wan2_2_VAE(**WanInitializer._vae_kwargs(config))}
    return [(component, builders[component.name]())
            for component in WanWeightDefinition.for_config(config).get_components()]


def diffusers_tensors(module, mapping) -> dict:
    """``module``'s parameters under their diffusers names: mlx-gen's mapping (diffusers name
    -> MLX name, convolution weights moved to MLX's channels-last) run backwards. Parameters
    the mapping does not name (the rotary tables, which mlx-gen computes) are not stored."""
    from mlx.utils import tree_flatten

    targets = {target.to_pattern: target for target in mapping}
    if any("{" in name for name in targets):
        raise ValueError("Wan's weight mapping has placeholders; expected concrete names")
    tensors = {}
    for path, value in tree_flatten(module.parameters()):
        target = targets.get(path)
        if target is None:
            continue
        tensors[target.from_pattern[0]] = _untransform(target.transform, value)
    return tensors


def _untransform(transform, value):
    from mflux.models.common.weights.mapping.weight_transforms import WeightTransforms

    if transform is None:
        return value
    if transform is WeightTransforms.transpose_conv3d_weight and value.ndim == 5:
        return value.transpose(0, 4, 1, 2, 3)  # (O, T, H, W, I) -> (O, I, T, H, W)
    if transform is WeightTransforms.transpose_conv2d_weight and value.ndim == 4:
        return value.transpose(0, 3, 1, 2)  # (O, H, W, I) -> (O, I, H, W)
    raise ValueError(f"no inverse known for the weight transform {transform.__name__} "
                     f"of a {value.ndim}-d tensor")


def _latent_statistics() -> dict[str, list[float]]:
    """The real VAE's per-channel latent mean and std (its config carries them)."""
    from mflux.models.wan.model.wan_vae import Wan2_2_VAE

    return {"latents_mean": Wan2_2_VAE.LATENTS_MEAN.tolist(),
            "latents_std": Wan2_2_VAE.LATENTS_STD.tolist()}


def _write_tokenizer(directory: Path) -> int:
    """Save a small T5-style Unigram over ``_CORPUS`` as transformers' ``T5TokenizerFast``;
    return its vocabulary size.

    The pieces are the corpus's words (``▁word``, as SentencePiece marks a word start) and its
    characters, each scored by the log of its frequency: the unigram model a trainer estimates,
    counted here instead because ``tokenizers``' ``UnigramTrainer`` is not deterministic (its
    pieces' scores, hence their order and ids, vary run to run)."""
    from transformers import T5TokenizerFast

    counts: Counter[str] = Counter()
    for word in " ".join(_CORPUS).split():
        counts.update(["▁", f"▁{word}", *word])
    total = sum(counts.values())
    pieces = sorted(((piece, math.log(count / total)) for piece, count in counts.items()),
                    key=lambda entry: (-entry[1], entry[0]))  # likelier first, then by name
    vocab = [(piece, 0.0) for piece in _SPECIAL] + pieces
    # T5TokenizerFast builds T5's pipeline around the vocabulary: whitespace + metaspace
    # pre-tokenizer, unk id 2, "</s>" appended to every sequence. No sentinel tokens.
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0)
    tokenizer.model_max_length = 512
    tokenizer.save_pretrained(str(directory))
    return len(tokenizer)


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
