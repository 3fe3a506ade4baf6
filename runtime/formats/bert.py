"""A Hugging Face BERT sentence-embedding checkpoint (all-MiniLM-L6-v2 and kin), engine-neutral:
its files, its config, its tokenizer, and how texts become padded batches.

XLM-RoBERTa and RoBERTa checkpoints (``model_type`` "xlm-roberta", "roberta") are the same
encoder but for two things: positions count from ``pad_token_id + 1`` (:func:`position_offset`),
and their one token type is always 0 (their tokenizer says so). How token states become a
sentence vector is :mod:`mofa_omni.formats.sentence_transformers`.

Every BERT adapter (MLX, ONNX Runtime) reads the same files and feeds its encoder the same
token ids, so that they embed alike; only the encoder differs. The weights are one
``model.safetensors`` or shards listed by ``model.safetensors.index.json`` (as transformers
writes a large checkpoint, and as a sharded PyTorch checkpoint is converted: see
mofa_omni.models.by_name).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from mofa_omni.contract.errors import ModelLoadError
from mofa_omni.models.fetching import Progress

FILES = ("config.json", "tokenizer.json")  # besides the weights (weight_files)
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # which shard holds each tensor
# Model types whose position ids start after the padding index (fairseq's convention).
OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "camembert"})
# Prefixes of the encoder's tensors in a *Model / *ForSequenceClassification checkpoint.
ENCODER_PREFIXES = ("bert.", "roberta.")
CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings", "vocab_size")


def read_config(path: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json``; ModelLoadError naming what is unreadable or missing."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        missing = [key for key in CONFIG_KEYS if not isinstance(config.get(key), int)]
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"BERT config {path} is unreadable: {error}") from None
    if missing:
        raise ModelLoadError(f"BERT config {path} lacks {', '.join(missing)}")
    return config


def position_offset(config: dict[str, Any]) -> int:
    """Where position ids start: ``pad_token_id + 1`` for (XLM-)RoBERTa, else 0."""
    if config.get("model_type") in OFFSET_POSITIONS:
        return int(config.get("pad_token_id", 1)) + 1
    return 0


def encoder_name(name: str) -> str:
    """A checkpoint tensor's name without a ``bert.``/``roberta.`` prefix."""
    for prefix in ENCODER_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def check_checkpoint(model: str, source_dir: Path) -> dict[str, Any]:
    """The config of the BERT checkpoint in ``source_dir``, once its files are all there."""
    for name in FILES:
        if not (source_dir / name).is_file():
            raise ModelLoadError(f"model {model!r}: {name} is missing from {source_dir}")
    weight_files(model, source_dir)
    return read_config(source_dir / "config.json")


def weight_files(model: str, folder: Path) -> list[str]:
    """The names of the checkpoint's weight files in ``folder``: ``model.safetensors``, or the
    index and the shards it lists (each a file beside it)."""
    if (folder / WEIGHTS).is_file():
        return [WEIGHTS]
    if not (folder / WEIGHTS_INDEX).is_file():
        raise ModelLoadError(f"model {model!r}: neither {WEIGHTS} nor {WEIGHTS_INDEX} is in "
                             f"{folder}")
    return [WEIGHTS_INDEX, *sorted(set(_weight_map(model, folder).values()))]


def _weight_map(model: str, folder: Path) -> dict[str, str]:
    """The index's tensor -> shard map; a shard that is not a plain file beside the index (a
    path, ``..``) or is missing is refused."""
    try:
        weight_map = json.loads((folder / WEIGHTS_INDEX).read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError("its weight_map is not a non-empty object")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelLoadError(f"model {model!r}: {folder / WEIGHTS_INDEX} is unreadable: "
                             f"{error}") from None
    for shard in set(weight_map.values()):
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise ModelLoadError(f"model {model!r}: {WEIGHTS_INDEX} names the shard {shard!r}; "
                                 "shards are files beside it")
        if not (folder / shard).is_file():
            raise ModelLoadError(f"model {model!r}: the shard {shard} that {WEIGHTS_INDEX} "
                                 f"lists is missing from {folder}")
    return weight_map


Tensor = TypeVar("Tensor")


def read_tensors(model: str, folder: Path, load: Callable[[Path], Mapping[str, Tensor]]
                 ) -> dict[str, Tensor]:
    """Every tensor of the checkpoint in ``folder``, under its own name, each file read by
    ``load`` (safetensors.numpy's ``load_file``, ``mx.load``); a sharded checkpoint's tensors
    must be where its index says, and in one shard only."""
    names = weight_files(model, folder)
    if names == [WEIGHTS]:
        return dict(load(folder / WEIGHTS))
    weight_map, tensors = _weight_map(model, folder), {}
    for shard in names[1:]:
        for name, value in load(folder / shard).items():
            if name in tensors:
                raise ModelLoadError(f"model {model!r}: {name} is in two shards")
            if weight_map.get(name, shard) != shard:
                raise ModelLoadError(f"model {model!r}: {name} is in {shard}, but "
                                     f"{WEIGHTS_INDEX} lists it in {weight_map[name]}")
            tensors[name] = value
    if missing := sorted(weight_map.keys() - tensors.keys()):
        raise ModelLoadError(f"model {model!r}: {', '.join(missing[:5])} listed in "
                             f"{WEIGHTS_INDEX} but in no shard")
    return tensors


def copy_files(source_dir: Path, out_dir: Path, names: tuple[str, ...] | list[str],
               progress: Progress) -> None:
    for name in names:
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)  # 1_Pooling/config.json
        shutil.copyfile(source_dir / name, out_dir / name)
        progress(f"copy {name}", 1, 1)


def load_tokenizer(model_dir: Path, config: dict[str, Any], max_length: int | None = None):
    """``(tokenizer, max_length)``: ``tokenizer.json`` truncating where it says (128 for MiniLM,
    its training length; sentence-transformers allows 256), or at ``max_length`` (the model's
    ``max_length`` option), never beyond the encoder's positions; no padding (batches are padded
    to their longest)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    positions = config["max_position_embeddings"] - position_offset(config)
    truncation = (tokenizer.truncation or {}).get("max_length") or positions
    max_length = min(max_length or truncation, positions)
    tokenizer.enable_truncation(max_length)
    tokenizer.no_padding()
    return tokenizer, max_length


def encode(tokenizer, texts: list[str], prefix: str = "") -> list:
    """The encodings of ``texts``, each after ``prefix`` (a prompt such as E5's "query: ")."""
    return tokenizer.encode_batch([prefix + text for text in texts] if prefix else texts)


def length_batches(lengths: list[int], batch_size: int) -> tuple[list[int], list[list[int]]]:
    """``(order, batches)``: text indices sorted by length, cut into batches, so that texts of
    similar length share a batch and little compute goes into padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return order, [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def padded(encodings: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, type_ids, attention_mask)`` as int64 (batch, longest) arrays, zero-padded."""
    width = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), width), np.int64)
    types, mask = np.zeros_like(ids), np.zeros_like(ids)
    for row, e in enumerate(encodings):
        n = len(e.ids)
        ids[row, :n], types[row, :n], mask[row, :n] = e.ids, e.type_ids, 1
    return ids, types, mask
