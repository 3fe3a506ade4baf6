"""Image generation with mflux (MLX diffusion): FLUX.2-klein, Z-Image and ERNIE-Image
checkpoints in the diffusers layout.

The checkpoint is a Hugging Face diffusers directory (``transformer/``, ``text_encoder/``,
``vae/``, ``tokenizer/``) as ``black-forest-labs/FLUX.2-klein-4B``, ``Tongyi-MAI/Z-Image-Turbo``
or ``baidu/ERNIE-Image-Turbo`` ships it. mflux names its built-in models by registry key; the
family (``options.family``, default ``flux2-klein-4b``) picks the pipeline and its defaults
(:data:`BY_FAMILY`: an :class:`ImageFamily` per key), and the sizes of the transformer and the
text encoder come from the checkpoint's own ``config.json`` files (for the published
checkpoints they are the sizes mflux builds; a fine-tune or a small test model brings its own).
mflux's FLUX.2 pipeline reads those sizes from its ModelConfig; its Z-Image and ERNIE-Image
initializers build their modules at the published sizes whatever the config says, so for them
the adapter runs the initializer's steps with modules built at the checkpoint's sizes.
Weights are read once at load and evaluated, so the memory a loaded model holds is MLX's
active memory, which the scheduler sees; nothing is cached outside the adapter.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import numpy as np

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.options import AdapterOptions, Positive
from mofa_omni.contract.errors import ContractError, ModelLoadError, ServerError
from mofa_omni.contract.tasks import Image, ImageRequest, Task, validate_request
from mofa_omni.formats.json_files import read_json_object
from mofa_omni.models.fetching import Progress
from mofa_omni.models.store import link_or_copy

# mflux registry keys served here, by pipeline: FLUX.2-klein, Z-Image, ERNIE-Image.
Family = Literal["flux2-klein-4b", "flux2-klein-9b", "flux2-klein-base-4b", "flux2-klein-base-9b",
                 "z-image-turbo", "z-image", "ernie-image-turbo"]
FAMILIES: tuple[str, ...] = get_args(Family)
COMPONENTS = ("transformer", "text_encoder", "vae")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
# FLUX.2-klein conditions on the hidden states of these text-encoder layers (fixed in mflux).
TEXT_LAYERS = (9, 18, 27)
SIZE_MULTIPLE = 16  # VAE downscale 8 x transformer patch 2 (the same in the three pipelines)
MAX_SEED = 2**63 - 1
MIN_STEPS = 2  # mlx-gen's flow-matching scheduler needs two steps
# Parameters mflux computes when it builds a module (rotary frequencies): no checkpoint has them.
COMPUTED = ("rotary_emb.inv_freq",)

Sizes = tuple[dict[str, Any], dict[str, Any]]  # constructor arguments: transformer, text encoder


@dataclass(frozen=True)
class ImageFamily:
    """How the adapter serves one of mflux's text-to-image pipelines. Classes are named
    ``"module:Class"`` under ``mflux.models`` and imported when used (mflux is optional)."""

    title: str  # in messages: "not a {title} diffusers checkpoint"
    pipeline: str  # mflux's pipeline class
    # (transformer, text encoder) constructor arguments from the checkpoint's config files
    sizes: Callable[[Path], Sizes]
    modules: tuple[tuple[str, str], ...]  # component -> mflux class; the VAE's size is fixed
    guidance: float  # the default when the catalog entry sets none
    # mflux's initializer, where the adapter runs its steps with modules it sized; None: the
    # pipeline's constructor reads the sizes from the ModelConfig itself
    initializer: str | None = None


def constructor_arguments(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    """The entries of a Hugging Face ``config.json`` that ``cls.__init__`` takes (mflux names
    its arguments as diffusers/transformers name the config keys)."""
    config = dict(config)
    rope = config.get("rope_parameters")
    if "rope_theta" not in config and isinstance(rope, dict) and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]  # transformers >= 5 nests it
    accepted = inspect.signature(cls.__init__).parameters
    return {key: value for key, value in config.items()
            if key in accepted and key != "self" and value is not None}


def _argument(cls: type, arguments: dict[str, Any], name: str) -> Any:
    """``arguments[name]``, else ``cls.__init__``'s default for it."""
    return arguments.get(name, inspect.signature(cls.__init__).parameters[name].default)


def _import(name: str) -> Any:
    """The class ``"module:Class"`` names, its module under ``mflux.models``."""
    module, _, attribute = name.partition(":")
    return getattr(importlib.import_module(f"mflux.models.{module}"), attribute)


# --- the families' sizes -----------------------------------------------------------------

def _flux2_sizes(directory: Path) -> Sizes:
    from mflux.models.flux2.model.flux2_text_encoder.qwen3_text_encoder import Qwen3TextEncoder
    from mflux.models.flux2.model.flux2_transformer.transformer import Flux2Transformer

    transformer = constructor_arguments(
        Flux2Transformer, read_json_object(directory / "transformer" / "config.json"))
    text_encoder = constructor_arguments(
        Qwen3TextEncoder, read_json_object(directory / "text_encoder" / "config.json"))
    layers = text_encoder.get("num_hidden_layers", 0)
    if layers < max(TEXT_LAYERS):
        raise ModelLoadError(f"{directory}: FLUX.2-klein reads text-encoder layers "
                             f"{', '.join(map(str, TEXT_LAYERS))}; this text encoder has {layers}")
    width = text_encoder.get("hidden_size", 0) * len(TEXT_LAYERS)
    if transformer.get("joint_attention_dim") != width:
        raise ModelLoadError(f"{directory}: the transformer's joint_attention_dim "
                             f"{transformer.get('joint_attention_dim')} is not {len(TEXT_LAYERS)} "
                             f"x the text encoder's hidden_size ({width})")
    return transformer, text_encoder


def _z_image_sizes(directory: Path) -> Sizes:
    from mflux.models.z_image.model.z_image_text_encoder.text_encoder import TextEncoder
    from mflux.models.z_image.model.z_image_transformer.transformer import ZImageTransformer

    config = read_json_object(directory / "transformer" / "config.json")
    # diffusers lists the patch sizes a model was trained with; mflux's tensor names fix 2 / 1
    patches = (config.get("all_patch_size", [2]), config.get("all_f_patch_size", [1]))
    if [list(p) for p in patches] != [[2], [1]]:
        raise ModelLoadError(f"{directory}: mflux's Z-Image draws with patch size 2 (frames 1); "
                             f"this transformer has all_patch_size {patches[0]}, "
                             f"all_f_patch_size {patches[1]}")
    if config.get("n_kv_heads", config.get("n_heads")) != config.get("n_heads"):
        raise ModelLoadError(f"{directory}: mflux's Z-Image attention has as many key/value heads "
                             f"as heads; this transformer has n_kv_heads {config['n_kv_heads']}, "
                             f"n_heads {config.get('n_heads')}")
    transformer = constructor_arguments(ZImageTransformer, config)
    text_encoder = constructor_arguments(
        TextEncoder, read_json_object(directory / "text_encoder" / "config.json"))
    _same_width(directory, ("cap_feat_dim", _argument(ZImageTransformer, transformer,
                                                        "cap_feat_dim")),
                _argument(TextEncoder, text_encoder, "hidden_size"))
    return transformer, text_encoder


def _ernie_image_sizes(directory: Path) -> Sizes:
    from mflux.models.ernie_image.model.ernie_image_transformer import (
        ErnieImageTransformer2DModel as Transformer,
    )
    from mflux.models.ernie_image.model.mistral3_text_encoder import Mistral3TextEncoder

    transformer = constructor_arguments(
        Transformer, read_json_object(directory / "transformer" / "config.json"))
    config = read_json_object(directory / "text_encoder" / "config.json")
    text = config.get("text_config", config)  # Mistral3 nests its language model's config
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    text_encoder = constructor_arguments(Mistral3TextEncoder, {
        **text, "rope_factor": rope.get("factor"),
        "original_max_position_embeddings": rope.get("original_max_position_embeddings"),
        "llama_4_scaling_beta": rope.get("llama_4_scaling_beta")})
    # mflux draws 128 latent channels: the VAE's 32, packed 2x2
    channels = _argument(Transformer, transformer, "in_channels")
    if channels != 128:
        raise ModelLoadError(f"{directory}: ERNIE-Image's transformer takes the VAE's 128 packed "
                             f"latent channels; this one has in_channels {channels}")
    _same_width(directory, ("text_in_dim", _argument(Transformer, transformer, "text_in_dim")),
                _argument(Mistral3TextEncoder, text_encoder, "hidden_size"))
    return transformer, text_encoder


def _same_width(directory: Path, transformer: tuple[str, int], hidden_size: int) -> None:
    key, width = transformer
    if width != hidden_size:
        raise ModelLoadError(f"{directory}: the transformer's {key} {width} is not the text "
                             f"encoder's hidden_size {hidden_size}")


FLUX2 = ImageFamily(
    "FLUX.2-klein", "flux2.variants.txt2img.flux2_klein:Flux2Klein", _flux2_sizes,
    (("transformer", "flux2.model.flux2_transformer.transformer:Flux2Transformer"),
     ("text_encoder", "flux2.model.flux2_text_encoder.qwen3_text_encoder:Qwen3TextEncoder"),
     ("vae", "flux2.model.flux2_vae.vae:Flux2VAE")),
    # 1.0 for the distilled klein models; the base models use classifier-free guidance, e.g. 4.0
    guidance=1.0)
Z_IMAGE = ImageFamily(
    "Z-Image", "z_image.variants.z_image:ZImage", _z_image_sizes,
    (("transformer", "z_image.model.z_image_transformer.transformer:ZImageTransformer"),
     ("text_encoder", "z_image.model.z_image_text_encoder.text_encoder:TextEncoder"),
     ("vae", "z_image.model.z_image_vae.vae:VAE")),
    guidance=4.0,  # the base model's; mflux draws Turbo without guidance whatever is asked
    initializer="z_image.z_image_initializer:ZImageInitializer")
ERNIE_IMAGE = ImageFamily(
    "ERNIE-Image", "ernie_image.variants.ernie_image_turbo:ErnieImageTurbo", _ernie_image_sizes,
    (("transformer", "ernie_image.model.ernie_image_transformer:ErnieImageTransformer2DModel"),
     ("text_encoder", "ernie_image.model.mistral3_text_encoder:Mistral3TextEncoder"),
     ("vae", "ernie_image.model.ernie_image_vae:ErnieImageVAE")),
    guidance=1.0,  # Turbo is distilled: no classifier-free guidance
    initializer="ernie_image.ernie_image_initializer:ErnieImageInitializer")
BY_FAMILY: dict[str, ImageFamily] = {  # every key of Family
    "flux2-klein-4b": FLUX2, "flux2-klein-9b": FLUX2, "flux2-klein-base-4b": FLUX2,
    "flux2-klein-base-9b": FLUX2, "z-image-turbo": Z_IMAGE, "z-image": Z_IMAGE,
    "ernie-image-turbo": ERNIE_IMAGE}


# --- checkpoints -------------------------------------------------------------------------

def check_layout(directory: Path, family: str = "flux2-klein-4b") -> None:
    """Refuse a directory that is not a diffusers checkpoint of ``family``, naming what lacks."""
    missing = [f"{name}/config.json" for name in ("transformer", "text_encoder")
               if not (directory / name / "config.json").is_file()]
    missing += [f"{name}/*.safetensors" for name in COMPONENTS
                if not any((directory / name).glob("*.safetensors"))]
    if not any((directory / "tokenizer" / name).is_file() for name in TOKENIZER_FILES):
        missing.append("tokenizer/tokenizer.json")
    if missing:
        raise ModelLoadError(f"{directory} is not a {BY_FAMILY[family].title} diffusers "
                             f"checkpoint: {', '.join(missing)} missing")


def model_config(family: str, directory: Path):
    """mflux's ModelConfig for ``family`` with the transformer and text-encoder sizes of the
    checkpoint in ``directory`` (``transformer_overrides``, ``text_encoder_overrides``)."""
    from mflux.models.common.config.model_config import AVAILABLE_MODELS, ModelConfig

    transformer, text_encoder = BY_FAMILY[family].sizes(Path(directory))
    base = AVAILABLE_MODELS[family]
    fields = {key: value for key, value in vars(base).items() if not key.startswith("_")}
    fields["transformer_overrides"] = {**base.transformer_overrides, **transformer}
    fields["text_encoder_overrides"] = {**base.text_encoder_overrides, **text_encoder}
    return ModelConfig(**fields)


def build_modules(family: str, config) -> dict[str, Any]:
    """``family``'s transformer, text encoder and VAE as mflux's classes build them at the sizes
    of ``config`` (:func:`model_config`); until weights are applied they hold MLX's lazy random
    initial values, which cost no memory."""
    sizes = {"transformer": config.transformer_overrides,
             "text_encoder": config.text_encoder_overrides}
    return {name: _import(cls)(**sizes.get(name, {}))
            for name, cls in BY_FAMILY[family].modules}


def load_pipeline(family: str, directory: Path):
    """mflux's pipeline for the ``family`` checkpoint in ``directory`` (weights still lazy)."""
    directory = Path(directory)
    check_layout(directory, family)
    spec, config = BY_FAMILY[family], model_config(family, directory)
    if spec.initializer is None:
        return _import(spec.pipeline)(model_path=str(directory), model_config=config)
    from mlx import nn

    # The initializer's own steps, in its order, with modules sized by the checkpoint instead of
    # the published sizes its _init_models builds (mlx-gen is pinned: these names are stable).
    initializer, cls = _import(spec.initializer), _import(spec.pipeline)
    pipeline = cls.__new__(cls)
    nn.Module.__init__(pipeline)  # what the pipeline's __init__ does before its initializer
    initializer._init_config(pipeline, config)
    weights = initializer._load_weights(str(directory))
    initializer._init_tokenizers(pipeline, str(directory))
    if weights.meta_data.quantization_level is not None:
        raise ModelLoadError(f"{directory}: quantized (mflux-saved) weights are not served "
                             f"here; use the diffusers checkpoint")
    for name, module in build_modules(family, config).items():
        check_weights(name, module, weights.components.get(name) or {})
        setattr(pipeline, name, module)
    initializer._apply_weights(pipeline, weights, None)
    initializer._apply_lora(pipeline, None, None)
    return pipeline


def check_weights(component: str, module, tree: dict) -> None:
    """Refuse weights (``tree``, mflux-named) that do not fit ``module``, built at the sizes of
    the checkpoint's config: mflux applies them with ``strict=False``, keeping the random
    initial value of a missing tensor and failing mid-generation on a wrong shape."""
    from mlx.utils import tree_flatten

    loaded = {name: tuple(value.shape) for name, value in tree_flatten(tree)}
    expected = {name: tuple(value.shape) for name, value in tree_flatten(module.parameters())
                if not name.endswith(COMPUTED)}
    problems = [f"{name} missing" for name in expected if name not in loaded]
    problems += [f"{name} {loaded[name]} (built {shape})"
                 for name, shape in expected.items() if loaded.get(name, shape) != shape]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ModelLoadError(f"the {component} weights do not fit the {component} mflux builds "
                             f"for this checkpoint's config: {', '.join(problems[:3])}{more}")


# --- the adapter -------------------------------------------------------------------------

class MfluxOptions(AdapterOptions):
    """The catalog options of an mflux image model."""

    family: Family = "flux2-klein-4b"  # the mflux registry key: pipeline and defaults
    # unset: the family's (1.0 for FLUX.2-klein and ERNIE-Image-Turbo, 4.0 for Z-Image; the
    # FLUX.2-klein base models use classifier-free guidance, e.g. 4.0)
    guidance: float | None = None
    max_side: Positive = 2048  # the largest width / height a request may ask for
    max_steps: Positive = 100


class MfluxImageAdapter(ModelAdapter):
    """Text to image with mflux's FLUX.2-klein, Z-Image and ERNIE-Image pipelines. Options
    (:class:`MfluxOptions`): ``family`` (an mflux registry key, see FAMILIES), ``guidance``
    (unset: the family's), ``max_side`` (the largest width/height accepted) and
    ``max_steps``."""

    supported_tasks: ClassVar[frozenset[Task]] = frozenset({Task.IMAGE_GENERATION})
    formats: ClassVar[frozenset[str]] = frozenset({"diffusers"})
    backend: ClassVar[str] = "mlx"
    requires: ClassVar[tuple[str, ...]] = ("mflux",)
    Options: ClassVar[type[AdapterOptions]] = MfluxOptions
    options: MfluxOptions

    def __init__(self, spec):
        super().__init__(spec)
        self._pipeline = None

    # --- lifecycle -------------------------------------------------------------------

    def prepare(self, source_dir: Path, out_dir: Path, progress: Progress) -> None:
        check_layout(source_dir, self.options.family)
        files = [path for name in (*COMPONENTS, "tokenizer") for path in
                 sorted((source_dir / name).rglob("*")) if path.is_file()]
        files += [source_dir / name for name in ("model_index.json",)
                  if (source_dir / name).is_file()]
        for done, path in enumerate(files, 1):
            link_or_copy(path, out_dir / path.relative_to(source_dir))
            progress("link checkpoint", done, len(files))

    def _load(self, model_dir: Path) -> None:
        import mlx.core as mx

        pipeline = load_pipeline(self.options.family, model_dir)
        # mflux leaves the weights lazy: read them now, so that the load costs what it costs
        # and the memory shows before the first request.
        mx.eval(pipeline.parameters())
        self._pipeline = pipeline

    def _unload(self) -> None:
        self._pipeline = None

    # --- serving ---------------------------------------------------------------------

    def check(self, request: ImageRequest) -> None:
        """Refuse what this model cannot draw, naming the limit."""
        validate_request(request)
        width, height, limits = request.width, request.height, self.options
        if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
            raise ContractError(f"image size {width}x{height}: width and height must be "
                                f"multiples of {SIZE_MULTIPLE} for {self.spec.name}")
        if not (SIZE_MULTIPLE <= min(width, height) and max(width, height) <= limits.max_side):
            raise ContractError(f"image size {width}x{height} is outside {SIZE_MULTIPLE}-"
                                f"{limits.max_side} pixels a side for {self.spec.name}")
        if not MIN_STEPS <= request.steps <= limits.max_steps:
            raise ContractError(f"steps must be {MIN_STEPS}-{limits.max_steps}, "
                                f"got {request.steps}")
        if not 0 <= request.seed <= MAX_SEED:
            raise ContractError(f"seed must be 0-{MAX_SEED}, got {request.seed}")

    def generate_image(self, request: ImageRequest) -> Image:
        """The image the model draws for ``request``: uint8 (height, width, 3); the same
        request (seed included) gives the same pixels."""
        self.check(request)
        if self._pipeline is None:
            raise self.not_loaded()
        guidance = self.options.guidance
        generated = self._pipeline.generate_image(
            seed=request.seed, prompt=request.prompt, num_inference_steps=request.steps,
            height=request.height, width=request.width,
            guidance=BY_FAMILY[self.options.family].guidance if guidance is None else guidance)
        pixels = np.ascontiguousarray(np.asarray(generated.image.convert("RGB"), dtype=np.uint8))
        if pixels.shape != (request.height, request.width, 3):
            raise ServerError(f"mflux returned an image of shape {pixels.shape} for "
                               f"{request.width}x{request.height}")
        return Image(pixels)
