"""A model named by what the user has: a catalog name, a local path, or ``hf:ORG/REPO[:FILE]``.

:func:`resolve_model_name` is the one place a model's name becomes a
:class:`~mofa_omni.models.catalog.ModelSpec` for ``omni pull``, ``--model``, an omni-node's
``MODEL`` and ``omni swap``. A path or a Hub name is read once (:mod:`mofa_omni.models.detect`)
and written to the user catalog as an ordinary entry, so that afterwards its name works
everywhere a catalog name does (ladders, the scheduler, the gateway's model ids).

Forms:

- ``NAME``: a catalog entry.
- ``./dir``, ``/abs/file.gguf``, ``~/voice.onnx``: weights on this machine (a ``path`` source).
- ``hf:ORG/REPO``, ``hf:ORG/REPO:FILE`` (one file of it, e.g. a GGUF), ``hf:ORG/REPO@REV``:
  fetched from the Hugging Face Hub by the store, then detected (an ``hf`` source).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from mofa_omni.contract.errors import ContractError
from mofa_omni.formats.json_files import read_json_object
from mofa_omni.models.catalog import (
    Catalog,
    HubSource,
    ModelSpec,
    PathSource,
    check_cache_name,
    write_user_entry,
)
from mofa_omni.models.detect import Detected, detect, safe_name
from mofa_omni.models.fetching import Progress, no_progress
from mofa_omni.models.store import ModelStore, link_or_copy

HUB_PREFIX = "hf:"
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_CONVERTED = ".converted"  # written last in a folder of converted PyTorch weights


def parse_hub_name(text: str) -> HubSource:
    """``hf:ORG/REPO[@REVISION][:FILE]`` as a HubSource; ContractError naming what is wrong."""
    if not text.startswith(HUB_PREFIX):
        raise ContractError(f"{text!r} is not a Hub name (hf:ORG/REPO or hf:ORG/REPO:FILE)")
    repo_part, _, file = text[len(HUB_PREFIX):].partition(":")
    repo, at, revision = repo_part.partition("@")
    if not _REPO.fullmatch(repo):
        raise ContractError(f"{text!r}: the repository must be ORG/REPO, got {repo!r}")
    if at and not revision:
        raise ContractError(f"{text!r}: an empty revision after '@'")
    if ":" in file or file.startswith("/") or ".." in Path(file).parts:
        raise ContractError(f"{text!r}: {file!r} is not a file of the repository")
    return HubSource(repo, _with_split_parts(file, text), revision or "main")


def _with_split_parts(file: str, text: str) -> tuple[str, ...]:
    """The files to fetch for ``file``: none (the whole repository), the file, or — the first
    part of a split GGUF — every part, which the first one's name counts."""
    from mofa_omni.formats.gguf import SPLIT_PART, split_part_name

    match = SPLIT_PART.match(Path(file).name) if file else None
    if match is None:
        return (file,) if file else ()
    if int(match["no"]) != 1:
        raise ContractError(f"{text!r}: {file} is part {int(match['no'])} of a split GGUF "
                            f"model: name its first part, {split_part_name(match, 1)}")
    folder = str(Path(file).parent) if Path(file).parent != Path(".") else ""
    return tuple(f"{folder}/{name}" if folder else name
                 for name in (split_part_name(match, n) for n in range(1, int(match["count"]) + 1)))


def looks_like_path(text: str) -> bool:
    """Whether ``text`` names a file or folder rather than a catalog entry."""
    return (text.startswith(("/", "./", "../", "~")) or os.sep in text
            or text.endswith((".gguf", ".onnx")) or Path(text).exists())


def resolve_model_name(text: str, catalog: Catalog, store: ModelStore | None = None, *,
                       name: str | None = None, force: bool = False,
                       progress: Progress = no_progress) -> ModelSpec:
    """The catalog entry ``text`` names. A path or ``hf:`` name is detected and registered in
    the user catalog (as ``name``, default derived from it) on first use, and added to
    ``catalog``; a different entry of that name is kept unless ``force``. Unknown catalog names
    raise CatalogError listing close matches."""
    if name is None and text in catalog.models:
        return catalog.models[text]
    if name is not None:
        check_cache_name("--name", name)  # before anything is fetched under it
    store = store or ModelStore()
    if text.startswith(HUB_PREFIX):
        source = parse_hub_name(text)
        name = name or _hub_name(source)
        known = catalog.models.get(name)
        if known is not None and not force and known.source == source:
            return known  # fetched and registered before
        spec = _from_hub(source, name, store, progress).spec
    elif looks_like_path(text):
        path = Path(text).expanduser().resolve()
        name = name or safe_name(str(path))
        known = catalog.models.get(name)
        if known is not None and not force and known.source == PathSource(path):
            return known  # registered before: nothing to read again
        spec = _from_path(path, name, store).spec
    elif name is not None and name != text:
        raise ContractError(f"{text!r} is a catalog name: a new name (--name {name}) is for a "
                            f"path or an hf:ORG/REPO model")
    else:
        return catalog.get(text)
    write_user_entry(spec, catalog, force=force)
    catalog.models[spec.name] = spec
    return spec


def _from_path(path: Path, name: str, store: ModelStore) -> Detected:
    found = detect(path, name)
    if found.torch_weights:
        converted = convert_torch_folder(path, found.torch_weights, store.root)
        found = detect(converted, name)
    return found


def _hub_name(source: HubSource) -> str:
    return safe_name(source.files[0] if source.files else source.repo.split("/")[-1])


def _from_hub(source: HubSource, name: str, store: ModelStore, progress: Progress) -> Detected:
    # The store needs a spec to fetch: the adapter and tasks are unknown until detection.
    provisional = ModelSpec(name=name, adapter="", tasks=(), format="", source=source,
                            memory_mb=0)
    fetched = store.fetch(provisional, progress)
    found = detect(fetched, name, source)
    if found.torch_weights:  # served from a converted copy on this machine
        found = detect(convert_torch_folder(fetched, found.torch_weights, store.root), name)
    return found


TORCH_INDEX = "pytorch_model.bin.index.json"  # which shard holds each tensor
SAFETENSORS_INDEX = "model.safetensors.index.json"


def safetensors_name(torch_file: str) -> str:
    """What a PyTorch weights file becomes: ``pytorch_model.bin`` -> ``model.safetensors``,
    a shard ``pytorch_model-00001-of-00002.bin`` -> ``model-00001-of-00002.safetensors`` (as
    transformers names them), ``x.pt`` -> ``x.safetensors``."""
    stem = Path(torch_file).stem
    return (stem.replace("pytorch_model", "model", 1) if stem.startswith("pytorch_model")
            else stem) + ".safetensors"


def convert_torch_folder(path: Path, torch_files: tuple[Path, ...], cache: Path) -> Path:
    """A copy of the checkpoint folder ``path`` (under ``cache``/sources, once) whose PyTorch
    weights are safetensors (:func:`safetensors_name`; a sharded checkpoint's index becomes
    ``model.safetensors.index.json``, each shard checked to hold what it lists), read without
    torch by :mod:`mofa_omni.formats.torch_checkpoint`; the other files are linked."""
    from mofa_omni.formats.torch_checkpoint import convert_to_safetensors

    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
    out = cache / "sources" / f"converted-{safe_name(path.name)}-{digest}"
    if (out / _CONVERTED).is_file():
        return out
    skip = {*torch_files, path / TORCH_INDEX}
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p not in skip):
        if ".cache" not in file.relative_to(path).parts and not (out / file.relative_to(path)).exists():
            link_or_copy(file, out / file.relative_to(path))
    held = {file.name: set(convert_to_safetensors(file, out / safetensors_name(file.name)))
            for file in torch_files}
    if (path / TORCH_INDEX).is_file():
        _convert_index(path / TORCH_INDEX, held, out / SAFETENSORS_INDEX)
    (out / _CONVERTED).write_text("\n".join(p.name for p in torch_files) + "\n")
    return out


def _convert_index(index_file: Path, held: dict[str, set[str]], target: Path) -> None:
    """A sharded checkpoint's index with its shards renamed as converted; a tensor the index
    puts in a shard that does not hold it (or in a shard that is missing) is refused."""
    index = read_json_object(index_file, ContractError)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise ContractError(f"{index_file}: no weight_map")
    for tensor, shard in weight_map.items():
        if tensor not in held.get(str(shard), ()):
            raise ContractError(f"{index_file}: {tensor} is listed in {shard}, which "
                                + ("does not hold it" if shard in held else "is missing"))
    target.write_text(json.dumps({
        "metadata": index.get("metadata") or {},
        "weight_map": {tensor: safetensors_name(shard) for tensor, shard in weight_map.items()},
    }, indent=2))
