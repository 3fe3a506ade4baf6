"""How a sentence-transformers checkpoint turns token states into a sentence vector, read from
its own files, engine-neutral:

* ``modules.json``: the module pipeline (Transformer, then Pooling, then Normalize if the vectors
  are unit length); a module this runtime does not run (a Dense projection, say) is refused;
* ``1_Pooling/config.json`` (the Pooling module's folder, as ``modules.json`` names it): which
  tokens are pooled (``pooling_mode_cls_token``, ``_mean_tokens``, ``_max_tokens``,
  ``_mean_sqrt_len_tokens``, ``_lasttoken``; several at once are concatenated in that order, as
  sentence-transformers does);
* ``config_sentence_transformers.json``: ``prompts`` (E5's ``{"query": "query: ", "passage":
  "passage: "}``) and ``default_prompt_name``.

A checkpoint without these files (all-MiniLM-L6-v2 as the catalog fetches it) is mean-pooled and
L2-normalised, what its sentence-transformers files would say. Catalog options
(:class:`~mofa_omni.adapters.options.BertOptions`) override what the files say. Every BERT
adapter pools with :func:`pool` on the encoder's token states, so all embed alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mofa_omni.contract.errors import ModelLoadError

MODULES = "modules.json"
PROMPTS = "config_sentence_transformers.json"
# sentence-transformers' order when a Pooling config turns several modes on.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len", "lasttoken")
_MODE_KEYS = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
              "mean": "pooling_mode_mean_tokens", "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
              "lasttoken": "pooling_mode_lasttoken"}
_RUNS = {"Transformer", "Pooling", "Normalize"}
# What each request input type is called among a checkpoint's prompts, first found wins.
_PROMPT_NAMES = {"query": ("query",), "document": ("document", "passage", "corpus", "doc")}


@dataclass(frozen=True)
class SentencePipeline:
    """Pooling modes, whether vectors are made unit length, and the prompt put before a text of
    each input type (``None``: the request does not say)."""

    pooling: tuple[str, ...] = ("mean",)
    normalize: bool = True
    prefixes: dict[str | None, str] = field(default_factory=dict)

    def prefix(self, input_type: str | None) -> str:
        """The text put before each text of ``input_type`` ("query", "document" or None)."""
        return self.prefixes.get(input_type, "")

    def with_options(self, pooling: str | None = None, normalize: bool | None = None,
                     query_prefix: str | None = None,
                     document_prefix: str | None = None) -> SentencePipeline:
        """This pipeline with what the catalog entry's options set (unset: as the files say)."""
        prefixes = dict(self.prefixes)
        if query_prefix is not None:
            prefixes["query"] = query_prefix
        if document_prefix is not None:
            prefixes["document"] = document_prefix
        return replace(self, pooling=(pooling,) if pooling else self.pooling,
                       normalize=self.normalize if normalize is None else normalize,
                       prefixes=prefixes)


def files_of(model_dir: Path) -> list[str]:
    """The sentence-transformers files of the checkpoint in ``model_dir`` (relative names), for
    ``prepare`` to copy along: none if it has no ``modules.json``."""
    names = [name for name in (MODULES, PROMPTS) if (model_dir / name).is_file()]
    for module in _modules(model_dir):
        if module.get("type", "").endswith("Pooling"):
            names.append(f"{module.get('path', '')}/config.json".lstrip("/"))
    return names


def read_pipeline(model_dir: Path) -> SentencePipeline:
    """The pipeline the checkpoint's sentence-transformers files describe; ModelLoadError naming
    the file and what this runtime cannot do (a module it does not run, a pooling mode it does
    not know, an unreadable file)."""
    pooling, normalize = ("mean",), True
    modules = _modules(model_dir)
    if modules:
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
        unknown = [kind for kind in kinds if kind not in _RUNS]
        if unknown:
            raise ModelLoadError(f"{model_dir / MODULES}: module {unknown[0]} is not supported "
                                 f"(supported: {', '.join(sorted(_RUNS))})")
        normalize = "Normalize" in kinds
        for module, kind in zip(modules, kinds, strict=True):
            if kind == "Pooling":
                pooling = _pooling(model_dir / str(module.get("path", "")) / "config.json")
    return SentencePipeline(pooling, normalize, _prefixes(model_dir / PROMPTS))


def configured_pipeline(model_dir: Path, options: Any) -> SentencePipeline:
    """The pipeline of :func:`read_pipeline` with what ``options`` (a model's
    :class:`~mofa_omni.adapters.options.BertOptions`) set."""
    return read_pipeline(model_dir).with_options(options.pooling, options.normalize,
                                                 options.query_prefix, options.document_prefix)


def pool(states: np.ndarray, mask: np.ndarray, modes: tuple[str, ...],
         normalize: bool) -> np.ndarray:
    """Sentence vectors (batch, hidden * len(modes)) from token ``states`` (batch, tokens,
    hidden) of right-padded texts whose real tokens ``mask`` (batch, tokens) marks."""
    weights = mask[:, :, None].astype(np.float32)
    counts = np.maximum(weights.sum(axis=1), 1e-9)
    parts = []
    for mode in modes:
        if mode == "cls":
            parts.append(states[:, 0])
        elif mode == "max":
            parts.append(np.where(weights > 0, states, np.float32(-1e9)).max(axis=1))
        elif mode in ("mean", "mean_sqrt_len"):
            total = (states * weights).sum(axis=1)
            parts.append(total / (counts if mode == "mean" else np.sqrt(counts)))
        elif mode == "lasttoken":
            last = np.maximum(mask.sum(axis=1).astype(np.int64) - 1, 0)
            parts.append(states[np.arange(len(states)), last])
        else:
            raise ValueError(f"pooling mode {mode!r} is not one of {', '.join(POOLING_MODES)}")
    vectors = np.concatenate(parts, axis=1).astype(np.float32)
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, np.float32(1e-12))
    return vectors


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path} is unreadable: {error}") from None


def _modules(model_dir: Path) -> list[dict[str, Any]]:
    path = model_dir / MODULES
    if not path.is_file():
        return []
    modules = _read_json(path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ModelLoadError(f"{path}: expected a list of modules")
    return modules


def _pooling(path: Path) -> tuple[str, ...]:
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: expected an object")
    if config.get("pooling_mode_weightedmean_tokens"):
        raise ModelLoadError(f"{path}: pooling mode weightedmean is not supported "
                             f"(supported: {', '.join(POOLING_MODES)})")
    if config.get("include_prompt") is False:
        raise ModelLoadError(f"{path}: include_prompt = false (pooling without the prompt's "
                             "tokens) is not supported")
    modes = tuple(mode for mode in POOLING_MODES if config.get(_MODE_KEYS[mode]))
    if not modes:
        raise ModelLoadError(f"{path}: turns no pooling mode on")
    return modes


def _prefixes(path: Path) -> dict[str | None, str]:
    if not path.is_file():
        return {}
    config = _read_json(path)
    prompts = config.get("prompts") if isinstance(config, dict) else None
    if not prompts:
        return {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ModelLoadError(f"{path}: prompts must map names to strings")
    prefixes: dict[str | None, str] = {}
    for input_type, names in _PROMPT_NAMES.items():
        found = next((prompts[name] for name in names if name in prompts), None)
        if found is not None:
            prefixes[input_type] = found
    default = config.get("default_prompt_name")
    if default is not None:
        if default not in prompts:
            raise ModelLoadError(f"{path}: default_prompt_name {default!r} is not among the "
                                 f"prompts ({', '.join(prompts)})")
        prefixes[None] = prompts[default]
    return prefixes
