"""Image generation with mflux (MLX diffusion): FLUX.2-klein checkpoints in the diffusers layout.

The checkpoint is a Hugging Face diffusers directory (``transformer/``, ``text_encoder/``,
``vae/``, ``tokenizer/``) as ``black-forest-labs/FLUX.2-klein-4B`` ships it. mflux names its
built-in models by registry key; the family (``options.family``, default ``flux2-klein-4b``)
picks the pipeline and its defaults, and the sizes of the transformer and the text encoder come
from the checkpoint's own ``config.json`` files (for the published checkpoints they are the
values mflux's registry holds; a fine-tune or a small test model brings its own).
Weights are read once at load and evaluated, so the memory a loaded model holds is MLX's
active memory, which the scheduler sees; nothing is cached outside the adapter.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import numpy as np

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.options import AdapterOptions, Positive
from mofa_omni.contract.errors import ContractError, ModelLoadError, ServerError
from mofa_omni.contract.tasks import Image, ImageRequest, Task, validate_request
from mofa_omni.models.fetching import Progress
from mofa_omni.models.store import link_or_copy

# mflux registry keys served by its FLUX.2-klein text-to-image pipeline.
Family = Literal["flux2-klein-4b", "flux2-klein-9b", "flux2-klein-base-4b", "flux2-klein-base-9b"]
FAMILIES: tuple[str, ...] = get_args(Family)
COMPONENTS = ("transformer", "text_encoder", "vae")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
# FLUX.2-klein conditions on the hidden states of these text-encoder layers (fixed in mflux).
TEXT_LAYERS = (9, 18, 27)
SIZE_MULTIPLE = 16  # VAE downscale 8 x transformer patch 2
MAX_SEED = 2**63 - 1
MIN_STEPS = 2  # mlx-gen's flow-matching scheduler needs two steps


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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path} is unreadable: {error}") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return value


def check_layout(directory: Path) -> None:
    """Refuse a directory that is not a FLUX.2-klein diffusers checkpoint, naming what lacks."""
    missing = [f"{name}/config.json" for name in ("transformer", "text_encoder")
               if not (directory / name / "config.json").is_file()]
    missing += [f"{name}/*.safetensors" for name in COMPONENTS
                if not any((directory / name).glob("*.safetensors"))]
    if not any((directory / "tokenizer" / name).is_file() for name in TOKENIZER_FILES):
        missing.append("tokenizer/tokenizer.json")
    if missing:
        raise ModelLoadError(f"{directory} is not a FLUX.2-klein diffusers checkpoint: "
                             f"{', '.join(missing)} missing")


def model_config(family: str, directory: Path):
    """mflux's ModelConfig for ``family`` with the transformer and text-encoder sizes of the
    checkpoint in ``directory``."""
    from mflux.models.common.config.model_config import AVAILABLE_MODELS, ModelConfig
    from mflux.models.flux2.model.flux2_text_encoder.qwen3_text_encoder import Qwen3TextEncoder
    from mflux.models.flux2.model.flux2_transformer.transformer import Flux2Transformer

    transformer = constructor_arguments(
        Flux2Transformer, _read_json(directory / "transformer" / "config.json"))
    text_encoder = constructor_arguments(
        Qwen3TextEncoder, _read_json(directory / "text_encoder" / "config.json"))
    layers = text_encoder.get("num_hidden_layers", 0)
    if layers < max(TEXT_LAYERS):
        raise ModelLoadError(f"{directory}: FLUX.2-klein reads text-encoder layers "
                             f"{', '.join(map(str, TEXT_LAYERS))}; this text encoder has {layers}")
    width = text_encoder.get("hidden_size", 0) * len(TEXT_LAYERS)
    if transformer.get("joint_attention_dim") != width:
        raise ModelLoadError(f"{directory}: the transformer's joint_attention_dim "
                             f"{transformer.get('joint_attention_dim')} is not {len(TEXT_LAYERS)} "
                             f"x the text encoder's hidden_size ({width})")
    base = AVAILABLE_MODELS[family]
    fields = {key: value for key, value in vars(base).items() if not key.startswith("_")}
    fields["transformer_overrides"] = {**base.transformer_overrides, **transformer}
    fields["text_encoder_overrides"] = {**base.text_encoder_overrides, **text_encoder}
    return ModelConfig(**fields)


class MfluxOptions(AdapterOptions):
    """The catalog options of a FLUX.2-klein model."""

    family: Family = "flux2-klein-4b"  # the mflux registry key: pipeline and defaults
    # 1.0 for the distilled klein models; the base models use classifier-free guidance, e.g. 4.0
    guidance: float = 1.0
    max_side: Positive = 2048  # the largest width / height a request may ask for
    max_steps: Positive = 100


class MfluxImageAdapter(ModelAdapter):
    """Text to image with mflux's FLUX.2-klein pipeline. Options (:class:`MfluxOptions`):
    ``family`` (an mflux registry key, see FAMILIES), ``guidance`` (1.0 for the distilled klein
    models; the base models use classifier-free guidance, e.g. 4.0), ``max_side`` (the largest
    width/height accepted) and ``max_steps``."""

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
        check_layout(source_dir)
        files = [path for name in (*COMPONENTS, "tokenizer") for path in
                 sorted((source_dir / name).rglob("*")) if path.is_file()]
        files += [source_dir / name for name in ("model_index.json",)
                  if (source_dir / name).is_file()]
        for done, path in enumerate(files, 1):
            link_or_copy(path, out_dir / path.relative_to(source_dir))
            progress("link checkpoint", done, len(files))

    def _load(self, model_dir: Path) -> None:
        import mlx.core as mx
        from mflux.models.flux2.variants.txt2img.flux2_klein import Flux2Klein

        check_layout(model_dir)
        config = model_config(self.options.family, model_dir)
        pipeline = Flux2Klein(model_path=str(model_dir), model_config=config)
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
        generated = self._pipeline.generate_image(
            seed=request.seed, prompt=request.prompt, num_inference_steps=request.steps,
            height=request.height, width=request.width, guidance=self.options.guidance)
        pixels = np.ascontiguousarray(np.asarray(generated.image.convert("RGB"), dtype=np.uint8))
        if pixels.shape != (request.height, request.width, 3):
            raise ServerError(f"mflux returned an image of shape {pixels.shape} for "
                               f"{request.width}x{request.height}")
        return Image(pixels)
