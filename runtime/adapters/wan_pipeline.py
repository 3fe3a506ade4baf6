"""Wan 2.2 TI2V (text / image to video) on MLX without torch: mlx-gen's pipeline, with the
prompt encoded by this project's UMT5 encoder (:mod:`mofa_omni.adapters.umt5`).

mlx-gen (the ``mflux`` package) runs Wan's transformer and VAE on MLX, but encodes the prompt
with ``transformers.UMT5EncoderModel`` on torch, loaded from disk for every new prompt
(``Wan2_2_TI2V._load_t5_prompt_embeds``). :class:`TorchFreeWan` replaces that one method: the
MLX encoder is loaded with the pipeline, stays resident, and returns the very tensor mlx-gen
would (valid tokens' hidden states, zero padding, bfloat16). Tokenizing stays mlx-gen's
(a ``transformers`` tokenizer, which needs no torch).

The checkpoint is the diffusers folder ``Wan-AI/Wan2.2-TI2V-5B-Diffusers`` ships:
``transformer/``, ``vae/``, ``text_encoder/`` (each ``config.json`` + safetensors) and
``tokenizer/``. mlx-gen names its models by registry key and cannot resolve a local folder's
config by name, so :func:`model_config` builds it: the ``wan2.2-ti2v-5b`` entry with the
transformer and VAE sizes of the checkpoint's own ``config.json`` files.

What mlx-gen does quietly, made loud here:

- it applies the weights with ``strict=False``: :func:`load_pipeline` checks that every
  parameter got a tensor of the right shape;
- it rounds a size it cannot make (width and height up to multiples of 32, frames to 4k+1) and
  carries on: :func:`check_size` refuses such a size, naming the rule;
- for image to video its default canvas follows the picture's aspect, not the size asked:
  :class:`TorchFreeWan` defaults to ``canvas_policy="exact-resize"`` (the frames asked).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import mlx.core as mx
from mflux.models.wan.variants.wan2_2_ti2v import Wan2_2_TI2V
from mlx.utils import tree_flatten

from mofa_omni.adapters.mflux_image import constructor_arguments
from mofa_omni.adapters.umt5 import UMT5Encoder, prompt_embeddings
from mofa_omni.contract.errors import ContractError, ModelLoadError
from mofa_omni.formats.json_files import read_json_object

FAMILY = "wan2.2-ti2v-5b"  # mlx-gen's registry key for TI2V-5B
WEIGHTED = ("transformer", "vae", "text_encoder")  # folders with config.json + safetensors
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
# TI2V-5B's size rules: the VAE packs 16x16 pixels and the transformer 2x2 latents (32 px a
# side); the VAE packs 4 frames after the first (1, 5, 9, ... frames).
SPATIAL_MULTIPLE = 32
TEMPORAL_SCALE = 4
MIN_STEPS = 2  # mlx-gen's flow-matching schedulers need two steps
EXACT_RESIZE = "exact-resize"
# Parameters mlx-gen computes when it builds the transformer (rotary tables): no file has them.
COMPUTED = frozenset({"rope.freqs_cos", "rope.freqs_sin"})


def check_layout(directory: Path) -> None:
    """Refuse a folder that is not a Wan 2.2 TI2V diffusers checkpoint, naming what lacks."""
    directory = Path(directory)
    missing = []
    for name in WEIGHTED:
        if not (directory / name / "config.json").is_file():
            missing.append(f"{name}/config.json")
        if not any((directory / name).glob("*.safetensors")):
            missing.append(f"{name}/*.safetensors")
    if not any((directory / "tokenizer" / name).is_file() for name in TOKENIZER_FILES):
        missing.append("tokenizer/tokenizer.json")
    if missing:
        raise ModelLoadError(f"{directory} is not a Wan 2.2 TI2V diffusers checkpoint: "
                             f"{', '.join(missing)} missing")


def transformer_arguments(config: dict[str, Any]) -> dict[str, Any]:
    """The entries of a diffusers ``WanTransformer3DModel`` config that mlx-gen's
    ``WanTransformer`` takes."""
    from mflux.models.wan.model.wan_transformer import WanTransformer

    return constructor_arguments(WanTransformer, config)


def vae_arguments(config: dict[str, Any]) -> dict[str, Any]:
    """The entries of a diffusers ``AutoencoderKLWan`` config that mlx-gen's ``Wan2_2_VAE``
    takes (diffusers spells ``temporal_downsample`` as ``temperal_downsample``)."""
    from mflux.models.wan.model.wan_vae import Wan2_2_VAE

    config = dict(config)
    if "temperal_downsample" in config:
        config.setdefault("temporal_downsample", config.pop("temperal_downsample"))
    return constructor_arguments(Wan2_2_VAE, config)


def model_config(directory: Path):
    """mlx-gen's ModelConfig for the checkpoint in ``directory``: the ``wan2.2-ti2v-5b`` entry
    with the transformer and VAE sizes of the checkpoint's ``transformer/config.json`` and
    ``vae/config.json`` (for the published checkpoint, the registry's own values)."""
    from mflux.models.common.config.model_config import AVAILABLE_MODELS, ModelConfig

    directory = Path(directory)
    transformer = transformer_arguments(read_json_object(directory / "transformer" / "config.json"))
    vae = vae_arguments(read_json_object(directory / "vae" / "config.json"))
    text = read_json_object(directory / "text_encoder" / "config.json")
    if transformer.get("text_dim") != text.get("d_model"):
        raise ModelLoadError(f"{directory}: the transformer's text_dim {transformer.get('text_dim')}"
                             f" is not the text encoder's d_model {text.get('d_model')}")
    if transformer.get("in_channels") != vae.get("z_dim"):
        raise ModelLoadError(f"{directory}: the transformer's in_channels "
                             f"{transformer.get('in_channels')} is not the VAE's z_dim "
                             f"{vae.get('z_dim')}")
    base = AVAILABLE_MODELS[FAMILY]
    fields = {key: value for key, value in vars(base).items() if not key.startswith("_")}
    overrides = dict(base.transformer_overrides)
    overrides.update(transformer)
    overrides["vae_config"] = {**base.transformer_overrides.get("vae_config", {}), **vae}
    fields["transformer_overrides"] = overrides
    fields["text_encoder_overrides"] = {
        **base.text_encoder_overrides,
        **{key: text[key] for key in base.text_encoder_overrides if key in text}}
    return ModelConfig(**fields)


def check_size(width: int, height: int, frames: int, *, spatial_multiple: int = SPATIAL_MULTIPLE,
               temporal_scale: int = TEMPORAL_SCALE) -> None:
    """Refuse a size the pipeline would round (it rounds silently): width and height must be
    positive multiples of ``spatial_multiple`` and frames ``temporal_scale`` k + 1. The defaults
    are TI2V-5B's rules (32 pixels, 4k+1 frames)."""
    if min(width, height) < 1 or width % spatial_multiple or height % spatial_multiple:
        rounded = (f" (it would make {math.ceil(width / spatial_multiple) * spatial_multiple}x"
                   f"{math.ceil(height / spatial_multiple) * spatial_multiple})"
                   if min(width, height) >= 1 else "")
        raise ContractError(f"video size {width}x{height}: width and height must be positive "
                            f"multiples of {spatial_multiple} pixels for Wan{rounded}")
    if frames < 1 or frames % temporal_scale != 1:
        below = max(1, (frames - 1) // temporal_scale * temporal_scale + 1)
        raise ContractError(f"{frames} frames: Wan makes {temporal_scale}k+1 frames (1, "
                            f"{1 + temporal_scale}, {1 + 2 * temporal_scale}, ...), e.g. {below} "
                            f"or {below + temporal_scale}")


class TorchFreeWan(Wan2_2_TI2V):
    """mlx-gen's Wan 2.2 TI2V pipeline with the prompt encoded on MLX by :class:`UMT5Encoder`
    (kept resident, as ``umt5``) instead of torch. Build it with :func:`load_pipeline`.

    ``generate_video`` takes mlx-gen's arguments; it refuses (:class:`ContractError`) a size
    the model would round and fewer than 2 steps, and makes image-to-video honour the size
    asked (``canvas_policy="exact-resize"``) unless told otherwise. It returns mlx-gen's
    ``GeneratedVideo``: ``.frames`` (PIL images) or ``._iter_frame_batches()`` (lists of 8,
    decoded as they are read). A ``progress_callback`` receives ``ProgressEvent`` s (phases
    ``start``, ``denoise`` with ``step`` of ``total_steps``, ``decode``, ``convert``,
    ``generated``); an exception raised from it stops the run and propagates, and the pipeline
    stays usable."""

    umt5: UMT5Encoder

    def __init__(self, directory: Path, config):
        directory = Path(directory)
        # No disk cache of prompt embeddings: nothing is written outside the model's folder.
        super().__init__(model_path=str(directory), model_config=config,
                         prompt_embed_disk_cache=False)
        self.umt5 = UMT5Encoder.from_directory(directory / "text_encoder")

    @property
    def size_rules(self) -> tuple[int, int]:
        """(pixels a side must be a multiple of, frames must be this k + 1) for these weights."""
        _, patch, _ = self.transformer.patch_size  # (frames, height, width): square in Wan
        return self.vae.spatial_scale * patch, self.vae.temporal_scale

    def generate_video(self, seed: int, prompt: str, num_inference_steps: int | None = None,
                       height: int = Wan2_2_TI2V.RECOMMENDED_HEIGHT,
                       width: int = Wan2_2_TI2V.RECOMMENDED_WIDTH,
                       num_frames: int = Wan2_2_TI2V.RECOMMENDED_FRAMES, **options: Any):
        """mlx-gen's ``generate_video``, refusing what it would silently change (see the
        class)."""
        if num_inference_steps is not None and num_inference_steps < MIN_STEPS:
            raise ContractError(f"steps must be at least {MIN_STEPS}, got {num_inference_steps}")
        spatial, temporal = self.size_rules
        check_size(width, height, num_frames, spatial_multiple=spatial, temporal_scale=temporal)
        if options.get("image_path") is not None and options.get("canvas_policy") is None:
            options["canvas_policy"] = EXACT_RESIZE
        return super().generate_video(seed=seed, prompt=prompt,
                                      num_inference_steps=num_inference_steps, height=height,
                                      width=width, num_frames=num_frames, **options)

    def _load_t5_prompt_embeds(self, *, text_inputs, max_sequence_length: int) -> mx.array:
        """The prompt embeddings from the resident MLX encoder (mlx-gen: torch, loaded per
        prompt)."""
        return prompt_embeddings(self.umt5, text_inputs["input_ids"],
                                 text_inputs["attention_mask"], max_sequence_length)


def load_pipeline(directory: Path) -> TorchFreeWan:
    """The Wan 2.2 TI2V pipeline of the diffusers checkpoint in ``directory``, every weight
    read and evaluated (so the memory it holds shows now), every parameter checked to have
    come from the checkpoint with its right shape."""
    directory = Path(directory)
    check_layout(directory)
    config = model_config(directory)
    try:
        pipeline = TorchFreeWan(directory, config)
    except (ValueError, OSError) as error:  # mlx-gen's refusals (config mismatch, no file)
        raise ModelLoadError(f"{directory}: mlx-gen cannot load it: {error}") from error
    check_weights(pipeline)
    mx.eval(pipeline.parameters())
    return pipeline


def check_weights(pipeline: Wan2_2_TI2V) -> None:
    """Refuse a pipeline whose transformer or VAE lacks a tensor from the checkpoint, or holds
    one of the wrong shape: mlx-gen applies weights with ``strict=False`` and keeps the
    random initial value of anything the files lack. Its own reading of the files is repeated
    (lazily: nothing more is read) and compared with freshly built, unevaluated modules."""
    from mflux.models.common.weights.loading.weight_loader import WeightLoader

    if pipeline.bits is not None:
        raise ModelLoadError("quantized (mlx-gen prepared) Wan weights are not supported here; "
                             "use the diffusers checkpoint")
    fresh = _fresh_modules(pipeline.model_config)
    for component in pipeline.weight_definition.get_components():
        if component.name not in fresh or getattr(pipeline, component.name, None) is None:
            continue
        root = pipeline.component_roots.get(component.name, pipeline.root_path)
        tree, _, _ = WeightLoader._load_component(root_path=root, component=component)
        loaded = {name: tuple(value.shape) for name, value in tree_flatten(tree)}
        expected = {name: tuple(value.shape)
                    for name, value in tree_flatten(fresh[component.name].parameters())
                    if name not in COMPUTED}
        # named as the checkpoint names them (the mapping's source), shapes in mlx-gen's layout
        source = {target.to_pattern: target.from_pattern[0]
                  for target in component.mapping_getter()}
        missing = [source.get(name, name) for name in expected if name not in loaded]
        if missing:
            raise ModelLoadError(f"{root / component.hf_subdir}: {len(missing)} {component.name} "
                                 f"tensors missing: {_some(missing)}")
        wrong = [f"{source.get(name, name)} {loaded[name]} (expected {shape})"
                 for name, shape in expected.items() if loaded[name] != shape]
        if wrong:
            raise ModelLoadError(f"{root / component.hf_subdir}: {component.name} tensors of the "
                                 f"wrong shape (mlx-gen's layout): {_some(wrong)}")


def _fresh_modules(config) -> dict[str, Any]:
    """Unevaluated transformer and VAE as mlx-gen builds them for ``config`` (shapes only: MLX
    draws their random initial values lazily, so they cost no memory)."""
    from mflux.models.wan.model.wan_transformer import WanTransformer
    from mflux.models.wan.model.wan_vae import Wan2_2_VAE
    from mflux.models.wan.wan_initializer import WanInitializer

    return {"transformer": WanTransformer(**WanInitializer._transformer_kwargs(config)),
            "vae": Wan2_2_VAE(**WanInitializer._vae_kwargs(config))}


def _some(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
