"""What a model is, read from its own files: a proposed catalog entry for a local file or folder.

:func:`detect` looks at a GGUF file (or a folder holding one), a Hugging Face / MLX checkpoint
folder (``config.json``), a sentence-transformers folder, a CTranslate2 Whisper folder, a
diffusers folder (FLUX.2-klein, Z-Image, ERNIE-Image, Wan 2.2 TI2V) or a Piper voice, and proposes a :class:`~mofa_omni.models.catalog.ModelSpec`
for it: the adapters that can serve it (``mofa_omni.adapters.backends`` still picks one per
machine), its tasks, format, options and a memory estimate from the size of its weights (the
scheduler replaces the estimate with what loading really costs). Nothing is loaded: only
metadata (GGUF headers, JSON files) and file sizes are read. A folder whose weights are
PyTorch pickles only is reported with ``torch_weights`` set: :mod:`mofa_omni.models.by_name`
converts them to safetensors once before registering it.

Anything that fits no engine raises :class:`~mofa_omni.contract.errors.ContractError` saying
what was found and which engines serve what.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import Task
from mofa_omni.formats.json_files import read_json_object
from mofa_omni.models.catalog import ModelSpec, PathSource, Source

CHAT_LM_ADAPTERS = ("mlx_lm", "llama_cpp", "ct2_lm")
# CTranslate2's decoder spec is built for Llama-layout weights only (adapters/ct2_lm.py).
CT2_LM_ARCHITECTURES = frozenset({"llama"})
BERT_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta"})  # formats/bert.py reads these
# One file, or shards as transformers writes them (pytorch_model-00001-of-00002.bin ... beside
# pytorch_model.bin.index.json).
TORCH_WEIGHTS = ("pytorch_model.bin", "pytorch_model-*-of-*.bin", "*.pt", "*.pth")
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".npz", ".onnx", ".pt", ".pth")
# What each engine serves, for the error when nothing fits.
ENGINES = (
    ("GGUF (llama, gemma3)", "mlx_lm / llama_cpp / ct2_lm", "text_generation, rerank"),
    ("MLX / HF LLM folder (config.json)", "mlx_lm", "text_generation, rerank"),
    ("MLX VLM folder (vision_config)", "mlx_vlm", "vision_language, text_generation"),
    ("MLX omni folder (audio_config: Qwen3-Omni)", "mlx_omni",
     "omni, vision_language, text_generation"),
    ("BERT / XLM-R (sentence-transformers)", "mlx_bert / ort_bert", "embedding, rerank"),
    ("*ForSequenceClassification, 1 label", "ort_cross_encoder / mlx_cross_encoder", "rerank"),
    ("Whisper (MLX weights or CTranslate2)", "mlx_whisper / ct2_whisper", "speech_recognition"),
    ("diffusers FLUX.2 / Z-Image / ERNIE-Image", "mflux_image", "image_generation"),
    ("diffusers Wan 2.2 TI2V (model_index.json)", "mlx_wan", "video_generation"),
    ("Piper voice (.onnx + .onnx.json)", "piper", "speech_synthesis"),
    ("Moonshine (encoder/decoder .ort/.onnx + tokenizer.bin)", "ort_moonshine",
     "speech_recognition"),
    ("Kokoro (one .onnx + vocab.json + voice .npz)", "kokoro", "speech_synthesis"),
)
# Memory estimate: weights on disk x factor + MB of libraries, by kind (rough; calibrated on the
# packaged models' measured figures: a Q4 GGUF grows ~6x dequantized to float32 for MLX).
_MEMORY = {"gguf": (6.0, 100), "mlx_lm": (1.3, 200), "vlm": (1.3, 300), "embedding": (1.2, 40),
           "cross_encoder": (1.2, 40), "whisper": (2.0, 300), "image": (1.2, 500),
           "video": (1.2, 1000),  # plus the decode's frames, which the adapter checks per request
           "piper": (1.5, 80),
           "moonshine": (8.0, 80),  # int8 .ort files run in float32 (base: 60 MB -> 556 MiB)
           "kokoro": (1.5, 160)}  # int8 v1.0: 90 MB of files, 300 MiB peak on a long sentence


@dataclass(frozen=True)
class Detected:
    """What :func:`detect` found: ``kind`` (gguf, mlx_lm, vlm, omni, embedding, cross_encoder, whisper,
    image, video, piper, moonshine, kokoro), the ``architecture`` its files name, the proposed ``spec``,
    ``notes`` for the user, ``detected`` facts the adapters may not use yet (e.g. a
    sentence-transformers pooling mode) and ``torch_weights``: PyTorch files that must become
    safetensors before it serves."""

    kind: str
    architecture: str
    spec: ModelSpec
    notes: tuple[str, ...] = ()
    detected: dict[str, Any] = field(default_factory=dict)
    torch_weights: tuple[Path, ...] = ()


def safe_name(text: str) -> str:
    """A catalog name from a file or folder name: lower case, ``[a-z0-9._-]``, no suffix."""
    stem = Path(text.rstrip("/")).name
    for suffix in (".gguf", ".onnx"):
        stem = stem.removesuffix(suffix)
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.")
    if not name:
        raise ContractError(f"cannot derive a model name from {text!r}: pass --name")
    return name


def engines_table() -> str:
    """The formats each engine serves, one line each (for errors)."""
    return "\n".join(f"  {what:40} -> {adapters:26} {tasks}" for what, adapters, tasks in ENGINES)


def detect(path: Path, name: str | None = None, source: Source | None = None) -> Detected:
    """Propose a catalog entry for the model at ``path`` (a file or a folder), named ``name``
    (default: from the path) with ``source`` (default: the path itself). ContractError when the
    files fit no engine, naming what was found."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ContractError(f"{path} does not exist")
    name = name or safe_name(str(path))
    if path.is_file():
        if path.suffix == ".gguf":
            return _gguf(path, name, source or PathSource(path.resolve()))
        if path.suffix == ".onnx" and path.with_name(path.name + ".json").is_file():
            return _piper(path.parent, name, source or PathSource(path.parent.resolve()))
        raise _nothing_fits(path, f"a file {path.name}")
    source = source or PathSource(path.resolve())
    ggufs = [file for file in sorted(path.glob("*.gguf")) if not _later_split_part(file)]
    if ggufs:
        if len(ggufs) > 1:
            raise ContractError(f"{path} holds several GGUF files ({', '.join(p.name for p in ggufs)}):"
                                f" name the one to serve (the file itself)")
        return _gguf(ggufs[0], name, source)
    if (path / "tokenizer.bin").is_file() and any(path.glob("decoder_model_merged.*")):
        return _moonshine(path, name, source)
    if (path / "model_index.json").is_file():
        return _diffusers(path, name, source)
    if (path / "config.json").is_file():
        return _config_folder(path, name, source)
    voices = sorted(path.glob("*.onnx"))
    if len(voices) == 1 and voices[0].with_name(voices[0].name + ".json").is_file():
        return _piper(path, name, source)
    if len(voices) == 1 and (path / "vocab.json").is_file() and any(path.glob("*.npz")):
        return _kokoro(path, voices[0], name, source)
    raise _nothing_fits(path, "no config.json, model_index.json, GGUF, Piper voice or Kokoro model")


# --- kinds ---------------------------------------------------------------------------------

def _later_split_part(file: Path) -> bool:
    """A second (third...) part of a split GGUF model: it goes with the first."""
    from mofa_omni.formats.gguf import SPLIT_PART

    return bool((match := SPLIT_PART.match(file.name)) and int(match["no"]) > 1)


def _gguf(file: Path, name: str, source: Source) -> Detected:
    from mofa_omni.contract.errors import ModelLoadError
    from mofa_omni.formats.gguf import ARCHITECTURES, gguf_parts

    try:
        parts = gguf_parts(file)  # a split model: all its parts, which must be there
    except ModelLoadError as error:
        raise ContractError(str(error)) from None
    arch = _gguf_architecture(file)
    if arch not in ARCHITECTURES:
        raise ContractError(f"{file.name}: GGUF architecture {arch!r} is served by no engine here;"
                            f" the GGUF readers know {', '.join(sorted(ARCHITECTURES))}")
    adapters = tuple(a for a in CHAT_LM_ADAPTERS if a != "ct2_lm" or arch in CT2_LM_ARCHITECTURES)
    split = f", split in {len(parts)} parts" if len(parts) > 1 else ""
    spec = _spec(name, adapters, (Task.TEXT_GENERATION, Task.RERANK), "gguf", source,
                 _memory("gguf", parts), f"{file.name} (GGUF, {arch}{split})")
    return Detected("gguf", arch, spec, (f"served by {', '.join(adapters)}",))


def _gguf_architecture(file: Path) -> str:
    from mofa_omni.formats.gguf_file import GGUFFile

    try:
        header = GGUFFile(file)  # reads the metadata and tensor index; data stays mapped
        field_ = header.fields.get("general.architecture")
        if field_ is None:
            raise ContractError(f"{file.name}: GGUF without general.architecture")
        return str(field_.contents())
    except ContractError:
        raise
    except Exception as error:  # the reader fails with ValueError/IndexError/struct.error
        raise ContractError(f"{file.name} is not a readable GGUF file: "
                            f"{type(error).__name__}: {error}") from None


def _config_folder(path: Path, name: str, source: Source) -> Detected:
    config = _read_json(path / "config.json")
    model_type = str(config.get("model_type", ""))
    architectures = [str(a) for a in config.get("architectures") or []]
    arch = architectures[0] if architectures else model_type
    if (path / "model.bin").is_file() and ("alignment_heads" in config or "suppress_ids" in config):
        spec = _spec(name, ("mlx_whisper", "ct2_whisper"), (Task.SPEECH_RECOGNITION,),
                     "ctranslate2", source, _memory("whisper", [path / "model.bin"]),
                     "Whisper (CTranslate2)")
        return Detected("whisper", "whisper (ctranslate2)", spec)
    torch = _torch_files(path)
    weights = _weights(path) or torch
    if not weights:
        raise _nothing_fits(path, f"config.json ({arch or 'no model_type'}) but no weights")
    if model_type == "whisper" or "n_audio_ctx" in config:
        if not any((path / f).is_file() for f in ("weights.safetensors", "weights.npz")):
            raise ContractError(f"{path}: a Transformers Whisper checkpoint; the whisper adapters "
                                f"read MLX weights (weights.safetensors, mlx_whisper's convert) or "
                                f"a CTranslate2 folder (ct2-transformers-converter)")
        spec = _spec(name, ("mlx_whisper",), (Task.SPEECH_RECOGNITION,), "mlx", source,
                     _memory("whisper", weights), "Whisper (MLX)")
        return Detected("whisper", "whisper", spec)
    convert = tuple(torch) if not _weights(path) else ()
    notes = (("PyTorch weights: converted to safetensors once, when registered",) if convert
             else ())
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return _cross_encoder(path, name, source, config, arch, weights, convert, notes)
    if model_type in BERT_MODEL_TYPES:
        detected = _sentence_pipeline(path)
        spec = _spec(name, ("mlx_bert", "ort_bert"), (Task.EMBEDDING, Task.RERANK), "safetensors",
                     source, _memory("embedding", weights),
                     f"{arch} sentence embeddings; detected {_describe(detected)}")
        return Detected("embedding", arch, spec, notes, detected, convert)
    if _hears(config) and _has_module("mlx_vlm", model_type):
        spec = _spec(name, ("mlx_omni",), (Task.OMNI, Task.VISION_LANGUAGE,
                                           Task.TEXT_GENERATION), "mlx",
                     source, _memory("vlm", weights), f"{arch} omni: sound, pictures and text "
                                                      "in, text and speech out (mlx-vlm)")
        return Detected("omni", arch, spec, notes, torch_weights=convert)
    if "vision_config" in config and _has_module("mlx_vlm", model_type):
        spec = _spec(name, ("mlx_vlm",), (Task.VISION_LANGUAGE, Task.TEXT_GENERATION), "mlx",
                     source, _memory("vlm", weights), f"{arch} vision-language (mlx-vlm)")
        return Detected("vlm", arch, spec, notes, torch_weights=convert)
    if _has_module("mlx_lm", model_type):
        spec = _spec(name, ("mlx_lm",), (Task.TEXT_GENERATION, Task.RERANK), "mlx", source,
                     _memory("mlx_lm", weights), f"{arch} (mlx-lm)")
        return Detected("mlx_lm", arch, spec, notes, torch_weights=convert)
    raise _nothing_fits(path, f"config.json: architecture {arch or '?'}, "
                              f"model_type {model_type or '?'}")


def _cross_encoder(path: Path, name: str, source: Source, config: dict, arch: str,
                   weights: list[Path], convert: tuple[Path, ...], notes: tuple[str, ...]
                   ) -> Detected:
    labels = config.get("num_labels") or len(config.get("id2label") or {}) or 1
    if labels != 1:
        raise ContractError(f"{path}: {arch} with {labels} labels is a classifier, not a "
                            f"cross-encoder (one relevance logit); no adapter serves it")
    from mofa_omni.adapters.base import adapter_names

    adapters = tuple(a for a in adapter_names() if a.endswith("cross_encoder"))
    if not adapters:
        raise ContractError(f"{path}: found a cross-encoder ({arch}); no adapter serves it yet")
    spec = _spec(name, adapters, (Task.RERANK,), "safetensors", source,
                 _memory("cross_encoder", weights), f"{arch} cross-encoder reranker")
    return Detected("cross_encoder", arch, spec, notes, torch_weights=convert)


def _diffusers(path: Path, name: str, source: Source) -> Detected:
    from dataclasses import replace

    index = _read_json(path / "model_index.json")
    pipeline = str(index.get("_class_name", ""))
    weights = sorted(path.rglob("*.safetensors"))
    if pipeline.startswith("Wan"):  # WanPipeline, WanImageToVideoPipeline: both TI2V here
        spec = _spec(name, ("mlx_wan",), (Task.VIDEO_GENERATION,), "diffusers", source,
                     _memory("video", weights), f"{pipeline} (diffusers, mlx-gen)")
        return Detected("video", pipeline, spec, ("Wan 2.2 TI2V assumed: mlx_wan serves its "
                                                  "text-to-video and image-to-video",))
    # The pipeline class -> mflux_image's family (an mlx-gen registry key) and a note on it.
    if pipeline.startswith("Flux2"):
        family, note = "flux2-klein-4b", ("family flux2-klein-4b assumed (options.family picks "
                                          "another mflux pipeline; a base model wants guidance "
                                          "~4.0)")
    elif pipeline == "ZImagePipeline":
        family, note = "z-image-turbo", ("family z-image-turbo assumed (options.family = "
                                         "\"z-image\" for the base model, which draws with "
                                         "guidance and more steps)")
    elif pipeline == "ErnieImagePipeline":
        family, note = "ernie-image-turbo", ("family ernie-image-turbo (mflux's ERNIE-Image "
                                             "pipeline; the prompt enhancer, pe/, is not used)")
    else:
        raise _nothing_fits(path, f"a diffusers pipeline {pipeline or '?'} (mflux_image serves "
                                  f"FLUX.2-klein, Z-Image and ERNIE-Image, mlx_wan Wan 2.2 TI2V)")
    # What the adapter loads: not ERNIE-Image's prompt enhancer (pe/, a second language model)
    served = [w for w in weights if w.relative_to(path).parts[0] in ("transformer", "text_encoder",
                                                                     "vae")]
    spec = _spec(name, ("mflux_image",), (Task.IMAGE_GENERATION,), "diffusers", source,
                 _memory("image", served), f"{pipeline} (diffusers, mflux)")
    return Detected("image", pipeline, replace(spec, options={"family": family}), (note,))


def _piper(path: Path, name: str, source: Source) -> Detected:
    voices = sorted(path.glob("*.onnx"))
    if len(voices) != 1:
        raise ContractError(f"{path}: expected one Piper voice (.onnx), found "
                            f"{', '.join(v.name for v in voices) or 'none'}")
    config = _read_json(voices[0].with_name(voices[0].name + ".json"))
    if "audio" not in config or "phoneme_id_map" not in config:
        raise _nothing_fits(path, f"{voices[0].name} with a .onnx.json that is no Piper config")
    spec = _spec(name, ("piper",), (Task.SPEECH_SYNTHESIS,), "onnx", source,
                 _memory("piper", voices), f"Piper voice {voices[0].stem}")
    return Detected("piper", "piper", spec)


def _moonshine(path: Path, name: str, source: Source) -> Detected:
    graphs = [p for p in path.iterdir()
              if p.stem in ("encoder_model", "decoder_model_merged") and p.suffix in (".ort", ".onnx")]
    if {p.stem for p in graphs} != {"encoder_model", "decoder_model_merged"}:
        raise _nothing_fits(path, "tokenizer.bin and decoder_model_merged without encoder_model")
    spec = _spec(name, ("ort_moonshine",), (Task.SPEECH_RECOGNITION,), "onnx", source,
                 _memory("moonshine", graphs), "Moonshine speech recognition")
    return Detected("moonshine", "moonshine", spec)


def _kokoro(path: Path, graph: Path, name: str, source: Source) -> Detected:
    if "vocab" not in _read_json(path / "vocab.json"):
        raise _nothing_fits(path, f"{graph.name} with a vocab.json that is no Kokoro vocabulary")
    files = [graph, *path.glob("*.npz")]
    spec = _spec(name, ("kokoro",), (Task.SPEECH_SYNTHESIS,), "onnx", source,
                 _memory("kokoro", files), f"Kokoro speech synthesis {graph.stem}")
    return Detected("kokoro", "kokoro", spec)


# --- helpers -------------------------------------------------------------------------------

def _spec(name: str, adapters: tuple[str, ...], tasks: tuple[Task, ...], format_: str,
          source: Source, memory_mb: int, description: str) -> ModelSpec:
    return ModelSpec(name=name, adapter=adapters[0], adapters=adapters, tasks=tasks,
                     format=format_, source=source, memory_mb=memory_mb,
                     description=f"{description} (detected from its files)")


def _memory(kind: str, files: list[Path]) -> int:
    factor, overhead = _MEMORY[kind]
    size = sum(f.stat().st_size for f in files if f.is_file())
    return int(size * factor / (1 << 20)) + overhead


def _weights(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir()
                  if p.suffix in (".safetensors", ".npz") and p.is_file())


def _hears(config: dict) -> bool:
    """An omni checkpoint: an audio encoder, at the top or in its thinker (Qwen3-Omni)."""
    return "audio_config" in config or "audio_config" in (config.get("thinker_config") or {})


def _torch_files(path: Path) -> list[Path]:
    return sorted({p for pattern in TORCH_WEIGHTS for p in path.glob(pattern) if p.is_file()})


def _has_module(package: str, model_type: str) -> bool:
    """Whether ``package`` (mlx_lm / mlx_vlm) has a model class for ``model_type``."""
    if not model_type or importlib.util.find_spec(package) is None:
        return False
    remap = importlib.import_module(f"{package}.utils").__dict__.get("MODEL_REMAPPING", {})
    module = remap.get(model_type, model_type).replace("-", "_")
    try:
        return importlib.util.find_spec(f"{package}.models.{module}") is not None
    except (ImportError, ValueError):
        return False


def _sentence_pipeline(path: Path) -> dict[str, Any]:
    """Pooling, normalization and prompts as the sentence-transformers files say (defaults
    without them: mean pooling, unit vectors)."""
    from mofa_omni.contract.errors import ModelLoadError
    from mofa_omni.formats.sentence_transformers import read_pipeline

    try:
        pipeline = read_pipeline(path)
    except ModelLoadError as error:
        raise ContractError(str(error)) from None
    prompts = {str(k): v for k, v in pipeline.prefixes.items() if v}
    return {"pooling": "+".join(pipeline.pooling), "normalize": pipeline.normalize,
            "prompts": prompts, "sentence_transformers": (path / "modules.json").is_file()}


def _describe(detected: dict[str, Any]) -> str:
    text = f"pooling {detected['pooling']}, normalize {str(detected['normalize']).lower()}"
    if detected["prompts"]:
        text += ", prompts " + ", ".join(f"{k}={v!r}" for k, v in detected["prompts"].items())
    return text


def _nothing_fits(path: Path, found: str) -> ContractError:
    files = sorted(p.name for p in path.iterdir())[:12] if path.is_dir() else [path.name]
    return ContractError(f"{path}: no engine here serves this model. Found: {found}; files: "
                         f"{', '.join(files) or 'none'}.\nWhat the engines serve:\n"
                         f"{engines_table()}")


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, ContractError)  # a folder that is not a model: the caller's
