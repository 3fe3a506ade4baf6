"""``omni rm`` and ``omni prune``: what in the model cache can go, and how much that frees.

The cache (:mod:`mofa_omni.models.store`) keeps a model's prepared files under
``models/``, each a hard link to its content in ``blobs/``, and what was fetched under
``sources/``. Over time it gathers what nothing names any more: models whose catalog
entry is gone (renamed, a test's), builds and downloads cut off part-way, sources no
model reads, and blobs no model links. A :class:`Removal` is one such path and the
bytes removing it gives back (a file still linked from elsewhere frees nothing: it is
counted where its last link goes).
"""

from __future__ import annotations

import contextlib
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mofa_omni.contract.errors import unknown_name_message
from mofa_omni.models.catalog import Catalog, CatalogError, ModelSpec, PathSource
from mofa_omni.models.store import ModelStore, source_key

MANIFEST_SUFFIX = ".manifest.json"


@dataclass(frozen=True, slots=True)
class Removal:
    path: Path
    why: str
    freed: int  # bytes given back once removed (files with no other link)


Inodes = Counter[tuple[int, int]]  # (device, inode) -> links of it among the paths going


def _files(path: Path) -> list[Path]:
    if path.is_file() or path.is_symlink():
        return [path]
    return [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]


def links_going(paths: Iterable[Path]) -> Inodes:
    """How many links of each file lie among ``paths`` (files or folders)."""
    counts: Inodes = Counter()
    for path in paths:
        for file in _files(path):
            stat = file.lstat()
            counts[stat.st_dev, stat.st_ino] += 1
    return counts


def freed_bytes(path: Path, going: Inodes) -> int:
    """What removing ``path`` gives back: its files all of whose links are going too."""
    total = 0
    for file in _files(path):
        stat = file.lstat()
        if stat.st_nlink <= max(going[stat.st_dev, stat.st_ino], 1):
            total += stat.st_size
    return total


def model_folders(spec: ModelSpec) -> set[str]:
    """The folder names under ``models/`` that ``spec``'s builds take (one per adapter)."""
    adapters = spec.adapters or (spec.adapter,)
    return {spec.name, *(f"{spec.name}.{adapter}" for adapter in adapters)}


def _removals(candidates: list[tuple[Path, str]], store: ModelStore) -> list[Removal]:
    """The candidates with their manifests, then the blobs no model links once they are
    gone, each with what it frees."""
    paths = []
    for path, why in candidates:
        paths.append((path, why))
        manifest = path.with_name(path.name + MANIFEST_SUFFIX)
        if manifest.exists():
            paths.append((manifest, why))
    going = links_going(path for path, _ in paths)
    removals = [Removal(path, why, freed_bytes(path, going)) for path, why in paths]
    blobs = store.root / "blobs"
    for blob in sorted(_files(blobs)) if blobs.is_dir() else []:
        stat = blob.lstat()
        if blob.name.startswith("."):
            removals.append(Removal(blob, "a blob cut off part-way", stat.st_size))
        elif stat.st_nlink <= 1 + going[stat.st_dev, stat.st_ino]:
            removals.append(Removal(blob, "no model links this content", stat.st_size))
    return removals


def plan_remove(name: str, catalog: Catalog, store: ModelStore) -> list[Removal]:
    """What ``omni rm NAME`` removes: the model's builds, and its source if no other catalog
    model reads it. The catalog entry stays (a user's entry is the user's to edit)."""
    if name not in catalog.models:
        raise CatalogError(unknown_name_message("model", name, list(catalog.models)))
    spec = catalog.get(name)
    models = store.root / "models"
    candidates = [(models / folder, f"a build of {name}") for folder in sorted(model_folders(spec))
                  if (models / folder).exists()]
    key = source_key(spec)
    shared = any(source_key(other) == key for other in catalog.models.values()
                 if other.name != name)
    source = store.root / "sources" / key
    if not shared and not isinstance(spec.source, PathSource) and source.exists():
        candidates.append((source, f"the source of {name}, which no other model reads"))
    return _removals(candidates, store)


def plan_prune(catalog: Catalog, store: ModelStore) -> list[Removal]:
    """What ``omni prune`` removes: builds of models no catalog names, builds and downloads
    cut off part-way, sources no catalog model reads, and blobs no model links."""
    root = store.root
    named = {folder for spec in catalog.models.values() for folder in model_folders(spec)}
    sources_read = {source_key(spec) for spec in catalog.models.values()}
    candidates: list[tuple[Path, str]] = []
    for path in _entries(root / "models"):
        if path.name.endswith(MANIFEST_SUFFIX):
            candidates.append((path, "a manifest without its build"))
        elif path.name.startswith("."):
            candidates.append((path, "a build cut off part-way"))
        elif path.name not in named:
            candidates.append((path, "no catalog model has this name"))
    for path in _entries(root / "sources"):
        if path.name.endswith(MANIFEST_SUFFIX):
            candidates.append((path, "a manifest without its source"))
        elif path.name.startswith("."):
            candidates.append((path, "a fetch cut off part-way"))
        elif path.name not in sources_read:
            candidates.append((path, "no catalog model reads this source"))
    candidates += [(path, "an unfinished download") for path in _entries(root / "downloads")]
    return _removals(candidates, store)


def _entries(folder: Path) -> list[Path]:
    """The folder's entries; a manifest only where its folder is gone (else it goes with it)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.endswith(MANIFEST_SUFFIX)
                  or not p.with_name(p.name.removesuffix(MANIFEST_SUFFIX)).exists())


def apply(removals: Iterable[Removal]) -> int:
    """Remove each path; returns the bytes freed."""
    freed = 0
    for removal in removals:
        if removal.path.is_dir() and not removal.path.is_symlink():
            shutil.rmtree(removal.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                removal.path.unlink()
        freed += removal.freed
    return freed
